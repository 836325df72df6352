"""The stub watchdog of ``conceptseg serve``: a dead Python-backend stub is noticed and repaired.

Triton 2.51 neither restarts a killed ``triton_python_backend_stub`` nor reports it: the model
and the server stay "ready" while every request on that instance fails with "Stub process ... is
not healthy" (readiness follows stub health only from 2.64, and nothing restarts a stub in any
release). So this thread, every ``interval_s``:

1. lists the server's stub processes from ``/proc`` (each stub's command line names its model
   instance, e.g. ``mllm_0_0``, and its shared-memory region) and tightens the mode of the
   regions this server owns to 0600 (the backend creates them 0644);
2. calls an instance dead when its last stub is a zombie or gone, no other live stub has that
   instance name, and Triton still reports the model ready (so a deliberate unload is not a death);
3. repairs the model: ``unload`` at once (model readiness, and with ``--strict-readiness`` the
   server's, turn 503/400 within ``interval_s``), then ``load`` (a fresh stub), retried with
   backoff. Both calls carry the restricted ``model-repository`` key.
4. kills a stub that a newer stub of its instance replaced ``stale_after_s`` ago: the old
   model of a repaired orchestrator is never released (see ``reap_stale``).

Only explicit model control can unload and load; otherwise the watchdog reports the death
and ``on_dead`` decides (``serve`` stops: its supervisor, e.g. Kubernetes, restarts the pod).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process of the server."""

    pid: int
    instance: str  # "<model>_<group>_<index>", e.g. "mllm_0_0"
    region: str  # its shared-memory region (a file in /dev/shm)
    alive: bool  # running (not a zombie)
    started: int = 0  # start time (clock ticks since boot): the newest of one instance is current

    @property
    def model(self) -> str:
        return self.instance.rsplit("_", 2)[0]


def _read_stub(pid: str, parent: int) -> Stub | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # exited meanwhile
        return None
    fields = stat.rsplit(")", 1)[1].split()
    state, ppid, started = fields[0], fields[1], int(fields[19])
    if int(ppid) != parent or not argv[0].endswith(STUB_BINARY.encode()) or len(argv) < 9:
        return None
    region = argv[2].decode(errors="replace").lstrip("/")
    instance = argv[8].decode(errors="replace")
    return Stub(int(pid), instance, region, state not in ("Z", "X"), started)


def list_stubs(server_pid: int) -> list[Stub]:
    """The stub processes whose parent is ``server_pid`` (zombies included, ``alive`` False)."""
    stubs = (_read_stub(p, server_pid) for p in os.listdir("/proc") if p.isdigit())
    return [s for s in stubs if s is not None]


def owned_regions(prefix: str) -> list[Path]:
    """The shared-memory files whose names start with ``prefix`` (this server's regions)."""
    return sorted(SHM_DIR.glob(f"{prefix}*")) if prefix else []


def protect_regions(prefix: str) -> None:
    """Mode 0600 on this server's regions: no other user can read the tensors in them."""
    for path in owned_regions(prefix):
        try:
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
        except OSError:  # removed meanwhile
            pass


def remove_regions(prefix: str) -> list[Path]:
    """Delete this server's shared-memory files (after it exited); returns what was removed."""
    removed = []
    for path in owned_regions(prefix):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


class StubDeaths:
    """For a model inside the server: a count per model that grows at each look (``refresh``)
    that finds one of its stubs gone since the last look, or none of them alive (a call sent
    meanwhile went to a dead stub). ``Bls`` gives up a call to a model whose count changed
    since the call began. A deliberate unload counts too: its stubs exit only once their calls
    are answered, so no waiting call is cut short by it."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.seen: dict[int, str] = {}  # pid -> model of each live stub at the last look
        self.models: set[str] = set()  # every model seen with a stub
        self.counts: dict[str, int] = {}

    def refresh(self) -> None:
        live = {s.pid: s.model for s in list_stubs(self.server_pid) if s.alive}
        changed = {m for pid, m in self.seen.items() if pid not in live}
        self.models |= set(live.values())
        for model in changed | (self.models - set(live.values())):
            self.counts[model] = self.counts.get(model, 0) + 1
        self.seen = live

    def count(self, model: str) -> int:
        return self.counts.get(model, 0)


@dataclass(frozen=True)
class Repository:
    """Triton's model-repository and readiness endpoints over HTTP, with the restricted key."""

    url: str  # http://host:port
    headers: dict[str, str] = field(default_factory=dict)

    def _call(self, path: str, method: str = "GET", timeout: float = 5.0) -> int:
        data = b"" if method == "POST" else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers=self.headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def readiness(self, model: str) -> int:
        """The HTTP status of the model's readiness (200 ready, 400 unloaded, 0 no answer)."""
        return self._call(f"/v2/models/{model}/ready")

    def ready(self, model: str) -> bool:
        return self.readiness(model) == 200

    def unload(self, model: str) -> bool:
        return self._call(f"/v2/repository/models/{model}/unload", "POST") == 200

    def load(self, model: str, timeout: float = 300.0) -> bool:
        return self._call(f"/v2/repository/models/{model}/load", "POST", timeout) == 200


@dataclass
class Event:
    """One death and its repair: when, which instance, how long until ready again."""

    model: str
    instance: str
    pid: int
    died_at: float  # time.monotonic() when noticed
    recovered_s: float | None = None  # None: not (yet) back
    attempts: int = 0


