"""Soak and fault runs against the real server (loopback only; every loop bounded in count and time).

    .venv/bin/python benchmarks/soak.py soak --engines engines/tiny --duration 600 --concurrency 4
    .venv/bin/python benchmarks/soak.py faults --engines engines/tiny --duration 300

- ``soak``: ``--concurrency`` clients (each waits 0.5 s after a failed request) (HTTP and gRPC alternating) send a mix of fast requests
  (one-word prompt, no references) and reasoning requests (the sample's question and
  references) for ``--duration`` seconds after a warm-up. It reports requests, failures and
  p50/p99 per route, and the RSS of every server process (tritonserver and each stub), sampled
  every few seconds under load: the median over the first minute after the warm-up against the
  median over the last minute (a request's arrays come and go, so one sample says little), and
  the peak. Fails (exit 1) on any failed request or a process whose RSS grew 10 % or more.
- ``faults``: the same load, and every ``--every`` seconds one fault in turn: SIGKILL of a
  model's stub (each model in turn), a dropped HTTP request (body cut short, socket closed), a
  client that goes away before its answer (gRPC deadline 50 ms). It reports each kill's
  recovery time (supervisor) and the failures, which must all overlap a kill's outage; the server
  must be ready at the end and the requests after the last recovery must all succeed.

The last stdout line is one JSON object (machine, date, config, figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg import contract
from conceptseg.client import Client
from conceptseg.samples import sample_request
from conceptseg.serving import supervisor
from conceptseg.serving.server import ServeConfig, Server, free_port

FAST = "mug"
KILL_ORDER = ("mllm", "ctm", "sam3_vision", "sam3_text", "sam3_heads", "conceptseg")
MAX_REQUESTS = 100_000  # per client: every loop is bounded in count as well as in time
BACKOFF_S = 0.5  # a client waits this long after a failed request (errors come back in ms)
CLIENT_TIMEOUT_S = 60.0  # a request unanswered this long counts as failed (tiny: ~1 s each)
SAMPLE_S = 5.0  # RSS sampling period under load


@dataclass
class Outcome:
    route: str
    start: float
    seconds: float
    error: str = ""


def rss_by_process(server_pid: int) -> dict[str, int]:
    """Resident set size (bytes) of tritonserver and each of its stubs (by instance name)."""
    out = {"tritonserver": _rss(server_pid)}
    for stub in supervisor.list_stubs(server_pid):
        if stub.alive:
            out[stub.instance] = _rss(stub.pid)
    return out


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Clients:
    """``n`` client threads sending the request mix until ``deadline`` (and at most MAX_REQUESTS)."""

    def __init__(self, server: Server, n: int, reason_every: int = 3) -> None:
        sample = sample_request()
        refs = [(r.image, r.box) for r in sample.references]
        self.requests = {
            "fast": contract.to_request_arrays(sample.image, FAST),
            "reason": contract.to_request_arrays(sample.image, sample.question, refs),
        }
        self.server, self.n, self.reason_every = server, n, reason_every
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()

    def run(self, seconds: float) -> list[Outcome]:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._client, args=(i, deadline)) for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 600)
        with self.lock:
            done, self.outcomes = self.outcomes, []
        return done

    def _client(self, index: int, deadline: float) -> None:
        protocol = "grpc" if index % 2 else "http"
        url = self.server.cfg.urls[protocol]
        with Client(url, protocol=protocol, timeout_s=CLIENT_TIMEOUT_S) as client:
            for i in range(MAX_REQUESTS):
                if time.monotonic() >= deadline:
                    return
                route = "reason" if (i + index) % self.reason_every == 0 else "fast"
                start = time.monotonic()
                try:
                    client.infer(dict(self.requests[route]))
                    outcome = Outcome(route, start, time.monotonic() - start)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    outcome = Outcome(route, start, time.monotonic() - start, repr(exc)[:300])
                with self.lock:
                    self.outcomes.append(outcome)
                if outcome.error:
                    time.sleep(BACKOFF_S)


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    routes: dict[str, Any] = {}
    for route in ("fast", "reason"):
        mine = [o for o in outcomes if o.route == route]
        ok = np.array([o.seconds for o in mine if not o.error]) * 1000
        routes[route] = {
            "requests": len(mine),
            "failures": sum(1 for o in mine if o.error),
            "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok.size else None,
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok.size else None,
        }
    return routes


def sample_rss(server: Server, seconds: float) -> list[tuple[float, dict[str, int]]]:
    """``rss_by_process`` every SAMPLE_S (at least 20 samples) for ``seconds`` (beside the load)."""
    samples, deadline = [], time.monotonic() + seconds
    period = min(SAMPLE_S, seconds / 20)
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), rss_by_process(server.process.pid)))
        time.sleep(min(period, max(0.0, deadline - time.monotonic())))
    return samples


def rss_growth(samples: list[tuple[float, dict[str, int]]], window: float) -> dict[str, Any]:
    """Per process: median RSS (MB) over the first and the last ``window`` seconds, growth %,
    peak (a stub restarted in between is compared from its restart on)."""
    t0, t1 = samples[0][0], samples[-1][0]
    out: dict[str, Any] = {}
    for name in samples[-1][1]:
        first = [s[name] for t, s in samples if t <= t0 + window and s.get(name)]
        last = [s[name] for t, s in samples if t >= t1 - window and s.get(name)]
        if not first or not last:
            continue
        a, b = float(np.median(first)), float(np.median(last))
        out[name] = {
            "first_mb": round(a / 2**20, 1),
            "last_mb": round(b / 2**20, 1),
            "growth_pct": round(100 * (b - a) / a, 2),
            "peak_mb": round(max(s.get(name, 0) for _, s in samples) / 2**20, 1),
        }
    return out


def failure_kinds(outcomes: list[Outcome]) -> dict[str, int]:
    """Failed requests by the start of their error (the exception and its first words)."""
    kinds: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            key = " ".join(o.error.split()[:6])[:80]
            kinds[key] = kinds.get(key, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def run_soak(
    server: Server, duration: float, concurrency: int, warmup: float, max_growth_pct: float = 10.0
) -> dict[str, Any]:
    clients = Clients(server, concurrency)
    clients.run(warmup)
    samples: list[tuple[float, dict[str, int]]] = []
    sampler = threading.Thread(target=lambda: samples.extend(sample_rss(server, duration)))
    sampler.start()
    outcomes = clients.run(duration)
    sampler.join()
    rss = rss_growth(samples, window=min(60.0, duration / 4))
    failures = [o.error for o in outcomes if o.error]
    return {
        "routes": summary(outcomes),
        "rss": rss,
        "max_rss_growth_pct": max((r["growth_pct"] for r in rss.values()), default=None),
        "first_failures": failures[:5],
        "ok": not failures and all(r["growth_pct"] < max_growth_pct for r in rss.values()),
    }


def drop_http(server: Server, arrays: dict[str, np.ndarray]) -> None:
    """An HTTP infer request whose body is cut short, then the socket closed."""
    host, port = server.cfg.urls["http"].split(":")
    body = json.dumps({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1, 1],
                                   "data": [FAST]}]}).encode()  # fmt: skip
    head = (
        f"POST /v2/models/conceptseg/infer HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body) * 10}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head.encode() + body)


def leave_early(server: Server, arrays: dict[str, np.ndarray]) -> None:
    """A reasoning request whose client gives up after 50 ms (gRPC deadline)."""
    with Client(server.cfg.urls["grpc"], protocol="grpc") as client:
        try:
            client.client.infer("conceptseg", _grpc_inputs(arrays), client_timeout=0.05)
        except Exception:  # noqa: BLE001 - the deadline is the point
            pass


def _grpc_inputs(arrays: dict[str, np.ndarray]) -> list[Any]:
    import tritonclient.grpc as grpcclient  # the serve extra, as conceptseg.client

    inputs = []
    for name, array in arrays.items():
        dtype = "BYTES" if array.dtype == np.object_ else "FP32"
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def kill_stub(server: Server, model: str) -> dict[str, Any] | None:
    """SIGKILL one live stub of ``model`` (None: none is running, e.g. still being reloaded)."""
    # the newest stub: a replaced one may linger (supervisor.reap_stale), killing it is no fault
    stubs = sorted(supervisor.list_stubs(server.process.pid), key=lambda s: -s.started)
    stub = next((s for s in stubs if s.model == model and s.alive), None)
    if stub is None:
        return None
    os.kill(stub.pid, signal.SIGKILL)
    return {"fault": "kill", "model": model, "instance": stub.instance, "at": time.monotonic()}


FAULTS = (*(("kill", m) for m in KILL_ORDER), ("drop", ""), ("leave", ""))


def run_faults(
    server: Server, duration: float, concurrency: int, every: float, kinds: tuple = FAULTS
) -> dict[str, Any]:
    clients = Clients(server, concurrency)
    faults: list[dict[str, Any]] = []
    stop = threading.Event()

    def inject() -> None:
        for i in range(int(duration // every)):
            if stop.wait(every):
                return
            kind, model = kinds[i % len(kinds)]
            if kind == "kill":
                killed = kill_stub(server, model)
                faults.extend([killed] if killed else [])
            else:
                fn = drop_http if kind == "drop" else leave_early
                fn(server, clients.requests["reason"])
                faults.append({"fault": kind, "at": time.monotonic()})

    injector = threading.Thread(target=inject)
    injector.start()
    outcomes = clients.run(duration)
    stop.set()
    injector.join(timeout=60)

    def event_of(fault: dict[str, Any]) -> supervisor.Event | None:
        return next(
            (e for e in server.supervisor.events
             if e.instance == fault["instance"] and e.died_at >= fault["at"]), None,
        )  # fmt: skip

    kills = [f for f in faults if f["fault"] == "kill"]
    settle = time.monotonic() + 120  # the last repairs may still be under way

    def settled() -> bool:
        repaired = all((e := event_of(f)) and e.recovered_s is not None for f in kills)
        return repaired and not server.supervisor.repairing and server.ready()

    while time.monotonic() < settle and not settled():
        time.sleep(0.5)
    for f in kills:
        event = event_of(f)
        f["recovered_s"] = None if event is None else event.recovered_s
        f["until"] = f["at"] + (f["recovered_s"] or duration) + 1.0
    outages = [(f["at"], f["until"]) for f in faults if f["fault"] == "kill"]
    stray = [
        o.error
        for o in outcomes
        if o.error and not any(o.start <= b and o.start + o.seconds >= a for a, b in outages)
    ]
    recovered = [f["recovered_s"] for f in faults if f["fault"] == "kill"]
    after = clients.run(min(20.0, duration / 4))
    return {
        "routes": summary(outcomes),
        "faults": [{k: v for k, v in f.items() if k not in ("at", "until")} for f in faults],
        "kills": len(recovered),
        "max_recovery_s": max((r for r in recovered if r is not None), default=None),
        "failures_outside_outages": stray[:5],
        "failure_kinds": failure_kinds(outcomes),
        "after_faults": summary(after),
        "ok": (
            server.ready() and not stray and None not in recovered
            and not any(o.error for o in after)
        ),
    }  # fmt: skip


@dataclass
class Args:
    mode: str
    engines: Path
    duration: float = 600.0
    concurrency: int = 4
    warmup: float = 30.0
    every: float = 20.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["soak", "faults"])
    parser.add_argument("--engines", type=Path, default=Path("engines/tiny"))
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=30.0, help="soak: seconds before RSS 0")
    parser.add_argument("--every", type=float, default=20.0, help="faults: seconds between")
    ns = parser.parse_args(argv)
    args = Args(ns.mode, ns.engines, ns.duration, ns.concurrency, ns.warmup, ns.every)
    cfg = ServeConfig(
        engines=args.engines,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        pipeline_config={"max_new_tokens": 48},
        exit_timeout_s=10,
    )
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with Server(cfg) as server:
        server.on_event = lambda line: print(line, file=sys.stderr, flush=True)
        if args.mode == "soak":
            result = run_soak(server, args.duration, args.concurrency, args.warmup)
        else:
            result = run_faults(server, args.duration, args.concurrency, args.every)
    record = {
        "mode": args.mode,
        "date": started,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2**30} GiB",
        "config": {k: str(v) for k, v in asdict(args).items()},
        **result,
    }
    print(json.dumps(record))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
