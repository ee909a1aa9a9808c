"""The sampler/trainer mismatch: the engine that samples (vLLM above all) computes the same
policy with other kernels, so the log-probs it sampled with differ from the trainer's. Measured
on every update over the model's own tokens, and optionally corrected with truncated importance
sampling (``algorithm.sampler_is_cap``; ``vlreason.rl.losses.sampler_is_weights``)."""

from __future__ import annotations

from typing import Any

import torch

from vlreason.rl.losses import sampler_is_weights
from vlreason.training.distributed import Processes


class SamplerMismatch:
    """Sums of one update's mismatch over its micro-batches (padding passes not counted)."""

    def __init__(self, cap: float | None):
        self.cap = cap
        self.diff_sum = 0.0
        self.diff_max = 0.0
        self.weight_sum = 0.0
        self.tokens = 0.0
        self.missing = 0.0  # micro-batches whose engine gave no log-probs

    def add(self, behaviour: torch.Tensor, sampler: torch.Tensor | None, mask: torch.Tensor,
            counted: bool) -> torch.Tensor | None:
        """Count one micro-batch; returns its ``[n, T]`` importance weights when correcting.

        Args:
            behaviour: ``[n, T]`` the trainer's log-probs of the sampled tokens at sampling time.
            sampler: ``[n, T]`` the engine's, or None when it returns none.
            mask: ``[n, T]`` the loss's tokens.
            counted: False for a padding pass (weight 0).

        Raises:
            ValueError: a correction is asked for but the engine returns no log-probs.
        """
        if sampler is None:
            if self.cap is not None:
                raise ValueError("algorithm.sampler_is_cap needs the engine's sampling log-probs, and this "
                                 "rollout.engine returns none; set algorithm.sampler_is_cap to null")
            self.missing += counted
            return None
        sampler = sampler.to(behaviour.device)
        tokens = mask.bool()
        weights = sampler_is_weights(behaviour, sampler, self.cap) if self.cap is not None else None
        if counted and bool(tokens.any()):
            diff = (behaviour.detach() - sampler).abs()[tokens]
            self.diff_sum += float(diff.sum())
            self.diff_max = max(self.diff_max, float(diff.max()))
            self.tokens += float(tokens.sum())
            if weights is not None:
                self.weight_sum += float(weights[tokens].sum())
        return weights

    def reduced(self, processes: Processes) -> tuple[float | None, float | None, float | None]:
        """Mean and max |log-prob difference| and the mean importance weight over all ranks
        (None where not measured)."""
        diff_sum, weight_sum, tokens, missing = processes.sum([self.diff_sum, self.weight_sum, self.tokens,
                                                               self.missing])
        diff_max = processes.max([self.diff_max])[0]
        if missing or not tokens:
            return None, None, None
        return diff_sum / tokens, diff_max, weight_sum / tokens if self.cap is not None else None


def sampler_metrics(diff_mean: float | None, diff_max: float | None, weight_mean: float | None,
                    sync_s: float | None) -> dict[str, Any]:
    """What a GRPO step logs about its sampler: the mismatch, the mean importance weight, the
    time of the last weight push (those measured)."""
    values = {"sampler/logprob_diff_mean": diff_mean, "sampler/logprob_diff_max": diff_max,
              "sampler/is_weight_mean": weight_mean, "time/weight_sync": sync_s}
    return {key: value for key, value in values.items() if value is not None}
