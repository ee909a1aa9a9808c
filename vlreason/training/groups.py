"""Sampling and scoring one GRPO batch: prompts -> G trajectories each -> rewards -> advantages.

A ``GroupBatch`` holds everything the update needs for B' prompts: their encoded inputs, the
N = B' * G trajectories (one model turn each, or with tools several, with the observations
between them), the reward table and the advantages. With dynamic sampling the groups
whose rewards are all equal carry no signal and are dropped; the batch is then refilled from the
next prompts, a bounded number of times.

With several processes every rank draws the same prompts (the stream and the image checks are
the same everywhere) and samples, scores and keeps its contiguous share of them; the counts that
decide the loop (groups kept) and the batch-wide reward std are summed over the ranks, so every
rank runs the same draws and one process would have sampled the same completions.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature

from vlreason.config import StageConfig
from vlreason.data.batch import Media, load_sample_media
from vlreason.data.schema import Sample
from vlreason.models.vlm import VLM
from vlreason.rewards.scoring import RewardScorer, RewardTable, reward_columns
from vlreason.rl import AdvantageScale, combine_rewards, group_advantages, temporal_bonus, zero_variance_groups
from vlreason.rollout.agent import Agent, AgentLoop
from vlreason.rollout.engine import SamplingParams, StopReason, Trajectories, build_engine, encode_prompts
from vlreason.training import TrainingStopped
from vlreason.training.distributed import Processes
from vlreason.vision.images import ImageInfo
from vlreason.vision.video import ClipReader, shuffle_frames

logger = logging.getLogger(__name__)


def stage_loop(vlm: VLM, stage: StageConfig, agent: Agent | None) -> AgentLoop:
    """The stage's rollouts: its engine (``rollout.engine`` with ``rollout.engine_options``) and
    ``agent`` within the ``agent`` section's budgets (GRPO and evaluation alike)."""
    engine = build_engine(stage.rollout.engine, vlm, **stage.rollout.engine_options)
    budgets = stage.agent
    return AgentLoop(vlm, engine, agent, budgets.max_turns, budgets.max_images, budgets.max_tokens,
                     budgets.memory_window)


