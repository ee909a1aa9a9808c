"""The ``tool_use`` reward (DeepEyes): a bonus for a trajectory that used a tool and answered
correctly, and a penalty for each failed tool call.

It reads the trajectory's tool trace (``tool_calls``, which the scorer fills in for multi-turn
rollouts) and judges the answer by the sample's ground truth (``answers.answer_correct``). A
bonus only for correct answers keeps the model from calling tools for their own sake.
"""

from __future__ import annotations

from typing import Any

from vlreason.rewards.answers import answer_correct
from vlreason.rewards.api import Reward, Score, register_reward


@register_reward("tool_use")
class ToolUseReward(Reward):
    """``bonus`` when a tool call ran and the answer is correct, plus ``invalid_penalty`` per
    failed call (malformed, unknown tool, bad arguments, tool error). None for completions
    without a tool trace (single-turn rollouts, reference answers) or without ground truth.

    Args:
        bonus: added for a correct answer reached with at least one successful call.
        invalid_penalty: added per failed call (DeepEyes-style recipes use about -0.05).
    """

    inputs = ("pred_answer", "answer", "label", "choices", "tool_calls")
    optional = ("answer", "label", "choices", "tool_calls")

    def __init__(self, bonus: float = 1.0, invalid_penalty: float = -0.05):
        super().__init__()
        self.bonus = bonus
        self.invalid_penalty = invalid_penalty

    def score(self, pred_answer: str | None, answer: str | None, label: Any, choices: list[str] | None,
              tool_calls: list[dict[str, Any]] | None) -> Score:
        correct = answer_correct(pred_answer, answer, label, choices)
        if tool_calls is None or correct is None:
            return None
        used = any(call["error"] is None for call in tool_calls)
        failed = sum(call["error"] is not None for call in tool_calls)
        return (self.bonus if used and correct else 0.0) + self.invalid_penalty * failed
