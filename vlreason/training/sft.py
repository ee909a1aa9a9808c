"""SFT cold start: masked cross-entropy on assistant tokens, with transformers' ``Trainer``.

The loss counts only what the model should learn to write: the content of assistant turns and
their ``<|im_end|>``. System and user text, image pads, tool outputs and padding are labelled
-100. Tool traces are conversations with ``tool`` messages (text and images) between assistant
turns; with ``agent.tools`` set, the system prompt lists the tools' schemas as in GRPO. Boxes
inside reference responses (tool-call arguments included) are in original-image pixels (the data
convention) and are rewritten into the family's own convention before tokenizing, so the model
learns to write boxes the way its family does.

Thought dropout (TON, "Think or Not"): with probability p a response's ``<think>`` block is
replaced by an empty one, teaching the model that thinking may be skipped. Which presentations
drop their thoughts depends only on the seed, the epoch and the sample, so resuming is exact.

Checkpoints are ``Trainer``'s, made safe for resuming by ``StageCallback``: a marker declares a
checkpoint complete once ``Trainer`` has written it (see ``vlreason.training.checkpoints``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from vlreason.config import StageConfig, final_checkpoint
from vlreason.data.batch import Media, load_sample_media
from vlreason.data.schema import Message, Sample, map_assistant_text
from vlreason.models.vlm import VLM
from vlreason.training import TrainingStopped
from vlreason.training.checkpoints import (
    check_same_data,
    checkpoint_step,
    data_fingerprint,
    latest_checkpoint,
    prune_checkpoints,
    read_marker,
    remove_incomplete,
    write_marker,
    write_stage_record,
)
from vlreason.training.distributed import processes
from vlreason.training.interrupt import InterruptFlag, TrainingInterrupted, catch_interrupt
from vlreason.training.metrics import MetricsLog, stage_metrics_log
from vlreason.training.model_setup import (
    compute_dtype,
    load_checkpoint_weights,
    prepare_model,
    save_final,
    stage_clip_reader,
)
from vlreason.training.preflight import StageInputs, fit_length, stage_inputs
from vlreason.training.update import deepspeed_config, whole_weights
from vlreason.vision.video import ClipReader

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
EMPTY_THINK = "<think>\n\n</think>"
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


@dataclass
class StageResult:
    """What a finished stage leaves behind."""

    final_path: Path
    steps: int
    seconds: float  # training time, without loading and saving


def run_sft(stage: StageConfig, resume: bool = False, inputs: StageInputs | None = None) -> StageResult:
    """Train ``stage`` (kind ``sft``) and save ``output_dir/final``.

    ``inputs``: the stage's validated data (read here when not given). With ``resume``, training
    continues from the newest complete checkpoint; one taken at ``optim.max_steps`` (a kill came
    after the last save but before ``final/``) only needs the final model written.
    """
    inputs = inputs or stage_inputs(stage)
    out = Path(stage.output_dir)
    vlm = prepare_model(stage.model, stage.seed)
    reader = stage_clip_reader(vlm, stage)
    samples = fit_length(vlm, inputs.samples, stage, inputs.tool_schemas, reader)
    checkpoint = _resume_point(out, samples, stage) if resume else None
    clock = WallClock(stage.optim.time_budget_s, read_marker(checkpoint)["seconds"] if checkpoint else 0.0)
    collator = SFTCollator(vlm, samples, stage.data.thought_dropout, stage.seed, inputs.tool_schemas, reader)
    if checkpoint is not None and checkpoint_step(checkpoint) >= stage.optim.max_steps:
        load_checkpoint_weights(vlm.model, checkpoint)
        steps = checkpoint_step(checkpoint)
    else:
        steps = _train(stage, vlm, samples, collator, clock, checkpoint)
    final = Path(final_checkpoint(out))
    with whole_weights(vlm.model):
        processes().on_main(lambda: (save_final(vlm, final), write_stage_record(out, steps, clock.elapsed)))
    return StageResult(final_path=final, steps=steps, seconds=clock.elapsed)


def _resume_point(out: Path, samples: list[Sample], stage: StageConfig) -> Path | None:
    processes().on_main(lambda: remove_incomplete(out))
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        check_same_data(checkpoint, samples, stage.data.train)
    return checkpoint


def _train(stage: StageConfig, vlm: VLM, samples: list[Sample], collator: SFTCollator, clock: WallClock,
           checkpoint: Path | None) -> int:
    """Run ``Trainer`` (from ``checkpoint`` when given); returns the steps done. Ctrl-C saves a
    checkpoint and raises ``TrainingInterrupted``."""
    out = Path(stage.output_dir)
    log = stage_metrics_log(stage, checkpoint_step(checkpoint)) if processes().is_main else None
    with catch_interrupt() as interrupt:
        callback = StageCallback(stage, collator, clock, log, data_fingerprint(samples), interrupt)
        trainer = VLTrainer(model=vlm.model, args=training_arguments(stage, vlm.model),
                            train_dataset=SampleList(samples), data_collator=collator, callbacks=[clock, callback])
        trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl, not the terminal
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(QuietProgress())
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            if log is not None:
                log.close()
    step = trainer.state.global_step
    if interrupt.requested:
        raise TrainingInterrupted(stage.name, step, out / f"checkpoint-{step}")
    return step


class VLTrainer(Trainer):
    """``Trainer`` with two fixes for Qwen-VL models.

    * The loss is the mean over every answer token of the global batch, however it is split over
      processes: the models' loss reads ``Trainer``'s global token count, but they declare
      ``accepts_loss_kwargs = False``, so ``Trainer`` would average per-process means instead
      (unequal when processes hold different numbers of tokens).
    * Resuming loads the weights: ``save_pretrained`` writes the hub's key layout (``visual.*``,
      ``model.*``), and ``Trainer``'s own resume loads them without converting the keys back, so
      it loads nothing and warns (transformers#43701); ``from_pretrained`` converts them.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_checkpoint_weights(model or self.model, Path(resume_from_checkpoint))


def training_arguments(stage: StageConfig, model: torch.nn.Module) -> TrainingArguments:
    """``Trainer``'s arguments for ``stage``: on the model's device (``Trainer`` picks a GPU when it
    sees one, so a model on the CPU says so), in its compute dtype (``autocast``)."""
    optim, log = stage.optim, stage.logging
    on_cpu = next(model.parameters()).device.type == "cpu"
    dtype = compute_dtype(model)
    per_rank = processes().per_rank(optim.batch_size, f"stages[{stage.name}].optim.batch_size")
    return TrainingArguments(
        output_dir=stage.output_dir,
        max_steps=optim.max_steps,
        per_device_train_batch_size=per_rank,
        deepspeed=deepspeed_config(optim, dtype, per_rank) if optim.deepspeed else None,
        learning_rate=optim.learning_rate,
        lr_scheduler_type=optim.scheduler.value,
        warmup_steps=optim.warmup_steps,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        logging_steps=log.log_every,
        save_steps=stage.save.every or optim.max_steps,
        save_total_limit=None,  # StageCallback prunes complete checkpoints only, by step
        report_to=[],  # StageCallback writes metrics.jsonl and TensorBoard like the GRPO stage
        disable_tqdm=not log.progress,
        seed=stage.seed,
        remove_unused_columns=False,  # the collator needs whole samples
        dataloader_num_workers=0,
        dataloader_pin_memory=not on_cpu,
        use_cpu=on_cpu,
        **_checkpointing_arguments(optim.gradient_checkpointing),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """``Trainer``'s activation-checkpointing switch under its name in this transformers (renamed
    from ``gradient_checkpointing`` in 5.2x; the old name warns)."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}} if enabled else {}


class SampleList(torch.utils.data.Dataset):
    """Samples as a map-style dataset; the collator does all the work."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


class SFTCollator:
    """Samples -> model inputs with ``labels`` on assistant tokens only.

    Args:
        vlm: the model being trained (its adapter renders, its processor encodes).
        data: the whole training set, in order: a sample whose image fails to load is replaced by
            the next sample of ``data`` that loads (the skip is counted), so batches keep their size.
        thought_dropout: the rate of ``<think>`` blocks emptied (TON).
        seed: with the epoch and the sample, decides which thoughts are dropped.
        tools: tool schemas the system prompt lists (``agent.tools``), as in GRPO's prompts.
        read_clip: decodes a sample's videos (``VLM.use_video``); data with videos needs it.
    """

    def __init__(self, vlm: VLM, data: Sequence[Sample], thought_dropout: float = 0.0, seed: int = 0,
                 tools: Sequence[dict[str, Any]] | None = None, read_clip: ClipReader | None = None):
        self.vlm = vlm
        self.tools = tools
        self.read_clip = read_clip
        self.data = list(data)
        self.position = {sample.source: index for index, sample in enumerate(self.data)}
        self.thought_dropout = thought_dropout
        self.seed = seed
        self.epoch = 0  # set by StageCallback at each epoch's start
        tokenizer = vlm.tokenizer
        self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
        self.skipped = 0

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        loaded = [self.load(sample) for sample in samples]
        conversations = [empty_thoughts(s.messages) if self.drops_thoughts(s) else s.messages for s, _ in loaded]
        inputs, _ = self.vlm.encode(conversations, [media.images for _, media in loaded], add_generation_prompt=False,
                                    convert_boxes=True, tools=self.tools, videos=[media.clips for _, media in loaded])
        inputs["labels"] = assistant_labels(inputs["input_ids"], self.im_start, self.header, self.im_end)
        return dict(inputs)

    def load(self, sample: Sample) -> tuple[Sample, Media]:
        """``sample`` with its media, or the first sample after it in ``data`` whose media load.

        Raises:
            TrainingStopped: no sample of the data loads.
        """
        start = self.position.get(sample.source, 0)
        for offset in range(len(self.data)):
            candidate = sample if offset == 0 else self.data[(start + offset) % len(self.data)]
            kept, media, skipped = load_sample_media([candidate], self.read_clip)
            self.skipped += skipped
            if kept:
                return candidate, media[0]
        raise TrainingStopped(f"no sample's images or videos could be loaded, all {len(self.data)} failed (see the "
                              "warnings above); check the files with `vlreason data check`")

    def drops_thoughts(self, sample: Sample) -> bool:
        """Whether this epoch's presentation of ``sample`` has its thoughts dropped: a function of
        the seed, the epoch and the sample alone, so a resumed run decides exactly as an
        uninterrupted one."""
        if self.thought_dropout <= 0:
            return False
        return random.Random(f"{self.seed}:{self.epoch}:{sample.source}").random() < self.thought_dropout


def empty_thoughts(messages: list[Message]) -> list[Message]:
    """``messages`` with the ``<think>`` blocks of assistant turns emptied."""
    return [map_assistant_text(m, lambda text: _THINK.sub(EMPTY_THINK, text)) for m in messages]


def assistant_labels(input_ids: torch.Tensor, im_start: int, header: Sequence[int], im_end: int) -> torch.Tensor:
    """``[B, L]`` labels: the token where it belongs to an assistant turn, else -100.

    An assistant turn is ``<|im_start|>`` + the tokens of ``"assistant\\n"`` (``header``), then
    its content up to and including ``<|im_end|>``. The header itself is masked: the template
    writes it, the model does not. Everything outside assistant turns (system and user text,
    image pads, tool outputs, left padding) is masked.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    header = list(header)
    for row, ids in enumerate(input_ids.tolist()):
        start = None
        for i, token in enumerate(ids):
            if start is None and token == im_start and ids[i + 1:i + 1 + len(header)] == header:
                start = i + 1 + len(header)
            elif start is not None and i >= start and token == im_end:
                labels[row, start:i + 1] = input_ids[row, start:i + 1]
                start = None
        if start is not None:  # a turn cut off before its end: train on what is there
            labels[row, start:] = input_ids[row, start:]
    if bool((labels == IGNORE_INDEX).all()):
        raise ValueError("no assistant tokens found in the batch; does every sample end with an assistant reply?")
    return labels


class WallClock(TrainerCallback):
    """Measures training time (continuing ``start_s`` of earlier sessions of the run) and stops,
    with a save, once ``budget_s`` is spent."""

    def __init__(self, budget_s: float | None, start_s: float = 0.0):
        self.budget_s = budget_s
        self.start_s = start_s
        self.started = time.perf_counter()
        self.elapsed = start_s

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.elapsed = self.start_s + time.perf_counter() - self.started
        if self.budget_s is not None and processes().max([self.elapsed])[0] >= self.budget_s:  # all ranks stop
            logger.info("time budget of %.0f s reached at step %d", self.budget_s, state.global_step)
            control.should_training_stop = True
            control.should_save = True
        return control


class StageCallback(TrainerCallback):
    """What vlreason adds to ``Trainer``: metrics in ``metrics.jsonl`` (with skipped samples),
    the epoch for thought dropout, Ctrl-C as save-and-stop, and complete-checkpoint markers with
    pruning by step."""

    def __init__(self, stage: StageConfig, collator: SFTCollator, clock: WallClock, log: MetricsLog | None,
                 fingerprint: dict[str, Any], interrupt: InterruptFlag):
        """``log``: None on all but the main process."""
        self.stage = stage
        self.collator = collator
        self.clock = clock
        self.log = log
        self.fingerprint = fingerprint
        self.interrupt = interrupt
        self.skipped_logged = 0

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.collator.epoch = math.floor(state.epoch + 1e-6)  # a resumed epoch starts mid-way (e.g. 2.25)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if processes().max([self.interrupt.requested])[0]:  # every rank stops at the same step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.log is None or not logs or "train_runtime" in logs:  # the summary at the end is no step
            return
        values = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        values["data/skipped_samples"] = float(self.collator.skipped - self.skipped_logged)
        self.skipped_logged = self.collator.skipped
        self.log.write(state.global_step, values)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Mark the checkpoint complete once every rank has written its part into it."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        marker = {"step": state.global_step, "data": self.fingerprint, "seconds": self.clock.elapsed}
        processes().barrier()
        processes().on_main(lambda: (write_marker(folder, marker), prune_checkpoints(args.output_dir,
                                                                                   self.stage.save.keep)))


class QuietProgress(ProgressCallback):
    """Trainer's progress bar (steps, ETA) with the loss beside it instead of a printed dict per log."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}")
