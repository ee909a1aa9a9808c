"""The synthetic video task: every answer is checked against the decoded frames themselves, and
the answers that depend on frame order change when the frames run backwards."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("av")

from vlreason.data import check_jsonl  # noqa: E402
from vlreason.data.synth import COLOURS  # noqa: E402
from vlreason.data.video_qa import DIRECTIONS, QTYPES, synthesize_video_qa  # noqa: E402
from vlreason.vision.video import FrameSampling, read_video  # noqa: E402

FRAMES = 16


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = synthesize_video_qa(tmp_path_factory.mktemp("video_qa"), n=24, seed=3, progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return path, records


def colour_mask(frames: np.ndarray, colour: str) -> np.ndarray:
    """``[T, H, W]``: pixels within a margin of ``colour`` (H.264 blurs edges a little)."""
    return (np.abs(frames.astype(int) - np.array(COLOURS[colour])).max(axis=-1) < 40)


def clip_frames(path, record) -> np.ndarray:
    video = path.parent / record["videos"][0]
    return read_video(video, FrameSampling(indices=tuple(range(FRAMES)))).frames


def test_the_file_is_valid_and_question_types_take_turns(samples):
    path, records = samples
    assert check_jsonl(path) == (24, [])
    assert [r["qtype"] for r in records[:6]] == list(QTYPES) * 2
    for record in records:
        assert record["response"].endswith(f"<answer>{record['answer']}</answer>")


def test_direction_answers_follow_the_shape_and_reverse_with_the_frames(samples):
    path, records = samples
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for record in (r for r in records if r["qtype"] == "direction"):
        colour = record["prompt"].split("the ")[1].split()[0]
        masks = colour_mask(clip_frames(path, record), colour)
        assert _direction(masks) == record["answer"]
        assert _direction(masks[::-1]) == opposite[record["answer"]]
        assert record["choices"] == list(DIRECTIONS)


def _direction(masks: np.ndarray) -> str:
    ys, xs = np.nonzero(masks[0])
    ye, xe = np.nonzero(masks[-1])
    dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def test_flash_counts_are_the_runs_of_visible_frames(samples):
    path, records = samples
    for record in (r for r in records if r["qtype"] == "flashes"):
        colour = record["prompt"].split("the ")[1].split()[0]
        visible = colour_mask(clip_frames(path, record), colour).sum(axis=(1, 2)) > 20
        runs = int(visible[0]) + int(np.sum(visible[1:] & ~visible[:-1]))
        assert str(runs) == record["answer"]


def test_the_first_shape_shows_earlier(samples):
    path, records = samples
    for record in (r for r in records if r["qtype"] == "first"):
        frames = clip_frames(path, record)
        onset = {}
        for name in record["choices"]:
            seen = colour_mask(frames, name.split()[0]).sum(axis=(1, 2)) > 20
            onset[name] = int(np.argmax(seen))
        assert min(onset, key=onset.get) == record["answer"]
        assert onset[record["answer"]] < max(onset.values())


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even size"):
        synthesize_video_qa(tmp_path, n=1, size=33)


def test_chosen_question_types_only(tmp_path):
    path = synthesize_video_qa(tmp_path / "d", n=4, size=32, frames=8, qtypes=("direction",), progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["qtype"] for r in records] == ["direction"] * 4
    assert all(r["answer"] in DIRECTIONS for r in records)
    with pytest.raises(ValueError, match="unknown question type"):
        synthesize_video_qa(tmp_path / "e", n=2, qtypes=("sideways",), progress=False)


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    first = synthesize_video_qa(tmp_path / "a", n=6, size=32, frames=8, progress=False).parent
    second = synthesize_video_qa(tmp_path / "b", n=6, size=32, frames=8, progress=False).parent
    assert (first / "video_qa.jsonl").read_text() == (second / "video_qa.jsonl").read_text()
    for clip in sorted((first / "videos").iterdir()):
        assert clip.read_bytes() == (second / "videos" / clip.name).read_bytes()
