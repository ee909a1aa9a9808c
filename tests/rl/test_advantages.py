"""Rewards -> advantages: hand-computed values for combine_rewards, group_advantages, zero_variance_groups."""

import math

import pytest
import torch

from vlreason.rl.advantages import (
    STD_EPS,
    AdvantageScale,
    combine_rewards,
    group_advantages,
    overlong_penalty,
    zero_variance_groups,
)

NAN = float("nan")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-9)


# --- combine_rewards --------------------------------------------------------------------------------------------


def test_combine_rewards_weighted_sum_skips_rewards_that_do_not_apply():
    values = torch.tensor([[1.0, NAN, 0.5],
                           [0.0, 2.0, NAN],
                           [3.0, 1.0, 1.0]], dtype=torch.float64)
    weights = t(1.0, 0.5, 2.0)
    # row 0: 1*1 + (NaN skipped) + 0.5*2 = 2.0
    # row 1: 0*1 + 2*0.5 + (NaN skipped) = 1.0
    # row 2: 3*1 + 1*0.5 + 1*2 = 5.5
    assert_close(combine_rewards(values, weights), [2.0, 1.0, 5.5])


def test_combine_rewards_row_no_reward_applies_to_is_nan():
    values = torch.tensor([[NAN, NAN], [NAN, 4.0], [0.0, 0.0]])
    total = combine_rewards(values, torch.tensor([1.0, 0.25]))
    # row 0: nothing applies -> NaN (not nansum's 0); row 1: 4*0.25 = 1; row 2: a real 0 stays 0
    assert math.isnan(total[0].item())
    assert total[1].item() == 1.0
    assert total[2].item() == 0.0


def test_combine_rewards_a_zero_weight_reward_still_makes_a_row_scorable():
    # The reward applies (it is not NaN) but weighs 0: the total is 0, not NaN.
    total = combine_rewards(torch.tensor([[5.0, NAN]]), torch.tensor([0.0, 1.0]))
    assert total.tolist() == [0.0]


def test_combine_rewards_casts_weights_to_the_values():
    total = combine_rewards(torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([1, 3]))  # int weights
    assert total.dtype == torch.float64
    assert total.tolist() == [7.0]  # 1*1 + 2*3


# --- group_advantages: the three scales --------------------------------------------------------------------------


def test_group_scale_divides_by_the_bessel_corrected_group_std_plus_eps():
    rewards = t(1, 2, 3, 0, 0, 3)
    # group 0 = [1, 2, 3]: mean 2, centred [-1, 0, 1], std = sqrt((1 + 0 + 1) / (3 - 1)) = 1
    # group 1 = [0, 0, 3]: mean 1, centred [-1, -1, 2], std = sqrt((1 + 1 + 4) / 2) = sqrt(3)
    s0, s1 = 1 + STD_EPS, math.sqrt(3) + STD_EPS
    expected = [-1 / s0, 0.0, 1 / s0, -1 / s1, -1 / s1, 2 / s1]
    assert_close(group_advantages(rewards, 3, AdvantageScale.GROUP), expected)
    assert_close(group_advantages(rewards, 3, "group"), expected)
    assert_close(group_advantages(rewards, 3), expected)  # group is the default
    assert STD_EPS == 1e-4


def test_batch_scale_divides_group_centred_rewards_by_the_std_of_all_rewards():
    rewards = t(1, 3, 5, 7)
    # groups [1, 3] and [5, 7]: means 2 and 6 -> centred [-1, 1, -1, 1]
    # batch std: mean 4, deviations [-3, -1, 1, 3], squares 9+1+1+9 = 20, / (4 - 1) -> std = sqrt(20/3) = 2.5820
    s = math.sqrt(20 / 3) + STD_EPS
    assert_close(group_advantages(rewards, 2, "batch"), [-1 / s, 1 / s, -1 / s, 1 / s])
    # ... whereas the group std of each pair is sqrt((1 + 1) / 1) = sqrt(2)
    g = math.sqrt(2) + STD_EPS
    assert_close(group_advantages(rewards, 2, "group"), [-1 / g, 1 / g, -1 / g, 1 / g])


def test_none_scale_only_centres():
    rewards = t(1, 3, 5, 10, 0, 2)
    # groups [1, 3, 5] (mean 3) and [10, 0, 2] (mean 4)
    assert_close(group_advantages(rewards, 3, "none"), [-2, 0, 2, 6, -4, -2])
    assert_close(group_advantages(rewards, 3, AdvantageScale.NONE), [-2, 0, 2, 6, -4, -2])


def test_unknown_scale_is_rejected():
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(t(1, 2), 2, "std")


# --- group_advantages: NaN (unscorable) rows ---------------------------------------------------------------------


def test_unscorable_rows_are_left_out_of_group_statistics_and_get_zero():
    rewards = t(NAN, 1, 2, 6)
    # scorable [1, 2, 6]: mean 3, centred [-2, -1, 3], std = sqrt((4 + 1 + 9) / (3 - 1)) = sqrt(7)
    s = math.sqrt(7) + STD_EPS
    assert_close(group_advantages(rewards, 4, "group"), [0.0, -2 / s, -1 / s, 3 / s])
    assert_close(group_advantages(rewards, 4, "none"), [0.0, -2, -1, 3])
    # if the NaN counted as 0 the mean would be 9/4, so the centred values would differ
    assert group_advantages(rewards, 4, "none")[1].item() != 1 - 9 / 4


