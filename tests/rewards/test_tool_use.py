"""``tool_use``: DeepEyes' bonus for a correct answer reached with a tool, and the failed-call penalty."""

from __future__ import annotations

import numpy as np
import pytest

from vlreason.rewards import RewardScorer, get_reward

OK = {"name": "crop", "arguments": {"bbox_2d": [1, 2, 3, 4]}, "error": None}
BAD = {"name": None, "arguments": None, "error": "not JSON"}


@pytest.mark.parametrize(("pred", "truth", "calls", "expected"), [
    ("red", {"label": "red"}, [OK], 1.0),  # used a tool, correct
    ("blue", {"label": "red"}, [OK], 0.0),  # used a tool, wrong: no bonus
    ("red", {"label": "red"}, [], 0.0),  # correct without a tool: no bonus
    ("red", {"label": "red"}, [BAD, OK], 0.95),  # bonus, minus one failed call
    ("blue", {"label": "red"}, [BAD, BAD], -0.1),
    ("7", {"answer": "7"}, [OK], 1.0),  # numbers as numeric does
    ("seven", {"answer": "7"}, [OK], 1.0),
    ("B", {"answer": "B", "choices": ["cat", "dog"]}, [OK], 1.0),  # an option as choice does
    ("Paris ", {"answer": "paris"}, [OK], 1.0),  # other text: case and spacing aside
])
def test_tool_use_follows_deepeyes_rule(pred, truth, calls, expected):
    reward = get_reward("tool_use")
    columns = {"pred_answer": [pred], "tool_calls": [calls], "answer": [truth.get("answer")],
               "label": [truth.get("label")], "choices": [truth.get("choices")]}
    assert reward(["x"], **columns) == [pytest.approx(expected)]


def test_tool_use_does_not_apply_without_a_trace_or_ground_truth():
    reward = get_reward("tool_use", bonus=0.5)
    assert reward(["x", "y"], pred_answer=["red", "red"], label=[None, "red"], tool_calls=[[OK], None]) == [None, None]
    table = RewardScorer({"tool_use": reward})(["x"], {"pred_answer": ["red"], "label": ["red"]})
    assert np.isnan(table.column("tool_use")).all()  # not applicable
