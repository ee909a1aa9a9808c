"""Our GRPO loss equals TRL's: the real ``GRPOTrainer._compute_loss`` (TRL 1.16) is called unbound on a stub ``self``.

The only part of TRL's method replaced is the model forward (``_get_per_token_logps_and_entropies``), which returns
log-probs we choose (a leaf tensor with ``requires_grad``), so the loss and its gradient w.r.t. the log-probs can be
compared with ``vlreason.rl.policy_loss`` on the very same numbers. Everything after the forward (ratio, clipping,
KL, aggregation, metric logging) is TRL's own code.

Mapping: ``grpo`` = seq_mean_token_mean, ``dr_grpo`` = seq_mean_token_sum_norm (max_tokens = max_completion_length),
``dapo`` / ``bnpo`` = token_mean.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vlreason.rl.advantages import combine_rewards, group_advantages
from vlreason.rl.losses import policy_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL (a dev dependency) is needed for parity")
GRPOTrainer = trl_grpo.GRPOTrainer
trl_nanstd = pytest.importorskip("trl.trainer.utils").nanstd

AGGREGATION = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm", "dapo": "token_mean",
               "bnpo": "token_mean"}
MAX_COMPLETION_LENGTH = 8
N, T = 6, 5
LENGTHS = [5, 3, 1, 4, 2, 5]


class _Accelerator:
    """One process: gather / reduce return their input."""

    num_processes = 1
    sync_gradients = True
    is_main_process = True

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def reduce(tensor, reduction="sum"):
        assert reduction == "sum"
        return tensor


class StubTrainer:
    """Every attribute ``GRPOTrainer._compute_loss`` reads, for loss types grpo/bnpo/dr_grpo/dapo."""

    def __init__(self, logp: torch.Tensor, *, loss_type: str, beta: float, epsilon_low: float, epsilon_high: float,
                 gradient_accumulation_steps: int = 1, steps_per_generation: int = 1):
        self._logp = logp
        self.loss_type = loss_type
        self.beta = beta
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.importance_sampling_level = "token"
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = False
        self.use_adaptive_entropy = False
        self.max_completion_length = MAX_COMPLETION_LENGTH
        self.current_gradient_accumulation_steps = gradient_accumulation_steps
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False,
                                    steps_per_generation=steps_per_generation)
        self.accelerator = _Accelerator()
        self.model = SimpleNamespace(training=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.forward_calls = []

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        # The model forward: hand back the chosen log-probs for the completion tokens.
        assert logits_to_keep == self._logp.shape[1]
        assert input_ids.shape == attention_mask.shape == (self._logp.shape[0], 2 + logits_to_keep)
        self.forward_calls.append(logits_to_keep)
        entropies = torch.full_like(self._logp, 0.5).detach()
        return self._logp, entropies, None

    def get_high_entropy_mask(self, *args, **kwargs):  # pragma: no cover - top_entropy_quantile = 1.0
        raise AssertionError("not reached with top_entropy_quantile = 1.0")


def make_batch(dtype=torch.float32):
    """Log-probs, old and reference log-probs, advantages and a right-padded completion mask (fixed seed)."""
    gen = torch.Generator().manual_seed(1234)
    logp = -torch.rand(N, T, generator=gen, dtype=torch.float64) * 2 - 0.05  # in (-2.05, -0.05]
    # old log-probs off by up to +-0.5 nats: ratios in [0.61, 1.65], both sides of the clip range
    old = logp + (torch.rand(N, T, generator=gen, dtype=torch.float64) - 0.5)
    ref = logp + (torch.rand(N, T, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 1.0, 0.0], dtype=torch.float64)
    advantages = group_advantages(rewards, group_size=3)  # both signs
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).to(torch.int64)
    return {name: value.to(dtype) if value.is_floating_point() else value
            for name, value in dict(logp=logp, old=old, ref=ref, advantages=advantages, mask=mask).items()}


def trl_inputs(batch, *, with_old: bool, with_ref: bool, num_items_in_batch=None, tool_mask=None, advantages=None):
    n = batch["mask"].shape[0]
    inputs = {
        "prompt_ids": torch.ones(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.full((n, T), 7, dtype=torch.long),
        "completion_mask": batch["mask"],
        "advantages": batch["advantages"] if advantages is None else advantages,
    }
    if with_old:
        inputs["old_per_token_logps"] = batch["old"]
    if with_ref:
        inputs["ref_per_token_logps"] = batch["ref"]
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = num_items_in_batch
    if tool_mask is not None:
        inputs["tool_mask"] = tool_mask
    return inputs


def run_trl(batch, *, loss_type, beta, epsilon_low, epsilon_high, with_old, **input_kwargs):
    """TRL's loss, the gradient w.r.t. the log-probs, and the stub (for its metrics)."""
    logp = batch["logp"].clone().requires_grad_()
    stub = StubTrainer(logp, loss_type=loss_type, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    if loss_type == "dapo":
        input_kwargs.setdefault("num_items_in_batch", batch["mask"].sum())
    inputs = trl_inputs(batch, with_old=with_old, with_ref=beta != 0.0, **input_kwargs)
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    assert stub.forward_calls == [T]
    return loss.detach(), logp.grad, stub


def run_ours(batch, *, loss_type, beta, epsilon_low, epsilon_high, with_old, mask=None, advantages=None, **counts):
    logp = batch["logp"].clone().requires_grad_()
    # Without old log-probs TRL uses per_token_logps.detach() (one optimizer step per generation: ratio 1)
    old = batch["old"] if with_old else logp.detach()
    out = policy_loss(logp, old, batch["advantages"] if advantages is None else advantages,
                      batch["mask"] if mask is None else mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                      aggregation=AGGREGATION[loss_type], max_tokens=MAX_COMPLETION_LENGTH, beta=beta,
                      ref_logp=batch["ref"] if beta != 0.0 else None, **counts)
    out.loss.backward()
    return out, logp.grad


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


CASES = [
    pytest.param(loss_type, beta, with_old, eps, id=f"{loss_type}-beta{beta}-{'old' if with_old else 'noold'}-{eps}")
    for loss_type in AGGREGATION
    for beta in (0.0, 0.04)
    for with_old in (True, False)
    for eps in ((0.2, 0.2), (0.2, 0.28))
]


@pytest.mark.parametrize("loss_type, beta, with_old, eps", CASES)
def test_loss_and_gradient_equal_trl(loss_type, beta, with_old, eps):
    batch = make_batch()
    kwargs = dict(loss_type=loss_type, beta=beta, epsilon_low=eps[0], epsilon_high=eps[1], with_old=with_old)
    trl_loss, trl_grad, stub = run_trl(batch, **kwargs)
    ours, our_grad = run_ours(batch, **kwargs)

    assert_same(ours.loss, trl_loss)
    assert_same(our_grad, trl_grad)
    assert trl_grad.abs().sum() > 0
    assert (trl_grad[batch["mask"] == 0] == 0).all()  # padding gets no gradient

    # TRL's logged metrics match ours: its "region" clip ratio is our clip_fraction, its "kl" our kl.
    metrics = stub._metrics["train"]
    assert metrics["clip_ratio/region_mean"] == [pytest.approx(ours.clip_fraction.item(), abs=1e-6)]
    if with_old:
        assert 0 < ours.clip_fraction < 1  # the comparison covers clipped and unclipped tokens
    else:
        assert ours.clip_fraction == 0  # ratio 1 everywhere
    if beta:
        assert metrics["kl"] == [pytest.approx(ours.kl.item(), abs=1e-6)]
        assert ours.kl > 0
    else:
        assert "kl" not in metrics


@pytest.mark.parametrize("loss_type", list(AGGREGATION))
def test_per_token_advantages_equal_trl(loss_type):
    # TRL accepts [B, T] advantages (for subclasses); so does policy_loss.
    batch = make_batch()
    gen = torch.Generator().manual_seed(7)
    advantages = (torch.rand(N, T, generator=gen) - 0.5) * 3
    kwargs = dict(loss_type=loss_type, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, with_old=True)
    trl_loss, trl_grad, _ = run_trl(batch, advantages=advantages, **kwargs)
    ours, our_grad = run_ours(batch, advantages=advantages, **kwargs)
    assert_same(ours.loss, trl_loss)
    assert_same(our_grad, trl_grad)


@pytest.mark.parametrize("loss_type", list(AGGREGATION))
def test_tool_mask_equals_our_mask(loss_type):
    # TRL multiplies completion_mask by tool_mask; our mask already excludes tool output.
    batch = make_batch()
    tool_mask = torch.ones(N, T, dtype=torch.int64)
    tool_mask[0, 1:3] = 0
    tool_mask[3, 2] = 0
    mask = batch["mask"] * tool_mask
    kwargs = dict(loss_type=loss_type, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, with_old=True)
    num_items = {"num_items_in_batch": mask.sum()} if loss_type == "dapo" else {}
    trl_loss, trl_grad, _ = run_trl(batch, tool_mask=tool_mask, **num_items, **kwargs)
    ours, our_grad = run_ours(batch, mask=mask, **kwargs)
    assert_same(ours.loss, trl_loss)
    assert_same(our_grad, trl_grad)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_equal_trl_gradient_accumulation(loss_type):
    # TRL with 2 gradient-accumulation steps over equal halves (steps_per_generation = 2, num_items_in_batch of the
    # whole generation batch, as TRL passes it) vs ours with the whole batch's num_sequences / num_tokens.
    batch = make_batch()
    kwargs = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28)
    half = N // 2
    trl_total, our_total = 0.0, 0.0
    trl_logp, our_logp = batch["logp"].clone().requires_grad_(), batch["logp"].clone().requires_grad_()
    for rows in (slice(0, half), slice(half, N)):
        micro = {k: v[rows] for k, v in batch.items()}
        stub = StubTrainer(trl_logp[rows], loss_type=loss_type, gradient_accumulation_steps=2,
                           steps_per_generation=2, **kwargs)
        inputs = trl_inputs(micro, with_old=True, with_ref=True, num_items_in_batch=batch["mask"].sum())
        trl_loss = GRPOTrainer._compute_loss(stub, None, inputs)
        trl_loss.backward()
        trl_total += trl_loss.item()
        ours = policy_loss(our_logp[rows], micro["old"], micro["advantages"], micro["mask"],
                           aggregation=AGGREGATION[loss_type], max_tokens=MAX_COMPLETION_LENGTH,
                           ref_logp=micro["ref"], num_sequences=N, num_tokens=batch["mask"].sum(), **kwargs).loss
        ours.backward()
        our_total += ours.item()
    assert our_total == pytest.approx(trl_total, abs=1e-6)
    assert_same(our_logp.grad, trl_logp.grad)
    # and both equal the loss of the whole batch at once
    whole, _ = run_ours(batch, loss_type=loss_type, with_old=True, **kwargs)
    assert our_total == pytest.approx(whole.loss.item(), abs=1e-6)


