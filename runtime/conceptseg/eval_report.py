"""The ``conceptseg eval`` report: per-subset metric tables (the paper's Table 1 shape), router
acceptance and latency per route, the run's machine, versions, backend and weights hash, the
problems, and ``--compare`` (per-target IoU between two runs' saved masks). JSON + markdown.

Report keys: ``dataset layout metric_size machine versions backend weights tables router
latency_ms counts problems targets [compare]``. ``tables[subset]`` (and ``tables["all"]``, all
targets pooled) holds ``conceptseg.metrics.KEYS`` and ``n``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg import datasets, metrics
from conceptseg.datasets import DataError, Dataset, Problem, Target
from conceptseg.masks import iou
from conceptseg.weights import is_synthetic, safetensors_files, sha256_files

SYNTHETIC_NOTE = "synthetic (random) weights: the numbers exercise the tools, not the model"


def _digest(files: list[Path]) -> str | None:
    return sha256_files(files) if files else None


def weights_info(args: argparse.Namespace, versions: dict[str, Any]) -> dict[str, Any]:
    if args.url:  # the server's checkpoints: what its responses say
        return {"path": versions.get("weights"), "synthetic": versions.get("synthetic_weights")}
    weights = Path(args.weights)
    return {
        "path": str(weights),
        "synthetic": is_synthetic(weights),
        "sha256": {p: _digest(safetensors_files(weights / p)) for p in ("mllm", "sam3")},
    }


def machine() -> dict[str, Any]:
    info = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}
    torch = sys.modules.get("torch")  # only when this process ran the models
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def backend_info(args: argparse.Namespace) -> dict[str, Any]:
    if args.url:
        return {"url": args.url, "protocol": args.protocol, "concurrency": args.concurrency,
                "router": not args.no_router}  # fmt: skip
    keys = ("backend", "mllm_backend", "mllm_precision", "sam3_precision", "engines", "plans",
            "preset", "max_new_tokens")  # fmt: skip
    return {**{k: getattr(args, k) for k in keys}, "router": not args.no_router}


def router_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    fast = sum(r["route"] == "fast" for r in records)
    probed = sum(r.get("presence") is not None for r in records)
    return {
        "n": len(records),
        "fast": fast,
        "probed": probed,
        "acceptance": fast / len(records) if records else float("nan"),
    }


def latency_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for route in sorted({r["route"] for r in records}):
        ms = np.array([r["latency_ms"] for r in records if r["route"] == route], np.float64)
        out[route] = {
            "n": int(ms.size),
            "median": float(np.median(ms)),
            "p90": float(np.percentile(ms, 90)),
            "mean": float(ms.mean()),
        }
    return out


def build(
    args: argparse.Namespace,
    data: Dataset,
    targets: list[Target],
    records: list[dict[str, Any]],
    problems: list[Problem],
    side: int,
) -> dict[str, Any]:
    by_subset = {s: [r for r in records if r["subset"] == s] for s in dict.fromkeys(
        t.subset for t in targets)}  # fmt: skip
    versions: dict[str, Any] = next((r["versions"] for r in records if r.get("versions")), {})
    tables = {s: {**metrics.aggregate(rs), "n": len(rs)} for s, rs in by_subset.items()}
    tables["all"] = {**metrics.aggregate(records), "n": len(records)}
    return {
        "dataset": str(data.root),
        "layout": data.layout,
        "metric_size": side,
        "machine": machine(),
        "versions": {"numpy": np.__version__, **versions},
        "backend": backend_info(args),
        "weights": weights_info(args, versions),
        "tables": tables,
        "router": {s: router_stats(rs) for s, rs in {**by_subset, "all": records}.items()},
        "latency_ms": latency_stats(records),
        "counts": {
            "targets": len(targets),
            "scored": len(records),
            "resumed": sum(r["resumed"] for r in records),
            "problems": len(problems),
        },
        "problems": [{"file": p.file, "reason": p.reason} for p in problems],
        "targets": [{k: v for k, v in r.items() if k != "versions"} for r in records],
    }


def mask_paths(save: Path, target: Target) -> tuple[Path, Path]:
    """Where a run saves a target's mask and its record: ``SAVE/<subset>/<id>.png|.json``."""
    folder = save / datasets.safe_id(target.subset)
    return folder / f"{target.id}.png", folder / f"{target.id}.json"


def read_mask(path: Path) -> np.ndarray:
    return np.asarray(datasets.open_image(path, "L")) > 127


def compare(targets: list[Target], mine: Path, other: Path, worst: int = 10) -> dict[str, Any]:
    """IoU between this run's saved mask and ``other``'s for every target both runs saved."""
    rows, missing = [], 0
    for t in targets:
        a, b = mask_paths(mine, t)[0], mask_paths(other, t)[0]
        try:
            ma, mb = read_mask(a), read_mask(b)
        except DataError:
            missing += 1
            continue
        score = iou(ma, mb) if ma.shape == mb.shape else 0.0
        rows.append({"subset": t.subset, "id": t.id, "iou": score})
    ious = np.array([r["iou"] for r in rows], np.float64)
    return {
        "other": str(other),
        "n": len(rows),
        "missing": missing,
        "mean_iou": float(ious.mean()) if rows else float("nan"),
        "min_iou": float(ious.min()) if rows else float("nan"),
        "identical": int(sum(r["iou"] == 1.0 for r in rows)),
        "worst": sorted(rows, key=lambda r: float(r["iou"]))[:worst],
    }


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"  # NaN: no targets


def table_markdown(report: dict[str, Any]) -> str:
    head = ["subset", "n", *metrics.KEYS, "fast"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for subset, row in report["tables"].items():
        fast = report["router"][subset]["acceptance"]
        cells = [subset, str(row["n"]), *(_fmt(row[k]) for k in metrics.KEYS), _fmt(fast)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(report: dict[str, Any]) -> str:
    counts = report["counts"]
    size = report["metric_size"] or "native"
    parts = [
        f"### {report['dataset']} ({report['layout']}, scored at {size}; "
        f"{counts['scored']}/{counts['targets']} targets, {counts['resumed']} resumed, "
        f"{counts['problems']} problems)",
        table_markdown(report),
        "latency (ms): "
        + ", ".join(
            f"{route} n={s['n']} median {s['median']:.1f} p90 {s['p90']:.1f}"
            for route, s in report["latency_ms"].items()
        ),  # fmt: skip
    ]
    parts += [f"problem: {p['file']}: {p['reason']}" for p in report["problems"][:20]]
    if "compare" in report:
        c = report["compare"]
        parts.append(
            f"compare with {c['other']}: {c['n']} targets, mean IoU {_fmt(c['mean_iou'])}, "
            f"min {_fmt(c['min_iou'])}, identical {c['identical']}, missing {c['missing']}"
        )
        parts += [f"  {w['subset']}/{w['id']}: IoU {w['iou']:.4f}" for w in c["worst"]]
    if report["weights"].get("synthetic"):
        parts.append(f"NOTE: {SYNTHETIC_NOTE}")
    return "\n".join(parts)
