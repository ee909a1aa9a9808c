"""Tiny random-weight Qwen-VL models for tests and the CPU quickstart, and a tiny CLIP for the
rewards that compare text with images.

No weights can be downloaded in CI, so tests run on models built from configs with seeded
random weights and the byte-level tokenizer committed in ``vlreason/assets/tiny_tokenizer``
(built by ``scripts/build_tiny_tokenizer.py``). The configs respect each family's structural
constraints: ``mrope_section`` sums to ``head_dim / 2``; Qwen2.5-VL's full-attention blocks lie
inside the vision depth; Qwen3-VL needs ``head_dim``, a perfect-square number of vision position
embeddings and deepstack layers inside the depth; vision token ids equal the tokenizer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PretrainedConfig, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

from vlreason.models.adapters import QWEN2_5_VL, QWEN2_VL, QWEN3_VL, FamilyAdapter

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"
TINY_PRESETS: dict[str, FamilyAdapter] = {
    "tiny-qwen2-vl": QWEN2_VL,
    "tiny-qwen2.5-vl": QWEN2_5_VL,
    "tiny-qwen3-vl": QWEN3_VL,
}


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model. The defaults (about 0.7M parameters) learn a synthetic grounding
    task on two CPU cores in minutes."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    min_tokens: int = 4  # smallest image, in merged vision tokens
    max_tokens: int = 64  # largest image, in merged vision tokens
    # std of the random weights: the hub's 0.02 leaves attention logits near zero, and a tiny model
    # then sits on a plateau for ~1000 steps before it learns to look at the shape it must localise
    # (the quickstart's SFT); at 0.1 the plateau ends after ~300 (measured, docs/ARCHITECTURE.md)
    initializer_range: float = 0.1
    # the model's vocabulary: None for the tokenizer's (1032 tokens); a real family's size (Qwen:
    # 151,936) for memory measurements, where ids past the tokenizer decode to nothing
    vocab_size: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def tiny_tokenizer() -> Any:
    """The committed tiny tokenizer (Qwen special tokens, tool and think tags, single digits)."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(adapter: FamilyAdapter, tokenizer: Any, spec: TinySpec = TinySpec()) -> PretrainedConfig:
    """A seeded-initialisable config of ``adapter``'s family sized by ``spec``."""
    if spec.head_dim % 4 or spec.hidden_size % spec.num_heads:
        raise ValueError(f"{spec}: hidden_size must split into heads whose size is a multiple of 4")
    if spec.vocab_size is not None and spec.vocab_size < len(tokenizer):
        raise ValueError(f"{spec}: vocab_size must hold the tokenizer's {len(tokenizer)} tokens")
    top_level = {
        "initializer_range": spec.initializer_range,
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    half = spec.head_dim // 2  # mrope sections (temporal, height, width) split half the head
    text = {
        "vocab_size": spec.vocab_size or len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]},
        "tie_word_embeddings": True,
        "initializer_range": spec.initializer_range,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {"depth": spec.vision_layers, "num_heads": spec.vision_heads, "patch_size": adapter.patch_size,
              "spatial_merge_size": adapter.merge_size, "temporal_patch_size": 2,
              "initializer_range": spec.initializer_range}
    if adapter is QWEN2_VL:
        vision |= {"embed_dim": spec.vision_hidden_size, "hidden_size": spec.hidden_size, "mlp_ratio": 2}
        return Qwen2VLConfig(text_config=text, vision_config=vision, **top_level)
    vision |= {"hidden_size": spec.vision_hidden_size, "intermediate_size": 2 * spec.vision_hidden_size,
               "out_hidden_size": spec.hidden_size}
    if adapter is QWEN2_5_VL:
        vision |= {"window_size": 2 * adapter.factor, "fullatt_block_indexes": [spec.vision_layers - 1]}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top_level)
    text["head_dim"] = spec.head_dim
    # the released Qwen3-VL configs say so; transformers always interleaves the sections, vLLM reads the flag
    text["rope_parameters"]["mrope_interleaved"] = True
    vision |= {"num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    return Qwen3VLConfig(text_config=text, vision_config=vision, **top_level)


TINY_CLIP = "tiny-clip"


def tiny_clip(seed: int = 0) -> tuple[Any, Any, Any]:
    """A seeded random-weight CLIP (``model``, ``tokenizer``, ``image_processor``): 32 px images,
    the committed tokenizer's vocabulary, 16-dimensional embeddings. It stands in for a CLIP or
    SigLIP checkpoint in tests and CPU runs of rewards that compare text with images."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = layers | {"vocab_size": len(tokenizer), "max_position_embeddings": 64,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config=layers | {"image_size": 32, "patch_size": 8},
                        projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tokenizer, processor
