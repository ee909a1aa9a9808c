"""Family adapters: chat rendering against the official templates, box conventions."""

from __future__ import annotations

from pathlib import Path

import pytest
import trl
from hypothesis import given, settings
from hypothesis import strategies as st

from vlreason.models import ADAPTERS, adapter_for
from vlreason.models.adapters import QWEN2_5_VL, QWEN2_VL, QWEN3_VL, BoxConvention
from vlreason.models.tiny import tiny_tokenizer
from vlreason.tools import get_tool
from vlreason.vision.images import ImageInfo, ResizePolicy

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# Qwen2-VL ships a chat template byte-identical to Qwen2.5-VL's (trl notes this too).
OFFICIAL = {QWEN2_VL: "qwen2_5_vl.jinja", QWEN2_5_VL: "qwen2_5_vl.jinja", QWEN3_VL: "qwen3_vl.jinja"}

IMAGE, VIDEO = {"type": "image"}, {"type": "video"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


CONVERSATIONS = {
    "one image": [{"role": "user", "content": [IMAGE, text("Where is the red triangle?")]}],
    "two images": [{"role": "user", "content": [IMAGE, text("Compare"), IMAGE, text(" these.")]}],
    "video": [{"role": "user", "content": [VIDEO, text("What happens?")]}],
    "system": [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": [IMAGE, text("Count the circles.")]},
    ],
    "system parts": [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": "No image here."},
    ],
    "multi turn": [
        {"role": "user", "content": [IMAGE, text("What is it?")]},
        {"role": "assistant", "content": "<think>Round.</think><answer>circle</answer>"},
        {"role": "user", "content": [text("And its colour?")]},
    ],
    "with response": [
        {"role": "user", "content": [IMAGE, text("Where?")]},
        {"role": "assistant", "content": [text("<answer>[1, 2, 3, 4]</answer>")]},
    ],
}


CALL = '<tool_call>\n{"name": "crop", "arguments": {"bbox_2d": [10, 20, 300, 400]}}\n</tool_call>'
TOOL_CONVERSATIONS = {
    "tool call and image response": [
        {"role": "user", "content": [IMAGE, text("What does the sign say?")]},
        {"role": "assistant", "content": "<think>Too small; zoom in.</think>\n" + CALL},
        {"role": "tool", "content": [IMAGE, text("Zoomed in.")]},
    ],
    "two tool responses": [
        {"role": "system", "content": "Use tools when they help."},
        {"role": "user", "content": [IMAGE, text("Compare the corners.")]},
        {"role": "assistant", "content": CALL + "\n" + CALL},
        {"role": "tool", "content": [IMAGE]},
        {"role": "tool", "content": "crop: the box lies outside the image; give a box inside it"},
        {"role": "assistant", "content": "<answer>left</answer>"},
    ],
    "tool then user": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": CALL},
        {"role": "tool", "content": [text("no image")]},
        {"role": "user", "content": [text("Try again.")]},
    ],
}
# A hand-written schema beside the built-in crop's: non-ASCII text must stay unescaped (tojson).
SCHEMAS = [
    get_tool("crop").schema(),
    {"type": "function", "function": {"name": "größe", "description": "Größe des Bildes — in Pixeln.",
                                      "parameters": {"type": "object", "properties": {}, "required": []}}},
]


def official_render(adapter, messages, add_generation_prompt, tools=None):
    template = (TEMPLATES / OFFICIAL[adapter]).read_text()
    return tiny_tokenizer().apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
    )


