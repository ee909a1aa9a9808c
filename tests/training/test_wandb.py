"""Weights & Biases logging, offline: every metrics record reaches the run, a resumed stage
continues the same run, and a missing ``wandb`` package is named before any work."""

from __future__ import annotations

import importlib.util

import pytest

from vlreason.config import ConfigError, load_config
from vlreason.data.synth import synthesize
from vlreason.training.metrics import MetricsLog
from vlreason.training.preflight import check_pipeline


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def runs(folder):
    return sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"))


def test_metrics_reach_an_offline_run(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False, wandb_project="vlreason-test", run_name="grpo",
                     run_config={"seed": 3})
    log.write(1, {"reward/total": 0.25, "loss": float("nan")})
    log.write(2, {"reward/total": 0.5, "loss": 1.0})
    log.close()
    [run] = runs(tmp_path)
    data = run.read_bytes()
    assert b"reward/total" in data and b"vlreason-test" in data and b"grpo" in data


def test_a_resumed_stage_continues_the_same_run(tmp_path):
    for step in (1, 2):
        log = MetricsLog(tmp_path, tensorboard=False, resume_step=step - 1, wandb_project="vlreason-test")
        log.write(step, {"loss": 1.0 / step})
        log.close()
    ids = {run.stem.removeprefix("run-") for run in runs(tmp_path)}
    assert len(runs(tmp_path)) == 2 and len(ids) == 1


def test_a_missing_wandb_package_is_named_before_any_work(tmp_path, monkeypatch):
    data = synthesize("grounding", tmp_path / "data", n=2, image_size=56, progress=False)
    raw = {"output_dir": str(tmp_path / "run"), "data": {"train": str(data)},
           "logging": {"wandb_project": "vlreason-test"}, "stages": [{"kind": "sft"}]}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"logging\.wandb_project: .*pip install 'vlreason\[wandb\]'"):
        check_pipeline(load_config(None, raw=raw))
