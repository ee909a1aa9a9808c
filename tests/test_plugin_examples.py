"""The example plugins in the top-level rewards/ folder load by path and score as documented."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vlreason.rewards import RewardScorer, get_reward, parsed_columns

REPO = Path(__file__).resolve().parents[1]


def score(spec: str, completions: list[str], sizes, **columns):
    reward = get_reward(spec, base_dir=REPO, **columns.pop("options", {}))
    cols = parsed_columns(completions, sizes) | columns
    return RewardScorer({"r": reward})(completions, cols).column("r").tolist()


def test_center_distance_hand_computed():
    # prediction centre (30, 40), ground-truth centre (60, 80): distance 50, diagonal of 300x400 is 500
    completions = ["<answer>[20, 30, 40, 50]</answer>", "<answer>no box</answer>", "<answer>[0, 0, 1, 1]</answer>"]
    scores = score("rewards/center_distance.py:CenterDistance", completions, [[(300, 400)]] * 3,
                   boxes=[[(50, 70, 70, 90)], [(50, 70, 70, 90)], None], options={"power": 2})
    assert scores[0] == pytest.approx((1 - 50 / 500) ** 2)
    assert scores[1] == 0.0
    assert math.isnan(scores[2])  # no ground truth: not applicable


def test_think_within_budget_hand_computed():
    short = "<think>" + "word " * 60 + "</think><answer>3</answer>"
    long = "<think>" + "word " * 90 + "</think><answer>3</answer>"
    scores = score("rewards/think_length.py:think_within_budget", [short, long, "<answer>3</answer>"], [[]] * 3)
    assert scores == [1.0, pytest.approx(2 - 90 / 60), 0.0]
