"""``coco_map`` / ``detection_map`` against pycocotools' own pipeline, built here independently:
ground truth written as a COCO json file with xywh boxes, detections through ``COCO.loadRes``,
then ``COCOeval`` run by the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlreason.rewards import get_reward, parsed_columns
from vlreason.rewards.detection import coco_map
from vlreason.rewards.parsing import PredBox

# an image: (ground truth [(xyxy, label)], predictions [(xyxy, label, score or None)])
Image = tuple[list[tuple[list[float], str]], list[tuple[list[float], str | None, float | None]]]


def xywh(box) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, x2 - x1, y2 - y1]


def pycocotools_stats(tmp_path: Path, images: list[Image], use_labels: bool = True) -> list[float]:
    """AP, AP50, AP75 by pycocotools' documented workflow (a GT json file, loadRes, COCOeval)."""
    names = sorted({label for gts, preds in images for _, label in gts}
                   | {label for gts, preds in images for _, label, _ in preds if label is not None})
    category = {name: 7 + 3 * i for i, name in enumerate(names)} if use_labels else {}  # arbitrary ids

    def cat(label):
        return category[label] if use_labels else 1

    gt = {"images": [{"id": 100 + i, "width": 1000, "height": 1000} for i in range(len(images))],
          "categories": ([{"id": i, "name": n} for n, i in category.items()] if use_labels
                         else [{"id": 1, "name": "object"}]),
          "annotations": []}
    detections = []
    for i, (gts, preds) in enumerate(images):
        for box, label in gts:
            w, h = xywh(box)[2:]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 100 + i, "category_id": cat(label),
                                      "bbox": xywh(box), "area": w * h, "iscrowd": 0})
        for box, label, confidence in preds:
            if use_labels and label is None:
                continue  # belongs to no ground-truth category: cannot change any AP
            detections.append({"image_id": 100 + i, "category_id": cat(label), "bbox": xywh(box),
                               "score": 1.0 if confidence is None else confidence})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(path))
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats[:3]]


def ours(images: list[Image], use_labels: bool = True) -> list[float]:
    predictions = [[PredBox(tuple(float(v) for v in box), label, conf) for box, label, conf in preds]
                   for _, preds in images]
    boxes = [[box for box, _ in gts] for gts, _ in images]
    labels = [[label for _, label in gts] for gts, _ in images] if use_labels else None
    result = coco_map(predictions, boxes, labels)
    return [result["ap"], result["ap50"], result["ap75"]]


SCENE: list[Image] = [
    (  # good cat, good dog, a cat false alarm with low confidence
        [([10, 10, 50, 50], "cat"), ([60, 60, 120, 100], "dog")],
        [([12, 12, 50, 52], "cat", 0.9), ([60, 58, 118, 100], "dog", 0.75), ([200, 200, 240, 240], "cat", 0.4)],
    ),
    (  # a loose cat, and a confident dog on the cat (wrong class)
        [([0, 0, 30, 30], "cat")],
        [([2, 0, 30, 33], "cat", 0.6), ([0, 0, 30, 30], "dog", 0.85)],
    ),
    (  # the dog is missed; a "bird" (a class with no ground truth anywhere) is predicted on it
        [([5, 5, 25, 45], "dog")],
        [([5, 5, 25, 45], "bird", 0.95)],
    ),
    (  # a cat found twice: the lower-scored duplicate is a false positive
        [([100, 100, 180, 160], "cat")],
        [([105, 100, 185, 165], "cat", 0.55), ([100, 100, 180, 160], "cat", 0.3)],
    ),
    (  # nothing predicted
        [([40, 40, 90, 90], "dog")],
        [],
    ),
    (  # a prediction without confidence (counts as 1.0) and two cats in one image
        [([300, 300, 400, 380], "cat"), ([420, 300, 500, 390], "cat")],
        [([310, 305, 400, 380], "cat", None), ([430, 310, 505, 400], "cat", 0.5)],
    ),
]


