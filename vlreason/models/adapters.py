"""Per-family knowledge about Qwen-VL models, in one small frozen object per family.

An adapter owns everything that differs between model families and nothing else:

* the chat template (``render_chat`` produces exactly the text the family's official Jinja
  template renders for the same messages and tool schemas; tests check this against the copies
  shipped in trl), and ``render_continuation``, the text that follows an assistant turn when the
  conversation goes on (tool responses in a multi-turn rollout);
* the box convention and the two conversions at the model boundary (``to_model`` when a box is
  shown to the model, ``from_model`` when a box is parsed from its output);
* the vision patch geometry (and so the resize policy), ``mm_token_type_ids``, the tokens to
  suppress while sampling, the special tokens that carry meaning in output text (kept when a
  completion is decoded), and LoRA target modules for the language model only.

Nothing outside ``vlreason.models`` knows a model's box convention: rewards, tools and metrics
see only original-image pixels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlreason.choices import Choice
from vlreason.data.schema import VISION_SPECIAL_TOKENS, Message
from vlreason.vision.boxes import Box
from vlreason.vision.images import ImageInfo, ResizePolicy

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
# Special tokens that carry meaning in a completion's text: Qwen-VL grounds a phrase as
# <|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|> (a quadrilateral
# between the quad tokens), and the reward parser reads them. Decoding keeps these and drops every
# other special token: padding, end-of-sequence, chat and vision tokens.
TEXT_SPECIAL_TOKENS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                       "<|quad_start|>", "<|quad_end|>")
QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen3-VL's template lists tool schemas in the system turn between these two texts.
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
_PLACEHOLDERS = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER))
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_TEXT_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")

# LoRA on the language model only. Qwen2.5-VL's vision MLP reuses gate/up/down_proj names,
# so a bare module-name list would also adapt the vision tower.
LANGUAGE_MODEL_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class BoxConvention(Choice):
    """How a family writes box coordinates in text."""

    RELATIVE_1000 = "relative_1000"  # integers 0..1000 relative to the image (Qwen2-VL, Qwen3-VL)
    INPUT_PIXELS = "input_pixels"  # absolute pixels of the resized model input (Qwen2.5-VL)


class VideoTime(Choice):
    """How a family tells the model when each video frame was shown."""

    ORDER = "order"  # Qwen2-VL: frame order alone (one temporal position per temporal patch)
    GRID_SECONDS = "grid_seconds"  # Qwen2.5-VL: seconds per temporal patch (second_per_grid_ts) scale positions
    TEXT = "text"  # Qwen3-VL: "<t seconds>" written before each temporal patch's tokens


@dataclass(frozen=True)
class VideoPrompt:
    """What a video's placeholder expands to: its grid and the times of its sampled frames."""

    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...]  # seconds, one per sampled frame (before temporal padding)


class ChatStyle(Choice):
    """Which chat template family renders the conversation."""

    QWEN2 = "qwen2"  # Qwen2-VL and Qwen2.5-VL (byte-identical templates), default system prompt
    QWEN3 = "qwen3"  # Qwen3-VL: no default system prompt, text-only assistant turns


