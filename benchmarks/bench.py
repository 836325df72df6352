"""One benchmark harness. Side-by-side timings in one process, alternating the contenders each
repeat (these machines are noisy), medians and p90 over repeats, quality in the same record.

    .venv/bin/python benchmarks/bench.py sam3 --weights weights/real-3b --engines engines/real-3b

Targets:
- ``sam3``: SAM 3 vision encoder, text encoder and heads (40-slot prompt) at the checkpoint's
  resolution: torch eager (transformers, fp32) vs the exported graphs under ONNX Runtime (fp32, and
  int8-dynamic if ``--int8`` points at ``sam3_vision.int8.onnx``, made by
  ``conceptseg export --parts sam3_vision_int8``).
- ``mllm``: the MLLM's prefill and decode tokens/s, transformers bf16 vs the ort-genai export
  (int4 by default), with bytes moved per token and the machine's read bandwidth
  (``mllm_bench.py``).
- ``mllm-batch``: the ort-genai MLLM's aggregate decode tokens/s over 1, 2, 4, 8 concurrent
  sequences (the ``mllm`` model's continuous batching), with batch invariance (``batch_bench.py``).
- ``serve``: the Triton server under perf_analyzer, fast and reasoning requests over a
  concurrency range, next to the in-process latency (``serve_bench.py``).
- ``attention``: one global ViT attention block three ways under ONNX Runtime
  (``attention_bench.py``).
- ``gemm``: one prefill-shaped decoder GEMM in ONNX Runtime (fp32, int4) and torch (fp32, bf16)
  (``gemm_bench.py``).

Prints a table; the last stdout line is one JSON object with machine, versions and config.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attention_bench  # beside this file
import batch_bench
import gemm_bench
import mllm_bench
import numpy as np
import serve_bench

from conceptseg.versions import package_versions


def machine() -> dict[str, Any]:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "gpu": None,
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    return package_versions(("torch", "onnxruntime", "transformers"))


def identity_runner(fn: Callable[[], Any]) -> Any:
    return fn()


def profiler_runner(fn: Callable[[], Any]) -> Any:
    """cProfile around one call; prints the top functions to stderr."""
    import cProfile
    import pstats
    import sys

    profile = cProfile.Profile()
    result = profile.runcall(fn)
    pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(15)
    return result


RUNNERS = {"identity": identity_runner, "profile": profiler_runner}


def timed(fn: Callable[[], Any], runner: Callable = identity_runner) -> tuple[float, Any]:
    start = time.perf_counter()  # CPU only here; on CUDA wrap with torch.cuda.synchronize()
    out = runner(fn)
    return (time.perf_counter() - start) * 1e3, out


def side_by_side(
    contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int, runner: Callable
) -> dict:
    """Run every contender once per repeat, in rotating order; return times (ms) and last outputs."""
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
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered),
        "p90_ms": ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))],
        "min_ms": ordered[0],
        "repeats": len(ordered),
    }


def max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(
        float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())
        for x, y in zip(a, b, strict=True)
    )


def bench_sam3(args: argparse.Namespace) -> dict[str, Any]:
    import gc

    import torch

    from conceptseg.backends.torch_ref import TorchSam3
    from conceptseg.models.sam3_inputs import preprocess
    from conceptseg.samples import sample_target

    torch.set_num_threads(args.threads)
    runner = RUNNERS[args.runner]
    ref = TorchSam3(Path(args.weights) / "sam3")
    engines = Path(args.engines)
    pixels = torch.from_numpy(preprocess(sample_target(), ref.side))
    rows: dict[str, Any] = {}
    steps = set(args.steps.split(","))

    def report(prefix: str) -> None:
        for key, row in rows.items():
            if key.startswith(prefix):
                print(f"{key}: {json.dumps(row)}", flush=True)

    if "vision" in steps:
        rows |= _bench_vision(args, ref, engines, pixels, runner)
        report("vision/")
        gc.collect()  # the vision sessions' arenas go before the heads are measured
    if "heads" in steps:
        rows |= _bench_heads(args, ref, engines, runner)
        report("heads/")
        gc.collect()
    if "text" in steps:
        rows |= _bench_text(args, ref, engines, runner)
        report("text/")
    return rows


def _bench_vision(
    args: argparse.Namespace, ref: Any, engines: Path, pixels: Any, runner: Callable
) -> dict:
    import torch

    from conceptseg.backends.ort import OrtGraph

    rows: dict[str, Any] = {}
    vision = {"ort_fp32": OrtGraph(engines, "sam3_vision", args.threads)}
    if args.int8:
        vision["ort_int8"] = OrtGraph(engines, "sam3_vision.int8", args.threads)

    def torch_vision() -> list[np.ndarray]:
        with torch.inference_mode():
            return [
                f.numpy()
                for f in ref.model.get_vision_features(pixel_values=pixels).fpn_hidden_states[:3]
            ]

    contenders: dict[str, Callable[[], Any]] = {"torch_eager_fp32": torch_vision}
    for name, graph in vision.items():
        contenders[name] = lambda g=graph: list(g.run(image=pixels.numpy()).values())
    result = side_by_side(contenders, args.repeats, args.warmup, runner)
    del vision
    base = result["outputs"]["torch_eager_fp32"]
    masks = _masks_from_fpn(args, ref, engines, result["outputs"])
    for name, times in result["times"].items():
        out = result["outputs"][name]
        rows[f"vision/{name}"] = summary(times) | {
            "max_abs_vs_torch": max_abs(out, base),
            "relative_l2_vs_torch": max(
                float(np.linalg.norm(o - b) / np.linalg.norm(b))
                for o, b in zip(out, base, strict=True)
            ),
            "mask_iou_vs_torch": masks[name],
        }
    return rows


def _heads_feeds(ref: Any) -> dict[str, np.ndarray]:
    """The heads graph's prompt inputs for a 40-slot prompt (8 concept + 32 text slots)."""
    from conceptseg.models.sam3_inputs import build_prompt

    feats, mask = ref.text_features("the mug with a handle")
    concept = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32) * 0.1
    prompt, prompt_mask = build_prompt(feats[0].numpy(), mask[0].numpy(), concept, 8)
    return {"prompt": prompt[None], "prompt_mask": prompt_mask[None],
            "boxes": np.zeros((1, 1, 4), np.float32), "box_labels": np.full((1, 1), -10, np.int64)}  # fmt: skip


