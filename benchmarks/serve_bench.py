"""``conceptseg bench serve``: the Triton server under load, measured by NVIDIA's ``perf_analyzer``.

Starts ``conceptseg serve`` on ENGINES (cpu profile, 127.0.0.1, free ports), writes the request
tensors of the bundled sample as perf_analyzer ``--input-data`` JSON, and runs perf_analyzer
(gRPC, ``conceptseg`` model) over a concurrency range for each route:

- ``fast``: a one-word prompt the router sends straight to SAM 3,
- ``reason``: the sample question with its three references, router off (MLLM + CTM + SAM 3).

Reported per route and concurrency: throughput (requests/s) and client latency p50/p90/p99 from
perf_analyzer's CSV, next to the in-process pipeline's median latency on the same engines and
request measured in the same run (the serving overhead at concurrency 1).

perf_analyzer comes with ``tritonclient[all]`` 2.41 and needs ``libb64.so.0d`` (Debian's
``libb64-0d``) and ``libcudart.so.12`` (the ``nvidia-cuda-runtime-cu12`` wheel) even without a
GPU: ``make perf-tools`` installs both (the wheel into ``.venv/perf-libs``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.build import CPU_ENGINE_RUNTIMES

ROOT = Path(__file__).resolve().parents[1]
PERF_LIBS = ROOT / ".venv" / "perf-libs" / "nvidia" / "cuda_runtime" / "lib"
FAST_PROMPT = "mug"  # one word: the tiny SAM 3 passes its threshold (0.1)


def perf_analyzer() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary beside this Python and the environment it runs in; raises
    FileNotFoundError saying what to install when it cannot start."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is missing: pip install 'tritonclient[all]==2.41.0'")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(PERF_LIBS), env.get("LD_LIBRARY_PATH", "")) if p
    )
    probe = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env)
    if "error while loading shared libraries" in probe.stderr:
        raise FileNotFoundError(
            f"perf_analyzer cannot start: {probe.stderr.strip()}; run `make perf-tools`"
        )
    return binary, env


def input_data(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """perf_analyzer ``--input-data`` JSON for one request's tensors (batch dim dropped: the
    ``-b 1`` batch adds it back). BYTES tensors go as ``b64`` of Triton's serialized form (each
    element a 4-byte little-endian length, then its bytes: binary safe, any element count) with
    their ``shape``; numeric tensors as ``content`` lists with their ``shape``."""
    entry: dict[str, Any] = {}
    for name, array in arrays.items():
        array = np.asarray(array)[0]  # drop the batch dim
        if array.dtype == np.object_:
            items = [bytes(x) for x in array.ravel()]
            raw = b"".join(struct.pack("<I", len(x)) + x for x in items)
            entry[name] = {"b64": base64.b64encode(raw).decode(), "shape": list(array.shape)}
        else:
            entry[name] = {"content": array.ravel().tolist(), "shape": list(array.shape)}
    return {"data": [entry]}


def parse_csv(text: str) -> list[dict[str, float]]:
    """perf_analyzer's ``-f`` CSV -> rows of concurrency, throughput, client latency percentiles
    and the server's mean queue and compute time per request (ms; the CSV has microseconds)."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        rows.append({
            "concurrency": int(float(row["Concurrency"])),
            "throughput_rps": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1e3,
            "p90_ms": float(row["p90 latency"]) / 1e3,
            "p99_ms": float(row["p99 latency"]) / 1e3,
            "server_queue_ms": float(row["Server Queue"]) / 1e3,
            "server_compute_ms": float(row["Server Compute Infer"]) / 1e3,
        })  # fmt: skip
    return sorted(rows, key=lambda row: row["concurrency"])


def requests() -> dict[str, tuple[Any, dict[str, np.ndarray]]]:
    """Route -> (in-process Request, the same request as contract tensors)."""
    from conceptseg import contract
    from conceptseg.samples import sample_request
    from conceptseg.types import Request

    sample = sample_request()
    refs = [(r.image, r.box) for r in sample.references]
    fast = Request(image=sample.image, question=FAST_PROMPT)
    reason_arrays = contract.to_request_arrays(
        sample.image, sample.question, refs, contract.Options(router=False)
    )
    return {
        "fast": (fast, contract.to_request_arrays(sample.image, FAST_PROMPT, [])),
        "reason": (sample, reason_arrays),
    }


