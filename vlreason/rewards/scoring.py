"""Score N completions with R rewards into an N x R table, robust to failing plugins.

The scorer parses each completion once (answer, reasoning, canonical boxes) and hands the
results to every reward as extra columns. Each reward's output is checked: one finite number
or ``None`` per completion. When a reward raises or returns something malformed, it is called
again sample by sample to find which samples fail; then ``on_error=raise`` stops with the
reward's name and the sample, and ``on_error=skip`` scores those samples ``None``, counts them
and logs them, so one bad plugin call cannot end a training run.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np

from vlreason.choices import Choice
from vlreason.rewards.api import RewardFn, Score
from vlreason.rewards.parsing import BoxDecoder, completion_text, parse_completion
from vlreason.vision.boxes import Size

logger = logging.getLogger(__name__)


class OnRewardError(Choice):
    RAISE = "raise"  # stop, naming the reward and the sample
    SKIP = "skip"  # score the failing samples None, count and log them


class RewardError(RuntimeError):
    """A reward function failed; the message names the reward, the sample and the cause."""


def parsed_columns(
    completions: Sequence[Any],
    image_sizes: Sequence[Sequence[Size]],
    decoders: Sequence[BoxDecoder | None] | None = None,
) -> dict[str, list[Any]]:
    """The columns the scorer adds for every reward.

    Args:
        completions: N completions (strings or conversational message lists).
        image_sizes: per completion, the original ``(width, height)`` of each image.
        decoders: per completion, the family's ``from_model`` for its first image (boxes refer
            to the first image); None when completions are already in original pixels.

    Returns:
        ``pred_answer``, ``pred_think``, ``pred_boxes`` and ``image_sizes``, each a list of N.
    """
    decoders = decoders or [None] * len(completions)
    parsed = [
        parse_completion(completion_text(c), decode, sizes[0] if sizes else None)
        for c, decode, sizes in zip(completions, decoders, image_sizes, strict=True)
    ]
    return {
        "pred_answer": [p.answer for p in parsed],
        "pred_think": [p.think for p in parsed],
        "pred_boxes": [p.boxes for p in parsed],
        "image_sizes": [list(s) for s in image_sizes],
    }


def dataset_columns(samples: Sequence[Any], names: Iterable[str], repeat: int = 1) -> dict[str, list[Any]]:
    """Data columns by name for N = len(samples) * repeat completions (each sample's value repeated
    for its ``repeat`` consecutive completions); a sample without a field gives None."""
    rows = [sample.columns() for sample in samples]
    return {name: [row.get(name) for row in rows for _ in range(repeat)] for name in names}


@dataclass
class RewardTable:
    """Scores of N completions by R rewards."""

    names: list[str]
    values: np.ndarray  # [N, R]; NaN where a reward does not apply or its call failed
    failures: dict[str, int] = field(default_factory=dict)  # per reward: samples that failed (skip mode)

    def column(self, name: str) -> np.ndarray:
        """``[N]`` scores of one reward."""
        return self.values[:, self.names.index(name)]


class RewardScorer:
    """Calls a fixed set of named rewards on batches of completions."""

    def __init__(self, rewards: Mapping[str, RewardFn], on_error: OnRewardError | str = OnRewardError.RAISE):
        if not rewards:
            raise ValueError("no rewards to score with; name at least one")
        self.rewards = dict(rewards)
        self.on_error = OnRewardError(on_error)

    def __call__(self, completions: Sequence[Any], columns: Mapping[str, Sequence[Any]]) -> RewardTable:
        """Score completions.

        Args:
            completions: N completions.
            columns: dataset columns and ``parsed_columns`` output, each a list of N values.
        """
        n = len(completions)
        for name, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
        outcomes = self._call_all(completions, columns)
        table = np.full((n, len(self.rewards)), np.nan)
        failures = {}
        for j, (name, outcome) in enumerate(outcomes.items()):
            scores, failed = self._checked(name, outcome, completions, columns)
            table[:, j] = [np.nan if s is None else s for s in scores]
            failures[name] = failed
        return RewardTable(names=list(self.rewards), values=table, failures=failures)

    def _call_all(self, completions: Sequence[Any], columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """Each reward's raw output or exception; async rewards run concurrently."""
        outcomes: dict[str, Any] = {}
        pending: dict[str, Awaitable[Any]] = {}
        for name, fn in self.rewards.items():
            try:
                result = fn(list(completions), **columns)
            except Exception as exc:
                outcomes[name] = exc
                continue
            if inspect.isawaitable(result):
                pending[name] = result
            outcomes[name] = result
        for name, result in zip(pending, run_awaitables(list(pending.values())), strict=True):
            outcomes[name] = result
        return outcomes

    def _checked(self, name: str, outcome: Any, completions: Sequence[Any],
                 columns: Mapping[str, Sequence[Any]]) -> tuple[list[Score], int]:
        problem = outcome if isinstance(outcome, Exception) else _output_problem(outcome, len(completions))
        if problem is None:
            return [None if s is None else float(s) for s in outcome], 0
        return self._per_sample(name, problem, completions, columns)

    def _per_sample(self, name: str, batch_problem: Any, completions: Sequence[Any],
                    columns: Mapping[str, Sequence[Any]]) -> tuple[list[Score], int]:
        """Re-run a failed reward one sample at a time to find and isolate the failing ones."""
        fn = self.rewards[name]
        scores: list[Score] = []
        failed = []
        for i in range(len(completions)):
            row = {key: list(values[i:i + 1]) for key, values in columns.items()}
            try:
                out = _call_sync(fn, [completions[i]], row)
                problem = _output_problem(out, 1)
            except Exception as exc:
                problem = exc
            if problem is not None:
                message = _describe_failure(name, i, columns, problem)
                if self.on_error is OnRewardError.RAISE:
                    cause = problem if isinstance(problem, Exception) else None
                    raise RewardError(message) from cause
                failed.append(message)
                scores.append(None)
            else:
                scores.append(None if out[0] is None else float(out[0]))
        if not failed:  # the batch call failed but every single call passed
            logger.warning("reward %r failed on the batch (%s) but on no single sample", name, batch_problem)
        else:
            logger.warning("reward %r failed on %d of %d samples, scored as not applicable; first: %s",
                           name, len(failed), len(completions), failed[0])
        return scores, len(failed)


