"""Box geometry: IoU, validity messages, clamping and rescaling (hand-computed numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlreason.vision.boxes import box_area, box_iou, box_problem, clamp_box, iou_matrix, rescale_box


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # 10x10 boxes shifted by 5 in x: intersection 5x10 = 50, union 100 + 100 - 50 = 150.
        pytest.param((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150, id="partial-overlap-x"),
        # shifted by 5 in x and y: intersection 5x5 = 25, union 200 - 25 = 175.
        pytest.param((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175, id="partial-overlap-diagonal"),
        # 4x4 box inside a 10x10 box: 16 / 100.
        pytest.param((0, 0, 10, 10), (2, 3, 6, 7), 16 / 100, id="containment"),
        pytest.param((2, 3, 6, 7), (0, 0, 10, 10), 16 / 100, id="containment-swapped"),
        pytest.param((0, 0, 10, 10), (20, 20, 30, 30), 0.0, id="disjoint"),
        pytest.param((0, 0, 10, 10), (10, 0, 20, 10), 0.0, id="touching-edge"),
        pytest.param((0, 0, 10, 10), (10, 10, 20, 20), 0.0, id="touching-corner"),
        pytest.param((1.5, 2.5, 7.5, 9.5), (1.5, 2.5, 7.5, 9.5), 1.0, id="identical"),
        # 2x4 = 8 and 4x2 = 8 crossing in a 2x2 square: 4 / (8 + 8 - 4) = 1/3.
        pytest.param((1, 0, 3, 4), (0, 1, 4, 3), 4 / 12, id="cross"),
    ],
)
def test_box_iou_hand_computed(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_box_iou_of_empty_boxes_is_zero():
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert box_iou((5, 5, 1, 1), (0, 0, 10, 10)) == 0.0  # reversed box has zero area


def test_box_area():
    assert box_area((1, 2, 4, 7)) == 15.0
    assert box_area((4, 2, 1, 7)) == 0.0


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 100, size=(n, 2))
    wh = rng.uniform(0.5, 40, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def test_iou_matrix_equals_pairwise_box_iou():
    rng = np.random.default_rng(7)
    a, b = random_boxes(rng, 23), random_boxes(rng, 17)
    matrix = iou_matrix(a, b)
    assert matrix.shape == (23, 17)
    expected = np.array([[box_iou(tuple(x), tuple(y)) for y in b] for x in a])
    np.testing.assert_allclose(matrix, expected, rtol=1e-12, atol=1e-12)
    assert 0 < (matrix > 0).sum() < matrix.size  # the sample covers overlapping and disjoint pairs


def test_iou_matrix_hand_computed_and_empty():
    matrix = iou_matrix(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [0, 0, 10, 10], [10, 0, 20, 10]]))
    np.testing.assert_allclose(matrix, [[1 / 3, 1.0, 0.0]])
    assert iou_matrix(np.zeros((0, 4)), np.array([[0, 0, 1, 1]])).shape == (0, 1)


@pytest.mark.parametrize(
    ("box", "size", "expected"),
    [
        ([0, 0, 10, 10], None, None),
        ([0, 0, 64, 48], (64, 48), None),  # touching the image border is inside
        ([0.5, 1.5, 2.5, 3.5], (4, 4), None),
        ([20, 0, 10, 10], None, "x2 (10) <= x1 (20)"),
        ([0, 30, 10, 5], None, "y2 (5) <= y1 (30)"),
        ([5, 0, 5, 10], None, "x2 (5) <= x1 (5)"),
        ([0, 0, 10, math.nan], None, "holds a NaN or infinite value"),
        ([0, 0, math.inf, 10], None, "holds a NaN or infinite value"),
        ([0, 0, 65, 10], (64, 48), "lies outside the 64x48 image"),
        ([-1, 0, 10, 10], (64, 48), "lies outside the 64x48 image"),
        ([0, 0, 10, 49], (64, 48), "lies outside the 64x48 image"),
        ([0, 0, 10], None, "has 3 numbers, expected 4"),
        ([0, 0, 10, 10, 3], None, "has 5 numbers, expected 4"),
        ([0, "0", 10, 10], None, "holds a value that is not a number"),
        ([0, None, 10, 10], None, "holds a value that is not a number"),
        ([False, 0, True, 10], None, "holds a value that is not a number"),
    ],
)
def test_box_problem_messages(box, size, expected):
    assert box_problem(box, size) == expected


def test_box_problem_accepts_numpy_numbers():
    """A box from a numpy array is a valid box of numbers (np.float64 already works; np.int64 must too)."""
    assert box_problem(np.array([1.0, 2.0, 3.0, 4.0])) is None
    assert box_problem(np.array([1, 2, 3, 4])) is None


def test_clamp_box():
    assert clamp_box((-5, 10, 70, 60), (64, 48)) == (0.0, 10.0, 64.0, 48.0)
    assert clamp_box((1, 2, 3, 4), (64, 48)) == (1.0, 2.0, 3.0, 4.0)
    assert clamp_box((-10, -10, -1, -1), (64, 48)) == (0.0, 0.0, 0.0, 0.0)


def test_rescale_box_hand_computed_and_round_trip():
    # 640x480 -> 320x240 halves every coordinate; 640x480 -> 1280x240 doubles x and halves y.
    assert rescale_box((10, 20, 30, 40), (640, 480), (320, 240)) == pytest.approx((5, 10, 15, 20))
    assert rescale_box((10, 20, 30, 40), (640, 480), (1280, 240)) == pytest.approx((20, 10, 60, 20))
    rng = np.random.default_rng(3)
    for box in random_boxes(rng, 20):
        there = rescale_box(tuple(box), (333, 517), (448, 644))
        assert rescale_box(there, (448, 644), (333, 517)) == pytest.approx(tuple(box))
