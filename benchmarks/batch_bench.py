"""``conceptseg bench batch``: the ort-genai MLLM's aggregate decode tokens/s over 1, 2, 4, 8
concurrent sequences (``open``/``step``, what the ``mllm`` model's scheduler runs), side by
side, with batch invariance in the same record.

One prefill of the sample request; every sequence of a batch starts from a copy of it (the
prefill of 8 requests at real size would take ~9 min and is not what is measured). Exactly
``--new-tokens`` steps per run (stop ids ignored). Two figures per batch: the whole run (its
first step also copies every newcomer's KV into the batch's rows) and the steady step (the
runs' other steps: what a batch whose members have joined runs per token). Invariance: each row of the largest batch vs
the sequence decoded alone: tokens equal, states' max abs difference.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.benchmark import row as table_row
from conceptseg.benchmark import summary


def _copy(seq: Any) -> Any:
    return replace(seq, seen=seq.seen.copy(), kv=[a.copy() for a in seq.kv], tokens=[],
                   states=[], started=time.perf_counter())  # fmt: skip


def _decode(mllm: Any, base: Any, n: int) -> tuple[float, float, list[Any]]:
    """(the run's seconds, its first step's, the sequences): the first step also copies each
    newcomer's KV into the batch's rows."""
    seqs = [_copy(base) for _ in range(n)]
    start = time.perf_counter()
    mllm.step(seqs)
    first = time.perf_counter() - start
    while not all(s.done for s in seqs):
        mllm.step(seqs)
    took = time.perf_counter() - start
    for seq in seqs:
        mllm.release(seq)
    return took, first, seqs


def bench_mllm_batch(args: argparse.Namespace, summary: Any) -> dict[str, Any]:
    from conceptseg.backends.ortgenai_mllm import OrtGenaiMllm
    from conceptseg_export.mllm_export import sample_inputs

    sizes = [int(c) for c in args.batch_sizes.split(",")]
    model_dir = Path(args.engines) / "mllm" / args.precision
    mllm = OrtGenaiMllm(model_dir, max_new_tokens=args.new_tokens, threads=args.threads)
    mllm.stop_ids = set()  # exactly --new-tokens steps, whatever the random weights pick
    start = time.perf_counter()
    base = mllm.open(*sample_inputs())
    prefill_s = time.perf_counter() - start
    _, _, (alone,) = _decode(mllm, base, 1)  # warm-up and the invariance reference
    times: dict[int, list[float]] = {n: [] for n in sizes}
    steady: dict[int, list[float]] = {n: [] for n in sizes}  # per step, the joining step left out
    largest: list[Any] = []
    for repeat in range(args.repeats):
        for n in sizes if repeat % 2 == 0 else sizes[::-1]:
            took, first, seqs = _decode(mllm, base, n)
            times[n].append(took * 1e3)
            steady[n].append((took - first) * 1e3 / max(1, args.new_tokens - 1))
            if n == max(sizes):
                largest = seqs
    rows: dict[str, Any] = {}
    for n in sizes:
        stats = summary(times[n])
        step = float(np.median(steady[n]))
        rows[f"batch_{n}"] = {
            "concurrent": n,
            "step_ms": stats["median_ms"] / args.new_tokens,
            "tokens_per_s": n * args.new_tokens / (stats["median_ms"] / 1e3),
            "steady_step_ms": step,
            "steady_tokens_per_s": n * 1e3 / step,
            **stats,
        }
    one = rows[f"batch_{sizes[0]}"]
    for row in rows.values():
        row["speedup_vs_1"] = row["tokens_per_s"] / one["tokens_per_s"]
        row["steady_speedup_vs_1"] = row["steady_tokens_per_s"] / one["steady_tokens_per_s"]
    ref = np.stack(alone.states)
    rows["invariance"] = {
        "tokens_equal": all(s.tokens == alone.tokens for s in largest),
        "states_max_abs": max(float(np.abs(np.stack(s.states) - ref).max()) for s in largest),
        "prompt_tokens": base.prompt_tokens,
        "prefill_s": prefill_s,
    }
    return rows


def print_batch_table(rows: dict[str, Any]) -> None:
    print(f"{'concurrent':>10} {'step':>9} {'tokens/s':>9} {'vs 1':>6} {'p90 run':>9} "
          f"{'steady step':>12} {'tokens/s':>9} {'vs 1':>6}")  # fmt: skip
    for key, row in rows.items():
        if key.startswith("batch_"):
            print(f"{row['concurrent']:>10} {row['step_ms']:7.1f}ms {row['tokens_per_s']:9.1f} "
                  f"{row['speedup_vs_1']:5.2f}x {row['p90_ms'] / 1e3:8.2f}s "
                  f"{row['steady_step_ms']:10.1f}ms {row['steady_tokens_per_s']:9.1f} "
                  f"{row['steady_speedup_vs_1']:5.2f}x")  # fmt: skip
    inv = rows["invariance"]
    print(f"largest batch vs alone: tokens equal {inv['tokens_equal']}, "
          f"states max |d| {inv['states_max_abs']:.1e}; prefill {inv['prefill_s']:.1f} s")  # fmt: skip


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="concurrent sequences")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per run")
    parser.add_argument("--precision", default="int4", help="ENGINES/mllm/<precision>")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_mllm_batch(args, summary)


def print_table(rows: dict[str, Any]) -> None:
    print_batch_table(rows)


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One decode row per concurrency: aggregate tokens/s, the speed-up over one sequence, and
    the batch invariance of the largest batch (tokens equal, states' max |d|)."""
    inv = results["invariance"]
    return [table_row("decode (batched)", f"{r['concurrent']} concurrent", r,
                      tokens_per_s=round(r["tokens_per_s"], 1), speedup=r["speedup_vs_1"],
                      steady_tokens_per_s=round(r["steady_tokens_per_s"], 1),
                      steady_speedup=round(r["steady_speedup_vs_1"], 2),
                      same_answer=inv["tokens_equal"], max_abs=inv["states_max_abs"])
            for k, r in results.items() if k.startswith("batch_")]  # fmt: skip
