"""A synthetic video task where the order of the frames decides the answer, for CPU work.

Each sample is a short clip of coloured shapes on a light background (rendered here, written as
H.264 MP4 with PyAV) and one of three questions:

* ``direction``: "Which way does the red circle move?" -> left / right / up / down (``choices``):
  the clip played backwards gives the opposite answer;
* ``flashes``: "How many times does the blue square flash?" -> 1-4 (``answer``, a number): the
  square shows and hides that many times;
* ``first``: "Which appears first, the red circle or the green triangle?" -> one of the two
  (``choices``): one appears early and stays, the other joins it later (played backwards, both
  are there from the start and the later one leaves first).

Every record carries ``qtype`` (the question type) for accuracy per type, a ``<think>`` +
``<answer>`` reference response, and its video under ``videos/``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlreason.data.synth import COLOURS, SHAPES

QTYPES = ("direction", "flashes", "first")
DIRECTIONS = ("left", "right", "up", "down")
_STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def synthesize_video_qa(out_dir: str | Path, n: int, seed: int = 0, size: int = 64, frames: int = 16,
                        fps: int = 8, progress: bool = True, qtypes: Sequence[str] = QTYPES) -> Path:
    """Write ``n`` samples (the question types ``qtypes`` in turn) to ``out_dir/video_qa.jsonl``
    with clips in ``out_dir/videos``.

    Args:
        size: side of the square frames in pixels (even, at least 32).
        frames: frames per clip (at least 8); ``fps``: their rate.

    Returns:
        The path of the JSONL file.
    """
    if n <= 0 or size < 32 or size % 2 or frames < 8 or fps <= 0:
        raise ValueError("need n >= 1, an even size >= 32, frames >= 8 and fps > 0")
    unknown = [q for q in qtypes if q not in QTYPES]
    if unknown or not qtypes:
        raise ValueError(f"unknown question type(s) {unknown}; choose from {', '.join(QTYPES)}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"video_qa:{seed}")
    path = out / "video_qa.jsonl"
    with path.open("w") as handle:
        for index in tqdm(range(n), desc="synth video_qa", disable=not progress, unit="clip"):
            qtype = qtypes[index % len(qtypes)]
            clip, record = _SAMPLERS[qtype](rng, size, frames)
            name = f"videos/video_qa_{seed}_{index:06d}.mp4"
            write_clip(clip, out / name, fps)
            handle.write(json.dumps({"id": f"video_qa-{seed}-{index}", "videos": [name], "qtype": qtype,
                                     **record}) + "\n")
    return path


def write_clip(frames: list[Image.Image], path: Path, fps: int) -> None:
    """Encode RGB frames as lossless H.264 (yuv420p) MP4, the same bytes every time: x264 at
    ``qp`` 0 decodes to exactly the frames given (at ``crf`` 18 its rate control wrote different
    bits in some of 150 clips between runs at once here, and they decoded differently), and the
    container holds no creation time or version strings (``bitexact``)."""
    try:
        import av
    except ImportError as exc:
        raise RuntimeError("writing videos needs PyAV: pip install 'vlreason[video]'") from exc
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "qp": "0"})
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _canvas(rng: random.Random) -> tuple[int, int, int]:
    """A light background colour."""
    return tuple(rng.randint(215, 250) for _ in range(3))


def _draw(image: Image.Image, kind: str, colour: str, centre: tuple[float, float], side: float) -> None:
    x, y, half = centre[0], centre[1], side / 2
    box = (x - half, y - half, x + half, y + half)
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif kind == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=COLOURS[colour])


def _direction(rng: random.Random, size: int, frames: int) -> tuple[list[Image.Image], dict[str, Any]]:
    """A shape crosses most of the frame in one direction."""
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    direction = rng.choice(DIRECTIONS)
    side = size / 5
    dx, dy = _STEPS[direction]
    start_along, travel = size * 0.2, size * 0.6
    across = rng.uniform(size * 0.3, size * 0.7)
    background = _canvas(rng)
    clip = []
    for t in range(frames):
        along = start_along + travel * t / (frames - 1)
        x = along if dx > 0 else size - along if dx < 0 else across
        y = along if dy > 0 else size - along if dy < 0 else across
        image = Image.new("RGB", (size, size), background)
        _draw(image, kind, colour, (x, y), side)
        clip.append(image)
    name = f"{colour} {kind}"
    start, end = _side_of(direction, start=True), _side_of(direction, start=False)
    return clip, {
        "prompt": f"Which way does the {name} move? Answer left, right, up or down.",
        "response": f"<think>The {name} starts near the {start} and ends near the {end}.</think>"
                    f"<answer>{direction}</answer>",
        "answer": direction,
        "choices": list(DIRECTIONS),
    }


def _side_of(direction: str, start: bool) -> str:
    """Where a shape moving ``direction`` starts (or ends)."""
    sides = {"left": ("right", "left"), "right": ("left", "right"), "up": ("bottom", "top"), "down": ("top", "bottom")}
    return sides[direction][0 if start else 1]


def _flashes(rng: random.Random, size: int, frames: int) -> tuple[list[Image.Image], dict[str, Any]]:
    """A shape shows for a few frames, hides, shows again: ``count`` times in all."""
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    count = rng.randint(1, 4)
    visible = _flash_frames(rng, frames, count)
    centre = (rng.uniform(size * 0.3, size * 0.7), rng.uniform(size * 0.3, size * 0.7))
    background = _canvas(rng)
    clip = []
    for t in range(frames):
        image = Image.new("RGB", (size, size), background)
        if t in visible:
            _draw(image, kind, colour, centre, size / 4)
        clip.append(image)
    name = f"{colour} {kind}"
    times = "once" if count == 1 else f"{count} times"
    return clip, {
        "prompt": f"How many times does the {name} flash (appear and then disappear)? Answer with a number.",
        "response": f"<think>The {name} appears {times}, with empty frames between.</think><answer>{count}</answer>",
        "answer": str(count),
    }


def _flash_frames(rng: random.Random, frames: int, count: int) -> set[int]:
    """``count`` runs of visible frames, separated (and ended) by at least one empty frame."""
    slot = frames // count  # each flash gets its own stretch of the clip
    visible = set()
    for k in range(count):
        length = rng.randint(1, max(1, slot // 2))
        start = k * slot + rng.randint(0, slot - length - 1)
        visible.update(range(start, start + length))
    return visible


def _first(rng: random.Random, size: int, frames: int) -> tuple[list[Image.Image], dict[str, Any]]:
    """Two shapes of different colours; the first appears early and stays, the second appears
    later and stays."""
    colour_a, colour_b = rng.sample(list(COLOURS), 2)  # different colours: told apart at a glance
    kind_a, kind_b = rng.choice(SHAPES), rng.choice(SHAPES)
    early = rng.randint(0, frames // 4)
    late = rng.randint(frames // 2, frames - 3)
    left_first = rng.random() < 0.5
    centre_a = (size * (0.28 if left_first else 0.72), rng.uniform(size * 0.3, size * 0.7))
    centre_b = (size * (0.72 if left_first else 0.28), rng.uniform(size * 0.3, size * 0.7))
    background = _canvas(rng)
    clip = []
    for t in range(frames):
        image = Image.new("RGB", (size, size), background)
        if t >= early:
            _draw(image, kind_a, colour_a, centre_a, size / 5)
        if t >= late:
            _draw(image, kind_b, colour_b, centre_b, size / 5)
        clip.append(image)
    first, second = f"{colour_a} {kind_a}", f"{colour_b} {kind_b}"
    choices = [first, second] if rng.random() < 0.5 else [second, first]
    return clip, {
        "prompt": f"Which appears first, the {choices[0]} or the {choices[1]}? Answer with its name.",
        "response": f"<think>The {first} is there from early on; the {second} only shows later.</think>"
                    f"<answer>{first}</answer>",
        "answer": first,
        "choices": choices,
    }


_SAMPLERS = {"direction": _direction, "flashes": _flashes, "first": _first}
