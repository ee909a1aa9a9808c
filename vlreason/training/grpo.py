"""The GRPO stage: sample G completions per prompt, score them, and push the policy towards the
better ones with the clipped surrogate (math in ``vlreason.rl``).

One step (``GRPOTrainer.step``):

1. draw B prompts and encode each with its images once (with tools: their schemas in the system prompt);
2. sample G trajectories per prompt (``rollout.agent.AgentLoop``: the engine's model turns, and
   with ``agent.mode`` set the tool calls and the observations between them);
3. score them with every reward (an N x R table, NaN = not applicable);
4. combine the rewards (weighted, NaN-aware) and normalise within each group; with dynamic
   sampling, drop zero-variance groups and refill from the next prompts;
5. log-probs of the sampled tokens under the sampling policy (stored when mu > 1) and under the
   frozen reference (when beta > 0; for LoRA the base model with the adapters switched off);
6. mu times: policy log-probs with gradients, loss over the model's own tokens (``loss_mask``:
   never observations; the sampler/trainer mismatch measured, and with
   ``algorithm.sampler_is_cap`` each token weighted by its truncated importance weight:
   ``training.mismatch``), backward (micro-batch by micro-batch, under the whole batch's
   normaliser), skip the update if the loss or the gradient is not finite, clip, optimizer step
   (then the engine's ``update_weights``);
7. log, dump rollouts, checkpoint; the learning-rate schedule advances once per step (not once
   per update), so mu > 1 keeps the schedule of ``optim.max_steps`` steps.

Every prompt is run once for its G completions (``vlreason.models.prefix``), in sampling as in
the log-prob passes, and the vocabulary logits exist only ``optim.logprob_chunk`` positions at
a time. Passes run in the model's compute dtype under autocast, on the model's device.
Checkpoints hold the trainable weights, optimizer, scheduler, prompt order position, step and
RNG state, so ``resume`` continues the same run exactly; one is also written at the end, so a
finished run can be continued to a larger ``optim.max_steps``.

With several processes (``vlreason.training.distributed``) each rank samples and scores its share
of the step's prompts (whole groups), the loss normalisers are summed over the ranks and the
gradients too (``vlreason.training.update``: plain data parallelism or DeepSpeed ZeRO), so an
update equals one process's over the global batch. Every rank runs the same number of
forward/backward passes (a rank with fewer micro-batches repeats one with weight 0), which ZeRO-3
needs. The main process gathers what is logged and writes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from PIL import Image
from tqdm import tqdm
from transformers import BatchFeature, TrainerState, get_scheduler

from vlreason.config import ConfigError, StageConfig, final_checkpoint
from vlreason.data.schema import Sample
from vlreason.models.prefix import CompletionScorer
from vlreason.rewards.scoring import RewardScorer
from vlreason.rl import combine_rewards, overlong_penalty, policy_loss
from vlreason.rollout.engine import SamplingParams
from vlreason.training import TrainingStopped
from vlreason.training.checkpoints import (
    check_same_data,
    checkpoint_step,
    data_fingerprint,
    disk_full,
    latest_checkpoint,
    prune_checkpoints,
    remove_incomplete,
    write_marker,
    write_stage_record,
)
from vlreason.training.distributed import processes
from vlreason.training.groups import (
    GroupBatch,
    GroupSampler,
    PerceptionSpans,
    PromptStream,
    SampledBatch,
    TemporalContrast,
    reward_stats,
    stage_loop,
    temporal_stats,
)
from vlreason.training.interrupt import TrainingInterrupted, catch_interrupt
from vlreason.training.metrics import MetricsLog, keep_steps_upto, plot_curves, read_metrics, stage_metrics_log
from vlreason.training.mismatch import SamplerMismatch, sampler_metrics
from vlreason.training.model_setup import (
    autocast,
    enable_activation_checkpointing,
    prepare_model,
    save_final,
    stage_clip_reader,
)
from vlreason.training.preflight import StageInputs, fit_length, stage_inputs
from vlreason.training.sft import StageResult
from vlreason.training.update import build_update
from vlreason.vision.images import ImageLoadError, load_image
from vlreason.vision.video import FrameSampling, VideoError, read_video

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"


@dataclass
class MicroBatch:
    """Completions ``rows`` of one part (a micro-batch), with the encoded prompts they continue."""

    part: GroupBatch
    rows: slice
    prompt_inputs: BatchFeature
    repeat: int  # completions per prompt in this micro-batch
    images_per_prompt: list[int]
    weight: float = 1.0  # 0: a padding pass (the rank has fewer micro-batches than another)


@dataclass
class UpdateStats:
    loss: float
    grad_norm: float
    clip_fraction: float
    kl: float
    entropy: float
    skipped: bool
    # the sampler/trainer mismatch over the model's tokens: mean and max |log-prob difference|,
    # and the mean truncated importance weight (None: the engine returned no log-probs)
    sampler_diff_mean: float | None = None
    sampler_diff_max: float | None = None
    sampler_weight_mean: float | None = None


def _first_frame(path: str) -> Image.Image:
    """The first frame of a video file."""
    return Image.fromarray(read_video(path, FrameSampling(indices=(0,))).frames[0])


def run_grpo(stage: StageConfig, resume: bool = False, inputs: StageInputs | None = None) -> StageResult:
    """Train ``stage`` (kind ``grpo``) and save ``output_dir/final``."""
    trainer = GRPOTrainer(stage, inputs)
    if resume:
        trainer.resume()
    return trainer.train()


def _fresh_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def peak_memory_mb(device: torch.device) -> float:
    """On a GPU, the most memory allocated on ``device`` since the last call (which resets it); on
    the CPU, the process's peak resident set size so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class GRPOTrainer:
    def __init__(self, stage: StageConfig, inputs: StageInputs | None = None):
        """``inputs``: the stage's validated data and rewards (read here when not given)."""
        self.stage = stage
        self.processes = processes()
        inputs = inputs or stage_inputs(stage)
        self.out = Path(stage.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.vlm = prepare_model(stage.model, stage.seed)
        self.model = self.vlm.model
        read_clip = stage_clip_reader(self.vlm, stage)
        samples = fit_length(self.vlm, inputs.samples, stage, inputs.tool_schemas, read_clip)
        self.stream = PromptStream(samples, stage.seed)
        self.data_fingerprint = data_fingerprint(samples)
        if stage.optim.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
            logger.info("gradient checkpointing: the gradient pass runs prompt + completion per completion "
                        "(no shared prompt cache); sampling and the no-gradient passes keep the shared prefix")
        self.scorer = self._scorer(self.model)
        reference = self._reference_model()  # a copy of the starting weights, before any partitioning
        self.update = build_update(self.scorer, stage.optim, self.processes)
        self.reference = self._scorer(self.update.frozen(reference)) if reference is not None else None
        self.optimizer = self.update.optimizer
        self.scheduler = get_scheduler(stage.optim.scheduler.value, self.optimizer,
                                       num_warmup_steps=stage.optim.warmup_steps,
                                       num_training_steps=stage.optim.max_steps)
        rollout, algorithm = stage.rollout, stage.algorithm
        vetoes = {name: spec.veto for name, spec in stage.rewards.items() if spec.veto is not None}
        scorer = RewardScorer(inputs.rewards, algorithm.on_reward_error, timeout_s=algorithm.reward_timeout_s,
                              vetoes=vetoes)
        with self.update.gathered():  # an engine with its own copy (vLLM) starts from the whole weights
            loop = stage_loop(self.vlm, stage, inputs.agent)
        self.engine = loop.engine
        weights, temporal, perception = self._reward_options(inputs)
        self.sampler = GroupSampler(
            self.vlm, loop, scorer, torch.tensor(weights), sorted(inputs.columns),
            rollout.num_generations, SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p,
                                                    max_new_tokens=rollout.max_new_tokens),
            stage.algorithm.scale_rewards, time.perf_counter, self._length_penalty(), self.processes, read_clip,
            temporal, perception)
        self.step_count = 0
        self.bad_in_row = 0
        self.train_seconds = 0.0
        self.resumed_from: int | None = None
        self.saved_step: int | None = None
        self.warned_cut_off = False

    def _reward_options(self, inputs: StageInputs) -> tuple[list[float], TemporalContrast | None,
                                                             PerceptionSpans | None]:
        """The reward table's column weights, T-GRPO's shuffled-frame groups and PA-GRPO's spans,
        as the stage's ``algorithm`` section asks."""
        algorithm, rewards = self.stage.algorithm, self.stage.rewards
        weights = [spec.weight for spec in rewards.values()]
        temporal = perception = None
        if algorithm.temporal_reward is not None:
            name = algorithm.temporal_reward
            temporal = TemporalContrast(name, RewardScorer({name: inputs.rewards[name]}, algorithm.on_reward_error,
                                                           timeout_s=algorithm.reward_timeout_s),
                                        algorithm.temporal_alpha, algorithm.temporal_mu)
            weights.append(1.0)  # the bonus is the table's last column, added as it is
        if algorithm.perception_tag is not None:
            judges = [name in algorithm.perception_rewards for name in rewards]
            judges += [False] * (temporal is not None)  # T-GRPO's bonus judges the answer
            perception = PerceptionSpans(algorithm.perception_tag, torch.tensor(judges))
        return weights, temporal, perception

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> StageResult:
        """Run steps until ``optim.max_steps`` (or the time budget); Ctrl-C saves a checkpoint and
        raises ``TrainingInterrupted``. Returns the final model's path and what was done."""
        optim = self.stage.optim
        main = self.processes.is_main
        metrics = stage_metrics_log(self.stage, resume_step=self.resumed_from) if main else None
        if main:
            keep_steps_upto(self.out / "rollouts.jsonl", self.resumed_from or 0)  # steps about to run again
        bar = tqdm(total=optim.max_steps, initial=self.step_count, desc=f"grpo {self.stage.name}",
                   disable=not (self.stage.logging.progress and main), unit="step", dynamic_ncols=True)
        try:
            with catch_interrupt() as interrupt:
                while self.step_count < optim.max_steps and not self._out_of_time():
                    self._run_step(metrics, bar)
                    # every rank stops at the same step (a signal may reach the ranks in different steps)
                    if self.processes.max([interrupt.requested])[0]:
                        raise TrainingInterrupted(self.stage.name, self.step_count, self.checkpoint_now())
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        self.checkpoint_now()  # so that a larger max_steps can continue this run
        final = final_checkpoint(self.out)
        with self.update.gathered():
            self.processes.on_main(lambda: save_final(self.vlm, final))
        if main:
            write_stage_record(self.out, self.step_count, self.train_seconds)
            self.plot()
        self.processes.barrier()
        return StageResult(final_path=Path(final), steps=self.step_count, seconds=self.train_seconds)

    def _run_step(self, metrics: MetricsLog | None, bar: tqdm) -> None:
        """One step, logged by the main process (``metrics`` is None on the others)."""
        started = time.perf_counter()
        values = self.step()
        self.train_seconds += time.perf_counter() - started
        peak_mb = self.processes.max([peak_memory_mb(next(self.model.parameters()).device)])[0]  # the fullest rank
        self.step_count += 1
        if metrics is not None:
            values["time/step"] = time.perf_counter() - started
            values["memory/peak_mb"] = peak_mb
            self._log_step(metrics, bar, values)
        # after the step's log line: a kill between the two runs the step again from the previous
        # checkpoint (its line is then rewritten); the other order would lose the line for good
        if self.stage.save.every and self.step_count % self.stage.save.every == 0:
            self.save_checkpoint()

    def _log_step(self, metrics: MetricsLog, bar: tqdm, values: dict[str, Any]) -> None:
        """Write the step's metrics (every ``log_every`` steps), warn on cut-off completions and
        advance the progress bar."""
        if self.step_count % self.stage.logging.log_every == 0:
            metrics.write(self.step_count, values)
        self._warn_if_cut_off(values)
        bar.update(1)
        shown = {"reward": f"{values['reward/total']:.3f}"}
        if self.stage.algorithm.beta > 0:
            shown["kl"] = f"{values['kl']:.4f}"
        bar.set_postfix(shown)

    def step(self) -> dict[str, Any]:
        """One GRPO step (numbered as in the module docstring); returns what to log (on the main
        process; an empty dict on the others)."""
        algorithm = self.stage.algorithm
        self.model.eval()
        # steps 1-4: prompts -> completions -> rewards -> advantages (with dynamic sampling)
        with self.update.gathered(), autocast(self.model):
            batch = self.sampler.sample(self.stream, self.stage.optim.batch_size, self.stage.seed * 100003 +
                                        self.step_count, algorithm.dynamic_sampling, algorithm.max_refill_tries,
                                        TrainerState(global_step=self.step_count, max_steps=self.stage.optim.max_steps))
        if batch.kept_groups == 0:
            raise TrainingStopped(self._why_no_groups(batch))
        # step 5: log-probs of the sampling policy (only needed when it changes during the step)
        # and of the reference
        train_start = time.perf_counter()
        micros = self._padded(self._micro_batches(batch), batch)
        masks = [self._loss_mask(micro) for micro in micros]
        old = [self._logprobs(micro, self.scorer) for micro in micros] if algorithm.num_iterations > 1 else None
        ref = [self._reference_logprobs(micro) for micro in micros] if algorithm.beta > 0 else None
        # step 6: mu policy updates on the same samples, all at this step's learning rate
        self.model.train()
        learning_rate = self.scheduler.get_last_lr()[0]
        updates = [self._update(micros, masks, old, ref) for _ in range(algorithm.num_iterations)]
        self.scheduler.step()
        train_s = time.perf_counter() - train_start
        # step 7: what to log, gathered on the main process
        batches = self.processes.gather(batch.for_logging() if self.processes.distributed else batch)
        if not self.processes.is_main:
            return {}
        batch = SampledBatch.merged(batches)
        if self.stage.logging.rollouts_every and self.step_count % self.stage.logging.rollouts_every == 0:
            self._dump_rollouts(batch)
        return {**self._step_metrics(batch, updates, train_s), "learning_rate": learning_rate}

    def _update(self, micros: list[MicroBatch], masks: list[torch.Tensor], old: list[torch.Tensor] | None,
                ref: list[torch.Tensor] | None) -> UpdateStats:
        """One optimizer step over all groups of the batch (gradients accumulated per micro-batch
        and summed over the ranks, with the whole batch's normalisers so the result equals one pass
        over the batch)."""
        algorithm = self.stage.algorithm
        num_sequences, num_tokens = self.processes.sum([
            sum(m.shape[0] for m, micro in zip(masks, micros, strict=True) if micro.weight),
            sum(float(m.sum()) for m, micro in zip(masks, micros, strict=True) if micro.weight)])
        loss_sum, clip_sum, kl_sum, entropy_sum = 0.0, 0.0, 0.0, 0.0
        mismatch = SamplerMismatch(algorithm.sampler_is_cap)
        for index, micro in enumerate(micros):
            with autocast(self.model):
                logp, entropy = self._completion_logprobs(micro, self.update.forward)
                device = logp.device  # rollouts and masks live on the CPU; the model may not
                mask = masks[index].to(device)
                behaviour = old[index] if old else logp.detach()  # the trainer's log-probs at sampling time
                sampled = micro.part.trajectories.logprobs
                weights = mismatch.add(behaviour, None if sampled is None else sampled[micro.rows], mask,
                                       counted=micro.weight > 0)
                result = policy_loss(
                    logp, behaviour, micro.part.advantages_of(micro.rows).to(device), mask,
                    epsilon_low=algorithm.epsilon_low, epsilon_high=algorithm.epsilon_high,
                    aggregation=algorithm.loss_aggregation, max_tokens=self.stage.rollout.max_new_tokens,
                    beta=algorithm.beta, ref_logp=ref[index] if ref else None,
                    num_sequences=num_sequences, num_tokens=num_tokens, importance_level=algorithm.importance_level,
                    sampler_weights=weights)
            self.update.backward(result.loss * micro.weight, last=index == len(micros) - 1)
            share = float(mask.sum()) / max(num_tokens, 1.0) * micro.weight
            loss_sum += float(result.loss.detach()) * micro.weight
            clip_sum += float(result.clip_fraction) * share
            kl_sum += float(result.kl) * share
            entropy_sum += float((entropy * mask).sum()) / max(num_tokens, 1.0) * micro.weight
        loss_sum, clip_sum, kl_sum, entropy_sum = self.processes.sum([loss_sum, clip_sum, kl_sum, entropy_sum])
        grad_norm, applied = self.update.step(self.stage.optim.max_grad_norm, math.isfinite(loss_sum))
        if applied:
            self.bad_in_row = 0
            self.engine.update_weights(self.model)
        else:
            self._skip_update(loss_sum, grad_norm)
        return UpdateStats(loss_sum, grad_norm, clip_sum, kl_sum, entropy_sum, not applied,
                           *mismatch.reduced(self.processes))

    def _skip_update(self, loss: float, grad_norm: float) -> None:
        self.bad_in_row += 1
        logger.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row)",
                       self.step_count + 1, loss, grad_norm, self.bad_in_row)
        if self.bad_in_row >= self.stage.optim.max_bad_steps:
            self.save_checkpoint()
            raise TrainingStopped(
                f"{self.bad_in_row} updates in a row had a non-finite loss or gradient; stopped at step "
                f"{self.step_count} (checkpoint saved, weights are from the last good update). Lower "
                "optim.learning_rate, check the reward values, or use dtype float32/bfloat16 instead of float16.")

    # ---- log-probs --------------------------------------------------------------------------

    def _micro_batches(self, batch: SampledBatch) -> list[MicroBatch]:
        """The batch's completions in runs of ``optim.micro_batch_size`` (whole groups, or a share
        of one group: the config checks that the size is a multiple or a divisor of G)."""
        group = self.stage.rollout.num_generations
        micros = []
        for part in batch.parts:
            rows = len(part.trajectories)
            size = self.stage.optim.micro_batch_size or rows
            for start in range(0, rows, size):
                stop = min(start + size, rows)
                first, last = start // group, -(-stop // group)
                inputs = part.prompt_inputs if (first, last) == (0, part.num_prompts) else part.prompt_inputs_of(
                    first, last)
                images = [len(sample.images) for sample in part.samples[first:last]]
                micros.append(MicroBatch(part, slice(start, stop), inputs, min(size, group), images))
        return micros

    def _padded(self, micros: list[MicroBatch], batch: SampledBatch) -> list[MicroBatch]:
        """``micros`` followed by weight-0 repeats until every rank has as many as the rank with
        the most (ZeRO-3 gathers weights in every pass, so all ranks must run the same passes)."""
        most = int(self.processes.max([len(micros)])[0])
        if len(micros) == most:
            return micros
        filler = micros[0] if micros else self._micro_batches(SampledBatch(parts=[batch.spare]))[0]
        return micros + [replace(filler, weight=0.0)] * (most - len(micros))

    def _completion_logprobs(self, micro: MicroBatch, scorer: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, T]`` log-probs and entropies of the micro-batch's trajectories by ``scorer`` (a
        ``CompletionScorer``, or the update's forward through it)."""
        device = next(self.model.parameters()).device
        continuation = micro.part.trajectories.continuation(micro.rows).to(device)
        return scorer(micro.prompt_inputs.to(device), continuation, micro.repeat, micro.images_per_prompt)

    @torch.no_grad()
    def _logprobs(self, micro: MicroBatch, scorer: CompletionScorer) -> torch.Tensor:
        with autocast(scorer.model):
            return self._completion_logprobs(micro, scorer)[0]

    def _reference_logprobs(self, micro: MicroBatch) -> torch.Tensor:
        if self.reference is not None:
            return self._logprobs(micro, self.reference)
        with self.model.disable_adapter():  # LoRA: the reference is the base model, no copy
            return self._logprobs(micro, self.scorer)

    def _scorer(self, model: torch.nn.Module) -> CompletionScorer:
        """Log-probs by ``model``: each prompt run once for its completions (with gradient
        checkpointing, the gradient pass runs it once per completion), the vocabulary logits made
        ``optim.logprob_chunk`` positions at a time."""
        optim = self.stage.optim
        return CompletionScorer(model, self.stage.rollout.temperature, optim.logprob_chunk,
                                full_forwards=optim.gradient_checkpointing)

    def _length_penalty(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """DAPO's overlong shaping of the total reward, when ``algorithm.overlong_buffer`` > 0."""
        algorithm = self.stage.algorithm
        if algorithm.overlong_buffer == 0:
            return None
        return partial(overlong_penalty, max_tokens=self.stage.rollout.max_new_tokens,
                       buffer=algorithm.overlong_buffer, factor=algorithm.overlong_penalty)

    def _reference_model(self) -> torch.nn.Module | None:
        """A frozen copy of the starting policy when beta > 0 (not needed for LoRA)."""
        if self.stage.algorithm.beta == 0 or isinstance(self.model, PeftModel):
            return None
        reference = copy.deepcopy(self.model).eval()
        reference.requires_grad_(False)
        return reference

    def _loss_mask(self, micro: MicroBatch) -> torch.Tensor:
        """``[n, T]`` tokens the loss counts: the tokens the model wrote (each turn through its
        end-of-sequence; never observations). With ``mask_truncated``, trajectories whose last turn
        ran out of tokens are left out entirely (they are still scored and logged)."""
        trajectories = micro.part.trajectories
        mask = trajectories.loss_mask[micro.rows].clone()
        if self.stage.algorithm.mask_truncated:
            mask[trajectories.truncated[micro.rows]] = 0
        return mask

    # ---- bookkeeping ------------------------------------------------------------------------

    def _step_metrics(self, batch: SampledBatch, updates: list[UpdateStats], train_s: float) -> dict[str, Any]:
        last = updates[-1]
        values = torch.cat([part.rewards for part in batch.parts])
        all_rewards = combine_rewards(torch.from_numpy(np.concatenate([t.values for t in batch.all_tables])).float(),
                                      self.sampler.weights)
        advantages = torch.cat([part.advantages for part in batch.parts])
        shaping = {}
        if self.sampler.length_penalty is not None:
            lengths = torch.cat([trajectories.lengths for trajectories in batch.all_trajectories])
            shaping["reward/overlong_penalty"] = float(self.sampler.length_penalty(lengths).mean())
        return {
            **shaping,
            "reward/total": float(all_rewards.nanmean()),
            "reward/total_std": float(all_rewards[~all_rewards.isnan()].std()) if all_rewards.numel() > 1 else 0.0,
            "reward/kept_total": float(values.nanmean()),
            **reward_stats(batch.all_tables, batch.all_trajectories, self.sampler.loop.tool_names),
            "advantages/mean": float(advantages.mean()),
            "advantages/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            "advantages/abs_max": float(advantages.abs().max()),
            "loss": last.loss,
            "grad_norm": last.grad_norm,
            "kl": last.kl,
            "clip_fraction": last.clip_fraction,
            "entropy": last.entropy,
            "skipped_updates": float(sum(u.skipped for u in updates)),
            # the first update's mismatch is the sampler's against the weights it sampled with; an
            # engine that syncs weights says how long the last push took
            **sampler_metrics(updates[0].sampler_diff_mean, updates[0].sampler_diff_max,
                              updates[0].sampler_weight_mean, getattr(self.engine, "sync_s", None)),
            "groups/sampled": float(batch.sampled_groups),
            "groups/kept": float(batch.kept_groups),
            "groups/draws": float(batch.draws),
            "data/skipped_samples": float(batch.skipped_samples),
            "time/generate": batch.generate_s,
            "time/tools": batch.tools_s,
            "time/reward": batch.reward_s,
            "time/train": train_s,
            **temporal_stats(batch.temporal),
        }

    def _warn_if_cut_off(self, values: dict[str, Any]) -> None:
        """Say so (once) when most trajectories of a step ran out of tokens in a turn: their
        answers are unreadable and their rewards mean little (a tool call alone can take most of
        a small budget)."""
        if values["stops/token_budget"] > 0.5 and not self.warned_cut_off:
            self.warned_cut_off = True
            logger.warning("step %d: %.0f%% of the trajectories ran out of tokens in a turn (rollout.max_new_tokens=%d"
                           " per turn); raise it if the completions in rollouts.jsonl are cut off mid-answer",
                           self.step_count, 100 * values["stops/token_budget"], self.stage.rollout.max_new_tokens)

    def _why_no_groups(self, batch: SampledBatch) -> str:
        return (f"step {self.step_count + 1}: dynamic sampling dropped all {batch.sampled_groups} groups of "
                f"{batch.draws} prompt batch(es): within every group all completions got the same reward, so "
                "there is nothing to learn from. The task may be too easy or too hard for the model now; raise "
                "rollout.temperature or rollout.num_generations, use a graded reward (e.g. continuous IoU), "
                "or raise algorithm.max_refill_tries.")

    def _out_of_time(self) -> bool:
        """Whether the time budget is spent (by the slowest rank: all ranks stop together)."""
        budget = self.stage.optim.time_budget_s
        return budget is not None and self.processes.max([self.train_seconds])[0] >= budget

    def _dump_rollouts(self, batch: SampledBatch) -> None:
        """One line per trajectory: its final turn, rewards, advantage, how it stopped and its
        prompt's images (``media``: thumbnails kept in the run folder, so a viewer needs nothing
        outside it); with several turns also every model turn's text and the tool calls."""
        g = self.stage.rollout.num_generations
        decode = self.sampler.loop.decode
        with (self.out / "rollouts.jsonl").open("a") as handle:
            for part in batch.parts:
                trajectories = part.trajectories
                for row, text in enumerate(trajectories.texts):
                    sample = part.samples[row // g]
                    scores = {n: (None if np.isnan(v) else float(v)) for n, v in zip(
                        part.table.names, part.table.values[row], strict=True)}
                    record = {"step": self.step_count + 1, "id": sample.id, "source": sample.source,
                              "completion": text, "rewards": scores, "advantage": float(part.advantages[row]),
                              "truncated": bool(trajectories.truncated[row]), "stop": trajectories.stops[row].value,
                              "media": self._thumbnails(sample)}
                    if len(trajectories.turns[row]) > 1 or trajectories.tool_calls[row]:
                        ids = trajectories.ids[row].tolist()
                        record["turns"] = [decode(ids[start:stop]) for start, stop in trajectories.turns[row]]
                        record["tool_calls"] = trajectories.tool_calls[row]
                    handle.write(json.dumps(record) + "\n")

    def _thumbnails(self, sample: Sample) -> list[str]:
        """The sample's images, and the first frame of each of its videos, as 256 px thumbnails
        under ``media/`` (written once; paths relative to the stage folder; media that no longer
        load are left out)."""
        stem = f"media/{hashlib.sha1(sample.id.encode()).hexdigest()[:16]}"
        sources = [(f"{stem}_{i}.jpg", load_image, source) for i, source in enumerate(sample.images)]
        sources += [(f"{stem}_v{i}.jpg", _first_frame, source) for i, source in enumerate(sample.videos)]
        names = []
        for name, load, source in sources:
            path = self.out / name
            if not path.is_file():
                try:
                    image = load(source)
                except (ImageLoadError, VideoError):
                    continue
                path.parent.mkdir(exist_ok=True)
                image.thumbnail((256, 256))
                partial = path.with_suffix(".part")
                image.save(partial, format="JPEG", quality=90)
                partial.replace(path)  # a kill mid-write leaves no half thumbnail under the final name
            names.append(name)
        return names

    def plot(self) -> Path | None:
        records = read_metrics(self.out / "metrics.jsonl")
        if not records:
            return None
        keys = ["reward/total", *(f"reward/{name}" for name in self.stage.rewards)]
        if self.stage.algorithm.temporal_reward is not None:
            keys += ["reward/temporal", "temporal/ordered_accuracy", "temporal/shuffled_accuracy"]
        return plot_curves(records, keys, self.out / "reward_curve.png", f"GRPO rewards ({self.stage.name})")

    # ---- checkpoints ------------------------------------------------------------------------

    def checkpoint_now(self) -> Path:
        """The checkpoint of the current step, written unless it already was."""
        if self.saved_step == self.step_count:
            return self.out / f"checkpoint-{self.step_count}"
        return self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically: into a temporary folder, marked complete, then
        renamed into place (see ``vlreason.training.checkpoints``). Every rank adds its part
        (its RNG state; with DeepSpeed its shards); the main process writes the rest and renames."""
        path = self.out / f"checkpoint-{self.step_count}"
        tmp = path.with_name(path.name + ".tmp")
        self.processes.on_main(lambda: _fresh_folder(tmp))
        try:
            entries = self.update.save(tmp)
        except OSError as exc:
            raise (disk_full(exc, tmp) or exc) from exc
        rng = self.processes.gather({"torch": torch.get_rng_state(),
                                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
        state = {**entries, "scheduler": self.scheduler.state_dict(), "step": self.step_count,
                 "stream": self.stream.state(), "bad_in_row": self.bad_in_row, "train_seconds": self.train_seconds,
                 "rng": rng, "world_size": self.processes.world_size}
        self.processes.on_main(lambda: self._write_checkpoint(state, tmp, path))
        self.saved_step = self.step_count
        return path

    def _write_checkpoint(self, state: dict[str, Any], tmp: Path, path: Path) -> None:
        try:
            torch.save(state, tmp / STATE_FILE)
            with (tmp / STATE_FILE).open("rb") as handle:
                os.fsync(handle.fileno())
            write_marker(tmp, {"step": self.step_count, "data": self.data_fingerprint})
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise (disk_full(exc, tmp) or exc) from exc
        prune_checkpoints(self.out, self.stage.save.keep)

    def resume(self) -> None:
        """Load the newest complete checkpoint of this stage, if there is one (every rank)."""
        self.processes.on_main(lambda: remove_incomplete(self.out))
        path = latest_checkpoint(self.out)
        if path is None:
            return
        check_same_data(path, self.stream.samples, self.stage.data.train)
        state = torch.load(path / STATE_FILE, weights_only=False, map_location="cpu")  # loaded onto the model's device
        saved_world = state.get("world_size", 1)
        if saved_world != self.processes.world_size and self.stage.optim.deepspeed:
            raise ConfigError(f"{path} was written by {saved_world} process(es); DeepSpeed resumes its partitions "
                              f"only with as many (this run has {self.processes.world_size})")
        self.update.load(path, state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = state["step"]
        self.stream = PromptStream(self.stream.samples, self.stage.seed, **state["stream"])
        self.bad_in_row = state["bad_in_row"]
        self.train_seconds = state["train_seconds"]
        rng = state["rng"][min(self.processes.rank, len(state["rng"]) - 1)]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.resumed_from = self.saved_step = checkpoint_step(path)
