"""The example plugin in the top-level tools/ folder loads by path and works as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlreason.models.adapters import QWEN3_VL
from vlreason.tools import ToolContext, ToolError, get_tool
from vlreason.vision.images import ImageInfo

REPO = Path(__file__).resolve().parents[2]


def test_rotate_turns_the_first_image_counter_clockwise():
    rotate = get_tool("tools/rotate.py:rotate", base_dir=REPO)
    assert rotate.name == "rotate"
    assert rotate.parameters == {"type": "object", "required": ["degrees"], "properties": {
        "degrees": {"type": "integer", "enum": [90, 180, 270],
                    "description": "how far to turn the image counter-clockwise."}}}
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)  # 3 wide, 2 high
    pixels[0, 2] = 255  # top-right corner white
    image = Image.fromarray(pixels)
    context = ToolContext(images=[image], infos=[ImageInfo((3, 2), (32, 32))], adapter=QWEN3_VL,
                         resize=QWEN3_VL.resize_policy(1024, 16384))
    result = rotate(context, {"degrees": 90})
    assert result.text == "The image rotated 90 degrees counter-clockwise (2x3)."
    (turned,) = result.images
    assert np.asarray(turned)[0, 0].tolist() == [255, 255, 255]  # top-right went to top-left
    assert np.asarray(rotate(context, {"degrees": 180}).images[0])[1, 0].tolist() == [255, 255, 255]
    with pytest.raises(ToolError, match="^rotate: degrees must be one of 90, 180, 270, got 45$"):
        rotate(context, {"degrees": 45})
