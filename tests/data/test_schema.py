"""Schema rules for data written for other formats (LLaVA, Qwen's raw tokens) and for videos: each is
a problem of its line that shows the form vlreason accepts."""

from __future__ import annotations

import pytest

from vlreason.data import check_jsonl, read_jsonl
from vlreason.data.schema import MEDIA_FIELD_ALIASES

# ----------------------------------------------------------------------------- media and chat fields


def test_llava_image_field_is_a_problem_showing_images(make_png, write_jsonl):
    make_png("x.png")
    path = write_jsonl([{"image": "x.png", "prompt": "What is this?"}])
    valid, problems = check_jsonl(path)
    assert valid == 0  # not an extra column with a text-only sample
    assert [str(p) for p in problems] == [
        f'{path}:1: image: vlreason reads media from "images": ["x.png"] (a list; paths relative to the JSONL file)']


@pytest.mark.parametrize("name", sorted(MEDIA_FIELD_ALIASES))
def test_every_media_alias_is_a_problem(write_jsonl, name):
    path = write_jsonl([{"prompt": "q", name: "a.bin"}])
    valid, problems = check_jsonl(path)
    assert valid == 0
    ((field, message),) = [(p.field, p.message) for p in problems]
    assert field == name
    target = '"videos": ["clip.mp4"]' if name.startswith(("video", "frames")) else '"images": ["x.png"]'
    assert message.startswith(f"vlreason reads media from {target}")


def test_media_aliases_cover_the_usual_spellings():
    for name in ("image", "img", "image_path", "image_file", "image_url", "video", "video_path", "video_file",
                 "frames"):
        assert name in MEDIA_FIELD_ALIASES


def test_llava_conversations_field_is_a_problem_showing_messages(write_jsonl):
    conversations = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A cat."}]
    path = write_jsonl([{"prompt": "q", "conversations": conversations}])
    valid, problems = check_jsonl(path)
    assert valid == 0
    ((field, message),) = [(p.field, p.message) for p in problems]
    assert field == "conversations"
    assert '"messages": [{"role": "user", "content":' in message
    assert '"from"' in message and '"value"' in message and "convert" not in message
    path = write_jsonl([{"conversations": conversations}], name="llava.jsonl")  # no second "neither" problem
    assert [p.field for p in check_jsonl(path)[1]] == ["conversations"]


# ----------------------------------------------------------------------------- media markers in text

PROMPT_HINT = 'with "prompt", the images in "images" (and videos in "videos") are put before the text automatically'
MESSAGES_HINT = 'with "messages", write a {"type": "image"} part where each image goes'


def user_text(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "text", "text": text}]}]


MARKER_CASES = [
    ({"prompt": "<image>\nWhat is this?"}, "prompt", "<image>"),
    ({"prompt": "What happens in <video>?"}, "prompt", "<video>"),
    ({"prompt": "q", "response": "It is <image>."}, "response", "<image>"),
    ({"prompt": "q", "system": "Images come as <image>."}, "system", "<image>"),
    ({"prompt": "<|vision_start|>x"}, "prompt", "<|vision_start|>"),
    ({"messages": [{"role": "user", "content": "<image>\nWhat?"}]}, "messages[0].content", "<image>"),
    ({"messages": user_text("<video> what?")}, "messages[0].content[1]", "<video>"),
    ({"messages": user_text("<|image_pad|>")}, "messages[0].content[1]", "<|image_pad|>"),
    ({"messages": user_text("<|video_pad|>")}, "messages[0].content[1]", "<|video_pad|>"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|vision_end|>"}]},
     "messages[1].content", "<|vision_end|>"),
]


@pytest.mark.parametrize(("record", "field", "marker"), MARKER_CASES,
                         ids=[f"{field}:{marker}" for _, field, marker in MARKER_CASES])
