"""Request parts from files: images and ``--ref`` specs (what ``segment``, ``client`` and the
quantizer's calibration read). Mistakes raise :class:`UsageError` naming the argument."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from conceptseg.types import Reference, UsageError


def read_image(path: str, argument: str) -> Image.Image:
    """Open an image file fully (RGB), or raise UsageError naming ``argument``."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(argument, f"{path} does not exist or is not a file")
    try:
        with Image.open(file) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(
            argument, f"cannot read {path} as an image ({exc}); give a PNG or JPEG"
        ) from None
    if rgb.width == 0 or rgb.height == 0:
        raise UsageError(argument, f"{path} has zero size")
    return rgb


def parse_ref(spec: str, index: int) -> Reference:
    """``IMG:x1,y1,x2,y2`` (box in that image's pixels) or ``IMG:MASK`` (a mask image, nonzero = concept)."""
    argument = f"--ref #{index + 1}"
    image_path, sep, where = spec.rpartition(":")
    if not sep or not image_path:
        raise UsageError(argument, f"{spec!r} must be IMG:x1,y1,x2,y2 or IMG:MASK.png")
    image = read_image(image_path, argument)
    parts = where.split(",")
    if len(parts) == 4:
        try:
            box = tuple(float(p) for p in parts)
        except ValueError:
            raise UsageError(
                argument, f"box {where!r} must be four numbers x1,y1,x2,y2"
            ) from None
        return Reference(image=image, box=box)  # type: ignore[arg-type]
    if len(parts) > 1:
        raise UsageError(argument, f"box {where!r} must be four numbers x1,y1,x2,y2")
    mask = np.asarray(read_image(where, argument).convert("L")) > 0
    return Reference(image=image, mask=mask)
