"""Parity of TensorRT plans with ONNX Runtime: what ``build-engines --verify`` runs per engine.

fp32 plans must match every element (``Limits.rtol/atol``). Reduced precision cannot: a deep
vision graph in fp16 has a few elements far off on random inputs while its masks are the same.
So every plan is judged on the statistics that matter, with stated thresholds (``LIMITS``): the
max and the p99.9 of |trt - ort| relative to the output's scale (max |ort|), and for mask
logits the IoU of the masks (logit > 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.backends.trt import TensorRTSession
from conceptseg.models.sam3_inputs import PAD_BOX_LABEL


@dataclass(frozen=True)
class Limits:
    """Pass thresholds of one precision; errors are relative to max |reference| of the output."""

    max_rel: float  # max |trt - ort| / max |ort|
    p999_rel: float  # 99.9th percentile of |trt - ort| / max |ort|
    mask_iou: float  # IoU of (logits > 0), for MASK_OUTPUTS
    elementwise: tuple[float, float] | None = None  # (rtol, atol) every element must meet


LIMITS = {
    "fp32": Limits(1e-3, 1e-4, 0.999, elementwise=(1e-3, 1e-4)),
    "fp16": Limits(5e-2, 1e-2, 0.98),
    "bf16": Limits(1e-1, 3e-2, 0.97),
    "fp8": Limits(2e-1, 6e-2, 0.95),
}
MASK_OUTPUTS = ("semantic_logits", "instance_masks")  # logits whose sign is the mask


def statistics(
    reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], limits: Limits
) -> dict[str, Any]:
    """Per output: max and p99.9 error relative to the output's scale, mask IoU (mask outputs),
    non-finite counts, and ``passed`` against ``limits``."""
    report: dict[str, Any] = {}
    for name, ref in reference.items():
        ref64, out64 = ref.astype(np.float64), actual[name].astype(np.float64)
        if ref64.shape != out64.shape:
            report[name] = {"passed": False, "error": f"shape {out64.shape} != {ref64.shape}"}
            continue
        scale = float(np.max(np.abs(ref64), initial=0.0)) or 1.0
        delta = np.abs(out64 - ref64) / scale
        finite = bool(np.isfinite(out64).all() == np.isfinite(ref64).all())
        delta = np.nan_to_num(delta, nan=np.inf)
        entry = {
            "scale": scale,
            "max_rel": float(delta.max(initial=0.0)),
            "p999_rel": float(np.quantile(delta, 0.999)) if delta.size else 0.0,
            "nonfinite": int((~np.isfinite(out64)).sum()),
        }
        passed = finite and entry["max_rel"] <= limits.max_rel and entry["p999_rel"] <= limits.p999_rel
        if name in MASK_OUTPUTS:
            a, b = ref64 > 0, out64 > 0
            union = np.logical_or(a, b).sum()
            entry["mask_iou"] = float(np.logical_and(a, b).sum() / union) if union else 1.0
            passed = passed and entry["mask_iou"] >= limits.mask_iou
        if limits.elementwise is not None:
            rtol, atol = limits.elementwise
            passed = passed and bool(np.isclose(out64, ref64, rtol=rtol, atol=atol, equal_nan=True).all())
        report[name] = {**entry, "passed": bool(passed)}
    return report


# How random verification inputs are made for inputs that are not plain float features.
FEED_RULES: dict[str, tuple[str, float]] = {
    "input_ids": ("randint", 1000),  # token ids below any CLIP vocabulary size
    "attention_mask": ("mask", 0),
    "prompt_mask": ("mask", 0),
    "key_mask": ("mask", 0),
    "boxes": ("fill", 0.0),  # the runtime's one padding box
    "box_labels": ("fill", PAD_BOX_LABEL),
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
    limits: Limits,
    *,
    sample: Path | None = None,
    session: Any = None,
) -> dict[str, Any]:
    """Run ``plan`` (or ``session``: anything with ``run(feeds, profile=)``) and ONNX Runtime
    (CPU) on ``onnx_path`` with the same inputs: the export's ``sample`` (``.npz``, when given),
    then random ones per ``(profile name or None, input shapes)`` case (seed = case index).
    The report is JSON-ready; ``passed`` is :func:`statistics` against ``limits`` everywhere."""

    import onnxruntime as ort  # lazy: `conceptseg --help` registers build-engines' flags

    session = session or TensorRTSession(plan)
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = [t["name"] for t in graph_manifest["outputs"]]
    inputs: list[tuple[str, str | None, dict[str, np.ndarray]]] = []
    if sample is not None:
        with np.load(sample) as data:
            inputs.append(("sample", None, {k: data[k] for k in data.files}))
    for seed, (profile, shapes) in enumerate(cases):
        inputs.append((f"random{seed}", profile, random_feeds(graph_manifest["inputs"], shapes, seed)))
    runs = []
    for kind, profile, feeds in inputs:
        expected = dict(zip(outputs, reference.run(outputs, feeds), strict=True))
        result = statistics(expected, session.run(feeds, profile=profile), limits)
        runs.append({"inputs": kind, "profile": profile,
                     "shapes": {n: list(a.shape) for n, a in feeds.items()},
                     "outputs": result, "passed": all(r["passed"] for r in result.values())})  # fmt: skip
    return {
        "reference": f"onnxruntime {ort.__version__} CPUExecutionProvider on {Path(onnx_path).name}",
        "limits": asdict(limits),
        "inputs": "the export's sample, then random_feeds(seed = case index)",
        "runs": runs,
        "passed": all(r["passed"] for r in runs),
    }
