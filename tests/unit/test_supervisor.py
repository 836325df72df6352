"""The stub watchdog's rule, with fake stubs and a fake Triton: a stub that is a zombie or gone
while its model is still "ready" is a death (unload, then load until it works); a deliberate
unload or a replaced stub is not; without model control a death is only reported.

Run: .venv/bin/pytest tests/unit/test_supervisor.py -q   (seconds)
"""

from __future__ import annotations

import pytest

from conceptseg.serving import supervisor
from conceptseg.serving.supervisor import Stub, Supervisor


class FakeTriton:
    def __init__(self, loads_failing: int = 0):
        self.ready_models = {"mllm", "ctm"}
        self.calls: list[str] = []
        self.loads_failing = loads_failing
        self.silent: set[str] = set()

    def readiness(self, model):
        if model in self.silent:
            return 0  # no answer (a busy server)
        return 200 if model in self.ready_models else 400

    def unload(self, model):
        self.calls.append(f"unload {model}")
        self.ready_models.discard(model)
        return True

    def load(self, model, timeout=300.0):
        self.calls.append(f"load {model}")
        if self.loads_failing:
            self.loads_failing -= 1
            return False
        self.ready_models.add(model)
        return True


@pytest.fixture
def stubs(monkeypatch):
    current: list[Stub] = []
    monkeypatch.setattr(supervisor, "list_stubs", lambda pid: list(current))
    return current


def watch(triton, **kw):
    return Supervisor(1, triton, interval_s=0.01, **kw)


def test_a_zombie_stub_of_a_ready_model_is_unloaded_then_loaded(stubs):
    triton = FakeTriton(loads_failing=1)
    sup = watch(triton)
    sup.spawn = lambda fn, event: fn(event)  # the repair runs here, synchronously
    sup._stop = _NoWait()  # and does not sleep between its attempts
    stubs += [Stub(10, "mllm_0_0", "r1", True), Stub(11, "ctm_0_0", "r2", True)]
    sup.check()
    assert triton.calls == [] and sup.known == {"mllm_0_0": 10, "ctm_0_0": 11}
    stubs[0] = Stub(10, "mllm_0_0", "r1", False)  # killed: a zombie of the server
    sup.check()
    assert triton.calls == ["unload mllm", "load mllm", "load mllm"], "retried until it loads"
    (event,) = sup.events
    assert event.model == "mllm" and event.attempts == 2 and event.recovered_s is not None


def test_a_deliberate_unload_or_a_replaced_stub_is_not_a_death(stubs):
    triton = FakeTriton()
    sup = watch(triton)
    stubs += [Stub(10, "mllm_0_0", "r1", True), Stub(11, "ctm_0_0", "r2", True)]
    sup.check()
    triton.ready_models.discard("ctm")  # unloaded by an operator: its stub exits
    del stubs[1]
    stubs[0] = Stub(12, "mllm_0_0", "r3", True)  # reloaded by an operator: a new stub
    sup.check()
    assert triton.calls == [] and sup.events == [] and sup.known == {"mllm_0_0": 12}


def test_a_readiness_call_without_answer_postpones_the_verdict(stubs):
    triton, dead = FakeTriton(), []
    sup = watch(triton, can_reload=False, on_dead=dead.append)
    stubs.append(Stub(11, "ctm_0_0", "r2", True))
    sup.check()
    stubs.clear()  # the stub is killed while the server is too busy to answer /ready
    triton.silent.add("ctm")
    sup.check()
    assert dead == [] and sup.known == {"ctm_0_0": 11}, "undecided, still watched"
    triton.silent.clear()
    sup.check()
    assert [e.instance for e in dead] == ["ctm_0_0"] and sup.known == {}


def test_without_model_control_a_death_is_reported_not_repaired(stubs):
    triton, dead = FakeTriton(), []
    sup = watch(triton, can_reload=False, on_dead=dead.append)
    stubs.append(Stub(11, "ctm_0_0", "r2", True))
    sup.check()
    stubs.clear()
    sup.check()
    assert triton.calls == [] and [e.instance for e in dead] == ["ctm_0_0"]


def test_instance_names_give_the_model():
    assert Stub(1, "conceptseg_stream_0_1", "", True).model == "conceptseg_stream"
    assert Stub(1, "sam3_vision_0_0", "", True).model == "sam3_vision"


class _NoWait:
    def is_set(self):
        return False

    def wait(self, seconds):
        return False

    def set(self):
        pass


def test_a_replaced_stub_still_running_is_killed_after_the_grace(stubs, monkeypatch):
    killed, clock = [], [100.0]
    monkeypatch.setattr(supervisor.os, "kill", lambda pid, sig: killed.append(pid))
    monkeypatch.setattr(supervisor.time, "monotonic", lambda: clock[0])
    triton = FakeTriton()
    sup = watch(triton, stale_after_s=60)
    # after a repair: the old conceptseg_0_1 (started first) lingers beside its replacement
    stubs += [Stub(20, "conceptseg_0_1", "r", True, started=5),
              Stub(30, "conceptseg_0_1", "r", True, started=9)]  # fmt: skip
    sup.check()
    assert sup.known == {"conceptseg_0_1": 30} and killed == []
    clock[0] += 59
    sup.check()
    assert killed == []
    clock[0] += 2
    sup.check()
    assert killed == [20] and sup.events == [] and triton.calls == [], "not a death"


def test_an_older_stub_still_running_does_not_hide_a_death(stubs):
    triton = FakeTriton()
    triton.ready_models.add("conceptseg")
    sup = watch(triton, can_reload=False, on_dead=lambda event: None)
    stale = Stub(20, "conceptseg_0_0", "r", True, started=5)  # left from an earlier repair
    current = Stub(30, "conceptseg_0_0", "r", True, started=9)
    stubs += [stale, current]
    sup.check()
    assert sup.known == {"conceptseg_0_0": 30}
    stubs.remove(current)  # the current one is killed; the stale one still runs
    sup.check()
    assert [e.pid for e in sup.events] == [30]
