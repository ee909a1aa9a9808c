"""Sparse-to-dense frame scaling at evaluation (Video-RTS): answer from few frames when the model
is sure, from more when it is not.

Each sample is first answered ``votes`` times (sampled at ``temperature``) from the sparsest
frame budget (the first ``ClipReader``). When every vote gives the same answer, that answer
stands; otherwise the sample is answered again from the next, denser budget, up to the last,
where the majority of the votes decides (a tie: the answer voted first). Samples without videos
are decided in the first round. Answers are compared by the option they pick (``choices``) or
as normalised text. The report holds the task's metrics on the decided completions (one per
sample) plus ``mean_frames`` (frames per video at the decision), ``mean_rounds`` and
``decided_at/<frames>`` (the share of samples decided at each budget).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlreason.data.batch import load_sample_media
from vlreason.data.jsonl import read_jsonl
from vlreason.data.schema import Sample
from vlreason.eval.evaluate import EvalReport, Metrics, metric_rewards, score_predictions
from vlreason.models.vlm import VLM
from vlreason.rewards.answers import choice_index, normalise
from vlreason.rewards.parsing import extract_answer
from vlreason.rollout.agent import AgentLoop
from vlreason.rollout.engine import SamplingParams, encode_prompts
from vlreason.rollout.hf import HFEngine
from vlreason.vision.video import ClipReader


@dataclass
class Decision:
    """How one sample was answered: the chosen completion, whether it was cut off, the box
    decoder of its images, the round that decided it and the frames per video then."""

    text: str
    truncated: bool
    decoder: Any
    round: int
    frames: float | None  # mean frames over the sample's videos; None without videos


def answer_key(text: str, truncated: bool, sample: Sample) -> Any:
    """What two votes must share to agree: the option picked (``choices``), else the normalised
    answer text; None when the completion has no answer."""
    answer = extract_answer(text, truncated)
    if answer is None:
        return None
    return choice_index(answer, sample.choices) if sample.choices else normalise(answer)


def vote(keys: Sequence[Any]) -> tuple[int, bool]:
    """The index of the vote to keep (the first vote for the most common answer; ties: the answer
    voted first) and whether all votes agree on an answer."""
    answered = [key for key in keys if key is not None]
    if not answered:
        return 0, False
    counts = Counter(answered)
    best = max(counts.values())
    winner = next(key for key in answered if counts[key] == best)
    return keys.index(winner), len(answered) == len(keys) and len(counts) == 1


@torch.no_grad()
def evaluate_frame_scaling(vlm: VLM, data_path: str | Path, readers: Sequence[ClipReader], votes: int = 4,
                           temperature: float = 1.0, batch_size: int = 32, max_new_tokens: int = 64,
                           limit: int | None = None, seed: int = 0, progress: bool = True,
                           loop: AgentLoop | None = None, metrics: Metrics | None = None) -> EvalReport:
    """The samples of ``data_path`` answered by sparse-to-dense frame scaling (module docstring).

    Args:
        readers: one per round, sparse to dense (their frame budgets should grow).
        votes: answers sampled per sample and round (>= 2).
        seed: seeds the sampling of every round.
        loop: how to roll out (default: the HF engine, one turn).
        metrics: the metrics to report (``metric_spec``; default: the data's own).
    """
    if votes < 2 or not readers or temperature <= 0:
        raise ValueError(f"frame scaling needs votes >= 2, at least one frame budget and a temperature > 0 (got "
                         f"{votes}, {len(readers)}, {temperature})")
    samples = read_jsonl(data_path).samples[:limit]
    if not samples:
        raise ValueError(f"{data_path}: no samples to evaluate")
    metric_rewards(samples, str(data_path), metrics)  # a metric the data cannot give fails before generating
    loop = loop or AgentLoop(vlm, HFEngine(vlm))
    vlm.model.eval()
    decided: dict[int, Decision] = {}
    for start in tqdm(range(0, len(samples), batch_size), desc="eval (frame scaling)", unit="batch",
                      disable=not progress):
        pending = list(range(start, min(start + batch_size, len(samples))))
        for round_index, reader in enumerate(readers):
            last = round_index == len(readers) - 1
            params = SamplingParams(n=votes, temperature=temperature, max_new_tokens=max_new_tokens,
                                    seed=seed * 1000 + round_index)
            pending = _round(vlm, loop, samples, pending, reader, params, round_index, last, decided)
            if not pending:
                break
    order = sorted(decided)
    kept = [samples[i] for i in order]
    report = score_predictions(str(data_path), kept, [decided[i].text for i in order],
                               [decided[i].decoder for i in order], [decided[i].truncated for i in order],
                               metrics=metrics)
    report.metrics |= scaling_metrics([decided[i] for i in order], readers)
    return report


def _round(vlm: VLM, loop: AgentLoop, samples: list[Sample], pending: list[int], reader: ClipReader,
           params: SamplingParams, round_index: int, last: bool, decided: dict[int, Decision]) -> list[int]:
    """Answer the ``pending`` samples ``params.n`` times from ``reader``'s frames; record those
    decided; return those still open (a sample whose media fail to load is dropped, as evaluation does)."""
    by_id = {id(samples[i]): i for i in pending}
    batch, media, _ = load_sample_media([samples[i] for i in pending], reader)
    if not batch:
        return []
    prompts = encode_prompts(vlm, [s.prompt_messages for s in batch], media, loop.tool_schemas)
    trajectories = loop.run(prompts, params)
    still_open = []
    for row, (sample, sample_media, infos) in enumerate(zip(batch, media, prompts.infos, strict=True)):
        rows = range(row * params.n, (row + 1) * params.n)
        keys = [answer_key(trajectories.texts[r], bool(trajectories.truncated[r]), sample) for r in rows]
        chosen, agree = vote(keys)
        index = by_id[id(sample)]
        if agree or last or not sample_media.clips:
            frames = float(np.mean([len(c.indices) for c in sample_media.clips])) if sample_media.clips else None
            r = rows[chosen]
            decided[index] = Decision(trajectories.texts[r], bool(trajectories.truncated[r]),
                                      vlm.box_decoder(infos), round_index, frames)
        else:
            still_open.append(index)
    return still_open


def scaling_metrics(decisions: Sequence[Decision], readers: Sequence[ClipReader]) -> dict[str, float]:
    """``mean_frames`` (over samples with videos), ``mean_rounds`` and ``decided_at/<max_frames>``."""
    frames = [d.frames for d in decisions if d.frames is not None]
    metrics = {"mean_rounds": float(np.mean([d.round + 1 for d in decisions])) if decisions else 0.0}
    if frames:
        metrics["mean_frames"] = float(np.mean(frames))
    for index, reader in enumerate(readers):
        share = float(np.mean([d.round == index for d in decisions])) if decisions else 0.0
        metrics[f"decided_at/{reader.sampling.max_frames}"] = share
    return metrics
