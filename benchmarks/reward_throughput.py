"""Reward scoring throughput on synthetic completions.

Scores N completions (default 100k) per reward the way training does: the scorer parses every
completion once (answer, reasoning, canonical boxes), then the reward runs on the batch.
Completions look like a model's mid-training output: mostly well formed with noisy boxes, some
with several boxes and confidences, and ~10% malformed (truncated, no tags, broken JSON).

    python benchmarks/reward_throughput.py --json benchmarks/results/reward_throughput.json

Reports, per reward, parse and score seconds and completions per second (end to end and
scoring alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from vlreason.data.synth import CLASSES
from vlreason.rewards import RewardScorer, get_reward, parsed_columns

SIZE = (448, 448)


def random_box(rng: random.Random) -> list[int]:
    x, y = rng.randint(0, 380), rng.randint(0, 380)
    return [x, y, x + rng.randint(12, 60), y + rng.randint(12, 60)]


def jitter(box: list[int], rng: random.Random) -> list[int]:
    return [v + rng.randint(-6, 6) for v in box]


def malformed(rng: random.Random) -> str:
    return rng.choice([
        "<think>I see a shape near the", "<answer>[12, 40, ", "the box is somewhere on the left",
        '<think>ok</think><answer>[{"bbox_2d": [1, 2, NaN, 4]}</answer>', "", "<answer></answer>",
    ])


def grounding_batch(n: int, rng: random.Random) -> tuple[list[str], dict]:
    completions, boxes = [], []
    for _ in range(n):
        gt = random_box(rng)
        boxes.append([tuple(gt)])
        pred = jitter(gt, rng)
        completions.append(malformed(rng) if rng.random() < 0.1 else
                           f"<think>The red circle is in the upper left of the image.</think><answer>{pred}</answer>")
    return completions, {"boxes": boxes}


def detection_batch(n: int, rng: random.Random) -> tuple[list[str], dict]:
    completions, boxes, labels = [], [], []
    for _ in range(n):
        gts = [random_box(rng) for _ in range(rng.randint(1, 4))]
        names = [rng.choice(CLASSES) for _ in gts]
        boxes.append([tuple(b) for b in gts])
        labels.append(names)
        preds = [{"bbox_2d": jitter(b, rng), "label": lbl, "confidence": round(rng.random(), 2)}
                 for b, lbl in zip(gts, names, strict=True) if rng.random() < 0.85]
        completions.append(malformed(rng) if rng.random() < 0.1 else
                           f"<think>I see {len(gts)} shapes.</think><answer>{json.dumps(preds)}</answer>")
    return completions, {"boxes": boxes, "labels": labels}


def classification_batch(n: int, rng: random.Random) -> tuple[list[str], dict]:
    completions, labels = [], []
    for _ in range(n):
        label = rng.choice(CLASSES)
        labels.append(label)
        guess = label if rng.random() < 0.6 else rng.choice(CLASSES)
        completions.append(malformed(rng) if rng.random() < 0.1 else
                           f"<think>The shape is round and coloured.</think><answer>{guess.title()}</answer>")
    return completions, {"label": labels}


CASES = {
    "iou": ("iou", {}, grounding_batch),
    "multi_box_iou": ("multi_box_iou", {"confidence_weight": 1.0, "match_labels": True}, detection_batch),
    "multi_box_iou_hungarian": ("multi_box_iou", {"matching": "hungarian", "match_labels": True}, detection_batch),
    "classification": ("classification", {}, classification_batch),
}


def measure(name: str, n: int, seed: int) -> dict:
    spec, options, make = CASES[name]
    completions, columns = make(n, random.Random(seed))
    start = time.perf_counter()
    columns |= parsed_columns(completions, [[SIZE]] * n)
    parsed = time.perf_counter()
    table = RewardScorer({name: get_reward(spec, **options)})(completions, columns)
    scored = time.perf_counter()
    return {
        "reward": spec,
        "options": options,
        "parse_s": round(parsed - start, 3),
        "score_s": round(scored - parsed, 3),
        "completions_per_s": round(n / (scored - start)),
        "score_only_per_s": round(n / (scored - parsed)),
        "mean_score": round(float(table.values[:, 0].mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = {name: measure(name, args.n, args.seed) for name in CASES}
    report = {
        "command": "python " + " ".join(sys.argv),
        "n_completions": args.n,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