class PromptStream:
    """Training samples in a reshuffled order every epoch, resumable from ``(epoch, cursor)``."""

    def __init__(self, samples: Sequence[Sample], seed: int, epoch: int = 0, cursor: int = 0):
        if not samples:
            raise ValueError("no training prompts")
        self.samples = list(samples)
        self.seed = seed
        self.epoch = epoch
        self.cursor = cursor
        self._order = self._shuffled(epoch)

    def take(self, n: int) -> list[Sample]:
        """The next ``n`` samples, crossing into the next epoch when this one runs out."""
        out = []
        while len(out) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.samples[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order


@dataclass
class GroupBatch:
    """B' prompts and their G completions each, scored (rows grouped by prompt)."""

    samples: list[Sample]
    prompt_inputs: BatchFeature
    trajectories: Trajectories
    table: RewardTable  # [N, R]
    rewards: torch.Tensor  # [N] weighted total, NaN where no reward applies
    advantages: torch.Tensor  # [N] (with PA-GRPO: of the rewards outside the perception span)
    token_advantages: torch.Tensor | None = None  # [N, T] PA-GRPO's per token (T: the trajectories' width)

    @property
    def num_prompts(self) -> int:
        return len(self.samples)

    def advantages_of(self, rows: slice) -> torch.Tensor:
        """What the loss weighs ``rows``' tokens by: ``[n, T]`` per token with PA-GRPO, else ``[n]``."""
        return (self.advantages if self.token_advantages is None else self.token_advantages)[rows]

    def prompt_inputs_of(self, first: int, last: int) -> BatchFeature:
        """The encoded inputs of prompts ``first .. last - 1`` alone: their rows of the text
        tensors (``[B, L]``) and their images' and videos' rows of the pixel tensors."""
        inputs = {key: self.prompt_inputs[key][first:last] for key in ("input_ids", "attention_mask",
                                                                        "mm_token_type_ids")}
        images = [len(sample.images) for sample in self.samples]
        videos = [len(sample.videos) for sample in self.samples]
        inputs |= _media_rows(self.prompt_inputs, images[:first], images[first:last], "pixel_values",
                              ("image_grid_thw",))
        inputs |= _media_rows(self.prompt_inputs, videos[:first], videos[first:last], "pixel_values_videos",
                              ("video_grid_thw", "second_per_grid_ts"))
        return BatchFeature(inputs)


def _media_rows(inputs: BatchFeature, before: list[int], own: list[int], pixels: str,
                per_item: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Some prompts' share of one medium's tensors: its rows of ``pixels`` and of the per-item
    tensors (``per_item``, the first of which is the ``[N, 3]`` grid), given the item counts of
    the prompts ``before`` them and their ``own``; empty when the batch has none of that medium."""
    grid = per_item[0]
    if grid not in inputs:
        return {}
    start, stop = sum(before), sum(before) + sum(own)
    patches = inputs[grid].prod(dim=-1).tolist()  # [N] rows of the pixel tensor per item
    rows = {pixels: inputs[pixels][sum(patches[:start]):sum(patches[:stop])]}
    return rows | {key: inputs[key][start:stop] for key in per_item if key in inputs}


@dataclass
class TemporalContrast:
    """Video-R1's T-GRPO: each prompt is sampled a second time on shuffled frames (the same
    sampling seed, so the two groups differ by frame order alone) and ``rl.temporal_bonus`` pays
    correct ordered completions when order helped. Only the ordered group is trained on."""

    reward: str  # the reward that scores 1 for a correct answer
    scorer: RewardScorer  # that reward alone, for the shuffled group
    alpha: float = 0.3
    mu: float = 0.8


@dataclass
class PerceptionSpans:
    """VideoP2R's PA-GRPO: the tokens of each completion's ``<tag>...</tag>`` span (``tag_spans``)
    get the group-normalised advantage of the rewards in ``columns`` (those that judge the span),
    the other tokens that of the remaining rewards."""

    tag: str
    columns: torch.Tensor  # [R] bool over the reward table's columns


@dataclass
class SampledBatch:
    """What one step sampled: this process's groups kept for the update, the statistics of all it
    sampled, and the counts over all processes."""

    parts: list[GroupBatch]
    sampled_groups: int = 0  # all processes
    kept_groups: int = 0  # all processes
    draws: int = 0
    skipped_samples: int = 0  # samples whose images failed to load
    all_tables: list[RewardTable] = field(default_factory=list)
    all_trajectories: list[Trajectories] = field(default_factory=list)
    generate_s: float = 0.0  # tool calls and observations included (also in tools_s)
    tools_s: float = 0.0
    reward_s: float = 0.0
    spare: GroupBatch | None = None  # a dropped group, for padding passes when no group was kept here
    # T-GRPO, per prompt with videos: (accuracy in order, accuracy on shuffled frames, bonus paid)
    temporal: list[tuple[float, float, bool]] = field(default_factory=list)

    def for_logging(self) -> SampledBatch:
        """A copy without the encoded prompts (pixels), small enough to gather on the main process."""
        parts = [replace(part, prompt_inputs=BatchFeature(), trajectories=part.trajectories.without_media())
                 for part in self.parts]
        return replace(self, parts=parts, spare=None,
                       all_trajectories=[t.without_media() for t in self.all_trajectories])

    @staticmethod
    def merged(batches: Sequence[SampledBatch]) -> SampledBatch:
        """Every process's batch as one, in rank order (counts over all processes are taken as
        they are; times are the slowest process's)."""
        first = batches[0]
        return replace(first, parts=[p for b in batches for p in b.parts],
                       all_tables=[t for b in batches for t in b.all_tables],
                       all_trajectories=[r for b in batches for r in b.all_trajectories],
                       temporal=[t for b in batches for t in b.temporal],
                       generate_s=max(b.generate_s for b in batches), tools_s=max(b.tools_s for b in batches),
                       reward_s=max(b.reward_s for b in batches),
                       spare=None)


class GroupSampler:
    """Draws prompts, samples G trajectories each, scores them, computes advantages."""

    def __init__(self, vlm: VLM, loop: AgentLoop, scorer: RewardScorer, weights: torch.Tensor,
                 data_columns: Sequence[str], group_size: int, sampling: SamplingParams,
                 scale: AdvantageScale, clock: Callable[[], float],
                 length_penalty: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 processes: Processes | None = None, read_clip: ClipReader | None = None,
                 temporal: TemporalContrast | None = None, perception: PerceptionSpans | None = None):
        """``length_penalty``: ``[N]`` completion lengths -> ``[N]`` added to the total reward
        (DAPO's overlong shaping), or None. ``processes``: the ranks sharing each draw (default: one).
        ``read_clip``: decodes prompts' videos (``VLM.use_video``); data with videos needs it.
        ``temporal``: T-GRPO's shuffled-frame groups (its bonus is the table's last column, so
        ``weights`` has one more entry for it). ``perception``: PA-GRPO's per-span advantages."""
        self.vlm = vlm
        self.loop = loop
        self.scorer = scorer
        self.weights = weights
        self.data_columns = list(data_columns)
        self.group_size = group_size
        self.sampling = sampling
        self.scale = scale
        self.clock = clock
        self.length_penalty = length_penalty
        self.processes = processes or Processes()
        self.read_clip = read_clip
        self.temporal = temporal
        self.perception = perception
        self.trainer_state: Any = None

    def sample(self, stream: PromptStream, batch_size: int, seed: int, dynamic: bool, max_refills: int,
               trainer_state: Any = None) -> SampledBatch:
        """Groups for one update: ``batch_size`` prompts over all processes, or with dynamic
        sampling up to ``batch_size`` prompts whose groups have reward variance, drawing at most
        ``1 + max_refills`` batches of prompts. ``trainer_state`` reaches every reward (as TRL's does)."""
        out = SampledBatch(parts=[])
        self.trainer_state = trainer_state
        draws_allowed = 1 + (max_refills if dynamic else 0)
        while out.kept_groups < batch_size and out.draws < draws_allowed:
            needed = batch_size - out.kept_groups if dynamic else batch_size
            samples, media = self._load_prompts(stream, needed, out)
            out.draws += 1
            share = self.processes.shard(len(samples))
            part = self._sample_share(samples, media, share, seed * 1000 + out.draws, out)
            out.sampled_groups += len(samples)
            if dynamic and part is not None:
                part = self._drop_flat_groups(part, media[share], out)
            if part is not None:
                out.parts.append(part)
            out.kept_groups += int(self.processes.sum([part.num_prompts if part is not None else 0])[0])
        return out

    def _load_prompts(self, stream: PromptStream, n: int, out: SampledBatch) -> tuple[list[Sample], list[Media]]:
        """The next ``n`` prompts whose images and videos load; a sample whose file fails is skipped
        (counted in ``out``) and replaced by the next one, so one broken file never empties a batch.

        Raises:
            TrainingStopped: a whole pass over the data failed to load.
        """
        samples: list[Sample] = []
        media: list[Media] = []
        failed_in_row = 0
        while len(samples) < n:
            kept, loaded, skipped = load_sample_media(stream.take(n - len(samples)), self.read_clip)
            samples += kept
            media += loaded
            out.skipped_samples += skipped
            failed_in_row = 0 if kept else failed_in_row + skipped
            if failed_in_row >= len(stream.samples):
                raise TrainingStopped(f"the media of {failed_in_row} prompts in a row failed to load, as many as the "
                                      "data holds (see the warnings above); check the files with `vlreason data check`")
        return samples, media

    def _sample_share(self, samples: list[Sample], media: list[Media], share: slice, seed: int,
                      out: SampledBatch) -> GroupBatch | None:
        """This process's ``share`` of one draw, sampled, scored and with advantages (None when the
        share is empty). Every process calls this for every draw: the batch std is a collective."""
        g = self.group_size
        part = None
        if share.stop > share.start:
            part = self._sample_part(samples[share], media[share], replace(
                self.sampling, n=g, seed=seed, first_row=share.start * g, total_rows=len(samples) * g), out)
        if self.perception is None:
            advantages = self._advantages(part.rewards if part is not None else torch.empty(0))
            if part is not None:
                part.advantages = advantages
            return part
        inside, outside = self._span_rewards(part) if part is not None else (torch.empty(0), torch.empty(0))
        inside, outside = self._advantages(inside), self._advantages(outside)
        if part is not None:
            spans = tag_spans(part.trajectories, self.vlm.tokenizer, self.perception.tag)  # [N, T]
            part.advantages = outside
            part.token_advantages = torch.where(spans, inside[:, None], outside[:, None])
        return part

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[N]`` group-normalised advantages of this process's ``rewards`` (a collective with
        batch scaling over several processes: every process calls it, with or without rows)."""
        batch_rewards = None
        if self.scale is AdvantageScale.BATCH and self.processes.distributed:
            batch_rewards = torch.cat(self.processes.gather(rewards))
        if not rewards.numel():
            return rewards
        return group_advantages(rewards, self.group_size, self.scale, batch_rewards)

    def _span_rewards(self, part: GroupBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N]`` weighted totals of the rewards that judge the perception span and of the others
        (the overlong penalty, if any, counts against the others)."""
        values, columns = torch.from_numpy(part.table.values).float(), self.perception.columns
        inside = combine_rewards(values[:, columns], self.weights[columns])
        outside = combine_rewards(values[:, ~columns], self.weights[~columns])
        if self.length_penalty is not None:
            outside = outside + self.length_penalty(part.trajectories.lengths)
        return inside, outside

    def _sample_part(self, samples: list[Sample], media: list[Media], sampling: SamplingParams,
                     out: SampledBatch) -> GroupBatch:
        """Steps 1-4 for some prompts (advantages are set by the caller)."""
        # step 1: encode each prompt and its images and videos once
        start = self.clock()
        prompts = encode_prompts(self.vlm, [s.prompt_messages for s in samples], media, self.loop.tool_schemas)
        # step 2: sample G trajectories per prompt (with tools: model turns and observations)
        trajectories = self.loop.run(prompts, sampling)
        out.generate_s += self.clock() - start
        out.tools_s += self.loop.observe_s
        # step 3: score every trajectory with every reward (boxes parsed into original pixels)
        start = self.clock()
        table = self._score(samples, prompts.infos, trajectories)
        out.reward_s += self.clock() - start
        if self.temporal is not None:
            table = table.with_column("temporal", self._temporal_bonus(samples, media, sampling, table, out))
        out.all_tables.append(table)
        out.all_trajectories.append(trajectories)
        # step 4: weighted total reward (advantages: normalised within each group by the caller)
        rewards = combine_rewards(torch.from_numpy(table.values).float(), self.weights)
        if self.length_penalty is not None:
            rewards = rewards + self.length_penalty(trajectories.lengths)  # NaN stays NaN
        return GroupBatch(samples, prompts.inputs, trajectories, table, rewards, torch.zeros_like(rewards))

    def _score(self, samples: list[Sample], infos: list[list[ImageInfo]], trajectories: Trajectories,
               scorer: RewardScorer | None = None) -> RewardTable:
        """Every trajectory scored by ``scorer`` (default: the stage's rewards)."""
        g = self.group_size
        model_ids = [ids[mask.bool()].tolist() for ids, mask in zip(trajectories.ids, trajectories.loss_mask,
                                                                    strict=True)]
        columns = reward_columns(samples, trajectories.texts, self.data_columns, repeat=g,
                                 decoders=[self.vlm.box_decoder(row) for row in infos for _ in range(g)],
                                 truncated=trajectories.truncated.tolist(), completion_ids=model_ids,
                                 trace=trajectories.reward_columns())
        return (scorer or self.scorer)(trajectories.texts, columns, {"trainer_state": self.trainer_state})

    def _temporal_bonus(self, samples: list[Sample], media: list[Media], sampling: SamplingParams,
                        table: RewardTable, out: SampledBatch) -> np.ndarray:
        """``[N]`` T-GRPO bonus of this part's trajectories (NaN for prompts without videos): the
        prompts sampled again with shuffled frames, both groups judged by the temporal reward."""
        temporal, g = self.temporal, self.group_size
        first_prompt = sampling.first_row // g
        shuffled_media = [Media(m.images, [shuffle_frames(clip, f"{sampling.seed}:{first_prompt + i}:{k}")
                                           for k, clip in enumerate(m.clips)]) for i, m in enumerate(media)]
        start = self.clock()
        prompts = encode_prompts(self.vlm, [s.prompt_messages for s in samples], shuffled_media,
                                 self.loop.tool_schemas)
        shuffled = self.loop.run(prompts, sampling)
        out.generate_s += self.clock() - start
        start = self.clock()
        shuffled_table = self._score(samples, prompts.infos, shuffled, temporal.scorer)
        out.reward_s += self.clock() - start
        correct = lambda scores: torch.from_numpy(np.nan_to_num(scores) >= 1.0).view(-1, g)  # noqa: E731
        ordered, on_shuffled = correct(table.column(temporal.reward)), correct(shuffled_table.column(temporal.reward))
        bonus = temporal_bonus(ordered, on_shuffled, temporal.alpha, temporal.mu)  # [B, G]
        has_video = torch.tensor([bool(m.clips) for m in media])
        for p, p_shuffled, paid in zip(ordered.float().mean(1)[has_video].tolist(),
                                       on_shuffled.float().mean(1)[has_video].tolist(),
                                       bonus.sum(1)[has_video].gt(0).tolist(), strict=True):
            out.temporal.append((p, p_shuffled, paid))
        return bonus.masked_fill(~has_video[:, None], float("nan")).flatten().double().numpy()

    def _drop_flat_groups(self, part: GroupBatch, media: list[Media], out: SampledBatch) -> GroupBatch | None:
        """Keep only groups with reward variance (DAPO's dynamic sampling). The kept prompts are
        encoded again, which gives exactly the inputs they were sampled with. A part dropped
        whole is kept as ``out.spare`` (its advantages are all 0)."""
        flat = zero_variance_groups(part.rewards, self.group_size)  # [B']
        if not flat.any():
            return part
        keep = [i for i in range(part.num_prompts) if not flat[i]]
        if not keep:
            out.spare = out.spare or part
            return None
        rows = [i * self.group_size + j for i in keep for j in range(self.group_size)]
        samples = [part.samples[i] for i in keep]
        prompt_inputs, _ = self.vlm.encode([s.prompt_messages for s in samples], [media[i].images for i in keep],
                                           tools=self.loop.tool_schemas, videos=[media[i].clips for i in keep])
        table = RewardTable(part.table.names, part.table.values[rows], part.table.failures)
        token_advantages = part.token_advantages[rows] if part.token_advantages is not None else None
        return GroupBatch(samples, prompt_inputs, part.trajectories.select(rows), table, part.rewards[rows],
                          part.advantages[rows], token_advantages)


