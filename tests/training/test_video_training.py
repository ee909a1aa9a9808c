"""Video through training: `vlreason train` runs SFT -> GRPO -> evaluation on the synthetic video
task with a tiny model, the SFT loss falls, GRPO's prompts carry the videos' tensors and a micro
batch's share of them, and mixed image + video batches encode in one pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vlreason.cli import main
from vlreason.data.batch import Media
from vlreason.data.schema import Sample
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rollout.engine import encode_prompts
from vlreason.training.groups import GroupBatch
from vlreason.training.metrics import read_metrics
from vlreason.vision.video import Clip, FrameSampling, read_video

pytest.importorskip("av")
from vlreason.data.video_qa import synthesize_video_qa  # noqa: E402


@pytest.fixture(scope="module")
def video_data(tmp_path_factory) -> Path:
    return synthesize_video_qa(tmp_path_factory.mktemp("video_qa"), n=12, seed=5, size=48, frames=8, fps=4,
                               progress=False)


def test_sft_then_grpo_then_eval_on_video(tmp_path, video_data):
    config = {"seed": 1, "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": "tiny-qwen3-vl"},
              "data": {"train": str(video_data), "eval": str(video_data)},
              "video": {"fps": 4, "min_frames": 8, "max_frames": 8},
              "logging": {"tensorboard": False, "progress": False},
              "stages": [{"kind": "sft", "optim": {"learning_rate": 3e-3, "max_steps": 6, "batch_size": 4}},
                         {"kind": "grpo", "optim": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2},
                          "rollout": {"num_generations": 2, "max_new_tokens": 16},
                          "rewards": {"format": {"weight": 0.2}, "choice": {}, "numeric": {}}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "runs" / "sft" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
    grpo_steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "grpo" / "metrics.jsonl")]
    assert grpo_steps == [1, 2]
    report = json.loads((tmp_path / "runs" / "grpo" / "eval.json").read_text())["metrics"]
    assert {"choice_accuracy", "accuracy", "choice_accuracy/direction", "accuracy/flashes"} <= set(report)


def test_a_micro_batch_takes_its_prompts_videos(video_data):
    vlm = build_tiny_vlm("tiny-qwen2.5-vl")
    reader = vlm.use_video(FrameSampling(fps=4, min_frames=4, max_frames=8))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    folder = video_data.parent
    records = [json.loads(line) for line in video_data.read_text().splitlines()[:2]]
    samples = [_sample("v0", [], [str(folder / records[0]["videos"][0])]), _sample("i1", ["x.png"], []),
               _sample("v2", [], [str(folder / records[1]["videos"][0])])]
    media = [Media([], [reader(samples[0].videos[0])]), Media([image], []), Media([], [reader(samples[2].videos[0])])]
    prompts = encode_prompts(vlm, [s.prompt_messages for s in samples], media)
    inputs = prompts.inputs
    assert inputs["video_grid_thw"].shape == (2, 3) and inputs["image_grid_thw"].shape == (1, 3)
    batch = GroupBatch(samples, inputs, None, None, torch.zeros(3), torch.zeros(3))
    own = batch.prompt_inputs_of(1, 3)  # the image prompt and the second video prompt
    second = inputs["video_grid_thw"][0].prod()
    torch.testing.assert_close(own["pixel_values_videos"], inputs["pixel_values_videos"][second:])
    torch.testing.assert_close(own["video_grid_thw"], inputs["video_grid_thw"][1:])
    torch.testing.assert_close(own["second_per_grid_ts"], inputs["second_per_grid_ts"][1:])
    torch.testing.assert_close(own["pixel_values"], inputs["pixel_values"])
    alone = encode_prompts(vlm, [s.prompt_messages for s in samples[1:]], media[1:]).inputs
    with torch.no_grad():  # the share gives the same last-token logits as encoding those prompts alone
        torch.testing.assert_close(vlm.model(**own).logits[:, -1], vlm.model(**alone).logits[:, -1])


def _sample(sample_id: str, images: list[str], videos: list[str]) -> Sample:
    parts = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos) + [{"type": "text", "text": "q"}]
    return Sample(id=sample_id, messages=[{"role": "user", "content": parts}], images=images, videos=videos,
                  image_sizes=[(40, 40)] * len(images), source=f"test.jsonl:{sample_id}")


def test_every_frame_of_a_clip_is_read_once(video_data):
    record = json.loads(video_data.read_text().splitlines()[0])
    clip: Clip = read_video(video_data.parent / record["videos"][0], FrameSampling(fps=4, min_frames=8, max_frames=8))
    assert clip.indices == list(range(8))
