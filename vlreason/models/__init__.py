"""VLM wrappers: ``load_vlm`` and the per-family adapters."""

from vlreason.models.adapters import ADAPTERS, BoxConvention, FamilyAdapter, adapter_for
from vlreason.models.tiny import TINY_PRESETS, TinySpec
from vlreason.models.vlm import VLM, build_tiny_vlm, load_vlm, save_vlm

__all__ = [
    "ADAPTERS",
    "TINY_PRESETS",
    "VLM",
    "BoxConvention",
    "FamilyAdapter",
    "TinySpec",
    "adapter_for",
    "build_tiny_vlm",
    "load_vlm",
    "save_vlm",
]
