"""The Triton BLS orchestrator: ``conceptseg.pipeline`` unchanged over the engine models.

Each request runs in a worker thread of the orchestrator's pool (the pipeline is synchronous);
its SAM 3, MLLM and CTM calls are BLS calls (``serving.bls``). Imports neither torch nor
transformers: the stub holds numpy, PIL and tokenizers only.

Capacity (per orchestrator instance): ``max_requests`` requests at once, each with its own
thread from the moment it is admitted (no queue inside; past that :class:`AtCapacity`, which the
model answers UNAVAILABLE). At most ``max_reasoning`` of them may be in the MLLM step, so
``max_requests - max_reasoning`` threads are always left for router probes and fast paths:
reasoning requests cannot hold every thread (no head-of-line blocking). A request reaching the
MLLM step with ``max_reasoning`` there already gets UNAVAILABLE too.

Cancellation: a watcher thread polls each request's ``is_cancelled`` (gRPC: client gone,
deadline passed, stream cancelled) and its ``timeout`` parameter's deadline (HTTP: Triton 2.51
does not notice a dropped connection while the request runs, so HTTP clients send a timeout). The pipeline checks it between steps; while the request waits on the
MLLM, the watcher sends the ``mllm`` model a cancel for it (a BLS call cannot be cancelled in
Triton 2.51), so the generation stops at its next step and frees its slot; the request ends
with :class:`Cancelled` (CANCELLED).

Memory: the same watcher hands the heap's free pages back to the system every ``trim_every_s``
(glibc ``malloc_trim``). Each request allocates and frees tens of MB of arrays on many threads;
without it, glibc keeps the freed pages in its per-thread arenas and the stub's RSS climbs for
minutes (measured: 190 -> 235 MB in 4 minutes of fast requests, tiny engines) though nothing is
live. ``serve`` also caps the arenas (``MALLOC_ARENA_MAX``, ``serving.server``). No request's
objects may form a reference cycle: the cyclic GC frees them only every minute or two, and
the arrays they hold wait with them (a cycle through each image's future made the RSS saw-tooth
between 140 and 180 MB; ``serving.sam3.PendingImage``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg import contract
from conceptseg.config import PipelineConfig
from conceptseg.models.engines import EngineCtm, read_manifest
from conceptseg.pipeline import Pipeline
from conceptseg.protocols import Generation, SegOutput
from conceptseg.serving.bls import Bls, BlsGraph
from conceptseg.serving.mllm import TritonMllm
from conceptseg.serving.sam3 import PendingImage, TritonSam3
from conceptseg.serving.supervisor import StubDeaths
from conceptseg.textstream import OnText
from conceptseg.types import AtCapacity, Cancelled, Result
from conceptseg.versions import versions

Arrays = dict[str, np.ndarray]


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc; nothing elsewhere)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _never() -> bool:
    return False


@dataclass(eq=False)
class Ticket:
    """One admitted request's cancellation state (``mllm_id``: its generation, while it runs;
    ``deadline``: ``time.monotonic()`` past which the client has given up, from the request's
    ``timeout`` parameter).

    ``is_cancelled`` is never called once the request is answered: the answer frees the
    request's response factory inside tritonserver, and asking it then crashes the server
    (SIGSEGV in ``TRITONBACKEND_ResponseFactoryIsCancelled``, seen when the watcher polled a
    request that had just failed). ``finish`` (before the answer) and ``poll`` share a lock."""

    is_cancelled: Callable[[], bool] = _never
    deadline: float | None = None
    cancelled: bool = False
    mllm_id: str = ""
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def poll(self) -> bool:
        with self.lock:
            if self.finished:
                return self.cancelled
            if not self.cancelled and self.deadline is not None:
                self.cancelled = time.monotonic() > self.deadline
            if not self.cancelled:
                try:
                    self.cancelled = bool(self.is_cancelled())
                except Exception:  # noqa: BLE001 - a request Triton released counts as gone
                    self.cancelled = True
            return self.cancelled

    def finish(self) -> None:
        """Called before the request is answered: no ``is_cancelled`` after this."""
        with self.lock:
            self.finished = True

    def check(self) -> None:
        """Raise :class:`Cancelled` when the client is gone (called between pipeline steps)."""
        if self.poll():
            raise Cancelled("the client went away (disconnected, deadline passed or cancelled)")


class _RequestSeg:
    """One request's view of the shared :class:`TritonSam3`: keeps its pending image call."""

    def __init__(self, sam3: TritonSam3, ticket: Ticket) -> None:
        self.sam3, self.ticket = sam3, ticket
        self.pending: PendingImage | None = None

    def encode_image(self, image: Any) -> PendingImage:
        self.ticket.check()
        pending = self.sam3.encode_image(image)
        self.pending = pending
        return pending

    def segment(self, features: PendingImage, text: str, concept: Any = None,
                instances: bool = False) -> SegOutput:  # fmt: skip
        self.ticket.check()
        return self.sam3.segment(features, text, concept, instances)


