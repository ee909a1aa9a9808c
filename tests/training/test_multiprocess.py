"""Several processes (torchrun, gloo on the CPU): GRPO and SFT give the update of one process over
the same global batch, with plain data parallelism and with DeepSpeed ZeRO-2 / ZeRO-3; runs resume
across processes, also after one rank is killed; the final models load with ``load_vlm`` and
plain transformers.

Tolerance: the distance between the final weights of the runs compared, relative to the distance
the weights moved in training, is below 1e-4 (measured: 1e-6 to 3e-5; sums over ranks round
differently, and Adam magnifies that for weights whose gradients are tiny).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from vlreason.cli import main
from vlreason.data.synth import synthesize
from vlreason.models.vlm import load_vlm
from vlreason.training.checkpoints import MARKER

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4
SEED = 3

# scores a completion's length, except for about a third of the prompts, whose groups are flat:
# dynamic sampling then keeps different numbers of groups on the two ranks
REWARD_PLUGIN = '''
import zlib


def length_or_flat(completions, prompts, **columns):
    return [0.5 if zlib.crc32(str(prompt).encode()) % 3 == 0 else len(str(text)) / 100
            for text, prompt in zip(completions, prompts)]
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthesize("grounding", tmp_path_factory.mktemp("data"), n=16, seed=2, image_size=56, progress=False)


def write_config(folder: Path, data: Path, stage: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reward.py").write_text(REWARD_PLUGIN)
    config = {"seed": SEED, "output_dir": str(folder / "runs"), "model": {"name_or_path": "tiny-qwen2.5-vl"},
              "data": {"train": str(data)}, "logging": {"tensorboard": False, "progress": False},
              "stages": [stage]}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def grpo_stage(folder: Path, steps: int, **optim) -> dict:
    return {"kind": "grpo", "optim": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": steps,
                                      "micro_batch_size": 2, **optim},
            "rollout": {"num_generations": 2, "max_new_tokens": 12},
            "algorithm": {"beta": 0.05, "dynamic_sampling": True, "max_refill_tries": 2},
            "rewards": {"length": {"fn": f"{folder / 'reward.py'}:length_or_flat"}},
            "save": {"every": 1, "keep": 10}}


def sft_stage(steps: int, **optim) -> dict:
    return {"kind": "sft", "optim": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": steps, **optim},
            "save": {"every": 1, "keep": 10}}


def launch(config: Path, *args: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m vlreason train CONFIG ARGS`` in the background."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vlreason", "train", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_two(config: Path, *args: str) -> str:
    process = launch(config, *args)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    return output


def run_one(config: Path, *args: str) -> None:
    assert main(["train", str(config), *args]) == 0


def weights(final: Path) -> dict[str, torch.Tensor]:
    return load_vlm(final).model.state_dict()


def assert_same_update(final: Path, expected_final: Path) -> None:
    """The two runs moved the weights to the same place (see the module docstring)."""
    start = load_vlm("tiny-qwen2.5-vl", seed=SEED).model.state_dict()
    ours, expected = weights(final), weights(expected_final)
    moved = sum(float(((expected[k] - start[k]) ** 2).sum()) for k in start) ** 0.5
    apart = sum(float(((ours[k] - expected[k]) ** 2).sum()) for k in start) ** 0.5
    assert moved > 0.1, "training did not move the weights: nothing was compared"
    assert apart / moved < TOLERANCE, f"{final} is {apart:.3g} from {expected_final} (moved {moved:.3g})"


def logged_steps(stage_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory, data) -> dict[str, Path]:
    """The GRPO stage (4 steps) run by one process and by two."""
    root = tmp_path_factory.mktemp("grpo")
    single = write_config(root / "one", data, grpo_stage(root / "one", 4))
    run_one(single)
    double = write_config(root / "two", data, grpo_stage(root / "two", 4))
    run_two(double)
    return {"one": root / "one" / "runs" / "grpo", "two": root / "two" / "runs" / "grpo", "root": root}


def test_grpo_on_two_processes_gives_the_single_process_update(grpo_runs):
    one, two = grpo_runs["one"], grpo_runs["two"]
    assert_same_update(two / "final", one / "final")
    assert logged_steps(two) == [1, 2, 3, 4]  # written once, by the main process
    for a, b in zip(*(map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) for d in (one, two)),
                    strict=True):
        assert a["reward/total"] == pytest.approx(b["reward/total"], abs=1e-6)  # the same completions
        assert a["groups/kept"] == b["groups/kept"] and a["groups/draws"] == b["groups/draws"]
    rows = [json.loads(line) for line in (two / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == len((one / "rollouts.jsonl").read_text().splitlines())  # every rank's rollouts gathered


# the HF engine with end-of-sequence made likely, so that a random model ends its turns after a
# few tokens and MGPO's grounding mode runs a second turn after the crop of its box
SHORT_TURNS_ENGINE = '''
from vlreason.rollout.hf import HFEngine


class ShortTurns(HFEngine):
    def start(self, prompts, params):
        session = super().start(prompts, params)
        eos, next_logits = session.eos_id, session.prefix.next_logits

        def likely_end():
            logits = next_logits()
            logits[:, eos] += 6.0
            return logits

        session.prefix.next_logits = likely_end
        return session
'''


def test_multi_turn_grpo_on_two_processes_gives_the_single_process_update(tmp_path, data):
    """Ranks end turns at different steps and keep different rows; every row still samples what
    it would in one process (per-turn seeds, per-row draws), so the update is the same."""
    (tmp_path / "engine.py").write_text(SHORT_TURNS_ENGINE)

    def stage(folder: Path) -> dict:
        entry = grpo_stage(folder, 3)
        entry["rollout"] = {**entry["rollout"], "engine": f"{tmp_path / 'engine.py'}:ShortTurns"}
        return {**entry, "agent": {"mode": "grounding", "max_tokens": 200}, "save": {"every": 0}}

    run_one(write_config(tmp_path / "one", data, stage(tmp_path / "one")))
    run_two(write_config(tmp_path / "two", data, stage(tmp_path / "two")))
    one, two = tmp_path / "one" / "runs" / "grpo", tmp_path / "two" / "runs" / "grpo"
    assert_same_update(two / "final", one / "final")
    metrics = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert all(row["turns/mean"] > 1.2 for row in metrics[0])  # most trajectories ran a second turn
    for a, b in zip(*metrics, strict=True):
        assert a["reward/total"] == pytest.approx(b["reward/total"], abs=1e-6)
        assert a["turns/mean"] == b["turns/mean"] and a["tools/grounding/calls"] == b["tools/grounding/calls"]


def test_killing_one_rank_then_resuming_gives_the_uninterrupted_weights(grpo_runs, data):
    folder = grpo_runs["root"] / "killed"
    config = write_config(folder, data, grpo_stage(folder, 4))
    stage_dir = folder / "runs" / "grpo"
    process = launch(config)
    try:
        deadline = time.monotonic() + 600
        while not (stage_dir / "checkpoint-2").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        rank_one = [p for p in psutil.Process(process.pid).children(recursive=True)
                    if p.environ().get("RANK") == "1"]
        assert rank_one, "no rank 1 to kill"
        rank_one[0].kill()  # SIGKILL; the launcher then stops rank 0
        process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode != 0
    assert not (stage_dir / "final").exists(), "the run finished before it could be killed"

    run_two(config, "--resume")
    assert all((path / MARKER).is_file() for path in stage_dir.glob("checkpoint-*"))
    assert logged_steps(stage_dir) == [1, 2, 3, 4]
    resumed, straight = weights(stage_dir / "final"), weights(grpo_runs["two"] / "final")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{key} differs after resume")


def test_sft_on_two_processes_gives_the_single_process_update(tmp_path, data):
    run_one(write_config(tmp_path / "one", data, sft_stage(3)))
    run_two(write_config(tmp_path / "two", data, sft_stage(3)))
    two = tmp_path / "two" / "runs" / "sft"
    assert_same_update(two / "final", tmp_path / "one" / "runs" / "sft" / "final")
    assert logged_steps(two) == [1, 2, 3]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_grpo_under_deepspeed_zero_matches_resumes_and_saves_a_plain_model(tmp_path, data, grpo_runs, zero):
    stage = grpo_stage(tmp_path, 2, deepspeed=str(REPO / "configs" / "deepspeed" / f"{zero}.json"))
    config = write_config(tmp_path, data, stage)
    run_two(config)
    run_two(config, "optim.max_steps=4", "--resume")  # continues from checkpoint-2 with its ZeRO partitions
    final = tmp_path / "runs" / "grpo" / "final"
    assert_same_update(final, grpo_runs["two"] / "final")
    assert logged_steps(tmp_path / "runs" / "grpo") == [1, 2, 3, 4]
    plain = AutoModelForImageTextToText.from_pretrained(final)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in weights(final).items())


def test_one_process_under_deepspeed_gives_the_plain_update(tmp_path, data, grpo_runs):
    zero2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
    config = write_config(tmp_path, data, grpo_stage(tmp_path, 4, deepspeed=zero2))
    done = subprocess.run([sys.executable, "-m", "vlreason", "train", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=900, check=False)  # its own process: DeepSpeed makes a process group
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_update(tmp_path / "runs" / "grpo" / "final", grpo_runs["one"] / "final")


@pytest.mark.slow
def test_sft_under_zero3_with_cpu_offload_gives_the_single_process_update(tmp_path, data):
    run_one(write_config(tmp_path / "one", data, sft_stage(3)))
    offload = str(REPO / "configs" / "deepspeed" / "zero3_offload.json")
    run_two(write_config(tmp_path / "two", data, sft_stage(3, deepspeed=offload)))
    assert_same_update(tmp_path / "two" / "runs" / "sft" / "final", tmp_path / "one" / "runs" / "sft" / "final")


@pytest.mark.slow
def test_grpo_under_zero3_with_cpu_offload_gives_the_single_process_update(tmp_path, data, grpo_runs):
    offload = str(REPO / "configs" / "deepspeed" / "zero3_offload.json")
    run_two(write_config(tmp_path, data, grpo_stage(tmp_path, 4, deepspeed=offload)))
    assert_same_update(tmp_path / "runs" / "grpo" / "final", grpo_runs["one"] / "final")
