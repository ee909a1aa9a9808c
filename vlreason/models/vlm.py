"""``load_vlm``: a model, its processor and its family adapter, from a hub id, a local
checkpoint or a tiny offline preset.

Processors are constructed explicitly rather than through ``AutoProcessor``: on a tiny local
directory ``AutoProcessor`` can silently return only the tokenizer, and every transformers
*video* processor needs torchvision. The image-only processor classes below pass
``video_processor=None`` to Qwen's processors, which is all image work needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    BatchFeature,
    PreTrainedModel,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlreason.data.schema import Message, map_assistant_text
from vlreason.models.adapters import ChatStyle, FamilyAdapter, VideoPrompt, adapter_for
from vlreason.models.tiny import TINY_PRESETS, TinySpec, tiny_config, tiny_tokenizer
from vlreason.vision.boxes import Box, Size
from vlreason.vision.images import ImageInfo, ResizePolicy, fit_image
from vlreason.vision.video import Clip, ClipReader, FrameSampling, probe_video, sample_indices
from vlreason.vision.video_patches import VideoPatches, VideoPatching, patch_video

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VIDEO_MAX_TOKENS = 768  # tokens per video frame at most by default (the Qwen video processors' bound)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL / Qwen2.5-VL processor without a video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor without a video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_processor(adapter: FamilyAdapter, image_processor: Any, tokenizer: Any) -> Any:
    """The image-only processor class matching ``adapter``'s family."""
    cls = ImageOnlyQwen3VLProcessor if adapter.chat_style is ChatStyle.QWEN3 else ImageOnlyQwen2VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer)


