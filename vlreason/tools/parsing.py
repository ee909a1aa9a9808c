"""Find tool calls in a completion, in Qwen's native format. Never raises.

Qwen-VL models call a tool by writing one JSON object per call between tags::

    <tool_call>
    {"name": "crop", "arguments": {"bbox_2d": [10, 20, 200, 240]}}
    </tool_call>

Completions are untrusted text, so every ``<tool_call>`` block becomes a ``ToolCall``: a
well-formed one has ``name`` and ``arguments``; a malformed one has ``error`` set to a short
message the model can act on (the agent loop shows it as the observation). An unclosed final
``<tool_call>`` (a completion cut off mid-call) is malformed too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_FORM = '{"name": <tool name>, "arguments": {...}}'


@dataclass(frozen=True)
class ToolCall:
    """One ``<tool_call>`` block: ``name`` and ``arguments`` when it parsed, else ``error``."""

    name: str | None
    arguments: dict[str, Any] | None
    error: str | None
    raw: str  # the block as written, tags included


def has_tool_call(text: str) -> bool:
    """Whether ``text`` opens a tool call (well-formed or not)."""
    return OPEN in text


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` block of ``text``, in order, plus an unclosed final one.

    A block runs from an opening tag to the first closing tag after it (a linear scan: runaway
    generations full of opening tags stay fast).
    """
    calls = []
    start = text.find(OPEN)
    while start >= 0:
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:
            calls.append(_malformed(text[start:], f"the tool call is not closed; end it with {CLOSE}"))
            break
        calls.append(_parse_block(text[start + len(OPEN):end], text[start:end + len(CLOSE)]))
        start = text.find(OPEN, end + len(CLOSE))
    return calls


def _parse_block(body: str, raw: str) -> ToolCall:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return _malformed(raw, f"the tool call is not valid JSON ({_reason(exc)}); write {_FORM}")
    if not isinstance(value, dict):
        return _malformed(raw, f"the tool call must be a JSON object {_FORM}")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return _malformed(raw, f'the tool call needs a "name" string: {_FORM}')
    arguments = _arguments(value.get("arguments"))
    if arguments is None:
        return ToolCall(name, None, f'tool {name!r}: "arguments" must be a JSON object, e.g. {{"x": 1}}', raw)
    return ToolCall(name, arguments, None, raw)


def _arguments(value: Any) -> dict[str, Any] | None:
    """The arguments object; a JSON string holding an object is accepted (some models write that)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at character {exc.pos}"
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _malformed(raw: str, error: str) -> ToolCall:
    return ToolCall(None, None, error, raw)
