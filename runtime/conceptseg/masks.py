"""Mask post-processing shared by every backend: resize logits, threshold, encode. Pure numpy.

``resize_bilinear`` reproduces ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` (no antialiasing), which the reference applies to SAM 3's semantic logits
before thresholding at 0.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _axis_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and the weight of ``hi`` for each of ``dst`` output positions."""
    # float32 throughout, as torch's CPU kernel computes the source coordinates.
    scale = np.float32(src / dst)
    pos = np.maximum(
        (np.arange(dst, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0
    )
    lo = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    hi = np.minimum(lo + 1, src - 1)
    return lo, hi, (pos - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear(logits: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize (h, w) float logits to ``size_hw`` = (H, W) with half-pixel-centre bilinear weights."""
    assert logits.ndim == 2, f"expected (h, w) logits, got {logits.shape}"
    h, w = size_hw
    y_lo, y_hi, wy = _axis_weights(logits.shape[0], h)
    x_lo, x_hi, wx = _axis_weights(logits.shape[1], w)
    src = logits.astype(np.float32)
    cols = (
        src[:, x_lo] * (1 - wx)[None, :] + src[:, x_hi] * wx[None, :]
    )  # (h, W): x first, as torch
    return cols[y_lo] * (1 - wy)[:, None] + cols[y_hi] * wy[:, None]


def logits_to_mask(logits: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask: resized logits > 0."""
    return resize_bilinear(logits, size_hw) > 0


def to_png(mask: np.ndarray) -> bytes:
    """Single-channel PNG, 255 = foreground."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
