"""The GRPO stage: sample G completions per prompt, score them, and push the policy towards the
better ones with the clipped surrogate (math in ``vlreason.rl``).

One step (``GRPOTrainer.step``):

1. draw B prompts and encode each with its images once;
2. sample G completions per prompt from the rollout engine;
3. score them with every reward (an N x R table, NaN = not applicable);
4. combine the rewards (weighted, NaN-aware) and normalise within each group; with dynamic
   sampling, drop zero-variance groups and refill from the next prompts;
5. log-probs of the sampled tokens under the sampling policy (stored when mu > 1) and under the
   frozen reference (when beta > 0; for LoRA the base model with the adapters switched off);
6. mu times: policy log-probs with gradients, loss, backward (micro-batch by micro-batch, under
   the whole batch's normaliser), skip the update if the loss or the gradient is not finite,
   clip, optimizer step;
7. log, dump rollouts, checkpoint; the learning-rate schedule advances once per step (not once
   per update), so mu > 1 keeps the schedule of ``optim.max_steps`` steps.

Every prompt is run once for its G completions (``vlreason.models.prefix``), in sampling as in
the log-prob passes, and the vocabulary logits exist only ``optim.logprob_chunk`` positions at
a time. Passes run in the model's compute dtype under autocast, on the model's device.
Checkpoints hold the trainable weights, optimizer, scheduler, prompt order position, step and
RNG state, so ``resume`` continues the same run exactly; one is also written at the end, so a
finished run can be continued to a larger ``optim.max_steps``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import BatchFeature, get_scheduler

from vlreason.config import StageConfig, final_checkpoint
from vlreason.models.prefix import completion_hidden, completion_logprobs, full_hidden
from vlreason.rewards.scoring import RewardScorer
from vlreason.rl import combine_rewards, overlong_penalty, policy_loss
from vlreason.rollout.engine import SamplingParams, build_engine
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
from vlreason.training.interrupt import TrainingInterrupted, catch_interrupt
from vlreason.training.metrics import MetricsLog, keep_steps_upto, plot_curves, read_metrics, stage_metrics_log
from vlreason.training.model_setup import autocast, enable_activation_checkpointing, prepare_model, save_final
from vlreason.training.preflight import StageInputs, fit_length, stage_inputs
from vlreason.training.rollouts import GroupBatch, GroupSampler, PromptStream, SampledBatch, reward_stats
from vlreason.training.sft import StageResult

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


@dataclass
class UpdateStats:
    loss: float
    grad_norm: float
    clip_fraction: float
    kl: float
    entropy: float
    skipped: bool


def run_grpo(stage: StageConfig, resume: bool = False, inputs: StageInputs | None = None) -> StageResult:
    """Train ``stage`` (kind ``grpo``) and save ``output_dir/final``."""
    trainer = GRPOTrainer(stage, inputs)
    if resume:
        trainer.resume()
    return trainer.train()


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
        inputs = inputs or stage_inputs(stage)
        self.out = Path(stage.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.vlm = prepare_model(stage.model, stage.seed)
        self.model = self.vlm.model
        samples = fit_length(self.vlm, inputs.samples, stage)
        self.stream = PromptStream(samples, stage.seed)
        self.data_fingerprint = data_fingerprint(samples)
        self.reference = self._reference_model()
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        if stage.optim.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
            logger.info("gradient checkpointing: the gradient pass runs prompt + completion per completion "
                        "(no shared prompt cache); sampling and the no-gradient passes keep the shared prefix")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=stage.optim.learning_rate,
                                           weight_decay=stage.optim.weight_decay)
        self.scheduler = get_scheduler(stage.optim.scheduler.value, self.optimizer,
                                       num_warmup_steps=stage.optim.warmup_steps,
                                       num_training_steps=stage.optim.max_steps)
        rollout, algorithm = stage.rollout, stage.algorithm
        scorer = RewardScorer(inputs.rewards, algorithm.on_reward_error, timeout_s=algorithm.reward_timeout_s)
        self.sampler = GroupSampler(
            self.vlm, build_engine(rollout.engine, self.vlm), scorer,
            torch.tensor([spec.weight for spec in stage.rewards.values()]), sorted(inputs.columns),
            rollout.num_generations, SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p,
                                                    max_new_tokens=rollout.max_new_tokens),
            stage.algorithm.scale_rewards, time.perf_counter, self._length_penalty())
        self.step_count = 0
        self.bad_in_row = 0
        self.train_seconds = 0.0
        self.resumed_from: int | None = None
        self.saved_step: int | None = None

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> StageResult:
        """Run steps until ``optim.max_steps`` (or the time budget); Ctrl-C saves a checkpoint and
        raises ``TrainingInterrupted``. Returns the final model's path and what was done."""
        optim = self.stage.optim
        metrics = stage_metrics_log(self.stage, resume_step=self.resumed_from)
        keep_steps_upto(self.out / "rollouts.jsonl", self.resumed_from or 0)  # steps about to run again
        bar = tqdm(total=optim.max_steps, initial=self.step_count, desc=f"grpo {self.stage.name}",
                   disable=not self.stage.logging.progress, unit="step", dynamic_ncols=True)
        try:
            with catch_interrupt() as interrupt:
                while self.step_count < optim.max_steps and not self._out_of_time():
                    self._run_step(metrics, bar)
                    if interrupt.requested:
                        raise TrainingInterrupted(self.stage.name, self.step_count, self.checkpoint_now())
        finally:
            bar.close()
            metrics.close()
        self.checkpoint_now()  # so that a larger max_steps can continue this run
        final = save_final(self.vlm, final_checkpoint(self.out))
        write_stage_record(self.out, self.step_count, self.train_seconds)
        self.plot()
        return StageResult(final_path=final, steps=self.step_count, seconds=self.train_seconds)

    def _run_step(self, metrics: MetricsLog, bar: tqdm) -> None:
        started = time.perf_counter()
        values = self.step()
        self.train_seconds += time.perf_counter() - started
        values["time/step"] = time.perf_counter() - started
        values["memory/peak_mb"] = peak_memory_mb(next(self.model.parameters()).device)
        self.step_count += 1
        if self.step_count % self.stage.logging.log_every == 0:
            metrics.write(self.step_count, values)
        bar.update(1)
        shown = {"reward": f"{values['reward/total']:.3f}"}
        if self.stage.algorithm.beta > 0:
            shown["kl"] = f"{values['kl']:.4f}"
        bar.set_postfix(shown)
        if self.stage.save.every and self.step_count % self.stage.save.every == 0:
            self.save_checkpoint()

    def step(self) -> dict[str, Any]:
        """One GRPO step (numbered as in the module docstring); returns what to log."""
        algorithm = self.stage.algorithm
        self.model.eval()
        # steps 1-4: prompts -> completions -> rewards -> advantages (with dynamic sampling)
        with autocast(self.model):
            batch = self.sampler.sample(self.stream, self.stage.optim.batch_size, self.stage.seed * 100003 +
                                        self.step_count, algorithm.dynamic_sampling, algorithm.max_refill_tries)
        if not batch.parts:
            raise TrainingStopped(self._why_no_groups(batch))
        # step 5: log-probs of the sampling policy (only needed when it changes during the step)
        # and of the reference
        train_start = time.perf_counter()
        micros = self._micro_batches(batch)
        masks = [self._loss_mask(micro) for micro in micros]
        old = [self._logprobs(micro, self.model) for micro in micros] if algorithm.num_iterations > 1 else None
        ref = [self._reference_logprobs(micro) for micro in micros] if algorithm.beta > 0 else None
        # step 6: mu policy updates on the same samples, all at this step's learning rate
        self.model.train()
        learning_rate = self.scheduler.get_last_lr()[0]
        updates = [self._update(micros, masks, old, ref) for _ in range(algorithm.num_iterations)]
        self.scheduler.step()
        train_s = time.perf_counter() - train_start
        # step 7: what to log
        if self.stage.logging.rollouts_every and self.step_count % self.stage.logging.rollouts_every == 0:
            self._dump_rollouts(batch)
        return {**self._step_metrics(batch, updates, train_s), "learning_rate": learning_rate}

    def _update(self, micros: list[MicroBatch], masks: list[torch.Tensor], old: list[torch.Tensor] | None,
                ref: list[torch.Tensor] | None) -> UpdateStats:
        """One optimizer step over all groups of the batch (gradients accumulated per micro-batch,
        with the whole batch's normaliser so the result equals one pass over the batch)."""
        algorithm = self.stage.algorithm
        num_sequences = sum(m.shape[0] for m in masks)
        num_tokens = float(sum(m.sum() for m in masks))
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, clip_sum, kl_sum, entropy_sum = 0.0, 0.0, 0.0, 0.0
        for index, micro in enumerate(micros):
            with autocast(self.model):
                logp, entropy = self._completion_logprobs(micro, self.model)
                device = logp.device  # rollouts and masks live on the CPU; the model may not
                mask = masks[index].to(device)
                result = policy_loss(
                    logp, old[index] if old else logp.detach(), micro.part.advantages[micro.rows].to(device), mask,
                    epsilon_low=algorithm.epsilon_low, epsilon_high=algorithm.epsilon_high,
                    aggregation=algorithm.loss_aggregation, max_tokens=self.stage.rollout.max_new_tokens,
                    beta=algorithm.beta, ref_logp=ref[index] if ref else None,
                    num_sequences=num_sequences, num_tokens=num_tokens, importance_level=algorithm.importance_level)
            result.loss.backward()
            share = float(mask.sum()) / max(num_tokens, 1.0)
            loss_sum += float(result.loss.detach())
            clip_sum += float(result.clip_fraction) * share
            kl_sum += float(result.kl) * share
            entropy_sum += float((entropy * mask).sum()) / max(num_tokens, 1.0)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.stage.optim.max_grad_norm))
        skipped = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
        if skipped:
            self._skip_update(loss_sum, grad_norm)
        else:
            self.optimizer.step()
            self.bad_in_row = 0
        return UpdateStats(loss_sum, grad_norm, clip_sum, kl_sum, entropy_sum, skipped)

    def _skip_update(self, loss: float, grad_norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
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
            rows = part.rollouts.completion_ids.shape[0]
            size = self.stage.optim.micro_batch_size or rows
            for start in range(0, rows, size):
                stop = min(start + size, rows)
                first, last = start // group, -(-stop // group)
                inputs = part.prompt_inputs if (first, last) == (0, part.num_prompts) else part.prompt_inputs_of(
                    first, last)
                images = [len(sample.images) for sample in part.samples[first:last]]
                micros.append(MicroBatch(part, slice(start, stop), inputs, min(size, group), images))
        return micros

    def _completion_logprobs(self, micro: MicroBatch, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, T]`` log-probs and entropies of the micro-batch's completions, each prompt run once
        for its completions (with gradient checkpointing, the gradient pass runs it once per
        completion), the vocabulary logits made ``optim.logprob_chunk`` positions at a time."""
        device = next(model.parameters()).device
        rollouts = micro.part.rollouts
        tokens, mask = rollouts.completion_ids[micro.rows].to(device), rollouts.completion_mask[micro.rows].to(device)
        inputs = micro.prompt_inputs.to(device)
        if model.training and self.stage.optim.gradient_checkpointing:  # checkpointed layers keep no KV cache
            hidden = full_hidden(model, inputs, tokens, mask, micro.repeat, micro.images_per_prompt)
        else:
            hidden = completion_hidden(model, inputs, tokens, mask, micro.repeat)
        return completion_logprobs(model, hidden, tokens, self.stage.rollout.temperature,
                                   self.stage.optim.logprob_chunk)

    @torch.no_grad()
    def _logprobs(self, micro: MicroBatch, model: torch.nn.Module) -> torch.Tensor:
        with autocast(model):
            return self._completion_logprobs(micro, model)[0]

    def _reference_logprobs(self, micro: MicroBatch) -> torch.Tensor:
        if self.reference is not None:
            return self._logprobs(micro, self.reference)
        with self.model.disable_adapter():  # LoRA: the reference is the base model, no copy
            return self._logprobs(micro, self.model)

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
        """``[n, T]`` tokens the loss counts: generated tokens through end-of-sequence. With
        ``mask_truncated``, completions cut off at ``max_new_tokens`` are left out entirely
        (they are still scored and logged)."""
        rollouts = micro.part.rollouts
        mask = rollouts.completion_mask[micro.rows].clone()
        if self.stage.algorithm.mask_truncated:
            mask[rollouts.truncated[micro.rows]] = 0
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
            lengths = torch.cat([rollouts.completion_mask.sum(dim=1) for rollouts in batch.all_rollouts])
            shaping["reward/overlong_penalty"] = float(self.sampler.length_penalty(lengths).mean())
        return {
            **shaping,
            "reward/total": float(all_rewards.nanmean()),
            "reward/total_std": float(all_rewards[~all_rewards.isnan()].std()) if all_rewards.numel() > 1 else 0.0,
            "reward/kept_total": float(values.nanmean()),
            **reward_stats(batch.all_tables, batch.all_rollouts),
            "advantages/mean": float(advantages.mean()),
            "advantages/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            "advantages/abs_max": float(advantages.abs().max()),
            "loss": last.loss,
            "grad_norm": last.grad_norm,
            "kl": last.kl,
            "clip_fraction": last.clip_fraction,
            "entropy": last.entropy,
            "skipped_updates": float(sum(u.skipped for u in updates)),
            "groups/sampled": float(batch.sampled_groups),
            "groups/kept": float(batch.kept_groups),
            "groups/draws": float(batch.draws),
            "data/skipped_samples": float(batch.skipped_samples),
            "time/generate": batch.generate_s,
            "time/reward": batch.reward_s,
            "time/train": train_s,
        }

    def _why_no_groups(self, batch: SampledBatch) -> str:
        return (f"step {self.step_count + 1}: dynamic sampling dropped all {batch.sampled_groups} groups of "
                f"{batch.draws} prompt batch(es): within every group all completions got the same reward, so "
                "there is nothing to learn from. The task may be too easy or too hard for the model now; raise "
                "rollout.temperature or rollout.num_generations, use a graded reward (e.g. continuous IoU), "
                "or raise algorithm.max_refill_tries.")

    def _out_of_time(self) -> bool:
        budget = self.stage.optim.time_budget_s
        return budget is not None and self.train_seconds >= budget

    def _dump_rollouts(self, batch: SampledBatch) -> None:
        with (self.out / "rollouts.jsonl").open("a") as handle:
            for part in batch.parts:
                g = self.stage.rollout.num_generations
                for row, text in enumerate(part.rollouts.texts):
                    sample = part.samples[row // g]
                    scores = {n: (None if np.isnan(v) else float(v)) for n, v in zip(
                        part.table.names, part.table.values[row], strict=True)}
                    record = {"step": self.step_count + 1, "id": sample.id, "source": sample.source,
                              "completion": text, "rewards": scores, "advantage": float(part.advantages[row]),
                              "truncated": bool(part.rollouts.truncated[row])}
                    handle.write(json.dumps(record) + "\n")

    def plot(self) -> Path | None:
        records = read_metrics(self.out / "metrics.jsonl")
        if not records:
            return None
        keys = ["reward/total", *(f"reward/{name}" for name in self.stage.rewards)]
        return plot_curves(records, keys, self.out / "reward_curve.png", f"GRPO rewards ({self.stage.name})")

    # ---- checkpoints ------------------------------------------------------------------------

    def checkpoint_now(self) -> Path:
        """The checkpoint of the current step, written unless it already was."""
        if self.saved_step == self.step_count:
            return self.out / f"checkpoint-{self.step_count}"
        return self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically: into a temporary folder, marked complete, then
        renamed into place (see ``vlreason.training.checkpoints``)."""
        path = self.out / f"checkpoint-{self.step_count}"
        tmp = path.with_name(path.name + ".tmp")
        trainable = {name: p.detach().cpu() for name, p in self.model.named_parameters() if p.requires_grad}
        state = {"model": trainable, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "step": self.step_count, "stream": self.stream.state(), "bad_in_row": self.bad_in_row,
                 "train_seconds": self.train_seconds, "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
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
        self.saved_step = self.step_count
        return path

    def resume(self) -> None:
        """Load the newest complete checkpoint of this stage, if there is one."""
        remove_incomplete(self.out)
        path = latest_checkpoint(self.out)
        if path is None:
            return
        check_same_data(path, self.stream.samples, self.stage.data.train)
        state = torch.load(path / STATE_FILE, weights_only=False, map_location="cpu")  # loaded onto the model's device
        missing = set(name for name, p in self.model.named_parameters() if p.requires_grad) - set(state["model"])
        if missing:
            raise ValueError(f"{path} does not match this model/config (missing {len(missing)} trainable tensors, "
                             f"e.g. {sorted(missing)[0]}); resume with the config the run was started with")
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = state["step"]
        self.stream = PromptStream(self.stream.samples, self.stage.seed, **state["stream"])
        self.bad_in_row = state["bad_in_row"]
        self.train_seconds = state["train_seconds"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.resumed_from = self.saved_step = checkpoint_step(path)
