"""GRPO stage behaviour with a scripted engine: dynamic sampling, failure handling, masks, LoRA."""

from __future__ import annotations

import errno
import math

import pytest
import torch

from vlreason.config import ConfigError, load_config
from vlreason.data.synth import synthesize
from vlreason.models import prefix
from vlreason.models.prefix import full_hidden
from vlreason.rl import PolicyLoss
from vlreason.rollout.scripted import ScriptedEngine
from vlreason.training import TrainingStopped
from vlreason.training import grpo as grpo_module
from vlreason.training.grpo import GRPOTrainer
from vlreason.training.metrics import read_metrics

GOOD = "<think>found it</think><answer>[0, 0, 56, 56]</answer>"
BAD = "no answer"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize("grounding", tmp_path_factory.mktemp("data"), n=8, seed=2, image_size=56, progress=False)


def trainer(tmp_path, data, completions=None, **sections) -> GRPOTrainer:
    stage = {"kind": "grpo", "optim": {"learning_rate": 1e-2, "batch_size": 2, "max_steps": 3},
             "rollout": {"num_generations": 2, "max_new_tokens": 40}, "rewards": {"format": {}},
             "logging": {"tensorboard": False, "progress": False}, "save": {"every": 0}}
    for key, value in sections.items():
        stage[key] = {**stage.get(key, {}), **value}
    raw = {"output_dir": str(tmp_path), "data": {"train": str(data)}, "stages": [stage]}
    grpo = GRPOTrainer(load_config(None, raw=raw).stages[0])
    if completions is not None:
        grpo.sampler.loop.engine = ScriptedEngine(grpo.vlm, completions)
    return grpo


def trainable(grpo: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in grpo.model.named_parameters() if p.requires_grad}


def test_dynamic_sampling_gives_up_with_the_reason(tmp_path, data):
    grpo = trainer(tmp_path, data, [GOOD], algorithm={"dynamic_sampling": True, "max_refill_tries": 2})
    with pytest.raises(TrainingStopped, match="dynamic sampling dropped all 6 groups of 3 prompt batch"):
        grpo.step()


def test_dynamic_sampling_keeps_groups_with_signal_and_refills(tmp_path, data):
    # draw 1 (2 prompts): (GOOD, GOOD) flat, (GOOD, BAD) kept; draw 2 (the 1 missing prompt):
    # (GOOD, GOOD) flat; draw 3: (GOOD, BAD) kept
    grpo = trainer(tmp_path, data, [GOOD, GOOD, GOOD, BAD], algorithm={"dynamic_sampling": True})
    values = grpo.step()
    assert values["groups/kept"] == 2.0 and values["groups/draws"] == 3.0 and values["groups/sampled"] == 4.0
    part_rewards = torch.cat([part.rewards for part in grpo.sampler.sample(
        grpo.stream, 2, 0, dynamic=True, max_refills=4).parts])
    assert sorted(part_rewards.tolist()) == [0.0, 0.0, 1.0, 1.0]


def test_no_dynamic_sampling_trains_on_flat_groups_without_moving(tmp_path, data):
    grpo = trainer(tmp_path, data, [GOOD])
    before = trainable(grpo)
    values = grpo.step()
    assert values["advantages/abs_max"] == 0.0 and values["groups/kept"] == 2.0
    assert all(torch.equal(before[n], p) for n, p in trainable(grpo).items())  # zero advantage, beta 0


def test_rewards_move_the_policy_towards_the_better_completion(tmp_path, data):
    grpo = trainer(tmp_path, data, [GOOD, BAD])
    assert grpo.step()["advantages/abs_max"] > 0.5
    assert any(not torch.equal(a, b) for a, b in zip(trainable(grpo).values(), trainable(
        trainer(tmp_path / "fresh", data)).values(), strict=True))


def test_non_finite_losses_skip_updates_then_stop_with_a_checkpoint(tmp_path, data, monkeypatch):
    def nan_loss(logp, *args, **kwargs):
        nan = logp.sum() * float("nan")
        return PolicyLoss(loss=nan, clip_fraction=torch.tensor(0.0), kl=torch.tensor(0.0))

    monkeypatch.setattr(grpo_module, "policy_loss", nan_loss)
    grpo = trainer(tmp_path, data, [GOOD, BAD], optim={"max_bad_steps": 2, "max_steps": 5})
    before = trainable(grpo)
    values = grpo.step()
    grpo.step_count += 1
    assert values["skipped_updates"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in trainable(grpo).items())
    with pytest.raises(TrainingStopped, match="2 updates in a row had a non-finite loss"):
        grpo.step()
    assert (tmp_path / "grpo" / "checkpoint-1" / "trainer_state.pt").is_file()


