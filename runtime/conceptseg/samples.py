"""A bundled sample request, drawn in code: a target scene and three references with boxes.

The scene is a table of mugs, balls and boxes; each reference shows one mug with its box. Drawn
deterministically so that ``make demo`` and the tests need no image files or downloads.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from conceptseg.types import Reference, Request

SAMPLE_PROMPT = "the mug with a handle on the table"


def _mug(
    draw: ImageDraw.ImageDraw, x: int, y: int, s: int, color: tuple[int, int, int]
) -> tuple[int, int, int, int]:
    """Draw a mug with its body's top-left at (x, y), size ``s``; return its xyxy box (handle included)."""
    draw.rectangle((x, y, x + s, y + int(1.2 * s)), fill=color, outline=(30, 30, 30), width=2)
    draw.arc(
        (x + s - s // 4, y + s // 4, x + s + s // 2, y + s),
        start=-90,
        end=90,
        fill=color,
        width=max(2, s // 8),
    )
    return (x, y, x + s + s // 2, y + int(1.2 * s))


def sample_target() -> Image.Image:
    image = Image.new("RGB", (640, 480), (222, 205, 170))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 300, 640, 480), fill=(150, 100, 60))  # table
    _mug(draw, 90, 200, 80, (200, 40, 40))
    _mug(draw, 400, 230, 60, (40, 90, 200))
    draw.ellipse((260, 250, 340, 330), fill=(240, 200, 40))  # ball
    draw.rectangle((520, 180, 610, 310), fill=(90, 160, 90))  # box
    return image


def sample_references() -> tuple[Reference, ...]:
    refs = []
    for i, (size, color) in enumerate(
        [
            ((320, 240), (230, 230, 230)),
            ((256, 256), (180, 210, 240)),
            ((300, 200), (240, 220, 200)),
        ]
    ):
        image = Image.new("RGB", size, color)
        box = _mug(
            ImageDraw.Draw(image),
            40 + 20 * i,
            40,
            70 + 10 * i,
            [(120, 60, 20), (20, 120, 60), (90, 20, 120)][i],
        )
        refs.append(Reference(image=image, box=tuple(float(v) for v in box)))  # type: ignore[arg-type]
    return tuple(refs)


def sample_request() -> Request:
    return Request(image=sample_target(), question=SAMPLE_PROMPT, references=sample_references())
