"""A rollout engine that replays given texts: rollout -> reward -> loss tests run in seconds, and a
pipeline (tools included) can be debugged without sampling. Registered as ``scripted``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlreason.models.vlm import VLM
from vlreason.rollout.engine import ENGINES, EncodedObservation, ModelTurn, PromptBatch, SamplingParams


@ENGINES.register("scripted")
class ScriptedEngine:
    """Replays ``completions`` in order, cycling: call after call, row after row (a process's share
    of a draw gets the rows it would get in one process). A completion is one text (one turn) or a
    list of texts, one per turn; a row asked for more turns than its list has repeats the last."""

    takes_video = True  # it reads no media at all
    hides_tokens = True  # nothing to hide: the turns are written already

    def __init__(self, vlm: VLM, completions: Sequence[str | Sequence[str]]):
        if not completions:
            raise ValueError("the scripted engine needs at least one completion text")
        self.tokenizer = vlm.tokenizer
        self.completions = [[text] if isinstance(text, str) else list(text) for text in completions]
        if not all(self.completions):
            raise ValueError("a scripted completion given as a list of turns needs at least one turn")
        self.cursor = 0

    def start(self, prompts: PromptBatch, params: SamplingParams) -> ScriptedSession:
        rows = len(prompts) * params.n
        start = self.cursor + params.first_row
        scripts = [self.completions[(start + i) % len(self.completions)] for i in range(rows)]
        self.cursor += params.total_rows or rows
        return ScriptedSession(self.tokenizer, scripts)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: the texts do not depend on the weights."""


class ScriptedSession:
    """Each running row's script and the turn it is at."""

    def __init__(self, tokenizer, scripts: list[list[str]]):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.turn = 0

    def sample(self, max_new_tokens: Sequence[int]) -> list[ModelTurn]:
        eos = self.tokenizer.eos_token
        turns = []
        for script, budget in zip(self.scripts, max_new_tokens, strict=True):
            text = script[min(self.turn, len(script) - 1)]
            ids = self.tokenizer(text + eos, add_special_tokens=False)["input_ids"][:budget]
            turns.append(ModelTurn(ids, None, ids[-1] == self.tokenizer.eos_token_id))
        self.turn += 1
        return turns

    def keep(self, rows: Sequence[int]) -> None:
        self.scripts = [self.scripts[row] for row in rows]

    def extend(self, observations: Sequence[EncodedObservation]) -> None:
        """Nothing to do: the next turns are already written."""

    def close(self) -> None:
        """Nothing to free."""
