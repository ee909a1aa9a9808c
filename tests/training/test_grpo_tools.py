"""GRPO over multi-turn tool trajectories: the engine and the agent from the config, observation
images through micro-batches, and an update that moves the policy towards the rewarded trajectory."""

from __future__ import annotations

import pytest
import torch

from vlreason.config import load_config
from vlreason.data.zoom import DOT_COLOURS, synthesize_zoom
from vlreason.training.groups import SampledBatch
from vlreason.training.grpo import GRPOTrainer

ZOOM = '<tool_call>\n{"name": "crop", "arguments": {"bbox_2d": [100, 100, 600, 600]}}\n</tool_call>'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    direct, _ = synthesize_zoom(tmp_path_factory.mktemp("zoom"), n=4, seed=3, canvas=256, progress=False)
    return direct


def trainer(tmp_path, data, scripts, **sections) -> GRPOTrainer:
    stage = {"kind": "grpo", "optim": {"learning_rate": 1e-2, "batch_size": 2, "max_steps": 2},
             "rollout": {"num_generations": 2, "max_new_tokens": 96, "engine": "scripted",
                         "engine_options": {"completions": scripts}},
             "agent": {"mode": "tools", "tools": ["crop"], "max_turns": 3},
             "rewards": {"classification": {}, "tool_use": {"weight": 0.5}},
             "logging": {"tensorboard": False, "progress": False}, "save": {"every": 0}}
    for key, value in sections.items():
        stage[key] = {**stage.get(key, {}), **value}
    raw = {"output_dir": str(tmp_path), "model": {"name_or_path": "tiny-qwen3-vl"}, "data": {"train": str(data)},
           "stages": [stage]}
    return GRPOTrainer(load_config(None, raw=raw).stages[0])


def model_logprobs(grpo: GRPOTrainer, part) -> torch.Tensor:
    """``[N]`` summed log-probs of the model's tokens of each trajectory under the current policy."""
    micros = grpo._micro_batches(SampledBatch(parts=[part]))
    logp = torch.cat([grpo._logprobs(micro, grpo.scorer) for micro in micros])
    return (logp * part.trajectories.loss_mask).sum(dim=1)


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_grpo_on_tool_trajectories_moves_towards_the_rewarded_one(tmp_path, data, micro_batch_size):
    # every group of 4 zooms, then names each colour once: one is right (classification, and
    # tool_use's bonus), three are wrong
    scripts = [[f"<think>zoom</think>{ZOOM}", f"<answer>{colour}</answer>"] for colour in DOT_COLOURS]
    grpo = trainer(tmp_path, data, scripts, optim={"micro_batch_size": micro_batch_size},
                   rollout={"num_generations": 4})
    batch = grpo.sampler.sample(grpo.stream, 2, seed=0, dynamic=False, max_refills=0)
    part = batch.parts[0]
    trajectories = part.trajectories
    assert [len(t) for t in trajectories.turns] == [2] * 8
    assert all(p["image_grid_thw"].shape[0] == 1 for p in trajectories.pixels)  # each saw its crop
    assert sorted(part.rewards.tolist()) == [0.0] * 6 + [1.5] * 2
    before = model_logprobs(grpo, part)
    micros = grpo._micro_batches(batch)
    masks = [grpo._loss_mask(micro) for micro in micros]
    grpo.model.train()
    stats = grpo._update(micros, masks, None, None)
    assert not stats.skipped and stats.grad_norm > 0
    after = model_logprobs(grpo, part)
    moved = after - before
    best, worst = int(part.advantages.argmax()), int(part.advantages.argmin())
    assert part.advantages[best] > 0 > part.advantages[worst]
    assert moved[best] > moved[worst]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grpo_through_a_memory_window_moves_towards_the_rewarded_one(tmp_path, data, checkpointing):
    """Two zooms through a one-image window (the second takes the first out of view): the step
    logs the dropped images, and the update (the cached forward cut at the window's change, or the
    checkpointed one-pass forward with its 4-D mask) favours the rewarded trajectory."""
    scripts = [[ZOOM, ZOOM, f"<answer>{colour}</answer>"] for colour in DOT_COLOURS]
    grpo = trainer(tmp_path, data, scripts, rollout={"num_generations": 4}, agent={"memory_window": 1},
                   optim={"gradient_checkpointing": checkpointing, "micro_batch_size": 2})
    batch = grpo.sampler.sample(grpo.stream, 2, seed=0, dynamic=False, max_refills=0)
    part = batch.parts[0]
    assert part.trajectories.reward_columns()["images_dropped"] == [1] * 8
    before = model_logprobs(grpo, part)
    micros = grpo._micro_batches(batch)
    grpo.model.train()
    stats = grpo._update(micros, [grpo._loss_mask(micro) for micro in micros], None, None)
    assert not stats.skipped and stats.grad_norm > 0
    moved = model_logprobs(grpo, part) - before
    assert moved[int(part.advantages.argmax())] > moved[int(part.advantages.argmin())]
    assert grpo.step()["tools/images_dropped_per_sample"] == 1.0


