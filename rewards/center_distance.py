"""Example reward plugin: how close the predicted box's centre is to the ground truth's.

IoU is 0 for every box that misses the object, however near it lands, so early in training it
gives no direction. A centre-distance term still says "warmer" or "colder". Use it beside ``iou``:

    vlreason rewards check rewards/center_distance.py:CenterDistance --data grounding.jsonl
    vlreason rewards check rewards/center_distance.py:CenterDistance -o power=2 --data grounding.jsonl

This file uses only vlreason's public reward contract, as your own plugins would: a callable
class (it pickles into worker processes) taking the completions and the columns it needs.
"""

from __future__ import annotations

import math


class CenterDistance:
    """``(1 - d / diagonal) ** power`` for the first predicted box, where d is the distance from
    its centre to the nearest ground-truth centre; 0 without a box, None without ground truth."""

    required_columns = ("boxes",)

    def __init__(self, power: float = 1.0):
        if power <= 0:
            raise ValueError(f"power must be positive, got {power}")
        self.power = power
        self.__name__ = "center_distance"

    def __call__(self, completions, pred_boxes, boxes, image_sizes, **columns):
        rows = zip(pred_boxes, boxes, image_sizes, strict=True)
        return [self._score(preds, truth, sizes) for preds, truth, sizes in rows]

    def _score(self, preds, truth, sizes):
        if not truth:
            return None
        if not preds:
            return 0.0
        width, height = sizes[0]
        px, py = _centre(preds[0].box)
        distance = min(math.hypot(px - gx, py - gy) for gx, gy in map(_centre, truth))
        return max(0.0, 1.0 - distance / math.hypot(width, height)) ** self.power


def _centre(box):
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2, (y1 + y2) / 2