def _masks_from_fpn(
    args: argparse.Namespace, ref: Any, engines: Path, fpns: dict[str, list[np.ndarray]]
) -> dict[str, float]:
    """Mask IoU vs torch when each contender's features go through the same heads graph: what a
    difference in the features does to the answer."""
    from conceptseg.backends.ort import OrtGraph
    from conceptseg.masks import iou

    heads, feeds = OrtGraph(engines, "sam3_heads", args.threads), _heads_feeds(ref)
    logits = {name: heads.run(fpn0=f[0], fpn1=f[1], fpn2=f[2], **feeds)["semantic_logits"][0, 0]
              for name, f in fpns.items()}  # fmt: skip
    base = logits["torch_eager_fp32"] > 0
    return {name: iou(v > 0, base) for name, v in logits.items()}


def _bench_heads(args: argparse.Namespace, ref: Any, engines: Path, runner: Callable) -> dict:
    """Heads on a 40-slot prompt (8 concept + 32 text), as in a reasoning request."""
    import torch

    from conceptseg.backends.ort import OrtGraph
    from conceptseg.masks import iou
    from conceptseg.samples import sample_target

    rows: dict[str, Any] = {}
    image = ref.encode_image(sample_target())
    heads = OrtGraph(engines, "sam3_heads", args.threads)
    fpn = [f.numpy() for f in image.vision.fpn_hidden_states[:3]]
    feeds = {"fpn0": fpn[0], "fpn1": fpn[1], "fpn2": fpn[2], **_heads_feeds(ref)}
    prompt, prompt_mask = feeds["prompt"][0], feeds["prompt_mask"][0]

    def torch_heads() -> np.ndarray:
        out = ref.heads(image, torch.from_numpy(prompt[None]), torch.from_numpy(prompt_mask[None]))
        return out.semantic_seg[0, 0].numpy()

    def ort_heads() -> np.ndarray:
        return heads.run(**feeds)["semantic_logits"][0, 0]

    result = side_by_side(
        {"torch_eager_fp32": torch_heads, "ort_fp32": ort_heads}, args.repeats, args.warmup, runner
    )
    base = result["outputs"]["torch_eager_fp32"]
    for name, times in result["times"].items():
        out = result["outputs"][name]
        rows[f"heads/{name}"] = summary(times) | {
            "max_abs_vs_torch": max_abs([out], [base]),
            "mask_iou_vs_torch": iou(out > 0, base > 0),
        }
    return rows