def test_coco_map_matches_pycocotools_with_labels(tmp_path: Path) -> None:
    reference = pycocotools_stats(tmp_path, SCENE)
    assert 0 < reference[0] < reference[1] < 1  # a non-trivial case
    assert ours(SCENE) == pytest.approx(reference, abs=1e-12)


def test_coco_map_matches_pycocotools_without_labels(tmp_path: Path) -> None:
    reference = pycocotools_stats(tmp_path, SCENE, use_labels=False)
    assert ours(SCENE, use_labels=False) == pytest.approx(reference, abs=1e-12)


def test_coco_map_label_case_and_spacing_do_not_matter(tmp_path: Path) -> None:
    shouted = [([(b, f" {lbl.upper()} ") for b, lbl in gts], preds) for gts, preds in SCENE]
    assert ours(shouted) == pytest.approx(pycocotools_stats(tmp_path, SCENE), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_map_matches_pycocotools_on_random_scenes(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = ["cat", "dog", "person"]
    images: list[Image] = []
    for _ in range(8):
        gts, preds = [], []
        for _ in range(rng.integers(1, 5)):
            x, y = rng.uniform(0, 800, size=2)
            w, h = rng.uniform(10, 150, size=2)
            gts.append(([float(x), float(y), float(x + w), float(y + h)], str(rng.choice(labels))))
        for box, label in gts:
            if rng.random() < 0.8:  # found, with jitter and sometimes the wrong class
                jitter = rng.normal(0, 0.12, size=4) * np.array([box[2] - box[0], box[3] - box[1]] * 2)
                x1, y1, x2, y2 = (np.array(box) + jitter).tolist()
                if x2 > x1 and y2 > y1:
                    wrong = rng.random() < 0.15
                    preds.append(([x1, y1, x2, y2], str(rng.choice(labels)) if wrong else label, rng.random()))
        for _ in range(rng.integers(0, 3)):  # false alarms
            x, y = rng.uniform(0, 800, size=2)
            preds.append(([float(x), float(y), float(x + 40), float(y + 30)], str(rng.choice(labels)), rng.random()))
        images.append((gts, preds))
    assert ours(images) == pytest.approx(pycocotools_stats(tmp_path, images), abs=1e-12)
    assert ours(images, use_labels=False) == pytest.approx(pycocotools_stats(tmp_path, images, False), abs=1e-12)


def test_coco_map_without_any_ground_truth_is_nan() -> None:
    result = coco_map([[PredBox((0.0, 0.0, 1.0, 1.0))]], [[]])
    assert all(math.isnan(result[k]) for k in ("ap", "ap50", "ap75"))


def test_coco_map_without_predictions_is_zero() -> None:
    # ground truth and no detection: recall 0 at every threshold -> AP 0
    assert coco_map([[]], [[[0, 0, 10, 10]]]) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


# ---------------------------------------------------------------------------- per-sample reward


def reward_score(reward, preds: list[PredBox], boxes, labels=None):
    columns = {"pred_boxes": [preds], "boxes": [boxes]}
    if labels is not None:
        columns["labels"] = [labels]
    return reward([""], **columns)[0]


def test_detection_map_iou_thresholds_by_hand() -> None:
    # [0,0,10,6.25] vs [0,0,10,10]: IoU 62.5 / 100 = 0.625, a match at thresholds 0.50, 0.55, 0.60
    # (of 0.50:0.05:0.95); one GT, one TP: AP 1 where matched, 0 elsewhere -> AP = 3/10
    pred, truth = [PredBox((0.0, 0.0, 10.0, 6.25), None, 0.8)], [[0, 0, 10, 10]]
    assert reward_score(get_reward("detection_map"), pred, truth) == pytest.approx(0.3)
    assert reward_score(get_reward("detection_map", metric="ap50"), pred, truth) == pytest.approx(1.0)
    assert reward_score(get_reward("detection_map", metric="ap75"), pred, truth) == pytest.approx(0.0)


def test_detection_map_confidence_order_by_hand() -> None:
    truth = [[0, 0, 10, 10]]
    hit, miss = (0.0, 0.0, 10.0, 10.0), (50.0, 50.0, 60.0, 60.0)
    ap50 = get_reward("detection_map", metric="ap50")
    # false alarm ranked first: recall 0 then 1 at precision 1/2; interpolated precision 1/2 at
    # every recall level -> 0.5
    assert reward_score(ap50, [PredBox(hit, None, 0.8), PredBox(miss, None, 0.9)], truth) == pytest.approx(0.5)
    # true positive ranked first: precision 1 up to recall 1 -> 1.0
    assert reward_score(ap50, [PredBox(hit, None, 0.9), PredBox(miss, None, 0.8)], truth) == pytest.approx(1.0)


def test_detection_map_half_recall_by_hand() -> None:
    # two GT, one found: precision 1 for the 51 recall levels 0.00..0.50 of 101, 0 above -> 51/101
    preds = [PredBox((0.0, 0.0, 10.0, 10.0), None, 0.9)]
    ap50 = get_reward("detection_map", metric="ap50")
    assert reward_score(ap50, preds, [[0, 0, 10, 10], [20, 20, 30, 30]]) == pytest.approx(51 / 101)


def test_detection_map_labels() -> None:
    truth, labels = [[0, 0, 10, 10]], ["cat"]
    cat = PredBox((0.0, 0.0, 10.0, 10.0), "cat", 0.9)
    dog_elsewhere = PredBox((50.0, 50.0, 60.0, 60.0), "dog", 0.95)
    dog_on_cat = PredBox((0.0, 0.0, 10.0, 10.0), "dog", 0.9)
    ap50 = get_reward("detection_map", metric="ap50", match_labels=True)
    # a false alarm of a class absent from the sample does not lower COCO AP (documented)
    assert reward_score(ap50, [cat, dog_elsewhere], truth, labels) == pytest.approx(1.0)
    # without labels the dog is a higher-ranked false alarm: 0.5 (see the confidence-order case)
    unlabelled = get_reward("detection_map", metric="ap50", match_labels=False)
    assert reward_score(unlabelled, [cat, dog_elsewhere], truth, labels) == pytest.approx(0.5)
    # the right box with the wrong class finds nothing
    assert reward_score(ap50, [dog_on_cat], truth, labels) == 0.0


def test_detection_map_edge_cases() -> None:
    reward = get_reward("detection_map")
    some = [PredBox((0.0, 0.0, 1.0, 1.0), None, 0.5)]
    assert reward_score(reward, [], []) == 1.0  # no GT, no predictions
    assert reward_score(reward, some, []) == 0.0  # no GT, a false alarm
    assert reward_score(reward, some, None) is None  # no boxes field
    assert reward_score(reward, [], [[0, 0, 10, 10]]) == 0.0  # nothing predicted
    # a prediction without confidence counts as 1.0
    assert reward_score(reward, [PredBox((0.0, 0.0, 10.0, 10.0))], [[0, 0, 10, 10]]) == pytest.approx(1.0)


def test_detection_map_on_a_parsed_completion() -> None:
    completion = ('<think>two cats</think><answer>[{"bbox_2d": [0, 0, 10, 10], "label": "cat", "confidence": 0.9},'
                  ' {"bbox_2d": [20, 20, 30, 30], "label": "cat", "confidence": 0.7}]</answer>')
    columns = parsed_columns([completion], [[(100, 100)]])
    reward = get_reward("detection_map", metric="ap50", match_labels=True)
    assert reward([completion], boxes=[[[0, 0, 10, 10], [20, 20, 30, 30]]], labels=[["cat", "cat"]],
                  **columns) == [pytest.approx(1.0)]
