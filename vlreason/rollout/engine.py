"""The rollout engine protocol and its registry.

An engine turns B encoded prompts into G completions each. Every engine returns the same
``Rollouts``: token ids and a mask the loss can use directly, the decoded text rewards read,
and which completions hit the token limit. Engines are registered by name (``hf``; ``scripted``
replays given completions, for fast tests and debugging) in the same kind of registry as rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import BatchFeature

from vlreason.models.adapters import silent_special_ids
from vlreason.registry import Registry


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature`` 0 means greedy decoding (then ``n`` must be 1)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None  # seeds the sampler for this call (reproducible rollouts)
    # with several processes, this call's N rows are rows first_row .. first_row + N - 1 of one
    # draw of total_rows rows over all processes; engines draw their random numbers for all of
    # them, so each row gets what it would get in one process (None: this call is the whole draw)
    first_row: int = 0
    total_rows: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n ({self.n}) and max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if self.first_row < 0 or (self.total_rows is not None and self.total_rows <= self.first_row):
            raise ValueError(f"first_row {self.first_row} must lie in [0, total_rows {self.total_rows})")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("greedy decoding (temperature 0) gives n identical samples; use temperature > 0")


@dataclass
class Rollouts:
    """N = B * n completions, grouped by prompt: rows ``b*n .. b*n + n - 1`` continue prompt b.

    Attributes:
        completion_ids: ``[N, T]``, padded with the pad id after the end.
        completion_mask: ``[N, T]``, 1 on generated tokens up to and including end-of-sequence.
        texts: N decoded completions: special tokens removed, except those that carry meaning
            in text (Qwen-VL's box and reference tokens, ``models.adapters.TEXT_SPECIAL_TOKENS``).
        truncated: ``[N]`` bool, True where the completion reached ``max_new_tokens`` unfinished.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    truncated: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """``[N]`` completion lengths in tokens."""
        return self.completion_mask.sum(dim=1)


class RolloutEngine(Protocol):
    """Samples completions of encoded prompts."""

    def generate(self, prompt_inputs: BatchFeature, params: SamplingParams) -> Rollouts:
        """``prompt_inputs``: B left-padded prompts with their pixels (``VLM.encode``)."""
        ...


ENGINES = Registry("rollout engine", "vlreason.rollout_engines")


def build_engine(name: str, vlm: Any, **options: Any) -> RolloutEngine:
    """An engine by registered name, bound to ``vlm``."""
    return ENGINES.resolve(name)(vlm, **options)


def finish(completion_ids: torch.Tensor, eos_id: int, pad_id: int, tokenizer: Any) -> Rollouts:
    """Mask everything after the first end-of-sequence token and decode: ``[N, T]`` ids -> Rollouts."""
    is_eos = completion_ids == eos_id
    ended = is_eos.cumsum(dim=1)
    mask = ((ended == 0) | (is_eos & (ended == 1))).long()  # through the first EOS
    ids = completion_ids.masked_fill(mask == 0, pad_id)
    return Rollouts(completion_ids=ids, completion_mask=mask, texts=_decode(ids, tokenizer),
                    truncated=~is_eos.any(dim=1))


def _decode(ids: torch.Tensor, tokenizer: Any) -> list[str]:
    """Texts of ``[N, T]`` completion ids without the special tokens that mean nothing in text.
    ``skip_special_tokens=True`` would also drop Qwen-VL's box tokens, and with them every box
    the model wrote in its native grounding form."""
    silent = torch.tensor(silent_special_ids(tokenizer), dtype=ids.dtype)
    spoken = ~torch.isin(ids, silent)  # [N, T]
    return tokenizer.batch_decode([row[keep].tolist() for row, keep in zip(ids, spoken, strict=True)],
                                  skip_special_tokens=False)
