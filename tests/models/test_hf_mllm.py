"""The reference MLLM backend on the tiny checkpoint: prompt tokens, greedy loop, captured states.

Run: .venv/bin/pytest tests/models/test_hf_mllm.py -q
"""

import numpy as np
import pytest
import torch

from conceptseg.backends.hf_mllm import HfMllm
from conceptseg.models.qwen import VISION_TOKEN_IDS
from conceptseg.models.qwen_torch import apply_repetition_penalty
from conceptseg.mosaic import build_mosaic, resize_target
from conceptseg.prompt import messages
from conceptseg.samples import sample_request


@pytest.fixture(scope="module")
def mllm(tiny_weights):
    return HfMllm(tiny_weights / "mllm", max_new_tokens=24)


def _inputs():
    request = sample_request()
    mosaic = build_mosaic(request.references)
    return messages(request.question, mosaic), [mosaic.image, resize_target(request.image)]


def _reforward(mllm, msgs, images, tokens):
    """What the reference does: one full forward over prompt + completion (vision tower included)."""
    inputs = mllm.prompt_inputs(msgs, images)
    ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    mm = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros(1, len(tokens), dtype=torch.long)], dim=1
    )
    with torch.inference_mode():
        out = mllm.model.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=mm,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        )
    return out.last_hidden_state[0, inputs["input_ids"].shape[1] :].numpy()


def test_each_600px_image_is_441_visual_tokens(mllm):
    msgs, images = _inputs()
    inputs = mllm.prompt_inputs(msgs, images)
    assert inputs["image_grid_thw"].tolist() == [[1, 42, 42], [1, 42, 42]]
    assert int((inputs["input_ids"] == 151655).sum()) == 2 * 441


def test_states_captured_while_decoding_match_full_reforward(mllm):
    msgs, images = _inputs()
    gen = mllm.generate(msgs, images)
    assert len(gen.token_ids) == 24 and not gen.stopped, "random weights run to the cap"
    assert gen.hidden.shape == (24, 64) and gen.hidden.dtype == np.float32
    ref = _reforward(mllm, msgs, images, gen.token_ids)
    np.testing.assert_allclose(gen.hidden, ref, rtol=0, atol=1e-4)


def test_stop_token_is_kept_with_its_state(mllm, monkeypatch):
    msgs, images = _inputs()
    first = mllm.generate(msgs, images).token_ids[0]
    monkeypatch.setattr(mllm, "stop_ids", {first})  # make the first emitted token a stop token
    gen = mllm.generate(msgs, images)
    assert gen.stopped and gen.token_ids == [first] and gen.hidden.shape == (1, 64)
    np.testing.assert_allclose(
        gen.hidden, _reforward(mllm, msgs, images, [first]), rtol=0, atol=1e-4
    )


def test_total_length_cap(tiny_weights):
    msgs, images = _inputs()
    small = HfMllm(tiny_weights / "mllm", max_new_tokens=768, max_length=0)
    prompt_tokens = small.prompt_inputs(msgs, images)["input_ids"].shape[1]
    small.max_length = prompt_tokens + 5
    assert len(small.generate(msgs, images).token_ids) == 5


def test_generation_is_deterministic(mllm):
    msgs, images = _inputs()
    a, b = mllm.generate(msgs, images), mllm.generate(msgs, images)
    assert a.token_ids == b.token_ids and np.array_equal(a.hidden, b.hidden)


def test_vision_tokens_are_suppressed(mllm, monkeypatch):
    class FavourImagePad(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, h):
            logits = self.head(h)
            logits[..., 151655] = 1e4
            return logits

    monkeypatch.setattr(mllm.model, "lm_head", FavourImagePad(mllm.model.lm_head))
    msgs, images = _inputs()
    assert not set(mllm.generate(msgs, images).token_ids) & set(VISION_TOKEN_IDS)


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0) is logits


