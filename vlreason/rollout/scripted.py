"""A rollout engine that replays given completion texts: rollout -> reward -> loss tests run in
seconds, and a pipeline can be debugged without sampling. Registered as ``scripted``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BatchFeature

from vlreason.models.vlm import VLM
from vlreason.rollout.engine import ENGINES, Rollouts, SamplingParams, finish


@ENGINES.register("scripted")
class ScriptedEngine:
    """Returns ``completions`` in order, cycling: call after call, row after row (a process's
    share of a draw gets the rows it would get in one process)."""

    def __init__(self, vlm: VLM, completions: Sequence[str]):
        if not completions:
            raise ValueError("the scripted engine needs at least one completion text")
        self.tokenizer = vlm.tokenizer
        self.completions = list(completions)
        self.cursor = 0

    def generate(self, prompt_inputs: BatchFeature, params: SamplingParams) -> Rollouts:
        rows = prompt_inputs["input_ids"].shape[0] * params.n
        start = self.cursor + params.first_row
        texts = [self.completions[(start + i) % len(self.completions)] for i in range(rows)]
        self.cursor += params.total_rows or rows
        eos = self.tokenizer.eos_token
        encoded = [self.tokenizer(text + eos, add_special_tokens=False)["input_ids"][:params.max_new_tokens]
                   for text in texts]
        width = max(len(ids) for ids in encoded)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in encoded])
        return finish(ids, int(self.tokenizer.eos_token_id), pad, self.tokenizer)
