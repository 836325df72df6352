"""The TensorRT-LLM MLLM backend on a GPU: states, tokens and the stop token against hf,
quantized checkpoints, KV block reuse. Marked ``gpu``; each test skips itself, with the reason
under ``-ra``, without ``tensorrt_llm`` (the stack's, in the NGC TensorRT-LLM container) or a
CUDA device. The CPU proofs of the rule and the state mapping: tests/models/test_trtllm_rule.py.

Run: .venv/bin/pytest tests/gpu/test_trtllm.py -q -ra -m gpu
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from conceptseg.backends.hf_mllm import HfMllm, full_forward_states
from conceptseg.backends.trtllm_mllm import TRTLLM_PIN
from conceptseg_export.mllm_export import sample_inputs

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
_no_gpu = pytest.mark.skipif(
    not (HAS_TRTLLM and torch.cuda.is_available()),
    reason=(
        f"needs tensorrt_llm=={TRTLLM_PIN} and a CUDA GPU "
        f"(tensorrt_llm importable: {HAS_TRTLLM}, CUDA: {torch.cuda.is_available()})"
    ),
)


def needs_gpu(test):  # the `gpu` marker (selected with -m gpu) and the skip with its reason
    return pytest.mark.gpu(_no_gpu(test))


def _sample():
    return sample_inputs()


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
    ref = full_forward_states(hf_small.model, inputs, gen.token_ids)[prompt:]  # fp32, TensorRT-LLM's tokens
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
