"""GRPO with the colocated vLLM engine through the real CLI, and the rollout server started by
its CLI on a free localhost port (``make test-vllm``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vlreason.cli import main
from vlreason.data.batch import Media
from vlreason.data.synth import synthesize
from vlreason.models.vlm import build_tiny_vlm, load_vlm
from vlreason.rollout import AgentLoop, HFEngine, SamplingParams, encode_prompts

pytest.importorskip("vllm")
from vlreason.rollout.vllm import VLLMEngine  # noqa: E402
from vlreason.rollout.vllm_backend import EngineError, identity  # noqa: E402
from vlreason.rollout.vllm_server import RemoteVLLM  # noqa: E402

pytestmark = pytest.mark.vllm
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the shape?"}]}]
EVEN_FIRST = '''
def even_first(completions, completion_ids, **columns):
    """1 when the completion's first token id is even."""
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]
'''


def even_first_mass(model_dir, prompts) -> float:
    """Mean probability of an even first token over ``prompts`` (vision tokens ruled out)."""
    vlm = load_vlm(model_dir, device="cpu") if isinstance(model_dir, Path) else model_dir
    batch = encode_prompts(vlm, [QUESTION] * len(prompts), [Media([image]) for image in prompts])
    with torch.no_grad():
        logits = vlm.model(**batch.inputs).logits[:, -1].float()
    logits[:, vlm.adapter.suppress_token_ids(vlm.tokenizer)] = -float("inf")
    return float(logits.softmax(-1)[:, ::2].sum(-1).mean())


def test_colocated_grpo_moves_the_policy_towards_the_reward(tmp_path):
    data = synthesize("grounding", tmp_path / "data", n=8, seed=1, image_size=56, progress=False)
    (tmp_path / "even.py").write_text(EVEN_FIRST)
    config = {
        "seed": 0, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "tiny-qwen2.5-vl"},
        "data": {"train": str(data)}, "logging": {"tensorboard": False, "progress": False},
        "stages": [{"kind": "grpo", "optim": {"learning_rate": 3e-3, "max_steps": 4, "batch_size": 2},
                    "rollout": {"num_generations": 8, "max_new_tokens": 6, "engine": "vllm",
                                "engine_options": {"enforce_eager": True, "max_model_len": 1024}},
                    "algorithm": {"sampler_is_cap": 2.0},
                    "rewards": {"even": {"fn": f"{tmp_path / 'even.py'}:even_first"}}}]}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0

    records = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["time/weight_sync"] > 0 for r in records[1:])  # pushed before every step after an update
    assert all(r["sampler/logprob_diff_mean"] < 0.05 for r in records)  # stale weights would drift far
    assert all(0.5 < r["sampler/is_weight_mean"] <= 2.0 for r in records)
    images = [Image.open(line_image) for line_image in sorted((data.parent / "images").iterdir())[:4]]
    before = even_first_mass(build_tiny_vlm("tiny-qwen2.5-vl", seed=0), images)
    after = even_first_mass(tmp_path / "run" / "grpo" / "final", images)
    assert after > before + 0.05, (before, after)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "vlreason", "rollout-server", "tiny-qwen2.5-vl", "--port",
                                str(port), "--max-model-len", "1024"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    model = identity(build_tiny_vlm("tiny-qwen2.5-vl").model.config)
    deadline = time.monotonic() + 300
    while True:
        try:
            RemoteVLLM(url, model, timeout_s=30)
            break
        except EngineError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the rollout server did not start:\n{process.stdout.read()}")
            time.sleep(1)
    yield url, process
    if process.poll() is None:
        process.kill()


def test_server_health_generate_weights_refusal_and_shutdown(server):
    url, process = server
    vlm = build_tiny_vlm("tiny-qwen2.5-vl", seed=7)  # other weights than the server started with
    batch = encode_prompts(vlm, [QUESTION], [Media([Image.new("RGB", (120, 90), (200, 30, 30))])])
    engine = VLLMEngine(vlm, url=url, timeout_s=60)
    pushes = engine.backend.health()["weight_pushes"]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    ours = AgentLoop(vlm, engine).run(batch, greedy)  # pushes the trainer's weights first
    assert engine.backend.health()["weight_pushes"] == pushes + 1 and engine.sync_s > 0
    assert torch.equal(ours.ids, AgentLoop(vlm, HFEngine(vlm)).run(batch, greedy).ids)

    with torch.no_grad():
        for parameter in vlm.model.parameters():
            parameter.mul_(1.05)
    engine.update_weights(vlm.model)
    again = AgentLoop(vlm, engine).run(batch, greedy)
    assert torch.equal(again.ids, AgentLoop(vlm, HFEngine(vlm)).run(batch, greedy).ids)
    assert not torch.equal(again.ids, ours.ids)

    with pytest.raises(EngineError, match="serves another model"):
        VLLMEngine(build_tiny_vlm("tiny-qwen3-vl"), url=url)
    engine.backend.shutdown()
    assert process.wait(timeout=30) == 0
    with pytest.raises(EngineError, match="did not answer"):
        engine.backend.health()
