"""Run a batch of prompts once, then continue each of them G times from the shared KV cache.

GRPO samples G completions of every prompt and then scores them with the policy (and the
reference). The prompt — system text, image tokens, question — is the same for all G, and with
one image it is most of the sequence. Feeding ``prompt + completion`` G times, as a plain
forward does, encodes the image and attends over the prompt G times. Here the prompt is run once
(vision tower included), its KV cache is repeated G times, and only completion tokens are fed
after it. The log-probs are the same as the full forward's (tested to float tolerance), and
gradients flow through the cached keys and values back into the prompt pass.

Qwen-VL models use 3-D rotary positions (time, height, width) for image tokens. The prompt's
positions come from the model's own ``get_rope_index``; completion tokens continue as text, one
past the largest prompt position, on all three axes.
"""

from __future__ import annotations

import inspect
from typing import Any

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

    def feed_hidden(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append tokens to every row and return the hidden states that predict each fed token.

        Args:
            tokens: ``[rows, T]`` token ids; mask: ``[rows, T]``, 0 on padding.

        Returns:
            ``[rows, T, H]``: position t holds the state whose logits predict ``tokens[:, t]`` (the
            first comes from before the call).
        """
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        positions = (self.next_position[:, None] + steps).unsqueeze(0).expand(3, -1, -1)  # [3, rows, T]
        self.attention_mask = torch.cat([self.attention_mask, mask.to(self.attention_mask)], dim=1)
        output = self.core(input_ids=tokens, attention_mask=self.attention_mask, position_ids=positions,
                           use_cache=True, **{self.cache_kwarg: self.cache})
        hidden = output[0]  # [rows, T, H]
        predicting = torch.cat([self.last_hidden[:, None], hidden[:, :-1]], dim=1)
        self.last_hidden = hidden[:, -1]
        self.next_position = self.next_position + tokens.shape[1]
        return predicting


def prompt_positions(model: PreTrainedModel, inputs: BatchFeature | dict[str, torch.Tensor]) -> torch.Tensor:
    """``[3, B, Lp]`` multimodal rotary positions of left-padded prompts (0 on padding)."""
    core = _vl_core(model)
    position_ids, _ = core.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
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


def completion_hidden(model: PreTrainedModel, prompt_inputs: BatchFeature | dict[str, torch.Tensor],
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Hidden states predicting each completion token, every prompt run once for its G completions.

    Args:
        prompt_inputs: B prompts (``input_ids`` ``[B, Lp]`` and their pixels).
        completion_ids / completion_mask: ``[B * G, T]``, the G completions of prompt b in rows
            ``b*G .. b*G + G - 1``.

    Returns:
        ``[B * G, T, H]``.
    """
    return SharedPrefix(model, prompt_inputs).repeat(group_size).feed_hidden(completion_ids, completion_mask)


def full_hidden(model: PreTrainedModel, prompt_inputs: BatchFeature | dict[str, torch.Tensor],
                completion_ids: torch.Tensor, completion_mask: torch.Tensor, group_size: int,
                images_per_prompt: list[int]) -> torch.Tensor:
    """What ``completion_hidden`` returns, from one plain forward over prompt + completion with
    every prompt and its pixels repeated G times: no KV cache, so it works where the cache cannot
    (activation checkpointing), at the cost of running each prompt G times.

    Args:
        images_per_prompt: B image counts (which ``pixel_values`` rows belong to which prompt).

    Returns:
        ``[B * G, T, H]``.
    """
    prompt_len = prompt_inputs["input_ids"].shape[1]
    repeat = {key: prompt_inputs[key].repeat_interleave(group_size, dim=0)
              for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    inputs = {"input_ids": torch.cat([repeat["input_ids"], completion_ids], dim=1),
              "attention_mask": torch.cat([repeat["attention_mask"], completion_mask.to(repeat["attention_mask"])], 1),
              "mm_token_type_ids": torch.cat([repeat["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)}
    if "image_grid_thw" in prompt_inputs:
        grids = prompt_inputs["image_grid_thw"]
        per_image = torch.split(prompt_inputs["pixel_values"], grids.prod(dim=-1).tolist())
        starts = [sum(images_per_prompt[:b]) for b in range(len(images_per_prompt))]
        order = [i for b, count in enumerate(images_per_prompt) for _ in range(group_size)
                 for i in range(starts[b], starts[b] + count)]  # prompt b's images, once per copy
        inputs["pixel_values"] = torch.cat([per_image[i] for i in order])
        inputs["image_grid_thw"] = grids[order]
    hidden = _vl_core(model)(**inputs, use_cache=False)[0]  # [B * G, Lp + T, H]
    return hidden[:, prompt_len - 1: prompt_len - 1 + completion_ids.shape[1]]


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

    def forward(self, prompt_inputs: BatchFeature, tokens: torch.Tensor, mask: torch.Tensor, repeat: int,
                images_per_prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, T]`` log-probs and entropies of ``tokens`` ``[n, T]`` (``mask`` 0 on padding), which
        continue the prompts ``repeat`` completions each (all on the model's device)."""
        if self.model.training and self.full_forwards:
            hidden = full_hidden(self.model, prompt_inputs, tokens, mask, repeat, images_per_prompt)
        else:
            hidden = completion_hidden(self.model, prompt_inputs, tokens, mask, repeat)
        return completion_logprobs(self.model, hidden, tokens, self.temperature, self.chunk_tokens)
