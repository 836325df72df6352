"""Batch invariance of the ort-genai backend's concurrent decoding (``open``/``step``), on the
tiny checkpoint with its decoder matrices scaled x8 (tokens vary, as in test_ortgenai_mllm.py).

Every request decoded in a batch that others join and leave mid-way gives the tokens it gives
alone, and states within 1e-4 (fp32) of alone; alone (our sessions, the prompt in chunks) gives
``generate``'s tokens (ort-genai's generator) and states within 1e-4, whatever the chunk size.
The M-RoPE positions are ort-genai's. Also through the scheduler, with one request cancelled
mid-way and newcomers prefilled in units between the decode steps.
Run: .venv/bin/pytest tests/models/test_ortgenai_batch.py -q
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conceptseg.models.qwen import mrope_positions
from conceptseg.prompt import messages
from conceptseg.serving.scheduler import Job, Scheduler
from conceptseg.types import Cancelled

og = pytest.importorskip("onnxruntime_genai", reason="pip install onnxruntime-genai==0.18.0")

from conceptseg.backends.ortgenai_mllm import OrtGenaiMllm  # noqa: E402
from conceptseg_export.mllm_export import export_mllm, sample_inputs  # noqa: E402

TOKENS = 16
CHUNK = 200  # prompt tokens per prefill unit: the sample prompt takes 5


@pytest.fixture(scope="module")
def mllm(lively_mllm, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines-batch")
    export_mllm(lively_mllm, out, ("fp32",), verify_tokens=0)
    model_dir = out / "mllm" / "fp32"
    return OrtGenaiMllm(model_dir, max_new_tokens=TOKENS, threads=2, prefill_chunk=CHUNK)


@pytest.fixture(scope="module")
def prompts():
    """Three prompts of different lengths: the sample (mosaic + target), another question on the
    same images, and the target alone."""
    msgs, images = sample_inputs()
    question = "Which object is the same kind of thing as the reference? Answer briefly."
    return [
        (msgs, images),
        (_requestion(msgs, question), images),
        (messages("the red one", None), images[1:]),
    ]


def _requestion(msgs, question):
    swapped = [dict(m) for m in msgs]
    last = swapped[-1]
    last["content"] = [
        {**part, "text": question} if part.get("type") == "text" else part
        for part in last["content"]
    ]
    return swapped


def _alone(mllm, msgs, images):
    seq = mllm.open(msgs, images)
    while not seq.done:
        mllm.step([seq])
    gen = mllm.finish(seq)
    mllm.release(seq)
    return gen


@pytest.fixture(scope="module")
def alone(mllm, prompts):
    return [_alone(mllm, *p) for p in prompts]


def test_alone_gives_generates_tokens_and_tokens_vary(mllm, prompts, alone):
    for (msgs, images), gen in zip(prompts, alone, strict=True):
        ref = mllm.generate(msgs, images)
        assert gen.token_ids == ref.token_ids
        np.testing.assert_allclose(gen.hidden, ref.hidden, rtol=0, atol=1e-4)
        assert gen.text == ref.text and gen.prompt_tokens == ref.prompt_tokens
    assert len(set(alone[0].token_ids)) >= 6, "the lively checkpoint must not echo one token"
    assert len({g.prompt_tokens for g in alone}) == 3, "the prompts must differ in length"
    assert alone[0].token_ids != alone[2].token_ids
    assert alone[0].prompt_tokens > 4 * CHUNK, "the sample prompt must take several chunks"


def test_positions_are_ort_genais(mllm, prompts):
    for msgs, images in prompts:
        inputs = mllm.prompt_inputs(msgs, images)
        generator = mllm._generator(inputs, inputs["input_ids"].shape[1] + 1)
        theirs = np.asarray(generator.get_input("position_ids"))[:, 0]
        ours = mrope_positions(inputs["input_ids"][0], inputs.get("image_grid_thw"))
        np.testing.assert_array_equal(ours, theirs)


def test_prefill_chunk_size_changes_nothing_but_rounding(mllm, prompts, alone):
    whole = OrtGenaiMllm(mllm.model_dir, max_new_tokens=TOKENS, threads=2, prefill_chunk=10**6)
    seq = whole.begin(*prompts[0])
    units = 0
    while not whole.prefill(seq):
        units += 1
    assert units == len(prompts[0][1]), "one unit per image, then the prompt in one chunk"
    while not seq.done:
        whole.step([seq])
    gen = whole.finish(seq)
    assert gen.token_ids == alone[0].token_ids
    np.testing.assert_allclose(gen.hidden, alone[0].hidden, rtol=0, atol=1e-4)


def test_staggered_batch_gives_each_its_alone_tokens_and_states(mllm, prompts, alone):
    seqs = [mllm.open(*prompts[0])]
    for _ in range(3):
        mllm.step(seqs)
    seqs.append(mllm.open(*prompts[1]))  # joins a running batch
    mllm.step(seqs)
    seqs.append(mllm.open(*prompts[2]))
    quitter = mllm.open(*prompts[0])  # joins, then leaves mid-way (as a cancelled request)
    seqs.append(quitter)
    for _ in range(2):
        mllm.step(seqs)
    mllm.release(quitter)
    seqs.remove(quitter)
    while any(not s.done for s in seqs):
        mllm.step(seqs)  # finished rows stay, skipped (done), until all are
    for seq, ref in zip(seqs, alone, strict=True):
        gen = mllm.finish(seq)
        assert gen.token_ids == ref.token_ids
        np.testing.assert_allclose(gen.hidden, ref.hidden, rtol=0, atol=1e-4)
        mllm.release(seq)


def test_scheduler_eight_overlapping_requests_and_a_cancel(mllm, prompts, alone):
    sched = Scheduler(mllm, slots=4, queue=8)
    results: dict[int, object] = {}
    done = threading.Event()

    def settle(i):
        def on(value):
            results[i] = value
            if len(results) == 8:
                done.set()

        return on

    for i in range(8):
        msgs, images = prompts[i % 3]
        sched.submit(Job(msgs, images, settle(i), settle(i), request_id=f"r{i}"))
    assert sched.cancel("r7")
    assert done.wait(120), f"answered: {sorted(results)}"
    sched.close()
    assert isinstance(results[7], Cancelled)
    for i in range(7):
        ref = alone[i % 3]
        assert results[i].token_ids == ref.token_ids, i
        np.testing.assert_allclose(results[i].hidden, ref.hidden, rtol=0, atol=1e-4)
    assert sched.peak == 4


def test_rows_stay_put_while_sequences_join_and_leave(mllm, prompts, alone):
    """No step copies the cache; a leaver's row takes the last row, a newcomer fills a free
    row, and what a row holds past its own length (a former occupant's entries) is never read."""
    first, second = mllm.open(*prompts[0]), mllm.open(*prompts[1])  # 4 rows reserved
    mllm.step([first, second])
    buffers = [id(a) for a in mllm._rows.arrays]
    for _ in range(2):
        mllm.step([first, second])
    assert [id(a) for a in mllm._rows.arrays] == buffers, "the cache was copied during a step"
    assert mllm._rows.arrays[0].shape[2] >= max(s.prompt_tokens + s.budget for s in (first, second))
    mllm.release(first)  # row 0 goes: the second sequence's row moves into it
    assert mllm._rows.seqs == [second]
    for array in mllm._rows.arrays:  # whatever lies past a row's length must never be read
        array[0, :, second.length :] = np.nan
        array[1:] = np.nan
    third = mllm.open(*prompts[2])  # shorter than the row's old occupant
    assert third.prompt_tokens < second.prompt_tokens
    seqs = [second, third]
    while any(not s.done for s in seqs):
        mllm.step(seqs)
    assert [id(a) for a in mllm._rows.arrays] == buffers, "a join or a leave reallocated"
    for seq, ref in zip(seqs, alone[1:], strict=True):
        gen = mllm.finish(seq)
        assert gen.token_ids == ref.token_ids
        np.testing.assert_allclose(gen.hidden, ref.hidden, rtol=0, atol=1e-4)
    for seq in seqs:
        mllm.release(seq)
    assert mllm._rows.seqs == [] and [id(a) for a in mllm._rows.arrays] == buffers, (
        "the buffers stay for the next batch"
    )
