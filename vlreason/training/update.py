"""How the GRPO stage turns gradients into an update: in one process, with plain data parallelism,
or through DeepSpeed ZeRO.

* ``LocalUpdate`` (no ``optim.deepspeed``): a torch AdamW on every rank. Each rank backpropagates
  its share of the batch (its loss already divided by the whole batch's normaliser), the
  gradients are summed over the ranks in one all-reduce, clipped and applied; the weights and
  the optimizer state stay identical on every rank. One process is the special case W = 1.
* ``DeepSpeedUpdate`` (``optim.deepspeed: configs/deepspeed/zero2.json`` ...): the model and
  optimizer go to a DeepSpeed engine. ZeRO-2 partitions gradients and optimizer state, ZeRO-3
  the weights as well (gathered layer by layer in every forward, so every rank runs the same
  number of passes: the trainer pads them), with optional CPU offload of the optimizer. The
  config file gives the ZeRO section; the rest is filled from vlreason's config (precision,
  gradient clipping, one micro-batch per backward) so the two cannot disagree.

Both give the same update as one process over the global batch (tested on 2 CPU processes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from vlreason.config import ConfigError, OptimConfig
from vlreason.training.distributed import Processes, ensure_process_group

logger = logging.getLogger(__name__)
DEEPSPEED_TAG = "deepspeed"  # the sub-folder of a checkpoint holding DeepSpeed's own files


class Update(Protocol):
    """Gradient passes through a module (its trainable parameters are what is trained) and the
    optimizer step that ends each update."""

    optimizer: torch.optim.Optimizer

    def forward(self, *args: Any) -> Any:
        """The module's forward for a pass whose loss is backpropagated (through the engine, if any)."""
        ...

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate ``loss``'s gradient; ``last``: the update's final micro-batch."""
        ...

    def step(self, max_grad_norm: float, loss_finite: bool) -> tuple[float, bool]:
        """Reduce, clip and apply the accumulated gradients unless the loss or the gradient norm
        is not finite; returns (gradient norm before clipping, applied)."""
        ...

    def gathered(self) -> contextlib.AbstractContextManager[None]:
        """Inside: every weight whole on every rank (for sampling and saving)."""
        ...

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (the reference) placed like the trained one (ZeRO-3: partitioned)."""
        ...

    def save(self, folder: Path) -> dict[str, Any]:
        """Write what the update needs to resume into ``folder`` (every rank calls this); returns
        the entries the main process adds to the trainer state."""
        ...

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        """Restore what ``save`` wrote (``state``: the trainer state it returned into)."""
        ...


