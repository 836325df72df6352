"""The TensorRT-LLM backend's CPU-provable parts (neither TensorRT-LLM nor a GPU needed): its
logits processor applies the hf backend's decision rule, and the mapping from TensorRT-LLM's
per-iteration outputs to the CTM's states is proved on the hf side (a full re-forward laid out
as TensorRT-LLM lays out its outputs).

Run: .venv/bin/pytest tests/models/test_trtllm_rule.py -q
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from conceptseg.backends.hf_mllm import HfMllm, full_forward_states
from conceptseg.backends.trtllm_mllm import SENTINEL, HfDecisionRule, ctm_states
from conceptseg.models import qwen_torch
from conceptseg.models.qwen import VISION_TOKEN_IDS
from conceptseg_export.mllm_export import sample_inputs


@pytest.fixture(scope="module")
def hf_tiny(tiny_weights):
    return HfMllm(tiny_weights / "mllm", max_new_tokens=6)


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
        expected = qwen_torch.next_token(logits[None].clone(), seen, hf_rule.repetition_penalty)
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


@pytest.mark.parametrize("stop_at", [None, 2])
def test_state_mapping_proved_on_the_hf_side(hf_tiny, monkeypatch, stop_at):
    """TensorRT-LLM's raw[j] is the output of iteration j: raw[0] at the last prompt position,
    raw[j] at t_j. Built here from an hf full re-forward, ``ctm_states`` must return exactly the
    hf backend's states (t_j as input, the stop token included), and the naive raw[:n] must not."""
    hf = hf_tiny
    msgs, images = sample_inputs()
    if stop_at is not None:
        first = hf.generate(msgs, images).token_ids
        monkeypatch.setattr(hf, "stop_ids", {first[stop_at]})
    gen = hf.generate(msgs, images)
    inputs = hf.prompt_inputs(msgs, images)
    prompt = inputs["input_ids"].shape[1]
    states = full_forward_states(hf.model, inputs, gen.token_ids)  # (P + n, H)
    n = len(gen.token_ids)
    raw = states[prompt - 1 : prompt + n]  # what TensorRT-LLM returns with the sentinel forced
    tokens, hidden, stopped = ctm_states(gen.token_ids + [SENTINEL], raw, hf.stop_ids)
    assert tokens == gen.token_ids and stopped == gen.stopped == (stop_at is not None)
    np.testing.assert_allclose(hidden, gen.hidden, rtol=0, atol=1e-4)
    naive = np.abs(raw[:n] - gen.hidden).max()
    assert naive > 100 * np.abs(hidden - gen.hidden).max(), "the off-by-one must be visible"
    with pytest.raises(AssertionError, match="own step is missing"):
        ctm_states(gen.token_ids, raw[:n], hf.stop_ids)  # no sentinel step: t_n has no state
