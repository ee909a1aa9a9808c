"""Rollouts with the transformers model itself: batched, KV-cached, each prompt encoded once.

The B prompts (with their images) run through the model once; the KV cache is then repeated G
times and the N = B * G completions are decoded together, one token per step, until every row
has produced end-of-sequence or ``max_new_tokens`` is reached. ``generate`` with
``num_return_sequences`` would encode every image and prompt G times instead.

Vision special tokens are never sampled (a generated ``<|image_pad|>`` has no pixels behind it).
"""

from __future__ import annotations

import torch
from transformers import BatchFeature

from vlreason.models.prefix import SharedPrefix
from vlreason.models.vlm import VLM
from vlreason.rollout.engine import ENGINES, Rollouts, SamplingParams, finish


@ENGINES.register("hf")
class HFEngine:
    """Samples from ``vlm.model`` on whatever device it lives on."""

    def __init__(self, vlm: VLM):
        self.vlm = vlm
        tokenizer = vlm.tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.suppress = torch.tensor(vlm.adapter.suppress_token_ids(tokenizer))

    @torch.no_grad()
    def generate(self, prompt_inputs: BatchFeature, params: SamplingParams) -> Rollouts:
        """Sample ``params.n`` completions per prompt (see the module docstring)."""
        model = self.vlm.model
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(params.seed)
        prefix = SharedPrefix(model, prompt_inputs.to(model.device)).repeat(params.n)
        rows = prefix.last_hidden.shape[0]
        done = torch.zeros(rows, dtype=torch.bool, device=model.device)
        steps = []
        for step in range(params.max_new_tokens):
            logits = prefix.next_logits().float()  # [rows, V]
            logits[:, self.suppress.to(logits.device)] = -float("inf")
            token = pick_tokens(logits, params.temperature, params.top_p, generator,
                                (params.first_row, params.total_rows or rows))  # [rows]
            token = token.masked_fill(done, self.pad_id)
            steps.append(token)
            done |= token == self.eos_id
            if bool(done.all()) or step == params.max_new_tokens - 1:
                break
            prefix.feed_hidden(token[:, None], torch.ones_like(token)[:, None])
        return finish(torch.stack(steps, dim=1).cpu(), self.eos_id, self.pad_id, self.vlm.tokenizer)


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None, share: tuple[int, int] | None = None) -> torch.Tensor:
    """``[rows]`` next tokens from ``[rows, V]`` logits: greedy when temperature is 0, otherwise
    sampled from ``softmax(logits / temperature)`` restricted to the top-p nucleus (``share``:
    see ``sample_rows``)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already >= p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return sample_rows(probs, generator, share)


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None,
                share: tuple[int, int] | None = None) -> torch.Tensor:
    """``[rows]``: one index per row of ``[rows, V]`` non-negative weights, drawn with probability
    proportional to the weight, by inverting the cumulative sum (on CPU over 10x faster than
    ``torch.multinomial`` at the tiny vocabulary and 3x at Qwen's: ``benchmarks/token_sampling.py``).
    Targets lie in ``[0, total)`` and ``right=True`` steps over equal sums, so a zero weight is never drawn.

    ``share`` = (first, total_rows): these rows are rows ``first ..`` of a draw over ``total_rows``
    rows split across processes; the uniforms are drawn for all of them and this share's taken."""
    cdf = probs.double().cumsum(dim=-1)  # [rows, V]; float64 so that rounding never favours a token
    total = cdf[:, -1:]
    first, drawn = share or (0, cdf.shape[0])
    uniforms = torch.rand(drawn, 1, generator=generator, dtype=cdf.dtype, device=cdf.device)
    targets = uniforms[first:first + cdf.shape[0]] * total
    targets = torch.minimum(targets, torch.nextafter(total, torch.zeros_like(total)))  # rounding can reach total
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1)