@dataclass(frozen=True)
class FamilyAdapter:
    """What vlreason needs to know about one model family."""

    name: str  # user-facing name, e.g. "qwen2.5-vl"
    model_type: str  # transformers ``config.model_type``
    patch_size: int
    merge_size: int
    box_convention: BoxConvention
    chat_style: ChatStyle
    video_time: VideoTime
    temporal_patch_size: int = 2
    lora_target_modules: str = LANGUAGE_MODEL_LORA_TARGETS

    @property
    def factor(self) -> int:
        """Side in pixels of the square one merged vision token covers."""
        return self.patch_size * self.merge_size

    def resize_policy(self, min_pixels: int, max_pixels: int) -> ResizePolicy:
        return ResizePolicy(factor=self.factor, min_pixels=min_pixels, max_pixels=max_pixels)

    # ---- boxes at the model boundary -------------------------------------------------------

    def to_model(self, box: Box, info: ImageInfo) -> list[int]:
        """Canonical box (original pixels) -> the integers this family writes for it."""
        width, height = info.original_size
        if self.box_convention is BoxConvention.RELATIVE_1000:
            scale = (1000 / width, 1000 / height)
            limit = (1000, 1000)
        else:
            scale = (info.input_size[0] / width, info.input_size[1] / height)
            limit = info.input_size
        return [
            int(min(max(round(v * scale[i % 2]), 0), limit[i % 2]))
            for i, v in enumerate(box)
        ]

    def text_boxes_to_model(self, text: str, info: ImageInfo) -> str:
        """Rewrite every ``[x1, y1, x2, y2]`` quadruple of numbers in ``text`` (original pixels, as
        reference responses hold them) into this family's convention for the same image."""

        def convert(match: re.Match[str]) -> str:
            values = [float(v) for v in match.groups()]
            if values[2] < values[0] or values[3] < values[1]:
                return match.group(0)  # not a box: leave it as written
            return "[" + ", ".join(str(v) for v in self.to_model(tuple(values), info)) + "]"

        return _TEXT_BOX.sub(convert, text)

    def from_model(self, values: Sequence[float], info: ImageInfo) -> Box:
        """Coordinates as this family writes them -> canonical box in original pixels (unclamped)."""
        width, height = info.original_size
        if self.box_convention is BoxConvention.RELATIVE_1000:
            scale = (width / 1000, height / 1000)
        else:
            scale = (width / info.input_size[0], height / info.input_size[1])
        x1, y1, x2, y2 = values
        return (x1 * scale[0], y1 * scale[1], x2 * scale[0], y2 * scale[1])

    # ---- prompt text ------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> str:
        """Render ``messages`` exactly as the family's official chat template does.

        Messages are ``{"role": ..., "content": str | list[part]}`` with parts
        ``{"type": "image"}``, ``{"type": "video"}`` or ``{"type": "text", "text": ...}``. Role
        ``tool`` carries a tool's response; tool calls stay in the assistant's text, as the model
        wrote them (``<tool_call>...</tool_call>``).

        ``tools`` (``Tool.schema()`` dicts) are listed in the system turn as Qwen3-VL's template
        does (a ``# Tools`` block after the system text and a blank line). Qwen2-VL and Qwen2.5-VL's
        template has no tools section; there the same block is appended to the system text (the
        default "You are a helpful assistant." when the conversation has no system message), so
        the result equals their template rendering a system message that holds that text.
        """
        if self.chat_style is ChatStyle.QWEN2:
            text = _render_qwen2(messages, tools)
        else:
            text = _render_qwen3(messages, tools)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def render_continuation(self, messages: Sequence[Message]) -> str:
        """The text that follows an assistant turn's final ``<|im_end|>`` when ``messages`` (tool
        responses, or a user message) come next and the assistant speaks again.

        ``render_chat(head + messages)`` equals ``render_chat(head, add_generation_prompt=False)[:-1]
        + render_continuation(messages)`` for a ``head`` ending with an assistant message: the
        rendering of a finished turn ends ``<|im_end|>\n``, and generation stops at ``<|im_end|>``,
        so the newline belongs to the continuation. For Qwen3-VL and one tool message::

            "\n<|im_start|>user\n<tool_response>\n...\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        """
        turns = _qwen2_turns if self.chat_style is ChatStyle.QWEN2 else _qwen3_turns
        return "\n" + turns(messages, 0) + "<|im_start|>assistant\n"

    def expand_vision(self, text: str, image_tokens: Iterator[int], videos: Iterator[VideoPrompt]) -> str:
        """``text`` with each image and video placeholder (in order of appearance) replaced by
        the tokens the vision tower fills: ``image_tokens`` gives each image's token count,
        ``videos`` each video's grid and frame times (see ``video_text``).

        Raises:
            ValueError: ``text`` has more placeholders than images or videos were given.
        """

        def expand(match: re.Match[str]) -> str:
            if match.group(0) == IMAGE_PLACEHOLDER:
                count = next(image_tokens, None)
                if count is None:
                    raise ValueError("the text has more image placeholders than images were given")
                return "<|vision_start|>" + "<|image_pad|>" * count + "<|vision_end|>"
            video = next(videos, None)
            if video is None:
                raise ValueError("the text has more video placeholders than videos were given")
            return self.video_text(video)

        return _PLACEHOLDERS.sub(expand, text)

    def video_text(self, video: VideoPrompt) -> str:
        """The tokens of one video, as the family's reference processor writes them.

        Qwen2-VL and Qwen2.5-VL: ``<|vision_start|>``, one ``<|video_pad|>`` per merged patch of
        every temporal patch, ``<|vision_end|>``. Qwen3-VL: per temporal patch,
        ``<t seconds><|vision_start|>`` + its pads + ``<|vision_end|>``, t being the mean time of
        the patch's first and last frame to one decimal (the last frame repeated to fill the last
        patch). That is the original Qwen3-VL processor's layout (transformers 4.57, qwen-vl-utils);
        transformers 5.x keeps the template's own ``<|vision_start|>``/``<|vision_end|>`` around
        it as well.
        """
        t, h, w = video.grid_thw
        per_patch = "<|video_pad|>" * (h * w // self.merge_size ** 2)
        if self.video_time is not VideoTime.TEXT:
            return "<|vision_start|>" + per_patch * t + "<|vision_end|>"
        times = list(video.timestamps) or [0.0]
        times += times[-1:] * (-len(times) % self.temporal_patch_size)
        step = self.temporal_patch_size
        return "".join(f"<{(times[i] + times[i + step - 1]) / 2:.1f} seconds><|vision_start|>{per_patch}<|vision_end|>"
                       for i in range(0, step * t, step))

    def seconds_per_grid(self, video: VideoPrompt, sample_fps: float) -> float | None:
        """Qwen2.5-VL's ``second_per_grid_ts`` of a video sampled at ``sample_fps`` frames per
        second (temporal patch size / sampling rate, as its processor computes it); None for the
        other families."""
        if self.video_time is not VideoTime.GRID_SECONDS:
            return None
        return self.temporal_patch_size / sample_fps

    # ---- token-level facts ------------------------------------------------------------------

    def suppress_token_ids(self, tokenizer: Any) -> list[int]:
        """Vision special tokens: random or lightly tuned models sample them, and a generated
        ``<|image_pad|>`` would break the next forward pass (no pixels to fill it)."""
        return [int(tokenizer.convert_tokens_to_ids(t)) for t in VISION_SPECIAL_TOKENS]

    def mm_token_type_ids(self, input_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
        """``[B, L]`` modality of each token (0 text, 1 image, 2 video), as transformers 5.x
        requires beside ``image_grid_thw`` / ``video_grid_thw``."""
        image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        types = torch.zeros_like(input_ids)
        types[input_ids == image_id] = 1
        types[input_ids == video_id] = 2
        return types

    def image_spans(self, ids: Sequence[int], tokenizer: Any) -> list[tuple[int, int]]:
        """``(start, stop)`` token spans of the images in ``ids`` (placeholders expanded), in order:
        each from its ``<|vision_start|>`` through its ``<|vision_end|>``."""
        start_id, pad_id, end_id = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>",
                                                                    "<|vision_end|>"])
        spans, opened = [], None
        for index, token in enumerate(ids):
            if token == start_id:
                opened = index
            elif token == end_id and opened is not None:
                if pad_id in ids[opened + 1:index]:
                    spans.append((opened, index + 1))
                opened = None
        return spans


