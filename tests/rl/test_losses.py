"""The clipped surrogate, k3 KL, the three aggregations and policy_loss, against hand-computed numbers."""

import math

import pytest
import torch

from vlreason.rl.losses import LossAggregation, aggregate, clipped_surrogate, k3_kl, policy_loss, sampler_is_weights

F64 = torch.float64
LN = math.log
ALL_MODES = list(LossAggregation)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=atol)


# --- clipped_surrogate -------------------------------------------------------------------------------------------

EPS_LOW, EPS_HIGH = 0.2, 0.28  # ratio clipped to [0.8, 1.28]


def test_clipped_surrogate_with_asymmetric_clip_range():
    # one token per row; ratio = exp(logp - old_logp), old_logp = 0
    ratios = [1.5, 1.5, 0.5, 0.5, 1.25, 0.75, 1.1, 0.9, 1.5]
    advantages = t([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 2.0, -2.0, 0.0])
    logp = t([[LN(r)] for r in ratios])
    loss, clipped = clipped_surrogate(logp, torch.zeros_like(logp), advantages, EPS_LOW, EPS_HIGH)
    # loss = -min(ratio * A, clip(ratio, 0.8, 1.28) * A)
    expected = [
        -1.28,  # 1.5,  A=+1: min(1.5, 1.28) = 1.28                -> clipped (above 1 + eps_high)
        1.5,  # 1.5,  A=-1: min(-1.5, -1.28) = -1.5               -> not clipped (pessimistic side)
        -0.5,  # 0.5,  A=+1: min(0.5, 0.8) = 0.5                  -> not clipped
        0.8,  # 0.5,  A=-1: min(-0.5, -0.8) = -0.8                -> clipped (below 1 - eps_low)
        -1.25,  # 1.25, A=+1: 1.25 < 1.28, inside: a symmetric 0.2 would have clipped it to 1.2
        0.8,  # 0.75, A=-1: 0.75 < 0.8: min(-0.75, -0.8) = -0.8  -> clipped by eps_low
        -2.2,  # 1.1,  A=+2: inside, 1.1 * 2
        1.8,  # 0.9,  A=-2: inside, -(0.9 * -2)
        0.0,  # A=0: both terms 0
    ]
    assert_close(loss, [[v] for v in expected])
    assert clipped.dtype == torch.bool
    assert clipped.squeeze(1).tolist() == [True, False, False, True, False, True, False, False, False]


def test_clipped_surrogate_gradient_is_zero_on_clipped_tokens():
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1]
    advantages = t([1.0, -1.0, 1.0, -1.0, 2.0])
    logp = t([[LN(r)] for r in ratios]).requires_grad_()
    loss, _ = clipped_surrogate(logp, torch.zeros_like(logp), advantages, EPS_LOW, EPS_HIGH)
    loss.sum().backward()
    # unclipped: d(-ratio * A)/d logp = -ratio * A; clipped: constant -> 0
    assert_close(logp.grad.squeeze(1), [0.0, 1.5, -0.5, 0.0, -2.2])


def test_clipped_surrogate_per_token_advantages_broadcast():
    logp = t([[LN(1.5), 0.0], [LN(0.5), LN(1.1)]])
    old = torch.zeros_like(logp)
    per_row, clipped_row = clipped_surrogate(logp, old, t([1.0, -1.0]), EPS_LOW, EPS_HIGH)
    per_tok, clipped_tok = clipped_surrogate(logp, old, t([[1.0, 1.0], [-1.0, -1.0]]), EPS_LOW, EPS_HIGH)
    assert_close(per_row, per_tok)
    assert torch.equal(clipped_row, clipped_tok)
    # row 0: [-1.28 (clipped), -1]; row 1: [0.8 (clipped), 1.1]
    assert_close(per_row, [[-1.28, -1.0], [0.8, 1.1]])
    # genuinely per-token advantages: row 1 gets [+3, -0.5]: 0.5*3 = 1.5 (< 0.8*3); -(1.1 * -0.5) = 0.55
    per_tok, clipped_tok = clipped_surrogate(logp, old, t([[1.0, 1.0], [3.0, -0.5]]), EPS_LOW, EPS_HIGH)
    assert_close(per_tok, [[-1.28, -1.0], [-1.5, 0.55]])
    assert clipped_tok.tolist() == [[True, False], [False, False]]


