"""``conceptseg bench TARGET``: the one benchmark harness (STYLE.md section 5).

The harness core lives here (timing, statistics, the machine record, the markdown table, the
plots); the contenders of each target live in the source checkout's ``benchmarks/<target>_bench.py``
(they pull the heavy stacks and the exporters, which the installed runtime must not import).
A target module provides ``add_args(parser)``, ``run(args) -> results`` and
``rows(results) -> list[row]``; ``print_table(results)`` is optional.

A row is a flat dict: ``step``, ``contender``, timing (``p50_ms``, ``p90_ms``, ``p99_ms``,
``repeats``), and whatever the target measures beside it: ``speedup`` (vs the step's first
contender, the baseline), quality vs the fp32 reference in the same row (``rel_l2``, ``max_abs``,
``mask_iou``, ``token_agreement``, ``same_answer``), ``breakdown_ms`` (per-step medians),
``concurrency`` / ``throughput_rps``. Contenders run side by side in one process, alternating
their order each repeat (shared machines are noisy), after a warm-up.

Output: a markdown table on stdout, PNG plots in ``--plots DIR`` and, as the **last stdout
line**, one JSON object: target, date, command, machine (CPU model and flags), versions, config,
rows and the target's full results.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.types import UsageError
from conceptseg.versions import package_versions

TARGETS = {
    "request": "whole reasoning request: our pipeline vs the reference code's recipe",
    "sam3": "SAM 3 vision / heads / text: torch fp32, torch bf16 autocast, ONNX Runtime, OpenVINO",
    "mllm": "MLLM prefill + decode: transformers bf16 vs the ort-genai export",
    "batch": "the ort-genai MLLM's aggregate decode tokens/s over 1, 2, 4, 8 concurrent sequences",
    "serve": "the Triton server under perf_analyzer over a concurrency range",
    "attention": "one global ViT attention block, three ONNX forms",
    "gemm": "one prefill-shaped decoder GEMM: ONNX Runtime fp32/int4 vs torch fp32/bf16",
}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8", "avx_vnni")  # fmt: skip
QUALITY = ("rel_l2", "max_abs", "mask_iou", "token_agreement", "same_answer")
VERSION_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "openvino",
                    "tensorrt", "tensorrt_llm", "numpy", "matplotlib")  # fmt: skip


# ---- machine, versions ------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, cores, memory, the CPU flags that decide fast paths (AMX, AVX-512 BF16/VNNI),
    and the GPU when torch (already imported by a target) sees one."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")  # fmt: skip
    flags_line = next((line for line in info.splitlines() if line.startswith("flags")), "")
    present = set(flags_line.split(":", 1)[-1].split())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "cpu_flags": {flag: flag in present for flag in CPU_FLAGS},
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _gpu_name() -> str | None:
    torch = sys.modules.get("torch")  # never import torch here: only report what a target loaded
    if torch is not None and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return None


def versions() -> dict[str, str]:
    return package_versions(VERSION_PACKAGES)


# ---- timing -----------------------------------------------------------------------------------
def synchronize() -> None:
    """Wait for queued GPU work (no-op on CPU), so that a timed region ends when its work does."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def identity_runner(fn: Callable[[], Any]) -> Any:
    return fn()


def profiler_runner(fn: Callable[[], Any]) -> Any:
    """cProfile around one call; prints the top functions to stderr."""
    import cProfile  # stdlib, only with --runner profile
    import pstats  # stdlib, only with --runner profile

    profile = cProfile.Profile()
    result = profile.runcall(fn)
    pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(15)
    return result


RUNNERS = {"identity": identity_runner, "profile": profiler_runner}


def timed(fn: Callable[[], Any], runner: Callable = identity_runner) -> tuple[float, Any]:
    """(milliseconds, result) of one call, synchronized on both ends."""
    synchronize()
    start = time.perf_counter()
    out = runner(fn)
    synchronize()
    return (time.perf_counter() - start) * 1e3, out