@dataclass
class VLM:
    """A loaded vision-language model with what it takes to prompt it."""

    model: PreTrainedModel
    processor: Any
    adapter: FamilyAdapter
    resize: ResizePolicy
    video: VideoPatching  # geometry and pixel budget of video frames

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def use_video(self, sampling: FrameSampling, max_pixels: int | None = None, total_pixels: int | None = None,
                  backend: str | None = None, shuffle_seed: int | None = None) -> ClipReader:
        """Set the pixel budget of video frames (``max_pixels`` per frame, None keeps it;
        ``total_pixels`` across a clip, None for no total) and return the reader that decodes a
        video's frames at the size this model then patches them at (``shuffle_seed``: see
        ``ClipReader``)."""
        self.video = dataclasses.replace(self.video, max_pixels=max_pixels or self.video.max_pixels,
                                         total_pixels=total_pixels)
        return ClipReader(sampling, backend, self.video.frame_size, shuffle_seed)

    def prepare_images(self, images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[ImageInfo]]:
        """Resize RGB images to the model's input sizes; returns the resized images and their sizes."""
        fitted = [fit_image(image, self.resize) for image in images]
        return [image for image, _ in fitted], [info for _, info in fitted]

    def encode(
        self,
        conversations: Sequence[Sequence[Message]],
        images: Sequence[Sequence[Image.Image]],
        add_generation_prompt: bool = True,
        convert_boxes: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
        videos: Sequence[Sequence[Clip]] | None = None,
    ) -> tuple[BatchFeature, list[list[ImageInfo]]]:
        """Render and tokenize a batch of conversations with their images and videos (left-padded).

        Args:
            conversations: B conversations; each image part consumes the next image of its row,
                each video part the next video.
            images: B lists of RGB images in original resolution.
            convert_boxes: rewrite ``[x1, y1, x2, y2]`` boxes in assistant messages from original
                pixels of the row's first image (the data convention) into the family's own (SFT targets).
            tools: tool schemas (``Tool.schema()``) rendered into the system prompt.
            videos: B lists of decoded clips (``vision.video.read_video``), or None.

        Returns:
            The model inputs (``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` ``[B, L]``,
            ``pixel_values`` ``[P, D]`` and ``image_grid_thw`` ``[I, 3]`` with images; with videos
            ``pixel_values_videos`` ``[Q, D]``, ``video_grid_thw`` ``[V, 3]`` and, for Qwen2.5-VL,
            ``second_per_grid_ts`` ``[V]``) and each row's ``ImageInfo``s.
        """
        fitted = [self.prepare_images(row) for row in images]
        inputs = self.encode_resized(conversations, [row for row, _ in fitted], [infos for _, infos in fitted],
                                     add_generation_prompt, convert_boxes, tools, videos)
        return inputs, [infos for _, infos in fitted]

    def encode_resized(self, conversations: Sequence[Sequence[Message]], resized: Sequence[Sequence[Image.Image]],
                       infos: Sequence[Sequence[ImageInfo]], add_generation_prompt: bool = True,
                       convert_boxes: bool = False, tools: Sequence[dict[str, Any]] | None = None,
                       videos: Sequence[Sequence[Clip]] | None = None) -> BatchFeature:
        """``encode`` for images already fitted to the model (``prepare_images``: the resized
        images and their ``ImageInfo``s); returns the model inputs."""
        if convert_boxes:
            conversations = [
                [map_assistant_text(m, partial(self.adapter.text_boxes_to_model, info=row[0])) for m in conv]
                if row else conv for conv, row in zip(conversations, infos, strict=True)
            ]
        texts = self.render(conversations, add_generation_prompt, tools)
        clips = [clip for row in videos or [] for clip in row]
        return self.model_inputs(texts, [image for row in resized for image in row], clips)

    def encode_observation(self, text: str, images: Sequence[Image.Image]
                           ) -> tuple[list[int], dict[str, torch.Tensor], list[Image.Image]]:
        """Tokens of ``text`` that continues a conversation (an observation between model turns),
        with its images resized to the model's budget.

        Args:
            text: rendered text (``FamilyAdapter.render_continuation``); each image placeholder
                takes the next image.
            images: RGB images in their own resolution.

        Returns:
            The token ids (image placeholders expanded to the images' patch counts), the pixel
            inputs (``pixel_values`` ``[P, D]`` and ``image_grid_thw`` ``[I, 3]``; empty without
            images) and the images resized to the model's input size.
        """
        resized, _ = self.prepare_images(images)
        encoded = self.model_inputs([text], resized)
        pixels = {key: encoded[key] for key in ("pixel_values", "image_grid_thw") if key in encoded}
        return encoded["input_ids"][0].tolist(), pixels, resized

    def model_inputs(self, texts: Sequence[str], images: Sequence[Image.Image],
                     clips: Sequence[Clip] = ()) -> BatchFeature:
        """Rendered ``texts`` tokenized (left-padded) with each image and video placeholder, in
        order, expanded to the tokens of the next image (already fitted to the model) or clip.

        Raises:
            ValueError: the texts' placeholders and the images or clips given differ in number.
        """
        data: dict[str, Any] = {}
        image_tokens: list[int] = []
        if images:
            pixels = self.processor.image_processor(images=list(images), return_tensors="pt")
            data |= {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
            image_tokens = (pixels["image_grid_thw"].prod(dim=-1) // self.adapter.merge_size ** 2).tolist()
        patches = [patch_video(clip.frames, self.video) for clip in clips]
        prompts = [VideoPrompt(p.grid_thw, tuple(c.timestamps)) for p, c in zip(patches, clips, strict=True)]
        if patches:
            data |= self._video_tensors(patches, prompts, clips)
        image_iter, video_iter = iter(image_tokens), iter(prompts)
        expanded = [self.adapter.expand_vision(text, image_iter, video_iter) for text in texts]
        if next(image_iter, None) is not None or next(video_iter, None) is not None:
            raise ValueError(f"{len(image_tokens)} image(s) and {len(prompts)} video(s) given for fewer placeholders "
                             "in the text")
        encoded = self.tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt")
        data |= {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                 "mm_token_type_ids": self.adapter.mm_token_type_ids(encoded["input_ids"], self.tokenizer)}
        return BatchFeature(data)

    def _video_tensors(self, patches: Sequence[VideoPatches], prompts: Sequence[VideoPrompt],
                       clips: Sequence[Clip]) -> dict[str, torch.Tensor]:
        """``pixel_values_videos`` ``[Q, D]``, ``video_grid_thw`` ``[V, 3]`` and, for Qwen2.5-VL,
        ``second_per_grid_ts`` ``[V]``."""
        tensors = {"pixel_values_videos": torch.from_numpy(np.concatenate([p.pixel_values for p in patches])),
                   "video_grid_thw": torch.tensor([p.grid_thw for p in patches], dtype=torch.long)}
        seconds = [self.adapter.seconds_per_grid(prompt, clip.sample_fps) for prompt, clip in zip(prompts, clips,
                                                                                                  strict=True)]
        if seconds and seconds[0] is not None:
            tensors["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return tensors

    def render(self, conversations: Sequence[Sequence[Message]], add_generation_prompt: bool = True,
               tools: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """Each conversation as the family's chat template renders it (``tools``: schemas in the system prompt)."""
        return [self.adapter.render_chat(conv, add_generation_prompt, tools=tools) for conv in conversations]

    def token_counts(self, conversations: Sequence[Sequence[Message]], image_sizes: Sequence[Sequence[Size]],
                     add_generation_prompt: bool = True, tools: Sequence[dict[str, Any]] | None = None,
                     videos: Sequence[Sequence[VideoPrompt]] | None = None) -> list[int]:
        """Tokens each conversation takes as model input, image and video tokens included, without
        loading any pixels: the rendered text's tokens plus, per image, the merged patches of its
        model-input size minus the one placeholder token the text already counts, and per video
        (``video_prompt``) the tokens of its text minus the placeholder's three."""
        texts = self.render(conversations, add_generation_prompt, tools)
        text_tokens = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        factor = self.adapter.factor
        image_tokens = [sum(w * h // factor**2 - 1 for w, h in map(self.resize.target_size, sizes))
                        for sizes in image_sizes]
        video_tokens = [sum(len(self.tokenizer(self.adapter.video_text(video), add_special_tokens=False)["input_ids"])
                            - 3 for video in row) for row in videos or [[] for _ in texts]]
        return [len(ids) + extra + more for ids, extra, more in zip(text_tokens, image_tokens, video_tokens,
                                                                    strict=True)]

    def video_prompt(self, path: str, reader: ClipReader) -> VideoPrompt:
        """The grid and frame times a video will have, from its stream facts alone (no frame is
        decoded): what ``token_counts`` needs before training.

        Raises:
            VideoError: the file cannot be opened, or the sampling asks past its end.
        """
        info = probe_video(path, reader.backend)
        indices = sample_indices(info, reader.sampling, path)
        size = self.video.frame_size(info.shown_size, len(indices))
        return VideoPrompt(self.video.grid(size, len(indices)), tuple(index / info.fps for index in indices))

    def box_decoder(self, infos: Sequence[ImageInfo]) -> Callable[[Sequence[float]], Box] | None:
        """Parses this family's box coordinates for a sample's first image into original pixels
        (None for a sample without images)."""
        if not infos:
            return None
        info = infos[0]
        return lambda values: self.adapter.from_model(values, info)

    @torch.no_grad()
    def generate(self, inputs: BatchFeature, **kwargs: Any) -> torch.Tensor:
        """Sample continuations of ``inputs`` with vision tokens suppressed.

        Returns:
            ``[B, T]`` new token ids (prompt removed; padded with the pad id after EOS).
        """
        kwargs.setdefault("suppress_tokens", self.adapter.suppress_token_ids(self.tokenizer))
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        inputs = inputs.to(self.model.device)
        output = self.model.generate(**inputs, **kwargs)
        return output[:, inputs["input_ids"].shape[1]:]


def load_vlm(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> VLM:
    """Load a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model with its processor and adapter.

    Args:
        name_or_path: a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``), a local checkpoint directory,
            or a tiny preset (``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``).
        dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16``, ``float16`` or a torch dtype.
        attn_implementation: e.g. ``sdpa``, ``eager`` or ``flash_attention_2``; None lets
            transformers choose.
        min_pixels / max_pixels: override the image processor's resize bounds (pixels per image).
        device: where the model lives: ``auto`` (the GPU when there is one, else the CPU),
            ``cpu``, ``cuda`` or ``cuda:N`` (see ``resolve_device``); weights load straight there.
        seed: initialisation seed, used only by tiny presets.
    """
    torch_dtype = _resolve_dtype(dtype)
    target = resolve_device(device)
    name = str(name_or_path)
    if name in TINY_PRESETS:
        tiny_dtype = torch.float32 if torch_dtype == "auto" else torch_dtype
        vlm = build_tiny_vlm(name, seed=seed, dtype=tiny_dtype, attn_implementation=attn_implementation,
                             min_pixels=min_pixels, max_pixels=max_pixels)
        vlm.model.to(target)
        return vlm
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        presets = ", ".join(TINY_PRESETS)
        raise ValueError(f"cannot load a model config from {name!r} ({exc}); pass a Hugging Face hub id, "
                         f"a local checkpoint directory, or a tiny preset ({presets})") from exc
    adapter = adapter_for(config.model_type)
    model = AutoModelForImageTextToText.from_pretrained(
        name, dtype=torch_dtype, attn_implementation=attn_implementation, device_map=target
    )
    size_overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    try:
        image_processor = AutoImageProcessor.from_pretrained(name, **size_overrides)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ValueError(f"{name} holds model weights but no image processor or tokenizer files ({exc}); a model "
                         "folder needs preprocessor_config.json and the tokenizer files too: save it with "
                         "vlreason (a stage's final/) or with save_pretrained of the processor as well") from exc
    tokenizer.padding_side = "left"
    return _assemble(model, adapter, image_processor, tokenizer)


def build_tiny_vlm(
    preset: str,
    *,
    spec: TinySpec | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> VLM:
    """A seeded random-weight model of a tiny preset (see ``vlreason.models.tiny``)."""
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {', '.join(TINY_PRESETS)}")
    adapter = TINY_PRESETS[preset]
    tokenizer = tiny_tokenizer()
    spec = spec or TinySpec()
    config = tiny_config(adapter, tokenizer, spec)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=adapter.patch_size,
        merge_size=adapter.merge_size,
        temporal_patch_size=2,
        min_pixels=min_pixels or spec.min_tokens * adapter.factor**2,
        max_pixels=max_pixels or spec.max_tokens * adapter.factor**2,
    )
    return _assemble(model, adapter, image_processor, tokenizer)


def save_vlm(vlm: VLM, path: str | Path) -> Path:
    """Save model, tokenizer and image processor in the standard layout ``load_vlm`` reads."""
    path = Path(path)
    vlm.model.save_pretrained(path)
    vlm.tokenizer.save_pretrained(path)
    vlm.processor.image_processor.save_pretrained(path)
    return path


def _assemble(model: PreTrainedModel, adapter: FamilyAdapter, image_processor: Any, tokenizer: Any) -> VLM:
    size = image_processor.size
    resize = adapter.resize_policy(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    if image_processor.patch_size * image_processor.merge_size != adapter.factor:
        raise ValueError(f"the image processor's patch geometry ({image_processor.patch_size}x"
                         f"{image_processor.merge_size}) does not match {adapter.name}'s")
    video = VideoPatching(patch_size=adapter.patch_size, merge_size=adapter.merge_size, min_pixels=resize.min_pixels,
                          max_pixels=min(resize.max_pixels, VIDEO_MAX_TOKENS * adapter.factor**2),
                          temporal_patch_size=image_processor.temporal_patch_size,
                          mean=tuple(image_processor.image_mean), std=tuple(image_processor.image_std))
    return VLM(model=model, processor=build_processor(adapter, image_processor, tokenizer),
               adapter=adapter, resize=resize, video=video)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device ``device`` names: ``auto`` is the current GPU when CUDA is available, else the
    CPU; ``cpu``, ``cuda`` and ``cuda:N`` are checked to exist here.

    Raises:
        ValueError: an unknown name, or a GPU this machine does not have.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ValueError(f"device {device!r}: vlreason runs on cpu or cuda devices; use auto, cpu, cuda or cuda:N")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (resolved.index or 0) >= visible:
        where = f"{visible} CUDA device(s) visible" if visible else "no CUDA device visible (or a CPU-only torch)"
        raise ValueError(f"device {device!r}: this machine has {where}; use device auto or cpu")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
