"""The GRPO family as pure tensor functions: no I/O, no model (see ``advantages`` and ``losses``)."""

from vlreason.rl.advantages import AdvantageScale, combine_rewards, group_advantages, zero_variance_groups
from vlreason.rl.losses import LossAggregation, PolicyLoss, aggregate, clipped_surrogate, k3_kl, policy_loss

__all__ = [
    "AdvantageScale",
    "LossAggregation",
    "PolicyLoss",
    "aggregate",
    "clipped_surrogate",
    "combine_rewards",
    "group_advantages",
    "k3_kl",
    "policy_loss",
    "zero_variance_groups",
]