def side_by_side(
    contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int, runner: Callable
) -> dict[str, Any]:
    """Every contender once per repeat, the order rotating each repeat, after ``warmup`` rounds;
    ``{"times": {name: [ms]}, "outputs": {name: last output}}``."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, Any] = {}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            ms, outputs[name] = timed(contenders[name], runner)
            times[name].append(ms)
    return {"times": times, "outputs": outputs}


def summary(times: list[float]) -> dict[str, float]:
    """Median (= p50), p90, p99 (linear interpolation), min and mean of ``times`` (ms)."""
    assert times, "no timings: --repeats must be at least 1"
    p50, p90, p99 = (float(v) for v in np.percentile(times, [50, 90, 99]))
    return {"median_ms": p50, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "min_ms": float(min(times)), "mean_ms": float(np.mean(times)), "repeats": len(times)}  # fmt: skip


def relative_l2(out: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """Largest ``|out - ref| / |ref|`` (L2, float64) over paired arrays."""
    return max(float(np.linalg.norm(o.astype(np.float64) - r.astype(np.float64))
                     / max(np.linalg.norm(r.astype(np.float64)), 1e-30))
               for o, r in zip(out, ref, strict=True))  # fmt: skip


def max_abs(out: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return max(float(np.abs(o.astype(np.float64) - r.astype(np.float64)).max())
               for o, r in zip(out, ref, strict=True))  # fmt: skip


def row(step: str, contender: str, stats: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One table row from :func:`summary` statistics and the measurements beside them."""
    keep: dict[str, Any] = {k: stats[k] for k in ("p50_ms", "p90_ms", "p99_ms", "repeats") if k in stats}
    return {"step": step, "contender": contender, **keep, **extra}


def with_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``speedup`` of each timed row vs its step's first row (the baseline), where not set."""
    base: dict[str, float] = {}
    for r in rows:
        if "p50_ms" not in r or "concurrency" in r:
            continue
        base.setdefault(r["step"], r["p50_ms"])
        r.setdefault("speedup", base[r["step"]] / r["p50_ms"] if r["p50_ms"] else math.nan)
    return rows


# ---- output -----------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a GitHub markdown table; columns are the fields any row has, in a fixed order."""
    order = ["step", "contender", "concurrency", "throughput_rps", "p50_ms", "p90_ms", "p99_ms",
             "repeats", "speedup", *QUALITY]  # fmt: skip
    extra = sorted({k for r in rows for k in r if k not in order and not isinstance(r[k], dict)})
    columns = [c for c in order + extra if any(c in r for r in rows)]
    numeric = {c for c in columns if any(isinstance(r.get(c), int | float) for r in rows)}
    head = "| " + " | ".join(columns) + " |"
    rule = "| " + " | ".join("---:" if c in numeric else "---" for c in columns) + " |"
    body = ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_plots(rows: list[dict[str, Any]], out: Path, target: str) -> list[str]:
    """PNG plots of what the rows carry: latency and throughput vs concurrency, per-step
    breakdown as stacked bars, speed vs quality; returns the written paths."""
    import matplotlib  # heavy: plotting, only with --plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: plotting, only with --plots

    # 20 distinct colours: a breakdown has up to a dozen steps
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=[plt.get_cmap("tab20")(i) for i in range(20)])

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("latency_vs_concurrency", _plot_concurrency),
                       ("step_breakdown", _plot_breakdown), ("speed_vs_quality", _plot_quality)):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.2))
        if draw(ax, rows):
            ax.set_title(f"conceptseg bench {target}: {name.replace('_', ' ')}")
            fig.tight_layout()
            path = out / f"{target}_{name}.png"
            fig.savefig(path, dpi=110)
            written.append(str(path))
        plt.close(fig)
    return written


def _plot_concurrency(ax: Any, rows: list[dict[str, Any]]) -> bool:
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "concurrency" in r:
            series.setdefault(f"{r['step']} {r['contender']}", []).append(r)
    if not series:
        return False
    twin = ax.twinx()
    for label, points in series.items():
        points = sorted(points, key=lambda p: p["concurrency"])
        xs = [p["concurrency"] for p in points]
        ax.plot(xs, [p["p50_ms"] for p in points], "o-", label=f"{label} p50")
        ax.plot(xs, [p["p99_ms"] for p in points], "x--", label=f"{label} p99")
        twin.plot(xs, [p.get("throughput_rps", 0) for p in points], "s:", alpha=0.6)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("latency (ms)")
    twin.set_ylabel("throughput (req/s, dotted)")
    ax.legend(fontsize=7)
    return True


