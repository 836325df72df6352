"""The ``mllm`` model's scheduler: concurrent generations, bounded, each one cancellable.

``submit(job)`` admits a request or refuses it at once: at most ``slots`` generations run and
``queue`` more wait; past that :class:`~conceptseg.types.AtCapacity` (the model answers
UNAVAILABLE). A job whose client is gone (``job.is_cancelled()``: Triton's cancellation) or whose
id was given to :meth:`Scheduler.cancel` (the orchestrator's out-of-band cancel: BLS child
requests cannot be cancelled in Triton 2.51) leaves at the next step with
:class:`~conceptseg.types.Cancelled` and frees its slot; nothing else is disturbed.

Two ways to drive a backend, chosen by what it offers:
- stepping (``open``/``step``/``finish``/``release``: ort-genai): continuous batching on one
  loop thread. Each turn: drop gone jobs, admit one newcomer, run one unit of the oldest
  unfinished prefill, one batched decode step over every sequence whose prefill has run, hand
  finished ones back. A backend with ``begin``/``prefill`` (ort-genai) splits a prefill into
  units (an image through the vision tower, a chunk of prompt tokens through the decoder), so a
  newcomer holds the running decodes for one unit at a time; its ``begin`` (chat template,
  tokens, pixels: CPU work in Python) runs on a second thread, beside the loop. A backend
  without them runs ``open`` whole, on the loop.
  Each sequence keeps its own rule state, stop ids, budget, text stream and states (the
  backend's ``Sequence``).
- whole generations (``generate`` only: hf, trtllm): ``slots`` threads, one generation each;
  cancellation is checked at each text delta. trtllm batches the concurrent calls itself
  (in-flight batching); hf, the exact reference, is given one slot.

Knows nothing of Triton: the callbacks send the responses. No torch, no onnxruntime here.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from conceptseg.protocols import Generation
from conceptseg.textstream import OnText
from conceptseg.types import AtCapacity, Cancelled

STEPPING = ("open", "step", "finish", "release")


def _never() -> bool:
    return False


@dataclass(eq=False)
class Job:
    """One generation request and where its outcome goes (exactly one of ``on_done`` /
    ``on_error`` is called, once, from a scheduler thread)."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]
    on_done: Callable[[Generation], None]
    on_error: Callable[[BaseException], None]
    on_text: OnText | None = None
    request_id: str = ""
    is_cancelled: Callable[[], bool] = _never
    cancelled: bool = field(default=False, repr=False)  # set by Scheduler.cancel

    def gone(self) -> bool:
        if self.cancelled:
            return True
        try:
            return bool(self.is_cancelled())
        except Exception:  # noqa: BLE001 - a request Triton already released counts as gone
            return True