def test_media_markers_in_text_are_problems_showing_the_accepted_form(write_jsonl, record, field, marker):
    hint = MESSAGES_HINT if "messages" in record else PROMPT_HINT
    path = write_jsonl([record])
    valid, problems = check_jsonl(path)
    assert valid == 0
    ((found, message),) = [(p.field, p.message) for p in problems]
    assert found == field
    assert message.startswith(f'"{marker}" is ')
    assert hint in message
    reason = "LLaVA placeholder" if marker in ("<image>", "<video>") else "image-token count"
    assert reason in message


def test_each_marker_in_one_text_is_reported(write_jsonl):
    path = write_jsonl([{"prompt": "<image><|image_pad|> and <image>"}])
    _, problems = check_jsonl(path)
    assert [(p.field, p.message.split(" is ")[0]) for p in problems] == [
        ("prompt", '"<image>"'), ("prompt", '"<|image_pad|>"')]


def test_image_parts_with_ordinary_text_stay_valid(make_png, write_jsonl):
    make_png("a.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "An <img> tag? 2 < 3"}]}]
    (sample,) = read_jsonl(write_jsonl([{"images": ["a.png"], "messages": messages}])).samples
    assert sample.messages == messages


# ----------------------------------------------------------------------------- videos


def test_sample_with_a_video_is_valid_and_listed(tmp_path, make_png, write_jsonl, make_video):
    (tmp_path / "clips").mkdir()
    make_video(tmp_path / "clips" / "a.mp4")
    make_png("a.png")
    path = write_jsonl([{"prompt": "still"}, {"videos": ["clips/a.mp4"], "prompt": "What happens?"},
                        {"images": ["a.png"], "prompt": "q"}])
    data = read_jsonl(path)
    assert data.samples[1].videos == [str((tmp_path / "clips" / "a.mp4").resolve())]
    assert data.samples[1].messages[0]["content"][0] == {"type": "video"}
    assert data.video_sources == [f"{path}:2"]
    assert check_jsonl(path) == (3, [])


def test_checking_decodes_the_frames_a_video_gives(tmp_path, write_jsonl, make_video):
    whole = make_video(tmp_path / "whole.mp4", frames=60, options={"movflags": "faststart"})
    (tmp_path / "cut.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])  # a valid header
    path = write_jsonl([{"videos": ["whole.mp4"], "prompt": "q"}, {"videos": ["cut.mp4"], "prompt": "q"}])
    assert len(read_jsonl(path).samples) == 2  # reading for training only checks that the files exist
    valid, problems = check_jsonl(path)
    assert valid == 1
    assert [(p.line, p.field) for p in problems] == [(2, "videos[0]")]
    assert "cut.mp4: frames" in problems[0].message and "truncated or damaged" in problems[0].message


def test_reading_checks_that_videos_exist_and_checking_sniffs_the_container(tmp_path, write_jsonl):
    (tmp_path / "notes.mp4").write_text("not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    path = write_jsonl([
        {"videos": ["notes.mp4"], "prompt": "q"},
        {"videos": ["gone.mp4"], "prompt": "q"},
        {"videos": ["empty.mp4"], "prompt": "q"},
        {"videos": ["data:video/mp4;base64,AAAA"], "prompt": "q"},
    ])
    data = read_jsonl(path, on_bad_sample="skip")  # the training path: existence only, no sniffing
    assert [s.source for s in data.samples] == [f"{path}:1"]
    assert [(p.line, p.field) for p in data.skipped] == [(2, "videos[0]"), (3, "videos[0]"), (4, "videos[0]")]
    assert "video file not found" in data.skipped[0].message
    assert "the video is empty (0 bytes)" in data.skipped[1].message
    assert "not a data URI" in data.skipped[2].message

    valid, problems = check_jsonl(path)
    assert valid == 0
    assert [(p.line, p.field) for p in problems] == [(i, "videos[0]") for i in range(1, 5)]
    assert "not a recognised video container" in problems[0].message
