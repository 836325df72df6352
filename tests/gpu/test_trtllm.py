"""The TensorRT-LLM MLLM backend: which state is which token's, the decision rule, quantized
checkpoints, KV block reuse.

Two CPU tests run everywhere (they need neither TensorRT-LLM nor a GPU): the logits processor
applies the hf backend's rule, and the mapping from TensorRT-LLM's per-iteration outputs to the
CTM's states is proved on the hf side (a full re-forward laid out as TensorRT-LLM lays out its
outputs). The GPU tests skip themselves, with the reason under ``-ra``, without ``tensorrt_llm``
(pinned: TRTLLM_PIN, in the NGC TensorRT-LLM container of that release) or a CUDA device.

    .venv/bin/python -m pytest tests/gpu/test_trtllm.py -q -ra
"""

from __future__ import annotations

import importlib.util
import time
import types

import numpy as np
import pytest
import torch

from conceptseg.backends.hf_mllm import VISION_TOKEN_IDS, HfMllm
from conceptseg.backends.trtllm_mllm import SENTINEL, TRTLLM_PIN, HfDecisionRule, ctm_states

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
needs_gpu = pytest.mark.skipif(
    not (HAS_TRTLLM and torch.cuda.is_available()),
    reason=(
        f"needs tensorrt_llm=={TRTLLM_PIN} and a CUDA GPU "
        f"(tensorrt_llm importable: {HAS_TRTLLM}, CUDA: {torch.cuda.is_available()})"
    ),
)


def _sample():
    from conceptseg_export.mllm_export import sample_inputs

    return sample_inputs()


def _reforward(model, processor_inputs, tokens):
    """Final-norm states of one forward over prompt + ``tokens`` (every position, (L, H))."""
    inputs = dict(processor_inputs)
    prompt = inputs["input_ids"].shape[1]
    extra = torch.tensor([tokens], dtype=inputs["input_ids"].dtype)
    for key, value in list(inputs.items()):
        if key == "input_ids":
            inputs[key] = torch.cat([value, extra], dim=1)
        elif value.dim() == 2 and value.shape == (1, prompt):  # attention mask, token types
            fill = torch.ones_like(extra) if key == "attention_mask" else torch.zeros_like(extra)
            inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    with torch.inference_mode():
        out = model.model(**{k: v.to(model.device) for k, v in inputs.items()})
    return out.last_hidden_state[0].float().cpu().numpy()


# --- CPU: the rule and the mapping -----------------------------------------------------------


def test_logits_processor_is_the_hf_rule_then_forces_the_sentinel():
    rng = np.random.default_rng(1)
    prompt = [int(i) for i in rng.integers(0, 151936, size=30)]
    hf_rule = types.SimpleNamespace(repetition_penalty=1.05)
    rule = HfDecisionRule(prompt, stop_ids={151645}, penalty=1.05, budget=5)
    done: list[int] = []
    for step in range(5):
        logits = torch.from_numpy(rng.normal(size=151936).astype(np.float32))
        logits[VISION_TOKEN_IDS[step % 5]] = 99.0  # a vision token on top: suppressed
        logits[prompt[step]] = 50.0  # a penalised prompt id near the top
        seen = torch.tensor([prompt + done])
        expected = HfMllm._next_token(hf_rule, logits[None].clone(), seen)
        trt_view = logits[None].clone()  # TensorRT-LLM's ids: image placeholders out of vocab
        rule(0, trt_view, [[151937] * len(prompt) + done], None, None)
        assert int(trt_view.argmax()) == expected, step
        done.append(expected)
    forced = torch.zeros(1, 151936)
    rule(0, forced, [prompt + done], None, None)  # budget reached: t_5 gets its own step
    assert int(forced.argmax()) == SENTINEL and torch.isinf(forced).sum() == 151935
    rule.budget = 50
    stopped = torch.zeros(1, 151936)
    rule(0, stopped, [prompt + done + [151645]], None, None)  # a stop id: same
    assert int(stopped.argmax()) == SENTINEL


@pytest.fixture(scope="module")
def hf_tiny(tiny_weights):
    return HfMllm(tiny_weights / "mllm", max_new_tokens=6)