def test_clipped_surrogate_uses_the_old_logp():
    # ratio = exp(log 0.6 - log 0.4) = 1.5, A = 1 -> clipped at 1.28
    loss, clipped = clipped_surrogate(t([[LN(0.6)]]), t([[LN(0.4)]]), t([1.0]), EPS_LOW, EPS_HIGH)
    assert_close(loss, [[-1.28]])
    assert clipped.item()


# --- k3_kl -------------------------------------------------------------------------------------------------------


def test_k3_kl_is_zero_when_policy_equals_reference():
    logp = t([[-0.1, -2.0, -5.0]])
    assert_close(k3_kl(logp, logp.clone()), [[0.0, 0.0, 0.0]])


def test_k3_kl_hand_values():
    # exp(r - p) - (r - p) - 1
    # p = log 0.5, r = log 0.25: r - p = -ln 2 -> 0.5 + ln 2 - 1 = 0.193147
    # p = log 0.25, r = log 0.5: r - p = ln 2 -> 2 - ln 2 - 1 = 0.306853
    # p = log 0.1, r = log 0.3: r - p = ln 3 -> 3 - ln 3 - 1 = 0.901388
    kl = k3_kl(t([[LN(0.5), LN(0.25), LN(0.1)]]), t([[LN(0.25), LN(0.5), LN(0.3)]]))
    assert_close(kl, [[0.5 + LN(2) - 1, 2 - LN(2) - 1, 3 - LN(3) - 1]])
    assert_close(kl, [[0.193147, 0.306853, 0.901388]], atol=1e-6)


def test_k3_kl_gradient():
    # d/dp [exp(r - p) - (r - p) - 1] = 1 - exp(r - p); with r - p = ln 2: 1 - 2 = -1
    logp = t([[LN(0.25)]]).requires_grad_()
    k3_kl(logp, t([[LN(0.5)]])).sum().backward()
    assert_close(logp.grad, [[-1.0]])


# --- aggregate ---------------------------------------------------------------------------------------------------

PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
MASK = [[1, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize("mode, expected", [
    ("token_mean", 7 / 3),  # (1 + 2 + 4) / 3 counted tokens
    ("seq_mean_token_mean", 2.75),  # mean(mean(1, 2), mean(4)) = (1.5 + 4) / 2
    ("seq_mean_token_sum_norm", 0.875),  # (1 + 2 + 4) / (2 sequences * max_tokens 4)
])
def test_aggregations(mode, expected):
    assert_close(aggregate(t(PER_TOKEN), t(MASK), mode, max_tokens=4), expected)
    assert_close(aggregate(t(PER_TOKEN), t(MASK), LossAggregation(mode), max_tokens=4), expected)
    # a bool or int mask works the same
    assert_close(aggregate(t(PER_TOKEN), torch.tensor(MASK).bool(), mode, max_tokens=4), expected)
    assert_close(aggregate(t(PER_TOKEN), torch.tensor(MASK), mode, max_tokens=4), expected)


@pytest.mark.parametrize("mode, expected", [
    ("token_mean", 2.0),  # (1 + 2 + 3) / 3
    ("seq_mean_token_mean", 1.0),  # (mean(1, 2, 3) + 0 for the empty row) / 2
    ("seq_mean_token_sum_norm", 0.75),  # 6 / (2 * 4)
])
def test_aggregations_with_a_fully_masked_row(mode, expected):
    assert_close(aggregate(t(PER_TOKEN), t([[1, 1, 1], [0, 0, 0]]), mode, max_tokens=4), expected)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_aggregation_of_an_all_masked_batch_is_zero_not_nan(mode):
    assert aggregate(t(PER_TOKEN), torch.zeros(2, 3), mode, max_tokens=4).item() == 0.0


@pytest.mark.parametrize("mode, expected", [
    ("token_mean", 7 / 10),  # num_tokens=10 replaces the 3 counted tokens
    ("seq_mean_token_mean", 5.5 / 5),  # num_sequences=5 replaces 2
    ("seq_mean_token_sum_norm", 7 / (5 * 4)),
])
def test_aggregations_with_whole_batch_counts(mode, expected):
    assert_close(aggregate(t(PER_TOKEN), t(MASK), mode, max_tokens=4, num_sequences=5, num_tokens=10), expected)


def test_unknown_aggregation_is_rejected():
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(t(PER_TOKEN), t(MASK), "sum", max_tokens=4)


# --- micro-batches -----------------------------------------------------------------------------------------------

# 4 completions of up to 4 tokens, of lengths 4, 1, 3, 2 (10 tokens); the splits after row 1, 2, 3 give micro-batches
# of 4 + 6, 5 + 5 and 8 + 2 tokens. Ratios fall on both sides of the clip range.
LOGP = [[-0.3, -1.2, -0.7, -2.0], [-0.1, -0.9, -0.4, -0.2], [-1.5, -0.6, -0.8, -1.1], [-0.5, -0.25, -3.0, -0.9]]
OLD = [[-0.5, -1.0, -0.7, -1.6], [-0.4, -0.9, -0.1, -0.6], [-1.0, -0.9, -0.8, -1.3], [-0.5, -0.6, -2.0, -0.9]]
REF = [[-0.4, -1.1, -0.9, -1.8], [-0.2, -1.0, -0.3, -0.1], [-1.2, -0.7, -0.5, -1.0], [-0.6, -0.3, -2.5, -1.0]]
ADV = [1.0, -0.5, 2.0, -1.5]
MB_MASK = [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("split", [2, 1, 3])
def test_micro_batch_losses_sum_to_the_whole_batch_loss(mode, split):
    mask = t(MB_MASK)
    whole_logp = t(LOGP).requires_grad_()
    kwargs = dict(epsilon_low=0.2, epsilon_high=0.28, aggregation=mode, max_tokens=4, beta=0.04)
    out = policy_loss(whole_logp, t(OLD), t(ADV), mask, ref_logp=t(REF), **kwargs)
    assert 0 < out.clip_fraction < 1  # some tokens clipped, some not
    whole = out.loss
    whole.backward()

    micro_logp = t(LOGP).requires_grad_()
    micro_total = torch.zeros((), dtype=F64)
    for rows in (slice(0, split), slice(split, 4)):
        micro = policy_loss(micro_logp[rows], t(OLD)[rows], t(ADV)[rows], mask[rows], ref_logp=t(REF)[rows],
                            num_sequences=4, num_tokens=mask.sum(), **kwargs).loss
        micro.backward()  # gradients accumulate on micro_logp as in gradient accumulation
        micro_total = micro_total + micro.detach()

    assert_close(micro_total, whole.detach())
    assert_close(micro_logp.grad, whole_logp.grad)
    assert whole_logp.grad.abs().sum() > 0


def test_micro_batches_without_whole_batch_counts_do_not_sum_to_the_whole_loss():
    # The reason num_sequences / num_tokens exist: token_mean over micro-batches of 2 and 4 tokens, each normalised
    # by its own count, gives sum_a / 2 + sum_b / 4 instead of (sum_a + sum_b) / 6.
    per_token = t([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1]])  # whole = (1 + 1) / 6 = 1/3
    whole = aggregate(per_token, mask, "token_mean", max_tokens=4)
    assert_close(whole, 1 / 3)
    halves = sum(aggregate(per_token[r:r + 1], mask[r:r + 1], "token_mean", max_tokens=4) for r in range(2))
    assert_close(halves, 1.0)  # 2/2 + 0/4
    with_counts = sum(aggregate(per_token[r:r + 1], mask[r:r + 1], "token_mean", max_tokens=4, num_tokens=6)
                      for r in range(2))
    assert_close(with_counts, 1 / 3)


# --- policy_loss -------------------------------------------------------------------------------------------------


def test_policy_loss_adds_beta_times_k3():
    logp = t([[LN(0.25), LN(0.25)], [-1.0, -2.0]]).requires_grad_()
    ref = t([[LN(0.5), LN(0.5)], [-1.0, -2.0]])  # row 0: r - p = ln 2 -> k3 = 1 - ln 2 = 0.306853; row 1: 0
    advantages = t([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=F64)
    out = policy_loss(logp, logp.detach(), advantages, mask, epsilon_low=0.2, epsilon_high=0.2,
                      aggregation="token_mean", max_tokens=2, beta=0.04, ref_logp=ref)
    k3 = 1 - LN(2)
    # ratio 1 -> surrogate -A per token: [-1, -1, 1, 1], sum 0; KL sum 2 * k3 -> loss = 0.04 * 2 * k3 / 4
    assert_close(out.loss, 0.04 * 2 * k3 / 4)
    assert_close(out.kl, 2 * k3 / 4)  # mean k3 over the 4 counted tokens = 0.153426
    assert_close(out.clip_fraction, 0.0)
    out.loss.backward()
    # d/dp per token: -A * ratio (= -A) + beta * (1 - exp(r - p)) (= 1 - 2 = -1 on row 0, 0 on row 1); / 4 tokens
    assert_close(logp.grad, [[(-1 - 0.04) / 4, (-1 - 0.04) / 4], [1 / 4, 1 / 4]])


def test_policy_loss_beta_zero_ignores_the_reference():
    logp, old = t([[-1.0, -0.5]]), t([[-1.2, -0.5]])
    kwargs = dict(epsilon_low=0.2, epsilon_high=0.2, aggregation="token_mean", max_tokens=2)
    plain = policy_loss(logp, old, t([1.0]), torch.ones(1, 2), **kwargs)
    with_ref = policy_loss(logp, old, t([1.0]), torch.ones(1, 2), ref_logp=t([[-3.0, -3.0]]), **kwargs)
    assert_close(plain.loss, with_ref.loss)
    # ratios e^0.2 = 1.2214 (> 1.2, A > 0 -> clipped to 1.2) and 1 -> -(1.2 + 1) / 2 = -1.1
    assert_close(plain.loss, -1.1)
    assert plain.kl.item() == 0.0 and with_ref.kl.item() == 0.0
    assert_close(plain.clip_fraction, 0.5)


def test_policy_loss_needs_the_reference_when_beta_is_not_zero():
    logp = t([[-1.0]])
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, t([1.0]), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.2,
                    aggregation="token_mean", max_tokens=1, beta=0.04)


def test_policy_loss_clip_fraction_counts_masked_tokens_only():
    # logp - old: ratios [[1.5, 1.5, 1], [0.5, 1, 0.5]], A = [+1, -1], clip range [0.8, 1.28]
    logp = t([[LN(1.5), LN(1.5), 0.0], [LN(0.5), 0.0, LN(0.5)]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    out = policy_loss(logp, torch.zeros_like(logp), t([1.0, -1.0]), mask, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                      aggregation="seq_mean_token_mean", max_tokens=3)
    # clipped: row 0 tokens 0, 1 (1.5 > 1.28, A > 0); row 1 token 0 (0.5 < 0.8, A < 0); row 1 token 2 would be
    # clipped too but is masked -> 3 of 5 counted tokens
    assert_close(out.clip_fraction, 3 / 5)
    # per token: row 0 [-1.28, -1.28, -1]; row 1 [0.8, 1, (0.8 masked)]
    # seq means: (-3.56) / 3 and 1.8 / 2 -> (-1.186667 + 0.9) / 2
    assert_close(out.loss, (-3.56 / 3 + 0.9) / 2)
    assert out.kl.item() == 0.0


def test_policy_loss_kl_is_the_mean_over_counted_tokens():
    logp = t([[LN(0.25), LN(0.1)], [LN(0.5), LN(0.5)]])
    ref = t([[LN(0.5), LN(0.3)], [LN(0.25), LN(0.9)]])
    mask = t([[1, 1], [1, 0]])
    out = policy_loss(logp, logp, t([0.0, 0.0]), mask, epsilon_low=0.2, epsilon_high=0.2,
                      aggregation="seq_mean_token_sum_norm", max_tokens=5, beta=0.5, ref_logp=ref)
    k = [2 - LN(2) - 1, 3 - LN(3) - 1, 0.5 + LN(2) - 1]  # the three counted tokens (the masked one is left out)
    assert_close(out.kl, sum(k) / 3)
    # A = 0 -> only 0.5 * k3; sum / (2 sequences * 5 max tokens)
    assert_close(out.loss, 0.5 * sum(k) / 10)


def test_policy_loss_per_token_advantages():
    logp = t([[LN(1.1), 0.0, LN(1.5)], [LN(0.9), LN(0.5), 0.0]])
    old = torch.zeros_like(logp)
    mask = t([[1, 1, 1], [1, 1, 1]])
    kwargs = dict(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, aggregation="token_mean", max_tokens=3)
    per_row = policy_loss(logp, old, t([2.0, -1.0]), mask, **kwargs)
    expanded = policy_loss(logp, old, t([[2.0] * 3, [-1.0] * 3]), mask, **kwargs)
    assert_close(per_row.loss, expanded.loss)
    assert_close(per_row.clip_fraction, expanded.clip_fraction)
    # per-token: row 0 A [1, -1, 1]: -1.1, 1, -1.28 (clipped); row 1 A [2, -2, 0]: -1.8, 1.6 (clipped), 0
    per_token = policy_loss(logp, old, t([[1.0, -1.0, 1.0], [2.0, -2.0, 0.0]]), mask, **kwargs)
    assert_close(per_token.loss, (-1.1 + 1 - 1.28 - 1.8 + 1.6 + 0) / 6)
    assert_close(per_token.clip_fraction, 2 / 6)


def test_policy_loss_metrics_carry_no_gradient():
    logp = t([[-1.0, -0.5]]).requires_grad_()
    out = policy_loss(logp, t([[-1.5, -0.5]]), t([1.0]), torch.ones(1, 2), epsilon_low=0.2, epsilon_high=0.2,
                      aggregation="token_mean", max_tokens=2, beta=0.1, ref_logp=t([[-1.0, -1.0]]))
    assert out.loss.requires_grad
    assert not out.kl.requires_grad and not out.clip_fraction.requires_grad
    assert out.loss.dim() == out.kl.dim() == out.clip_fraction.dim() == 0


# ---- GSPO: one importance ratio per sequence ------------------------------------------------------


def test_sequence_ratio_is_the_geometric_mean_of_the_counted_token_ratios():
    logp = torch.tensor([[0.2, 0.0, 5.0], [0.1, 0.1, 0.1]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # row 0's third token is padding: not counted
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]), 0.2, 0.2, mask, "sequence")
    # row 0: exp((0.2 + 0.0) / 2) = exp(0.1) on every token; row 1: exp(0.1) too, advantage -1
    torch.testing.assert_close(loss, torch.tensor([[-math.exp(0.1)] * 3, [math.exp(0.1)] * 3]))
    assert not clipped.any()


def test_sequence_ratio_is_clipped_as_one():
    logp, old, mask = torch.tensor([[0.2, 0.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.05, 0.05, mask, "sequence")
    torch.testing.assert_close(loss, torch.tensor([[-1.05, -1.05]]))
    assert clipped.all()


def test_sequence_level_gradient_spreads_the_sequence_ratio_over_its_tokens():
    # loss = -(s * A) per sequence with s = exp(mean_t logp_t - old_t): d loss / d logp_t = -A * s / |y|
    logp = torch.tensor([[0.3, -0.1, 0.4, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    result = policy_loss(logp, torch.zeros(1, 4), torch.tensor([2.0]), mask, epsilon_low=0.5, epsilon_high=0.5,
                         aggregation="seq_mean_token_mean", max_tokens=4, importance_level="sequence")
    result.loss.backward()
    s = math.exp(0.6 / 3)
    torch.testing.assert_close(result.loss, torch.tensor(-2.0 * s))
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0 * s / 3] * 3 + [0.0]]))


def test_sequence_level_needs_the_mask():
    with pytest.raises(ValueError, match="need the token mask"):
        clipped_surrogate(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), 0.2, 0.2, level="sequence")


def test_sampler_importance_weights_are_truncated_ratios_without_gradient():
    behaviour = t([[LN(0.5), LN(0.9), LN(0.2)]]).requires_grad_()
    sampler = t([[LN(0.25), LN(0.9), LN(0.01)]])
    weights = sampler_is_weights(behaviour, sampler, cap=3.0)
    assert_close(weights, [[2.0, 1.0, 3.0]])  # 0.2 / 0.01 = 20 truncated to 3
    assert not weights.requires_grad


def test_policy_loss_weights_each_tokens_surrogate_not_the_kl():
    logp = t([[-1.0, -2.0]]).requires_grad_()
    ref = t([[-1.0, -2.0]])
    kwargs = dict(epsilon_low=0.2, epsilon_high=0.2, aggregation="token_mean", max_tokens=2)
    out = policy_loss(logp, logp.detach(), t([1.0]), torch.ones(1, 2, dtype=F64), beta=0.1, ref_logp=ref,
                      sampler_weights=t([[2.0, 0.5]]), **kwargs)
    assert_close(out.loss, -(2.0 + 0.5) / 2)  # ratio 1, A = 1: surrogate -1 per token, weighted; KL 0
    out.loss.backward()
    assert_close(logp.grad, [[-2.0 / 2, -0.5 / 2]])