def build_update(module: torch.nn.Module, optim: OptimConfig, processes: Processes) -> Update:
    """The update ``optim.deepspeed`` asks for (see the module docstring), training ``module``."""
    if optim.deepspeed:
        return DeepSpeedUpdate(module, optim, processes)
    return LocalUpdate(module, optim, processes)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class LocalUpdate:
    """AdamW on every rank, gradients summed over ranks before the step."""

    def __init__(self, module: torch.nn.Module, optim: OptimConfig, processes: Processes):
        self.module = module
        self.processes = processes
        self.parameters = trainable_parameters(module)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay)
        self.starting = True  # the next backward begins an update

    def forward(self, *args: Any) -> Any:
        return self.module(*args)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.starting:  # the gradients of the last update stay readable until the next one begins
            self.optimizer.zero_grad(set_to_none=True)
            self.starting = False
        loss.backward()

    def step(self, max_grad_norm: float, loss_finite: bool) -> tuple[float, bool]:
        self.processes.sum_gradients(self.parameters)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, max_grad_norm))
        applied = loss_finite and math.isfinite(grad_norm)  # the same on every rank: same gradients, same loss
        if applied:
            self.optimizer.step()
        self.starting = True
        return grad_norm, applied

    def gathered(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def save(self, folder: Path) -> dict[str, Any]:
        trainable = {name: p.detach().cpu() for name, p in self.module.named_parameters() if p.requires_grad}
        return {"model": trainable, "optimizer": self.optimizer.state_dict()}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        missing = {name for name, p in self.module.named_parameters() if p.requires_grad} - set(state["model"])
        if missing:
            raise ValueError(f"{folder} does not match this model/config (missing {len(missing)} trainable tensors, "
                             f"e.g. {sorted(missing)[0]}); resume with the config the run was started with")
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedUpdate:
    """A DeepSpeed engine owns the weights' partitions, the gradients and the optimizer."""

    def __init__(self, module: torch.nn.Module, optim: OptimConfig, processes: Processes):
        import deepspeed  # optional: pip install 'vlreason[deepspeed]'

        ensure_process_group()  # also for one process
        self.module = module
        self.processes = processes
        self.config = deepspeed_config(optim, _dtype(module))
        self.stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        parameters = trainable_parameters(module)
        self.optimizer = _adamw(parameters, optim, self.config)  # its param groups carry the scheduled lr
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=parameters, optimizer=self.optimizer,
                                               config=self.config, dist_init_required=False)

    def forward(self, *args: Any) -> Any:
        return self.engine(*args)  # the engine counts the pass (ZeRO-3 accumulates gradients by it)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        # DeepSpeed averages gradients over the ranks; the losses are already global means
        self.engine.backward(loss * self.processes.world_size, scale_wrt_gas=False)

    def step(self, max_grad_norm: float, loss_finite: bool) -> tuple[float, bool]:
        if not loss_finite:  # known on every rank alike (the loss is summed over ranks first)
            self.engine.zero_grad()
            return float("nan"), False
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return grad_norm, bool(getattr(self.engine, "_step_applied", True))

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            offload = self.engine.optimizer.parameter_offload
            _remove_zero3_hooks(offload)  # whole weights now: no per-layer gathers (ranks may run unequal passes)
            try:
                yield
            finally:
                coordinator = getattr(offload, "param_coordinator", None)
                if coordinator is not None and not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()  # the passes above are not the traced order
                offload._register_deepspeed_module(offload.module)

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.stage < 3:
            return model
        import deepspeed

        config = {key: self.config[key] for key in ("train_micro_batch_size_per_gpu", "bf16", "fp16")}
        self.frozen_engine, *_ = deepspeed.initialize(model=model, config={**config, "zero_optimization": {"stage": 3}},
                                                      dist_init_required=False)
        return model

    def save(self, folder: Path) -> dict[str, Any]:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)
        return {}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        loaded, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError(f"{folder}: no DeepSpeed state in it (was the run started without optim.deepspeed?); "
                             "resume with the config the run was started with")


def whole_weights(model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Inside: the weights of a ZeRO-3 partitioned ``model`` gathered whole on every rank (every
    rank must enter); a no-op for any other model."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def read_deepspeed_file(path: str | Path, key: str = "optim.deepspeed") -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict.

    Raises:
        ConfigError: DeepSpeed is not installed, or the file cannot be read or is not a JSON object.
    """
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{key}: training with DeepSpeed needs the deepspeed package: pip install "
                          "'vlreason[deepspeed]' (or set optim.deepspeed=null for plain data parallelism)")
    try:
        config = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read it ({exc.strerror}); give a DeepSpeed JSON config, "
                          "e.g. configs/deepspeed/zero2.json") from None
    except ValueError as exc:
        raise ConfigError(f"{key} {path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key} {path}: a DeepSpeed config is a JSON object, not {type(config).__name__}")
    return config


def deepspeed_config(optim: OptimConfig, dtype: torch.dtype, micro_batch: int = 1) -> dict[str, Any]:
    """The DeepSpeed config file with the settings vlreason owns filled in: precision from the
    model's compute ``dtype``; ``micro_batch``: sequences per rank and backward (GRPO forms its
    own micro-batches and passes 1)."""
    config = read_deepspeed_file(optim.deepspeed or "")
    config.update({
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,  # GRPO marks the last micro-batch of each update itself
        "gradient_clipping": optim.max_grad_norm,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    })
    config.pop("train_batch_size", None)
    return config


def _dtype(module: torch.nn.Module) -> torch.dtype:
    """The compute dtype of the transformers model in ``module`` (itself, or inside a wrapper)."""
    config = next(m.config for m in module.modules() if hasattr(m, "config"))
    return config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32


def _adamw(parameters: list[torch.nn.Parameter], optim: OptimConfig, config: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW with the stage's settings: DeepSpeed's CPU Adam when the optimizer is offloaded to the
    CPU (built on first use), torch's otherwise."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay)


def _remove_zero3_hooks(offload: Any) -> None:
    """Detach ZeRO-3's per-module gather/release hooks (restored by ``_register_deepspeed_module``)."""
    for parameter in offload.module.parameters():
        parameter.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