def _output_problem(output: Any, n: int) -> str | None:
    """Why ``output`` is not N finite numbers or None, or None when it is fine."""
    if isinstance(output, np.ndarray):
        output = output.tolist()
    if not isinstance(output, (list, tuple)):
        return f"returned {type(output).__name__}, expected a list of {n} floats or None"
    if len(output) != n:
        return f"returned {len(output)} scores for {n} completions"
    for i, score in enumerate(output):
        if score is None:
            continue
        if not isinstance(score, Real):
            return f"score {i} is {type(score).__name__} {score!r}, expected a float or None"
        if not math.isfinite(float(score)):
            return f"score {i} is {score}; return None for 'not applicable', never NaN or inf"
    return None


def _describe_failure(name: str, index: int, columns: Mapping[str, Sequence[Any]], problem: Any) -> str:
    ids = columns.get("id")
    which = f"sample {index}" + (f" (id {ids[index]!r})" if ids is not None else "")
    cause = f"{type(problem).__name__}: {problem}" if isinstance(problem, Exception) else str(problem)
    return f"reward {name!r} failed on {which}: {cause}"


def _call_sync(fn: Callable[..., Any], completions: list[Any], columns: Mapping[str, Any]) -> Any:
    result = fn(completions, **columns)
    return run_awaitables([result])[0] if inspect.isawaitable(result) else result


def run_awaitables(awaitables: list[Awaitable[Any]]) -> list[Any]:
    """Await all concurrently; each result or its exception. Works inside a running event loop
    (e.g. a notebook or the demo) by using a private loop on a helper thread."""
    if not awaitables:
        return []

    async def gather() -> list[Any]:
        return await asyncio.gather(*awaitables, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.extend(asyncio.run(gather())))
    thread.start()
    thread.join()
    return results
