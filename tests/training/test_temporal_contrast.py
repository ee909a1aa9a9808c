"""T-GRPO (Video-R1): the bonus rule, shuffled frames, and the second group in GRPO sampling."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import yaml

from vlreason.cli import main
from vlreason.data.jsonl import read_jsonl
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rewards import RewardScorer, get_reward
from vlreason.rl import AdvantageScale, temporal_bonus
from vlreason.rollout.agent import AgentLoop
from vlreason.rollout.engine import SamplingParams
from vlreason.rollout.scripted import ScriptedEngine
from vlreason.training.groups import GroupSampler, PromptStream, TemporalContrast, temporal_stats
from vlreason.training.metrics import read_metrics
from vlreason.vision.video import FrameSampling, read_video, shuffle_frames


def test_bonus_goes_to_correct_ordered_answers_when_order_helps():
    ordered = torch.tensor([[True, True, False, False],  # p = 0.5 vs p~ = 0.5: 0.5 >= 0.4, paid
                            [True, False, False, False],  # p = 0.25 vs p~ = 0.75: 0.25 < 0.6, not paid
                            [False, False, False, False]])  # nothing correct: nothing paid
    shuffled = torch.tensor([[True, False, True, False], [True, True, True, False], [False, False, False, False]])
    bonus = temporal_bonus(ordered, shuffled, alpha=0.3, mu=0.8)
    assert bonus.flatten().tolist() == pytest.approx([0.3, 0.3, 0, 0] + [0] * 8)
    assert temporal_bonus(ordered[1:2], shuffled[1:2], mu=0.3).flatten().tolist() == pytest.approx([0.3, 0, 0, 0])


def test_shuffled_frames_keep_times_and_change_order(tmp_path, make_video):
    clip = read_video(make_video(tmp_path / "v.mp4", frames=16), FrameSampling(fps=10, min_frames=8, max_frames=8))
    mixed = shuffle_frames(clip, "seed")
    assert mixed.timestamps == clip.timestamps and mixed.indices == clip.indices
    assert sorted(f.mean() for f in mixed.frames) == pytest.approx(sorted(f.mean() for f in clip.frames))
    assert not np.array_equal(mixed.frames, clip.frames)
    np.testing.assert_array_equal(shuffle_frames(clip, "seed").frames, mixed.frames)  # fixed by the seed


class RecordingEngine(ScriptedEngine):
    """The scripted engine, keeping the video pixels of every prompt batch it is given."""

    def __init__(self, vlm, completions):
        super().__init__(vlm, completions)
        self.videos = []

    def start(self, prompts, params):
        self.videos.append(prompts.inputs["pixel_values_videos"].clone())
        return super().start(prompts, params)


def _sample_once(data_path, completions):
    vlm = build_tiny_vlm("tiny-qwen3-vl")
    reader = vlm.use_video(FrameSampling(fps=10, min_frames=8, max_frames=8))
    data = read_jsonl(data_path)
    engine = RecordingEngine(vlm, completions)
    choice = {"choice": get_reward("choice")}
    sampler = GroupSampler(vlm, AgentLoop(vlm, engine), RewardScorer(choice), weights=torch.ones(2),
                           data_columns=sorted(data.columns), group_size=2,
                           sampling=SamplingParams(max_new_tokens=24), scale=AdvantageScale.GROUP,
                           clock=time.perf_counter, read_clip=reader,
                           temporal=TemporalContrast("choice", RewardScorer(choice), alpha=0.3, mu=0.8))
    batch = sampler.sample(PromptStream(data.samples, seed=0), 2, seed=0, dynamic=False, max_refills=0)
    return batch, engine


def test_the_second_group_sees_shuffled_frames_and_pays_the_ordered_group(left_video_data):
    left, right = "<answer>left</answer>", "<answer>right</answer>"
    # ordered rows: prompt 0 both right, prompt 1 half right; shuffled rows: prompt 0 half, prompt 1 all
    batch, engine = _sample_once(left_video_data, [left, left, left, right, left, right, left, left])
    ordered_pixels, shuffled_pixels = engine.videos
    assert ordered_pixels.shape == shuffled_pixels.shape and not torch.equal(ordered_pixels, shuffled_pixels)
    part = batch.parts[0]
    assert part.table.names == ["choice", "temporal"]
    # prompt 0: p = 1 >= 0.8 * 0.5, both correct completions paid; prompt 1: p = 0.5 < 0.8 * 1, nothing
    assert part.table.column("temporal").tolist() == pytest.approx([0.3, 0.3, 0.0, 0.0])
    assert part.rewards.tolist() == pytest.approx([1.3, 1.3, 1.0, 0.0])
    assert temporal_stats(batch.temporal) == pytest.approx(
        {"temporal/ordered_accuracy": 0.75, "temporal/shuffled_accuracy": 0.75, "temporal/bonus_groups": 0.5})


def test_grpo_logs_the_temporal_reward_and_refuses_image_data(tmp_path, left_video_data, capsys):
    left = "<think>It moves.</think><answer>left</answer>"
    config = {"seed": 0, "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": "tiny-qwen3-vl"},
              "data": {"train": str(left_video_data)}, "video": {"fps": 10, "min_frames": 4, "max_frames": 4},
              "logging": {"tensorboard": False, "progress": False},
              "stages": [{"kind": "grpo", "optim": {"learning_rate": 1e-3, "max_steps": 1, "batch_size": 2},
                          "rollout": {"num_generations": 2, "max_new_tokens": 24, "engine": "scripted",
                                      "engine_options": {"completions": [left]}},
                          "algorithm": {"temporal_reward": "choice"},
                          "rewards": {"format": {"weight": 0.5}, "choice": {}}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    step = read_metrics(tmp_path / "runs" / "grpo" / "metrics.jsonl")[0]
    assert step["reward/temporal"] == pytest.approx(0.3)  # every answer right, in order and shuffled: paid
    assert step["temporal/ordered_accuracy"] == 1.0 and step["temporal/shuffled_accuracy"] == 1.0
    assert step["reward/total"] == pytest.approx(0.5 + 1.0 + 0.3)
    rollout = json.loads((tmp_path / "runs" / "grpo" / "rollouts.jsonl").read_text().splitlines()[0])
    assert rollout["rewards"]["temporal"] == pytest.approx(0.3)
    assert rollout["media"][0].endswith("_v0.jpg")  # the clip's first frame, kept for the rollout viewer
    assert (tmp_path / "runs" / "grpo" / rollout["media"][0]).stat().st_size > 0

    image_data = tmp_path / "images.jsonl"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    image_data.write_text(json.dumps({"images": ["a.png"], "prompt": "Which way?", "answer": "left",
                                      "choices": ["left", "right"]}) + "\n")
    config["data"]["train"] = str(image_data)
    config["output_dir"] = str(tmp_path / "images")
    capsys.readouterr()
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    assert "has no videos; remove algorithm.temporal_reward" in capsys.readouterr().err
    config["stages"][0]["algorithm"]["temporal_reward"] = "numeric"
    config["data"]["train"] = str(left_video_data)
    config["output_dir"] = str(tmp_path / "numeric")
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    assert "'numeric' is not one of the stage's rewards" in capsys.readouterr().err
