"""The ``semantic_consistency`` reward (VideoRFT): reasoning that describes what the video shows.

The reasoning (``pred_think``, its first sentence dropped: it usually restates the question) and
``frames`` frames spread evenly over each of the sample's videos are embedded with a CLIP or
SigLIP-style model (``models.embedding``); each frame scores ``min(1, 2 * max(cos, 0))`` and the
reward is their mean, paid only when the answer is correct (``answers.answer_correct``; 0 when
it is wrong, so plausible-sounding reasoning never pays for a wrong answer).

The model loads on the first call, and each video's frame embeddings are computed once and kept
(the G completions of a group share them).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlreason.models.embedding import ImageTextEmbedder
from vlreason.rewards.answers import answer_correct
from vlreason.rewards.api import Reward, Score, register_reward
from vlreason.vision.video import FrameSampling, probe_video, read_video

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def reasoning_text(think: str | None, drop_first_sentence: bool = True) -> str:
    """The reasoning to compare with the frames: ``think`` without its first sentence (when
    ``drop_first_sentence``), stripped; empty when nothing is left."""
    text = (think or "").strip()
    if drop_first_sentence:
        parts = _SENTENCE_END.split(text, maxsplit=1)
        text = parts[1].strip() if len(parts) > 1 else ""
    return text


def frame_scores(text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """``[F]`` per-frame scores ``min(1, 2 * max(cos, 0))`` of one text embedding ``[d]`` against
    frame embeddings ``[F, d]`` (both unit length)."""
    return (2 * (frames @ text).clamp(min=0)).clamp(max=1)


@register_reward("semantic_consistency")
class SemanticConsistencyReward(Reward):
    """Mean frame-text agreement of the reasoning, for correct answers (VideoRFT). None for
    samples without videos or without ground truth; 0 for a wrong answer or no reasoning left
    after the first sentence.

    Args:
        model: a hub id or local folder of a CLIP or SigLIP model, or ``tiny-clip`` (random, for tests).
        frames: frames per video, spread evenly from its first frame to its last.
        device: where the model runs (default: the first GPU when there is one, else the CPU).
        batch_size: texts or frames per forward pass.
        drop_first_sentence: compare the reasoning without its first sentence (VideoRFT).
        cache_videos: videos whose frame embeddings are kept (least recently used dropped).
    """

    inputs = ("pred_think", "pred_answer", "answer", "label", "choices", "video_paths")
    optional = ("answer", "label", "choices")

    def __init__(self, model: str = "google/siglip-base-patch16-224", frames: int = 8, device: str | None = None,
                 batch_size: int = 32, drop_first_sentence: bool = True, cache_videos: int = 256):
        super().__init__()
        if frames < 1 or batch_size < 1 or cache_videos < 0:
            raise ValueError(f"need frames >= 1, batch_size >= 1 and cache_videos >= 0 (got {frames}, {batch_size}, "
                             f"{cache_videos})")
        self.model, self.frames, self.device, self.batch_size = model, frames, device, batch_size
        self.drop_first_sentence = drop_first_sentence
        self.cache_videos = cache_videos
        self._embedder: ImageTextEmbedder | None = None
        self._video_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without the loaded model and cache (a worker loads its own)."""
        return self.__dict__ | {"_embedder": None, "_video_cache": OrderedDict()}

    def __call__(self, completions: Sequence[Any], **columns: Any) -> list[Score]:
        """One batched pass: the texts of the rows that need one, each video's frames once."""
        scores: list[Score] = []
        pending: list[tuple[int, str, list[str]]] = []
        for i, (think, pred, answer, label, choices, videos) in enumerate(self.rows(completions, columns)):
            correct = answer_correct(pred, answer, label, choices)
            text = reasoning_text(think, self.drop_first_sentence)
            scores.append(None if not videos or correct is None else 0.0)
            if videos and correct and text:
                pending.append((i, text, list(videos)))
        if pending:
            texts = self._loaded().texts([text for _, text, _ in pending])
            for (i, _, videos), text in zip(pending, texts, strict=True):
                frames = torch.cat([self._video_embeddings(path) for path in videos])
                scores[i] = float(frame_scores(text, frames).mean())
        return scores

    def score(self, *values: Any) -> Score:
        raise TypeError("semantic_consistency scores whole batches; call it with completions and columns")

    def _loaded(self) -> ImageTextEmbedder:
        if self._embedder is None:
            self._embedder = ImageTextEmbedder.load(self.model, self.device, self.batch_size)
        return self._embedder

    def _video_embeddings(self, path: str) -> torch.Tensor:
        """``[F, d]`` embeddings of the video's ``frames`` evenly spread frames (cached)."""
        if path in self._video_cache:
            self._video_cache.move_to_end(path)
            return self._video_cache[path]
        count = probe_video(path).frame_count
        indices = tuple(int(i) for i in np.unique(np.linspace(0, count - 1, min(self.frames, count)).round()))
        clip = read_video(path, FrameSampling(indices=indices))
        embeddings = self._loaded().images([Image.fromarray(frame) for frame in clip.frames])
        if self.cache_videos:
            self._video_cache[path] = embeddings
            if len(self._video_cache) > self.cache_videos:
                self._video_cache.popitem(last=False)
        return embeddings