def _plot_breakdown(ax: Any, rows: list[dict[str, Any]]) -> bool:
    bars = [r for r in rows if r.get("breakdown_ms")]
    if not bars:
        return False
    steps = list(dict.fromkeys(k for r in bars for k in r["breakdown_ms"]))
    labels = [f"{r['step']}\n{r['contender']}" for r in bars]
    bottom = np.zeros(len(bars))
    for step in steps:
        values = np.array([r["breakdown_ms"].get(step, 0.0) for r in bars]) / 1e3
        ax.bar(labels, values, bottom=bottom, label=step)
        bottom += values
    ax.set_ylabel("seconds (median per step)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return True


def _plot_quality(ax: Any, rows: list[dict[str, Any]]) -> bool:
    points = [r for r in rows if "p50_ms" in r and "concurrency" not in r
              and any(isinstance(r.get(q), int | float) for q in ("mask_iou", "rel_l2"))]  # fmt: skip
    if not points:
        return False
    metric = "mask_iou" if any("mask_iou" in r for r in points) else "rel_l2"
    for r in points:
        if isinstance(r.get(metric), int | float):
            ax.scatter(r["p50_ms"] / 1e3, r[metric])
            ax.annotate(f"{r['step']} {r['contender']}", (r["p50_ms"] / 1e3, r[metric]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median latency (s, log)")
    ax.set_ylabel(f"{metric} vs the fp32 reference")
    return True


def record(target: str, args: argparse.Namespace, rows: list[dict[str, Any]], results: Any,
           plots: list[str]) -> dict[str, Any]:  # fmt: skip
    return {
        "target": target,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["conceptseg", "bench", target, *args.argv]),
        "machine": machine(),
        "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
        "rows": rows,
        "results": results,
        "plots": plots,
    }


# ---- the command ------------------------------------------------------------------------------
def benchmarks_dir() -> Path:
    """The source checkout's ``benchmarks/`` (an editable install's); the contenders live there."""
    path = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (path / "request_bench.py").exists():
        raise UsageError(
            "bench", f"{path} is missing: run from a source checkout (pip install -e .)"
        )
    return path


def target_module(target: str) -> Any:
    folder = str(benchmarks_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the target modules import their siblings by name
    return importlib.import_module(f"{target}_bench")


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default="weights/real-3b", help="conceptseg synth output")
    parser.add_argument("--engines", default="engines/real-3b", help="conceptseg export output")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runner", default="identity", choices=sorted(RUNNERS))
    parser.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots here")


def run_target(target: str, argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` for ``target``, run it, print the table and the record; return the record."""
    module = target_module(target)
    parser = argparse.ArgumentParser(prog=f"conceptseg bench {target}", description=TARGETS[target])
    common_args(parser)
    module.add_args(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    results = module.run(args)
    if hasattr(module, "print_table"):
        module.print_table(results)
    rows = with_speedups(module.rows(results))
    print(markdown_table(rows))
    plots = write_plots(rows, Path(args.plots), target) if args.plots else []
    for path in plots:
        print(f"plot: {path}")
    rec = record(target, args, rows, results, plots)
    print(json.dumps(rec, default=str))
    return rec


def cmd_bench(args: argparse.Namespace) -> None:
    run_target(args.target, args.options)


def register(sub: Any) -> None:
    """``conceptseg bench TARGET [flags]``; ``conceptseg bench TARGET --help`` lists the flags."""
    help_text = "benchmark harness: " + "; ".join(f"{k}: {v}" for k, v in TARGETS.items())
    p = sub.add_parser("bench", help="side-by-side benchmarks (table, plots, JSON record)",
                       description=help_text)  # fmt: skip
    p.add_argument("target", choices=list(TARGETS))
    p.add_argument("options", nargs=argparse.REMAINDER, help="the target's flags (TARGET --help)")
    p.set_defaults(func=cmd_bench)
