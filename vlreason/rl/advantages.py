"""Rewards -> per-completion advantages, normalised within each group of G samples of a prompt.

Completions are laid out group by group: rows ``[g*G, (g+1)*G)`` are the G samples of prompt g.
NaN marks a reward that does not apply to a completion; a completion no reward applies to is
*unscorable*: it is left out of its group's statistics and gets advantage 0, so it neither moves
the baseline nor receives a made-up signal (the same convention as TRL's GRPOTrainer).
"""

from __future__ import annotations

import torch

from vlreason.choices import Choice

STD_EPS = 1e-4  # added to the standard deviation, as in TRL's GRPOTrainer


class AdvantageScale(Choice):
    """What the centred reward is divided by."""

    GROUP = "group"  # the group's std (GRPO)
    BATCH = "batch"  # the std of all rewards in the batch (more robust for small G)
    NONE = "none"  # no scaling ("Dr. GRPO": removes the difficulty bias of std scaling)


def combine_rewards(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the rewards that apply.

    Args:
        values: ``[N, R]`` scores, NaN where a reward does not apply.
        weights: ``[R]``.

    Returns:
        ``[N]`` total reward; NaN for completions no reward applies to.
    """
    total = (values * weights.to(values)).nansum(dim=1)  # [N]
    return total.masked_fill(values.isnan().all(dim=1), float("nan"))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: AdvantageScale | str = AdvantageScale.GROUP,
                     batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """``(r_i - mean_group) / (std + 1e-4)``, NaN-aware.

    Args:
        rewards: ``[N]`` total rewards, N = B * group_size, NaN for unscorable completions.
        group_size: G.
        scale: ``group`` (the group's std), ``batch`` (the batch's std) or ``none``.
        batch_rewards: ``[M]`` the whole batch's rewards for the ``batch`` std when ``rewards`` is
            one process's share of it (default: ``rewards``).

    Returns:
        ``[N]`` advantages; 0 for unscorable completions. Stds use Bessel's correction.
    """
    scale = AdvantageScale(scale)
    grouped = _grouped(rewards, group_size)  # [B, G]
    centred = (grouped - grouped.nanmean(dim=1, keepdim=True)).reshape(-1)  # [N]
    if scale is AdvantageScale.GROUP:
        centred = centred / (_nanstd(grouped, dim=1).repeat_interleave(group_size) + STD_EPS)
    elif scale is AdvantageScale.BATCH:
        batch = rewards if batch_rewards is None else batch_rewards
        centred = centred / (_nanstd(batch.reshape(1, -1), dim=1) + STD_EPS)
    return centred.nan_to_num(nan=0.0)


def zero_variance_groups(rewards: torch.Tensor, group_size: int, atol: float = 1e-6) -> torch.Tensor:
    """``[B]`` True for groups whose scorable rewards are all equal (no learning signal: dynamic
    sampling drops them). A group with fewer than two scorable rewards counts as zero-variance."""
    grouped = _grouped(rewards, group_size)  # [B, G]
    high = grouped.nan_to_num(nan=-float("inf")).amax(dim=1)
    low = grouped.nan_to_num(nan=float("inf")).amin(dim=1)
    scorable = (~grouped.isnan()).sum(dim=1)
    return (scorable < 2) | ((high - low) <= atol)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def _nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN; 0 where fewer than two values are present."""
    count = (~values.isnan()).sum(dim=dim)
    squares = (values - values.nanmean(dim=dim, keepdim=True)).pow(2).nansum(dim=dim)
    return torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(squares))


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the total reward.

    Args:
        lengths: ``[N]`` generated tokens per completion.
        max_tokens: the generation budget (``rollout.max_new_tokens``).
        buffer: the last ``buffer`` tokens of the budget in which the penalty grows.
        factor: the penalty at the full budget.

    Returns:
        ``[N]``: 0 up to ``max_tokens - buffer`` tokens, then falling linearly to ``-factor`` at
        ``max_tokens`` (and beyond).
    """
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"overlong buffer must be in 1..{max_tokens} tokens, got {buffer}")
    start = max_tokens - buffer
    return -factor * ((lengths.to(torch.float32) - start) / buffer).clamp(min=0.0, max=1.0)


def temporal_bonus(ordered: torch.Tensor, shuffled: torch.Tensor, alpha: float = 0.3, mu: float = 0.8
                   ) -> torch.Tensor:
    """Video-R1's T-GRPO reward: when a group answers its video at least ``mu`` times as well in
    frame order as on shuffled frames (``p >= mu * p~``), each correct ordered completion gains
    ``alpha``; otherwise nothing.

    Args:
        ordered: ``[B, G]`` bool, whether each completion on ordered frames is correct.
        shuffled: ``[B, G']`` bool, the same for the group sampled on shuffled frames.

    Returns:
        ``[B, G]`` bonus (``alpha`` or 0).
    """
    p = ordered.float().mean(dim=1, keepdim=True)  # [B, 1]
    p_shuffled = shuffled.float().mean(dim=1, keepdim=True)  # [B, 1]
    return (ordered & (p >= mu * p_shuffled)).float() * alpha
