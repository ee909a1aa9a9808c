"""Rollouts with the transformers model itself: batched, KV-cached, each prompt encoded once.

The B prompts (with their images) run through the model once; the KV cache is then repeated n
times and the N = B * n rows are decoded together, one token per step, until every row has
produced end-of-sequence or its token budget is spent. ``generate`` with
``num_return_sequences`` would encode every image and prompt n times instead. Between turns the
cache is kept: rows that stop are dropped from it, and an observation (with its images) is fed
after the turn that called for it, so no row is ever re-encoded. Earlier observation images that
leave the agent's visual memory window stay in the cache with their attention-mask columns
zeroed: the tokens fed after that do not see them (``models.prefix``).

Random numbers are drawn for every row of the whole draw at every step (``SamplingParams.
first_row`` / ``total_rows``), and each turn starts from its own seed, so a row samples the same
tokens however the draw is split over processes and whatever the other rows do.

Vision special tokens are never sampled (a generated ``<|image_pad|>`` has no pixels behind it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from vlreason.models.prefix import SharedPrefix
from vlreason.models.vlm import VLM
from vlreason.rollout.engine import ENGINES, EncodedObservation, ModelTurn, PromptBatch, SamplingParams


@ENGINES.register("hf")
class HFEngine:
    """Samples from ``vlm.model`` on whatever device it lives on. ``on_step(step, tokens)``, set
    by code that streams (not a configurable option), sees each step's ``[rows]`` sampled tokens
    as they come (step 0 starts a turn)."""

    takes_video = True  # the encoded prompts carry the videos' patches
    hides_tokens = True  # by zeroing their attention-mask columns

    def __init__(self, vlm: VLM):
        self.vlm = vlm
        self.suppress = torch.tensor(vlm.adapter.suppress_token_ids(vlm.tokenizer))  # never sampled
        self.on_step: Callable[[int, torch.Tensor], None] | None = None

    def start(self, prompts: PromptBatch, params: SamplingParams) -> HFSession:
        return HFSession(self.vlm, prompts, params, self.suppress, self.on_step)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: this engine samples from the trained model itself."""