@pytest.mark.parametrize("adapter", [QWEN2_VL, QWEN2_5_VL, QWEN3_VL], ids=lambda a: a.name)
@pytest.mark.parametrize("name", list(CONVERSATIONS) + list(TOOL_CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_equals_official_template(adapter, name, add_generation_prompt):
    messages = CONVERSATIONS.get(name) or TOOL_CONVERSATIONS[name]
    ours = adapter.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ours == official_render(adapter, messages, add_generation_prompt)


def official_tools_block() -> str:
    """The ``# Tools`` block as Qwen3-VL's own template writes it (its whole system turn when
    the conversation has no system message)."""
    rendered = official_render(QWEN3_VL, [{"role": "user", "content": "hi"}], False, tools=SCHEMAS)
    return rendered.removeprefix("<|im_start|>system\n").split("<|im_end|>")[0]


@pytest.mark.parametrize("name", list(CONVERSATIONS) + list(TOOL_CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_with_tools_equals_qwen3_template(name, add_generation_prompt):
    messages = CONVERSATIONS.get(name) or TOOL_CONVERSATIONS[name]
    ours = QWEN3_VL.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=SCHEMAS)
    assert ours == official_render(QWEN3_VL, messages, add_generation_prompt, tools=SCHEMAS)
    assert '"größe"' in ours and "# Tools" in ours


@pytest.mark.parametrize("adapter", [QWEN2_VL, QWEN2_5_VL], ids=lambda a: a.name)
@pytest.mark.parametrize("name", list(CONVERSATIONS) + list(TOOL_CONVERSATIONS))
def test_qwen2_tools_go_into_the_system_text(adapter, name):
    """Qwen2/2.5-VL's template has no tools section: ours equals it rendering a system message
    that holds the system text (or the default one), a blank line and Qwen3-VL's tools block."""
    messages = CONVERSATIONS.get(name) or TOOL_CONVERSATIONS[name]
    if messages[0]["role"] == "system":
        system, rest = messages[0]["content"], messages[1:]
        system = system if isinstance(system, str) else "".join(part["text"] for part in system)
    else:
        system, rest = "You are a helpful assistant.", messages
    with_block = [{"role": "system", "content": system + "\n\n" + official_tools_block()}, *rest]
    ours = adapter.render_chat(messages, tools=SCHEMAS)
    assert ours == official_render(adapter, with_block, True)
    assert official_render(adapter, messages, True, tools=SCHEMAS) == adapter.render_chat(messages)  # ignored there


CONTINUATIONS = [  # (head ending with an assistant turn, what follows)
    (TOOL_CONVERSATIONS["tool call and image response"][:2], TOOL_CONVERSATIONS["tool call and image response"][2:]),
    (TOOL_CONVERSATIONS["two tool responses"][:3], TOOL_CONVERSATIONS["two tool responses"][3:5]),
    (TOOL_CONVERSATIONS["tool then user"][:2], TOOL_CONVERSATIONS["tool then user"][2:]),
    (CONVERSATIONS["multi turn"][:2], CONVERSATIONS["multi turn"][2:]),
]


@pytest.mark.parametrize("adapter", [QWEN2_VL, QWEN2_5_VL, QWEN3_VL], ids=lambda a: a.name)
@pytest.mark.parametrize("index", range(len(CONTINUATIONS)))
@pytest.mark.parametrize("tools", [None, SCHEMAS], ids=["no tools", "tools"])
def test_render_continuation_extends_the_finished_turn(adapter, index, tools):
    head, following = CONTINUATIONS[index]
    finished = adapter.render_chat(head, add_generation_prompt=False, tools=tools)
    assert finished.endswith("<|im_end|>\n")
    whole = adapter.render_chat([*head, *following], add_generation_prompt=True, tools=tools)
    assert whole == finished[:-1] + adapter.render_continuation(following)


def test_render_continuation_hand_written():
    tool = [{"role": "tool", "content": "42"}]
    assert QWEN3_VL.render_continuation(tool) == (
        "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert QWEN2_5_VL.render_continuation(tool) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


def test_qwen2_adds_default_system_prompt_and_qwen3_does_not():
    messages = CONVERSATIONS["one image"]
    assert QWEN2_5_VL.render_chat(messages).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert QWEN3_VL.render_chat(messages).startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")


def test_qwen3_refuses_what_its_template_would_drop():
    late_system = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(ValueError, match="role 'system'"):
        QWEN3_VL.render_chat(late_system)
    with pytest.raises(ValueError, match="drops images"):
        QWEN3_VL.render_chat([{"role": "assistant", "content": [IMAGE]}])


@pytest.mark.parametrize("adapter", [QWEN2_VL, QWEN2_5_VL, QWEN3_VL], ids=lambda a: a.name)
def test_structured_tool_calls_are_refused(adapter):
    call = {"type": "function", "function": {"name": "crop", "arguments": {"bbox_2d": [1, 2, 3, 4]}}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    with pytest.raises(ValueError, match="message 1: vlreason keeps tool calls in the assistant's text"):
        adapter.render_chat(messages)


def test_unknown_part_type_is_an_error():
    with pytest.raises(ValueError, match="unknown message part type 'audio'"):
        QWEN2_VL.render_chat([{"role": "user", "content": [{"type": "audio"}]}])


def test_adapter_for_unsupported_family_lists_supported():
    assert adapter_for("qwen2_5_vl") is QWEN2_5_VL
    with pytest.raises(ValueError, match="'llava' is not supported.*qwen2_vl.*qwen2_5_vl.*qwen3_vl"):
        adapter_for("llava")


def test_from_model_hand_computed():
    relative = ImageInfo(original_size=(200, 100), input_size=(196, 112))
    assert QWEN2_VL.from_model((500, 250, 1000, 1000), relative) == (100.0, 25.0, 200.0, 100.0)
    assert QWEN3_VL.from_model((0, 0, 500, 500), relative) == (0.0, 0.0, 100.0, 50.0)
    pixels = ImageInfo(original_size=(150, 100), input_size=(140, 112))
    # x scales by 150/140, y by 100/112
    assert QWEN2_5_VL.from_model((70, 56, 140, 112), pixels) == pytest.approx((75.0, 50.0, 150.0, 100.0))


def test_to_model_hand_computed_and_clamped():
    info = ImageInfo(original_size=(150, 100), input_size=(140, 112))
    assert QWEN2_VL.to_model((75.0, 50.0, 150.0, 100.0), info) == [500, 500, 1000, 1000]
    assert QWEN2_5_VL.to_model((75.0, 50.0, 150.0, 100.0), info) == [70, 56, 140, 112]
    assert QWEN2_5_VL.to_model((-10.0, 0.0, 400.0, 100.0), info) == [0, 0, 140, 112]


# Qwen2.5-VL's released preprocessor bounds (the tight ones make the round trip hardest).
REAL_POLICIES = {adapter: adapter.resize_policy(min_pixels=3136, max_pixels=12845056) for adapter in ADAPTERS.values()}


@settings(max_examples=300, deadline=None)
@given(
    adapter=st.sampled_from(list(ADAPTERS.values())),
    width=st.integers(28, 2000),
    height=st.integers(28, 2000),
    corners=st.tuples(*[st.floats(0, 1) for _ in range(4)]),
)
def test_box_round_trip_within_one_pixel(adapter, width, height, corners):
    policy = REAL_POLICIES[adapter]
    info = ImageInfo(original_size=(width, height), input_size=policy.target_size((width, height)))
    a, b, c, d = corners
    box = (min(a, c) * width, min(b, d) * height, max(a, c) * width, max(b, d) * height)
    back = adapter.from_model(adapter.to_model(box, info), info)
    assert max(abs(x - y) for x, y in zip(box, back, strict=True)) <= 1.0


@settings(max_examples=200, deadline=None)
@given(
    adapter=st.sampled_from(list(ADAPTERS.values())),
    width=st.integers(16, 6000),
    height=st.integers(16, 6000),
    max_tokens=st.integers(4, 256),
)
def test_box_round_trip_error_is_half_a_model_unit(adapter, width, height, max_tokens):
    """Any size and policy: the error is rounding to the model's integer grid, nothing more."""
    unit_area = adapter.factor**2
    policy = ResizePolicy(factor=adapter.factor, min_pixels=unit_area, max_pixels=max_tokens * unit_area)
    if max(width, height) / min(width, height) > 200:
        return
    info = ImageInfo(original_size=(width, height), input_size=policy.target_size((width, height)))
    box = (0.31 * width, 0.27 * height, 0.77 * width, 0.93 * height)
    back = adapter.from_model(adapter.to_model(box, info), info)
    if adapter.box_convention is BoxConvention.RELATIVE_1000:
        unit = (width / 1000, height / 1000)
    else:
        unit = (width / info.input_size[0], height / info.input_size[1])
    for i, (x, y) in enumerate(zip(box, back, strict=True)):
        assert abs(x - y) <= unit[i % 2] / 2 + 1e-9


def test_suppress_and_mm_token_type_ids():
    tokenizer = tiny_tokenizer()
    suppressed = QWEN2_5_VL.suppress_token_ids(tokenizer)
    names = tokenizer.convert_ids_to_tokens(suppressed)
    assert set(names) == {"<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"}
    ids = tokenizer("a<|image_pad|><|image_pad|>b<|video_pad|>", return_tensors="pt")["input_ids"]
    types = QWEN2_5_VL.mm_token_type_ids(ids, tokenizer)
    expected = [1 if t == "<|image_pad|>" else 2 if t == "<|video_pad|>" else 0
                for t in tokenizer.convert_ids_to_tokens(ids[0])]
    assert types[0].tolist() == expected
    assert types.shape == ids.shape and types.dtype == ids.dtype
