"""load_vlm on tiny presets and saved checkpoints: forward, generate, processor parity, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlreason.models import TINY_PRESETS, load_vlm, save_vlm
from vlreason.models.adapters import VISION_SPECIAL_TOKENS

PRESETS = list(TINY_PRESETS)


def gradient_image(width: int, height: int) -> Image.Image:
    """A deterministic image with structure, so resampling differences would show."""
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(height) for x in range(width)])
    return image


def ask(n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": "Where?"}]}]


@pytest.fixture(scope="module", params=PRESETS)
def vlm(request):
    return load_vlm(request.param)


def test_forward_with_images(vlm):
    images = [[gradient_image(150, 100)], [gradient_image(60, 90), gradient_image(120, 120)]]
    inputs, infos = vlm.encode([ask(1), ask(2)], images)
    assert [len(row) for row in infos] == [1, 2]
    assert infos[0][0].original_size == (150, 100)
    grid = inputs["image_grid_thw"]
    assert grid.shape == (3, 3)
    n_pads = (inputs["input_ids"] == vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()
    assert n_pads == (grid.prod(dim=1) // vlm.adapter.merge_size**2).sum()
    for info, thw in zip([i for row in infos for i in row], grid, strict=True):
        assert info.input_size == (thw[2] * vlm.adapter.patch_size, thw[1] * vlm.adapter.patch_size)
    logits = vlm.model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_generate_suppresses_vision_tokens(vlm):
    inputs, _ = vlm.encode([ask(1)] * 2, [[gradient_image(100, 80)]] * 2)
    vision_ids = vlm.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))

    def favour_vision_tokens(module, args, output):
        output[..., vision_ids] += 50.0  # make vision tokens the model's overwhelming choice
        return output

    handle = vlm.model.lm_head.register_forward_hook(favour_vision_tokens)
    try:
        unsuppressed = vlm.generate(inputs, max_new_tokens=6, do_sample=False, suppress_tokens=[])
        suppressed = vlm.generate(inputs, max_new_tokens=6, do_sample=False)
    finally:
        handle.remove()
    assert torch.isin(unsuppressed, torch.tensor(vision_ids)).any()
    assert not torch.isin(suppressed, torch.tensor(vision_ids)).any()
    assert suppressed.shape == (2, 6)


def test_processor_matches_pil_image_processor(vlm):
    """Our resize-then-process path gives exactly what the stock PIL processor gives."""
    image = gradient_image(333, 217)
    inputs, _ = vlm.encode([ask(1)], [[image]])
    reference = Qwen2VLImageProcessorPil(
        patch_size=vlm.adapter.patch_size, merge_size=vlm.adapter.merge_size, temporal_patch_size=2,
        min_pixels=vlm.resize.min_pixels, max_pixels=vlm.resize.max_pixels,
    )(images=[image], return_tensors="pt")
    assert torch.equal(inputs["image_grid_thw"], reference["image_grid_thw"])
    assert torch.equal(inputs["pixel_values"], reference["pixel_values"])


def test_mm_token_type_ids_mark_image_tokens(vlm):
    inputs, _ = vlm.encode([ask(1)], [[gradient_image(64, 64)]])
    image_id = vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(inputs["mm_token_type_ids"] == 1, inputs["input_ids"] == image_id)
    assert set(inputs["mm_token_type_ids"].unique().tolist()) == {0, 1}


def test_lora_targets_language_model_only(vlm):
    config = LoraConfig(r=4, target_modules=vlm.adapter.lora_target_modules)
    model = get_peft_model(load_vlm(f"tiny-{vlm.adapter.name}").model, config)
    adapted = [name for name, _ in model.named_modules() if name.endswith(".lora_A")]
    layers = model.config.text_config.num_hidden_layers
    assert len(adapted) == 7 * layers  # q, k, v, o, gate, up, down in every decoder layer
    assert all(".language_model." in name and ".visual." not in name for name in adapted)


@pytest.mark.parametrize("preset", PRESETS)
def test_save_and_load_from_directory(tmp_path, preset):
    original = load_vlm(preset, seed=3)
    save_vlm(original, tmp_path)
    loaded = load_vlm(tmp_path, max_pixels=original.resize.max_pixels // 2)
    assert loaded.adapter is original.adapter
    assert loaded.resize.max_pixels == original.resize.max_pixels // 2
    inputs, _ = original.encode([ask(1)], [[gradient_image(80, 80)]])
    with torch.no_grad():
        assert torch.equal(original.model(**inputs).logits, loaded.model(**inputs).logits)


def test_tiny_presets_are_seeded():
    a, b, c = load_vlm("tiny-qwen2-vl", seed=1), load_vlm("tiny-qwen2-vl", seed=1), load_vlm("tiny-qwen2-vl", seed=2)
    weight = "model.language_model.layers.0.self_attn.q_proj.weight"
    params = [dict(m.model.named_parameters())[weight] for m in (a, b, c)]
    assert torch.equal(params[0], params[1])
    assert not torch.equal(params[0], params[2])


@pytest.mark.parametrize("source", ["preset", "directory"])
def test_attention_implementation_option(tmp_path, source):
    name = "tiny-qwen2-vl"
    if source == "directory":
        name = save_vlm(load_vlm(name), tmp_path)
    assert load_vlm(name, attn_implementation="eager").model.config._attn_implementation == "eager"
    assert load_vlm(name, attn_implementation="sdpa").model.config._attn_implementation == "sdpa"


def test_dtype_option():
    vlm = load_vlm("tiny-qwen2.5-vl", dtype="bfloat16")
    assert {p.dtype for p in vlm.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_vlm("tiny-qwen2.5-vl", dtype="fp8")


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="tiny preset"):
        load_vlm(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(ValueError, match="'llama' is not supported"):
        load_vlm(tmp_path)


def test_a_tiny_model_can_have_a_real_vocabulary_larger_than_its_tokenizer():
    from vlreason.models.tiny import TinySpec
    from vlreason.models.vlm import build_tiny_vlm

    vlm = build_tiny_vlm("tiny-qwen2.5-vl", spec=TinySpec(vocab_size=151_936), seed=0)
    assert vlm.model.get_output_embeddings().weight.shape[0] == 151_936
    assert vlm.tokenizer.decode([100_000]) == ""  # ids past the tokenizer decode to nothing
    with pytest.raises(ValueError, match="vocab_size must hold the tokenizer's 1032 tokens"):
        build_tiny_vlm("tiny-qwen2.5-vl", spec=TinySpec(vocab_size=100), seed=0)
