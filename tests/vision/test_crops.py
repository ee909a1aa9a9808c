"""Region geometry for zooming: growing, clamping, refusing, enlarging within the pixel budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from vlreason.models.adapters import QWEN2_5_VL
from vlreason.vision.crops import CropError, crop_region, zoom_box, zoomed_size

WIDTH, HEIGHT = 1000, 500


def test_enlarged_crop_shows_the_same_content():
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    image.paste((0, 0, 0), (520, 150, 560, 200))  # a black rectangle inside the region below
    zoomed = crop_region(image, (500.0, 130.0, 580.0, 220.0), QWEN2_5_VL.resize_policy(3136, 12845056))
    assert zoomed.size == (308, 364)  # 4x of 80x90, snapped to multiples of 28
    assert zoomed.size == QWEN2_5_VL.resize_policy(3136, 12845056).target_size(zoomed.size)  # resampled once
    sx, sy = zoomed.width / 80, zoomed.height / 90
    pixels = np.asarray(zoomed)
    assert pixels[int(45 * sy), int(40 * sx)].tolist() == [0, 0, 0]  # the rectangle's centre
    assert pixels[int(5 * sy), int(5 * sx)].tolist() == [255, 255, 255]  # outside it
    assert pixels[int(85 * sy), int(75 * sx)].tolist() == [255, 255, 255]


def test_zoom_box_grows_tiny_boxes_around_their_centre():
    factor = 28  # at least 2 x 28 = 56 pixels a side
    assert zoom_box((100.0, 100.0, 101.0, 102.0), (WIDTH, HEIGHT), factor) == (72.0, 73.0, 129.0, 129.0)
    assert zoom_box((0.0, 0.0, 2.0, 2.0), (WIDTH, HEIGHT), factor) == (0.0, 0.0, 56.0, 56.0)  # pushed inside
    assert zoom_box((995.0, 495.0, 1000.0, 500.0), (WIDTH, HEIGHT), factor) == (944.0, 444.0, 1000.0, 500.0)
    assert zoom_box((1.0, 1.0, 2.0, 2.0), (40, 20), factor) == (0.0, 0.0, 40.0, 20.0)  # at most the image
    assert zoom_box((10.0, 20.0, 300.0, 400.0), (WIDTH, HEIGHT), factor) == (10.0, 20.0, 300.0, 400.0)


def test_zoom_box_clamps_and_widens_to_whole_pixels():
    assert zoom_box((-50.0, -10.0, 200.5, 600.0), (WIDTH, HEIGHT), 28) == (0.0, 0.0, 201.0, 500.0)
    assert zoom_box((10.2, 20.7, 99.9, 120.1), (WIDTH, HEIGHT), 28) == (10.0, 20.0, 100.0, 121.0)


@pytest.mark.parametrize(("box", "message"), [
    ((40.0, 10.0, 12.0, 50.0), "reversed or empty: x2 must be greater than x1"),
    ((10.0, 50.0, 40.0, 50.0), "reversed or empty: y2 must be greater than y1"),
    ((1000.0, 0.0, 1200.0, 100.0), "lies outside the image"),
    ((-30.0, 10.0, 0.0, 20.0), "lies outside the image"),
    ((10.0, math.nan, 40.0, 50.0), "NaN or infinite"),
    ((10.0, 10.0, math.inf, 50.0), "NaN or infinite"),
])
def test_zoom_box_refuses_impossible_boxes(box, message):
    with pytest.raises(CropError, match=message):
        zoom_box(box, (WIDTH, HEIGHT), 28)


def test_extreme_aspect_ratio_is_refused_after_growing():
    strip = (12000, 56)
    with pytest.raises(CropError, match="too thin"):
        zoom_box((0.0, 0.0, 12000.0, 1.0), strip, 28)  # grown to 12000 x 56: over 200 to 1
    assert zoom_box((0.0, 0.0, 11200.0, 1.0), strip, 28) == (0.0, 0.0, 11200.0, 56.0)  # exactly 200 to 1


def test_zoomed_size_uses_the_budget_within_four_times():
    policy = QWEN2_5_VL.resize_policy(3136, 12845056)
    assert zoomed_size((56, 56), policy) == (224, 224)  # capped at 4x
    tight = QWEN2_5_VL.resize_policy(3136, 200704)
    width, height = zoomed_size((500, 250), tight)  # 1.27x fills the budget
    assert (width, height) == (644, 308) and width * height <= 200704
    assert zoomed_size((1000, 500), QWEN2_5_VL.resize_policy(3136, 100352)) == (448, 224)  # over budget: shrunk


def test_thin_region_survives_a_tight_budget():
    """Rounding never makes a 200:1 region thinner, which the processor's size rule would refuse."""
    image = Image.new("RGB", (11200, 56))
    policy = QWEN2_5_VL.resize_policy(784, 100352)
    zoomed = crop_region(image, (0.0, 0.0, 11200.0, 56.0), policy)
    assert zoomed.size == (4396, 28)  # one merged patch high: the processor's floor for any side
