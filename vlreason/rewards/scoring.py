"""Score N completions with R rewards into an N x R table, robust to failing plugins.

The scorer parses each completion once (answer, reasoning, canonical boxes) and hands the
results to every reward as extra columns. Each reward's output is checked: a list of one score
per completion, each a finite number within ``MAX_ABS_SCORE`` or ``None``.

* A reward that answers a batch with the wrong number of scores, or with something that is not
  a list, has a bug that no sample explains: the scorer raises ``RewardError`` whatever
  ``on_error`` says.
* When a reward raises (``sys.exit`` included) or returns a bad score, it is called again sample
  by sample to find which samples fail; then ``on_error=raise`` stops with the reward's name and
  the sample, and ``on_error=skip`` scores those samples ``None``, counts them and logs them, so
  one bad plugin call cannot end a training run.
* A reward that does not return within ``timeout_s`` scores its whole batch ``None`` (counted and
  logged) under ``skip`` and raises under ``raise``; it is not retried sample by sample.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import reprlib
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import numpy as np

from vlreason.choices import Choice
from vlreason.rewards.api import RewardFn, Score
from vlreason.rewards.parsing import BoxDecoder, completion_text, parse_completion
from vlreason.vision.boxes import Size

logger = logging.getLogger(__name__)

# Rewards are weighted, summed and normalised in float32: magnitudes far beyond any sensible
# reward overflow to inf there (1e308 makes the total NaN and the loss 0) or drown every other
# reward, so a larger score is a failure like NaN.
MAX_ABS_SCORE = 1e6
# What a reward's failure may be; KeyboardInterrupt (and the like) stops the run instead.
_FAILURES = (Exception, SystemExit)
_TIMED_OUT = object()  # the outcome of a reward call that did not return within the timeout


class OnRewardError(Choice):
    RAISE = "raise"  # stop, naming the reward and the sample
    SKIP = "skip"  # score the failing samples None, count and log them


class RewardError(RuntimeError):
    """A reward function failed; the message names the reward, the sample and the cause."""


def parsed_columns(
    completions: Sequence[Any],
    image_sizes: Sequence[Sequence[Size]],
    decoders: Sequence[BoxDecoder | None] | None = None,
    truncated: Sequence[bool] | None = None,
) -> dict[str, list[Any]]:
    """The columns the scorer adds for every reward.

    Args:
        completions: N completions (strings or conversational message lists).
        image_sizes: per completion, the original ``(width, height)`` of each image.
        decoders: per completion, the family's ``from_model`` for its first image (boxes refer
            to the first image); None when completions are already in original pixels.
        truncated: per completion, whether it hit the token limit (``Rollouts.truncated``); a
            cut-off completion without a closed ``</answer>`` has no answer. None: all complete
            (reference responses).

    Returns:
        ``pred_answer``, ``pred_think``, ``pred_boxes`` and ``image_sizes``, each a list of N.
    """
    decoders = decoders or [None] * len(completions)
    truncated = [False] * len(completions) if truncated is None else truncated
    parsed = [
        parse_completion(completion_text(c), decode, sizes[0] if sizes else None, bool(cut))
        for c, decode, sizes, cut in zip(completions, decoders, image_sizes, truncated, strict=True)
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


def reward_columns(samples: Sequence[Any], completions: Sequence[Any], data_columns: Iterable[str], repeat: int = 1,
                   *, decoders: Sequence[BoxDecoder | None] | None = None, truncated: Sequence[bool] | None = None,
                   completion_ids: Sequence[list[int]] | None = None,
                   trace: Mapping[str, Sequence[Any]] | None = None) -> dict[str, list[Any]]:
    """Every column a reward receives for N = len(samples) * repeat completions: the dataset
    columns (``dataset_columns``), the parsed ones (``parsed_columns``), what TRL passes
    (``prompts``, and ``completion_ids`` when given), the samples' video files (``video_paths``)
    and the trajectories' tool trace (``trace``: ``Trajectories.reward_columns``). GRPO,
    evaluation and ``vlreason rewards check`` all build their columns here."""
    columns = dataset_columns(samples, data_columns, repeat)
    columns |= parsed_columns(completions, [s.image_sizes for s in samples for _ in range(repeat)], decoders, truncated)
    columns["prompts"] = [s.prompt_messages for s in samples for _ in range(repeat)]
    columns["video_paths"] = [list(s.videos) for s in samples for _ in range(repeat)]
    if completion_ids is not None:
        columns["completion_ids"] = [list(ids) for ids in completion_ids]
    for name, values in (trace or {}).items():
        columns[name] = list(values)
    return columns


@dataclass
class RewardTable:
    """Scores of N completions by R rewards."""

    names: list[str]
    values: np.ndarray  # [N, R]; NaN where a reward does not apply or its call failed
    failures: dict[str, int] = field(default_factory=dict)  # per reward: samples that failed (skip mode)

    def column(self, name: str) -> np.ndarray:
        """``[N]`` scores of one reward."""
        return self.values[:, self.names.index(name)]

    def with_column(self, name: str, scores: np.ndarray) -> RewardTable:
        """This table with one more reward's ``[N]`` scores as its last column."""
        return RewardTable([*self.names, name], np.concatenate([self.values, scores[:, None]], axis=1),
                           dict(self.failures))


