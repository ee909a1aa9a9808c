"""One question about images or videos, answered: what the demo's chat and the Python API call.

    from vlreason.inference import predict
    result = predict("runs/grounding/grpo/final", "Where is the red triangle?", images=["scene.png"])
    result.answer, result.boxes  # boxes in pixels of the original first image

The prompt is built as training builds it (the family's chat template, images fitted to the
model's pixel budget, tool schemas in the system prompt when ``tools`` are given), the answer is
sampled with the HF engine through the same agent loop (greedy at ``temperature`` 0), and the
final turn is parsed as rewards parse it (``rewards.parsing.parse_completion``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlreason.data.batch import Media
from vlreason.models.adapters import silent_special_ids
from vlreason.models.vlm import VLM, load_vlm
from vlreason.rewards.parsing import PredBox, parse_completion
from vlreason.rollout.agent import AgentLoop, build_agent
from vlreason.rollout.engine import SamplingParams, encode_prompts
from vlreason.rollout.hf import HFEngine
from vlreason.vision.images import load_image
from vlreason.vision.video import FrameSampling


@dataclass
class Prediction:
    """A model's reply: the final turn's text, its parsed answer, reasoning and boxes (original
    pixels of the first image), and with tools every turn and call with the images they showed."""

    text: str
    answer: str | None
    think: str | None
    boxes: list[PredBox]
    turns: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_images: list[Image.Image] = field(default_factory=list)


def predict(model: VLM | str | Path, question: str, images: Sequence[Image.Image | str | Path] = (),
            videos: Sequence[str | Path] = (), *, temperature: float = 0.0, max_new_tokens: int = 256,
            tools: Sequence[str] = (), max_turns: int = 3, seed: int | None = None,
            frames: FrameSampling | None = None, on_text: Callable[[str], None] | None = None) -> Prediction:
    """Ask ``model`` (a loaded ``VLM``, or a hub id, folder or tiny preset) ``question`` about
    ``images`` (PIL images or paths) and ``videos`` (paths; ``frames`` says which frames, default
    ``FrameSampling()``). ``tools``: tool specs the model may call (multi-turn, up to ``max_turns``).
    ``on_text``: called with the text of the turn being written, token by token (streaming).

    Raises:
        ValueError: an empty question, or images/videos that cannot be read (the file and why).
    """
    if not question.strip():
        raise ValueError("ask a question")
    vlm = model if isinstance(model, VLM) else load_vlm(model)
    originals = [load_image(image) for image in images]
    read_clip = vlm.use_video(frames or FrameSampling())
    clips = [read_clip(str(path)) for path in videos]
    content = [{"type": "image"}] * len(originals) + [{"type": "video"}] * len(clips)
    conversation = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    agent = build_agent("tools", tools) if tools else None
    engine = HFEngine(vlm)
    if on_text is not None:
        engine.on_step = _streamer(vlm, on_text)
    loop = AgentLoop(vlm, engine, agent, max_turns=max_turns, max_tokens=max_turns * max_new_tokens * 4)
    prompts = encode_prompts(vlm, [conversation], [Media(originals, clips)], loop.tool_schemas)
    vlm.model.eval()
    out = loop.run(prompts, SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
    text = out.texts[0]
    info = prompts.infos[0]
    parsed = parse_completion(text, vlm.box_decoder(info), info[0].original_size if info else None,
                              truncated=bool(out.truncated[0]))
    ids = out.ids[0].tolist()
    return Prediction(text=text, answer=parsed.answer, think=parsed.think, boxes=parsed.boxes,
                      turns=[loop.decode(ids[start:stop]) for start, stop in out.turns[0]],
                      tool_calls=out.tool_calls[0], tool_images=list(out.images[0]))


def _streamer(vlm: VLM, on_text: Callable[[str], None]) -> Callable[[int, torch.Tensor], None]:
    """An ``HFEngine.on_step`` that hands ``on_text`` the first row's turn so far, decoded."""
    tokens: list[int] = []
    silent = set(silent_special_ids(vlm.tokenizer)) | {vlm.tokenizer.pad_token_id}

    def step(index: int, sampled: torch.Tensor) -> None:
        if index == 0:
            tokens.clear()
        token = int(sampled[0])
        if token not in silent:
            tokens.append(token)
            on_text(vlm.tokenizer.decode(tokens, skip_special_tokens=False))

    return step
