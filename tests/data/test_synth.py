"""Synthetic tasks: valid files, determinism, and ground truth checked against the drawn pixels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vlreason.data import check_jsonl, read_jsonl
from vlreason.data.synth import COLOURS, SHAPES, TASKS, synthesize, where

N = 48
SHAPE_COLOURS = {tuple(rgb) for rgb in COLOURS.values()}


def synth(task: str, out: Path, n: int = N, seed: int = 0, image_size: int = 112) -> Path:
    return synthesize(task, out, n=n, seed=seed, image_size=image_size, progress=False)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def content(path: Path) -> list[dict]:
    """The records without their seed-dependent names (id, image paths)."""
    return [{k: v for k, v in r.items() if k not in ("id", "images")} for r in records(path)]


def pixels(jsonl: Path, record: dict) -> np.ndarray:
    return np.asarray(Image.open(jsonl.parent / record["images"][0]).convert("RGB"))  # [H, W, 3]


def colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    return np.all(image == COLOURS[colour], axis=-1)  # [H, W]


def is_shape_colour(pixel: np.ndarray) -> bool:
    return tuple(int(c) for c in pixel) in SHAPE_COLOURS


def classify(mask: np.ndarray) -> str:
    """Kind of one drawn shape from its mask: squares fill their box, circles are symmetric top to bottom,
    triangles have a point on top and a full base."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    if crop.all():
        return "square"
    return "circle" if crop[0].sum() == crop[-1].sum() else "triangle"


def assert_tight(image: np.ndarray, box: list[int], colour: str) -> str:
    """The box's border rows and columns hold pixels of ``colour``, the ring just outside the box holds no
    shape colour, and the shape's pixels inside the box are one connected component. Returns its kind."""
    x1, y1, x2, y2 = box
    height, width = image.shape[:2]
    inside = colour_mask(image[y1:y2, x1:x2], colour)
    assert inside[0].any() and inside[-1].any(), f"top/bottom rows of {box} miss the {colour} shape"
    assert inside[:, 0].any() and inside[:, -1].any(), f"left/right columns of {box} miss the {colour} shape"
    ring = []
    for x in range(max(x1 - 1, 0), min(x2 + 1, width)):
        ring += [image[y, x] for y in (y1 - 1, y2) if 0 <= y < height]
    for y in range(y1, y2):
        ring += [image[y, x] for x in (x1 - 1, x2) if 0 <= x < width]
    assert not any(is_shape_colour(p) for p in ring), f"a shape reaches outside {box}"
    labels, n = ndimage.label(inside)
    assert n == 1, f"{n} pieces of {colour} inside {box}"
    return classify(inside)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    """Every task written once (seed 0) into one folder, as the CLI would."""
    out = tmp_path_factory.mktemp("synth")
    for task in TASKS:
        synth(task, out)
    return out


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_writes_a_valid_file(synth_dir, task):
    path = synth_dir / f"{task}.jsonl"
    assert check_jsonl(path) == (N, [])
    samples = read_jsonl(path).samples
    assert len({s.id for s in samples}) == N
    assert all(s.response and "<think>" in s.response and "<answer>" in s.response for s in samples)
    assert all(s.image_sizes == [(112, 112)] for s in samples)


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    for task in TASKS:
        a = synth(task, tmp_path / "a", n=8, seed=5)
        b = synth(task, tmp_path / "b", n=8, seed=5)
        c = synth(task, tmp_path / "c", n=8, seed=6)
        assert a.read_bytes() == b.read_bytes()
        images_a = sorted((tmp_path / "a" / "images").glob(f"{task}_*.png"))
        assert len(images_a) == 8
        for image in images_a:
            assert image.read_bytes() == (tmp_path / "b" / "images" / image.name).read_bytes()
        assert content(a) != content(c)
        images_c = sorted((tmp_path / "c" / "images").glob(f"{task}_*.png"))
        assert [p.read_bytes() for p in images_a] != [p.read_bytes() for p in images_c]


def test_grounding_boxes_are_tight_around_the_target(synth_dir):
    path = synth_dir / "grounding.jsonl"
    for record in records(path):
        colour, kind = re.match(r"Where is the (\w+) (\w+)\?", record["prompt"]).groups()
        (box,) = record["boxes"]
        assert assert_tight(pixels(path, record), box, colour) == kind
        assert f"<answer>{box}</answer>" in record["response"]


