"""The select_frames tool: frames by number or time range, decoded again at full size, refusals the
model can read, and a two-turn trajectory that selects frames of its prompt's video."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlreason.data.batch import Media
from vlreason.models.adapters import QWEN2_5_VL
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rollout import AgentLoop, SamplingParams, ScriptedEngine, ToolAgent, encode_prompts
from vlreason.tools import ToolContext, ToolError, get_tool
from vlreason.vision.video import FrameSampling, read_video

pytest.importorskip("av")


@pytest.fixture
def clip(tmp_path, make_video):
    """The prompt's view of a 30-frame, 3 s clip at 10 fps (64 x 48): 4 small frames."""
    path = make_video(tmp_path / "v.mp4", frames=30, size=(64, 48), fps=10)
    return read_video(path, FrameSampling(fps=2, min_frames=4, max_frames=4), fit=lambda size, count: (32, 24))


def context_with(clips) -> ToolContext:
    return ToolContext(images=[], infos=[], adapter=QWEN2_5_VL, resize=QWEN2_5_VL.resize_policy(1024, 65536),
                       clips=clips)


def test_frames_by_number_come_back_at_full_size(clip):
    result = get_tool("select_frames")(context_with([clip]), {"frames": [12, 3]})
    assert result.text == "Frames 3 (0.30 s), 12 (1.20 s) of video 0."
    assert [image.size for image in result.images] == [(64, 48)] * 2  # the file's size, not the prompt's 32 x 24
    expected = read_video(clip.path, FrameSampling(indices=(3, 12))).frames
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in result.images]), expected)


def test_a_time_range_gives_frames_spread_over_it(clip):
    result = get_tool("select_frames", max_frames=3)(context_with([clip]), {"time_range": [1.0, 2.0]})
    assert result.text == "Frames 10 (1.00 s), 15 (1.50 s), 20 (2.00 s) of video 0."
    to_the_end = get_tool("select_frames", max_frames=2)(context_with([clip]), {"time_range": [2.0, 99.0]})
    assert to_the_end.text == "Frames 20 (2.00 s), 25 (2.50 s) of video 0."  # clamped to the clip's 3 s


@pytest.mark.parametrize("arguments, message", [
    ({}, "give frames (frame numbers) or time_range"),
    ({"frames": [1], "time_range": [0.0, 1.0]}, "not both"),
    ({"frames": [1, 2, 3, 4, 5]}, "at most 4 frames per call, got 5"),
    ({"frames": [0, 30]}, "frame numbers run from 0 to 29; [30] are outside"),
    ({"time_range": [2.0, 1.0]}, "with 0 <= start < end"),
    ({"time_range": [5.0, 6.0]}, "the video lasts 3.00 s; start 5.0 is past its end"),
    ({"frames": [1], "video": 1}, "video must be between 0 and 0, got 1"),
])
def test_refusals_say_what_to_write(clip, arguments, message):
    with pytest.raises(ToolError) as info:
        get_tool("select_frames")(context_with([clip]), arguments)
    assert message in str(info.value)


def test_without_a_video_the_model_is_told():
    with pytest.raises(ToolError, match="there is no video in this conversation"):
        get_tool("select_frames")(context_with([]), {"frames": [0]})


def test_a_trajectory_selects_frames_of_its_prompt_video(clip):
    vlm = build_tiny_vlm("tiny-qwen3-vl")
    reader = vlm.use_video(FrameSampling(fps=2, min_frames=4, max_frames=4))
    question = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which way?"}]}]
    agent = ToolAgent([get_tool("select_frames")])
    prompts = encode_prompts(vlm, [question], [Media([], [reader(clip.path)])], agent.schemas())
    call = {"name": "select_frames", "arguments": {"time_range": [0.0, 3.0]}}
    scripts = [[f"<tool_call>\n{json.dumps(call)}\n</tool_call>", "<answer>left</answer>"]]
    trajectories = AgentLoop(vlm, ScriptedEngine(vlm, scripts), agent, max_turns=2).run(
        prompts, SamplingParams(max_new_tokens=64))
    assert trajectories.tool_calls[0] == [{"name": "select_frames", "arguments": call["arguments"], "error": None}]
    assert trajectories.reward_columns()["images_seen"] == [4]
    assert trajectories.pixels[0]["image_grid_thw"].shape == (4, 3)  # the frames reach the training forward
    assert trajectories.texts == ["<answer>left</answer>"]


def test_frames_past_the_memory_window_leave_the_view_with_a_note(clip):
    """A four-image window: the third call's two frames push the first call's two out of view;
    a call for more frames than the window holds is refused."""
    vlm = build_tiny_vlm("tiny-qwen2.5-vl")
    reader = vlm.use_video(FrameSampling(fps=2, min_frames=4, max_frames=4))
    question = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which way?"}]}]
    agent = ToolAgent([get_tool("select_frames", max_frames=8)])
    prompts = encode_prompts(vlm, [question], [Media([], [reader(clip.path)])], agent.schemas())
    calls = [{"name": "select_frames", "arguments": {"frames": frames}} for frames in ([0, 1], [2, 3], [4, 5],
                                                                                          [6, 7, 8, 9, 10])]
    scripts = [[f"<tool_call>\n{json.dumps(call)}\n</tool_call>" for call in calls] + ["<answer>left</answer>"]]
    out = AgentLoop(vlm, ScriptedEngine(vlm, scripts), agent, max_turns=5, max_images=16, memory_window=4).run(
        prompts, SamplingParams(max_new_tokens=64))
    assert [call["error"] for call in out.tool_calls[0][:3]] == [None] * 3
    assert "returned 5 image(s) but only 4 more fit" in out.tool_calls[0][3]["error"]
    assert out.reward_columns()["images_seen"] == [6] and out.reward_columns()["images_dropped"] == [2]
    first_frames = vlm.adapter.image_spans(out.ids[0].tolist(), vlm.tokenizer)[:2]
    assert [(span.start, span.stop) for span in out.hidden[0]] == first_frames
    text = vlm.tokenizer.decode(out.ids[0, out.hidden[0][0].since:])
    assert text.index("Frames 4 (") < text.index('Out of view now, the visual memory holds 4 images: the images of '
                                                  'select_frames {"frames": [0, 1]}. Call again to see them.')