class RewardScorer:
    """Calls a fixed set of named rewards on batches of completions.

    Args:
        rewards: name -> reward function (sync or async).
        on_error: what a reward's failure on some samples does (see ``OnRewardError``).
        timeout_s: seconds one reward call may take; None waits for ever. With a timeout a sync
            reward runs in a daemon helper thread (it cannot be stopped: one that never returns
            is left behind, and does not keep the process alive) and an async one is cancelled
            (at an ``await``: an async reward that blocks the event loop cannot be).
        vetoes: reward name -> score: where that reward scores at or below it, every other reward
            that applies scores 0 (a harmful answer earns nothing for its format).
    """

    def __init__(self, rewards: Mapping[str, RewardFn], on_error: OnRewardError | str = OnRewardError.RAISE,
                 timeout_s: float | None = None, vetoes: Mapping[str, float] | None = None):
        if not rewards:
            raise ValueError("no rewards to score with; name at least one")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive seconds or None (no limit), got {timeout_s}")
        unknown = sorted(set(vetoes or {}) - set(rewards))
        if unknown:
            raise ValueError(f"vetoes name rewards that are not scored: {', '.join(unknown)}")
        self.rewards = dict(rewards)
        self.on_error = OnRewardError(on_error)
        self.timeout_s = timeout_s
        self.vetoes = dict(vetoes or {})

    def __call__(self, completions: Sequence[Any], columns: Mapping[str, Sequence[Any]],
                 shared: Mapping[str, Any] | None = None) -> RewardTable:
        """Score completions.

        Args:
            completions: N completions.
            columns: dataset columns and ``parsed_columns`` output, each a list of N values.
            shared: keyword arguments passed as they are to every call, not per completion (TRL's
                ``trainer_state``).

        Raises:
            RewardError: a reward returned a batch of the wrong length or type, or failed (or
                timed out) under ``on_error=raise``.
        """
        n = len(completions)
        for name, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
        shared = dict(shared or {})
        outcomes = self._call_all(completions, {**columns, **shared})
        table = np.full((n, len(self.rewards)), np.nan)
        failures = {}
        for j, (name, outcome) in enumerate(outcomes.items()):
            scores, failed = self._checked(name, outcome, completions, columns, shared)
            table[:, j] = [np.nan if s is None else s for s in scores]
            failures[name] = failed
        self._veto(table)
        return RewardTable(names=list(self.rewards), values=table, failures=failures)

    def _veto(self, table: np.ndarray) -> None:
        """Zero, in place, the other rewards of the rows a veto reward vetoes."""
        names = list(self.rewards)
        for name, at in self.vetoes.items():
            column = names.index(name)
            vetoed = table[:, column] <= at  # NaN (not applicable) never vetoes
            others = np.arange(table.shape[1]) != column
            block = table[np.ix_(vetoed, others)]
            table[np.ix_(vetoed, others)] = np.where(np.isnan(block), np.nan, 0.0)

    def _call_all(self, completions: Sequence[Any], columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """Each reward's outcome (see ``_call_within``); async rewards run concurrently."""
        outcomes = {name: _call_within(fn, list(completions), columns, self.timeout_s)
                    for name, fn in self.rewards.items()}
        pending = {name: outcome for name, outcome in outcomes.items() if inspect.isawaitable(outcome)}
        outcomes.update(zip(pending, run_awaitables(list(pending.values()), self.timeout_s), strict=True))
        return outcomes

    def _checked(self, name: str, outcome: Any, completions: Sequence[Any], columns: Mapping[str, Sequence[Any]],
                 shared: dict[str, Any]) -> tuple[list[Score], int]:
        """One reward's N scores and how many samples failed, from its batch call's outcome."""
        if outcome is _TIMED_OUT:
            return self._timed_out(name, len(completions))
        if isinstance(outcome, BaseException):
            return self._per_sample(name, outcome, completions, columns, shared)
        scores = _batch_scores(name, outcome, len(completions))
        problem = _score_problem(scores)
        if problem is not None:
            return self._per_sample(name, problem, completions, columns, shared)
        return [None if s is None else float(s) for s in scores], 0

    def _per_sample(self, name: str, batch_problem: Any, completions: Sequence[Any],
                    columns: Mapping[str, Sequence[Any]], shared: dict[str, Any]) -> tuple[list[Score], int]:
        """Re-run a failed reward one sample at a time to find and isolate the failing ones."""
        fn = self.rewards[name]
        scores: list[Score] = []
        failed = []
        for i in range(len(completions)):
            row = {key: list(values[i:i + 1]) for key, values in columns.items()} | shared
            out = _call_and_wait(fn, [completions[i]], row, self.timeout_s)
            if out is _TIMED_OUT:
                return self._timed_out(name, len(completions))
            problem = out if isinstance(out, BaseException) else _score_problem(_batch_scores(name, out, 1))
            if problem is not None:
                message = _describe_failure(name, i, columns, problem)
                if self.on_error is OnRewardError.RAISE:
                    cause = problem if isinstance(problem, BaseException) else None
                    raise RewardError(message) from cause
                failed.append(message)
                scores.append(None)
            else:
                scores.append(None if out[0] is None else float(out[0]))
        if not failed:  # the batch call failed but every single call passed
            logger.warning("reward %r failed on the batch (%s) but on no single sample", name, _cause(batch_problem))
        else:
            logger.warning("reward %r failed on %d of %d samples, scored as not applicable; first: %s",
                           name, len(failed), len(completions), failed[0])
        return scores, len(failed)

    def _timed_out(self, name: str, n: int) -> tuple[list[Score], int]:
        """All N scores of a reward that did not return: None, counted as failures (or raise)."""
        message = (f"reward {name!r} did not return within {self.timeout_s:g} s; raise algorithm.reward_timeout_s "
                   "or fix the reward")
        if self.on_error is OnRewardError.RAISE:
            raise RewardError(message)
        logger.warning("%s (its %d scores are not applicable)", message, n)
        return [None] * n, n


def _batch_scores(name: str, output: Any, n: int) -> list[Any]:
    """``output`` as a list of N scores.

    Raises:
        RewardError: ``output`` is not a list of N; no sample can be blamed for that, so it is
            the reward's bug whatever ``on_error`` says.
    """
    if isinstance(output, np.ndarray):
        output = output.tolist()
    if not isinstance(output, (list, tuple)):
        got = f"{type(output).__name__} {reprlib.repr(output)}"
    elif len(output) != n:
        got = f"{len(output)} scores for {n} completions"
    else:
        return list(output)
    raise RewardError(f"reward {name!r} returned {got}; expected a list of {n} scores (a float, or None for "
                      "'not applicable', per completion). This is a bug in the reward, not in a sample: fix "
                      "the reward")


def _score_problem(scores: Sequence[Any]) -> str | None:
    """Why one of ``scores`` is not a finite number within ``MAX_ABS_SCORE`` or None, or None."""
    for i, score in enumerate(scores):
        if score is None:
            continue
        if not isinstance(score, Real):
            return f"score {i} is {type(score).__name__} {reprlib.repr(score)}, expected a float or None"
        if not (isinstance(score, Integral) or math.isfinite(score)):
            return f"score {i} is {score}; return None for 'not applicable', never NaN or inf"
        if abs(score) > MAX_ABS_SCORE:
            return (f"score {i} is {reprlib.repr(score)}, beyond +-{MAX_ABS_SCORE:g} (rewards are weighted, "
                    "summed and normalised in float32); scale the reward down")
    return None


def _describe_failure(name: str, index: int, columns: Mapping[str, Sequence[Any]], problem: Any) -> str:
    ids = columns.get("id")
    which = f"sample {index}" + (f" (id {ids[index]!r})" if ids is not None else "")
    if isinstance(problem, SystemExit):
        return f"reward {name!r} {_cause(problem)} on {which}"
    return f"reward {name!r} failed on {which}: {_cause(problem)}"


def _cause(problem: Any) -> str:
    if isinstance(problem, SystemExit):
        return f"called sys.exit({problem.code!r})"
    return f"{type(problem).__name__}: {problem}" if isinstance(problem, BaseException) else str(problem)


def _call_within(fn: Callable[..., Any], completions: list[Any], columns: Mapping[str, Any],
                 timeout_s: float | None) -> Any:
    """The outcome of ``fn(completions, **columns)``: its output (an awaitable for an async
    reward), the exception it raised (``sys.exit`` included), or ``_TIMED_OUT``.

    With a timeout the call runs in a daemon helper thread joined for ``timeout_s``; without
    one, on this thread (no overhead).
    """
    if timeout_s is None:
        outcome = _call(fn, completions, columns)
    else:
        box: list[Any] = []
        thread = threading.Thread(target=lambda: box.append(_call(fn, completions, columns)), daemon=True,
                                  name="vlreason-reward")
        thread.start()
        thread.join(timeout_s)
        outcome = box[0] if box else _TIMED_OUT
    if isinstance(outcome, BaseException) and not isinstance(outcome, _FAILURES):
        raise outcome  # KeyboardInterrupt stops the run, even when raised on the helper thread
    return outcome


def _call(fn: Callable[..., Any], completions: list[Any], columns: Mapping[str, Any]) -> Any:
    """``fn``'s output, or whatever it raised, as a value."""
    try:
        return fn(completions, **columns)
    except BaseException as exc:  # a helper thread cannot raise into its caller: _call_within re-raises
        return exc


def _call_and_wait(fn: Callable[..., Any], completions: list[Any], columns: Mapping[str, Any],
                   timeout_s: float | None) -> Any:
    """``_call_within``, with an async reward's result awaited (within the same timeout)."""
    outcome = _call_within(fn, completions, columns, timeout_s)
    return run_awaitables([outcome], timeout_s)[0] if inspect.isawaitable(outcome) else outcome


def run_awaitables(awaitables: list[Awaitable[Any]], timeout_s: float | None = None) -> list[Any]:
    """Await all concurrently; each result, its exception (``sys.exit`` included) or, after
    ``timeout_s``, ``_TIMED_OUT``. Works inside a running event loop (e.g. a notebook or the
    demo) by using a private loop on a helper thread."""
    if not awaitables:
        return []

    async def gather() -> list[Any]:
        return await asyncio.gather(*(_awaited(a, timeout_s) for a in awaitables))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.extend(asyncio.run(gather())))
    thread.start()
    thread.join()
    return results


async def _awaited(awaitable: Awaitable[Any], timeout_s: float | None) -> Any:
    """``awaitable``'s result, its exception, or ``_TIMED_OUT`` (it is then cancelled)."""

    async def outcome() -> Any:
        try:
            return await awaitable
        except _FAILURES as exc:  # inside wait_for, so a reward's own TimeoutError is no timeout
            return exc

    try:
        return await asyncio.wait_for(outcome(), timeout_s)
    except asyncio.TimeoutError:
        return _TIMED_OUT
