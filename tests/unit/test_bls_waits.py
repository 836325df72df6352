"""No BLS wait outlives its target: a call or stream to a model that lost a stub since the call
began ends in EngineDown (UNAVAILABLE), not a wait forever (Triton 2.51 never answers it);
``StubDeaths`` counts deaths from the server's live stubs.

Run: .venv/bin/pytest tests/unit/test_bls_waits.py -q   (seconds)
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from conceptseg.serving import bls as bls_module
from conceptseg.serving import supervisor
from conceptseg.serving.bls import Bls
from conceptseg.serving.supervisor import Stub, StubDeaths
from conceptseg.types import EngineDown


class Deaths:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, model: str) -> int:
        return self.counts.get(model, 0)

    def kill_later(self, model: str, after_s: float) -> None:
        def die() -> None:
            self.counts[model] = self.count(model) + 1

        threading.Timer(after_s, die).start()


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(bls_module, "POLL_S", 0.01)


def test_a_wait_returns_the_answer_while_the_model_lives():
    bls, future = Bls(None, None, Deaths()), Future()
    threading.Timer(0.05, lambda: future.set_result({"x": 1})).start()
    assert bls.wait(future, "ctm", since=0) == {"x": 1}


def test_a_wait_on_a_model_that_died_meanwhile_raises_engine_down():
    deaths = Deaths()
    bls, future = Bls(None, None, deaths), Future()  # never answered, as after a kill
    since = deaths.count("mllm")
    deaths.kill_later("mllm", 0.05)
    start = time.monotonic()
    with pytest.raises(EngineDown, match="mllm: its process died"):
        bls.wait(future, "mllm", since)
    assert time.monotonic() - start < 2


def test_a_death_of_another_model_does_not_end_the_wait():
    deaths = Deaths()
    bls, future = Bls(None, None, deaths), Future()
    deaths.kill_later("ctm", 0.02)
    threading.Timer(0.1, lambda: future.set_result("ok")).start()
    assert bls.wait(future, "mllm", since=0) == "ok"


class Response:
    def __init__(self, value: int) -> None:
        self.value = value

    def has_error(self) -> bool:
        return False

    def output_tensors(self) -> list:
        return [Tensor(self.value)]


class Tensor:
    def __init__(self, value: int) -> None:
        self.value = value

    def name(self) -> str:
        return "n"

    def as_numpy(self) -> int:
        return self.value


class StreamBls(Bls):
    """``stream`` over a fake iterator (the loop's open call resolved at once)."""

    def __init__(self, deaths: Deaths, iterator) -> None:
        super().__init__(None, loop=object(), deaths=deaths)  # type: ignore[arg-type]
        self.iterator = iterator

    def _open_stream(self, model, inputs, outputs):
        raise AssertionError("not used")


def _stream(bls: StreamBls, monkeypatch) -> list:
    def opened(coro, loop):
        future: Future = Future()
        future.set_result(bls.iterator)
        return future

    monkeypatch.setattr(bls_module.asyncio, "run_coroutine_threadsafe", opened)
    monkeypatch.setattr(bls, "_open_stream", lambda *a: None)
    return list(bls.stream("mllm", {}, ()))


def test_a_stream_yields_every_response(monkeypatch):
    bls = StreamBls(Deaths(), iter([Response(1), Response(2)]))
    assert _stream(bls, monkeypatch) == [{"n": 1}, {"n": 2}]


def test_a_stream_whose_model_dies_mid_way_raises_engine_down(monkeypatch):
    deaths, gate = Deaths(), threading.Event()

    def responses():
        yield Response(1)
        gate.wait(5)  # the dead stub: no further response (until the test ends)
        return

    bls = StreamBls(deaths, responses())
    deaths.kill_later("mllm", 0.05)
    try:
        with pytest.raises(EngineDown):
            _stream(bls, monkeypatch)
    finally:
        gate.set()


def test_stub_deaths_counts_each_live_stub_that_is_gone(monkeypatch):
    current = [Stub(10, "mllm_0_0", "r", True), Stub(11, "ctm_0_0", "r", True)]
    monkeypatch.setattr(supervisor, "list_stubs", lambda pid: list(current))
    deaths = StubDeaths(1)
    deaths.refresh()
    assert deaths.count("mllm") == 0
    current[0] = Stub(10, "mllm_0_0", "r", False)  # killed: a zombie
    deaths.refresh()
    current[0] = Stub(12, "mllm_0_0", "r", True)  # reloaded
    deaths.refresh()
    assert deaths.count("mllm") == 1 and deaths.count("ctm") == 0
    current.clear()  # every stub gone: each look counts, so a call sent meanwhile gives up
    deaths.refresh()
    deaths.refresh()
    assert deaths.count("mllm") == 3 and deaths.count("ctm") == 2


def test_a_model_being_repaired_is_engine_down():
    class Codes:
        CANCELLED, UNAVAILABLE, INTERNAL = 1, 2, 3

    class Pb:
        TritonError = Codes

    class Error:
        def code(self):
            return Codes.INTERNAL

        def message(self):
            return "Failed for execute the inference request. Model 'mllm' is not ready."

    exc = bls_module.engine_error(Pb, "mllm", Error())
    assert isinstance(exc, EngineDown) and "retry" in str(exc)
