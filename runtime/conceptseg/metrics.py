"""Segmentation quality as the ConceptSeg-R1 paper computes it. numpy, plus scipy's exact
Euclidean distance transform for the weighted F-measure.

Inputs are binary masks: 2-D arrays, bool or any integer/float type where nonzero = foreground
(the paper scores hard {0, 1} masks: the logits thresholded at 0). Prediction and ground truth
must have the same (H, W). Every metric is a per-image score averaged over images, except cIoU
(pooled over the dataset).

Definitions (toolkit ``Xiaoqi-Zhao-DLUT/PySegMetric_EvalToolkit`` ``utils/metrics.py``, which the
reference's ``evaluate_conceptseg.py`` imports; gIoU/cIoU as ReasonSeg/LISA's evaluation):
- mIoU: mean over images of (IoU_fg + IoU_bg) / 2, IoU = (|P & G| + 1e-5) / (|P | G| + 1e-5), the
  background IoU on the complements; an empty union counts 1.
- gIoU: mean over images of |P & G| / (|P | G| + 1e-5), an empty union counting 1.
  cIoU: sum of intersections / (sum of unions + 1e-8). Pixels marked ``ignore`` (ReasonSeg's 255
  regions) count for neither; no other metric takes an ignore mask.
- wF: weighted F-measure (Margolin et al.), beta = 1, eps 1e-6, 7x7 Gaussian sigma 5 with zero
  padding; an empty ground truth scores 0 whatever the prediction.
- Sm: S-measure (Fan et al.), alpha = 0.5, population variances and standard deviations (ddof=0)
  and the covariance over N - 1, eps 1e-8; empty GT: 1 - mean(P), full GT: mean(P).
- MAE: mean |P - G|.  BER: 1 - (TP / (Np + 1e-8) + TN / (Nn + 1e-8)) / 2 (a fraction: an empty
  GT scores at least 0.5).  mDice: (2 |P & G| + 1e-5) / (|P| + |G| + 1e-5), both empty -> 1.

Differences from ``pysodmetrics`` (pinned in tests/unit/test_metrics.py): IoU and Dice of empty
masks (1 here, 0 there), S-measure variances (ddof 0 here, 1 there), wF's eps (1e-6 here,
2.2e-16 there). Where the toolkit and pysodmetrics both give NaN (an S-measure quadrant of zero
area, e.g. any 1xN image with foreground; or of one pixel), the quadrant here has weight 0 and a
one-pixel quadrant has covariance 0, so every score is finite.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

SMOOTH = 1e-5  # IoU and Dice smoothing (toolkit)
KEYS = ("mIoU", "gIoU", "cIoU", "wF", "Sm", "MAE", "BER", "mDice")
PER_IMAGE = ("mIoU", "gIoU", "wF", "Sm", "MAE", "BER", "mDice")


def as_mask(array: Any, name: str = "mask") -> np.ndarray:
    """A boolean (H, W) copy: nonzero = foreground."""
    a = np.asarray(array)
    assert a.ndim == 2, f"{name}: expected a 2-D (H, W) mask, got shape {a.shape}"
    return a.astype(bool) if a.dtype != bool else a


def iou_fg(p: np.ndarray, g: np.ndarray) -> float:
    return float((np.sum(p & g) + SMOOTH) / (np.sum(p | g) + SMOOTH))


def iou_bg(p: np.ndarray, g: np.ndarray) -> float:
    return iou_fg(~p, ~g)


def intersection_union(
    p: np.ndarray, g: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[int, int]:
    """Foreground |P & G| and |P | G| over the pixels not ignored (LISA's ``ignore_index=255``)."""
    if ignore is not None:
        keep = ~ignore
        p, g = p & keep, g & keep
    return int(np.sum(p & g)), int(np.sum(p | g))


def giou(intersection: int, union: int) -> float:
    """LISA's per-image IoU: I / (U + 1e-5), and 1 when the union is empty."""
    return 1.0 if union == 0 else intersection / (union + SMOOTH)


def dice(p: np.ndarray, g: np.ndarray) -> float:
    return float((2.0 * np.sum(p & g) + SMOOTH) / (np.sum(g) + np.sum(p) + SMOOTH))


def mae(p: np.ndarray, g: np.ndarray) -> float:
    return float(np.mean(p != g))


def ber(p: np.ndarray, g: np.ndarray) -> float:
    tp, tn = np.sum(p & g), np.sum(~p & ~g)
    n_pos, n_neg = np.sum(g), np.sum(~g)
    return float(1 - (tp / (n_pos + 1e-8) + tn / (n_neg + 1e-8)) / 2)


def _s_object(values: np.ndarray) -> float:
    mean = np.mean(values)
    return float(2 * mean / (mean**2 + 1 + np.std(values) + 1e-8))


def _ssim(p: np.ndarray, g: np.ndarray) -> float:
    """The S-measure's region similarity; the quadrant is non-empty."""
    n = p.size
    x, y = np.mean(p), np.mean(g)
    sigma_xy = np.sum((p - x) * (g - y)) / (n - 1) if n > 1 else 0.0
    alpha = 4 * x * y * sigma_xy
    beta = (x * x + y * y) * (np.var(p) + np.var(g))
    if alpha != 0:
        return float(alpha / (beta + 1e-8))
    return 1.0 if beta == 0 else 0.0


def _region(p: np.ndarray, g: np.ndarray) -> float:
    h, w = g.shape
    ys, xs = np.nonzero(g)
    # centroid, rounded half to even, + 1 (the MATLAB original's 1-based split point)
    cy, cx = int(round(float(ys.mean()))) + 1, int(round(float(xs.mean()))) + 1
    score = 0.0
    for rows in (slice(0, cy), slice(cy, h)):
        for cols in (slice(0, cx), slice(cx, w)):
            gq = g[rows, cols]
            if gq.size:  # a zero-area quadrant has weight 0 (the toolkit gives NaN)
                score += gq.size / (h * w) * _ssim(p[rows, cols], gq.astype(np.float64))
    return score


def s_measure(p: np.ndarray, g: np.ndarray, alpha: float = 0.5) -> float:
    pf = p.astype(np.float64)
    u = float(np.mean(g))
    if u == 0:
        return float(1 - np.mean(pf))
    if u == 1:
        return float(np.mean(pf))
    obj = u * _s_object(pf[g]) + (1 - u) * _s_object(1 - pf[~g])
    return alpha * obj + (1 - alpha) * _region(pf, g)


def _gauss7() -> np.ndarray:
    """MATLAB ``fspecial('gaussian', 7, 5)``."""
    y, x = np.ogrid[-3:4, -3:4]
    k = np.exp(-(x * x + y * y) / (2.0 * 5 * 5))
    k[k < np.finfo(k.dtype).eps * k.max()] = 0
    return k / k.sum()


def weighted_f(p: np.ndarray, g: np.ndarray, beta: float = 1.0) -> float:
    if not g.any():
        return 0.0
    from scipy.ndimage import convolve, distance_transform_edt  # compiled EDT, exact ties

    pf, gf = p.astype(np.float64), g.astype(np.float64)
    dist, idx = distance_transform_edt(~g, return_indices=True)  # nearest foreground pixel
    err = np.abs(pf - gf)
    # background pixels take the error of their nearest foreground pixel (edge dependency)
    err_t = err[idx[0], idx[1]]
    err_a = convolve(err_t, weights=_gauss7(), mode="constant", cval=0)
    min_e = np.where(g & (err_a < err), err_a, err)
    weight = np.where(g, 1.0, 2 - np.exp(np.log(0.5) / 5 * dist))  # pixel importance
    ew = min_e * weight
    tp_w = np.sum(gf) - np.sum(ew[g])
    fp_w = np.sum(ew[~g])
    recall = 1 - np.mean(ew[g])
    precision = tp_w / (1e-6 + tp_w + fp_w)
    return float((1 + beta) * recall * precision / (1e-6 + recall + beta * precision))


def per_image(
    prediction: Any, ground_truth: Any, ignore: Any | None = None
) -> dict[str, float | int]:
    """Every per-image score of one pair, and ``I``/``U`` (foreground, ignore excluded) for cIoU."""
    p, g = as_mask(prediction, "prediction"), as_mask(ground_truth, "ground_truth")
    assert p.shape == g.shape, f"prediction {p.shape} and ground truth {g.shape} differ in size"
    ign = None if ignore is None else as_mask(ignore, "ignore")
    inter, union = intersection_union(p, g, ign)
    return {
        "mIoU": (iou_fg(p, g) + iou_bg(p, g)) / 2,
        "gIoU": giou(inter, union),
        "wF": weighted_f(p, g),
        "Sm": s_measure(p, g),
        "MAE": mae(p, g),
        "BER": ber(p, g),
        "mDice": dice(p, g),
        "I": inter,
        "U": union,
    }


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Dataset scores from :func:`per_image` records (NaN for every key when there are none)."""
    if not records:
        return {k: float("nan") for k in KEYS}
    out = {k: float(np.mean([r[k] for r in records])) for k in PER_IMAGE}
    out["cIoU"] = sum(r["I"] for r in records) / (sum(r["U"] for r in records) + 1e-8)
    return {k: out[k] for k in KEYS}


def evaluate(pairs: Iterable[tuple[Any, ...]]) -> dict[str, float]:
    """``pairs``: ``(prediction, ground_truth)`` or ``(prediction, ground_truth, ignore)`` 2-D
    masks (nonzero = foreground). Returns ``mIoU gIoU cIoU wF Sm MAE BER mDice`` as floats."""
    return aggregate([per_image(*pair) for pair in pairs])
