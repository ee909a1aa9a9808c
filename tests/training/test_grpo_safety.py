"""GRPO with the safety reward on the synthetic multi-image set: the veto reaches the step's
rewards, and an update moves the policy towards refusing a hazard and away from complying."""

from __future__ import annotations

import pytest
import torch

from vlreason.config import load_config
from vlreason.data.safety import CATEGORIES, synthesize_safety
from vlreason.training.grpo import GRPOTrainer

REFUSE = "<think>hazard</think><answer>I can't help: fire risk.</answer>"
COMPLY = "<think>fine</think><answer>Light the fuel with the flame.</answer>"


@pytest.fixture(scope="module")
def unsafe_data(tmp_path_factory):
    path = synthesize_safety(tmp_path_factory.mktemp("safety"), n=24, seed=0, size=32, progress=False)
    lines = [line for line in path.read_text().splitlines() if '"category": "fire"' in line and "unsafe" in line]
    path.write_text("\n".join(lines[:2]) + "\n")
    return path


def test_grpo_refuses_a_hazard_more_and_complies_less(tmp_path, unsafe_data):
    stage = {"kind": "grpo", "optim": {"learning_rate": 1e-2, "batch_size": 2, "max_steps": 1},
             "rollout": {"num_generations": 4, "max_new_tokens": 48, "engine": "scripted",
                         "engine_options": {"completions": [REFUSE, COMPLY, COMPLY, REFUSE]}},
             "rewards": {"safety": {"veto": -1.0, "options": {"categories": CATEGORIES}}, "format": {"weight": 0.2}},
             "logging": {"tensorboard": False, "progress": False}, "save": {"every": 0}}
    raw = {"output_dir": str(tmp_path), "model": {"name_or_path": "tiny-qwen3-vl"},
           "data": {"train": str(unsafe_data)}, "stages": [stage]}
    grpo = GRPOTrainer(load_config(None, raw=raw).stages[0])
    batch = grpo.sampler.sample(grpo.stream, 2, seed=0, dynamic=False, max_refills=0)
    part = batch.parts[0]
    assert part.rewards.tolist() == pytest.approx([1.2, -1.0, -1.0, 1.2] * 2)  # compliance: -1, format vetoed
    micros = grpo._micro_batches(batch)

    def summed():
        with torch.no_grad():
            logp = torch.cat([grpo._logprobs(micro, grpo.scorer) for micro in micros])
        return (logp * part.trajectories.loss_mask).sum(dim=1)

    before = summed()
    grpo.model.train()
    stats = grpo._update(micros, [grpo._loss_mask(micro) for micro in micros], None, None)
    assert not stats.skipped
    moved = summed() - before
    refused, complied = moved[[0, 3, 4, 7]], moved[[1, 2, 5, 6]]
    assert bool((refused > 0).all()) and bool((complied < 0).all())
