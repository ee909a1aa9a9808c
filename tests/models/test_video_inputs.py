"""Videos at the model boundary: our own placeholder expansion and video tensors per family,
checked by hand, against the processor on image-only batches, through a forward pass, and (where
torchvision loads, as in `make test-vllm`) against transformers' video processors."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch

from vlreason.models import TINY_PRESETS, load_vlm
from vlreason.models.adapters import QWEN2_5_VL, QWEN2_VL, QWEN3_VL, VideoPrompt
from vlreason.vision.video import Clip
from vlreason.vision.video_backends import VideoInfo

PRESETS = list(TINY_PRESETS)
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def clip_of(frames: np.ndarray, fps: float = 10.0, indices: list[int] | None = None) -> Clip:
    """A clip as ``read_video`` returns it: ``frames`` taken at ``indices`` of a 60-frame video."""
    indices = indices or np.linspace(0, 59, len(frames)).round().astype(int).tolist()
    info = VideoInfo(60, fps, frames.shape[2], frames.shape[1], 0, "test")
    return Clip(frames, indices, [i / fps for i in indices], info)


def random_frames(count: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def ask_video(n_images: int = 0) -> list[dict]:
    parts = [{"type": "image"}] * n_images + [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module", params=PRESETS)
def vlm(request):
    return load_vlm(request.param)


# ----------------------------------------------------------------------------- the text of a video


def test_qwen2_families_write_one_block_of_pads():
    video = VideoPrompt((3, 4, 6), (0.0, 0.5, 1.0, 1.5, 2.0, 2.5))
    for adapter in (QWEN2_VL, QWEN2_5_VL):
        assert adapter.video_text(video) == "<|vision_start|>" + "<|video_pad|>" * (3 * 4 * 6 // 4) + "<|vision_end|>"


def test_qwen3_writes_the_time_of_each_temporal_patch():
    # six frames -> three temporal patches; each time is the mean of the patch's two frames
    video = VideoPrompt((3, 4, 6), (0.0, 1.2, 2.4, 3.5, 4.7, 5.9))
    pads = "<|video_pad|>" * 6
    assert QWEN3_VL.video_text(video) == "".join(f"<{t} seconds><|vision_start|>{pads}<|vision_end|>"
                                                 for t in ("0.6", "3.0", "5.3"))
    # an odd frame count: the last frame fills the last patch (its time with itself)
    odd = VideoPrompt((2, 4, 6), (0.0, 1.0, 2.0))
    assert re.findall(r"<([\d.]+) seconds>", QWEN3_VL.video_text(odd)) == ["0.5", "2.0"]


def test_only_qwen2_5_scales_time_by_seconds_per_grid():
    video = VideoPrompt((8, 2, 2), tuple(range(16)))
    assert QWEN2_5_VL.seconds_per_grid(video, sample_fps=1.6) == pytest.approx(2 / 1.6)
    assert QWEN2_VL.seconds_per_grid(video, 1.6) is None and QWEN3_VL.seconds_per_grid(video, 1.6) is None
    # 16 frames spread over a 300-frame clip at 30 fps: qwen-vl-utils' sample fps 16 / 300 * 30 = 1.6
    info = VideoInfo(300, 30.0, 64, 48, 0, "test")
    indices = np.linspace(0, 299, 16).round().astype(int).tolist()
    assert Clip(np.zeros((16, 48, 64, 3), np.uint8), indices, [], info).sample_fps == pytest.approx(1.6)


def test_placeholders_are_filled_in_order_and_counted():
    text = "<|vision_start|><|image_pad|><|vision_end|> then <|vision_start|><|video_pad|><|vision_end|>"
    expanded = QWEN2_VL.expand_vision(text, iter([2]), iter([VideoPrompt((1, 2, 4), (0.0,))]))
    assert expanded == ("<|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|> then <|vision_start|>"
                        + "<|video_pad|>" * 2 + "<|vision_end|>")
    with pytest.raises(ValueError, match="more video placeholders than videos"):
        QWEN2_VL.expand_vision(text, iter([2]), iter([]))


# ----------------------------------------------------------------------------- model inputs


def test_image_batches_encode_as_the_processor_does(vlm):
    from PIL import Image

    images = [Image.fromarray(random_frames(1, w, h, seed=w)[0]) for w, h in ((150, 100), (60, 90), (120, 120))]
    resized, _ = vlm.prepare_images(images)
    texts = vlm.render([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a?"}]}],
                        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text",
                                                                                            "text": "b?"}]}]])
    ours = vlm.model_inputs(texts, resized)
    theirs = vlm.processor(text=texts, images=resized, padding=True, padding_side="left", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def test_a_video_reaches_the_model_in_frame_order(vlm):
    frames = random_frames(4, 64, 48)
    inputs, _ = vlm.encode([ask_video(1)], [[_image()]], videos=[[clip_of(frames)]])
    grid = inputs["video_grid_thw"]
    assert grid.shape == (1, 3) and grid[0, 0] == 2  # 4 frames -> 2 temporal patches
    pads = (inputs["input_ids"] == vlm.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum()
    assert pads == grid.prod() // 4
    assert (inputs["mm_token_type_ids"] == 2).sum() == pads
    assert inputs["pixel_values_videos"].shape == (grid.prod(), 3 * 2 * vlm.adapter.patch_size ** 2)
    assert ("second_per_grid_ts" in inputs) == (vlm.adapter is QWEN2_5_VL)
    with torch.no_grad():
        logits = vlm.model(**inputs).logits[0, -1]
        reversed_inputs, _ = vlm.encode([ask_video(1)], [[_image()]], videos=[[clip_of(frames[::-1].copy())]])
        reversed_logits = vlm.model(**reversed_inputs).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, reversed_logits)  # the frames, in their order, reach the model


def test_videos_and_placeholders_must_match(vlm):
    with pytest.raises(ValueError, match="more video placeholders than videos"):
        vlm.encode([ask_video()], [[]], videos=[[]])
    with pytest.raises(ValueError, match="1 video"):
        vlm.encode([[{"role": "user", "content": "no video here"}]], [[]], videos=[[clip_of(random_frames(2, 32, 32))]])


def _image():
    from PIL import Image

    return Image.fromarray(random_frames(1, 56, 56, seed=9)[0])


# ----------------------------------------------------------------------------- transformers' video processors


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' video processors need torchvision")
@pytest.mark.parametrize("preset", PRESETS)
def test_video_tensors_and_text_equal_transformers_video_processor(preset):
    from transformers.video_utils import VideoMetadata

    vlm = load_vlm(preset)
    adapter = vlm.adapter
    factor = adapter.factor
    frames = random_frames(6, 4 * factor, 3 * factor)  # already a multiple of the patch grid: no resampling
    clip = clip_of(frames, fps=10.0, indices=[0, 12, 24, 35, 47, 59])
    processor = _reference_processor(vlm)
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What?<|im_end|>\n"
    metadata = VideoMetadata(total_num_frames=60, fps=10.0, frames_indices=clip.indices)
    theirs = processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                       fps=clip.sample_fps, return_tensors="pt")
    ours = vlm.model_inputs([text], [], [clip])
    torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values_videos"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["video_grid_thw"], theirs["video_grid_thw"])
    if adapter is QWEN2_5_VL:
        torch.testing.assert_close(ours["second_per_grid_ts"], torch.as_tensor(theirs["second_per_grid_ts"],
                                                                                dtype=torch.float32))
    ours_text = vlm.tokenizer.decode(ours["input_ids"][0])
    theirs_text = vlm.tokenizer.decode(theirs["input_ids"][0])
    if adapter is QWEN3_VL:  # transformers 5.x keeps the template's own start/end around the timed blocks
        theirs_text = theirs_text.replace("<|vision_start|><0.", "<0.", 1).replace(
            "<|vision_end|><|vision_end|>", "<|vision_end|>", 1)
    assert ours_text == theirs_text


def _reference_processor(vlm):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    adapter, video = vlm.adapter, vlm.video
    size = {"shortest_edge": video.min_pixels, "longest_edge": 10_000 * adapter.factor ** 2}
    common = {"patch_size": adapter.patch_size, "merge_size": adapter.merge_size, "temporal_patch_size": 2,
              "size": size, "image_mean": list(video.mean), "image_std": list(video.std), "do_sample_frames": False}
    kinds = {QWEN2_VL: (Qwen2VLProcessor, Qwen2VLVideoProcessor), QWEN2_5_VL: (Qwen2_5_VLProcessor,
                                                                               Qwen2VLVideoProcessor),
             QWEN3_VL: (Qwen3VLProcessor, Qwen3VLVideoProcessor)}
    processor_cls, video_cls = kinds[adapter]
    return processor_cls(image_processor=vlm.processor.image_processor, tokenizer=vlm.tokenizer,
                         video_processor=video_cls(**common))


def test_token_counts_know_a_videos_tokens_before_decoding_it(vlm, tmp_path, make_video):
    from vlreason.vision.video import FrameSampling

    path = str(make_video(tmp_path / "clip.mp4", frames=30, size=(96, 64)))
    reader = vlm.use_video(FrameSampling(fps=4, max_frames=8), max_pixels=16 * vlm.adapter.factor ** 2)
    conversation = ask_video()
    predicted = vlm.token_counts([conversation], [[]], videos=[[vlm.video_prompt(path, reader)]])
    inputs, _ = vlm.encode([conversation], [[]], videos=[[reader(path)]])
    assert predicted == [inputs["input_ids"].shape[1]]
    assert inputs["video_grid_thw"][0, 0] == 4  # 3 s at 4 fps = 12 frames, at most 8: 4 temporal patches