def tag_spans(trajectories: Trajectories, tokenizer: Any, tag: str) -> torch.Tensor:
    """``[N, T]`` True on the model-written tokens inside ``<tag>...</tag>`` (tags included; an
    unclosed span runs to the end of the model's text). Each token is decoded on its own and
    a token counts when its text overlaps a span."""
    pattern = re.compile(rf"<{re.escape(tag)}>.*?(?:</{re.escape(tag)}>|\Z)", re.DOTALL)
    spans = torch.zeros_like(trajectories.loss_mask, dtype=torch.bool)
    for row in range(len(trajectories)):
        columns = trajectories.loss_mask[row].nonzero().flatten().tolist()
        pieces = [tokenizer.decode([int(trajectories.ids[row, c])], skip_special_tokens=False) for c in columns]
        lengths = np.array([len(piece) for piece in pieces], dtype=int)
        ends = np.cumsum(lengths)  # [n] where each token's text ends in the joined text
        starts = ends - lengths
        for match in pattern.finditer("".join(pieces)):
            inside = (starts < match.end()) & (ends > match.start())
            spans[row, [c for c, hit in zip(columns, inside, strict=True) if hit]] = True
    return spans


def reward_stats(tables: Sequence[RewardTable], trajectories: Sequence[Trajectories], tool_names: Sequence[str] = ()
                 ) -> dict[str, float]:
    """Per-reward means (over applicable trajectories) and trajectory statistics of everything
    sampled (``tool_names``: see ``tool_stats``)."""
    values = np.concatenate([t.values for t in tables])  # [N, R]
    stats: dict[str, Any] = {}
    for j, name in enumerate(tables[0].names):
        column = values[:, j]
        stats[f"reward/{name}"] = float(np.nanmean(column)) if (~np.isnan(column)).any() else None
        stats[f"reward_failures/{name}"] = float(sum(t.failures.get(name, 0) for t in tables))
    lengths = torch.cat([t.lengths for t in trajectories]).float()
    stats["completions/mean_length"] = float(lengths.mean())
    stats["completions/min_length"] = float(lengths.min())
    stats["completions/max_length"] = float(lengths.max())
    stats["completions/truncated_frac"] = float(torch.cat([t.truncated for t in trajectories]).float().mean())
    stats["completions/empty_frac"] = float(np.mean([not text.strip() for t in trajectories for text in t.texts]))
    return stats | tool_stats(trajectories, tool_names)


