"""What every stage does first and last: build the model to train, and save it for the next stage."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from vlreason.config import ModelConfig, StageConfig
from vlreason.models.vlm import VLM, load_vlm, save_vlm
from vlreason.training.checkpoints import disk_full
from vlreason.vision.video import ClipReader

logger = logging.getLogger(__name__)


def prepare_model(config: ModelConfig, seed: int) -> VLM:
    """Load the model onto ``config.device``, freeze the vision tower if asked, wrap it with LoRA
    if enabled, and keep the trainable weights in float32 (see ``autocast``)."""
    vlm = load_vlm(config.name_or_path, dtype=config.dtype, attn_implementation=config.attn_implementation,
                   min_pixels=config.min_pixels, max_pixels=config.max_pixels, device=config.device, seed=seed)
    if config.lora.enabled:
        lora = PeftLoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                              target_modules=config.lora.target_modules or vlm.adapter.lora_target_modules)
        vlm.model = get_peft_model(vlm.model, lora)  # only the adapters train; the base stays frozen
    elif config.freeze_vision:
        vision_tower(vlm.model).requires_grad_(False)
    elif config.freeze_patch_embed:  # a random projection of pixels serves, and its backward is costly
        vision_tower(vlm.model).patch_embed.requires_grad_(False)
    for parameter in vlm.model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()  # the optimizer state follows: float32 too
    trainable, total = count_parameters(vlm.model)
    logger.info("%s: %.2fM of %.2fM parameters trainable, on %s, computing in %s", config.name_or_path,
                trainable / 1e6, total / 1e6, next(vlm.model.parameters()).device, compute_dtype(vlm.model))
    return vlm


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (training mode only), with
    non-reentrant checkpoints; transformers renamed the switch (5.2x), both names are served."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    switch = getattr(base, "activation_checkpointing_enable", None)
    if switch is not None:
        switch(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in: the one it was loaded in (``model.dtype`` of the config,
    or the checkpoint's), whatever its trainable weights were raised to."""
    return model.config.dtype if isinstance(model.config.dtype, torch.dtype) else torch.float32


def autocast(model: torch.nn.Module) -> torch.autocast:
    """Forward passes in the model's compute dtype (bfloat16 or float16) on its device; a no-op
    for float32. Matmuls run in half precision, while log-softmax, losses and the optimizer stay
    in float32."""
    dtype = compute_dtype(model)
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision encoder (with its merger) of a Qwen-VL model, also under a peft wrapper."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.model.visual


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def stage_clip_reader(vlm: VLM, stage: StageConfig) -> ClipReader:
    """Give ``vlm`` the video pixel budget of ``stage.video`` and return the reader of the
    stage's videos (training and evaluation decode them alike)."""
    video = stage.video
    return vlm.use_video(video.sampling(), video.max_pixels, video.total_pixels, video.backend,
                         stage.seed if video.shuffle_frames else None)


def save_final(vlm: VLM, path: str | Path) -> Path:
    """Save a standard checkpoint (LoRA merged into the weights) atomically: written next to
    ``path`` and renamed into place, so a crash never leaves a half-written model there."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    model = vlm.model
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()  # a plain model that load_vlm and transformers read
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_vlm(dataclasses.replace(vlm, model=model), tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise (disk_full(exc, tmp) or exc) from exc
    return path


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load the weights ``Trainer`` saved in ``checkpoint`` into ``model`` (LoRA: the adapters)."""
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        return
    saved = type(model).from_pretrained(checkpoint, dtype=model.dtype)
    model.load_state_dict(saved.state_dict())
