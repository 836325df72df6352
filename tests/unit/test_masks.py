"""Mask resize matches torch's bilinear interpolate. Run: .venv/bin/pytest tests/unit/test_masks.py -q"""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conceptseg.masks import iou, logits_to_mask, resize_bilinear, to_png


@pytest.mark.parametrize(
    "src, dst",
    [
        ((288, 288), (480, 640)),
        ((288, 288), (100, 37)),
        ((5, 7), (5, 7)),
        ((4, 4), (1, 1)),
        ((1, 3), (9, 2)),
    ],
)
def test_resize_matches_torch(src, dst):
    logits = np.random.default_rng(0).standard_normal(src).astype(np.float32)
    expected = F.interpolate(
        torch.from_numpy(logits)[None, None], size=dst, mode="bilinear", align_corners=False
    )
    # Same formula; float32 rounding order differs from torch's kernel by a few ulps.
    np.testing.assert_allclose(
        resize_bilinear(logits, dst), expected[0, 0].numpy(), rtol=0, atol=1e-4
    )


def test_threshold_and_png_round_trip():
    logits = np.array([[-1.0, 2.0], [0.0, 3.0]], np.float32)
    mask = logits_to_mask(logits, (2, 2))
    assert mask.tolist() == [[False, True], [False, True]]  # 0 is not foreground
    back = np.asarray(Image.open(io.BytesIO(to_png(mask)))) > 0
    assert (back == mask).all()


def test_iou():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert iou(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert iou(a, b) == pytest.approx(1 / 3)
