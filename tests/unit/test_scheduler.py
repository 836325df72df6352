"""The MLLM scheduler with fake backends (no Triton, no model): admission, capacity, batching,
per-request outcomes, cancellation by client and by id, failures that stay with their request.

Run: .venv/bin/pytest tests/unit/test_scheduler.py -q
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from conceptseg.protocols import Generation
from conceptseg.serving.scheduler import Job, Scheduler
from conceptseg.types import AtCapacity, Cancelled


@dataclass(eq=False)
class FakeSeq:
    prompt: str
    budget: int
    on_text: object = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False


class Stepper:
    """Each prompt's tokens are ``len(prompt) + i``: a token depends on its own request only.
    Records every batch it stepped; ``gate`` (if set) blocks each step until released."""

    def __init__(self, budget: int = 5, step_s: float = 0.0) -> None:
        self.budget, self.step_s = budget, step_s
        self.batches: list[int] = []
        self.released = 0
        self.gate: threading.Event | None = None

    def open(self, messages, images, on_text=None):
        prompt = messages[0]["content"]
        if prompt == "bad":
            raise ValueError("bad prompt")
        return FakeSeq(prompt, self.budget, on_text)

    def step(self, seqs):
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.step_s)
        self.batches.append(len(seqs))
        for seq in seqs:
            if seq.prompt == "explode" and len(seq.tokens) == 1:
                raise RuntimeError("step failed")
            seq.tokens.append(len(seq.prompt) + len(seq.tokens))
            if seq.on_text is not None:
                seq.on_text(f"{seq.tokens[-1]} ")
            seq.done = len(seq.tokens) >= seq.budget

    def finish(self, seq):
        text = " ".join(map(str, seq.tokens))
        return Generation(text, list(seq.tokens), np.zeros((len(seq.tokens), 2), np.float32),
                          len(seq.prompt), False)  # fmt: skip

    def release(self, seq):
        self.released += 1


class Chunked(Stepper):
    """A backend whose prefill runs in ``units`` calls (``begin``/``prefill``); logs every
    call in ``log`` as ("prefill", prompt) or ("step", prompts)."""

    def __init__(self, units: int, **kw) -> None:
        super().__init__(**kw)
        self.units, self.log, self.begin_s = units, [], 0.0

    def begin(self, messages, images, on_text=None):
        self.log.append(("begin", threading.current_thread().name))
        time.sleep(self.begin_s)
        seq = super().open(messages, images, on_text)
        seq.left, seq.ready = self.units, False
        if seq.prompt == "bad unit":
            seq.left = -1
        return seq

    def prefill(self, seq):
        if seq.left < 0:
            raise ValueError("prefill failed")
        self.log.append(("prefill", seq.prompt))
        seq.left -= 1
        seq.ready = seq.left == 0
        return seq.ready

    def step(self, seqs):
        assert all(getattr(s, "ready", False) for s in seqs if not s.done)
        self.log.append(("step", tuple(s.prompt for s in seqs)))
        super().step(seqs)


def test_a_newcomers_prefill_holds_running_decodes_for_one_unit_at_a_time():
    backend = Chunked(units=4, budget=30, step_s=0.005)
    sched = Scheduler(backend, slots=2, queue=0)
    first, second = Outcome(), Outcome()
    sched.submit(job("first", first))
    deadline = time.monotonic() + 10
    while not any(kind == "step" for kind, _ in backend.log):
        assert time.monotonic() < deadline, "the first request never decoded"
        time.sleep(0.005)
    sched.submit(job("second", second))
    assert first.wait().gen.token_ids == [5 + i for i in range(30)]
    assert second.wait().gen.token_ids == [6 + i for i in range(30)]
    sched.close()
    log = backend.log
    units = [i for i, (kind, who) in enumerate(log) if kind == "prefill" and who == "second"]
    assert len(units) == 4
    for a, b in zip(units, units[1:], strict=False):  # the running one decoded between units
        assert any(kind == "step" and "first" in who for kind, who in log[a + 1 : b])
    joined = next(i for i, (kind, who) in enumerate(log) if kind == "step" and "second" in who)
    assert joined > units[-1], "it decodes only once its prefill has run"


def test_begin_runs_beside_the_loop_so_decodes_go_on_meanwhile():
    backend = Chunked(units=1, budget=1000, step_s=0.002)
    sched = Scheduler(backend, slots=2, queue=0)
    first, second = Outcome(), Outcome()
    sched.submit(job("first", first, request_id="f"))
    deadline = time.monotonic() + 10
    while not any(kind == "step" for kind, _ in backend.log):
        assert time.monotonic() < deadline, "the first request never decoded"
        time.sleep(0.005)
    backend.begin_s = 0.3
    sched.submit(job("second", second))
    time.sleep(0.5)
    sched.cancel("f")
    assert isinstance(first.wait().error, Cancelled)
    assert second.wait().gen is not None
    sched.close()
    begins = [i for i, (kind, _) in enumerate(backend.log) if kind == "begin"]
    assert {backend.log[i][1] for i in begins} == {"mllm-prepare"}
    between = backend.log[begins[1] + 1 :]
    prefilled = next(i for i, (kind, who) in enumerate(between) if kind == "prefill")
    steps = [e for e in between[:prefilled] if e[0] == "step"]
    assert len(steps) >= 20, f"the running request stalled while the newcomer began: {steps}"


class Outcome:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.gen: Generation | None = None
        self.error: BaseException | None = None
        self.calls = 0

    def done(self, gen):
        self.gen, self.calls = gen, self.calls + 1
        self.event.set()

    def failed(self, exc):
        self.error, self.calls = exc, self.calls + 1
        self.event.set()

    def wait(self):
        assert self.event.wait(10), "the job was never answered"
        return self


def job(prompt: str, outcome: Outcome, **kw) -> Job:
    msgs = [{"role": "user", "content": prompt}]
    return Job(msgs, [], outcome.done, outcome.failed, **kw)


@pytest.fixture()
def stepper():
    return Stepper()


def test_concurrent_jobs_share_steps_and_each_gets_its_own_tokens(stepper):
    stepper.gate = threading.Event()
    sched = Scheduler(stepper, slots=4, queue=0)
    outs = {p: Outcome() for p in ("a", "bb", "ccc", "dddd")}
    for p, out in outs.items():
        sched.submit(job(p, out))
    stepper.gate.set()
    for p, out in outs.items():
        assert out.wait().gen.token_ids == [len(p) + i for i in range(5)], p
        assert out.calls == 1
    assert max(stepper.batches) >= 2, f"never batched: {stepper.batches}"
    assert sched.peak <= 4 and sched.held() == 0 and stepper.released == 4
    sched.close()


def test_past_slots_and_queue_submit_refuses_at_once(stepper):
    stepper.gate = threading.Event()
    sched = Scheduler(stepper, slots=2, queue=1)
    outs = [Outcome() for _ in range(3)]
    for i, out in enumerate(outs):
        sched.submit(job(f"p{i}", out))
    with pytest.raises(AtCapacity, match="at capacity.*retry"):
        sched.submit(job("late", Outcome()))
    stepper.gate.set()
    assert all(o.wait().gen is not None for o in outs)
    sched.submit(job("after", after := Outcome()))  # capacity is back once they are answered
    assert after.wait().gen is not None
    sched.close()


def test_cancel_by_id_and_by_client_leave_at_the_next_step(stepper):
    stepper.step_s = 0.02
    stepper.budget = 50
    sched = Scheduler(stepper, slots=3, queue=2)
    gone = threading.Event()
    by_id, by_client, stays = Outcome(), Outcome(), Outcome()
    sched.submit(job("x", by_id, request_id="r1"))
    sched.submit(job("y", by_client, is_cancelled=gone.is_set))
    sched.submit(job("z", stays))
    time.sleep(0.1)
    assert sched.cancel("r1") and not sched.cancel("unknown")
    gone.set()
    assert isinstance(by_id.wait().error, Cancelled)
    assert isinstance(by_client.wait().error, Cancelled)
    assert len(stepper.batches) < 40, "the cancelled ones did not run to their budget"
    assert stays.wait().gen.token_ids == [1 + i for i in range(50)], "the others are undisturbed"
    sched.close()


def test_a_queued_job_cancelled_never_runs(stepper):
    stepper.gate = threading.Event()
    sched = Scheduler(stepper, slots=1, queue=1)
    first, queued = Outcome(), Outcome()
    sched.submit(job("first", first))
    sched.submit(job("queued", queued, request_id="q"))
    sched.cancel("q")
    stepper.gate.set()
    assert isinstance(queued.wait().error, Cancelled)
    assert first.wait().gen is not None and max(stepper.batches) == 1
    sched.close()


@pytest.mark.parametrize(
    ("backend", "bad_prompt", "released"),
    [(Stepper(), "bad", 1), (Chunked(units=2), "bad unit", 2)],  # open fails; a prefill unit fails
    ids=["open", "prefill-unit"],
)
def test_failures_stay_with_their_request(backend, bad_prompt, released):
    sched = Scheduler(backend, slots=4, queue=0)
    bad, ok = Outcome(), Outcome()
    sched.submit(job(bad_prompt, bad))
    sched.submit(job("fine", ok))
    assert isinstance(bad.wait().error, ValueError)
    assert ok.wait().gen.token_ids == [4, 5, 6, 7, 8]
    sched.close()
    assert backend.released == released


def test_streaming_deltas_go_to_their_own_request(stepper):
    sched = Scheduler(stepper, slots=2, queue=0)
    texts: dict[str, list[str]] = {"a": [], "bb": []}
    outs = {p: Outcome() for p in texts}
    for p in texts:
        sched.submit(job(p, outs[p], on_text=texts[p].append))
    for p in texts:
        outs[p].wait()
        assert "".join(texts[p]).split() == [str(len(p) + i) for i in range(5)]
    sched.close()


class Whole:
    """A generate-only backend (like hf): text deltas per token; counts concurrent calls."""

    def __init__(self) -> None:
        self.active = self.peak = 0
        self.lock = threading.Lock()

    def generate(self, messages, images, on_text=None):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            for i in range(20):
                time.sleep(0.005)
                if on_text is not None:
                    on_text(f"{i} ")
            return Generation("x", [1], np.zeros((1, 2), np.float32), 1, True)
        finally:
            with self.lock:
                self.active -= 1


def test_whole_generation_backends_run_slots_at_once_and_cancel_at_a_delta():
    backend = Whole()
    sched = Scheduler(backend, slots=2, queue=2)
    assert not sched.stepping
    outs = [Outcome() for _ in range(4)]
    for i, out in enumerate(outs):
        sched.submit(job("p", out, request_id=f"w{i}"))
    sched.cancel("w3")
    assert [o.wait().gen is not None for o in outs[:3]] == [True] * 3
    assert isinstance(outs[3].error, Cancelled)
    assert backend.peak == 2
    sched.close()
