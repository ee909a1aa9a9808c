"""Rollouts with vLLM, behind the same protocol as the HF engine.

``rollout.engine: vllm`` runs a ``vllm.LLM`` in the trainer's process (colocated, the default);
with ``rollout.engine_options.url`` it sends the same requests to a rollout server
(``vlreason rollout-server``, ``vlreason.rollout.vllm_server``) on another process or node.

Token ids in, token ids out: every model turn is requested with the row's whole context as token
ids (prompt, earlier turns, observations) and its images at model-input size, and the sampled ids
are appended as they came, so nothing is ever re-tokenised. vLLM expands each image's
placeholder itself, so each run of ``<|image_pad|>`` is sent as one token and vLLM's expansion is
checked against ours (a different count means its image processor resizes differently). Prefix
caching makes the repeated context of later turns and of the G samples of a prompt cheap.

Sampling matches the HF engine's rules, not its random numbers: the same stop token (the
tokenizer's end-of-sequence only), the vision special tokens never sampled, log-probs of the
distribution sampled from (after temperature and top-p: ``logprobs_mode=processed_logprobs``),
and each row seeded by (call seed, row of the draw, turn), so a row samples the same tokens
however the draw is split over processes.

Weights: the engine starts from a folder holding the trainer's current weights, and after an
optimizer step (``update_weights``) the next session first pushes the trained weights in place
(``reload_weights`` with checkpoint names; LoRA merged as base + delta without touching the
model). The push happens when sampling starts, inside the trainer's ``gathered`` block, so
ZeRO-3's partitioned weights are whole then.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from vlreason.models.vlm import VLM
from vlreason.rollout.engine import ENGINES, EncodedObservation, ModelTurn, PromptBatch, SamplingParams
from vlreason.rollout.vllm_backend import (
    Backend,
    Decoding,
    EngineError,
    Request,
    identity,
    import_vllm,
    named_weights,
    start_local,
)
from vlreason.rollout.vllm_server import RemoteVLLM


def row_seed(seed: int | None, row: int, turn: int) -> int | None:
    """The seed of one row's turn: a 56-bit hash of (call seed, row of the draw, turn)."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}:{turn}".encode()).digest()[:7], "big")


@ENGINES.register("vllm")
class VLLMEngine:
    """Samples with vLLM: colocated in this process, or from a rollout server at ``url``.

    Args:
        vlm: the trained model's bundle (its tokenizer, adapter and current weights).
        url: a rollout server (``vlreason rollout-server``, e.g. ``http://10.0.0.2:8000``); None
            runs vLLM here, with the options below.
        timeout_s: a server request's limit (generation and weight pushes).
        dtype / max_model_len / max_images / gpu_memory_utilization / kv_cache_gib /
            enforce_eager / sleep: the colocated engine's (``start_local``, ``LocalVLLM``).
    """

    def __init__(self, vlm: VLM, url: str | None = None, timeout_s: float = 600.0, dtype: str | None = None,
                 max_model_len: int = 4096, max_images: int = 8, gpu_memory_utilization: float = 0.3,
                 kv_cache_gib: int = 1, enforce_eager: bool = False, sleep: bool = False):
        tokenizer = vlm.tokenizer
        self.stop_id = int(tokenizer.eos_token_id)
        self.banned = tuple(tokenizer.convert_ids_to_tokens(vlm.adapter.suppress_token_ids(tokenizer)))
        self.pending: torch.nn.Module | None = None
        self.sync_s = 0.0  # seconds the weight push before the last session took (0: none was due)
        if url is not None:
            if sleep:
                raise EngineError("rollout.engine_options.sleep is for the colocated engine; a rollout server "
                                  "keeps its own memory (leave sleep out with url)")
            self.backend: Backend = RemoteVLLM(url, identity(vlm.model.config), timeout_s)
            self.pending = vlm.model  # the server starts from its own weights: push the trainer's
            return
        self.backend = start_local(vlm, dtype=dtype, max_model_len=max_model_len, max_images=max_images,
                                   gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=kv_cache_gib,
                                   enforce_eager=enforce_eager, sleep=sleep)

    @staticmethod
    def preflight(url: str | None = None, timeout_s: float = 600.0, **options: Any) -> None:
        """Before a run spends compute: the rollout server answers, or vLLM is installed and
        supports the installed transformers.

        Raises:
            EngineError: with the fix.
        """
        if url is not None:
            RemoteVLLM(url, None, timeout_s)
        else:
            import_vllm()

    def start(self, prompts: PromptBatch, params: SamplingParams) -> VLLMSession:
        """A session over the prompts' rows; first pushes weights trained since the last one."""
        self.backend.wake_up()
        self.sync_s = 0.0
        if self.pending is not None:
            started = time.perf_counter()
            self.backend.load_weights(named_weights(self.pending))
            self.sync_s = time.perf_counter() - started
            self.pending = None
        return VLLMSession(self.backend, prompts, params,
                           Decoding(params.temperature, params.top_p, self.stop_id, self.banned))

    def update_weights(self, model: torch.nn.Module) -> None:
        """Remember the trained model; its weights are pushed when the next session starts."""
        self.pending = model


class VLLMSession:
    """Each running row's context and images, sent whole for every turn."""

    def __init__(self, backend: Backend, prompts: PromptBatch, params: SamplingParams, decoding: Decoding):
        self.backend = backend
        self.params = params
        self.decoding = decoding
        inputs = prompts.inputs
        self.contexts: list[list[int]] = []
        self.images: list[list[Image.Image]] = []
        for b in range(len(prompts)):
            ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
            for _ in range(params.n):
                self.contexts.append(list(ids))
                self.images.append(list(prompts.resized[b]))
        self.rows = [params.first_row + row for row in range(len(self.contexts))]  # each row's index in the draw
        self.turn = 0

    def sample(self, max_new_tokens: Sequence[int]) -> list[ModelTurn]:
        """One turn of every running row (greedy turns carry no log-probs, as with the HF engine)."""
        if any(budget < 1 for budget in max_new_tokens):
            raise ValueError(f"every running row needs a token budget >= 1, got {list(max_new_tokens)}")
        requests = [Request(context, images, int(budget), row_seed(self.params.seed, row, self.turn))
                    for context, images, budget, row in zip(self.contexts, self.images, max_new_tokens, self.rows,
                                                            strict=True)]
        generated = self.backend.generate(requests, self.decoding)
        self.turn += 1
        for context, turn in zip(self.contexts, generated, strict=True):
            context += turn.ids
        sampled = self.params.temperature > 0
        return [ModelTurn(turn.ids, turn.logprobs if sampled else None, turn.ended) for turn in generated]

    def keep(self, rows: Sequence[int]) -> None:
        self.contexts = [self.contexts[row] for row in rows]
        self.images = [self.images[row] for row in rows]
        self.rows = [self.rows[row] for row in rows]

    def extend(self, observations: Sequence[EncodedObservation]) -> None:
        for context, images, observation in zip(self.contexts, self.images, observations, strict=True):
            context += observation.ids
            images += observation.images

    def close(self) -> None:
        """The rollout is over: free vLLM's GPU memory for training (with ``sleep``)."""
        self.backend.sleep()
