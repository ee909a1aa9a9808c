"""Box geometry in vlreason's one canonical form.

Every box inside vlreason is ``[x1, y1, x2, y2]`` in pixels of the *original* image, with
``x1 < x2`` and ``y1 < y2``. Model families speak other conventions; their adapters convert at
the boundary (see ``vlreason.models.adapters``), so everything here is convention-free math.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np

Box = tuple[float, float, float, float]
Size = tuple[int, int]  # (width, height)


def as_box(values: Sequence[float]) -> Box:
    """Return ``values`` as a 4-tuple of floats (no validity check)."""
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1, y1, x2, y2)


def box_problem(box: Sequence[float], size: Size | None = None) -> str | None:
    """Describe what makes ``box`` impossible, or return None when it is a valid box.

    Args:
        box: ``[x1, y1, x2, y2]`` in original-image pixels.
        size: ``(width, height)`` of the image; when given, the box must lie inside it.
    """
    if len(box) != 4:
        return f"has {len(box)} numbers, expected 4"
    if not all(isinstance(v, Real) and not isinstance(v, (bool, np.bool_)) for v in box):
        return "holds a value that is not a number"
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return "holds a NaN or infinite value"
    if x2 <= x1:
        return f"x2 ({x2:g}) <= x1 ({x1:g})"
    if y2 <= y1:
        return f"y2 ({y2:g}) <= y1 ({y1:g})"
    if size is not None:
        width, height = size
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            return f"lies outside the {width}x{height} image"
    return None


def clamp_box(box: Box, size: Size) -> Box:
    """Clip ``box`` to the image rectangle ``[0, width] x [0, height]``."""
    width, height = float(size[0]), float(size[1])
    x1, y1, x2, y2 = box
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))


def box_area(box: Box) -> float:
    """Area of ``box``; zero for empty or reversed boxes."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes, in [0, 1]."""
    inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU.

    Args:
        a: ``[N, 4]`` boxes.
        b: ``[M, 4]`` boxes.

    Returns:
        ``[N, M]`` IoU values in [0, 1].
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    inter = np.clip(rb - lt, 0.0, None).prod(axis=-1)  # [N, M]
    area_a = np.clip(a[:, 2:] - a[:, :2], 0.0, None).prod(axis=-1)  # [N]
    area_b = np.clip(b[:, 2:] - b[:, :2], 0.0, None).prod(axis=-1)  # [M]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def rescale_box(box: Box, from_size: Size, to_size: Size) -> Box:
    """Map a box between two resolutions of the same image (e.g. original <-> model input)."""
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
