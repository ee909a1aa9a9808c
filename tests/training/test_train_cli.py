"""End to end: `vlreason train` runs an SFT -> GRPO pipeline on a tiny model, and `--resume` after a
crash, a Ctrl-C or a kill continues from the saved step to exactly the weights of an uninterrupted
run; output folders are never overwritten or shared silently, and every stage is checked first."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from vlreason.cli import main
from vlreason.config import load_config
from vlreason.data.synth import synthesize
from vlreason.models.vlm import build_tiny_vlm, load_vlm
from vlreason.rewards.scoring import RewardError
from vlreason.training import sft as sft_module
from vlreason.training.checkpoints import checkpoint_step, checkpoints
from vlreason.training.pipeline import run_pipeline
from vlreason.training.run_dir import RunLock

CRASH_PLUGIN = '''
import os
import signal

CALLS = {"n": 0}


def crash_at(completions, **columns):
    """Scores a completion's length (a signal to learn from even where format and IoU are all 0),
    but raises from the call number in VLREASON_TEST_CRASH_AT on, and presses Ctrl-C at the call
    number in VLREASON_TEST_SIGINT_AT (one batch call per step)."""
    CALLS["n"] += 1
    crash_at = os.environ.get("VLREASON_TEST_CRASH_AT")
    if crash_at and CALLS["n"] >= int(crash_at):
        raise RuntimeError("simulated crash")
    if os.environ.get("VLREASON_TEST_SIGINT_AT") == str(CALLS["n"]):
        os.kill(os.getpid(), signal.SIGINT)
    return [len(str(completion)) / 100 for completion in completions]
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
            {"kind": "sft", "optim": {"learning_rate": 1e-3, "max_steps": 4, "batch_size": 4}, "save": {"every": 2},
             "data": {"thought_dropout": 0.5}},  # 3 steps an epoch: step 4 starts the second
            {"kind": "grpo",
             "optim": {"learning_rate": 1e-3, "max_steps": grpo_steps, "batch_size": 2},
             "rollout": {"num_generations": 3, "max_new_tokens": 8},
             "algorithm": {"beta": 0.04, "on_reward_error": "raise"},
             "rewards": {"format": {"weight": 0.5}, "iou": {},
                         "crash": {"fn": f"{folder / 'crash.py'}:crash_at", "weight": 1.0}},
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
    return load_vlm(folder, device="cpu").model.state_dict()


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


def test_a_torn_log_line_and_resume_before_the_first_checkpoint(tmp_path, data, uninterrupted, monkeypatch, caplog):
    """A kill (or a full disk) can cut the last line of a log; and resuming with no GRPO checkpoint yet
    starts GRPO over: neither may break the resume nor duplicate log rows."""
    config = write_config(tmp_path, data, grpo_steps=6)
    monkeypatch.setenv("VLREASON_TEST_CRASH_AT", "2")  # step 1 is logged, no checkpoint exists yet
    with pytest.raises(RewardError):
        main(["train", str(config)])
    grpo = tmp_path / "runs" / "grpo"
    assert not list(grpo.glob("checkpoint-*"))
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        with (grpo / name).open("a") as handle:
            handle.write('{"step": 2, "reward/total": 0.1')  # cut off mid-line
    monkeypatch.delenv("VLREASON_TEST_CRASH_AT")
    assert main(["train", str(config), "--resume"]) == 0
    assert "metrics.jsonl:2: not a complete log record" in caplog.text
    records = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert len((grpo / "rollouts.jsonl").read_text().splitlines()) == 6 * 2 * 3
    resumed, straight = weights(grpo / "final"), weights(uninterrupted / "grpo" / "final")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{key} differs after resume")


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same_run(tmp_path, data, uninterrupted, monkeypatch,
                                                                   capsys):
    config = write_config(tmp_path, data, grpo_steps=6)
    monkeypatch.setenv("VLREASON_TEST_SIGINT_AT", "3")  # Ctrl-C during GRPO step 3
    assert main(["train", str(config)]) == 130
    err = capsys.readouterr().err
    grpo = tmp_path / "runs" / "grpo"
    assert f"stage grpo stopped after step 3; checkpoint saved to {grpo / 'checkpoint-3'}" in err
    assert f"continue with: vlreason train {config} --resume" in err
    assert "Traceback" not in err
    assert (grpo / "checkpoint-3" / "checkpoint.json").is_file() and not (grpo / "final").exists()
    monkeypatch.delenv("VLREASON_TEST_SIGINT_AT")
    assert main(["train", str(config), "--resume"]) == 0
    resumed, straight = weights(grpo / "final"), weights(uninterrupted / "grpo" / "final")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{key} differs after resume")


def test_ctrl_c_during_sft_with_thought_dropout_resumes_exactly(tmp_path, data, uninterrupted, monkeypatch):
    """Thought dropout decides per seed, epoch and sample, so the resumed SFT run drops the same thoughts."""
    calls = {"n": 0}
    collate = sft_module.SFTCollator.__call__

    def collate_then_press_ctrl_c(self, samples):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return collate(self, samples)

    monkeypatch.setattr(sft_module.SFTCollator, "__call__", collate_then_press_ctrl_c)
    config = write_config(tmp_path, data, grpo_steps=6)
    assert main(["train", str(config)]) == 130
    sft = tmp_path / "runs" / "sft"
    (stopped,) = checkpoints(sft)
    assert checkpoint_step(stopped) < 4 and not (sft / "final").exists()
    monkeypatch.setattr(sft_module.SFTCollator, "__call__", collate)
    assert main(["train", str(config), "--resume"]) == 0
    resumed, straight = weights(sft / "final"), weights(uninterrupted / "sft" / "final")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{key} differs after resume")


def copy_of(uninterrupted: Path, folder: Path, data: Path) -> Path:
    """The finished run copied to ``folder/runs``; returns the config that trains into it."""
    shutil.copytree(uninterrupted, folder / "runs")
    return write_config(folder, data, grpo_steps=6)


def test_a_kill_after_the_last_sft_checkpoint_only_writes_final(tmp_path, data, uninterrupted):
    """Killed after checkpoint-4 (= max_steps) but before final/: resume trains no further step."""
    config = copy_of(uninterrupted, tmp_path, data)
    copy = tmp_path / "runs"
    for stage in ("sft", "grpo"):
        shutil.rmtree(copy / stage / "final")
        (copy / stage / "stage.json").unlink()
    outcomes = run_pipeline(load_config(config), resume=True)
    assert [o.steps for o in outcomes] == [4, 6]
    for stage in ("sft", "grpo"):
        resumed, straight = weights(copy / stage / "final"), weights(uninterrupted / stage / "final")
        assert all(torch.equal(resumed[k], v) for k, v in straight.items()), stage


def test_resume_with_a_larger_max_steps_continues_a_finished_run(tmp_path, data, uninterrupted, capsys):
    """The README's example: a finished run, then `--resume` with more GRPO steps."""
    config = str(copy_of(uninterrupted, tmp_path, data))
    copy = tmp_path / "runs"
    assert main(["train", config, "grpo.optim.max_steps=8", "--resume"]) == 0
    records = [json.loads(line) for line in (copy / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert json.loads((copy / "grpo" / "stage.json").read_text())["steps"] == 8
    assert weights(copy / "sft" / "final").keys() == weights(uninterrupted / "sft" / "final").keys()
    assert any(not torch.equal(v, weights(uninterrupted / "grpo" / "final")[k])
               for k, v in weights(copy / "grpo" / "final").items())
    assert main(["train", config, "sft.optim.max_steps=6", "--resume"]) == 2
    assert "stage sft will train further, but stage grpo already has outputs" in capsys.readouterr().err


def test_a_new_run_refuses_a_folder_with_an_earlier_run_until_told(tmp_path, data, uninterrupted, capsys):
    config = str(copy_of(uninterrupted, tmp_path, data))
    copy = tmp_path / "runs"
    (copy / "notes.txt").write_text("mine")
    assert main(["train", config, "grpo.optim.max_steps=1", "sft.optim.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err
    assert (copy / "grpo" / "checkpoint-6").is_dir()  # untouched
    assert main(["train", config, "grpo.rewards.iuo={}", "--overwrite"]) == 2  # a mistake costs nothing
    assert (copy / "grpo" / "checkpoint-6").is_dir() and (copy / "config.yaml").is_file()
    assert main(["train", config, "grpo.optim.max_steps=1", "sft.optim.max_steps=1", "--overwrite"]) == 0
    assert sorted(p.name for p in (copy / "grpo").glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((copy / "pipeline.json").read_text())[1]["steps"] == 1
    assert (copy / "notes.txt").read_text() == "mine"  # only the run's own outputs are deleted


def test_a_second_run_into_the_same_folder_stops_at_once(tmp_path, data, capsys):
    config = write_config(tmp_path, data, grpo_steps=2)
    with RunLock(tmp_path / "runs"):  # another run holds the folder
        assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "another vlreason run is writing into it (pid" in err
    assert not (tmp_path / "runs" / "sft").exists()


def test_every_stage_is_checked_before_the_first_trains(tmp_path, data, capsys):
    config = write_config(tmp_path, data, grpo_steps=2)
    assert main(["train", str(config), "grpo.rewards.iuo={}"]) == 2
    assert "unknown reward 'iuo'" in capsys.readouterr().err.lower()
    assert main(["train", str(config), "grpo.rewards.label_check={fn: classification}"]) == 2
    assert "needs column(s) label" in capsys.readouterr().err
    assert main(["train", str(config), f"grpo.data.eval={tmp_path / 'missing.jsonl'}"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "sft").exists() or not any((tmp_path / "runs" / "sft").iterdir())


def test_an_output_dir_that_cannot_be_written_is_named(tmp_path, data, capsys):
    config = write_config(tmp_path, data, grpo_steps=2)
    (tmp_path / "taken").write_text("a file")
    assert main(["train", str(config), f"output_dir={tmp_path / 'taken'}"]) == 2
    assert f"output_dir {tmp_path / 'taken'}: is a file" in capsys.readouterr().err
    assert main(["train", str(config), f"output_dir={tmp_path / 'taken' / 'below'}"]) == 2
    assert "cannot write there" in capsys.readouterr().err
