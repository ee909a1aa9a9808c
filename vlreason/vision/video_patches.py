"""Decoded video frames -> the vision tower's flat patches, without torchvision.

transformers' Qwen-VL video processors need torchvision, which cannot load next to this
project's CPU torch, so sampled frames are resized, normalised and cut into patches here, in the
layout the video processors produce (``pixel_values_videos`` ``[P, C * t * p * p]`` and
``video_grid_thw``). Every frame of a clip gets one size: a per-frame pixel range, and a total
budget across the clip (qwen-vl-utils' rule: an even share per frame, never below 1.05 x the
per-frame minimum), so a long clip cannot blow up the sequence. Frame counts are padded to the
temporal patch by repeating the last frame, as the processors do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlreason.vision.images import ResizePolicy
from vlreason.vision.video_backends import scaled

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VideoPatching:
    """The patch geometry and pixel budget of one model's video input.

    Attributes:
        patch_size: side of one vision patch in pixels (14 for Qwen2/2.5-VL, 16 for Qwen3-VL).
        merge_size: patches merged per side into one language-model token (2).
        temporal_patch_size: frames per temporal patch (2).
        min_pixels / max_pixels: the range of one frame's area after resizing.
        total_pixels: the budget of all frames together (None: no total budget).
        mean / std: per-channel normalisation of pixel values in [0, 1].
    """

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    total_pixels: int | None = None
    temporal_patch_size: int = 2
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def frame_size(self, size: tuple[int, int], frames: int) -> tuple[int, int]:
        """The ``(width, height)`` each frame of a ``frames``-frame clip of ``size`` is given
        (``read_video``'s ``fit``)."""
        return self.frame_policy(frames).target_size(size)

    def grid(self, size: tuple[int, int], frames: int) -> tuple[int, int, int]:
        """``(t, h, w)`` of a ``frames``-frame clip whose frames are ``size`` ``(width, height)``
        after ``frame_size``: temporal patches (the last padded) and patch rows and columns."""
        width, height = size
        return -(-frames // self.temporal_patch_size), height // self.patch_size, width // self.patch_size

    def frame_policy(self, frames: int) -> ResizePolicy:
        """The resize policy of each frame of a ``frames``-frame clip: the per-frame range, with
        the maximum lowered to an even share of ``total_pixels`` (at least 1.05 x ``min_pixels``)."""
        most = self.max_pixels
        if self.total_pixels is not None:
            share = self.total_pixels * self.temporal_patch_size // max(frames, 1)
            most = max(min(most, share), int(self.min_pixels * 1.05))
        return ResizePolicy(factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels, max_pixels=most)


@dataclass
class VideoPatches:
    """One clip as the vision tower takes it.

    Attributes:
        pixel_values: ``[t * h * w, 3 * temporal_patch_size * patch_size ** 2]`` float32.
        grid_thw: ``(t, h, w)``: temporal patches, and patch rows and columns per frame.
        frame_size: ``(width, height)`` every frame was resized to.
    """

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    frame_size: tuple[int, int]

    def token_count(self, merge_size: int) -> int:
        """Language-model tokens the clip takes (``<|video_pad|>`` placeholders)."""
        t, h, w = self.grid_thw
        return t * h * w // merge_size ** 2


def patch_video(frames: np.ndarray, patching: VideoPatching) -> VideoPatches:
    """Resize (bicubic, as the image path), normalise and cut ``frames`` into patches.

    Args:
        frames: ``[T, H, W, 3]`` uint8 RGB, T >= 1.

    Returns:
        The clip's patches; T is padded to a multiple of ``temporal_patch_size`` with copies of
        the last frame.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"expected [T, H, W, 3] frames with T >= 1, got shape {frames.shape}")
    height, width = frames.shape[1:3]
    size = patching.frame_size((width, height), len(frames))
    pixels = _normalised(scaled(frames, size), patching)
    pad = -len(pixels) % patching.temporal_patch_size
    if pad:
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
    flat, grid = _patchify(pixels.transpose(0, 3, 1, 2), patching)
    return VideoPatches(pixel_values=flat, grid_thw=grid, frame_size=size)


def _normalised(frames: np.ndarray, patching: VideoPatching) -> np.ndarray:
    """``(v / 255 - mean) / std`` of uint8 ``[T, H, W, 3]`` frames, as float32, through one
    256-entry table per channel (the same values as computing it, in a third of the time)."""
    levels = np.arange(256, dtype=np.float32) / 255.0
    out = np.empty(frames.shape, np.float32)
    for channel in range(3):
        table = (levels - np.float32(patching.mean[channel])) / np.float32(patching.std[channel])
        out[..., channel] = table[frames[..., channel]]
    return out


def _patchify(video: np.ndarray, patching: VideoPatching) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``[T, C, H, W]`` -> ``[t * h * w, C * tp * p * p]`` in the processors' order: temporal
    patch, then merge windows row by row, the patches of each window, then channel, time, pixels."""
    frames, channels, height, width = video.shape
    p, m, tp = patching.patch_size, patching.merge_size, patching.temporal_patch_size
    t, h, w = patching.grid((width, height), frames)
    patches = video.reshape(t, tp, channels, h // m, m, p, w // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(t * h * w, channels * tp * p * p)), (t, h, w)
