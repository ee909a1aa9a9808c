"""Run a batch of prompts once, then continue each of them G times from the shared KV cache.

GRPO samples G completions of every prompt and then scores them with the policy (and the
reference). The prompt — system text, image tokens, question — is the same for all G, and with
one image it is most of the sequence. Feeding ``prompt + completion`` G times, as a plain
forward does, encodes the image and attends over the prompt G times. Here the prompt is run once
(vision tower included), its KV cache is repeated G times, and only completion tokens are fed
after it. The log-probs are the same as the full forward's (tested to float tolerance), and
gradients flow through the cached keys and values back into the prompt pass.

With tools, what follows a prompt is a trajectory: model turns and the observations between
them, which may hold images. Those are fed with their pixels in the same way, so sampling keeps
one cache per row across turns and scoring runs each prompt once for a whole trajectory.

Qwen-VL models use 3-D rotary positions (time, height, width) for image tokens. Positions come
from the model's own ``get_rope_index``: for the prompt directly, for fed tokens on the fed
piece, shifted one past the row's largest position so far (its positions count from the start of
the piece, so the shift gives exactly what one pass over the whole sequence gives); text takes
one position per token on all three axes and padding none.

A continuation may hide some of its own tokens from the tokens after a point (``HiddenSpan``:
the agent's visual memory window takes older observation images out of view). Tokens fed before
that point were computed seeing them, tokens after it attend past them, and the hidden tokens keep
their cache entries and rotary positions: sampling zeroes their attention-mask columns
(``SharedPrefix.hide``), scoring feeds the continuation in pieces cut at those points
(``completion_hidden``) or runs one forward with a 4-D mask saying the same (``full_hidden``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from transformers import BatchFeature, PreTrainedModel

LOGITS_PER_CHUNK = 2**26


class SharedPrefix:
    """Prompts run once, continued token by token or a whole completion at a time.

    The passes run the model's multimodal core and keep hidden states; logits over the vocabulary
    are made only where asked (``next_logits`` when sampling), so a whole completion can be scored
    without ever holding ``[rows, T, V]`` (see ``completion_logprobs``).

    Attributes:
        last_hidden: ``[rows, H]`` hidden state after the last fed token.
        attention_mask: ``[rows, L]`` over everything in the cache.
        next_position: ``[rows]`` rotary position of the next token.
    """

    def __init__(self, model: PreTrainedModel, inputs: BatchFeature | dict[str, torch.Tensor]):
        """Run the prompts (``input_ids`` ``[B, Lp]`` left-padded, with their pixels) once."""
        self.model = model
        self.core = _vl_core(model)
        self.cache_kwarg = cache_kwarg(model)
        positions = prompt_positions(model, inputs)  # [3, B, Lp]
        output = self.core(**inputs, position_ids=positions, use_cache=True)
        self.cache = getattr(output, self.cache_kwarg)
        self.last_hidden = output[0][:, -1]  # [B, H]
        self.attention_mask = inputs["attention_mask"]
        self.next_position = positions.amax(dim=(0, 2)) + 1  # [B]

    def next_logits(self) -> torch.Tensor:
        """``[rows, V]`` logits for the next token of every row."""
        return self.model.get_output_embeddings()(self.last_hidden)

    def repeat(self, group_size: int) -> SharedPrefix:
        """Repeat every row G times in place (rows of one prompt become adjacent); returns self."""
        self.cache.batch_repeat_interleave(group_size)
        self.last_hidden = self.last_hidden.repeat_interleave(group_size, dim=0)
        self.attention_mask = self.attention_mask.repeat_interleave(group_size, dim=0)
        self.next_position = self.next_position.repeat_interleave(group_size, dim=0)
        return self

    def select(self, rows: torch.Tensor) -> SharedPrefix:
        """Keep only ``rows`` (``[R]`` indices, in that order) in place; returns self."""
        self.cache.batch_select_indices(rows.to(self.last_hidden.device))
        self.last_hidden = self.last_hidden[rows]
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]
        return self

    def hide(self, row: int, start: int, stop: int) -> None:
        """Tokens fed from now on do not attend to cache columns ``start .. stop - 1`` of ``row``
        (what was computed from them stays)."""
        self.attention_mask = self.attention_mask.clone()
        self.attention_mask[row, start:stop] = 0

    def feed_hidden(self, tokens: torch.Tensor, mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                    image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Append tokens (and the pixels of the images among them) to every row and return the
        hidden states that predict each fed token.

        Rotary positions continue each row where it stopped: padding (mask 0) takes none, text
        takes one each, an image its 3-D block (the model's own ``get_rope_index`` on the fed
        tokens, shifted past the row's last position), so feeding a sequence in pieces gives the
        positions of one pass over it.

        Args:
            tokens: ``[rows, T]`` token ids, each row's real tokens first (right-padded).
            mask: ``[rows, T]``, 0 on padding.
            pixel_values / image_grid_thw: ``[P, D]`` / ``[I, 3]``, the images whose placeholder
                tokens are among ``tokens``, in row order (as the processor encodes them).

        Returns:
            ``[rows, T, H]``: position t holds the state whose logits predict ``tokens[:, t]`` (the
            first comes from before the call).
        """
        mask = mask.to(self.attention_mask)
        positions = self._positions(tokens, mask, image_grid_thw)  # [3, rows, T]
        self.attention_mask = torch.cat([self.attention_mask, mask], dim=1)
        images = {} if image_grid_thw is None else {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        output = self.core(input_ids=tokens, attention_mask=self.attention_mask, position_ids=positions,
                           use_cache=True, **{self.cache_kwarg: self.cache}, **images)
        hidden = output[0]  # [rows, T, H]
        predicting = torch.cat([self.last_hidden[:, None], hidden[:, :-1]], dim=1)
        fed = mask.sum(dim=1)  # [rows]
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), (fed - 1).clamp(min=0)]
        self.last_hidden = torch.where(fed[:, None] > 0, last, self.last_hidden)
        furthest = positions.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2))  # [rows]
        self.next_position = torch.where(fed > 0, furthest + 1, self.next_position)
        return predicting

    def _positions(self, tokens: torch.Tensor, mask: torch.Tensor, image_grid_thw: torch.Tensor | None
                   ) -> torch.Tensor:
        """``[3, rows, T]`` rotary positions of fed tokens (padding gets a position it never uses)."""
        if image_grid_thw is None:  # text: one position per real token, on all three axes
            steps = (mask.cumsum(dim=1) - mask)[None].expand(3, -1, -1)
        else:
            fed = mask.any(dim=1)
            steps = torch.zeros(3, *tokens.shape, dtype=torch.long, device=tokens.device)
            steps[:, fed] = rope_positions(self.model, tokens[fed], mask[fed], image_grid_thw)
        return self.next_position[None, :, None] + steps


