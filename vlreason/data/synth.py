"""Synthetic perception tasks drawn by the project itself, for CPU training and tests.

Each task draws coloured shapes on a plain background and writes a JSONL file in the
vlreason schema (``vlreason.data.schema``) with images, a prompt, a chain-of-thought reference
response and the ground truth:

* ``grounding``: "Where is the red triangle?" -> one box (``boxes``);
* ``counting``: "How many blue circles are there?" -> ``answer`` (a whole number as text);
* ``classification``: "What is the shape?" -> ``label`` ("red triangle");
* ``detection``: "Detect every shape." -> ``boxes`` + ``labels`` (a JSON list in the answer).

Boxes are tight pixel boxes ``[x1, y1, x2, y2]`` of the drawn shapes in the image written
(the original image), so they are exact ground truth.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from vlreason.vision.boxes import Box, box_iou

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (225, 195, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    box: Box

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def draw_scene(shapes: list[Shape], size: int, rng: random.Random,
               palette: dict[str, tuple[int, int, int]] = COLOURS) -> Image.Image:
    """Draw ``shapes`` on a light random background; each fills its box tightly in its colour
    (a name in ``palette``)."""
    background = tuple(rng.randint(215, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        x1, y1, x2, y2 = (int(v) for v in shape.box)
        colour = palette[shape.colour]
        corners = (x1, y1, x2 - 1, y2 - 1)  # PIL includes the end pixel; boxes exclude it
        if shape.kind == "circle":
            draw.ellipse(corners, fill=colour)
        elif shape.kind == "square":
            draw.rectangle(corners, fill=colour)
        else:
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=colour)
    return image


def place_boxes(rng: random.Random, n: int, size: int, min_side: int, max_side: int) -> list[Box]:
    """``n`` non-overlapping square boxes inside a ``size x size`` image (rejection sampling)."""
    boxes: list[Box] = []
    for _ in range(1000 * n):
        if len(boxes) == n:
            break
        side = rng.randint(min_side, max_side)
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        box = (float(x), float(y), float(x + side), float(y + side))
        if all(box_iou(box, other) == 0.0 and not _touch(box, other) for other in boxes):
            boxes.append(box)
    if len(boxes) < n:
        raise ValueError(f"cannot place {n} shapes of {min_side}-{max_side} px in a {size} px image; "
                         "use a larger --image-size")
    return boxes


def _touch(a: Box, b: Box, gap: float = 2.0) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def where(box: Box, size: int) -> str:
    """A coarse location phrase: "upper left", "middle right", "lower center", ... or "center"."""
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    vertical = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    return "center" if (vertical, horizontal) == ("middle", "center") else f"{vertical} {horizontal}"


def _random_shape_name(rng: random.Random) -> tuple[str, str]:
    return rng.choice(list(COLOURS)), rng.choice(SHAPES)


def _distractors(rng: random.Random, boxes: list[Box], avoid: str) -> list[Shape]:
    shapes = []
    for box in boxes:
        colour, kind = _random_shape_name(rng)
        while f"{colour} {kind}" == avoid:
            colour, kind = _random_shape_name(rng)
        shapes.append(Shape(colour, kind, box))
    return shapes


def _int_box(box: Box) -> list[int]:
    return [int(v) for v in box]


def _box_text(box: Box) -> str:
    return "[" + ", ".join(str(v) for v in _int_box(box)) + "]"


def grounding(rng: random.Random, size: int, distractors: int = 2) -> tuple[list[Shape], dict[str, Any]]:
    """One target shape and up to ``distractors`` shapes of other kinds."""
    colour, kind = _random_shape_name(rng)
    boxes = place_boxes(rng, 1 + rng.randint(0, distractors), size, max(8, size // 9), max(12, size * 5 // 14))
    target = Shape(colour, kind, boxes[0])
    shapes = [target, *_distractors(rng, boxes[1:], target.name)]
    record = {
        "prompt": f"Where is the {target.name}? Answer with its bounding box [x1, y1, x2, y2].",
        "response": f"<think>The {target.name} is in the {where(target.box, size)} of the image.</think>"
                    f"<answer>{_box_text(target.box)}</answer>",
        "boxes": [_int_box(target.box)],
    }
    return shapes, record


def counting(rng: random.Random, size: int, distractors: int = 3) -> tuple[list[Shape], dict[str, Any]]:
    """Zero to five target shapes among up to ``distractors`` shapes of other kinds."""
    colour, kind = _random_shape_name(rng)
    n_target, n_other = rng.randint(0, 5), rng.randint(0, distractors)
    boxes = place_boxes(rng, n_target + n_other, size, max(6, size // 12), max(10, size // 6))
    shapes = [Shape(colour, kind, box) for box in boxes[:n_target]]
    shapes += _distractors(rng, boxes[n_target:], f"{colour} {kind}")
    rng.shuffle(shapes)
    steps = ", ".join(str(i) for i in range(1, n_target + 1)) or "none"
    record = {
        "prompt": f"How many {colour} {kind}s are there? Answer with a number.",
        "response": f"<think>I count the {colour} {kind}s one by one: {steps}.</think><answer>{n_target}</answer>",
        "answer": str(n_target),
    }
    return shapes, record


def classification(rng: random.Random, size: int, distractors: int = 0) -> tuple[list[Shape], dict[str, Any]]:
    """A single shape; the class is its colour and kind (``distractors`` is not used)."""
    colour, kind = _random_shape_name(rng)
    box = place_boxes(rng, 1, size, size // 4, size * 3 // 4)[0]
    corners = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}[kind]
    record = {
        "prompt": "What is the shape in the image? Answer with its colour and shape, e.g. 'green circle'.",
        "response": f"<think>The shape is {colour} and has {corners}.</think><answer>{colour} {kind}</answer>",
        "label": f"{colour} {kind}",
    }
    return [Shape(colour, kind, box)], record


def detection(rng: random.Random, size: int, distractors: int = 0) -> tuple[list[Shape], dict[str, Any]]:
    """One to four labelled shapes, all of which are targets (``distractors`` is not used)."""
    boxes = place_boxes(rng, rng.randint(1, 4), size, max(8, size // 8), max(12, size // 3))
    shapes = [Shape(*_random_shape_name(rng), box) for box in boxes]
    objects = ", ".join(f'{{"bbox_2d": {_box_text(s.box)}, "label": "{s.name}"}}' for s in shapes)
    record = {
        "prompt": 'Detect every shape. Answer with a JSON list of {"bbox_2d": [x1, y1, x2, y2], "label": ...}.',
        "response": f"<think>I see {len(shapes)} shape{'s' if len(shapes) > 1 else ''}.</think>"
                    f"<answer>[{objects}]</answer>",
        "boxes": [_int_box(s.box) for s in shapes],
        "labels": [s.name for s in shapes],
    }
    return shapes, record


TASKS: dict[str, Callable[[random.Random, int, int], tuple[list[Shape], dict[str, Any]]]] = {
    "grounding": grounding,
    "counting": counting,
    "classification": classification,
    "detection": detection,
}


def synthesize(task: str, out_dir: str | Path, n: int, seed: int = 0, image_size: int = 112,
               progress: bool = True, distractors: int | None = None) -> Path:
    """Write ``n`` samples of ``task`` to ``out_dir/<task>.jsonl`` with images in ``out_dir/images``.

    ``distractors`` caps the shapes of other kinds drawn beside the targets (grounding: 2 by
    default, counting: 3; the other tasks have none).

    Returns:
        The path of the JSONL file.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if n <= 0 or image_size < 48 or (distractors is not None and distractors < 0):
        raise ValueError("need n >= 1, image_size >= 48 and distractors >= 0")
    extra = {} if distractors is None else {"distractors": distractors}
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{task}:{seed}")
    jsonl = out / f"{task}.jsonl"
    with jsonl.open("w") as handle:
        for index in tqdm(range(n), desc=f"synth {task}", disable=not progress, unit="sample"):
            shapes, record = TASKS[task](rng, image_size, **extra)
            name = f"images/{task}_{seed}_{index:06d}.png"
            draw_scene(shapes, image_size, rng).save(out / name)
            handle.write(json.dumps({"id": f"{task}-{seed}-{index}", "images": [name], **record}) + "\n")
    return jsonl
