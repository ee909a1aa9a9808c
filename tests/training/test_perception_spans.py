"""PA-GRPO (VideoP2R): the perception span's tokens, per-span advantages, settings and a GRPO step."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from PIL import Image

from vlreason.cli import main
from vlreason.data.jsonl import read_jsonl
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rewards import RewardScorer, get_reward, register_reward
from vlreason.rl import AdvantageScale
from vlreason.rollout.agent import AgentLoop
from vlreason.rollout.engine import SamplingParams
from vlreason.rollout.scripted import ScriptedEngine
from vlreason.training.groups import GroupSampler, PerceptionSpans, PromptStream, tag_spans
from vlreason.training.metrics import read_metrics

SEES_RED = "<perception>a red circle</perception><think>It moves.</think><answer>right</answer>"
SEES_BLUE = "<perception>a blue circle</perception><think>It moves.</think><answer>left</answer>"


@register_reward("test_perception_red")
def perception_red(completions, **columns):
    """1 when the perception span says red (what the image shows), else 0."""
    return [float("<perception>a red" in text) for text in completions]


@pytest.fixture(scope="module")
def vlm():
    return build_tiny_vlm("tiny-qwen2-vl")


@pytest.fixture
def data(tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"images": ["red.png"], "prompt": "Which way?", "answer": "left",
                                "choices": ["left", "right"]}) + "\n")
    return path


def _sample(vlm, data, texts, perception=True):
    samples = read_jsonl(data).samples
    rewards = {"test_perception_red": get_reward("test_perception_red"), "choice": get_reward("choice")}
    spans = PerceptionSpans("perception", torch.tensor([True, False])) if perception else None
    sampler = GroupSampler(vlm, AgentLoop(vlm, ScriptedEngine(vlm, texts)), RewardScorer(rewards),
                           weights=torch.ones(2), data_columns=["answer", "choices"], group_size=2,
                           sampling=SamplingParams(max_new_tokens=64), scale=AdvantageScale.GROUP,
                           clock=time.perf_counter, perception=spans)
    return sampler.sample(PromptStream(samples, seed=0), 1, seed=0, dynamic=False, max_refills=0).parts[0]


def test_the_span_covers_the_tagged_tokens_only(vlm, data):
    part = _sample(vlm, data, [SEES_RED, "<think>no span</think><answer>left</answer>"])
    spans = tag_spans(part.trajectories, vlm.tokenizer, "perception")
    row = part.trajectories.ids[0][spans[0]].tolist()
    assert vlm.tokenizer.decode(row) == "<perception>a red circle</perception>"
    assert not spans[1].any()
    unclosed = _sample(vlm, data, ["<perception>red and then it stops"] * 2)
    covered = tag_spans(unclosed.trajectories, vlm.tokenizer, "perception")[0]
    # an unclosed span runs to the end of what the model wrote, its end-of-turn token included
    assert vlm.tokenizer.decode(unclosed.trajectories.ids[0][covered]) == "<perception>red and then it stops<|im_end|>"


def test_each_span_learns_from_its_own_rewards(vlm, data):
    # row 0 perceives right (red) and answers wrong; row 1 perceives wrong and answers right
    part = _sample(vlm, data, [SEES_RED, SEES_BLUE])
    spans = tag_spans(part.trajectories, vlm.tokenizer, "perception")
    written = part.trajectories.loss_mask.bool()
    tokens = part.token_advantages
    assert (tokens[0][spans[0]] > 0).all() and (tokens[0][written[0] & ~spans[0]] < 0).all()
    assert (tokens[1][spans[1]] < 0).all() and (tokens[1][written[1] & ~spans[1]] > 0).all()
    for row in range(2):  # the per-completion advantage (logged) is that of the tokens outside the span
        assert (tokens[row][written[row] & ~spans[row]] == part.advantages[row]).all()
    plain = _sample(vlm, data, [SEES_RED, SEES_BLUE], perception=False)
    assert plain.token_advantages is None and plain.advantages.tolist() == pytest.approx([0.0, 0.0])


def test_grpo_trains_with_perception_spans_and_checks_its_settings(tmp_path, data, capsys):
    config = {"seed": 0, "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": "tiny-qwen2-vl"},
              "data": {"train": str(data)}, "logging": {"tensorboard": False, "progress": False},
              "stages": [{"kind": "grpo", "optim": {"learning_rate": 1e-3, "max_steps": 1, "batch_size": 1},
                          "rollout": {"num_generations": 2, "max_new_tokens": 48, "engine": "scripted",
                                      "engine_options": {"completions": [SEES_RED, SEES_BLUE]}},
                          "algorithm": {"perception_tag": "perception",
                                        "perception_rewards": ["test_perception_red"]},
                          "rewards": {"test_perception_red": {}, "choice": {}}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    step = read_metrics(tmp_path / "runs" / "grpo" / "metrics.jsonl")[0]
    assert step["loss"] != 0.0 and step["reward/test_perception_red"] == 0.5
    for algorithm, message in [({"perception_tag": "perception"}, "PA-GRPO needs both"),
                               ({"perception_tag": "perception", "perception_rewards": ["iou"]}, "['iou'] are not"),
                               ({"perception_tag": "perception", "perception_rewards": ["test_perception_red",
                                                                                       "choice"]}, "keep at least")]:
        config["stages"][0]["algorithm"] = algorithm
        path.write_text(yaml.safe_dump(config))
        capsys.readouterr()
        assert main(["train", str(path)]) == 2
        assert message in capsys.readouterr().err