def _render_parts(content: str | Sequence[dict[str, Any]], text_only: bool = False) -> str:
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            pieces.append(str(part.get("text", "")))
        elif kind in ("image", "video") and not text_only:
            pieces.append(IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER)
        elif kind in ("image", "video"):
            raise ValueError(f"this family's chat template drops {kind}s in this position; move the {kind} "
                             "into a user message")
        else:
            raise ValueError(f"unknown message part type {kind!r}; use 'text', 'image' or 'video'")
    return "".join(pieces)


def _tools_block(tools: Sequence[dict[str, Any]]) -> str:
    """The ``# Tools`` text; each schema as Hugging Face's ``tojson`` writes it (key order kept)."""
    return TOOLS_HEADER + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + TOOLS_FOOTER


def _turn(role: str, body: str) -> str:
    return f"<|im_start|>{role}\n{body}<|im_end|>\n"


def _body(message: Message, index: int, text_only: bool = False) -> str:
    """A message's content as text; structured ``tool_calls`` are refused, since the templates
    would drop (Qwen2/2.5-VL) or reformat (Qwen3-VL) what the model wrote."""
    if message.get("tool_calls"):
        raise ValueError(f"message {index}: vlreason keeps tool calls in the assistant's text "
                         "(<tool_call>...</tool_call>, as the model writes them); drop 'tool_calls'")
    return _render_parts(message["content"], text_only)