def test_mask_truncated_leaves_cut_off_completions_out_of_the_loss(tmp_path, data):
    long = "<think>" + "a " * 100 + "</think><answer>[0, 0, 5, 5]</answer>"
    grpo = trainer(tmp_path, data, [long, BAD], algorithm={"mask_truncated": True}, rollout={"max_new_tokens": 8})
    batch = grpo.sampler.sample(grpo.stream, 2, 0, dynamic=False, max_refills=0)
    part = batch.parts[0]
    assert part.trajectories.truncated.tolist() == [True, False, True, False]
    mask = grpo._loss_mask(grpo._micro_batches(batch)[0])
    assert mask[0].sum() == 0 and mask[2].sum() == 0 and mask[1].sum() == part.trajectories.loss_mask[1].sum()


def test_lora_reference_is_the_base_model_without_a_copy(tmp_path, data):
    grpo = trainer(tmp_path, data, [GOOD, BAD], model={"lora": {"enabled": True, "r": 4, "alpha": 8}},
                   algorithm={"beta": 0.04})
    assert grpo.reference is None
    base = {n: p.detach().clone() for n, p in grpo.model.named_parameters() if "lora_" not in n}
    assert all("lora_" in n for n in trainable(grpo))
    first = grpo.step()
    grpo.step_count += 1
    second = grpo.step()
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # adapters start at zero: policy == reference
    assert second["kl"] > 0.0
    assert all(torch.equal(base[n], p) for n, p in grpo.model.named_parameters() if "lora_" not in n)


def test_several_updates_per_batch_use_stored_old_logprobs(tmp_path, data):
    grpo = trainer(tmp_path, data, [GOOD, BAD], algorithm={"num_iterations": 3, "epsilon_low": 0.01,
                                                          "epsilon_high": 0.01})
    values = grpo.step()
    assert values["clip_fraction"] > 0.0  # later updates see ratios away from 1, and lr 1e-2 moves far


def test_several_updates_per_step_keep_the_schedule_of_max_steps(tmp_path, data):
    """mu = 2 once stepped the scheduler twice per step: a linear schedule hit 0 at half the run."""
    grpo = trainer(tmp_path, data, [GOOD, BAD], algorithm={"num_iterations": 2},
                   optim={"learning_rate": 1e-3, "scheduler": "linear", "max_steps": 6})
    rates = []
    for _ in range(6):
        rates.append(grpo.step()["learning_rate"])
        grpo.step_count += 1
    assert rates == pytest.approx([1e-3 * (6 - k) / 6 for k in range(6)])


def test_warmup_counts_steps_not_updates(tmp_path, data):
    grpo = trainer(tmp_path, data, [GOOD, BAD], algorithm={"num_iterations": 3},
                   optim={"learning_rate": 1e-3, "scheduler": "linear", "warmup_steps": 2, "max_steps": 4})
    rates = []
    for _ in range(4):
        rates.append(grpo.step()["learning_rate"])  # the rate this step's updates used
        grpo.step_count += 1
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


def test_prompts_whose_images_fail_are_replaced_and_counted(tmp_path, data):
    grpo = trainer(tmp_path, data, [GOOD, BAD])
    order = [grpo.stream.samples[i] for i in grpo.stream._order]
    for sample in order[:2]:  # the whole first batch of the epoch breaks after the data was checked
        sample.images = [str(tmp_path / "gone.png")]
    values = grpo.step()
    assert values["data/skipped_samples"] == 2.0 and values["groups/kept"] == 2.0
    kept = {s.id for s in grpo.sampler.sample(grpo.stream, 2, 0, dynamic=False, max_refills=0).parts[0].samples}
    assert not kept & {s.id for s in order[:2]}


def test_a_data_set_whose_images_all_fail_stops_with_the_reason(tmp_path, data):
    grpo = trainer(tmp_path, data, [GOOD, BAD])
    for sample in grpo.stream.samples:
        sample.images = [str(tmp_path / "gone.png")]
    with pytest.raises(TrainingStopped, match="as many as the data holds"):
        grpo.step()


def test_a_full_disk_while_checkpointing_leaves_no_partial_checkpoint(tmp_path, data, monkeypatch):
    grpo = trainer(tmp_path, data, [GOOD, BAD])
    grpo.step()
    grpo.step_count += 1

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(grpo_module.torch, "save", no_space)
    with pytest.raises(TrainingStopped, match=r"the disk is full: writing .*checkpoint-1\.tmp failed .*--resume"):
        grpo.save_checkpoint()
    assert not list((tmp_path / "grpo").glob("checkpoint-*"))


