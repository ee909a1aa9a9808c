"""kill -9 in the middle of SFT checkpointing: the torn checkpoint is never resumed from, and the
resumed run ends at exactly the weights of an uninterrupted one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from vlreason.cli import main
from vlreason.data.synth import synthesize
from vlreason.models.vlm import load_vlm
from vlreason.training.checkpoints import MARKER


def sft_config(folder: Path, data: Path) -> Path:
    config = {"seed": 5, "output_dir": str(folder / "runs"), "model": {"name_or_path": "tiny-qwen2.5-vl"},
              "data": {"train": str(data)}, "logging": {"tensorboard": False, "progress": False},
              "stages": [{"kind": "sft", "optim": {"learning_rate": 1e-3, "max_steps": 8, "batch_size": 4},
                          "save": {"every": 1, "keep": 2}}]}
    path = folder / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_kill_during_a_checkpoint_write_then_resume_is_exact(tmp_path):
    data = synthesize("grounding", tmp_path / "data", n=12, seed=2, image_size=56, progress=False)
    (tmp_path / "straight").mkdir()
    assert main(["train", str(sft_config(tmp_path / "straight", data))]) == 0

    (tmp_path / "killed").mkdir()
    config = sft_config(tmp_path / "killed", data)
    sft = tmp_path / "killed" / "runs" / "sft"
    process = subprocess.Popen([sys.executable, "-m", "vlreason.cli", "train", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (sft / "checkpoint-4").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.kill()  # SIGKILL, most likely while checkpoint-4 is being written
    finally:
        process.wait()
    assert not (sft / "final").exists(), "the run finished before it could be killed"

    assert main(["train", str(config), "--resume"]) == 0
    assert all((path / MARKER).is_file() for path in sft.glob("checkpoint-*"))
    resumed = load_vlm(sft / "final").model.state_dict()
    straight = load_vlm(tmp_path / "straight" / "runs" / "sft" / "final").model.state_dict()
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{key} differs after resume")
