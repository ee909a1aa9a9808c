"""COCO detection metrics through pycocotools: ``coco_map`` for evaluation, ``detection_map``
as a per-sample reward.

Boxes are converted from vlreason's ``[x1, y1, x2, y2]`` to COCO's ``[x, y, w, h]``; labels
become category ids (one "object" category when there are no labels); a prediction without a
confidence scores 1.0. pycocotools' own evaluation (``COCOeval``) computes the numbers.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlreason.choices import Choice
from vlreason.rewards.answers import class_name
from vlreason.rewards.api import Reward, Score, register_reward
from vlreason.rewards.grounding import labels_problem, labels_to_match
from vlreason.rewards.parsing import PredBox
from vlreason.vision.boxes import Box

UNLABELLED = "object"


def coco_map(
    predictions: Sequence[Sequence[PredBox]],
    boxes: Sequence[Sequence[Box]],
    labels: Sequence[Sequence[str] | None] | None = None,
    crowd: Sequence[Sequence[tuple[Box, str | None]]] | None = None,
) -> dict[str, float]:
    """COCO AP over a set of images.

    Args:
        predictions: per image, the predicted boxes (original pixels) with labels / confidences.
        boxes: per image, the ground-truth boxes.
        labels: per image, one label per ground-truth box; None to ignore labels.
        crowd: per image, COCO's crowd regions as ``(box, label)``: not objects to find, and a
            detection on one is neither a hit nor a false alarm (COCOeval's ``iscrowd``).

    Returns:
        ``ap`` (AP@[.5:.95]), ``ap50`` and ``ap75``; NaN when there is no ground truth at all.
    """
    use_labels = labels is not None
    names = sorted({_label(lbl, use_labels) for row in (labels or []) if row for lbl in row}
                   | {_label(p.label, use_labels) for row in predictions for p in row}
                   | {_label(lbl, use_labels) for row in (crowd or []) for _, lbl in row} | {UNLABELLED})
    category = {name: i + 1 for i, name in enumerate(names)}
    gt_annotations, dt_annotations = [], []
    for image_id, (preds, gts) in enumerate(zip(predictions, boxes, strict=True), start=1):
        gt_labels = (labels[image_id - 1] if use_labels else None) or [None] * len(gts)
        for box, lbl in zip(gts, gt_labels, strict=True):
            gt_annotations.append(_annotation(box, category[_label(lbl, use_labels)], image_id, None))
        for box, lbl in (crowd[image_id - 1] if crowd else []):
            gt_annotations.append(_annotation(box, category[_label(lbl, use_labels)], image_id, None) | {"iscrowd": 1})
        for pred in preds:
            confidence = 1.0 if pred.confidence is None else pred.confidence
            dt_annotations.append(_annotation(pred.box, category[_label(pred.label, use_labels)], image_id,
                                              confidence))
    if not gt_annotations:
        return {"ap": float("nan"), "ap50": float("nan"), "ap75": float("nan")}
    images = [{"id": i} for i in range(1, len(predictions) + 1)]
    categories = [{"id": i, "name": name} for name, i in category.items()]
    stats = _evaluate(_coco(images, gt_annotations, categories), _coco(images, dt_annotations, categories))
    return {"ap": stats[0], "ap50": stats[1], "ap75": stats[2]}


def _label(label: str | None, use_labels: bool) -> str:
    if not use_labels or label is None:
        return UNLABELLED
    return class_name(label)


def _annotation(box: Box, category_id: int, image_id: int, score: float | None) -> dict:
    x1, y1, x2, y2 = box
    annotation = {"image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                  "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
    if score is not None:
        annotation["score"] = score
    return annotation


def _coco(images: list[dict], annotations: list[dict], categories: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "annotations": [dict(a, id=i + 1) for i, a in enumerate(annotations)],
                    "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _evaluate(gt: COCO, dt: COCO) -> list[float]:
    evaluator = COCOeval(gt, dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats[:3]]


class MapMetric(Choice):
    AP = "ap"  # AP averaged over IoU 0.50:0.95
    AP50 = "ap50"
    AP75 = "ap75"


@register_reward("detection_map")
class DetectionMAPReward(Reward):
    """COCO AP of one sample's predictions (pycocotools) as a reward.

    Args:
        metric: ``ap`` (AP@[.5:.95], default), ``ap50`` or ``ap75``.
        match_labels: for data with ``labels``, required: true (labels are categories; a
            prediction without a label matches nothing, logged once) or false (boxes alone,
            one category). Data without labels needs no setting.

    A sample with no ground-truth boxes scores 1 without predictions and 0 with any; None for
    samples without a ``boxes`` field. As COCO defines AP per category, false alarms of a class
    that is absent from the sample do not lower it: pair this reward with ``multi_box_iou``
    when such false alarms matter.
    """

    inputs = ("pred_boxes", "boxes", "labels")
    optional = ("labels",)

    def __init__(self, metric: MapMetric | str = MapMetric.AP, match_labels: bool | None = None):
        super().__init__()
        self.metric = MapMetric(metric)
        self.match_labels = match_labels

    def data_problem(self, columns: set[str]) -> str | None:
        return labels_problem(self.match_labels, columns)

    def score(self, pred_boxes: list[PredBox], boxes: list[Box] | None, labels: list[str] | None) -> Score:
        if boxes is None:
            return None
        if not boxes:
            return 0.0 if pred_boxes else 1.0
        gt_labels = labels_to_match("detection_map", self.match_labels, labels, pred_boxes)
        return coco_map([pred_boxes], [boxes], None if gt_labels is None else [gt_labels])[self.metric.value]
