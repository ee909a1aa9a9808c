"""Video patches without torchvision, checked against transformers' image processor on static
clips (a still image is a two-frame clip of the same frame to the vision tower) and against the
layout rules by hand."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlreason.vision.video_patches import VideoPatching, patch_video


def frames_of(seed: int, count: int, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(("patch", "mean"), [(14, (0.48145466, 0.4578275, 0.40821073)), (16, (0.5, 0.5, 0.5))])
@pytest.mark.parametrize("size", [(112, 84), (97, 61), (300, 40)])  # resized: to a multiple, odd, wide
def test_a_static_clip_gives_the_image_processors_patches(patch, mean, size):
    std = (0.26862954, 0.26130258, 0.27577711) if patch == 14 else (0.5, 0.5, 0.5)
    factor = patch * 2
    min_pixels, max_pixels = 4 * factor ** 2, 24 * factor ** 2
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels,
                                         max_pixels=max_pixels, image_mean=list(mean), image_std=list(std))
    frame = frames_of(0, 1, size)
    expected = processor(images=[frame[0]], return_tensors="np")
    got = patch_video(np.concatenate([frame, frame]),
                      VideoPatching(patch, 2, min_pixels, max_pixels, mean=mean, std=std))
    assert got.grid_thw == tuple(expected["image_grid_thw"][0])
    np.testing.assert_allclose(got.pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)


def test_an_odd_frame_count_repeats_the_last_frame():
    frames = frames_of(1, 3, (56, 56))
    patching = VideoPatching(14, 2, 56 * 56, 56 * 56)
    odd = patch_video(frames, patching)
    padded = patch_video(np.concatenate([frames, frames[-1:]]), patching)
    assert odd.grid_thw == (2, 4, 4)
    np.testing.assert_array_equal(odd.pixel_values, padded.pixel_values)
    one = patch_video(frames[:1], patching)  # a one-frame clip: one temporal patch of the frame twice
    assert one.grid_thw == (1, 4, 4) and one.token_count(merge_size=2) == 4


def test_frames_are_patched_in_time_order():
    # frame k is a flat grey k: every value of temporal patch j comes from frames 2j and 2j + 1
    frames = np.stack([np.full((28, 28, 3), k, np.uint8) for k in range(4)])
    patching = VideoPatching(14, 2, 28 * 28, 28 * 28, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    patches = patch_video(frames, patching)
    assert patches.grid_thw == (2, 2, 2)
    rows = patches.pixel_values.reshape(2, 4, 3, 2, 14 * 14)  # [t, patches, channel, time, pixels]
    values = np.round(rows * 255).astype(int)
    assert (values[0, :, :, 0] == 0).all() and (values[0, :, :, 1] == 1).all()
    assert (values[1, :, :, 0] == 2).all() and (values[1, :, :, 1] == 3).all()


def test_a_total_budget_shrinks_the_frames_of_long_clips():
    patching = VideoPatching(14, 2, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, total_pixels=256 * 28 * 28)
    # 8 frames: an even share of 256 tokens is 64 per frame pair -> 64 tokens of 28 x 28 per frame at most
    assert patching.frame_policy(8).max_pixels == 64 * 28 * 28
    # 64 frames: 256 * 2 / 64 = 8 tokens per frame
    assert patching.frame_policy(64).max_pixels == 8 * 28 * 28
    # 1024 frames: the share is under the minimum, which holds (x 1.05)
    assert patching.frame_policy(1024).max_pixels == int(4 * 28 * 28 * 1.05)
    long = patch_video(frames_of(2, 64, (448, 448)), patching)
    short = patch_video(frames_of(2, 8, (448, 448)), patching)
    assert long.frame_size[0] * long.frame_size[1] <= 8 * 28 * 28 < short.frame_size[0] * short.frame_size[1]
    # the clip's tokens stay within the budget's 256 whatever its length
    assert long.token_count(2) <= 256 and short.token_count(2) <= 256


def test_bad_frames_are_refused():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        patch_video(np.zeros((0, 28, 28, 3), np.uint8), VideoPatching(14, 2, 784, 784))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        patch_video(np.zeros((28, 28, 3), np.uint8), VideoPatching(14, 2, 784, 784))