def temporal_stats(groups: Sequence[tuple[float, float, bool]]) -> dict[str, float]:
    """T-GRPO's view of a step (``SampledBatch.temporal``): mean accuracy of the video groups in
    frame order and on shuffled frames, and the share of groups whose correct answers got the bonus."""
    if not groups:
        return {}
    ordered, shuffled, paid = zip(*groups, strict=True)
    return {"temporal/ordered_accuracy": float(np.mean(ordered)),
            "temporal/shuffled_accuracy": float(np.mean(shuffled)),
            "temporal/bonus_groups": float(np.mean(paid))}


def tool_stats(trajectories: Sequence[Trajectories], tool_names: Sequence[str] = ()) -> dict[str, float]:
    """Turns per trajectory, how trajectories stopped, images the visual memory window took out
    of view per trajectory, and tool calls per trajectory, overall and per tool (``tool_names``; a
    call naming another tool counts as ``unknown``, one that did not parse as ``malformed``), with
    the share that failed (malformed, unknown, bad arguments, errors)."""
    rows = [row for t in trajectories for row in range(len(t))]
    stops = [stop for t in trajectories for stop in t.stops]
    calls = [call for t in trajectories for row_calls in t.tool_calls for call in row_calls]
    stats = {"turns/mean": float(np.mean([len(spans) for t in trajectories for spans in t.turns])),
             **{f"stops/{reason.value}": stops.count(reason) / len(stops) for reason in StopReason}}
    if not calls:
        return stats
    stats["tools/calls_per_sample"] = len(calls) / len(rows)
    stats["tools/invalid_rate"] = sum(call["error"] is not None for call in calls) / len(calls)
    stats["tools/images_dropped_per_sample"] = sum(len(spans) for t in trajectories for spans in t.hidden) / len(rows)
    for call in calls:
        name = call["name"] if call["name"] in tool_names else "malformed" if call["name"] is None else "unknown"
        stats[f"tools/{name}/calls"] = stats.get(f"tools/{name}/calls", 0.0) + 1
        stats[f"tools/{name}/errors"] = stats.get(f"tools/{name}/errors", 0.0) + (call["error"] is not None)
    return stats