class _RequestMllm:
    """One request's MLLM step: a reasoning slot, an id the watcher can cancel by."""

    def __init__(self, owner: Orchestrator, ticket: Ticket) -> None:
        self.owner, self.ticket = owner, ticket

    def generate(self, messages: Any, images: Any, on_text: OnText | None = None) -> Generation:
        self.ticket.check()
        if not self.owner.reasoning.acquire(blocking=False):
            raise AtCapacity(
                f"the server is at capacity ({self.owner.max_reasoning} reasoning requests in "
                "flight): retry later, with backoff"
            )
        try:
            self.ticket.mllm_id = uuid.uuid4().hex
            gen = self.owner.mllm.generate(messages, images, on_text, self.ticket.mllm_id)
        finally:
            self.ticket.mllm_id = ""
            self.owner.reasoning.release()
        self.ticket.check()
        return gen


def serving_versions(engines: Path, params: dict[str, str]) -> dict[str, Any]:
    """What ``Result.versions`` says when served (the in-process keys, plus the profile)."""
    weights = Path(read_manifest(engines)["weights"])
    return versions(
        weights, backend=f"triton-{params['profile']}", serving="triton", engines=str(engines)
    )


class Orchestrator:
    """``start(arrays, ...)``: the in-process pipeline over the engine models (see module)."""

    def __init__(
        self,
        engines: Path,
        bls: Bls,
        config: PipelineConfig,
        versions: dict[str, Any],
        *,
        max_requests: int = 12,
        max_reasoning: int = 8,
        poll_s: float = 0.05,
        trim_every_s: float = 5.0,
        stubs_every_s: float = 1.0,
    ) -> None:
        assert 1 <= max_reasoning < max_requests, (
            f"max_reasoning={max_reasoning} must leave threads for fast requests "
            f"(max_requests={max_requests})"
        )
        self.max_requests, self.max_reasoning = max_requests, max_reasoning
        self.pool = ThreadPoolExecutor(max_requests, thread_name_prefix="conceptseg-request")
        self.reasoning = threading.BoundedSemaphore(max_reasoning)
        self.live: set[Ticket] = set()
        self.lock = threading.Lock()
        self.sam3 = TritonSam3(engines, bls)
        self.mllm = TritonMllm(bls)
        self.ctm = EngineCtm(engines, BlsGraph(bls, "ctm", ("concept",)))
        self.config, self.versions = config, versions
        self.closed = threading.Event()
        self.poll_s, self.trim_every_s, self.stubs_every_s = poll_s, trim_every_s, stubs_every_s
        # the stub's parent is the tritonserver: its other stubs are the engine models
        self.deaths = StubDeaths(os.getppid())
        self.deaths.refresh()
        bls.deaths = self.deaths
        self.watcher = threading.Thread(target=self._watch, name="conceptseg-cancel", daemon=True)
        self.watcher.start()

    def run(
        self,
        request: Any,
        options: contract.Options,
        on_text: OnText | None = None,
        ticket: Ticket | None = None,
    ) -> Result:
        ticket = ticket or Ticket()
        config = replace(self.config, router=self.config.router and options.router)
        threshold = options.instance_threshold if options.instance_masks else None
        seg = _RequestSeg(self.sam3, ticket)

        def ctm(hidden: np.ndarray) -> np.ndarray:
            ticket.check()
            return self.ctm(hidden)

        pipeline = Pipeline(seg, _RequestMllm(self, ticket), ctm, config, self.versions)
        result = pipeline.run(request, on_text, instances=threshold)
        if seg.pending is not None:
            # the pipeline's "sam3_image" only submits the call: report the engine call's own time
            result.timings_ms["sam3_vision"] = seg.pending.elapsed_ms
        return result

    def start(
        self,
        arrays: Arrays,
        on_done: Callable[[Arrays], None],
        on_error: Callable[[BaseException], None],
        *,
        on_text: OnText | None = None,
        is_cancelled: Callable[[], bool] = _never,
        timeout_s: float = 0.0,
    ) -> None:
        """Admit a request and run it on its own pool thread (``on_done`` gets the response
        tensors, ``on_error`` the failure), or raise :class:`AtCapacity` at once. ``timeout_s``
        (> 0): the client gives up after it, so the request is cancelled then."""
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        ticket = Ticket(is_cancelled, deadline)
        with self.lock:
            if len(self.live) >= self.max_requests:
                raise AtCapacity(
                    f"the server is at capacity ({self.max_requests} requests in flight): "
                    "retry later, with backoff"
                )
            self.live.add(ticket)
        self.pool.submit(self._serve, arrays, ticket, on_done, on_error, on_text)

    def _serve(self, arrays: Arrays, ticket: Ticket, on_done: Callable[[Arrays], None],
               on_error: Callable[[BaseException], None], on_text: OnText | None) -> None:  # fmt: skip
        try:
            out = self.handle(arrays, on_text, ticket)
        except Exception as exc:  # noqa: BLE001 - one request fails, the others go on
            ticket.finish()
            on_error(exc)
        else:
            ticket.finish()
            on_done(out)
        finally:
            with self.lock:
                self.live.discard(ticket)

    def _watch(self) -> None:
        """Poll the live requests; cancel the generation of one whose client is gone; look at
        the server's stubs every ``stubs_every_s`` (``serving.bls``: no wait on a dead model);
        trim the heap every ``trim_every_s``."""
        next_trim = time.monotonic() + self.trim_every_s
        next_look = time.monotonic() + self.stubs_every_s
        while not self.closed.wait(self.poll_s):
            now = time.monotonic()
            if now >= next_look:
                self.deaths.refresh()
                next_look = now + self.stubs_every_s
            if now >= next_trim:
                trim_heap()
                next_trim = now + self.trim_every_s
            with self.lock:
                tickets = list(self.live)
            for ticket in tickets:
                mllm_id = ticket.mllm_id
                if mllm_id and ticket.poll():
                    try:
                        self.mllm.cancel(mllm_id)
                    except Exception:  # noqa: BLE001 - it ends by itself at its budget then
                        pass
                    ticket.mllm_id = ""  # once

    def close(self) -> None:
        self.closed.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def handle(self, arrays: Arrays, on_text: OnText | None = None,
               ticket: Ticket | None = None) -> Arrays:  # fmt: skip
        """Request tensors -> response tensors (RequestError for a bad request); ``on_text``
        receives the reasoning text in deltas while the MLLM generates."""
        start = time.perf_counter()
        request, options = contract.from_request_arrays(arrays, self.config)
        decoded = time.perf_counter()
        result = self.run(request, options, on_text, ticket)
        result.timings_ms["request_decode"] = (decoded - start) * 1e3
        result.timings_ms["total"] = (time.perf_counter() - start) * 1e3
        return contract.to_response_arrays(result, options)