def test_a_step_is_logged_before_its_checkpoint_so_a_kill_between_loses_no_line(tmp_path, data, monkeypatch):
    grpo = trainer(tmp_path, data, [GOOD, BAD], save={"every": 1})

    def killed(*args):
        raise KeyboardInterrupt  # stands for a kill while the checkpoint is written

    monkeypatch.setattr(grpo, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        grpo.train()
    assert [r["step"] for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl")] == [1]
    assert not list((tmp_path / "grpo").glob("checkpoint-*"))  # a resume runs step 1 again and rewrites its line


def test_the_reward_timeout_reaches_the_scorer(tmp_path, data):
    assert trainer(tmp_path, data, algorithm={"reward_timeout_s": 7.5}).sampler.scorer.timeout_s == 7.5


@pytest.mark.parametrize("micro", [1, 2, 4])  # a share of a group, one group, two groups then one
def test_micro_batches_give_the_unbatched_update(tmp_path, data, micro):
    sections = {"algorithm": {"beta": 0.04, "num_iterations": 2}}
    texts = [GOOD, BAD, BAD, GOOD]
    whole = trainer(tmp_path / "whole", data, texts, optim={"batch_size": 3}, **sections)
    split = trainer(tmp_path / "split", data, texts, optim={"batch_size": 3, "micro_batch_size": micro}, **sections)
    counts, micro_batches = [], split._micro_batches
    split._micro_batches = lambda batch: counts.append(len(found := micro_batches(batch))) or found
    a, b = whole.step(), split.step()
    assert counts == [-(-6 // micro)] and a["advantages/abs_max"] > 0.5
    for key in ("loss", "kl", "entropy", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    grads = {n: p.grad for n, p in whole.model.named_parameters() if p.requires_grad}  # the last update's
    for name, p in split.model.named_parameters():
        if p.requires_grad:
            # (on a GPU, kernels differ with the batch shape by ~1e-6)
            torch.testing.assert_close(p.grad, grads[name], atol=5e-6, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    # (the weights agree only up to Adam's amplification of float noise: it divides by the gradient's size)


def test_a_micro_batch_must_hold_whole_groups_or_a_share_of_one(tmp_path, data):
    with pytest.raises(ConfigError, match="micro_batch_size: 3 completions must be a multiple or a divisor"):
        trainer(tmp_path, data, optim={"micro_batch_size": 3}, rollout={"num_generations": 2})


def test_overlong_shaping_ranks_the_longer_of_two_equally_rewarded_completions_lower(tmp_path, data):
    padded = "<think>" + "so " * 12 + "found it</think><answer>[0, 0, 56, 56]</answer>"  # same format reward
    grpo = trainer(tmp_path, data, [GOOD, padded], rollout={"max_new_tokens": 40},
                   algorithm={"overlong_buffer": 30, "importance_level": "sequence"})
    batch = grpo.sampler.sample(grpo.stream, 2, 0, dynamic=False, max_refills=0)
    part = batch.parts[0]
    lengths = part.trajectories.lengths
    assert lengths[1] > lengths[0] > 10 and part.table.values[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert part.advantages[0] > 0 > part.advantages[1]
    values = grpo.step()
    assert values["reward/overlong_penalty"] < 0 and math.isfinite(values["loss"])


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, data, monkeypatch):
    texts = [GOOD, BAD, BAD, GOOD]
    plain = trainer(tmp_path / "plain", data, texts, algorithm={"beta": 0.04})
    a = plain.step()
    checkpointed = trainer(tmp_path / "ckpt", data, texts, algorithm={"beta": 0.04},
                           optim={"gradient_checkpointing": True})
    plain_forwards = []
    monkeypatch.setattr(prefix, "full_hidden", lambda *args: plain_forwards.append(1) or full_hidden(*args))
    b = checkpointed.step()
    assert len(plain_forwards) == 1 and a["advantages/abs_max"] > 0.5  # the gradient pass only
    for key in ("loss", "kl", "entropy", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    grads = {n: p.grad for n, p in plain.model.named_parameters() if p.requires_grad}
    for name, p in checkpointed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], atol=5e-6, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_each_step_logs_the_sampler_mismatch_and_can_correct_it(tmp_path, data):
    """The HF engine samples from the trained model itself, with the vision tokens ruled out: the
    mismatch is that mass, small; the truncated importance weights are the ratio, about 1."""
    values = trainer(tmp_path, data, algorithm={"sampler_is_cap": 2.0}).step()
    assert 0.0 < values["sampler/logprob_diff_mean"] <= values["sampler/logprob_diff_max"] < 0.05
    assert 0.95 < values["sampler/is_weight_mean"] <= 1.0
    assert "time/weight_sync" not in values  # the HF engine pushes nothing


def test_a_correction_needs_an_engine_with_logprobs(tmp_path, data):
    grpo = trainer(tmp_path, data, ["<answer>[1, 2, 3, 4]</answer>", "no"], algorithm={"sampler_is_cap": 2.0})
    with pytest.raises(ValueError, match="sampler_is_cap needs the engine's sampling log-probs"):
        grpo.step()
    values = trainer(tmp_path / "plain", data, ["<answer>[1, 2, 3, 4]</answer>", "no"]).step()
    assert "sampler/logprob_diff_mean" not in values
