"""The rollout engine protocol: prompts with their media in, trajectories out.

An engine samples; it does not decide what a turn means. ``RolloutEngine.start`` opens a
session over B prompts sampled ``n`` times each (N = B * n rows, rows ``b*n .. b*n + n - 1``
continue prompt b); the agent loop (``vlreason.rollout.agent``) then asks the session for one
model turn of every running row (``sample``), keeps the rows that go on (``keep``) and appends
their observations — tool replies with their images — (``extend``), turn after turn, closes the
session (``close``) and builds the ``Trajectories`` the trainer, the rewards and the logs read.

Engines receive the prompts with their media (``PromptBatch``: the messages, the rendered text,
the original and the resized images with their ``ImageInfo``, and the encoded batch), so an
in-process engine uses the encoded tensors and a server-style engine can send text and images.
Token ids go in and out; nothing is re-tokenised between turns. ``update_weights(model)`` is
called after every optimizer step (a no-op for an engine that samples from the trained model
itself). Engines are registered by name (``hf``; ``scripted`` replays given turns, for tests and
debugging) in the same kind of registry as rewards and tools; an engine that samples from
prompts with videos says so with the class attribute ``takes_video = True``, and one that can take
earlier observation images out of view (the agent's visual memory window, ``EncodedObservation.
hide``) with ``hides_tokens = True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import BatchFeature

from vlreason.choices import Choice
from vlreason.data.batch import Media
from vlreason.data.schema import Message
from vlreason.models.prefix import Continuation, HiddenSpan
from vlreason.models.vlm import VLM
from vlreason.registry import Registry
from vlreason.vision.images import ImageInfo
from vlreason.vision.video import Clip


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature`` 0 means greedy decoding (then ``n`` must be 1)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64  # per model turn
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
class PromptBatch:
    """B prompts as every engine receives them.

    Attributes:
        messages: the conversations (``{"role", "content"}`` messages).
        texts: each rendered by the family's chat template, generation prompt included.
        images: each prompt's RGB images in original resolution (what tools crop from).
        resized: the same images at the model's input size (what the model sees).
        infos: original and model-input size of every image.
        inputs: the encoded, left-padded batch (``VLM.encode``, videos included) for engines in
            this process.
        clips: each prompt's decoded videos (what tools that select frames read).
    """

    messages: list[list[Message]]
    texts: list[str]
    images: list[list[Image.Image]]
    resized: list[list[Image.Image]]
    infos: list[list[ImageInfo]]
    inputs: BatchFeature
    clips: list[list[Clip]]

    def __len__(self) -> int:
        return len(self.messages)


@dataclass
class ModelTurn:
    """One model turn of one row: the tokens sampled (through end-of-sequence when it ended),
    their log-probs under the sampling distribution when the engine has them, and whether the
    turn ended with end-of-sequence (False: it ran out of tokens)."""

    ids: list[int]
    logprobs: list[float] | None
    ended: bool


@dataclass
class EncodedObservation:
    """An observation as engines take it: its token ids (image placeholders expanded), the pixel
    inputs of its images (``pixel_values`` ``[P, D]`` / ``image_grid_thw`` ``[I, 3]``; empty
    without images), the images themselves at model-input size (for engines that encode them),
    and the ``(start, stop)`` spans of the row's earlier tokens (counted after the prompt) that
    this observation and everything after it no longer see."""

    ids: list[int]
    pixels: dict[str, torch.Tensor]
    images: list[Image.Image]
    hide: list[tuple[int, int]] = field(default_factory=list)


class EngineSession(Protocol):
    """The running rows of one ``RolloutEngine.start`` call, in order."""

    def sample(self, max_new_tokens: Sequence[int]) -> list[ModelTurn]:
        """One model turn for every running row, each within its own token budget."""
        ...

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with these running rows only (indices into the current rows, in order)."""
        ...

    def extend(self, observations: Sequence[EncodedObservation]) -> None:
        """Append an observation to every running row (taking its ``hide`` spans out of view first)."""
        ...

    def close(self) -> None:
        """The rollout is over (an engine may free memory for training)."""
        ...


