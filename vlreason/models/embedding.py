"""Image-text embedding models (CLIP, SigLIP and their kin) for rewards that compare text with frames.

``ImageTextEmbedder.load(name)`` takes a hub id or a local folder of any transformers model with
``get_text_features`` and ``get_image_features`` (``AutoModel``, ``AutoTokenizer``,
``AutoImageProcessor``; without torchvision the image processor is transformers' PIL one), or
``tiny-clip``: the seeded random-weight CLIP of ``vlreason.models.tiny``, for tests and CPU runs.
Embeddings come back L2-normalised, so a dot product is a cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from vlreason.models.tiny import TINY_CLIP, tiny_clip


class EmbedderError(RuntimeError):
    """An embedding model that cannot be loaded or used, with the option to change."""


class ImageTextEmbedder:
    """Embeds texts and images into one space.

    Args:
        model: a model with ``get_text_features`` / ``get_image_features``, in eval mode.
        tokenizer: its tokenizer; texts are cut to the text tower's positions.
        image_processor: its image processor (``pixel_values`` out).
        device: where the model runs.
        batch_size: texts or images per forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, device: str = "cpu", batch_size: int = 32):
        for method in ("get_text_features", "get_image_features"):
            if not hasattr(model, method):
                raise EmbedderError(f"{type(model).__name__} has no {method}; use a CLIP or SigLIP-style model")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.batch_size = batch_size
        text_config = getattr(model.config, "text_config", model.config)
        self.max_text_tokens = int(getattr(text_config, "max_position_embeddings", 64))

    @classmethod
    def load(cls, name: str, device: str | None = None, batch_size: int = 32) -> ImageTextEmbedder:
        """The model ``name`` (hub id, local folder or ``tiny-clip``) on ``device`` (default: the
        first GPU when there is one, else the CPU).

        Raises:
            EmbedderError: the model or its tokenizer or image processor cannot be loaded.
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if name == TINY_CLIP:
            return cls(*tiny_clip(), device=device, batch_size=batch_size)
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        try:
            model = AutoModel.from_pretrained(name)
            tokenizer = AutoTokenizer.from_pretrained(name)
            image_processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise EmbedderError(f"cannot load the embedding model {name!r}: {exc}. Give a hub id or a local folder "
                                f"of a CLIP or SigLIP model (or {TINY_CLIP!r} for a random tiny one)") from exc
        return cls(model, tokenizer, image_processor, device=device, batch_size=batch_size)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``[n, d]`` unit embeddings of ``texts`` (each cut to the text tower's length)."""
        parts = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding="max_length", truncation=True,
                                   max_length=self.max_text_tokens, return_tensors="pt").to(self.device)
            features = self.model.get_text_features(input_ids=batch["input_ids"],
                                                    attention_mask=batch.get("attention_mask"))
            parts.append(_unit(features))
        return torch.cat(parts) if parts else torch.empty(0, 0)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[n, d]`` unit embeddings of RGB ``images``."""
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = self.image_processor(images=list(images[start:start + self.batch_size]), return_tensors="pt")
            features = self.model.get_image_features(pixel_values=batch["pixel_values"].to(self.device))
            parts.append(_unit(features))
        return torch.cat(parts) if parts else torch.empty(0, 0)


def _unit(features: Any) -> torch.Tensor:
    """Normalised features: the tensor, or the ``pooler_output`` that transformers 5 returns."""
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1).cpu()
