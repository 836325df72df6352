"""models.qwen.mrope_positions: Qwen2.5-VL's 3D positions for text and image placeholders."""

import numpy as np
import pytest

from conceptseg.models.qwen import IMAGE_PAD_ID, mrope_positions

P = IMAGE_PAD_ID


def test_text_only_counts_on_all_three_axes():
    out = mrope_positions(np.array([5, 6, 7]), None)
    np.testing.assert_array_equal(out, np.tile(np.arange(3), (3, 1)))


def test_image_rows_and_columns_then_text_after_its_largest_position():
    # 2 text tokens, a 1x4x6 patch grid (2x3 after the 2x2 merge: 6 tokens), 2 text tokens
    ids = np.array([1, 2] + [P] * 6 + [3, 4])
    out = mrope_positions(ids, np.array([[1, 4, 6]]))
    np.testing.assert_array_equal(out[:, :2], [[0, 1]] * 3)
    np.testing.assert_array_equal(out[0, 2:8], [2] * 6)  # time: the start for an image
    np.testing.assert_array_equal(out[1, 2:8], [2, 2, 2, 3, 3, 3])  # rows
    np.testing.assert_array_equal(out[2, 2:8], [2, 3, 4, 2, 3, 4])  # columns
    np.testing.assert_array_equal(out[:, 8:], [[5, 6]] * 3)  # max (4) + 1 onwards


def test_two_images_back_to_back():
    ids = np.array([P] * 4 + [P] * 4 + [9])
    out = mrope_positions(ids, np.array([[1, 4, 4], [1, 4, 4]]))
    np.testing.assert_array_equal(out[:, 4:8], [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]])
    np.testing.assert_array_equal(out[:, 8], [4, 4, 4])


@pytest.mark.parametrize("grid", [[[1, 4, 4]], [[1, 4, 4], [1, 2, 2]], []])
def test_placeholder_count_must_match_the_grids(grid):
    ids = np.array([1] + [P] * 3 + [2])  # 3 placeholders: no grid list asks for exactly 3
    with pytest.raises(ValueError, match="image tokens"):
        mrope_positions(ids, np.array(grid, dtype=np.int64).reshape(-1, 3))