def prompt_positions(model: PreTrainedModel, inputs: BatchFeature | dict[str, torch.Tensor]) -> torch.Tensor:
    """``[3, B, Lp]`` multimodal rotary positions of left-padded prompts (0 on padding)."""
    return rope_positions(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("image_grid_thw"),
                          inputs.get("video_grid_thw"), inputs.get("second_per_grid_ts"))


def rope_positions(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
    """``[3, B, L]`` the model's own multimodal rotary positions of ``[B, L]`` tokens counted from 0
    (masked tokens skipped; every row needs a real token). ``second_per_grid_ts``: Qwen2.5-VL's
    seconds per temporal patch of each video (the other families have none)."""
    image_id, video_id = (model.config.image_token_id, model.config.video_token_id)
    types = (input_ids == image_id).long() + 2 * (input_ids == video_id).long()  # 0 text, 1 image, 2 video
    timing = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
    position_ids, _ = _vl_core(model).get_rope_index(input_ids, types, image_grid_thw=image_grid_thw,
                                                     video_grid_thw=video_grid_thw, attention_mask=attention_mask,
                                                     **timing)
    return position_ids


def cache_kwarg(model: PreTrainedModel) -> str:
    """The name of the KV-cache argument and output: transformers renamed ``past_key_values`` to
    ``cache`` (5.2x deprecates the old name; 5.17 knows only the old one)."""
    forward = inspect.signature(_vl_core(model).forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[N, T]`` log-probs of ``tokens`` under ``logits / temperature`` (``[N, T, V]``)."""
    logits = logits.float() / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[N, T]`` entropy of the next-token distributions ``softmax(logits / temperature)``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -logp.exp().mul_(logp).sum(dim=-1)  # one [N, T, V] temporary besides logp


class HiddenSpan(NamedTuple):
    """Continuation tokens ``start .. stop - 1`` of a row are out of view for its tokens from
    ``since`` on (``since >= stop``)."""

    start: int
    stop: int
    since: int


@dataclass
class Continuation:
    """What follows N prompts: the tokens of model turns and of the observations between them,
    right-padded, with the pixels of the images inside the observations.

    Attributes:
        input_ids / attention_mask: ``[N, T]``.
        pixel_values / image_grid_thw: ``[P, D]`` / ``[I, 3]`` in row order, or None without images.
        images_per_row: N image counts (which images belong to which row).
        hidden: per row, the spans its later tokens do not see (empty lists, or None: none).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    images_per_row: list[int] | None = None
    hidden: list[list[HiddenSpan]] | None = None

    def to(self, device: torch.device | str) -> Continuation:
        moved = {name: None if value is None else value.to(device) for name, value in (
            ("input_ids", self.input_ids), ("attention_mask", self.attention_mask),
            ("pixel_values", self.pixel_values), ("image_grid_thw", self.image_grid_thw))}
        return Continuation(**moved, images_per_row=self.images_per_row, hidden=self.hidden)

    @property
    def cuts(self) -> list[int]:
        """Sorted token indices where some row's view changes (the ``since`` of its hidden spans)."""
        return sorted({span.since for spans in self.hidden or [] for span in spans})

    def piece(self, start: int, stop: int, image_token_id: int) -> Continuation:
        """Tokens ``start .. stop - 1`` of every row with the pixels of the images among them
        (an image must lie wholly inside or outside the piece)."""
        ids, mask = self.input_ids[:, start:stop], self.attention_mask[:, start:stop]
        if self.image_grid_thw is None:
            return Continuation(ids, mask)
        is_image = self.input_ids == image_token_id
        first = is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0))  # [N, T] each image's first token
        before, inside = first[:, :start].sum(dim=1).tolist(), first[:, start:stop].sum(dim=1).tolist()
        rows = _split_images(self.pixel_values, self.image_grid_thw, self.images_per_row)
        chosen = [image for row, images in enumerate(rows) for image in images[before[row]:before[row] + inside[row]]]
        if not chosen:
            return Continuation(ids, mask, images_per_row=inside)
        return Continuation(ids, mask, torch.cat([pixels for pixels, _ in chosen]),
                            torch.stack([grid for _, grid in chosen]), inside)


