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
from transformers import BatchFeature, PreTrainedModel


class SharedPrefix:
    """Prompts run once, continued token by token or a whole completion at a time.

    Attributes:
        last_logits: ``[rows, V]`` logits after the last fed token.
        attention_mask: ``[rows, L]`` over everything in the cache.
        next_position: ``[rows]`` rotary position of the next token.
    """

    def __init__(self, model: PreTrainedModel, inputs: BatchFeature | dict[str, torch.Tensor]):
        """Run the prompts (``input_ids`` ``[B, Lp]`` left-padded, with their pixels) once."""
        self.model = model
        self.cache_kwarg = cache_kwarg(model)
        positions = prompt_positions(model, inputs)  # [3, B, Lp]
        output = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.cache = getattr(output, self.cache_kwarg)
        self.last_logits = output.logits[:, -1]  # [B, V]
        self.attention_mask = inputs["attention_mask"]
        self.next_position = positions.amax(dim=(0, 2)) + 1  # [B]

    def repeat(self, group_size: int) -> SharedPrefix:
        """Repeat every row G times in place (rows of one prompt become adjacent); returns self."""
        self.cache.batch_repeat_interleave(group_size)
        self.last_logits = self.last_logits.repeat_interleave(group_size, dim=0)
        self.attention_mask = self.attention_mask.repeat_interleave(group_size, dim=0)
        self.next_position = self.next_position.repeat_interleave(group_size, dim=0)
        return self

    def feed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append tokens to every row and return the logits that predict each fed token.

        Args:
            tokens: ``[rows, T]`` token ids; mask: ``[rows, T]``, 0 on padding.

        Returns:
            ``[rows, T, V]``: position t holds the logits for ``tokens[:, t]`` (the first comes from
            before the call), so ``log_softmax(result).gather(tokens)`` are the tokens' log-probs.
        """
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        positions = (self.next_position[:, None] + steps).unsqueeze(0).expand(3, -1, -1)  # [3, rows, T]
        self.attention_mask = torch.cat([self.attention_mask, mask.to(self.attention_mask)], dim=1)
        output = self.model(input_ids=tokens, attention_mask=self.attention_mask, position_ids=positions,
                            use_cache=True, **{self.cache_kwarg: self.cache})
        predicting = torch.cat([self.last_logits[:, None], output.logits[:, :-1]], dim=1)
        self.last_logits = output.logits[:, -1]
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
    return -(logp.exp() * logp).sum(dim=-1)


def completion_logits(model: PreTrainedModel, prompt_inputs: BatchFeature | dict[str, torch.Tensor],
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Logits predicting each completion token, with every prompt run once for its G completions.

    Args:
        prompt_inputs: B prompts (``input_ids`` ``[B, Lp]`` and their pixels).
        completion_ids / completion_mask: ``[B * G, T]``, the G completions of prompt b in rows
            ``b*G .. b*G + G - 1``.

    Returns:
        ``[B * G, T, V]``.
    """
    return SharedPrefix(model, prompt_inputs).repeat(group_size).feed(completion_ids, completion_mask)


def _vl_core(model: Any) -> Any:
    """The multimodal core (``model.model``) of a Qwen-VL model, also under a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model
