"""Reference mosaic geometry. Run: .venv/bin/pytest tests/unit/test_mosaic.py -q"""

import numpy as np
import pytest
from PIL import Image

from conceptseg.mosaic import CANVAS, TILE, build_mosaic, from_canvas, mask_box, to_canvas
from conceptseg.types import RequestError


def _solid(color, size=(200, 100)):
    return Image.new("RGB", size, color)


def _is_red(pixel):
    r, g, b = pixel
    return r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tiles_boxes_and_drawing(n):
    colors = [(0, 0, 255), (0, 255, 0), (255, 255, 0), (0, 255, 255)][:n]
    refs = [(_solid(c), (50, 25, 150, 75)) for c in colors]  # the middle half of a 200x100 image
    mosaic = build_mosaic(refs)
    assert mosaic.image.size == (CANVAS, CANVAS) and mosaic.image.mode == "RGB"
    expected = [
        (75 + (i % 2) * TILE, 75 + (i // 2) * TILE, 224 + (i % 2) * TILE, 224 + (i // 2) * TILE)
        for i in range(n)
    ]
    assert list(mosaic.boxes) == expected
    assert mosaic.proxy_box == expected[0]
    img = mosaic.image
    # Tile 0's box is withheld: not drawn; boxes of tiles 1.. are red outlines of width 2.
    assert not _is_red(img.getpixel((expected[0][0], 150)))
    for x1, y1, x2, y2 in expected[1:]:
        assert _is_red(img.getpixel((x1, (y1 + y2) // 2))) and _is_red(
            img.getpixel((x1 + 1, y1 + 40))
        )
        assert not _is_red(img.getpixel((x1 + 3, y1 + 40)))
        assert _is_red(img.getpixel(((x1 + x2) // 2, y2)))
    # Tile colours at their centres, empty tiles black.
    for i in range(4):
        centre = img.getpixel(((i % 2) * TILE + 150, (i // 2) * TILE + 150))
        assert centre == (colors[i] if i < n else (0, 0, 0)), f"tile {i}"


def test_one_reference_fills_canvas_and_draws_nothing():
    mosaic = build_mosaic([(_solid((0, 0, 255)), (0, 0, 200, 100))])
    assert mosaic.proxy_box is None
    assert mosaic.boxes == ((0, 0, CANVAS - 1, CANVAS - 1),)
    colors = {c for _, c in mosaic.image.getcolors(maxcolors=1 << 20)}
    assert colors == {(0, 0, 255)}


def test_mask_reference_uses_resized_mask_extent():
    mask = np.zeros((100, 200), bool)
    mask[20:40, 100:150] = True
    mosaic = build_mosaic([(_solid((9, 9, 9)), mask), (_solid((9, 9, 9)), mask)])
    x1, y1, x2, y2 = mosaic.boxes[0]
    # 200x100 -> 300x300 scales x by 1.5 and y by 3; bilinear spreads the edge by about a pixel.
    assert abs(x1 - 150) <= 1 and abs(x2 - 224) <= 1 and abs(y1 - 60) <= 1 and abs(y2 - 119) <= 1
    assert mosaic.boxes[1] == (x1 + TILE, y1, x2 + TILE, y2)


def test_mask_box():
    m = np.zeros((5, 6), bool)
    assert mask_box(m) is None
    m[1, 2] = m[3, 4] = True
    assert mask_box(m) == (2, 1, 4, 3)


def test_edge_boxes_clip_into_tile():
    mosaic = build_mosaic([(_solid((1, 1, 1), (10, 10)), (0, 0, 10, 10))] * 2)
    assert mosaic.boxes == ((0, 0, 299, 299), (300, 0, 599, 299))


def test_box_transforms_are_inverse():
    box = (12.5, 7.0, 333.0, 250.0)
    back = from_canvas(to_canvas(box, (640, 480), CANVAS), (640, 480))
    assert np.allclose(back, box)
    assert from_canvas((0, 0, 600, 600), (1280, 720)) == (0, 0, 1280, 720)


@pytest.mark.parametrize(
    "refs, match",
    [
        ([], "give 1 to 4 references"),
        ([(_solid((0, 0, 0)), (0, 0, 5, 5))] * 5, "got 5; give 1 to 4"),
        ([(_solid((0, 0, 0)), (0, 0, float("nan"), 5))], r"references\[0\]: box .* finite"),
        ([(_solid((0, 0, 0)), (0, 0, 500, 5))], r"references\[0\]: box .* x2 <= 200"),
        ([(_solid((0, 0, 0)), (10, 0, 5, 5))], "x1 < x2"),
        ([(_solid((0, 0, 0)), np.zeros((100, 200), bool))], "mask is empty"),
        ([(_solid((0, 0, 0)), np.ones((5, 5), bool))], "mask shape"),
        ([(_solid((0, 0, 0), (0, 0)), (0, 0, 1, 1))], "zero size"),
    ],
)
def test_bad_references(refs, match):
    with pytest.raises(RequestError, match=match):
        build_mosaic(refs)
