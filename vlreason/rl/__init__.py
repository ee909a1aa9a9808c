"""The GRPO family as pure tensor functions: no I/O, no model (see ``advantages`` and ``losses``)."""

from vlreason.rl.advantages import (
    AdvantageScale,
    combine_rewards,
    group_advantages,
    overlong_penalty,
    temporal_bonus,
    zero_variance_groups,
)
from vlreason.rl.losses import (
    ImportanceLevel,
    LossAggregation,
    PolicyLoss,
    aggregate,
    clipped_surrogate,
    k3_kl,
    policy_loss,
)

__all__ = [
    "AdvantageScale",
    "ImportanceLevel",
    "LossAggregation",
    "PolicyLoss",
    "aggregate",
    "clipped_surrogate",
    "combine_rewards",
    "group_advantages",
    "k3_kl",
    "overlong_penalty",
    "policy_loss",
    "temporal_bonus",
    "zero_variance_groups",
]
