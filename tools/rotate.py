"""Example tool plugin: rotate the first image by a quarter, half or three-quarter turn.

A model that meets a sideways photo or scanned page can turn it upright before reading it. Offer
it in a config beside the built-in crop::

    agent:
      mode: tools
      tools: [crop, tools/rotate.py:rotate]

This file uses only vlreason's public tool API, as your own plugins would: a typed function whose
first parameter receives the ToolContext; its docstring and type hints become the schema the
model reads.
"""

from __future__ import annotations

from typing import Literal

from PIL import Image

from vlreason.tools import ToolContext, ToolError

TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def rotate(context: ToolContext, degrees: Literal[90, 180, 270]) -> list[str | Image.Image]:
    """Rotate the image counter-clockwise by 90, 180 or 270 degrees and show the result.

    Args:
        degrees: how far to turn the image counter-clockwise.
    """
    if not context.images:
        raise ToolError("there is no image to rotate in this conversation")
    turned = context.images[0].transpose(TURNS[degrees])
    return [f"The image rotated {degrees} degrees counter-clockwise ({turned.width}x{turned.height}).", turned]