def completion_hidden(model: PreTrainedModel, prompt_inputs: BatchFeature | dict[str, torch.Tensor],
                      continuation: Continuation, group_size: int) -> torch.Tensor:
    """Hidden states predicting each continuation token, every prompt run once for its G rows.

    Args:
        prompt_inputs: B prompts (``input_ids`` ``[B, Lp]`` and their pixels).
        continuation: B * G rows, row ``b*G + g`` continuing prompt b.

    Returns:
        ``[B * G, T, H]``.
    """
    prefix = SharedPrefix(model, prompt_inputs).repeat(group_size)
    width = prefix.attention_mask.shape[1]  # continuation token t sits in cache column width + t
    bounds = [0, *continuation.cuts, continuation.input_ids.shape[1]]
    pieces = []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        for row, spans in enumerate(continuation.hidden or []):
            for span in spans:
                if span.since == start:
                    prefix.hide(row, width + span.start, width + span.stop)
        piece = continuation.piece(start, stop, model.config.image_token_id)
        pieces.append(prefix.feed_hidden(piece.input_ids, piece.attention_mask, piece.pixel_values,
                                         piece.image_grid_thw))
    return torch.cat(pieces, dim=1)


def full_hidden(model: PreTrainedModel, prompt_inputs: BatchFeature | dict[str, torch.Tensor],
                continuation: Continuation, group_size: int, images_per_prompt: list[int]) -> torch.Tensor:
    """What ``completion_hidden`` returns, from one plain forward over prompt + continuation with
    every prompt and its pixels repeated G times: no KV cache, so it works where the cache cannot
    (activation checkpointing), at the cost of running each prompt G times. The model computes
    every rotary position itself, so this is also the reference the incremental path is tested on.

    Args:
        images_per_prompt: B image counts (which ``pixel_values`` rows belong to which prompt).

    Returns:
        ``[B * G, T, H]``.
    """
    prompt_len = prompt_inputs["input_ids"].shape[1]
    rows = continuation.input_ids.shape[0]
    repeat = {key: prompt_inputs[key].repeat_interleave(group_size, dim=0) for key in ("input_ids", "attention_mask")}
    input_ids = torch.cat([repeat["input_ids"], continuation.input_ids], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.cat(
        [repeat["attention_mask"], continuation.attention_mask.to(repeat["attention_mask"])], dim=1),
        "mm_token_type_ids": (input_ids == model.config.image_token_id).long()
        + 2 * (input_ids == model.config.video_token_id).long()}
    inputs |= _repeated_videos(model, prompt_inputs, group_size)
    prompt_images = _split_images(prompt_inputs.get("pixel_values"), prompt_inputs.get("image_grid_thw"),
                                  images_per_prompt)
    own_images = _split_images(continuation.pixel_values, continuation.image_grid_thw,
                               continuation.images_per_row or [0] * rows)
    pieces = [piece for row in range(rows) for piece in (*prompt_images[row // group_size], *own_images[row])]
    if pieces:
        inputs["pixel_values"] = torch.cat([pixels for pixels, _ in pieces])
        inputs["image_grid_thw"] = torch.stack([grid for _, grid in pieces])
    if continuation.cuts:  # some tokens are out of view of later ones: say who sees what in a 4-D mask
        inputs["position_ids"] = rope_positions(model, input_ids, inputs["attention_mask"],
                                                inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                                inputs.get("second_per_grid_ts"))
        inputs["attention_mask"] = _visibility(model, inputs["attention_mask"], prompt_len, continuation.hidden)
    hidden = _vl_core(model)(**inputs, use_cache=False)[0]  # [B * G, Lp + T, H]
    return hidden[:, prompt_len - 1: prompt_len - 1 + continuation.input_ids.shape[1]]


def _visibility(model: PreTrainedModel, attention_mask: torch.Tensor, prompt_len: int,
                hidden: list[list[HiddenSpan]]) -> torch.Tensor:
    """``[R, 1, L, L]`` which keys each query attends to (causal, real keys only, hidden spans out of
    view from their ``since`` on), in the form the attention implementation takes: boolean for
    SDPA, additive for eager. A query on padding sees itself, so no row is empty."""
    implementation = model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"hidden continuation spans need attn_implementation sdpa or eager, not {implementation}")
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # [R, L, L]
    for row, spans in enumerate(hidden):
        for span in spans:
            allowed[row, prompt_len + span.since:, prompt_len + span.start:prompt_len + span.stop] = False
    allowed |= torch.eye(length, dtype=torch.bool, device=allowed.device)
    if implementation == "sdpa":
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(model.dtype).min)[:, None]


def _repeated_videos(model: PreTrainedModel, prompt_inputs: BatchFeature | dict[str, torch.Tensor],
                     group_size: int) -> dict[str, torch.Tensor]:
    """The prompts' video tensors with each prompt's videos repeated for its G rows (videos
    appear in prompts only); empty without videos."""
    grid = prompt_inputs.get("video_grid_thw")
    if grid is None:
        return {}
    merge = model.config.vision_config.spatial_merge_size
    tokens = (prompt_inputs["input_ids"] == model.config.video_token_id).sum(dim=1).tolist()  # [B]
    per_video = (grid.prod(dim=-1) // merge**2).tolist()
    owner = []  # the prompt of each video, found by the prompts' video-token counts, in order
    for prompt, count in enumerate(tokens):
        while count > 0:
            count -= per_video[len(owner)]
            owner.append(prompt)
    pixels = torch.split(prompt_inputs["pixel_values_videos"], grid.prod(dim=-1).tolist())
    order = [video for prompt in range(len(tokens)) for _ in range(group_size)
             for video, own in enumerate(owner) if own == prompt]
    repeated = {"pixel_values_videos": torch.cat([pixels[v] for v in order]), "video_grid_thw": grid[order]}
    if "second_per_grid_ts" in prompt_inputs:
        repeated["second_per_grid_ts"] = prompt_inputs["second_per_grid_ts"][order]
    return repeated


def _split_images(pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None, counts: list[int]
                  ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per row, its images as ``(pixel rows [P_i, D], grid [3])`` pairs (``counts``: images per row)."""
    if image_grid_thw is None:
        return [[] for _ in counts]
    per_image = list(zip(torch.split(pixel_values, image_grid_thw.prod(dim=-1).tolist()), image_grid_thw,
                         strict=True))
    starts = [sum(counts[:row]) for row in range(len(counts))]
    return [per_image[start:start + count] for start, count in zip(starts, counts, strict=True)]


def completion_logprobs(model: PreTrainedModel, hidden: torch.Tensor, tokens: torch.Tensor,
                        temperature: float = 1.0, chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of ``tokens`` from ``hidden`` (``completion_hidden``), through the
    LM head ``chunk_tokens`` positions at a time (None: ``auto_chunk``): the logits of one chunk,
    ``[chunk, V]``, are the most that ever exists, and backward recomputes them chunk by chunk
    (activation checkpointing).

    Args:
        hidden: ``[N, T, H]``; tokens: ``[N, T]``.

    Returns:
        ``[N, T]`` float32 log-probs (with gradients through ``hidden`` and the head) and
        ``[N, T]`` entropies of the tempered distributions (without gradients).
    """
    head = model.get_output_embeddings()
    chunk_tokens = chunk_tokens or auto_chunk(model.config.get_text_config().vocab_size)
    flat_hidden, flat_tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    parts = [_checkpointed(_chunk_logprobs, flat_hidden[start:start + chunk_tokens], head,
                           flat_tokens[start:start + chunk_tokens], temperature)
             for start in range(0, flat_tokens.shape[0], chunk_tokens)]
    logp = torch.cat([lp for lp, _ in parts]).reshape(tokens.shape)
    entropy = torch.cat([ent for _, ent in parts]).reshape(tokens.shape)
    return logp, entropy


def auto_chunk(vocab_size: int) -> int:
    """Token positions per log-prob chunk that keep its logits at ``LOGITS_PER_CHUNK`` values
    (256 MB in float32): 441 at Qwen's 151,936-token vocabulary, 65,027 at the tiny one's 1,032."""
    return max(1, LOGITS_PER_CHUNK // vocab_size)


def _checkpointed(fn: Any, hidden: torch.Tensor, *args: Any) -> Any:
    if torch.is_grad_enabled() and hidden.requires_grad:
        return checkpoint(fn, hidden, *args, use_reentrant=False)
    return fn(hidden, *args)


def _chunk_logprobs(hidden: torch.Tensor, head: torch.nn.Module, tokens: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden)[:, None]  # [chunk, 1, V]
    return token_logprobs(logits, tokens[:, None], temperature)[:, 0], token_entropy(logits, temperature)[:, 0]


def _vl_core(model: Any) -> Any:
    """The multimodal core (``model.model``) of a Qwen-VL model, also under a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


class CompletionScorer(torch.nn.Module):
    """The log-probs and entropies of sampled completions under ``model``, as a module.

    A training engine that must see every gradient pass (DeepSpeed ZeRO counts micro-batches in
    its forward) wraps this module; its only parameters are the model's. Each prompt is run once
    for its completions (``completion_hidden``); with ``full_forwards`` (gradient checkpointing:
    checkpointed layers keep no KV cache) the training-mode pass runs prompt + completion per
    completion (``full_hidden``). The vocabulary logits exist ``chunk_tokens`` positions at a time
    (None: ``auto_chunk``).
    """

    def __init__(self, model: PreTrainedModel, temperature: float, chunk_tokens: int | None = None,
                 full_forwards: bool = False):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        self.full_forwards = full_forwards

    def forward(self, prompt_inputs: BatchFeature, continuation: Continuation, repeat: int,
                images_per_prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, T]`` log-probs and entropies of the ``continuation`` tokens, which continue the
        prompts ``repeat`` rows each (all on the model's device)."""
        if self.model.training and self.full_forwards:
            hidden = full_hidden(self.model, prompt_inputs, continuation, repeat, images_per_prompt)
        else:
            hidden = completion_hidden(self.model, prompt_inputs, continuation, repeat)
        return completion_logprobs(self.model, hidden, continuation.input_ids, self.temperature, self.chunk_tokens)