def test_grpo_step_logs_the_tool_use(tmp_path, data):
    scripts = [[ZOOM, "<answer>red</answer>"], ['<tool_call>{"name": "paint"}</tool_call>', "<answer>x</answer>"]]
    values = trainer(tmp_path, data, scripts).step()
    assert values["tools/calls_per_sample"] == 1.0 and values["turns/mean"] == 2.0
    assert values["tools/crop/calls"] == 2.0 and values["tools/crop/errors"] == 0.0
    assert values["tools/unknown/calls"] == 2.0 and values["tools/unknown/errors"] == 2.0
    assert values["tools/invalid_rate"] == 0.5 and values["stops/end"] == 1.0


def test_rewards_receive_what_trl_passes(tmp_path, data):
    """A TRL-style reward reads ``prompts``, ``completion_ids`` (the model's tokens only) and
    ``trainer_state`` with the step, besides the tool trace."""
    seen = {}

    def trl_reward(completions, prompts, completion_ids, trainer_state, tool_calls, **kwargs):
        seen.update(step=trainer_state.global_step, max_steps=trainer_state.max_steps, prompts=prompts,
                    ids=completion_ids, calls=tool_calls)
        return [0.0] * len(completions)

    grpo = trainer(tmp_path, data, [[ZOOM, "<answer>red</answer>"]])
    grpo.sampler.scorer.rewards = {"trl": trl_reward}
    grpo.step_count = 1
    batch = grpo.sampler.sample(grpo.stream, 2, seed=0, dynamic=False, max_refills=0)
    grpo.step()
    assert seen["step"] == 1 and seen["max_steps"] == 2
    assert seen["prompts"][0][0]["role"] == "user" and len(seen["ids"]) == 4
    trajectories = batch.parts[0].trajectories
    assert seen["ids"][0] == trajectories.ids[0][trajectories.loss_mask[0].bool()].tolist()
    assert seen["calls"][0][0]["name"] == "crop"


def test_the_engine_gets_the_weights_after_every_applied_update(tmp_path, data):
    grpo = trainer(tmp_path, data, [[ZOOM, "<answer>red</answer>"], [ZOOM, "<answer>blue</answer>"]],
                   algorithm={"num_iterations": 2})
    pushed = []
    grpo.engine.update_weights = lambda model: pushed.append(model)
    grpo.step()
    assert pushed == [grpo.model, grpo.model]  # mu = 2 updates, each applied


def test_a_step_of_cut_off_turns_is_reported(tmp_path, data, caplog):
    grpo = trainer(tmp_path, data, [[ZOOM, "<answer>red</answer>"]], rollout={"max_new_tokens": 20})
    with caplog.at_level("WARNING", logger="vlreason.training.grpo"):
        grpo.train()
    warnings = [r.getMessage() for r in caplog.records if "ran out of tokens" in r.getMessage()]
    assert len(warnings) == 1 and "rollout.max_new_tokens=20 per turn" in warnings[0]  # said once, not per step
