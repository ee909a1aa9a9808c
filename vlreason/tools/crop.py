"""The built-in ``crop`` tool: zoom in on a region of the first prompt image.

The model names a region in its own box convention; the family adapter maps it to original
pixels, and ``vision.crops.crop_region`` cuts it from the *original* image and enlarges it to use
the model's pixel budget again, which shows the region in more detail than the prompt could.
"""

from __future__ import annotations

from PIL import Image

from vlreason.tools.api import ToolContext, ToolError, register_tool
from vlreason.vision.crops import CropError, crop_region


@register_tool("crop")
def crop(context: ToolContext, bbox_2d: list[float]) -> Image.Image:
    """Zoom in on a region of the image: returns the region cut from the full-resolution image, enlarged.

    The box is in the model family's own convention for the first prompt image; the adapter maps
    it to original pixels (``adapter.from_model``) before ``crop_region`` cuts it.

    Args:
        bbox_2d: the region as [x1, y1, x2, y2] in the first image, in the coordinates you use for boxes.
    """
    if len(bbox_2d) != 4:
        raise ToolError(f"bbox_2d must be 4 numbers [x1, y1, x2, y2], got {len(bbox_2d)}")
    if not context.images:
        raise ToolError("there is no image to crop in this conversation")
    box = context.adapter.from_model(bbox_2d, context.infos[0])
    try:
        return crop_region(context.images[0], box, context.resize)
    except CropError as exc:
        raise ToolError(str(exc)) from exc
