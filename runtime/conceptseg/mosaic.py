"""Reference mosaic: 1-4 references -> one 600x600 image + boxes (METHOD.md section 3).

Geometry contract:
- input boxes are xyxy in the reference image's own pixels; masks are boolean ``(H, W)`` arrays
  of the reference's size;
- output boxes are integer xyxy in canvas pixels, max inclusive (the reference derives them from
  mask pixels: min and max of the foreground), in tile order;
- tile ``i`` of a 2x2 grid sits at row ``i // 2``, column ``i % 2``; tile 0's box is withheld
  (the proxy the model answers in ``<check>``), tiles 1-3 are drawn in red and listed in the prompt;
- one reference fills the whole canvas and nothing is drawn.

``to_canvas`` / ``from_canvas`` map boxes between an image and a square frame (tile or canvas),
``from_canvas`` being the inverse used for the model's ``<bbox>`` answers on the 600x600 target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from conceptseg.types import Box, Reference, RequestError

CANVAS = 600  # MLLM input side; Qwen's processor sees it as 588x588 (42x42 patches)
GRID = 2
TILE = CANVAS // GRID
MAX_REFERENCES = GRID * GRID
BOX_COLOR = "red"
BOX_WIDTH = 2


@dataclass(frozen=True)
class Mosaic:
    """The references as the MLLM sees them.

    ``image``: RGB ``CANVAS x CANVAS``. ``boxes``: integer xyxy canvas pixels, one per reference in
    tile order. ``proxy_box``: tile 0's box, withheld from the prompt; ``None`` for one reference.
    """

    image: Image.Image
    boxes: tuple[tuple[int, int, int, int], ...]
    proxy_box: tuple[int, int, int, int] | None


def to_canvas(box: Box, size: tuple[int, int], side: int) -> Box:
    """Scale an xyxy box from an image of ``size`` (W, H) to a ``side x side`` frame (floats)."""
    w, h = size
    x1, y1, x2, y2 = box
    return (x1 * side / w, y1 * side / h, x2 * side / w, y2 * side / h)


def from_canvas(box: Box, size: tuple[int, int], side: int = CANVAS) -> Box:
    """Inverse of :func:`to_canvas`: a box in a ``side x side`` frame -> pixels of ``size`` (W, H)."""
    w, h = size
    x1, y1, x2, y2 = box
    return (x1 * w / side, y1 * h / side, x2 * w / side, y2 * h / side)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Integer xyxy of the nonzero pixels, max inclusive; ``None`` for an empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _box_in_frame(ref: Reference, side: int) -> tuple[int, int, int, int]:
    """The reference's concept box in a ``side x side`` resize of its image."""
    if ref.mask is not None:
        # As the reference: resize the mask like the image (bilinear) and take its nonzero extent.
        small = Image.fromarray(ref.mask.astype(np.uint8) * 255).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        box = mask_box(np.asarray(small))
        assert box is not None, "validate_reference rejects empty masks"
        return box
    assert ref.box is not None
    x1, y1, x2, y2 = to_canvas(ref.box, ref.image.size, side)
    lo, hi = 0, side - 1
    return (
        min(max(math.floor(x1), lo), hi),
        min(max(math.floor(y1), lo), hi),
        min(max(math.ceil(x2) - 1, lo), hi),
        min(max(math.ceil(y2) - 1, lo), hi),
    )


def validate_reference(ref: Reference, index: int) -> None:
    """Raise :class:`RequestError` naming ``references[index]`` if the reference is unusable."""
    name = f"references[{index}]"
    w, h = ref.image.size
    if w == 0 or h == 0:
        raise RequestError(name, f"image has zero size {w}x{h}; give a non-empty image")
    if (ref.box is None) == (ref.mask is None):
        raise RequestError(name, "give exactly one of a box (x1,y1,x2,y2) or a mask")
    if ref.mask is not None:
        if ref.mask.shape != (h, w):
            raise RequestError(name, f"mask shape {ref.mask.shape} != image (H, W) {(h, w)}")
        if not ref.mask.any():
            raise RequestError(name, "mask is empty; mark the concept with at least one pixel")
        return
    assert ref.box is not None
    if len(ref.box) != 4 or not all(math.isfinite(float(v)) for v in ref.box):
        raise RequestError(name, f"box {ref.box} must be 4 finite numbers x1,y1,x2,y2")
    x1, y1, x2, y2 = (float(v) for v in ref.box)
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise RequestError(
            name,
            f"box {list(ref.box)} must satisfy 0 <= x1 < x2 <= {w} and 0 <= y1 < y2 <= {h} "
            "(xyxy pixels of that reference image)",
        )


def _as_reference(item: Reference | tuple) -> Reference:
    if isinstance(item, Reference):
        return item
    image, where = item
    if isinstance(where, np.ndarray) and where.dtype == bool:
        return Reference(image=image, mask=where)
    return Reference(image=image, box=tuple(float(v) for v in where))  # type: ignore[arg-type]


def build_mosaic(references: Sequence[Reference | tuple]) -> Mosaic:
    """Build the reference canvas from 1-4 ``(PIL image, box or bool mask)`` pairs or References."""
    if not 1 <= len(references) <= MAX_REFERENCES:
        raise RequestError(
            "references",
            f"got {len(references)}; give 1 to {MAX_REFERENCES} references "
            "(or none at all, which skips the mosaic)",
        )
    refs = [_as_reference(item) for item in references]
    for i, ref in enumerate(refs):
        validate_reference(ref, i)
    if len(refs) == 1:
        # One reference fills the canvas (torchvision's bilinear resize in the reference code).
        image = refs[0].image.convert("RGB").resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
        return Mosaic(image=image, boxes=(_box_in_frame(refs[0], CANVAS),), proxy_box=None)
    canvas = Image.new("RGB", (CANVAS, CANVAS))
    boxes = []
    for i, ref in enumerate(refs):
        dx, dy = (i % GRID) * TILE, (i // GRID) * TILE
        canvas.paste(ref.image.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR), (dx, dy))
        x1, y1, x2, y2 = _box_in_frame(ref, TILE)
        boxes.append((x1 + dx, y1 + dy, x2 + dx, y2 + dy))
    draw = ImageDraw.Draw(canvas)
    for box in boxes[1:]:
        draw.rectangle(box, outline=BOX_COLOR, width=BOX_WIDTH)
    return Mosaic(image=canvas, boxes=tuple(boxes), proxy_box=boxes[0])


def resize_target(image: Image.Image) -> Image.Image:
    """The target as the MLLM sees it: RGB, 600x600, PIL's default (bicubic) resampling."""
    return image.convert("RGB").resize((CANVAS, CANVAS))