class Supervisor(threading.Thread):
    """Watches the stubs of ``server_pid``; repairs (or reports) a model whose stub died."""

    def __init__(
        self,
        server_pid: int,
        repository: Repository,
        *,
        region_prefix: str = "",
        interval_s: float = 0.5,
        can_reload: bool = True,
        stale_after_s: float = 600.0,
        on_event: Callable[[str], None] = lambda line: None,
        on_dead: Callable[[Event], None] = lambda event: None,
    ) -> None:
        super().__init__(name="conceptseg-supervisor", daemon=True)
        self.server_pid, self.repository = server_pid, repository
        self.region_prefix, self.interval_s = region_prefix, interval_s
        self.can_reload, self.on_event, self.on_dead = can_reload, on_event, on_dead
        self.current: dict[str, Stub] = {}  # instance -> its stub (the newest seen alive)
        self.stale_after_s = stale_after_s
        self.stale_since: dict[int, float] = {}  # pid of a replaced stub -> when first seen so
        self.events: list[Event] = []
        self.repairing: set[str] = set()  # models being unloaded/loaded now
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watchdog must outlive a bad poll
                self.on_event(f"supervisor: poll failed: {exc!r}")

    @property
    def known(self) -> dict[str, int]:
        """Instance -> pid of its current stub."""
        return {instance: stub.pid for instance, stub in self.current.items()}

    def dead_instances(self) -> list[Stub]:
        """Instances whose stub died while Triton still calls the model ready; updates
        ``current``. A current stub that is gone counts as dead unless a newer stub of its
        instance runs (a reload): an older one still running (``reap_stale``) does not hide
        the death. A readiness call that gets no answer (a busy server) decides nothing: asked
        again at the next poll, so a death is never dropped for it."""
        stubs = sorted((s for s in list_stubs(self.server_pid) if s.alive), key=lambda s: s.started)
        live = {s.instance: s for s in stubs}  # the newest stub of each instance
        self.reap_stale(stubs, live)
        alive = {s.pid for s in stubs}
        dead, undecided = [], set()
        for instance, stub in list(self.current.items()):
            newest = live.get(instance)
            if stub.pid in alive or (newest and newest.started >= stub.started):
                continue  # running, or replaced by a reload
            model = stub.model
            status = 0 if model in self.repairing else self.repository.readiness(model)
            if status == 0 and model not in self.repairing:
                undecided.add(instance)  # keep it current
                continue
            del self.current[instance]
            if status == 200:
                dead.append(Stub(stub.pid, instance, "", False))
            elif model not in self.repairing:
                self.on_event(
                    f"supervisor: stub {instance} exited with {model} not ready "
                    f"(HTTP {status}): unloaded on purpose, not a death"
                )
        for instance, stub in live.items():
            old = self.current.get(instance)
            if instance not in undecided and (old is None or stub.started >= old.started):
                self.current[instance] = stub
        return dead

    def reap_stale(self, stubs: list[Stub], live: dict[str, Stub]) -> None:
        """SIGKILL a stub that a newer one of its instance replaced ``stale_after_s`` ago.

        After a repair, the old stubs of the model's other instances should exit once their
        requests are answered, but Triton 2.51 keeps the old model, and so those stubs, for
        as long as any of its requests is unanswered, and the requests that were in flight on
        the dead stub never are. Each would hold an orchestrator's memory for good."""
        now = time.monotonic()
        stale = {s.pid for s in stubs if live[s.instance].pid != s.pid}
        for pid in stale - set(self.stale_since):
            self.stale_since[pid] = now
        for pid, since in list(self.stale_since.items()):
            if pid not in stale:
                del self.stale_since[pid]
            elif now - since >= self.stale_after_s:
                del self.stale_since[pid]
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    continue
                self.on_event(
                    f"supervisor: killed stale stub pid {pid}, replaced {now - since:.0f} s ago "
                    "(its unloaded model still held requests lost with a dead stub)"
                )

    def check(self) -> None:
        protect_regions(self.region_prefix)
        models: dict[str, Stub] = {}
        for stub in self.dead_instances():
            models.setdefault(stub.model, stub)
        for model, stub in models.items():
            event = Event(model, stub.instance, stub.pid, time.monotonic())
            self.events.append(event)
            self.on_event(f"supervisor: stub {stub.instance} (pid {stub.pid}) died")
            if not self.can_reload:
                self.on_dead(event)
                continue
            self.repairing.add(model)
            self.spawn(self.repair, event)

    def spawn(self, fn: Callable[[Event], None], event: Event) -> None:
        """Run a repair beside the polling (a load takes seconds; other deaths must be seen)."""
        threading.Thread(target=fn, args=(event,), daemon=True).start()

    def repair(self, event: Event) -> None:
        """Unload (readiness drops), then load until it succeeds (1 s, 2 s, ... 30 s apart)."""
        model, delay = event.model, 1.0
        try:
            self.repository.unload(model)
            self.on_event(f"supervisor: {model} unloaded (not ready); loading it again")
            while not self._stop.is_set():
                event.attempts += 1
                if self.repository.load(model):
                    event.recovered_s = time.monotonic() - event.died_at
                    self.on_event(
                        f"supervisor: {model} ready again after {event.recovered_s:.1f} s"
                    )
                    return
                self.on_event(f"supervisor: loading {model} failed; retrying in {delay:.0f} s")
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        finally:
            self.repairing.discard(model)
