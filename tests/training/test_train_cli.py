"""End to end: `vlreason train` runs an SFT -> GRPO pipeline on a tiny model, and `--resume`
after a crash continues from the saved step to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from vlreason.cli import main
from vlreason.data.synth import synthesize
from vlreason.models.vlm import build_tiny_vlm, load_vlm
from vlreason.rewards.scoring import RewardError

CRASH_PLUGIN = '''
import os

CALLS = {"n": 0}


def crash_at(completions, **columns):
    """Scores 0, but raises from the call number in VLREASON_TEST_CRASH_AT on (one batch call per step)."""
    CALLS["n"] += 1
    crash_at = os.environ.get("VLREASON_TEST_CRASH_AT")
    if crash_at and CALLS["n"] >= int(crash_at):
        raise RuntimeError("simulated crash")
    return [0.0] * len(completions)
'''


def write_config(folder: Path, data: Path, grpo_steps: int) -> Path:
    (folder / "crash.py").write_text(CRASH_PLUGIN)
    config = {
        "seed": 3,
        "output_dir": str(folder / "runs"),
        "model": {"name_or_path": "tiny-qwen2.5-vl"},
        "data": {"train": str(data), "eval": str(data)},
        "logging": {"tensorboard": False, "progress": False},
        "stages": [
            {"kind": "sft", "optim": {"learning_rate": 1e-3, "max_steps": 4, "batch_size": 4}, "save": {"every": 2}},
            {"kind": "grpo",
             "optim": {"learning_rate": 1e-3, "max_steps": grpo_steps, "batch_size": 2},
             "rollout": {"num_generations": 3, "max_new_tokens": 8},
             "algorithm": {"beta": 0.04, "on_reward_error": "raise"},
             "rewards": {"format": {"weight": 0.5}, "iou": {}, "crash": {"fn": "crash.py:crash_at", "weight": 0.0}},
             "save": {"every": 2, "keep": 5}},
        ],
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthesize("grounding", tmp_path_factory.mktemp("data"), n=12, seed=1, image_size=56, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> Path:
    folder = tmp_path_factory.mktemp("straight")
    assert main(["train", str(write_config(folder, data, grpo_steps=6))]) == 0
    return folder / "runs"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model's parameters, loaded the way users load it (names as in the model class)."""
    return load_vlm(folder).model.state_dict()


def test_pipeline_trains_both_stages_and_writes_what_it_promises(uninterrupted):
    base = build_tiny_vlm("tiny-qwen2.5-vl", seed=3).model.state_dict()
    sft, grpo = weights(uninterrupted / "sft" / "final"), weights(uninterrupted / "grpo" / "final")
    language = [k for k in sft if "language_model" in k]
    vision = [k for k in sft if ".visual." in k]
    assert language and vision
    assert any(not torch.equal(sft[k], base[k]) for k in language), "SFT did not change the language model"
    assert all(torch.equal(sft[k], base[k]) for k in vision), "the frozen vision tower changed"
    assert any(not torch.equal(grpo[k], sft[k]) for k in language), "GRPO did not change the language model"
    assert all(torch.equal(grpo[k], sft[k]) for k in vision)

    records = [json.loads(line) for line in (uninterrupted / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert 0.0 <= record["reward/format"] <= 1.0 and 0.0 <= record["reward/iou"] <= 1.0
        assert record["kl"] >= 0.0 and record["groups/kept"] == 2.0
    assert records[-1]["kl"] > 0.0  # the policy moved away from the reference
    assert (uninterrupted / "grpo" / "reward_curve.png").stat().st_size > 1000
    rollouts = (uninterrupted / "grpo" / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 6 * 2 * 3
    for stage in ("sft", "grpo"):
        metrics = json.loads((uninterrupted / stage / "eval.json").read_text())["metrics"]
        assert {"mean_iou", "format_rate", "iou@0.5"} <= set(metrics)
        assert (uninterrupted / stage / "eval.md").is_file()
    vlm = load_vlm(uninterrupted / "grpo" / "final")  # a standard checkpoint
    assert vlm.adapter.name == "qwen2.5-vl"
    summary = json.loads((uninterrupted / "pipeline.json").read_text())
    assert [s["name"] for s in summary] == ["sft", "grpo"] and summary[1]["steps"] == 6


def test_resume_after_a_crash_continues_to_the_same_weights(tmp_path, data, uninterrupted, monkeypatch):
    config = write_config(tmp_path, data, grpo_steps=6)
    monkeypatch.setenv("VLREASON_TEST_CRASH_AT", "5")  # the 5th GRPO step fails; checkpoint-4 exists
    with pytest.raises(RewardError, match="simulated crash"):
        main(["train", str(config)])
    grpo = tmp_path / "runs" / "grpo"
    assert not (grpo / "final").exists()
    assert sorted(p.name for p in grpo.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    monkeypatch.delenv("VLREASON_TEST_CRASH_AT")
    sft_before = weights(tmp_path / "runs" / "sft" / "final")
    assert main(["train", str(config), "--resume"]) == 0
    assert all(torch.equal(v, weights(tmp_path / "runs" / "sft" / "final")[k]) for k, v in sft_before.items())

    records = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    rollout_steps = [json.loads(line)["step"] for line in (grpo / "rollouts.jsonl").read_text().splitlines()]
    assert rollout_steps == sorted(rollout_steps) and len(rollout_steps) == 6 * 2 * 3
    resumed, straight = weights(grpo / "final"), weights(uninterrupted / "grpo" / "final")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{key} differs after resume")