class RolloutEngine(Protocol):
    """Samples model turns of prompts."""

    def start(self, prompts: PromptBatch, params: SamplingParams) -> EngineSession:
        """A session over ``len(prompts) * params.n`` rows."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """The trained model after an optimizer step (engines that sample from it need nothing)."""
        ...


class StopReason(Choice):
    """Why a trajectory ended."""

    END = "end"  # the model finished a turn without calling a tool
    TOKENS = "token_budget"  # a model turn ran out of tokens before its end-of-sequence
    TURNS = "turn_budget"  # the model called a tool in its last allowed turn
    CONTEXT = "context"  # the next observation (or any further turn) would not fit the token budget


@dataclass
class Trajectories:
    """N trajectories grouped by prompt (rows ``b*n .. b*n + n - 1`` continue prompt b): what
    follows each prompt, model turns and the observations between them.

    Attributes:
        ids: ``[N, T]`` token ids, right-padded with the pad id.
        attention_mask: ``[N, T]``, 1 on every real token.
        loss_mask: ``[N, T]``, 1 on the tokens the model wrote (each turn through its
            end-of-sequence), 0 on observations (tool replies, injected turns, image pads) and padding.
        texts: N decoded final model turns (what rewards parse), special tokens removed except
            those that carry meaning in text (``models.adapters.TEXT_SPECIAL_TOKENS``).
        stops: N ``StopReason``s.
        turns: per row, the ``(start, stop)`` token span of each model turn in ``ids``.
        pixels: per row, the pixel inputs of the images its observations hold (``pixel_values``
            ``[P, D]``, ``image_grid_thw`` ``[I, 3]``; empty without images).
        logprobs: ``[N, T]`` sampling log-probs on model tokens (0 elsewhere), or None when the
            engine has none.
        tool_calls: per row, one record per tool call: ``name``, ``arguments``, ``error`` (None
            when it ran).
        images: per row, the images its observations showed (model-input size).
        hidden: per row, the spans of ``ids`` its later tokens do not see (the visual memory window).
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    texts: list[str]
    stops: list[StopReason]
    turns: list[list[tuple[int, int]]]
    pixels: list[dict[str, torch.Tensor]]
    logprobs: torch.Tensor | None = None
    tool_calls: list[list[dict[str, Any]]] = field(default_factory=list)
    images: list[list[Image.Image]] = field(default_factory=list)
    hidden: list[list[HiddenSpan]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows = self.ids.shape[0]
        self.tool_calls = self.tool_calls or [[] for _ in range(rows)]
        self.images = self.images or [[] for _ in range(rows)]
        self.hidden = self.hidden or [[] for _ in range(rows)]

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def truncated(self) -> torch.Tensor:
        """``[N]`` bool: the last model turn ran out of tokens before it ended."""
        return torch.tensor([stop is StopReason.TOKENS for stop in self.stops], dtype=torch.bool)

    @property
    def lengths(self) -> torch.Tensor:
        """``[N]`` tokens the model wrote."""
        return self.loss_mask.sum(dim=1)

    def select(self, rows: Sequence[int]) -> Trajectories:
        """These rows, in this order."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        pick = lambda values: [values[i] for i in index.tolist()]  # noqa: E731
        return Trajectories(self.ids[index], self.attention_mask[index], self.loss_mask[index], pick(self.texts),
                            pick(self.stops), pick(self.turns), pick(self.pixels),
                            None if self.logprobs is None else self.logprobs[index], pick(self.tool_calls),
                            pick(self.images), pick(self.hidden))

    def without_media(self) -> Trajectories:
        """A copy without observation pixels and images (small enough to send between processes)."""
        rows = len(self)
        return replace(self, pixels=[{} for _ in range(rows)], images=[[] for _ in range(rows)])

    def continuation(self, rows: slice) -> Continuation:
        """The model's input for ``rows``: tokens, attention, the observation images' pixels and
        the spans out of view."""
        pixels = [p for p in self.pixels[rows] if p]
        counts = [int(p["image_grid_thw"].shape[0]) if p else 0 for p in self.pixels[rows]]
        hidden = self.hidden[rows]
        if not pixels:
            return Continuation(self.ids[rows], self.attention_mask[rows], images_per_row=counts, hidden=hidden)
        return Continuation(self.ids[rows], self.attention_mask[rows], torch.cat([p["pixel_values"] for p in pixels]),
                            torch.cat([p["image_grid_thw"] for p in pixels]), counts, hidden)

    def reward_columns(self) -> dict[str, list[Any]]:
        """What rewards read about each trajectory besides its text: ``tool_calls`` (records),
        ``tool_errors`` (failed calls), ``turns`` (model turns), ``images_seen`` (observation
        images) and ``images_dropped`` (those the visual memory window took out of view)."""
        return {"tool_calls": self.tool_calls,
                "tool_errors": [sum(call["error"] is not None for call in calls) for calls in self.tool_calls],
                "turns": [len(spans) for spans in self.turns],
                "images_seen": [len(images) for images in self.images],
                "images_dropped": [len(spans) for spans in self.hidden]}


def encode_prompts(vlm: VLM, conversations: Sequence[Sequence[Message]], media: Sequence[Media],
                   tools: Sequence[dict[str, Any]] | None = None) -> PromptBatch:
    """B conversations with their media (original images, decoded video clips) as a
    ``PromptBatch`` (``tools``: the tool schemas the system prompt lists)."""
    fitted = [vlm.prepare_images(row.images) for row in media]
    resized, infos = [row for row, _ in fitted], [row for _, row in fitted]
    inputs = vlm.encode_resized(conversations, resized, infos, tools=tools, videos=[row.clips for row in media])
    return PromptBatch(messages=[list(conv) for conv in conversations], texts=vlm.render(conversations, True, tools),
                       images=[list(row.images) for row in media], resized=resized, infos=infos, inputs=inputs,
                       clips=[list(row.clips) for row in media])


ENGINES = Registry("rollout engine", "vlreason.rollout_engines")


def build_engine(name: str, vlm: Any, **options: Any) -> RolloutEngine:
    """An engine by registered name, bound to ``vlm``; ``options`` are its keyword arguments
    (``rollout.engine_options``)."""
    cls = ENGINES.resolve(name)
    try:
        return cls(vlm, **options)
    except TypeError as exc:
        raise ValueError(f"rollout engine {name!r}: bad rollout.engine_options {sorted(options)} ({exc})") from exc