def test_bnpo_micro_batches_normalise_per_micro_batch():
    # TRL's bnpo divides each micro-batch by its own token count (and by the accumulation steps); that is our
    # token_mean *without* num_tokens, halved. (Our num_tokens gives the whole-batch token mean, TRL's dapo.)
    batch = make_batch()
    kwargs = dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.28)
    micro = {k: v[:3] for k, v in batch.items()}  # 5 + 3 + 1 = 9 of the 20 tokens
    logp = micro["logp"].clone().requires_grad_()
    stub = StubTrainer(logp, loss_type="bnpo", gradient_accumulation_steps=2, **kwargs)
    trl_loss = GRPOTrainer._compute_loss(stub, None, trl_inputs(micro, with_old=True, with_ref=False))
    ours, _ = run_ours(micro, loss_type="bnpo", with_old=True, **kwargs)
    assert trl_loss.item() == pytest.approx(ours.loss.item() / 2, abs=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl_formula(scale):
    # TRL computes advantages inside _generate_and_score_completions, which needs generation and reward models, so
    # it cannot be called here. This transcribes its "sum_then_normalize" lines (TRL 1.16, grpo_trainer.py ~2763-2797)
    # using TRL's own nanstd.
    rewards_per_func = torch.tensor([[1.0, float("nan")], [0.0, 0.5], [float("nan"), float("nan")],
                                     [0.3, 0.3], [1.0, 1.0], [0.0, float("nan")],
                                     [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    weights = torch.tensor([1.0, 0.5])
    g = 3
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    if scale == "batch":
        std = trl_nanstd(rewards).expand_as(rewards)
    else:
        std = trl_nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    expected = rewards - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    expected = torch.nan_to_num(expected, nan=0.0)

    ours = group_advantages(combine_rewards(rewards_per_func, weights), g, scale)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert not math.isnan(ours.sum().item())