@pytest.mark.parametrize("stop_at", [None, 2])
def test_state_mapping_proved_on_the_hf_side(hf_tiny, monkeypatch, stop_at):
    """TensorRT-LLM's raw[j] is the output of iteration j: raw[0] at the last prompt position,
    raw[j] at t_j. Built here from an hf full re-forward, ``ctm_states`` must return exactly the
    hf backend's states (t_j as input, the stop token included), and the naive raw[:n] must not."""
    hf = hf_tiny
    msgs, images = _sample()
    if stop_at is not None:
        first = hf.generate(msgs, images).token_ids
        monkeypatch.setattr(hf, "stop_ids", {first[stop_at]})
    gen = hf.generate(msgs, images)
    inputs = hf.prompt_inputs(msgs, images)
    prompt = inputs["input_ids"].shape[1]
    states = _reforward(hf.model, inputs, gen.token_ids)  # (P + n, H)
    n = len(gen.token_ids)
    raw = states[prompt - 1 : prompt + n]  # what TensorRT-LLM returns with the sentinel forced
    tokens, hidden, stopped = ctm_states(gen.token_ids + [SENTINEL], raw, hf.stop_ids)
    assert tokens == gen.token_ids and stopped == gen.stopped == (stop_at is not None)
    np.testing.assert_allclose(hidden, gen.hidden, rtol=0, atol=1e-4)
    naive = np.abs(raw[:n] - gen.hidden).max()
    assert naive > 100 * np.abs(hidden - gen.hidden).max(), "the off-by-one must be visible"
    with pytest.raises(AssertionError, match="own step is missing"):
        ctm_states(gen.token_ids, raw[:n], hf.stop_ids)  # no sentinel step: t_n has no state


# --- GPU: the backend on TensorRT-LLM --------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A bf16 random checkpoint with TensorRT-LLM-friendly head sizes (128 text, 64 vision)."""
    from conceptseg import checkpoints

    size = checkpoints.MllmSize(256, 512, 2, 2, 1, (16, 24, 24), True, 2, 128, 256, 2, (1,))
    checkpoints.MLLM_SIZES["trtllm-small"] = size
    try:
        out = tmp_path_factory.mktemp("trtllm") / "weights"
        checkpoints.write_synthetic_mllm(out / "mllm", "trtllm-small", seed=0)
    finally:
        del checkpoints.MLLM_SIZES["trtllm-small"]
    return out


@pytest.fixture(scope="module")
def backend(small_checkpoint):
    from conceptseg.backends.trtllm_mllm import TrtllmMllm

    return TrtllmMllm(small_checkpoint / "mllm", max_new_tokens=16)


@pytest.fixture(scope="module")
def hf_small(small_checkpoint):
    return HfMllm(small_checkpoint / "mllm", max_new_tokens=16)


@needs_gpu
def test_trtllm_states_are_each_tokens_own(backend, hf_small):
    msgs, images = _sample()
    gen = backend.generate(msgs, images)
    assert gen.hidden.shape == (len(gen.token_ids), 256) and gen.hidden.dtype == np.float32
    inputs = hf_small.prompt_inputs(msgs, images)
    prompt = inputs["input_ids"].shape[1]
    ref = _reforward(hf_small.model, inputs, gen.token_ids)[prompt:]  # fp32, TensorRT-LLM's tokens
    scale = np.sqrt((ref**2).mean())
    right = np.abs(gen.hidden - ref).max() / scale
    shifted = np.abs(gen.hidden[1:] - ref[:-1]).max() / scale if len(ref) > 1 else np.inf
    print(f"\nbf16 TensorRT-LLM vs fp32 re-forward: {right:.4f} (shifted by one: {shifted:.4f})")
    assert right < 0.05 and right < shifted / 5


@needs_gpu
def test_trtllm_tokens_and_stop_token(backend, hf_small, monkeypatch):
    msgs, images = _sample()
    ref, ours = hf_small.generate(msgs, images), backend.generate(msgs, images)
    agreement = np.mean([a == b for a, b in zip(ref.token_ids, ours.token_ids, strict=False)])
    print(f"\ngreedy tokens, bf16 TensorRT-LLM vs fp32 hf: {agreement:.2f} agreement")
    monkeypatch.setattr(backend, "stop_ids", {ours.token_ids[0]})
    stopped = backend.generate(msgs, images)
    assert stopped.stopped and stopped.token_ids == ours.token_ids[:1]
    assert stopped.hidden.shape == (1, 256)