@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_bf16_and_weight_only_precisions_load_bf16_and_reason(tiny_weights, precision):
    from conceptseg.backends import hf_mllm
    from conceptseg.build import MLLM_PRECISIONS, build_pipeline
    from conceptseg.config import from_name

    assert MLLM_PRECISIONS["hf"] == hf_mllm.PRECISIONS  # build names what the backend takes
    config = from_name("test", max_new_tokens=4, router=False)
    pipeline = build_pipeline(tiny_weights, mllm_precision=precision, config=config)
    assert pipeline.mllm.model.dtype == torch.bfloat16
    result = pipeline.run(sample_request())
    assert result.route == "reason" and result.tokens == 4
    assert pipeline.versions["mllm_precision"] == precision


@pytest.mark.parametrize("backend, precision", [("hf", "fp16"), ("ort-genai", "bf16")])
def test_precision_the_backend_does_not_have_is_refused(tiny_weights, tmp_path, backend, precision):
    from conceptseg.build import build_pipeline
    from conceptseg.types import RequestError

    with pytest.raises(RequestError, match=f"--mllm-precision: '{precision}' is not one of"):
        build_pipeline(
            tiny_weights, mllm_backend=backend, mllm_precision=precision, engines=tmp_path
        )


def _dequantized(layer):
    from conceptseg.models import weight_only

    if layer.mode == "int8":
        return layer.packed.float() * layer.scales.float()[:, None]
    return weight_only.dequantize_int4(*weight_only.quantize_int4(layer.weight, layer.group), layer.group)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_decode_is_bf16_prefill_then_the_quantized_decoder(lively_mllm, precision):
    """bf16 prefill, decode steps on int4 / int8 weight copies: every decoder and LM-head linear
    is swapped (the vision tower is not), the prompt runs on bf16 and each decode step on the copies,
    and the states captured while decoding are those of the bf16 prompt cache followed by the
    completion through the dequantized weights (within 3 %, the kernels' rounding on this
    sensitive checkpoint; through the bf16 weights instead int4 is ~50 % off, int8 ~2.6 %)."""
    from conceptseg.models.weight_only import DecodeLinear

    mllm = HfMllm(lively_mllm, precision=precision, max_new_tokens=12)
    model = mllm.model
    assert model.dtype == torch.bfloat16 and isinstance(model.lm_head, DecodeLinear)
    text = model.model.language_model
    assert not [n for n, m in text.named_modules() if type(m) is torch.nn.Linear]
    assert not [n for n, m in model.model.visual.named_modules() if isinstance(m, DecodeLinear)]
    msgs, images = _inputs()
    layers = [m for m in text.modules() if isinstance(m, DecodeLinear)]
    rows = []
    hooks = [m.register_forward_pre_hook(lambda m, x: rows.append(x[0].numel() // m.in_features))
             for m in (*layers, model.lm_head)]  # fmt: skip
    gen = mllm.generate(msgs, images)
    for hook in hooks:
        hook.remove()
    # the prompt: one call per layer with all its rows; 12 single-row decode steps; the LM head
    # on single rows only (the prompt's last position, then each step's)
    assert sorted(set(rows)) == [1, prompt_len := max(rows)] and prompt_len > 16
    assert rows.count(1) == 12 * len(layers) + 13 and rows.count(prompt_len) == len(layers)
    assert len(gen.token_ids) == 12 and len(set(gen.token_ids)) > 3, "lively weights vary"
    assert gen.hidden.shape == (12, 64) and gen.hidden.dtype == np.float32
    assert mllm.generate(msgs, images).token_ids == gen.token_ids, "deterministic"
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
              for k, v in mllm.prompt_inputs(msgs, images).items()}  # fmt: skip
    dequantized = [_dequantized(layer).to(torch.bfloat16) for layer in layers]

    @torch.inference_mode()
    def completion_error(decode_weights):
        """Max relative L2 of the captured states vs the prompt in bf16, then the 12 completion
        tokens in one forward on the bf16 path through ``decode_weights``."""
        cache = model.model(**inputs, use_cache=True).past_key_values
        kept = [(layer.weight.data, layer.max_rows) for layer in layers]
        for layer, weight in zip(layers, decode_weights, strict=True):
            layer.weight.data, layer.max_rows = weight, 0
        try:
            out = model.model(input_ids=torch.tensor([gen.token_ids]), past_key_values=cache)
        finally:
            for layer, (weight, rows) in zip(layers, kept, strict=True):
                layer.weight.data, layer.max_rows = weight, rows
        ref = out.last_hidden_state[0].float().numpy()
        return float((np.linalg.norm(gen.hidden - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())

    quantized = completion_error(dequantized)
    original = completion_error([layer.weight.data for layer in layers])
    assert quantized < 0.03, f"{precision} decode vs its dequantized decoder: {quantized:.4f}"
    if precision == "int4":  # int8's error is at the kernels' rounding level here
        assert original > 10 * quantized, f"the decode ran the int4 copies ({original:.4f})"


def test_as_transformers_runs_it_is_the_stock_bf16_model(lively_mllm):
    """Within ``as_transformers_runs_it`` an int4 model computes exactly as transformers' bf16
    model with SDPA (what the reference recipe and the ``hf_bf16`` contender run); outside it is
    the int4 model again."""
    from conceptseg.backends.hf_mllm import as_transformers_runs_it
    from conceptseg.models import decode_attention

    msgs, images = _inputs()
    stock = HfMllm(lively_mllm, precision="bf16", max_new_tokens=8)
    decode_attention.stock(stock.model)
    want = stock.generate(msgs, images)
    quantized = HfMllm(lively_mllm, precision="int4", max_new_tokens=8)
    before = quantized.generate(msgs, images)
    with as_transformers_runs_it(quantized.model):
        assert quantized.model.config.text_config._attn_implementation == "sdpa"
        got = quantized.generate(msgs, images)
    assert got.token_ids == want.token_ids
    np.testing.assert_array_equal(got.hidden, want.hidden)
    assert quantized.model.config.text_config._attn_implementation == decode_attention.NAME
    assert quantized.generate(msgs, images).token_ids == before.token_ids != want.token_ids


def test_decode_attention_matches_sdpa_in_fp32(lively_mllm):
    """The one-query attention (float32 matmuls) against transformers' SDPA on the fp32 model
    (which keeps SDPA: the exact reference): same tokens, states within 1e-5."""
    from conceptseg.models import decode_attention

    msgs, images = _inputs()
    mllm = HfMllm(lively_mllm, max_new_tokens=8)
    assert mllm.model.config.text_config._attn_implementation == "sdpa"
    sdpa = mllm.generate(msgs, images)
    decode_attention.use(mllm.model)
    ours = mllm.generate(msgs, images)
    assert ours.token_ids == sdpa.token_ids and len(set(ours.token_ids)) > 3
    np.testing.assert_allclose(ours.hidden, sdpa.hidden, rtol=0, atol=1e-5)


def test_teacher_forcing_reports_choices_and_the_forced_states(lively_mllm):
    """``forced`` = the model's own tokens reproduces its generation; another sequence gives the
    states of that sequence (a full re-forward over it) and the choices after each forced prefix."""
    from conceptseg.backends.hf_mllm import full_forward_states

    msgs, images = _inputs()
    mllm = HfMllm(lively_mllm, max_new_tokens=8)
    own = mllm.generate(msgs, images)
    again = mllm.generate(msgs, images, forced=own.token_ids)
    assert again.token_ids == own.token_ids
    np.testing.assert_allclose(again.hidden, own.hidden, rtol=0, atol=1e-5)
    other = [own.token_ids[0], *own.token_ids[:1] * 5]  # repeated: not what greedy picks
    streamed = []
    forced = mllm.generate(msgs, images, on_text=streamed.append, forced=other)
    assert len(forced.token_ids) == 6 and forced.token_ids != other
    assert "".join(streamed) == forced.text  # the stream carries the choices, like the text
    inputs = mllm.prompt_inputs(msgs, images)
    ref = full_forward_states(mllm.model, inputs, other)[inputs["input_ids"].shape[1]:]
    np.testing.assert_allclose(forced.hidden, ref, rtol=0, atol=1e-4)