class HFSession:
    """The KV cache of the running rows and the state between their turns."""

    def __init__(self, vlm: VLM, prompts: PromptBatch, params: SamplingParams, suppress: torch.Tensor,
                 on_step: Callable[[int, torch.Tensor], None] | None = None):
        model = vlm.model
        self.params = params
        self.on_step = on_step
        self.device = model.device
        self.eos_id = int(vlm.tokenizer.eos_token_id)
        self.pad_id = int(vlm.tokenizer.pad_token_id)
        self.suppress = suppress.to(self.device)
        with torch.no_grad():
            self.prefix = SharedPrefix(model, prompts.inputs.to(self.device)).repeat(params.n)
        rows = len(prompts) * params.n
        self.width = self.prefix.attention_mask.shape[1]  # cache columns of the prompts
        self.fed = torch.zeros(rows, 0, dtype=torch.long, device=self.device)  # [rows, C] real tokens fed since
        self.rows = torch.arange(rows, device=self.device) + params.first_row  # each row's index in the draw
        self.total_rows = params.total_rows or rows
        self.unfed = torch.full((rows,), -1, device=self.device)  # a sampled token not yet in the cache
        self.turn = 0

    @torch.no_grad()
    def sample(self, max_new_tokens: Sequence[int]) -> list[ModelTurn]:
        """One turn of every running row (see the module docstring)."""
        params, prefix = self.params, self.prefix
        budget = torch.tensor(list(max_new_tokens), device=self.device)
        if bool((budget < 1).any()):
            raise ValueError(f"every running row needs a token budget >= 1, got {budget.tolist()}")
        generator = self._generator()
        done = torch.zeros_like(budget, dtype=torch.bool)
        live = ~done  # rows that sampled a real token at the last step
        steps, logps = [], []
        for step in range(int(budget.max())):
            if step:  # the previous step's tokens, for the rows that sampled one
                self._feed(steps[-1][:, None], live[:, None].long())
            logits = prefix.next_logits().float()  # [rows, V]
            logits[:, self.suppress] = -float("inf")
            token = pick_tokens(logits, params.temperature, params.top_p, generator, (self.rows, self.total_rows))
            live = ~done
            token = token.masked_fill(done, self.pad_id)
            steps.append(token)
            if self.on_step is not None:
                self.on_step(step, token.cpu())
            if params.temperature > 0:
                logps.append(torch.log_softmax(logits / params.temperature, dim=-1).gather(1, token[:, None])[:, 0])
            done = done | (token == self.eos_id) | (step + 1 >= budget)
            if bool(done.all()):
                break
        self.turn += 1
        self.unfed = torch.where(live, steps[-1], -1)
        ids = torch.stack(steps, dim=1).cpu()  # [rows, T]
        logprobs = torch.stack(logps, dim=1).cpu() if logps else None
        return [self._turn(ids[row], None if logprobs is None else logprobs[row], int(budget[row]))
                for row in range(ids.shape[0])]

    def keep(self, rows: Sequence[int]) -> None:
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.prefix.select(index)
        self.rows, self.unfed, self.fed = self.rows[index], self.unfed[index], self.fed[index]

    @torch.no_grad()
    def extend(self, observations: Sequence[EncodedObservation]) -> None:
        """Feed each row's observation, after the last token of its turn if that is not fed yet;
        spans to hide leave the view after that last token and before the observation."""
        if any(observation.hide for observation in observations):
            if bool((self.unfed >= 0).any()):
                self._feed(self.unfed.clamp(min=0)[:, None], (self.unfed >= 0).long()[:, None])
                self.unfed = torch.full_like(self.unfed, -1)
            for row, observation in enumerate(observations):
                columns = self.width + self.fed[row].nonzero().flatten()  # cache column of each token fed so far
                for start, stop in observation.hide:
                    self.prefix.hide(row, int(columns[start]), int(columns[stop - 1]) + 1)
        rows = [([int(token)] if token >= 0 else []) + observation.ids
                for token, observation in zip(self.unfed.tolist(), observations, strict=True)]
        width = max(map(len, rows))
        tokens = torch.tensor([row + [self.pad_id] * (width - len(row)) for row in rows], device=self.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=self.device)
        with_images = [observation.pixels for observation in observations if observation.pixels]
        images = {}
        if with_images:
            images = {"pixel_values": torch.cat([p["pixel_values"] for p in with_images]).to(self.device),
                      "image_grid_thw": torch.cat([p["image_grid_thw"] for p in with_images]).to(self.device)}
        self._feed(tokens, mask, **images)
        self.unfed = torch.full_like(self.unfed, -1)

    def _feed(self, tokens: torch.Tensor, mask: torch.Tensor, **images: torch.Tensor) -> None:
        """Feed ``[rows, T]`` tokens (mask 0 on padding) to the cache and count the real ones."""
        self.prefix.feed_hidden(tokens, mask, **images)
        self.fed = torch.cat([self.fed, mask.to(self.fed)], dim=1)

    def close(self) -> None:
        """Nothing to free: the cache goes with the session."""

    def _turn(self, ids: torch.Tensor, logprobs: torch.Tensor | None, budget: int) -> ModelTurn:
        """A row's turn from its ``[T]`` step tokens: through its first end-of-sequence, else its
        whole budget."""
        tokens = ids.tolist()
        ended = self.eos_id in tokens
        length = tokens.index(self.eos_id) + 1 if ended else min(budget, len(tokens))
        return ModelTurn(tokens[:length], None if logprobs is None else logprobs[:length].tolist(), ended)

    def _generator(self) -> torch.Generator | None:
        """This turn's generator: the call's seed for the first turn, one derived from it for later ones."""
        if self.params.seed is None:
            return None
        seed = self.params.seed
        if self.turn:
            seed = int.from_bytes(hashlib.sha256(f"{seed}:{self.turn}".encode()).digest()[:7], "big")
        return torch.Generator(device=self.device).manual_seed(seed)


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None, share: tuple[torch.Tensor, int] | None = None
                ) -> torch.Tensor:
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
                share: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """``[rows]``: one index per row of ``[rows, V]`` non-negative weights, drawn with probability
    proportional to the weight, by inverting the cumulative sum (on CPU over 10x faster than
    ``torch.multinomial`` at the tiny vocabulary and 3x at Qwen's: ``benchmarks/token_sampling.py``).
    Targets lie in ``[0, total)`` and ``right=True`` steps over equal sums, so a zero weight is never drawn.

    ``share`` = (``[rows]`` indices, total): these rows are those rows of a draw over ``total``
    rows (split across processes, or some rows already finished); the uniforms are drawn for all
    of them and these rows' taken."""
    cdf = probs.double().cumsum(dim=-1)  # [rows, V]; float64 so that rounding never favours a token
    total = cdf[:, -1:]
    index, drawn = share or (torch.arange(cdf.shape[0], device=cdf.device), cdf.shape[0])
    uniforms = torch.rand(drawn, 1, generator=generator, dtype=cdf.dtype, device=cdf.device)
    targets = uniforms[index] * total
    targets = torch.minimum(targets, torch.nextafter(total, torch.zeros_like(total)))  # rounding can reach total
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1)
