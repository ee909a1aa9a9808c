"""Zooming into a region of an image: the geometry behind the ``crop`` tool and MGPO's grounding turn.

A model sees each image downscaled to its pixel budget, so small details are lost. A region
(in original pixels) is grown to a sensible minimum, cut from the *original* image and enlarged
to use the model's pixel budget again, which shows it in more detail than the whole image could.
"""

from __future__ import annotations

import math

from PIL import Image

from vlreason.vision.boxes import Box, Size
from vlreason.vision.images import MAX_ASPECT_RATIO, ResizePolicy


class CropError(ValueError):
    """A region that cannot be cut; the message says what to change (it is shown to models as is)."""


MIN_SIDE_PATCHES = 2  # a region spans at least this many merged patches per side of the original image
MAX_ZOOM = 4.0  # enlarge a region at most this much: beyond it, resampling costs tokens and adds no detail
_SNAP = 1e-6  # box maps leave float error (503.9999...); it must not widen a crop by a whole pixel


def zoom_box(box: Box, image_size: Size, factor: int) -> Box:
    """The region to cut for ``box``: clamped to the image, each side grown around the box's
    centre to at least ``MIN_SIDE_PATCHES * factor`` pixels (or the image's side when that is
    smaller) and shifted to stay inside, then widened to whole pixels.

    Args:
        box: ``[x1, y1, x2, y2]`` in original-image pixels.
        image_size: ``(width, height)`` of the original image.
        factor: side in pixels of one merged vision patch (``ResizePolicy.factor``).

    Returns:
        The region ``[x1, y1, x2, y2]`` in whole original-image pixels, inside the image.

    Raises:
        CropError: a NaN or infinite value, a reversed or empty box, a box that lies outside
            the image, or a region more than ``MAX_ASPECT_RATIO`` times longer than wide.
    """
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        raise CropError("the box holds a NaN or infinite value; give 4 finite numbers [x1, y1, x2, y2]")
    if x2 <= x1 or y2 <= y1:
        axis = "x" if x2 <= x1 else "y"
        raise CropError(f"the box is reversed or empty: {axis}2 must be greater than {axis}1 in [x1, y1, x2, y2]")
    width, height = image_size
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        raise CropError("the box lies outside the image; give a box inside it")
    left, right = _grow(max(x1, 0.0), min(x2, width), width, MIN_SIDE_PATCHES * factor)
    top, bottom = _grow(max(y1, 0.0), min(y2, height), height, MIN_SIDE_PATCHES * factor)
    region = (float(math.floor(left + _SNAP)), float(math.floor(top + _SNAP)),
              float(math.ceil(right - _SNAP)), float(math.ceil(bottom - _SNAP)))
    long_side = max(region[2] - region[0], region[3] - region[1])
    short_side = min(region[2] - region[0], region[3] - region[1])
    if long_side / short_side > MAX_ASPECT_RATIO:
        raise CropError(f"the box is too thin (one side over {MAX_ASPECT_RATIO} times the other); "
                        "give a box closer to square")
    return region


def _grow(low: float, high: float, limit: int, minimum: int) -> tuple[float, float]:
    """``[low, high]`` grown around its centre to ``min(minimum, limit)``, kept inside ``[0, limit]``."""
    side = max(high - low, min(minimum, limit))
    start = min(max((low + high - side) / 2, 0.0), limit - side)
    return start, start + side


def zoomed_size(size: Size, resize: ResizePolicy) -> Size:
    """The size a cut region is shown at: scaled to fill ``resize.max_pixels`` (aspect ratio kept),
    at most ``MAX_ZOOM`` times larger, smaller only when the region itself exceeds the budget,
    then snapped to the processor's size rule (``resize.target_size``) so it is resampled once."""
    width, height = size
    scale = min(MAX_ZOOM, math.sqrt(resize.max_pixels / (width * height)))
    # the long side rounds down and the short side up: the region never gets thinner than
    # zoom_box allowed, so target_size's aspect-ratio check cannot refuse it
    if width >= height:
        return resize.target_size((math.floor(width * scale), math.ceil(height * scale)))
    return resize.target_size((math.ceil(width * scale), math.floor(height * scale)))


def crop_region(image: Image.Image, box_original: Box, resize: ResizePolicy) -> Image.Image:
    """Cut ``box_original`` (grown by ``zoom_box``) from ``image`` and enlarge it (``zoomed_size``).

    Args:
        image: the original-resolution image.
        box_original: ``[x1, y1, x2, y2]`` in pixels of ``image``.
        resize: the model's resize policy (pixel budget and patch factor).

    Returns:
        The region, bicubically resized to ``zoomed_size`` (the model's processor leaves it as is).

    Raises:
        CropError: see ``zoom_box``.
    """
    region = zoom_box(box_original, image.size, resize.factor)
    cut = image.crop(tuple(int(v) for v in region))
    size = zoomed_size(cut.size, resize)
    return cut if size == cut.size else cut.resize(size, Image.Resampling.BICUBIC)
