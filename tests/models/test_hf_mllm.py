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


def test_bf16_precision_loads_bf16_and_reasons(tiny_weights):
    from conceptseg.build import build_pipeline
    from conceptseg.config import from_name

    config = from_name("test", max_new_tokens=4, router=False)
    pipeline = build_pipeline(tiny_weights, mllm_precision="bf16", config=config)
    assert pipeline.mllm.model.dtype == torch.bfloat16
    result = pipeline.run(sample_request())
    assert result.route == "reason" and result.tokens == 4
    assert pipeline.versions["mllm_precision"] == "bf16"


@pytest.mark.parametrize("backend, precision", [("hf", "int4"), ("ort-genai", "bf16")])
def test_precision_the_backend_does_not_have_is_refused(tiny_weights, tmp_path, backend, precision):
    from conceptseg.build import build_pipeline
    from conceptseg.types import RequestError

    with pytest.raises(RequestError, match=f"--mllm-precision: '{precision}' is not one of"):
        build_pipeline(
            tiny_weights, mllm_backend=backend, mllm_precision=precision, engines=tmp_path
        )
