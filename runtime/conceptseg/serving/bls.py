"""BLS calls from worker threads: ``InferenceRequest.async_exec()`` on the model's event loop.

``Pipeline.run`` is synchronous, so each request runs in a worker thread of the orchestrator's
own pool; each BLS call is scheduled on the model's event loop. (``async_exec`` itself runs in the
loop's default executor, so the pipeline threads must not: with every default worker waiting on a
BLS call, none would be left to make it.) :func:`background_loop` is such a loop on its own
thread, for a model whose ``execute`` returns before its requests are answered.

An engine's error answer raises :class:`EngineError`; CANCELLED and UNAVAILABLE ones raise
:class:`~conceptseg.types.Cancelled` and :class:`~conceptseg.types.AtCapacity`, so the
orchestrator's answer keeps the engine's code.

No wait is unbounded: Triton 2.51 never answers a BLS call whose target stub died mid-call, so
every wait polls ``Bls.deaths`` (the stubs of this server that died, by model; see
``supervisor.StubDeaths``) and raises :class:`~conceptseg.types.EngineDown` when the target
lost a stub since the call began. Without it, each request in flight on a killed ``mllm`` held
its orchestrator slot forever.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from conceptseg.types import AtCapacity, Cancelled, EngineDown

POLL_S = 0.25  # how often a blocked wait looks at the target's stubs
# Triton 2.51's words for a model being repaired (supervisor: unloaded, loading) or whose stub
# died before Triton noticed
_DOWN_MARKS = ("is not ready", "is not healthy", "is not found")


class EngineError(RuntimeError):
    """An engine model answered a BLS call with an error (the request fails as INTERNAL)."""


def background_loop(executor_threads: int = 64) -> asyncio.AbstractEventLoop:
    """A running event loop on a daemon thread; its default executor (where ``async_exec``
    waits for each call) has ``executor_threads`` threads, one per BLS call in flight."""
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(executor_threads, thread_name_prefix="bls"))
    threading.Thread(target=loop.run_forever, name="bls-loop", daemon=True).start()
    return loop


def engine_error(pb_utils: Any, model: str, error: Any) -> Exception:
    """The exception for ``model``'s error answer, by its code (see the module docstring)."""
    code = error.code() if callable(getattr(error, "code", None)) else getattr(error, "code", None)
    text = error.message()
    message = f"{model}: {text}"
    # a BLS response's error does not always keep its code in 2.51: the messages say it too
    if code == pb_utils.TritonError.CANCELLED or text.startswith(Cancelled.PREFIX):
        return Cancelled(f"{text.removeprefix(Cancelled.PREFIX)} ({model})")
    if code == pb_utils.TritonError.UNAVAILABLE or AtCapacity.MARK in text:
        return AtCapacity(message)
    if any(mark in text for mark in _DOWN_MARKS):  # unloaded to be repaired, or its stub dead
        return EngineDown(f"{message}; {EngineDown.MARK} (unloaded, or reloading): retry later")
    return EngineError(message)


class Deaths(Protocol):
    def count(self, model: str) -> int:
        """How many stubs of ``model`` have died so far (grows, never shrinks)."""
        ...


class _NoDeaths:
    def count(self, model: str) -> int:
        return 0


class Bls:
    """Submit BLS calls on the model's event loop from any thread (``loop`` set by execute);
    ``deaths`` bounds every wait (see the module docstring)."""

    def __init__(
        self, pb_utils: Any, loop: asyncio.AbstractEventLoop | None, deaths: Deaths | None = None
    ) -> None:
        self.pb_utils, self.loop = pb_utils, loop
        self.deaths: Deaths = deaths or _NoDeaths()

    def _check_alive(self, model: str, since: int) -> None:
        """:class:`EngineDown` if ``model`` lost a stub after ``since`` (its death count when
        the call began)."""
        if self.deaths.count(model) != since:
            raise EngineDown(
                f"{model}: its process died while this request waited on it; {EngineDown.MARK} "
                "until the server reloads it (seconds): retry"
            )

    def wait(self, future: Future[Any], model: str, since: int) -> Any:
        """``future.result()``, or :class:`EngineDown` once ``model`` lost a stub after
        ``since`` (its death count when the call began)."""
        while True:
            try:
                return future.result(timeout=POLL_S)
            except FutureTimeout:
                try:
                    self._check_alive(model, since)
                except EngineDown:
                    future.cancel()
                    raise

    def _request(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> Any:
        pb = self.pb_utils
        return pb.InferenceRequest(
            model_name=model,
            inputs=[pb.Tensor(n, np.ascontiguousarray(a)) for n, a in inputs.items()],
            requested_output_names=list(outputs),
        )

    async def _call(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        response = await self._request(model, inputs, outputs).async_exec()
        if response.has_error():
            raise engine_error(self.pb_utils, model, response.error())
        return {n: self.pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    def submit(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> Future[dict[str, np.ndarray]]:
        assert self.loop is not None, "Bls.loop is unset: execute binds the running loop first"
        return asyncio.run_coroutine_threadsafe(self._call(model, inputs, outputs), self.loop)

    def call(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        since = self.deaths.count(model)
        return self.wait(self.submit(model, inputs, outputs), model, since)  # type: ignore[no-any-return]

    async def _open_stream(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> Any:
        # resolves at the first response
        return await self._request(model, inputs, outputs).async_exec(decoupled=True)

    def stream(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> Iterator[dict[str, np.ndarray]]:
        """The responses of a decoupled model, as they arrive, each as its tensors (the empty
        final-flag response is skipped). Call from a worker thread: the call is opened on the
        model's loop, and the iterator's blocking ``next`` runs here, the GIL released."""
        assert self.loop is not None, "Bls.loop is unset: execute binds the running loop first"
        since = self.deaths.count(model)
        opened = asyncio.run_coroutine_threadsafe(
            self._open_stream(model, inputs, outputs), self.loop
        )
        # the response iterator's ``next`` blocks in C++ with no timeout: a thread of its own
        # reads it, so this one can give up on a dead model (the reader then stays blocked)
        responses: queue.Queue[Any] = queue.Queue()
        reader = threading.Thread(
            target=_read_all, args=(self.wait(opened, model, since), responses), daemon=True
        )
        reader.start()
        while True:
            try:
                response = responses.get(timeout=POLL_S)
            except queue.Empty:
                self._check_alive(model, since)
                continue
            if response is _END:
                return
            if isinstance(response, BaseException):
                raise response
            if response.has_error():
                raise engine_error(self.pb_utils, model, response.error())
            tensors = response.output_tensors()
            if tensors:
                yield {t.name(): t.as_numpy() for t in tensors}


_END = object()


def _read_all(iterator: Any, into: queue.Queue[Any]) -> None:
    try:
        for response in iterator:
            into.put(response)
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
        into.put(exc)
    into.put(_END)


@dataclass
class BlsGraph:
    """An engine model behind the ``run(**feeds)`` call shape of the ONNX Runtime graphs."""

    bls: Bls
    model: str
    outputs: tuple[str, ...]

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return self.bls.call(self.model, feeds, self.outputs)
