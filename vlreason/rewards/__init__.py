"""Rewards: the plugin API (``register_reward``, ``get_reward``), the scorer, and the built-in
perception rewards (format, iou, multi_box_iou, detection_map, classification, numeric, choice),
tool_use, semantic_consistency and the safety rewards (refusal, refusal_model, safety,
safety_category).
"""

from vlreason.rewards import answers, detection, format, grounding, judges, safety, semantic, tools  # noqa: F401
from vlreason.rewards.api import Reward, RewardFn, check_columns, get_reward, list_rewards, register_reward
from vlreason.rewards.parsing import PredBox, parse_completion
from vlreason.rewards.scoring import (
    OnRewardError,
    RewardError,
    RewardScorer,
    RewardTable,
    dataset_columns,
    parsed_columns,
    reward_columns,
)

__all__ = [
    "OnRewardError",
    "PredBox",
    "Reward",
    "RewardError",
    "RewardFn",
    "RewardScorer",
    "RewardTable",
    "check_columns",
    "dataset_columns",
    "get_reward",
    "list_rewards",
    "parse_completion",
    "parsed_columns",
    "register_reward",
    "reward_columns",
]