@needs_gpu
@pytest.mark.parametrize("qformat", ["fp8", "int4_awq", "w4a8_awq"])
def test_quantized_checkpoint_loads_and_reports(small_checkpoint, backend, tmp_path, qformat):
    from conceptseg.backends.trtllm_mllm import TrtllmMllm
    from conceptseg_export import trtllm_quantize

    major, minor = torch.cuda.get_device_capability()
    if major * 10 + minor < trtllm_quantize.QFORMATS[qformat][1]:
        pytest.skip(f"{qformat} needs SM >= {trtllm_quantize.QFORMATS[qformat][1]}")
    cfg = trtllm_quantize.QuantizeConfig(weights=small_checkpoint, out=tmp_path, qformat=qformat)
    out = trtllm_quantize.main(cfg)
    assert (out / "trtllm.json").exists() and (out / "hf_quant_config.json").exists()
    msgs, images = _sample()
    quantized = TrtllmMllm(out, max_new_tokens=16)
    try:
        bf16, quant = backend.generate(msgs, images), quantized.generate(msgs, images)
    finally:
        quantized.close()
    agreement = np.mean([a == b for a, b in zip(bf16.token_ids, quant.token_ids, strict=False)])
    print(f"\n{qformat} vs bf16 tokens: {agreement:.2f} agreement")
    assert quant.hidden.shape == (len(quant.token_ids), 256)


@needs_gpu
def test_kv_block_reuse_saves_prefill(backend, monkeypatch, record_property):
    """Same references, another target: the prefix blocks (up to the mosaic) are reused, and
    reuse changes nothing in the result."""
    from PIL import Image

    from conceptseg.mosaic import build_mosaic, resize_target
    from conceptseg.prompt import messages
    from conceptseg.samples import sample_references, sample_target

    refs = sample_references()
    target = resize_target(sample_target())
    other_target = target.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def run(references, image):
        mosaic = build_mosaic(references)
        start = time.perf_counter()
        gen = backend.generate(messages("the mug", mosaic), [mosaic.image, image])
        return gen, time.perf_counter() - start

    monkeypatch.setattr(backend, "max_new_tokens", 1)  # prefill + one step
    first = run(refs, target)[0]  # warm-up; caches the blocks of this mosaic's prefix
    other = run(refs[::-1], target)[0]  # same token ids, other pixels: must not hit those blocks
    assert np.abs(first.hidden - other.hidden).max() > 1e-3, "blocks reused across images"
    reused = min(run(refs, other_target)[1] for _ in range(3))
    fresh = min(run(order, other_target)[1] for order in (refs[1:] + refs[:1], refs[2:] + refs[:2]))
    print(f"\nprefill: shared references {reused * 1e3:.1f} ms, new ones {fresh * 1e3:.1f} ms")
    record_property("trtllm_prefix_saving", round(1 - reused / fresh, 3))
    monkeypatch.setattr(backend, "max_new_tokens", 8)
    once, again = run(refs[::-1], other_target)[0], run(refs[::-1], other_target)[0]
    assert once.token_ids == again.token_ids
    np.testing.assert_allclose(once.hidden, again.hidden, rtol=0, atol=2e-2)


@needs_gpu
def test_eight_overlapping_requests_each_give_their_alone_tokens(backend):
    """Issue 11: concurrent generate calls (the mllm model's scheduler, 8 slots) are batched in
    flight by TensorRT-LLM; each request's tokens equal its tokens alone, a cancelled one ends."""
    import threading

    from conceptseg.serving.scheduler import Job, Scheduler
    from conceptseg.types import Cancelled

    msgs, images = _sample()
    alone = backend.generate(msgs, images)
    sched = Scheduler(backend, slots=8, queue=1)
    results, done = {}, threading.Event()

    def settle(i):
        def on(value):
            results[i] = value
            if len(results) == 9:
                done.set()

        return on

    for i in range(9):
        sched.submit(Job(msgs, images, settle(i), settle(i), on_text=lambda d: None,
                         request_id=f"r{i}"))  # fmt: skip
    sched.cancel("r8")
    assert done.wait(300)
    sched.close()
    assert isinstance(results[8], Cancelled)
    for i in range(8):
        assert results[i].token_ids == alone.token_ids, i
        np.testing.assert_allclose(results[i].hidden, alone.hidden, rtol=0, atol=5e-2)
