"""``RewardScorer``: the [N, R] table, async rewards, failing plugins, parsed columns."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time

import numpy as np
import pytest

from vlreason.rewards import OnRewardError, RewardError, RewardScorer, get_reward, parsed_columns
from vlreason.rewards.scoring import MAX_ABS_SCORE

COMPLETIONS = ["<think>a</think><answer>good</answer>", "<answer>bad</answer>", "<think>c</think><answer>fine</answer>"]
IDS = ["s0", "s1", "s2"]


def columns_for(completions, **extra):
    """Parsed columns for completions without images, plus extra dataset columns."""
    return {**parsed_columns(completions, [[] for _ in completions]), **extra}


def table_of(rewards, completions=COMPLETIONS, on_error="raise", **extra):
    return RewardScorer(rewards, on_error=on_error)(completions, columns_for(completions, **extra))


def same(a, b) -> bool:
    """Element-wise equality that treats NaN as equal to NaN."""
    return np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True)


# rewards used below: each looks at the parsed answer, so a single-sample re-run behaves the same


def fails_on_bad(completions, pred_answer, **columns):
    if "bad" in pred_answer:
        raise ValueError("cannot score 'bad'")
    return [1.0] * len(completions)


def nan_on_bad(completions, pred_answer, **columns):
    return [float("nan") if a == "bad" else 1.0 for a in pred_answer]


def string_on_bad(completions, pred_answer, **columns):
    return ["0.5" if a == "bad" else 1.0 for a in pred_answer]


def inf_on_bad(completions, pred_answer, **columns):
    return [math.inf if a == "bad" else 1.0 for a in pred_answer]


def one_too_many(completions, **columns):
    return [1.0] * (len(completions) + 1)


def answer_length(completions, pred_answer, **columns):
    return [float(len(a)) for a in pred_answer]


# ---------------------------------------------------------------------------- the table


def test_table_shape_and_none_as_nan() -> None:
    def sometimes(completions, **columns):
        return [1.0, None, 0.5]

    table = table_of({"format": get_reward("format"), "sometimes": sometimes, "length": answer_length})
    assert table.names == ["format", "sometimes", "length"]
    assert table.values.shape == (3, 3)
    # format: think+answer, answer only, think+answer; lengths of "good", "bad", "fine"
    assert same(table.values, [[1.0, 1.0, 4.0], [0.0, np.nan, 3.0], [1.0, 0.5, 4.0]])
    assert same(table.column("sometimes"), [1.0, np.nan, 0.5])
    assert table.failures == {"format": 0, "sometimes": 0, "length": 0}


def test_scores_of_other_numeric_types_are_accepted() -> None:
    def numpy_array(completions, **columns):
        return np.array([1, 2, 3], dtype=np.float32)

    def integers(completions, **columns):
        return (0, 1, np.int64(2))

    table = table_of({"array": numpy_array, "ints": integers})
    assert same(table.values, [[1, 0], [2, 1], [3, 2]])
    assert table.values.dtype == np.float64


def test_needs_a_reward() -> None:
    with pytest.raises(ValueError, match="no rewards"):
        RewardScorer({})


def test_on_error_values() -> None:
    assert RewardScorer({"f": answer_length}, on_error="skip").on_error is OnRewardError.SKIP
    with pytest.raises(ValueError):
        RewardScorer({"f": answer_length}, on_error="ignore")


@pytest.mark.parametrize("timeout_s", [0, -1.0])
def test_timeout_must_be_positive(timeout_s) -> None:
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        RewardScorer({"f": answer_length}, timeout_s=timeout_s)


def test_column_length_mismatch() -> None:
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 completions"):
        RewardScorer({"f": answer_length})(COMPLETIONS, columns_for(COMPLETIONS, answer=["a", "b"]))


def test_rewards_receive_dataset_and_parsed_columns() -> None:
    seen = {}

    def spy(completions, **columns):
        seen.update(columns)
        seen["completions"] = completions
        return [None] * len(completions)

    table_of({"spy": spy}, answer=["x", "y", "z"])
    assert seen["completions"] == COMPLETIONS
    assert seen["answer"] == ["x", "y", "z"]
    assert seen["pred_answer"] == ["good", "bad", "fine"]
    assert seen["pred_think"] == ["a", None, "c"]
    assert {"pred_boxes", "image_sizes"} <= set(seen)


# ---------------------------------------------------------------------------- async rewards


def test_async_reward() -> None:
    async def slow_length(completions, pred_answer, **columns):
        await asyncio.sleep(0.01)
        return [float(len(a)) for a in pred_answer]

    table = table_of({"async": slow_length, "sync": answer_length})
    assert same(table.values, [[4, 4], [3, 3], [4, 4]])


def test_two_async_rewards_run_concurrently() -> None:
    started: set[str] = set()

    def waits_for(me: str, other: str):
        async def reward(completions, **columns):
            started.add(me)
            for _ in range(200):  # up to ~2 s for the other one to start
                if other in started:
                    break
                await asyncio.sleep(0.01)
            return [1.0 if other in started else 0.0] * len(completions)

        return reward

    # run one after the other, the first would finish before the second started and score 0
    table = table_of({"a": waits_for("a", "b"), "b": waits_for("b", "a")})
    assert same(table.values, np.ones((3, 2)))


def test_async_reward_failing_on_one_sample_is_isolated() -> None:
    async def async_fails_on_bad(completions, pred_answer, **columns):
        await asyncio.sleep(0)
        return fails_on_bad(completions, pred_answer)

    table = table_of({"async": async_fails_on_bad}, on_error="skip")
    assert same(table.column("async"), [1.0, np.nan, 1.0])
    assert table.failures == {"async": 1}


def test_scorer_inside_a_running_event_loop() -> None:
    async def async_length(completions, pred_answer, **columns):
        await asyncio.sleep(0)
        return [float(len(a)) for a in pred_answer]

    async def async_fails_on_bad(completions, pred_answer, **columns):
        await asyncio.sleep(0)
        return fails_on_bad(completions, pred_answer)

    scorer = RewardScorer({"length": async_length, "fails": async_fails_on_bad, "format": get_reward("format")},
                          on_error="skip")

    async def main():
        asyncio.get_running_loop()  # a loop is running here, as in a notebook or the demo server
        return scorer(COMPLETIONS, columns_for(COMPLETIONS))  # called synchronously

    table = asyncio.run(main())
    assert same(table.values, [[4, 1, 1], [3, np.nan, 0], [4, 1, 1]])
    assert table.failures == {"length": 0, "fails": 1, "format": 0}


# ---------------------------------------------------------------------------- failing rewards


def test_raise_names_reward_sample_and_id() -> None:
    with pytest.raises(RewardError) as info:
        table_of({"length": answer_length, "picky": fails_on_bad}, id=IDS)
    message = str(info.value)
    assert "'picky'" in message
    assert "sample 1" in message and "'s1'" in message
    assert "ValueError: cannot score 'bad'" in message
    assert isinstance(info.value.__cause__, ValueError)


def test_raise_without_id_column_names_the_index() -> None:
    with pytest.raises(RewardError, match=r"reward 'picky' failed on sample 1: ValueError"):
        table_of({"picky": fails_on_bad})


def test_skip_scores_the_failing_sample_nan_and_counts_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        table = table_of({"length": answer_length, "picky": fails_on_bad}, on_error="skip", id=IDS)
    assert same(table.values, [[4, 1], [3, np.nan], [4, 1]])
    assert table.failures == {"length": 0, "picky": 1}
    assert "picky" in caplog.text and "1 of 3" in caplog.text and "'s1'" in caplog.text


@pytest.mark.parametrize("reward", [nan_on_bad, string_on_bad, inf_on_bad], ids=["nan", "string", "inf"])
def test_malformed_score_is_a_failure(reward) -> None:
    table = table_of({"r": reward, "length": answer_length}, on_error="skip")
    assert same(table.values, [[1, 4], [np.nan, 3], [1, 4]])
    assert table.failures == {"r": 1, "length": 0}
    with pytest.raises(RewardError, match=r"'r' failed on sample 1 \(id 's1'\)"):
        table_of({"r": reward}, id=IDS)


def one_score(completions, **columns):
    return [1.0]


def scalar(completions, **columns):
    return 1.0


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize(("reward", "message"), [
    # one value for N completions: a single-sample re-run would pass, so it must not be tried
    (one_score, r"reward 'r' returned 1 scores for 3 completions; expected a list of 3"),
    (one_too_many, r"reward 'r' returned 4 scores for 3 completions; expected a list of 3"),
    (scalar, r"reward 'r' returned float 1.0; expected a list of 3"),
], ids=["one_for_n", "one_too_many", "scalar"])
def test_batch_of_the_wrong_length_or_type_is_the_rewards_bug(reward, message, on_error) -> None:
    with pytest.raises(RewardError, match=message):
        table_of({"r": reward, "length": answer_length}, on_error=on_error)


def test_async_batch_of_the_wrong_length_raises() -> None:
    async def async_one_score(completions, **columns):
        return [1.0]

    with pytest.raises(RewardError, match=r"reward 'r' returned 1 scores for 3 completions"):
        table_of({"r": async_one_score}, on_error="skip")


def test_wrong_length_on_the_per_sample_rerun_raises() -> None:
    def fails_then_two(completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("no batches")
        return [1.0, 1.0]

    with pytest.raises(RewardError, match=r"reward 'r' returned 2 scores for 1 completions"):
        table_of({"r": fails_then_two}, on_error="skip")


# ---------------------------------------------------------------------------- extreme scores


@pytest.mark.parametrize("extreme", [1e308, -1e308, 2e6, 10**400], ids=["1e308", "-1e308", "2e6", "huge_int"])
def test_extreme_score_is_a_failure(extreme, caplog: pytest.LogCaptureFixture) -> None:
    def extreme_on_bad(completions, pred_answer, **columns):
        return [extreme if a == "bad" else 1.0 for a in pred_answer]

    with caplog.at_level(logging.WARNING):
        table = table_of({"r": extreme_on_bad, "length": answer_length}, on_error="skip")
    assert same(table.values, [[1, 4], [np.nan, 3], [1, 4]])
    assert table.failures == {"r": 1, "length": 0}
    assert "scale the reward down" in caplog.text
    with pytest.raises(RewardError, match=r"'r' failed on sample 1 \(id 's1'\).*1e\+06.*scale the reward down"):
        table_of({"r": extreme_on_bad}, id=IDS)


def test_scores_at_the_bound_pass() -> None:
    def at_bound(completions, **columns):
        return [MAX_ABS_SCORE, -MAX_ABS_SCORE, 0.0]

    assert same(table_of({"r": at_bound}).column("r"), [MAX_ABS_SCORE, -MAX_ABS_SCORE, 0.0])


# ---------------------------------------------------------------------------- hanging and exiting rewards


def test_sync_reward_that_never_returns_times_out(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    calls = []

    def hangs(completions, **columns):
        calls.append(len(completions))
        release.wait(30)  # "never" for the test; released at the end so the helper thread ends
        return [1.0] * len(completions)

    try:
        start = time.perf_counter()
        with caplog.at_level(logging.WARNING):
            table = RewardScorer({"hangs": hangs, "length": answer_length}, on_error="skip", timeout_s=0.2)(
                COMPLETIONS, columns_for(COMPLETIONS))
        assert time.perf_counter() - start < 5
        assert same(table.values, [[np.nan, 4], [np.nan, 3], [np.nan, 4]])
        assert table.failures == {"hangs": 3, "length": 0}
        assert calls == [3]  # no per-sample retry after a timeout
        assert "did not return within 0.2 s" in caplog.text
        with pytest.raises(RewardError, match=r"reward 'hangs' did not return within 0.2 s; raise "
                                              r"algorithm.reward_timeout_s or fix the reward"):
            RewardScorer({"hangs": hangs}, on_error="raise", timeout_s=0.2)(COMPLETIONS, columns_for(COMPLETIONS))
    finally:
        release.set()


def test_async_reward_that_never_returns_times_out() -> None:
    calls = []

    async def hangs(completions, **columns):
        calls.append(len(completions))
        await asyncio.sleep(3600)
        return [1.0] * len(completions)

    start = time.perf_counter()
    table = RewardScorer({"hangs": hangs, "length": answer_length}, on_error="skip", timeout_s=0.2)(
        COMPLETIONS, columns_for(COMPLETIONS))
    assert time.perf_counter() - start < 5
    assert same(table.column("hangs"), [np.nan] * 3)
    assert table.failures == {"hangs": 3, "length": 0}
    assert calls == [3]
    with pytest.raises(RewardError, match=r"reward 'hangs' did not return within 0.2 s"):
        RewardScorer({"hangs": hangs}, on_error="raise", timeout_s=0.2)(COMPLETIONS, columns_for(COMPLETIONS))


def test_reward_raising_timeout_error_itself_is_an_ordinary_failure() -> None:
    async def network_timeout_on_bad(completions, pred_answer, **columns):
        if "bad" in pred_answer:
            raise TimeoutError("judge did not answer")
        return [1.0] * len(completions)

    table = RewardScorer({"judge": network_timeout_on_bad}, on_error="skip", timeout_s=5)(
        COMPLETIONS, columns_for(COMPLETIONS))
    assert same(table.column("judge"), [1.0, np.nan, 1.0])  # isolated to its sample, not a timeout
    assert table.failures == {"judge": 1}


def test_timeout_leaves_fast_rewards_alone() -> None:
    async def async_length(completions, pred_answer, **columns):
        return [float(len(a)) for a in pred_answer]

    table = RewardScorer({"length": answer_length, "async": async_length, "picky": fails_on_bad},
                         on_error="skip", timeout_s=5)(COMPLETIONS, columns_for(COMPLETIONS))
    assert same(table.values, [[4, 4, 1], [3, 3, np.nan], [4, 4, 1]])
    assert table.failures == {"length": 0, "async": 0, "picky": 1}


@pytest.mark.parametrize("timeout_s", [None, 5.0])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_sys_exit_in_a_reward_is_that_rewards_failure(is_async: bool, timeout_s) -> None:
    def exits_on_bad(completions, pred_answer, **columns):
        if "bad" in pred_answer:
            sys.exit(3)
        return [1.0] * len(completions)

    async def async_exits_on_bad(completions, pred_answer, **columns):
        return exits_on_bad(completions, pred_answer)

    reward = async_exits_on_bad if is_async else exits_on_bad
    table = RewardScorer({"r": reward, "length": answer_length}, on_error="skip", timeout_s=timeout_s)(
        COMPLETIONS, columns_for(COMPLETIONS))
    assert same(table.values, [[1, 4], [np.nan, 3], [1, 4]])
    assert table.failures == {"r": 1, "length": 0}
    with pytest.raises(RewardError, match=r"reward 'r' called sys.exit\(3\) on sample 1 \(id 's1'\)"):
        RewardScorer({"r": reward}, timeout_s=timeout_s)(COMPLETIONS, columns_for(COMPLETIONS, id=IDS))


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_keyboard_interrupt_in_a_reward_propagates(timeout_s) -> None:
    def interrupted(completions, **columns):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RewardScorer({"r": interrupted}, on_error="skip", timeout_s=timeout_s)(COMPLETIONS, columns_for(COMPLETIONS))


def test_batch_failure_without_single_sample_failure() -> None:
    def only_one_at_a_time(completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("batching not supported")
        return [2.0]

    table = table_of({"r": only_one_at_a_time}, on_error="raise")
    assert same(table.column("r"), [2.0, 2.0, 2.0])
    assert table.failures == {"r": 0}


# ---------------------------------------------------------------------------- parsed columns


def relative_1000(size):
    width, height = size
    return lambda c: (c[0] * width / 1000, c[1] * height / 1000, c[2] * width / 1000, c[3] * height / 1000)


def test_parsed_columns_with_decoders_and_image_sizes() -> None:
    completions = ["<answer>[100, 200, 500, 1000]</answer>", "<answer>[0, 0, 1200, 500]</answer>",
                   "<answer>[-5, 0, 20, 30]</answer>"]
    sizes = [[(640, 480)], [(200, 100), (50, 50)], []]  # the second has two images: boxes refer to the first
    columns = parsed_columns(completions, sizes, [relative_1000((640, 480)), relative_1000((200, 100)), None])
    boxes = [[b.box for b in row] for row in columns["pred_boxes"]]
    assert boxes == [
        [(64.0, 96.0, 320.0, 480.0)],  # 100*.64, 200*.48, 500*.64, 1000*.48
        [(0.0, 0.0, 200.0, 50.0)],  # 1200*.2 = 240 clamped to 200; 500*.1 = 50
        [(-5.0, 0.0, 20.0, 30.0)],  # no image: not decoded, not clamped
    ]
    assert columns["image_sizes"] == [[(640, 480)], [(200, 100), (50, 50)], []]
    # scored: GT in pixels. Sample 0: [64,96,320,480] vs [64,96,320,288]: 256*192 / (256*384) = 0.5.
    # Sample 1: [0,0,200,50] vs [0,0,100,50]: 5000 / 10000 = 0.5. Sample 2: identical -> 1.
    truth = [[[64, 96, 320, 288]], [[0, 0, 100, 50]], [[-5, 0, 20, 30]]]
    table = RewardScorer({"iou": get_reward("iou")})(completions, {**columns, "boxes": truth})
    assert table.column("iou").tolist() == pytest.approx([0.5, 0.5, 1.0])


def test_parsed_columns_without_decoders_are_original_pixels() -> None:
    columns = parsed_columns(["[10, 10, 2000, 20]"], [[(100, 50)]])
    assert [b.box for b in columns["pred_boxes"][0]] == [(10.0, 10.0, 100.0, 20.0)]  # clamped to width 100


def test_parsed_columns_length_mismatch() -> None:
    with pytest.raises(ValueError):
        parsed_columns(["a", "b"], [[(10, 10)]])