def _bench_text(args: argparse.Namespace, ref: Any, engines: Path, runner: Callable) -> dict:
    import torch

    from conceptseg.backends.ort import OrtGraph

    rows: dict[str, Any] = {}
    text = OrtGraph(engines, "sam3_text", args.threads)
    ids, ids_mask = ref.tokenize("the mug with a handle")

    def torch_text() -> np.ndarray:
        with torch.inference_mode():
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(ids_mask)
            return ref.model.get_text_features(
                input_ids=ids_t, attention_mask=mask_t
            ).pooler_output.numpy()

    result = side_by_side({"torch_eager_fp32": torch_text,
                           "ort_fp32": lambda: text.run(input_ids=ids, attention_mask=ids_mask)["text_features"]},
                          args.repeats, args.warmup, runner)  # fmt: skip
    for name, times in result["times"].items():
        rows[f"text/{name}"] = summary(times) | {
            "max_abs_vs_torch": max_abs(
                [result["outputs"][name]], [result["outputs"]["torch_eager_fp32"]]
            )
        }
    return rows


def print_table(rows: dict[str, Any]) -> None:
    print(
        f"{'step/contender':32} {'median ms':>11} {'p90 ms':>10} {'n':>3} {'max|d| vs torch':>16} {'speedup':>8}"
    )
    for key, row in rows.items():
        step = key.split("/")[0]
        base = rows.get(f"{step}/torch_eager_fp32", row)["median_ms"]
        print(f"{key:32} {row['median_ms']:11.1f} {row['p90_ms']:10.1f} {row['repeats']:3d} "
              f"{row.get('max_abs_vs_torch', 0):16.2e} {base / row['median_ms']:7.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "target", choices=["sam3", "mllm", "mllm-batch", "serve", "attention", "gemm"]
    )
    parser.add_argument("--weights", default="weights/real-3b")
    parser.add_argument("--engines", default="engines/real-3b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--int8", action="store_true", help="also time sam3_vision.int8.onnx")
    parser.add_argument(
        "--steps", default="vision,heads,text", help="comma list of vision,heads,text"
    )
    parser.add_argument("--runner", default="identity", choices=sorted(RUNNERS))
    mllm_bench.add_args(parser)
    serve_bench.add_args(parser)
    batch_bench.add_args(parser)
    attention_bench.add_args(parser)
    args = parser.parse_args()
    if args.target == "sam3":
        rows = bench_sam3(args)
        print_table(rows)
    elif args.target == "attention":
        rows = attention_bench.bench_attention(args, side_by_side, summary, RUNNERS[args.runner])
        for key, row in rows.items():
            print(
                f"{key:40} median {row['median_ms']:9.1f} ms  max|d| {row['max_abs_vs_decomposed']:.1e}"
            )
    elif args.target == "gemm":
        rows = gemm_bench.bench_gemm(args, side_by_side, summary, RUNNERS[args.runner])
        for key, row in rows.items():
            print(f"{key:24} median {row['median_ms']:8.1f} ms  {row['gflops']:7.0f} GFLOP/s  "
                  f"rel. L2 vs fp32 {row['relative_l2_vs_fp32']:.1e}")  # fmt: skip
    elif args.target == "mllm-batch":
        rows = batch_bench.bench_mllm_batch(args, summary)
        batch_bench.print_batch_table(rows)
    elif args.target == "serve":
        rows = serve_bench.bench_serve(args)
        serve_bench.print_serve_table(rows)
    else:
        rows = mllm_bench.bench_mllm(args, side_by_side, summary, RUNNERS[args.runner])
        mllm_bench.print_mllm_table(rows)
    record = {
        "target": args.target,
        "machine": machine(),
        "versions": versions(),
        "config": vars(args),
        "results": rows,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
