"""SFT cold start: masked cross-entropy on assistant tokens, with transformers' ``Trainer``.

The loss counts only what the model should learn to write: the content of assistant turns and
their ``<|im_end|>``. System and user text, image pads, tool outputs and padding are labelled
-100. Boxes inside reference responses are in original-image pixels (the data convention) and
are rewritten into the family's own convention before tokenizing, so the model learns to write
boxes the way its family does.

Thought dropout (TON, "Think or Not"): with probability p a response's ``<think>`` block is
replaced by an empty one, teaching the model that thinking may be skipped.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from vlreason.config import StageConfig, final_checkpoint
from vlreason.data.batch import load_sample_images
from vlreason.data.jsonl import read_jsonl
from vlreason.data.schema import Message, Sample, map_assistant_text
from vlreason.models.vlm import VLM
from vlreason.training.checkpoints import checkpoint_step, latest_checkpoint
from vlreason.training.metrics import MetricsLog
from vlreason.training.model_setup import prepare_model, save_final

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


def run_sft(stage: StageConfig, resume: bool = False) -> StageResult:
    """Train ``stage`` (kind ``sft``) and save ``output_dir/final``."""
    vlm = prepare_model(stage.model, stage.seed)
    data = read_jsonl(stage.data.train, stage.data.on_bad_sample)
    samples = data.samples[: stage.data.max_samples]
    missing = [s.source for s in samples if s.response is None]
    if missing:
        raise ValueError(f"SFT needs a reference response in every sample; {len(missing)} have none "
                         f"(first: {missing[0]}). Add 'response' (or a final assistant message).")
    out = Path(stage.output_dir)
    clock = WallClock(stage.optim.time_budget_s)
    checkpoint = latest_checkpoint(out) if resume else None
    trainer = Trainer(
        model=vlm.model,
        args=training_arguments(stage),
        train_dataset=SampleList(samples),
        data_collator=SFTCollator(vlm, stage.data.thought_dropout, stage.seed),
        callbacks=[clock, MetricsCallback(MetricsLog(out, stage.logging.tensorboard, checkpoint_step(checkpoint)))],
    )
    if not stage.logging.progress:
        trainer.remove_callback(PrinterCallback)  # without a progress bar, Trainer prints every log dict
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    final = save_final(vlm, final_checkpoint(out))
    return StageResult(final_path=final, steps=trainer.state.global_step, seconds=clock.elapsed)


def training_arguments(stage: StageConfig) -> TrainingArguments:
    optim, log = stage.optim, stage.logging
    return TrainingArguments(
        output_dir=stage.output_dir,
        max_steps=optim.max_steps,
        per_device_train_batch_size=optim.batch_size,
        learning_rate=optim.learning_rate,
        lr_scheduler_type=optim.scheduler.value,
        warmup_steps=optim.warmup_steps,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        logging_steps=log.log_every,
        save_steps=stage.save.every or optim.max_steps,
        save_total_limit=stage.save.keep,
        report_to=[],  # MetricsCallback writes metrics.jsonl and TensorBoard like the GRPO stage
        disable_tqdm=not log.progress,
        seed=stage.seed,
        remove_unused_columns=False,  # the collator needs whole samples
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


class SampleList(torch.utils.data.Dataset):
    """Samples as a map-style dataset; the collator does all the work."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


class SFTCollator:
    """Samples -> model inputs with ``labels`` on assistant tokens only."""

    def __init__(self, vlm: VLM, thought_dropout: float = 0.0, seed: int = 0):
        self.vlm = vlm
        self.thought_dropout = thought_dropout
        self.rng = random.Random(seed)
        tokenizer = vlm.tokenizer
        self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
        self.skipped = 0

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        kept, images, skipped = load_sample_images(samples)
        self.skipped += skipped
        if not kept:
            raise ValueError(f"every image of this batch failed to load ({', '.join(s.source for s in samples)})")
        conversations = [self.drop_thoughts(s.messages) for s in kept]
        inputs, _ = self.vlm.encode(conversations, images, add_generation_prompt=False, convert_boxes=True)
        inputs["labels"] = assistant_labels(inputs["input_ids"], self.im_start, self.header, self.im_end)
        return dict(inputs)

    def drop_thoughts(self, messages: list[Message]) -> list[Message]:
        """With probability ``thought_dropout``, empty the ``<think>`` blocks of assistant turns."""
        if self.thought_dropout <= 0 or self.rng.random() >= self.thought_dropout:
            return messages
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
    """Measures training time and stops (with a save) once ``budget_s`` is spent."""

    def __init__(self, budget_s: float | None):
        self.budget_s = budget_s
        self.started = 0.0
        self.elapsed = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.elapsed = time.perf_counter() - self.started
        if self.budget_s is not None and self.elapsed >= self.budget_s:
            logger.info("time budget of %.0f s reached at step %d", self.budget_s, state.global_step)
            control.should_training_stop = True
            control.should_save = True
        return control


class MetricsCallback(TrainerCallback):
    """Copies the Trainer's log lines into the stage's ``metrics.jsonl``."""

    def __init__(self, log: MetricsLog):
        self.log = log

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs:
            self.log.write(state.global_step, {k: v for k, v in logs.items() if isinstance(v, (int, float))})
