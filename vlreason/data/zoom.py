"""A synthetic task that needs a zoom: the colour of a small dot inside a black frame on a large
canvas, among dots of other colours outside the frame. The frame fills one cell of a 3 x 3 grid,
so finding it is a coarse choice a small model learns quickly; reading its dot needs the crop.

At the model's pixel budget the canvas shrinks until each dot is a few pixels wide: the frame is
still visible, which dot lies inside it is not. Cropping the frame from the original canvas (the
``crop`` tool) shows the dot large enough to read. Two files describe the same samples:

* ``zoom.jsonl``: the question, a direct answer as the reference response (``<think>`` +
  ``<answer>``, no tool) and the ground truth ``label`` (the colour); GRPO and evaluation read
  its prompts;
* ``zoom_tools.jsonl``: the same questions as tool traces for SFT: the model crops the frame
  (``<tool_call>`` with ``bbox_2d`` in original pixels, which SFT rewrites into the family's
  convention), the tool replies with the crop (written by ``tools.crop_region`` at the model's
  pixel budget, exactly what the tool returns in a rollout), and the model answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from vlreason.data.synth import where
from vlreason.vision.boxes import Box
from vlreason.vision.crops import crop_region
from vlreason.vision.images import ResizePolicy

DOT_COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (225, 195, 30)}
QUESTION = "What colour is the small dot inside the black frame? Answer with one colour."


def draw_zoom_scene(rng: random.Random, canvas: int) -> tuple[Image.Image, Box, str]:
    """A light canvas cut into a 3 x 3 grid; a black frame fills one cell (inset by a tenth),
    holding one dot (1/32 of the side) at its centre, and two to four dots of other colours lie
    outside it. Returns the image, the frame box (original pixels) and the dot's colour."""
    cell, dot = canvas / 3, max(4, canvas // 32)
    column, row = rng.randrange(3), rng.randrange(3)
    inset = cell / 10
    frame = (round(column * cell + inset), round(row * cell + inset), round((column + 1) * cell - inset),
             round((row + 1) * cell - inset))
    colour = rng.choice(list(DOT_COLOURS))
    image = Image.new("RGB", (canvas, canvas), tuple(rng.randint(215, 250) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    draw.rectangle([frame[0], frame[1], frame[2] - 1, frame[3] - 1], outline=(0, 0, 0), width=max(2, canvas // 64))
    centres = [((frame[0] + frame[2]) / 2, (frame[1] + frame[3]) / 2, colour)]
    while len(centres) < 1 + rng.randint(2, 4):
        x, y = rng.uniform(dot, canvas - dot), rng.uniform(dot, canvas - dot)
        if not (frame[0] - dot <= x <= frame[2] + dot and frame[1] - dot <= y <= frame[3] + dot):
            centres.append((x, y, rng.choice([c for c in DOT_COLOURS if c != colour])))
    for x, y, name in centres:
        draw.ellipse([x - dot / 2, y - dot / 2, x + dot / 2 - 1, y + dot / 2 - 1], fill=DOT_COLOURS[name])
    return image, tuple(float(v) for v in frame), colour


def zoom_records(index: int, seed: int, frame: Box, colour: str, canvas: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The direct-answer record and the tool-trace record of one scene (without their images)."""
    place = where(frame, canvas)
    box = "[" + ", ".join(str(int(v)) for v in frame) + "]"
    call = f'<tool_call>\n{{"name": "crop", "arguments": {{"bbox_2d": {box}}}}}\n</tool_call>'
    direct = {"id": f"zoom-{seed}-{index}", "prompt": QUESTION, "label": colour,
              "response": f"<think>The frame is in the {place}; its dot is too small to read.</think>"
                          f"<answer>{colour}</answer>"}
    trace = {"id": f"zoom-{seed}-{index}", "label": colour, "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": f"<think>The frame is in the {place}. I zoom in on it.</think>{call}"},
        {"role": "tool", "content": [{"type": "image"}]},
        {"role": "assistant", "content": f"<think>The dot in the frame is {colour}.</think><answer>{colour}</answer>"},
    ]}
    return direct, trace


def synthesize_zoom(out_dir: str | Path, n: int, seed: int = 0, canvas: int = 1024,
                    resize: ResizePolicy | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Write ``n`` zoom samples to ``out_dir/zoom.jsonl`` and ``out_dir/zoom_tools.jsonl``.

    Args:
        canvas: side of the square canvas in pixels (>= 256).
        resize: the pixel budget the crops are written for (the model's ``VLM.resize``); default:
            the tiny models' (64 tokens of 32 px).

    Returns:
        The paths of the two files.
    """
    if n <= 0 or canvas < 256:
        raise ValueError("need n >= 1 and canvas >= 256")
    resize = resize or ResizePolicy(factor=32, min_pixels=4 * 32**2, max_pixels=64 * 32**2)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"zoom:{seed}")
    direct_path, trace_path = out / "zoom.jsonl", out / "zoom_tools.jsonl"
    with direct_path.open("w") as direct_file, trace_path.open("w") as trace_file:
        for index in tqdm(range(n), desc="synth zoom", disable=not progress, unit="sample"):
            image, frame, colour = draw_zoom_scene(rng, canvas)
            name, crop = f"images/zoom_{seed}_{index:06d}.png", f"images/zoom_{seed}_{index:06d}_crop.png"
            image.save(out / name)
            crop_region(image, frame, resize).save(out / crop)
            direct, trace = zoom_records(index, seed, frame, colour, canvas)
            direct_file.write(json.dumps({**direct, "images": [name]}) + "\n")
            trace_file.write(json.dumps({**trace, "images": [name, crop]}) + "\n")
    return direct_path, trace_path
