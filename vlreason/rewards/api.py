"""The reward plugin API.

A reward is any callable ``fn(completions, **columns) -> list[float | None]``, the contract of
TRL's reward functions, so TRL rewards drop in unchanged:

* ``completions``: N model outputs (strings, or TRL's conversational ``[{"role": "assistant",
  "content": ...}]`` lists);
* ``columns``: the batch's dataset columns by name (``answer``, ``boxes``, any extra field),
  each a list of N values, plus what the scorer parses once for every reward: ``prompts``,
  ``pred_answer``, ``pred_think``, ``pred_boxes`` (``PredBox``es in original-image pixels),
  ``image_sizes`` and ``video_paths``;
* the result: one score per completion, ``None`` where the reward does not apply.

A reward may be ``async``. Settings belong in a small callable class (it pickles into worker
processes, closures do not); ``get_reward(spec, **options)`` instantiates classes with options.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from vlreason.data.schema import RESERVED_COLUMNS, Sample
from vlreason.registry import PluginError, Registry, instantiate
from vlreason.rewards.parsing import completion_text

REWARDS = Registry("reward", "vlreason.rewards")
Score = float | None


class RewardFn(Protocol):
    """``fn(completions, **columns) -> list[float | None]`` (or an awaitable of it)."""

    def __call__(self, completions: Sequence[Any], **columns: Any) -> Sequence[Score] | Awaitable[Sequence[Score]]:
        ...


def register_reward(name: str) -> Any:
    """Decorator registering a reward function or class under ``name``.

    Example::

        @register_reward("length_penalty")
        def length_penalty(completions, **columns):
            return [-len(c) / 1000 for c in completions]
    """
    return REWARDS.register(name)


def list_rewards() -> list[str]:
    """Names of the built-in, registered and entry-point rewards."""
    return REWARDS.names()


def get_reward(spec: str, base_dir: str | Path | None = None, **options: Any) -> RewardFn:
    """Resolve a reward spec (name, ``module:attr`` or ``file.py:attr``) to a callable.

    Classes are instantiated with ``options``; functions take no options.
    """
    target = REWARDS.resolve(spec, base_dir)
    if inspect.isclass(target):
        reward = instantiate(target, options, "reward", spec)
    elif options:
        raise PluginError(f"reward {spec!r} is a function and takes no options (got {sorted(options)}); "
                          "put settings in a callable class")
    else:
        reward = target
    if not callable(reward):
        raise PluginError(f"reward {spec!r} resolved to a {type(reward).__name__}, which is not callable")
    return reward


def required_columns(reward: Any) -> tuple[str, ...]:
    """Dataset columns a reward needs: its ``required_columns`` attribute, else the parameters of
    its signature that have no default (besides ``completions`` and the scorer's own columns)."""
    declared = getattr(reward, "required_columns", None)
    if declared is not None:
        return tuple(declared)
    try:
        params = inspect.signature(reward).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty
                 and p.name not in RESERVED_COLUMNS)


def check_columns(rewards: dict[str, Any], columns: Iterable[str], source: str,
                  samples: Sequence[Sample] = ()) -> None:
    """Fail at start-up when a reward needs a column the data does not have, or cannot score
    the data as configured (``Reward.data_problem``, and ``Reward.sample_problem`` on each of
    ``samples``).

    Raises:
        ValueError: naming every reward and its problem.
    """
    available = set(columns)
    missing = {name: [c for c in required_columns(fn) if c not in available] for name, fn in rewards.items()}
    lines = [f"  reward {name!r} needs column(s) {', '.join(cols)}" for name, cols in missing.items() if cols]
    if lines:
        raise ValueError(f"{source} lacks columns that rewards need (it has: {', '.join(sorted(available))}):\n"
                         + "\n".join(lines) + "\nAdd the fields to the data or choose rewards that fit it.")
    problems = {name: fn.data_problem(available) for name, fn in rewards.items() if isinstance(fn, Reward)}
    lines = [f"  reward {name!r}: {problem}" for name, problem in problems.items() if problem]
    for name, fn in rewards.items():
        found = [(s.source, problem) for s in samples if isinstance(fn, Reward)
                 and (problem := fn.sample_problem(s.columns())) is not None]
        lines += [f"  reward {name!r}: {where}: {problem}" for where, problem in found[:3]]
        if len(found) > 3:
            lines.append(f"  reward {name!r}: ... and {len(found) - 3} more samples")
    if lines:
        raise ValueError(f"rewards cannot score {source} as configured:\n" + "\n".join(lines))


class Reward:
    """Base for built-in rewards: a TRL-style batch call scored one sample at a time.

    Subclasses set ``inputs`` (the columns ``score`` receives, in order; ``completions`` gives
    the completion text) and ``optional`` (columns that may be absent), and implement ``score``.
    """

    inputs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.__name__ = type(self).__name__  # TRL logs rewards by __name__

    @property
    def required_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.inputs if c not in self.optional and c not in RESERVED_COLUMNS)

    def __call__(self, completions: Sequence[Any], **columns: Any) -> list[Score]:
        return [self.score(*values) for values in self.rows(completions, columns)]

    def rows(self, completions: Sequence[Any], columns: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Per completion, the values of ``inputs`` in order (None for an absent optional column).

        Raises:
            KeyError: a required column is missing.
        """
        n = len(completions)
        available = dict(columns)
        if "completions" in self.inputs:
            available["completions"] = [completion_text(c) for c in completions]
        for name in self.inputs:
            if name not in available and name not in self.optional:
                raise KeyError(f"{self.__name__} needs column {name!r}; score through vlreason.rewards.RewardScorer, "
                               "which adds the parsed columns (pred_answer, pred_boxes, ...)")
        columns_in_order = [available[name] if name in available else [None] * n for name in self.inputs]
        return list(zip(*columns_in_order, strict=True))

    def score(self, *values: Any) -> Score:
        raise NotImplementedError

    def data_problem(self, columns: set[str]) -> str | None:
        """Why this reward, as configured, cannot score data with these columns (the option to
        set), or None. Checked at start-up, before any compute."""
        return None

    def sample_problem(self, values: dict[str, Any]) -> str | None:
        """Why this reward, as configured, cannot score a sample with these column values
        (``Sample.columns``), or None. Checked at start-up on every sample."""
        return None