def _render_qwen2(messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> str:
    if not messages:
        return ""
    has_system = messages[0]["role"] == "system"
    system = _body(messages[0], 0) if has_system else QWEN2_DEFAULT_SYSTEM
    if tools:
        system += "\n\n" + _tools_block(tools)
    return _turn("system", system) + _qwen2_turns(messages[1:] if has_system else messages, int(has_system))


def _qwen2_turns(messages: Sequence[Message], first_index: int) -> str:
    """Every message as ``<|im_start|>role ... <|im_end|>``, whatever its role (tool included)."""
    return "".join(_turn(m["role"], _body(m, first_index + i)) for i, m in enumerate(messages))


def _render_qwen3(messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> str:
    has_system = bool(messages) and messages[0]["role"] == "system"
    system = [_body(messages[0], 0, text_only=True)] if has_system else []
    if tools:
        system.append(_tools_block(tools))
    head = _turn("system", "\n\n".join(system)) if system else ""
    return head + _qwen3_turns(messages[1:] if has_system else messages, int(has_system))


def _qwen3_turns(messages: Sequence[Message], first_index: int) -> str:
    """User, assistant and tool turns; consecutive tool messages share one user turn, each
    response in ``<tool_response>`` tags. ``first_index`` numbers messages in error messages."""
    out = []
    for offset, message in enumerate(messages):
        role, index = message["role"], first_index + offset
        if role in ("user", "assistant"):
            out.append(_turn(role, _body(message, index, text_only=role == "assistant")))
        elif role == "tool":
            opens = offset == 0 or messages[offset - 1]["role"] != "tool"
            closes = offset == len(messages) - 1 or messages[offset + 1]["role"] != "tool"
            out.append(("<|im_start|>user" if opens else "")
                       + f"\n<tool_response>\n{_body(message, index)}\n</tool_response>"
                       + ("<|im_end|>\n" if closes else ""))
        else:
            raise ValueError(
                f"message {index}: vlreason renders a system message (first only), user, assistant and tool "
                f"messages for Qwen3-VL; got role {role!r}"
            )
    return "".join(out)


QWEN2_VL = FamilyAdapter("qwen2-vl", "qwen2_vl", 14, 2, BoxConvention.RELATIVE_1000, ChatStyle.QWEN2, VideoTime.ORDER)
QWEN2_5_VL = FamilyAdapter("qwen2.5-vl", "qwen2_5_vl", 14, 2, BoxConvention.INPUT_PIXELS, ChatStyle.QWEN2,
                           VideoTime.GRID_SECONDS)
QWEN3_VL = FamilyAdapter("qwen3-vl", "qwen3_vl", 16, 2, BoxConvention.RELATIVE_1000, ChatStyle.QWEN3, VideoTime.TEXT)
ADAPTERS = {adapter.model_type: adapter for adapter in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL)}


def silent_special_ids(tokenizer: Any) -> list[int]:
    """Ids of the special tokens that carry no meaning in a completion's text (every special
    token but ``TEXT_SPECIAL_TOKENS``): decoding drops them."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return sorted(special - set(tokenizer.convert_tokens_to_ids(list(TEXT_SPECIAL_TOKENS))))


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter for a transformers ``model_type``, or a clear error listing what is supported."""
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    supported = ", ".join(f"{a.model_type} ({a.name})" for a in ADAPTERS.values())
    raise ValueError(f"model type {model_type!r} is not supported; vlreason supports {supported}")