def test_unscorable_rows_are_left_out_of_the_batch_std():
    rewards = t(1, NAN, 3, 5, 7, 9)
    # group 0 = [1, NaN, 3]: mean 2 -> centred [-1, NaN, 1]; group 1 = [5, 7, 9]: mean 7 -> centred [-2, 0, 2]
    # batch: scorable [1, 3, 5, 7, 9], mean 5, squares 16+4+0+4+16 = 40, / (5 - 1) = 10 -> std sqrt(10)
    b = math.sqrt(10) + STD_EPS
    assert_close(group_advantages(rewards, 3, "batch"), [-1 / b, 0.0, 1 / b, -2 / b, 0.0, 2 / b])
    # group: std of [1, 3] = sqrt(2); of [5, 7, 9] = sqrt((4 + 0 + 4) / 2) = 2
    g0, g1 = math.sqrt(2) + STD_EPS, 2 + STD_EPS
    assert_close(group_advantages(rewards, 3, "group"), [-1 / g0, 0.0, 1 / g0, -2 / g1, 0.0, 2 / g1])


@pytest.mark.parametrize("scale", list(AdvantageScale))
def test_groups_with_fewer_than_two_scorable_rows_or_equal_rewards_get_zero(scale):
    rewards = t(NAN, NAN, NAN,  # nothing scorable
                NAN, 4, NAN,  # one scorable: centred 0, std 0 -> 0 / (0 + 1e-4) = 0
                2, 2, 2,  # all equal: centred 0
                0, 1, 2)  # a normal group, so the batch std is not 0
    advantages = group_advantages(rewards, 3, scale)
    assert not advantages.isnan().any()
    assert advantages[:9].tolist() == [0.0] * 9
    # the normal group [0, 1, 2]: centred [-1, 0, 1]
    # group: std of [0, 1, 2] = sqrt((1 + 0 + 1) / 2) = 1
    # batch: scorable [4, 2, 2, 2, 0, 1, 2], mean 13/7, deviations (in 7ths) [15, 1, 1, 1, -13, -6, 1],
    #        squares (225 + 4*1 + 169 + 36) / 49 = 434/49, / (7 - 1) -> std sqrt(434/294) = 1.21499
    divisor = {"group": 1 + STD_EPS, "batch": math.sqrt(434 / 294) + STD_EPS, "none": 1.0}[scale.value]
    assert_close(advantages[9:], [-1 / divisor, 0.0, 1 / divisor])


@pytest.mark.parametrize("scale", list(AdvantageScale))
def test_group_size_one_gives_zero_advantages(scale):
    # G = 1: each completion is its own baseline, so every centred reward is 0 (and the std is 0, not NaN).
    advantages = group_advantages(t(1, 5, NAN, -2), 1, scale)
    assert advantages.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_advantages_keep_the_input_shape_and_dtype():
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float32)
    advantages = group_advantages(rewards, 2)
    assert advantages.shape == (4,)
    assert advantages.dtype == torch.float32


@pytest.mark.parametrize("rewards, group_size", [
    (torch.zeros(5), 2),  # 5 does not split into groups of 2
    (torch.zeros(2, 3), 3),  # not 1-D
    (torch.zeros(4), 0),  # no group
    (torch.zeros(4), -2),
])
def test_bad_shapes_raise(rewards, group_size):
    with pytest.raises(ValueError, match="do not split into groups"):
        group_advantages(rewards, group_size)
    with pytest.raises(ValueError, match="do not split into groups"):
        zero_variance_groups(rewards, group_size)


# --- zero_variance_groups ----------------------------------------------------------------------------------------


def test_zero_variance_groups():
    rewards = t(1, 1, 1,  # all equal -> True
                1, 2, 1,  # varies -> False
                NAN, 3, 3,  # scorable ones equal -> True
                NAN, 1, 2,  # scorable ones differ -> False
                NAN, NAN, 5,  # one scorable -> True
                NAN, NAN, NAN,  # none scorable -> True
                1, 1 + 1e-7, 1)  # differ by less than atol=1e-6 -> True
    assert zero_variance_groups(rewards, 3).tolist() == [True, False, True, False, True, True, True]


def test_zero_variance_groups_atol():
    rewards = t(0, 0.5, 0, 0, 2, 0)
    # spreads 0.5 and 2
    assert zero_variance_groups(rewards, 3).tolist() == [False, False]
    assert zero_variance_groups(rewards, 3, atol=0.5).tolist() == [True, False]
    assert zero_variance_groups(rewards, 3, atol=2.0).tolist() == [True, True]


def test_zero_variance_groups_match_zero_advantages():
    # A zero-variance group is exactly one whose advantages are all 0.
    rewards = t(3, 3, NAN, 0, 1, 0, NAN, NAN, NAN)
    flags = zero_variance_groups(rewards, 3)
    assert flags.tolist() == [True, False, True]
    advantages = group_advantages(rewards, 3).reshape(3, 3)
    assert ((advantages == 0).all(dim=1) == flags).all()


def test_group_size_one_is_always_zero_variance():
    assert zero_variance_groups(t(1, 2, NAN), 1).tolist() == [True, True, True]


def test_overlong_penalty_is_zero_then_falls_linearly_to_the_factor():
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    # budget 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at the budget and beyond
    torch.testing.assert_close(overlong_penalty(lengths, max_tokens=10, buffer=4),
                               torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, max_tokens=10, buffer=4, factor=0.5),
                               torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))
    with pytest.raises(ValueError, match="overlong buffer must be in 1..10"):
        overlong_penalty(lengths, max_tokens=10, buffer=0)
