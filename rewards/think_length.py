"""Example reward plugin in TRL's plain-function style: keep the reasoning within a budget.

A function with the signature ``fn(completions, **kwargs) -> list[float | None]`` works in
vlreason exactly as in TRL. It reads ``pred_think``, the reasoning vlreason parsed from each
completion (None when there is no closed ``<think>`` block):

    vlreason rewards check rewards/think_length.py:think_within_budget --data counting.jsonl

A plain function takes no options; to make the budget configurable, write a callable class
(see center_distance.py).
"""

from __future__ import annotations

BUDGET_WORDS = 60


def think_within_budget(completions, pred_think, **kwargs):
    """1 within the word budget, falling linearly to 0 at twice the budget; 0 without reasoning."""
    scores = []
    for think in pred_think:
        if think is None:
            scores.append(0.0)
            continue
        words = len(think.split())
        scores.append(min(1.0, max(0.0, 2.0 - words / BUDGET_WORDS)))
    return scores
