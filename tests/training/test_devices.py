"""Devices and precision: ``model.device`` is resolved and checked before training, every stage
runs where the model lives, and half-precision training keeps weights, optimizer state,
log-probs and loss in float32."""

from __future__ import annotations

import pytest
import torch

from vlreason.config import ConfigError, ModelConfig, load_config
from vlreason.data.synth import synthesize
from vlreason.models.vlm import resolve_device
from vlreason.rollout.scripted import ScriptedEngine
from vlreason.training.grpo import GRPOTrainer
from vlreason.training.model_setup import autocast, compute_dtype, prepare_model
from vlreason.training.preflight import check_pipeline

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
GOOD = "<think>found it</think><answer>[0, 0, 56, 56]</answer>"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize("grounding", tmp_path_factory.mktemp("data"), n=4, seed=2, image_size=56, progress=False)


def config(tmp_path, data, model=None, kind="grpo"):
    stage = {"kind": kind, "optim": {"learning_rate": 1e-2, "batch_size": 2, "max_steps": 2},
             "rollout": {"num_generations": 2, "max_new_tokens": 40}, "rewards": {"format": {}},
             "logging": {"tensorboard": False, "progress": False}, "save": {"every": 0}}
    raw = {"output_dir": str(tmp_path), "data": {"train": str(data)}, "stages": [stage],
           "model": {"name_or_path": "tiny-qwen3-vl", **(model or {})}}
    return load_config(None, raw=raw)


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="runs on cpu or cuda devices"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device("cuda:99")


@no_cuda
def test_a_gpu_that_is_not_there_is_named_before_any_work(tmp_path, data):
    with pytest.raises(ConfigError, match=r"stages\[grpo\]\.model\.device: device 'cuda'.*no CUDA device visible"):
        check_pipeline(config(tmp_path, data, {"device": "cuda"}))


def test_device_and_dtype_mistakes_fail_at_load_time(tmp_path, data):
    with pytest.raises(ConfigError, match=r"model\.device: auto, cpu, cuda or cuda:N \(got gpu\)"):
        config(tmp_path, data, {"device": "gpu"})
    with pytest.raises(ConfigError, match=r"model\.dtype: GRPO computes in float32 or bfloat16"):
        config(tmp_path, data, {"dtype": "float16"})
    with pytest.raises(ConfigError, match="float16 training needs a GPU"):
        check_pipeline(config(tmp_path, data, {"dtype": "float16", "device": "cpu"}, kind="sft"))


def test_bfloat16_keeps_trainable_weights_in_float32_and_computes_in_bfloat16():
    vlm = prepare_model(ModelConfig(name_or_path="tiny-qwen3-vl", dtype="bfloat16", device="cpu"), seed=0)
    assert compute_dtype(vlm.model) == torch.bfloat16
    assert {p.dtype for p in vlm.model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in vlm.model.parameters() if not p.requires_grad} == {torch.bfloat16}  # the vision tower
    ids = torch.tensor([[1, 2, 3]])
    with autocast(vlm.model):
        logits = vlm.model(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids)).logits
    assert logits.dtype == torch.bfloat16
    plain = prepare_model(ModelConfig(name_or_path="tiny-qwen3-vl", device="cpu"), seed=0)
    assert compute_dtype(plain.model) == torch.float32 and not autocast(plain.model)._enabled


def test_bfloat16_grpo_step_keeps_loss_and_optimizer_state_in_float32(tmp_path, data):
    grpo = GRPOTrainer(config(tmp_path, data, {"dtype": "bfloat16", "device": "cpu"}).stages[0])
    grpo.sampler.loop.engine = ScriptedEngine(grpo.vlm, [GOOD, "no answer"])
    before = {n: p.detach().clone() for n, p in grpo.model.named_parameters() if p.requires_grad}
    values = grpo.step()
    assert torch.isfinite(torch.tensor(values["loss"])) and values["advantages/abs_max"] > 0.5
    state = [s for s in grpo.optimizer.state.values() if s]
    assert state and {s["exp_avg"].dtype for s in state} == {torch.float32}
    assert any(not torch.equal(before[n], p) for n, p in grpo.model.named_parameters() if p.requires_grad)
