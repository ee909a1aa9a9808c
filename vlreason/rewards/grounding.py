"""Box rewards: ``iou`` (one box, grounding) and ``multi_box_iou`` (several boxes, Visual-RFT).

Predicted boxes arrive as ``pred_boxes`` in original-image pixels (parsed once by the scorer);
ground truth is the ``boxes`` column (and ``labels``, when present). No model convention here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from vlreason.choices import Choice
from vlreason.rewards.answers import class_name
from vlreason.rewards.api import Reward, Score, register_reward
from vlreason.rewards.parsing import PredBox
from vlreason.vision.boxes import Box, box_iou, iou_matrix

logger = logging.getLogger(__name__)


@register_reward("iou")
class IoUReward(Reward):
    """IoU of the first predicted box with the ground-truth box it overlaps most.

    Args:
        threshold: None for the continuous IoU in [0, 1]; a value tau for 1.0 when IoU >= tau.

    0 when no box parses; None for samples without ground-truth boxes.
    """

    inputs = ("pred_boxes", "boxes")

    def __init__(self, threshold: float | None = None):
        super().__init__()
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    def score(self, pred_boxes: list[PredBox], boxes: list[Box] | None) -> Score:
        if not boxes:
            return None
        if not pred_boxes:
            return 0.0
        iou = max(box_iou(pred_boxes[0].box, gt) for gt in boxes)
        return iou if self.threshold is None else float(iou >= self.threshold)


class Matching(Choice):
    GREEDY = "greedy"  # Visual-RFT: by descending confidence, each prediction takes its best free GT
    HUNGARIAN = "hungarian"  # optimal one-to-one assignment maximising total IoU


def match_boxes(pred: Sequence[PredBox], gt: Sequence[Box], gt_labels: Sequence[str] | None,
                matching: Matching, threshold: float) -> list[tuple[int, int, float]]:
    """Pairs ``(pred index, gt index, IoU)`` with IoU > ``threshold``, each box used at most once.

    When ``gt_labels`` is given, a prediction whose label differs (case-insensitive) from the
    ground truth's, or that has no label, has IoU 0 with it.
    """
    if not pred or not gt:
        return []
    ious = iou_matrix(np.array([p.box for p in pred]), np.array(gt))  # [P, G]
    if gt_labels is not None:
        same = np.array([[_same_label(p.label, g) for g in gt_labels] for p in pred])
        ious = np.where(same, ious, 0.0)
    if matching is Matching.HUNGARIAN:  # optimal over the pairs that count
        rows, cols = linear_sum_assignment(-np.where(ious > threshold, ious, 0.0))
        pairs = zip(rows.tolist(), cols.tolist(), strict=True)
    else:
        pairs = _greedy(pred, ious, threshold)
    return [(p, g, float(ious[p, g])) for p, g in pairs if ious[p, g] > threshold]


def _greedy(pred: Sequence[PredBox], ious: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """In order of descending confidence, each prediction takes the free GT it overlaps most,
    if that overlap passes the threshold (a failed try leaves the GT free)."""
    order = sorted(range(len(pred)), key=lambda i: -_confidence(pred[i]))  # stable for ties
    free = np.ones(ious.shape[1], dtype=bool)
    pairs = []
    for p in order:
        candidates = np.where(free, ious[p], -1.0)
        g = int(np.argmax(candidates))
        if candidates[g] > threshold:
            free[g] = False
            pairs.append((p, g))
    return pairs


def _confidence(box: PredBox) -> float:
    return 1.0 if box.confidence is None else box.confidence


def _same_label(pred_label: str | None, gt_label: str) -> bool:
    return pred_label is not None and class_name(pred_label) == class_name(gt_label)


def labels_problem(match_labels: bool | None, columns: set[str]) -> str | None:
    """Why a box reward cannot score data with ``columns``: it has ``labels`` but the reward was
    not told whether predictions must name them (``match_labels`` unset), else None."""
    if match_labels is not None or "labels" not in columns:
        return None
    return ("the data has `labels` and the option match_labels is unset. Set match_labels: true when the prompt "
            "asks for labelled boxes (a prediction counts only with the ground truth's label; one without a label "
            "matches nothing) or false to match boxes alone (Visual-RFT's output format has no labels): "
            "`options: {match_labels: ...}` under the reward in a config, `-o match_labels=...` on the command line")


def labels_to_match(reward: str, match_labels: bool | None, labels: list[str] | None,
                    pred_boxes: Sequence[PredBox]) -> list[str] | None:
    """The ground-truth labels predictions must name, or None to match boxes alone.

    Raises:
        ValueError: the sample has labels and ``match_labels`` is unset (see ``labels_problem``).
    """
    if labels is None or match_labels is False:
        return None
    if match_labels is None:
        raise ValueError(labels_problem(None, {"labels"}))
    if any(p.label is None for p in pred_boxes):
        _note_unlabelled(reward)
    return labels


@functools.cache
def _note_unlabelled(reward: str) -> None:
    """Say once per process that label-less predictions match nothing."""
    logger.warning("%s: predictions without a label match no labelled ground truth (match_labels: true); set "
                   "match_labels: false to match boxes alone, or ask for labels in the prompt", reward)


def drop_duplicates(pred_boxes: Sequence[PredBox]) -> list[PredBox]:
    """``pred_boxes`` without the repeats of an earlier box with the same coordinates (label
    and confidence aside, as Visual-RFT's ``remove_duplicates``); the first copy stays."""
    seen: set[Box] = set()
    kept = []
    for pred in pred_boxes:
        if pred.box not in seen:
            seen.add(pred.box)
            kept.append(pred)
    return kept


class Duplicates(Choice):
    DROP = "drop"  # Visual-RFT: repeats of a box (same coordinates) are removed before matching
    KEEP = "keep"  # every repeat is a prediction; unmatched repeats are false alarms


@register_reward("multi_box_iou")
class MultiBoxIoUReward(Reward):
    """Visual-RFT's detection reward for several boxes.

    Predictions are matched one-to-one to ground truth (pairs need IoU > ``iou_threshold``);
    ``iou_reward = sum(matched IoU) / max(#gt, #pred)``, so misses and false alarms both cost.
    With ``confidence_weight`` w > 0 the score adds ``w * mean(conf if matched else 1 - conf)``
    over predictions (a prediction without confidence counts as 1.0); Visual-RFT uses w = 1.

    Args:
        matching: ``greedy`` (Visual-RFT: by descending confidence, each prediction takes the
            free ground truth it overlaps most) or ``hungarian`` (the one-to-one assignment of
            maximum total IoU; unlike greedy it never lets an early prediction steal a box
            that a later one fits better).
        iou_threshold: minimum IoU (exclusive) of a matched pair, 0.5 by default.
        confidence_weight: weight of the confidence term (0 disables it).
        match_labels: for data with ``labels``, required: true (a pair counts only if the
            labels agree; a prediction without a label matches nothing, logged once) or false
            (boxes alone). Data without labels needs no setting.
        duplicates: ``drop`` (default, Visual-RFT): a box repeated with the same coordinates
            (in original pixels, after clamping) counts once, its first copy; ``keep``: each
            repeat is a prediction, so unmatched repeats are false alarms.

    No predictions and no ground truth scores 1 (+w); None for samples without ``boxes``.
    """

    inputs = ("pred_boxes", "boxes", "labels")
    optional = ("labels",)

    def __init__(self, matching: Matching | str = Matching.GREEDY, iou_threshold: float = 0.5,
                 confidence_weight: float = 0.0, match_labels: bool | None = None,
                 duplicates: Duplicates | str = Duplicates.DROP):
        super().__init__()
        self.matching = Matching(matching)
        self.iou_threshold = iou_threshold
        self.confidence_weight = confidence_weight
        self.match_labels = match_labels
        self.duplicates = Duplicates(duplicates)

    def data_problem(self, columns: set[str]) -> str | None:
        return labels_problem(self.match_labels, columns)

    def score(self, pred_boxes: list[PredBox], boxes: list[Box] | None, labels: list[str] | None) -> Score:
        if boxes is None:
            return None
        if self.duplicates is Duplicates.DROP:
            pred_boxes = drop_duplicates(pred_boxes)
        if not boxes and not pred_boxes:
            return 1.0 + self.confidence_weight
        gt_labels = labels_to_match("multi_box_iou", self.match_labels, labels, pred_boxes)
        pairs = match_boxes(pred_boxes, boxes, gt_labels, self.matching, self.iou_threshold)
        iou_reward = sum(iou for _, _, iou in pairs) / max(len(boxes), len(pred_boxes))
        if not self.confidence_weight or not pred_boxes:
            return iou_reward
        matched = {p for p, _, _ in pairs}
        confidence = np.mean([_confidence(b) if i in matched else 1.0 - _confidence(b)
                              for i, b in enumerate(pred_boxes)])
        return iou_reward + self.confidence_weight * float(confidence)