def run_perf(binary: Path, env: dict[str, str], url: str, data: Path, args: argparse.Namespace,
             csv_path: Path, headers: dict[str, str]) -> list[dict[str, float]]:  # fmt: skip
    # the model config it reads is a restricted API: the key goes as gRPC metadata (-H)
    keys = [arg for k, v in headers.items() for arg in ("-H", f"{k}:{v}")]
    command = [str(binary), "-m", "conceptseg", "-u", url, "-i", "grpc", "-b", "1", *keys,
               "--input-data", str(data), "--concurrency-range", args.concurrency,
               "--measurement-mode", "count_windows",
               "--measurement-request-count", str(args.requests_per_window),
               "--stability-percentage", str(args.stability), "--max-trials", str(args.max_trials),
               "-f", str(csv_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not csv_path.exists():
        raise RuntimeError(
            f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
        )
    return parse_csv(csv_path.read_text())


def in_process_ms(pipeline: Any, request: Any, repeats: int) -> float:
    pipeline.run(request)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipeline.run(request)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    from conceptseg.build import build_pipeline
    from conceptseg.config import from_name
    from conceptseg.serving.server import ServeConfig, Server, free_port

    binary, env = perf_analyzer()
    engines = Path(args.engines).resolve()
    config = from_name(args.preset, max_new_tokens=args.max_new_tokens)
    weights = Path(json.loads((engines / "manifest.json").read_text())["weights"])
    pipeline = build_pipeline(weights, backend="onnxruntime", engines=engines, config=config)
    routes = {k: v for k, v in requests().items() if k in args.routes.split(",")}
    baseline = {route: in_process_ms(pipeline, req, args.in_process_repeats)
                for route, (req, _) in routes.items()}  # fmt: skip
    del pipeline
    precision = args.precision if args.mllm_backend == "ort-genai" else "fp32"
    cfg = ServeConfig(engines=engines, http_port=free_port(), grpc_port=free_port(),
                      metrics_port=free_port(), pipeline_config=asdict(config),
                      mllm_backend=args.mllm_backend, mllm_precision=precision,
                      mllm_slots=args.mllm_slots, engine_runtime=args.engine_runtime)  # fmt: skip
    results: dict[str, Any] = {"in_process_median_ms": baseline, "routes": {}}
    work = Path(tempfile.mkdtemp(prefix="conceptseg-perf-"))
    try:
        with Server(cfg) as server:
            for route, (_, arrays) in routes.items():
                data = work / f"{route}.json"
                data.write_text(json.dumps(input_data(arrays)))
                rows = run_perf(
                    binary, env, server.cfg.urls["grpc"], data, args, work / f"{route}.csv",
                    server.grpc_headers,
                )
                results["routes"][route] = rows
                for row in rows:
                    print(f"{route}: {json.dumps(row)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["config"] = {"max_new_tokens": args.max_new_tokens, "preset": args.preset,
                         "orchestrator_instances": cfg.orchestrator_instances,
                         "mllm_backend": cfg.mllm_backend or "hf", "mllm_slots": cfg.mllm_slots,
                         "mllm_precision": cfg.mllm_precision,
                         "engine_runtime": cfg.engine_runtime}  # fmt: skip
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{'route':8} {'conc':>5} {'req/s':>8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
          f"{'queue ms':>9} {'compute ms':>11} {'in-process ms':>14}")  # fmt: skip
    for route, rows in results["routes"].items():
        base = results["in_process_median_ms"][route]
        for row in rows:
            print(f"{route:8} {row['concurrency']:5d} {row['throughput_rps']:8.2f} {row['p50_ms']:9.1f} "
                  f"{row['p90_ms']:9.1f} {row['p99_ms']:9.1f} {row['server_queue_ms']:9.1f} "
                  f"{row['server_compute_ms']:11.1f} {base:14.1f}")  # fmt: skip


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routes", default="fast,reason", help="serve: comma list of fast,reason")
    parser.add_argument(
        "--concurrency", default="1:4:1", help="serve: perf_analyzer start:end:step"
    )
    parser.add_argument("--requests-per-window", type=int, default=20, help="serve: per window")
    parser.add_argument("--stability", type=int, default=20, help="serve: stability percentage")
    parser.add_argument(
        "--max-trials", type=int, default=5, help="serve: windows per level at most"
    )
    parser.add_argument("--max-new-tokens", type=int, default=8, help="serve: MLLM tokens (reason)")
    parser.add_argument("--preset", default="test", help="serve: pipeline preset")
    parser.add_argument("--in-process-repeats", type=int, default=5, help="serve: in-process runs")
    parser.add_argument("--mllm-backend", default="", help="serve: hf (default) or ort-genai")
    parser.add_argument("--mllm-slots", type=int, default=0, help="serve: generations at once")
    parser.add_argument(
        "--precision", default="fp32", help="serve (ort-genai): ENGINES/mllm/<precision>"
    )
    parser.add_argument("--engine-runtime", default=CPU_ENGINE_RUNTIMES[0], choices=CPU_ENGINE_RUNTIMES,
                        help="serve: what runs the engine models")  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_serve(args)


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per route and concurrency (perf_analyzer's client latencies), then in-process."""
    out = []
    for route, points in results["routes"].items():
        for p in points:
            out.append({"step": route, "contender": "served", **p})
    for route, ms in results["in_process_median_ms"].items():
        out.append({"step": route, "contender": "in-process", "p50_ms": ms})
    return out
