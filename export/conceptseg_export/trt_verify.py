"""Parity of TensorRT plans with ONNX Runtime: what ``build-engines --verify`` runs per engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.backends.trt import TensorRTSession

# How random verification inputs are made for inputs that are not plain float features.
FEED_RULES: dict[str, tuple[str, float]] = {
    "input_ids": ("randint", 1000),  # token ids below any CLIP vocabulary size
    "attention_mask": ("mask", 0),
    "prompt_mask": ("mask", 0),
    "key_mask": ("mask", 0),
    "boxes": ("fill", 0.0),  # the runtime's one padding box
    "box_labels": ("fill", -10),
}


def random_feeds(
    inputs: Sequence[Mapping[str, Any]], shapes: Mapping[str, Sequence[int]], seed: int
) -> dict[str, np.ndarray]:
    """Inputs ``[{name, dtype}]`` at ``shapes``: normal floats, masks (B, L) whose row b is valid
    on [0, n_b) with n_b >= 1, and the fixed values of ``FEED_RULES``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        name, shape, dtype = spec["name"], tuple(shapes[spec["name"]]), np.dtype(spec["dtype"])
        kind, value = FEED_RULES.get(name, ("normal" if dtype.kind == "f" else "fill", 0))
        if kind == "normal":
            array = rng.standard_normal(shape, dtype=np.float32)
        elif kind == "randint":
            array = rng.integers(0, int(value), shape)
        elif kind == "mask":
            array = np.arange(shape[-1]) < rng.integers(1, shape[-1] + 1, shape[:-1])[..., None]
        else:
            array = np.full(shape, value)
        feeds[name] = array.astype(dtype)
    return feeds


def compare(
    reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], rtol: float, atol: float
) -> dict[str, Any]:
    """Per output: max abs/rel error, and whether every element has |a - r| <= atol + rtol |r|."""
    report: dict[str, Any] = {}
    for name, ref in reference.items():
        ref64, out64 = ref.astype(np.float64), actual[name].astype(np.float64)
        if ref64.shape != out64.shape:
            report[name] = {"passed": False, "error": f"shape {out64.shape} != {ref64.shape}"}
            continue
        delta = np.abs(out64 - ref64)
        close = np.isclose(out64, ref64, rtol=rtol, atol=atol, equal_nan=True)
        report[name] = {
            "max_abs": float(np.nanmax(delta, initial=0.0)),
            "max_rel": float(np.nanmax(delta / (np.abs(ref64) + 1e-12), initial=0.0)),
            "mismatched_fraction": float(1.0 - close.mean()) if close.size else 0.0,
            "passed": bool(close.all()),
        }
    return report


def check_against_onnxruntime(
    plan: str | Path,
    onnx_path: str | Path,
    graph_manifest: Mapping[str, Any],
    cases: Sequence[tuple[str | None, Mapping[str, Sequence[int]]]],
    rtol: float,
    atol: float,
) -> dict[str, Any]:
    """Run ``plan`` and ONNX Runtime (CPU) on ``onnx_path`` with the same random inputs, once per
    ``(profile name or None, input shapes)`` case (seed = case index); the report is JSON-ready."""

    import onnxruntime as ort  # lazy: `conceptseg --help` registers build-engines' flags

    session = TensorRTSession(plan)
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = [t["name"] for t in graph_manifest["outputs"]]
    runs = []
    for seed, (profile, shapes) in enumerate(cases):
        feeds = random_feeds(graph_manifest["inputs"], shapes, seed)
        expected = dict(zip(outputs, reference.run(outputs, feeds), strict=True))
        result = compare(expected, session.run(feeds, profile=profile), rtol, atol)
        passed = all(r["passed"] for r in result.values())
        runs.append(
            {
                "profile": profile,
                "shapes": {n: list(s) for n, s in shapes.items()},
                "outputs": result,
                "passed": passed,
            }
        )
    return {
        "reference": f"onnxruntime {ort.__version__} CPUExecutionProvider on {Path(onnx_path).name}",
        "rtol": rtol,
        "atol": atol,
        "inputs": "random_feeds(seed = case index), conceptseg.backends.trt",
        "runs": runs,
        "passed": all(r["passed"] for r in runs),
    }
