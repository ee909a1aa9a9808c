"""The crop tool: the model's box convention mapped to original pixels, the region cut from the
original image, grown when tiny, enlarged within the pixel budget, bad boxes refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlreason.models.adapters import QWEN2_5_VL, QWEN2_VL, QWEN3_VL
from vlreason.tools import ToolContext, ToolError, get_tool
from vlreason.vision.images import ImageInfo, ResizePolicy

WIDTH, HEIGHT = 1000, 500
# a noise image: every region differs, so a shifted or rescaled crop cannot pass for the right one
ORIGINAL = Image.fromarray(np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))

# (adapter, model input size of the 1000x500 image, region in original pixels, the same region as the model writes it)
FAMILIES = [
    # Qwen2-VL: 0..1000 relative to the image, so x stays and y doubles
    (QWEN2_VL, (1008, 504), (504, 140, 728, 252), [504, 280, 728, 504]),
    # Qwen2.5-VL: pixels of the 1008x504 model input, so both scale by 1.008
    (QWEN2_5_VL, (1008, 504), (504, 140, 728, 252), [508.032, 141.12, 733.824, 254.016]),
    # Qwen3-VL: 0..1000 relative (its input size plays no part)
    (QWEN3_VL, (992, 512), (576, 160, 832, 288), [576, 320, 832, 576]),
]


def context_for(adapter, input_size, max_pixels=12845056, image=ORIGINAL) -> ToolContext:
    resize = ResizePolicy(factor=adapter.factor, min_pixels=3136, max_pixels=max_pixels)
    return ToolContext(images=[image], infos=[ImageInfo(image.size, input_size)], adapter=adapter, resize=resize)


@pytest.mark.parametrize(("adapter", "input_size", "region", "model_box"), FAMILIES, ids=[f[0].name for f in FAMILIES])
def test_crop_cuts_the_original_region_for_every_family(adapter, input_size, region, model_box):
    left, top, right, bottom = region  # 8 x 4 merged patches of this family
    budget = (right - left) * (bottom - top)  # exactly the region: shown at its own size, not resampled
    result = get_tool("crop")(context_for(adapter, input_size, max_pixels=budget), {"bbox_2d": model_box})
    (image,) = result.images
    assert image.size == (right - left, bottom - top)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(ORIGINAL)[top:bottom, left:right])


@pytest.mark.parametrize(("bbox", "message"), [
    ([1, 2, 3], r"^crop: bbox_2d must be 4 numbers \[x1, y1, x2, y2\], got 3$"),
    ([1, 2, 3, 4, 5], "got 5"),
    ([500, 300, 100, 400], "^crop: the box is reversed or empty: x2 must be greater than x1"),
    ([1001, 0, 1200, 100], "^crop: the box lies outside the image"),
    (["1", 2, 3, 4], r"^crop: bbox_2d\[0\] must be a number, got a string$"),
])
def test_tool_refusals_reach_the_model_as_messages(bbox, message):
    with pytest.raises(ToolError, match=message):
        get_tool("crop")(context_for(QWEN2_VL, (1008, 504)), {"bbox_2d": bbox})


def test_tool_without_an_image():
    context = ToolContext(images=[], infos=[], adapter=QWEN3_VL, resize=QWEN3_VL.resize_policy(1024, 16384))
    with pytest.raises(ToolError, match="^crop: there is no image to crop"):
        get_tool("crop")(context, {"bbox_2d": [0, 0, 10, 10]})
