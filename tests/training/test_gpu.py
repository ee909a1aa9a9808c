"""On a CUDA GPU (skipped without one): GRPO samples, scores and trains where the model lives,
the frozen reference too, in bfloat16 compute with float32 weights; a whole pipeline (SFT, GRPO,
evaluation) runs there from the command line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from vlreason.cli import main
from vlreason.config import load_config
from vlreason.data.synth import synthesize
from vlreason.eval import evaluate
from vlreason.models.vlm import load_vlm
from vlreason.training.grpo import GRPOTrainer
from vlreason.training.metrics import read_metrics

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize("grounding", tmp_path_factory.mktemp("data"), n=8, seed=2, image_size=56, progress=False)


def grpo_stage(tmp_path, data):
    stage = {"kind": "grpo", "optim": {"learning_rate": 1e-3, "batch_size": 2, "max_steps": 2},
             "rollout": {"num_generations": 4, "max_new_tokens": 16}, "rewards": {"format": {}, "iou": {}},
             "algorithm": {"beta": 0.04}, "logging": {"tensorboard": False, "progress": False},
             "save": {"every": 0}}
    raw = {"output_dir": str(tmp_path), "data": {"train": str(data)}, "stages": [stage],
           "model": {"name_or_path": "tiny-qwen3-vl", "device": "cuda", "dtype": "bfloat16", "freeze_vision": False}}
    return load_config(None, raw=raw).stages[0]


def test_grpo_samples_and_trains_on_the_gpu(tmp_path, data):
    grpo = GRPOTrainer(grpo_stage(tmp_path, data))
    assert {p.device.type for p in grpo.model.parameters()} == {"cuda"}
    assert {p.device.type for p in grpo.reference.parameters()} == {"cuda"}
    assert {p.dtype for p in grpo.model.parameters() if p.requires_grad} == {torch.float32}
    seen = []
    grpo.model.lm_head.register_forward_hook(lambda module, args, out: seen.append((out.device.type, out.dtype)))
    result = grpo.train()
    assert result.steps == 2 and (result.final_path / "config.json").is_file()
    assert seen and set(seen) == {("cuda", torch.bfloat16)}  # sampling, and every log-prob pass
    records = read_metrics(grpo.out / "metrics.jsonl")
    assert len(records) == 2 and all(r["memory/peak_mb"] > 0 for r in records)
    state = [s for s in grpo.optimizer.state.values() if s]
    assert {(s["exp_avg"].device.type, s["exp_avg"].dtype) for s in state} == {("cuda", torch.float32)}
    vlm = load_vlm(result.final_path, device="cuda")
    assert next(vlm.model.parameters()).device.type == "cuda"
    report = evaluate(vlm, data, max_new_tokens=16, progress=False)
    assert report.metrics["samples"] == 8


def test_the_pipeline_runs_on_the_gpu_from_the_command_line(tmp_path, data):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "tiny-qwen3-vl", "device": "cuda", "dtype": "bfloat16"},
        "data": {"train": str(data), "eval": str(data)},
        "logging": {"tensorboard": False, "progress": False},
        "stages": [
            {"kind": "sft", "optim": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3}},
            {"kind": "grpo", "optim": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-4},
             "rollout": {"num_generations": 2, "max_new_tokens": 16}, "rewards": {"format": {}, "iou": {}}},
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    stages = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [s["steps"] for s in stages] == [3, 2] and all(s["eval"]["samples"] == 8 for s in stages)


def test_tool_rollouts_sample_and_train_on_the_gpu(tmp_path, monkeypatch):
    """Multi-turn GRPO in MGPO's grounding mode where the model lives: every row writes a box (its
    token choices forced), the crop is fed into the CUDA cache, the second turn answers, and the
    update trains on both turns."""
    from vlreason.data.zoom import synthesize_zoom
    from vlreason.models.prefix import SharedPrefix

    data, _ = synthesize_zoom(tmp_path / "zoom", n=4, canvas=256, progress=False)
    stage = {"kind": "grpo", "optim": {"learning_rate": 1e-3, "batch_size": 2, "max_steps": 1},
             "rollout": {"num_generations": 4, "max_new_tokens": 24}, "rewards": {"classification": {}},
             "agent": {"mode": "grounding"}, "logging": {"tensorboard": False, "progress": False},
             "save": {"every": 0}}
    raw = {"output_dir": str(tmp_path / "run"), "data": {"train": str(data)}, "stages": [stage],
           "model": {"name_or_path": "tiny-qwen3-vl", "device": "cuda", "freeze_vision": False}}
    grpo = GRPOTrainer(load_config(None, raw=raw).stages[0])
    tokenizer = grpo.vlm.tokenizer
    script = [t for text in ("[100, 100, 600, 600]", "<answer>red</answer>")
              for t in tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]]
    original, steps = SharedPrefix.next_logits, []

    def forced(prefix):
        logits = original(prefix)
        choice = torch.full_like(logits, -1e4)
        choice[:, script[len(steps) % len(script)]] = 1e4
        steps.append(1)
        return choice

    monkeypatch.setattr(SharedPrefix, "next_logits", forced)
    before = {n: p.detach().clone() for n, p in grpo.model.named_parameters() if p.requires_grad}
    values = grpo.step()
    assert values["turns/mean"] == 2.0 and values["tools/grounding/calls"] == 8.0
    assert values["tools/grounding/errors"] == 0.0 and values["stops/end"] == 1.0
    assert any(not torch.equal(before[n], p) for n, p in grpo.model.named_parameters() if p.requires_grad)