class Scheduler:
    """Runs ``backend``'s generations, ``slots`` at once and ``queue`` waiting (see module)."""

    def __init__(self, backend: Any, slots: int, queue: int, *, idle_s: float = 0.05) -> None:
        assert slots >= 1 and queue >= 0, f"slots={slots} (>= 1), queue={queue} (>= 0)"
        self.backend, self.slots, self.queue, self.idle_s = backend, slots, queue, idle_s
        self.stepping = all(hasattr(backend, name) for name in STEPPING)
        self.waiting: deque[Job] = deque()
        self.running: dict[Job, Any] = {}  # job -> its backend sequence (stepping) or None
        self.by_id: dict[str, Job] = {}
        self.early: deque[str] = deque(maxlen=256)  # cancels that came before their job
        self.peak = 0  # most generations running at once (for tests and benchmarks)
        self.cond = threading.Condition()
        self.closed = False
        count = 1 if self.stepping else slots
        target = self._loop if self.stepping else self._worker
        self.threads = [
            threading.Thread(target=target, name=f"mllm-scheduler-{i}", daemon=True)
            for i in range(count)
        ]
        # begin off the loop, on one thread: the processor's template, image processing and
        # tokenizer encode never run concurrently (the loop only decodes ids to text)
        self.chunked = self.stepping and all(hasattr(backend, n) for n in ("begin", "prefill"))
        self.preparing: deque[Job] = deque()
        if self.chunked:
            self.threads.append(
                threading.Thread(target=self._prepare, name="mllm-prepare", daemon=True)
            )
        for thread in self.threads:
            thread.start()

    def held(self) -> int:
        """Jobs admitted and not yet answered (running + waiting)."""
        return len(self.running) + len(self.waiting)

    def submit(self, job: Job) -> None:
        """Admit ``job``, or raise :class:`AtCapacity` at once (nothing of it has run)."""
        with self.cond:
            if job.request_id and job.request_id in self.early:
                self.early.remove(job.request_id)
                raise Cancelled(f"{job.request_id} before it arrived")
            if self.closed or self.held() >= self.slots + self.queue:
                raise AtCapacity(
                    f"the MLLM is at capacity ({self.slots} generations running, {self.queue} "
                    "queued): retry later, with backoff"
                )
            self.waiting.append(job)
            if job.request_id:
                self.by_id[job.request_id] = job
            self.cond.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Mark the job with ``request_id`` cancelled (it leaves at its next step); False when
        no such job is held: already answered, or not arrived yet (then it is refused when it
        does: the cancel and the generation travel as separate requests)."""
        with self.cond:
            job = self.by_id.get(request_id)
            if job is not None:
                job.cancelled = True
                self.cond.notify_all()
            elif request_id:
                self.early.append(request_id)
            return job is not None

    def close(self) -> None:
        """Stop the threads; held jobs are answered :class:`Cancelled`."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for thread in self.threads:
            thread.join(timeout=5)
        for job in [*self.waiting, *self.running]:
            self._settle(job, error=Cancelled("the MLLM model is shutting down"))

    # --- shared ---------------------------------------------------------------------------------

    def _settle(
        self, job: Job, gen: Generation | None = None, error: BaseException | None = None
    ) -> None:
        """Forget ``job`` and answer it (its callback runs outside the lock)."""
        with self.cond:
            self.running.pop(job, None)
            if job in self.waiting:
                self.waiting.remove(job)
            if self.by_id.get(job.request_id) is job:
                del self.by_id[job.request_id]
            self.cond.notify_all()
        if error is not None:
            job.on_error(error)
        else:
            assert gen is not None
            job.on_done(gen)

    def _drop_gone_waiting(self) -> list[Job]:
        gone = [job for job in self.waiting if job.gone()]
        for job in gone:
            self.waiting.remove(job)
        return gone

    # --- stepping backends: continuous batching on one thread -----------------------------------

    def _admit(self) -> Job | None:
        """Under the lock: the next waiting job when a slot is free (one per turn, so a
        newcomer's prefill holds the running decodes for one prefill only)."""
        if self.waiting and len(self.running) < self.slots:
            job = self.waiting.popleft()
            self.running[job] = None
            self.peak = max(self.peak, len(self.running))
            return job
        return None

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.waiting and not self.running:
                    self.cond.wait(self.idle_s)
                if self.closed:
                    return
                gone = self._drop_gone_waiting()
                job = self._admit()
            for dropped in gone:
                self._settle(dropped, error=Cancelled("while queued"))
            if job is not None and self.chunked:
                with self.cond:
                    self.preparing.append(job)
                    self.cond.notify_all()
            elif job is not None:
                self._open(job)
            if not self._turn():
                with self.cond:  # every admitted job is still being prepared
                    self.cond.wait(self.idle_s)

    def _prepare(self) -> None:
        """``begin`` of each admitted job, in admission order (chunked backends)."""
        while True:
            with self.cond:
                while not self.closed and not self.preparing:
                    self.cond.wait(self.idle_s)
                if self.closed:
                    return
                job = self.preparing.popleft()
            self._open(job)

    def _open(self, job: Job) -> None:
        start = self.backend.begin if self.chunked else self.backend.open
        try:
            seq = start(job.messages, job.images, on_text=job.on_text)
        except Exception as exc:  # noqa: BLE001 - this request fails, the batch goes on
            self._settle(job, error=exc)
            return
        with self.cond:
            if job in self.running:  # not answered meanwhile (close)
                self.running[job] = seq
                self.cond.notify_all()
                return
        self.backend.release(seq)

    def _turn(self) -> bool:
        """Drop gone jobs, one prefill unit, one batched step, hand back the finished; False
        when there was no sequence to work on."""
        with self.cond:
            batch = [(job, seq) for job, seq in self.running.items() if seq is not None]
        if not batch:
            return False
        live = []
        for job, seq in batch:
            if job.gone():
                self.backend.release(seq)
                self._settle(job, error=Cancelled("while generating"))
            else:
                live.append((job, seq))
        prefilling = [pair for pair in live if not getattr(pair[1], "ready", True)]
        if prefilling:  # the oldest first (admission order)
            job, seq = prefilling[0]
            try:
                self.backend.prefill(seq)
            except Exception as exc:  # noqa: BLE001 - this request fails, the batch goes on
                self.backend.release(seq)
                self._settle(job, error=exc)
                live.remove((job, seq))
        live = [pair for pair in live if getattr(pair[1], "ready", True)]
        if not live:
            return True
        try:
            self.backend.step([seq for _, seq in live])
        except Exception as exc:  # noqa: BLE001 - the step failed: its sequences fail, not the model
            for job, seq in live:
                self.backend.release(seq)
                self._settle(job, error=exc)
            return True
        for job, seq in live:
            if seq.done:
                try:
                    gen = self.backend.finish(seq)
                except Exception as exc:  # noqa: BLE001 - e.g. the text stream's callback failed
                    self.backend.release(seq)
                    self._settle(job, error=exc)
                    continue
                self.backend.release(seq)
                self._settle(job, gen)
        return True

    # --- whole-generation backends: a thread per slot -------------------------------------------

    def _worker(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.waiting:
                    self.cond.wait(self.idle_s)
                if self.closed:
                    return
                gone = self._drop_gone_waiting()
                job = self._admit() if len(self.running) < self.slots else None
            for dropped in gone:
                self._settle(dropped, error=Cancelled("while queued"))
            if job is not None:
                self._generate(job)

    def _generate(self, job: Job) -> None:
        def on_text(delta: str) -> None:
            if job.gone():
                raise Cancelled("while generating")
            if job.on_text is not None:
                job.on_text(delta)

        try:
            gen = self.backend.generate(job.messages, job.images, on_text=on_text)
        except Exception as exc:  # noqa: BLE001 - this request fails (Cancelled included)
            self._settle(job, error=exc)
            return
        self._settle(job, gen)