def test_detection_boxes_are_tight_and_labels_match_the_pixels(synth_dir):
    path = synth_dir / "detection.jsonl"
    kinds_seen = set()
    for record in records(path):
        image = pixels(path, record)
        assert len(record["boxes"]) == len(record["labels"]) >= 1
        for box, label in zip(record["boxes"], record["labels"], strict=True):
            colour, kind = label.split()
            centre = image[(box[1] + box[3]) // 2, (box[0] + box[2]) // 2]
            assert tuple(int(c) for c in centre) == COLOURS[colour], (record["id"], box, label)
            assert assert_tight(image, box, colour) == kind
            kinds_seen.add(kind)
        drawn = sum(ndimage.label(colour_mask(image, c))[1] for c in COLOURS)
        assert drawn == len(record["boxes"])  # no unlabelled shape in the image
    assert kinds_seen == set(SHAPES)


def test_classification_label_matches_the_single_shape(synth_dir):
    path = synth_dir / "classification.jsonl"
    for record in records(path):
        image = pixels(path, record)
        colour, kind = record["label"].split()
        mask = colour_mask(image, colour)
        assert ndimage.label(mask)[1] == 1
        assert classify(mask) == kind
        assert not any(colour_mask(image, other).any() for other in COLOURS if other != colour)


def test_counting_answers_equal_the_number_of_target_shapes(synth_dir):
    path = synth_dir / "counting.jsonl"
    answers = set()
    for record in records(path):
        colour, plural = re.match(r"How many (\w+) (\w+)s are", record["prompt"]).groups()
        labels, n = ndimage.label(colour_mask(pixels(path, record), colour))
        count = sum(classify(labels == i) == plural for i in range(1, n + 1))
        assert record["answer"] == str(count), record["id"]
        assert record["response"].endswith(f"<answer>{count}</answer>")
        answers.add(count)
    assert len(answers) >= 3  # the sample covers several different counts


def test_files_written_where_asked(tmp_path):
    path = synth("grounding", tmp_path / "deep" / "out", n=3)
    assert path == tmp_path / "deep" / "out" / "grounding.jsonl"
    assert [r["images"] for r in records(path)] == [[f"images/grounding_0_{i:06d}.png"] for i in range(3)]


def test_larger_images_stay_valid(tmp_path):
    for task in TASKS:
        assert check_jsonl(synth(task, tmp_path, n=4, image_size=256, seed=2)) == (4, [])
    assert check_jsonl(synth("counting", tmp_path, n=4, image_size=48, seed=3)) == (4, [])  # the smallest size


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'segmentation'; choose one of") as info:
        synth("segmentation", tmp_path)
    assert all(task in str(info.value) for task in TASKS)


@pytest.mark.parametrize(("n", "image_size"), [(5, 47), (5, 16), (0, 112), (-1, 112)])
def test_too_small_image_or_no_samples(tmp_path, n, image_size):
    with pytest.raises(ValueError, match="need n >= 1, image_size >= 48"):
        synth("grounding", tmp_path, n=n, image_size=image_size)
    assert not (tmp_path / "grounding.jsonl").exists()


@pytest.mark.parametrize("delta", [(-1, 0, 0, 0), (0, 0, 1, 0), (0, 1, 0, 0), (0, 0, 0, -1)])
def test_tightness_check_rejects_a_box_one_pixel_off(synth_dir, delta):
    """Guards the helper above: a box grown or shrunk by one pixel on any side is not tight."""
    path = synth_dir / "grounding.jsonl"
    record = records(path)[0]
    colour = re.match(r"Where is the (\w+)", record["prompt"]).group(1)
    box = [v + d for v, d in zip(record["boxes"][0], delta, strict=True)]
    with pytest.raises(AssertionError):
        assert_tight(pixels(path, record), box, colour)


def test_distractor_cap(tmp_path):
    def colours_drawn(path):
        pixels = set(Image.open(path).convert("RGB").getdata())
        return sum(colour in pixels for colour in COLOURS.values())

    alone = synthesize("grounding", tmp_path / "alone", n=20, seed=3, distractors=0, progress=False)
    crowded = synthesize("grounding", tmp_path / "crowded", n=20, seed=3, progress=False)
    counts = {name: [colours_drawn(p.parent / json.loads(line)["images"][0]) for line in p.read_text().splitlines()]
              for name, p in (("alone", alone), ("crowded", crowded))}
    assert counts["alone"] == [1] * 20
    assert max(counts["crowded"]) > 1
    with pytest.raises(ValueError, match="distractors >= 0"):
        synthesize("grounding", tmp_path / "bad", n=2, distractors=-1, progress=False)


@pytest.mark.parametrize(("box", "phrase"), [
    ((0, 0, 20, 20), "upper left"),
    ((46, 0, 66, 20), "upper center"),
    ((90, 46, 110, 66), "middle right"),
    ((46, 46, 66, 66), "center"),
    ((46, 92, 66, 112), "lower center"),
    ((92, 92, 112, 112), "lower right"),
])
def test_where_names_the_third_of_the_image_the_box_centre_falls_in(box, phrase):
    assert where(box, 112) == phrase


def test_grounding_thought_names_the_target_and_its_place(synth_dir):
    for record in records(synth_dir / "grounding.jsonl"):
        name = record["prompt"].removeprefix("Where is the ").split("?")[0]
        thought = f"<think>The {name} is in the {where(record['boxes'][0], 112)} of the image.</think>"
        assert record["response"].startswith(thought)
