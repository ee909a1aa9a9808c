"""The clipped GRPO surrogate, the k3 KL estimator and the three loss aggregations.

The importance ratio is per token (PPO, GRPO) or per sequence (GSPO: the geometric mean of the
sequence's token ratios, ``exp(mean_t(logp - old_logp))``, clipped as one; its epsilons are
typically ~1e-3, and ``seq_mean_token_mean`` gives the paper's sequence average).

All tensors are ``[N, T]`` over N completions of up to T tokens; ``mask`` is 1 on the tokens the
loss counts (completion tokens the policy generated; never prompt, padding or tool output).

Aggregations (names say what is averaged):

* ``token_mean``: sum over all tokens / number of tokens in the batch (DAPO; TRL ``dapo``/``bnpo``);
* ``seq_mean_token_mean``: mean over sequences of each sequence's token mean (original GRPO;
  TRL ``grpo``), which weights short completions' tokens more;
* ``seq_mean_token_sum_norm``: sum over all tokens / (N * max_tokens), a constant normaliser
  (Dr. GRPO; TRL ``dr_grpo``), free of length bias.

Pass ``num_sequences`` / ``num_tokens`` of the whole batch when the batch is split into micro-
batches, so the sum of the micro-batch losses equals the loss of the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vlreason.choices import Choice


class LossAggregation(Choice):
    TOKEN_MEAN = "token_mean"
    SEQ_MEAN_TOKEN_MEAN = "seq_mean_token_mean"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq_mean_token_sum_norm"


class ImportanceLevel(Choice):
    TOKEN = "token"  # one ratio per token (PPO, GRPO, DAPO)
    SEQUENCE = "sequence"  # one ratio per completion (GSPO)


class PolicyLoss(NamedTuple):
    """The loss to backpropagate and what to log about it (all scalars)."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of counted tokens whose ratio was clipped
    kl: torch.Tensor  # mean k3 KL over counted tokens (0 without a reference)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float, mask: torch.Tensor | None = None,
                      level: ImportanceLevel | str = ImportanceLevel.TOKEN) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective, negated, per token.

    Args:
        logp / old_logp: ``[N, T]`` log-probs of the sampled tokens under the policy being trained
            and under the policy that sampled them.
        advantages: ``[N]`` (one per completion) or ``[N, T]`` (per token).
        epsilon_low / epsilon_high: the ratio is clipped to ``[1 - low, 1 + high]`` (DAPO's
            clip-higher uses high > low).
        mask: ``[N, T]`` tokens of each completion (needed for ``level=sequence``).
        level: ``token``: one ratio per token; ``sequence`` (GSPO): ``exp`` of the mean log-ratio
            over the completion's tokens, shared by all of them.

    Returns:
        ``[N, T]`` loss ``-min(ratio * A, clip(ratio) * A)`` and ``[N, T]`` bool: the clipped
        term was the smaller one (its gradient is zero).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logp - old_logp
    if ImportanceLevel(level) is ImportanceLevel.SEQUENCE:
        if mask is None:
            raise ValueError("sequence-level importance ratios need the token mask")
        weight = mask.to(log_ratio.dtype)
        log_ratio = ((log_ratio * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp(min=1.0)
                     ).expand_as(logp)  # [N, T]: the sequence's ratio on each of its tokens
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped_term, clipped_term = ratio * advantages, clipped * advantages
    return -torch.min(unclipped_term, clipped_term), clipped_term < unclipped_term


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` k3 estimator of KL(policy || reference): ``exp(r - p) - (r - p) - 1`` >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: LossAggregation | str, max_tokens: int,
              num_sequences: int | None = None, num_tokens: float | None = None) -> torch.Tensor:
    """Reduce a ``[N, T]`` per-token loss to a scalar (see the module docstring).

    Args:
        max_tokens: the rollout's max new tokens (``seq_mean_token_sum_norm``'s constant).
        num_sequences / num_tokens: sequences and counted tokens of the whole batch; default: this one.
    """
    mode = LossAggregation(mode)
    mask = mask.to(per_token.dtype)
    num_sequences = per_token.shape[0] if num_sequences is None else num_sequences
    if mode is LossAggregation.TOKEN_MEAN:
        total = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token.dtype)
        return (per_token * mask).sum() / total.clamp(min=1.0)
    if mode is LossAggregation.SEQ_MEAN_TOKEN_MEAN:
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [N]
        return per_sequence.sum() / max(num_sequences, 1)
    return (per_token * mask).sum() / (max(num_sequences, 1) * max_tokens)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    aggregation: LossAggregation | str,
    max_tokens: int,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
    importance_level: ImportanceLevel | str = ImportanceLevel.TOKEN,
    sampler_weights: torch.Tensor | None = None,
) -> PolicyLoss:
    """The GRPO loss: clipped surrogate (times ``sampler_weights`` when given) plus ``beta`` * k3
    KL to the reference, aggregated.

    Args:
        logp / old_logp / ref_logp: ``[N, T]`` log-probs of the sampled tokens.
        advantages: ``[N]`` or ``[N, T]``.
        mask: ``[N, T]``, 1 on tokens the loss counts.
        sampler_weights: ``[N, T]`` importance weights of the sampler/trainer mismatch
            (``sampler_is_weights``), or None.
    """
    per_token, was_clipped = clipped_surrogate(logp, old_logp, advantages, epsilon_low, epsilon_high, mask,
                                               importance_level)
    if sampler_weights is not None:
        per_token = per_token * sampler_weights
    kl = torch.zeros_like(per_token)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference log-probs (ref_logp)")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_tokens, num_sequences, num_tokens)
    weight = mask.to(per_token.dtype)
    counted = weight.sum().clamp(min=1.0)
    with torch.no_grad():
        clip_fraction = (was_clipped.to(weight) * weight).sum() / counted
        kl_mean = (kl.detach() * weight).sum() / counted
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction, kl=kl_mean)


def sampler_is_weights(behaviour_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """``[N, T]`` truncated importance weights ``min(exp(behaviour - sampler), cap)``: how much more
    likely the trainer's weights at sampling time (``behaviour_logp``) made each sampled token
    than the engine that sampled it (``sampler_logp``; vLLM's numerics differ). Constants: no gradient."""
    return torch.exp(behaviour_logp.detach() - sampler_logp).clamp(max=cap)
