"""What trains: the vision tower frozen, trained, or trained but for its patch embedding; LoRA."""

from __future__ import annotations

import pytest

from vlreason.config import LoraConfig, ModelConfig
from vlreason.training.model_setup import prepare_model, vision_tower


def trainable(vlm, prefix: str) -> set[bool]:
    """Whether the parameters under ``prefix`` train (the set of their ``requires_grad``)."""
    return {p.requires_grad for n, p in vlm.model.named_parameters() if n.startswith(prefix)}


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_vision_freezing_choices(preset):
    frozen = prepare_model(ModelConfig(name_or_path=preset), seed=0)
    assert not any(p.requires_grad for p in vision_tower(frozen.model).parameters())
    assert trainable(frozen, "model.language_model") == {True}

    trained = prepare_model(ModelConfig(name_or_path=preset, freeze_vision=False), seed=0)
    assert all(p.requires_grad for p in vision_tower(trained.model).parameters())

    patch = prepare_model(ModelConfig(name_or_path=preset, freeze_vision=False, freeze_patch_embed=True), seed=0)
    assert trainable(patch, "model.visual.patch_embed") == {False}
    assert trainable(patch, "model.visual.blocks") == {True} and trainable(patch, "model.visual.merger") == {True}


def test_lora_trains_only_the_adapters():
    lora = prepare_model(ModelConfig(name_or_path="tiny-qwen3-vl", lora=LoraConfig(enabled=True, r=4)), seed=0)
    assert {n for n, p in lora.model.named_parameters() if p.requires_grad} == \
        {n for n, _ in lora.model.named_parameters() if "lora_" in n}
