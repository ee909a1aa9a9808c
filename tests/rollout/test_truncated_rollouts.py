"""Rollout -> reward: completions the engine cut off at ``max_new_tokens`` are scored by GRPO's
sampler as having no answer (the scripted engine cuts them exactly as the HF engine would)."""

from __future__ import annotations

import time

import torch

from vlreason.data.jsonl import read_jsonl
from vlreason.data.synth import synthesize
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rewards import RewardScorer, get_reward
from vlreason.rl import AdvantageScale
from vlreason.rollout import AgentLoop, SamplingParams, ScriptedEngine
from vlreason.training.groups import GroupSampler, PromptStream

WHOLE_IMAGE = "[0, 0, 56, 56]"


def test_group_sampler_gives_cut_off_completions_no_answer(tmp_path) -> None:
    data = read_jsonl(synthesize("grounding", tmp_path, n=1, seed=0, image_size=56, progress=False))
    vlm = build_tiny_vlm("tiny-qwen2.5-vl", seed=0)
    # the same box twice: once closed, once as the start of junk that runs past the token limit
    texts = [f"<answer>{WHOLE_IMAGE}</answer>", f"{WHOLE_IMAGE} " * 8]
    sampler = GroupSampler(vlm, AgentLoop(vlm, ScriptedEngine(vlm, texts)), RewardScorer({"iou": get_reward("iou")}),
                           weights=torch.ones(1), data_columns=sorted(data.columns), group_size=2,
                           sampling=SamplingParams(max_new_tokens=24), scale=AdvantageScale.GROUP,
                           clock=time.perf_counter)
    batch = sampler.sample(PromptStream(data.samples, seed=0), 1, seed=0, dynamic=False, max_refills=0)
    part = batch.parts[0]
    assert part.trajectories.truncated.tolist() == [False, True]
    assert part.trajectories.texts[1].startswith(WHOLE_IMAGE)  # the cut-off text still holds the box
    iou = part.table.column("iou")
    assert iou[0] > 0  # the whole image overlaps the target
    assert iou[1] == 0.0  # no answer, so no box
