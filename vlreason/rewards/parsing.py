"""Parse model completions into answers, reasoning and boxes. Never raises.

Completions are untrusted text: empty, truncated, huge, broken JSON, NaN, negative or
reversed boxes. Every function here returns a value for any input: ``None`` or an empty list
when nothing usable is found. Boxes come out in canonical original-image pixels, clamped to the
image; the caller supplies the family's ``from_model`` conversion (identity for reference data,
which is written in original pixels).
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from vlreason.vision.boxes import Box, Size, box_area, clamp_box

MAX_BOXES = 1000  # more boxes than this in one answer are ignored (guards quadratic matching)
MAX_PARSE_CHARS = 100_000  # boxes are looked for in this many leading characters of an answer

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"  # one way to split any digit run
_QUAD = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")
_QWEN2_BOX = re.compile(  # the label is the reference right before the box, never across another one
    r"(?:<\|object_ref_start\|>((?:(?!<\|object_ref_start\|>).)*?)<\|object_ref_end\|>)?\s*<\|box_start\|>\s*"
    rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*<\|box_end\|>",
    re.S,
)
_FENCE = "```"
_OPENER = re.compile(r"[\[{]")
_STRUCTURE_CHARS = re.compile(r"""\\.|["'{}]""", re.S)  # an escape pair is one match, so \" never ends a string
BOX_KEYS = ("bbox_2d", "bbox", "box", "position", "bbox_xyxy")
LABEL_KEYS = ("label", "name", "class", "category")
CONFIDENCE_KEYS = ("confidence", "score", "conf")

BoxDecoder = Callable[[tuple[float, float, float, float]], Box]


class PredBox(NamedTuple):
    """A predicted box in original-image pixels with its optional label and confidence."""

    box: Box
    label: str | None = None
    confidence: float | None = None


class Parsed(NamedTuple):
    answer: str | None
    think: str | None
    boxes: list[PredBox]


def completion_text(completion: Any) -> str:
    """Text of a completion given as a string or as TRL's conversational message list."""
    if isinstance(completion, str):
        return completion
    if completion is None:
        return ""
    if isinstance(completion, Sequence) and all(isinstance(m, dict) for m in completion):
        content = completion[-1].get("content") if completion else None
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return ""
    return str(completion)


def extract_answer(text: str, truncated: bool = False) -> str | None:
    """The answer of a completion.

    The content of the last ``<answer>...</answer>`` when there is one; otherwise the text after
    the last ``</think>`` (whether the completion or the chat template opened the block: Qwen3-VL's
    thinking template writes ``<think>`` itself), or the whole text when there are no tags (a
    bare answer).

    Args:
        text: the completion.
        truncated: the completion hit the token limit; without a closed ``</answer>`` whatever
            it wrote last is cut-off text, not an answer.

    Returns:
        None when the answer is empty or cut off: an unclosed ``<answer>`` or ``<think>``, or a
        truncated completion without ``</answer>``.
    """
    end = text.rfind("</answer>")
    if end >= 0:
        start = text.rfind("<answer>", 0, end)
        answer = text[start + len("<answer>"):end] if start >= 0 else ""
    elif truncated or "<answer>" in text:
        return None
    elif "</think>" in text:
        answer = text.rpartition("</think>")[2]
    elif "<think>" in text:
        return None
    else:
        answer = text
    return answer.strip() or None


def extract_think(text: str) -> str | None:
    """The content of the first closed ``<think>`` block (possibly empty), or None.

    A completion with a ``</think>`` but no ``<think>`` continues a block the chat template
    opened: its reasoning is the text before the first ``</think>``.
    """
    start = text.find("<think>")
    if start < 0:
        end = text.find("</think>")
        return text[:end].strip() if end >= 0 else None
    end = text.find("</think>", start)
    if end < 0:
        return None
    return text[start + len("<think>"):end].strip()


def find_boxes(answer: str) -> list[tuple[tuple[float, float, float, float], str | None, float | None]]:
    """Raw boxes in the model's own coordinates: ``(coords, label, confidence)``.

    Understood forms, tried in order: JSON or Python-literal structures (``[x1, y1, x2, y2]``,
    lists of them, objects with ``bbox_2d``/``bbox``/``position`` plus ``label`` and
    ``confidence``), inside a markdown code fence or prose, or cut off mid-list (see
    ``_parse_structure``); Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``; any bracketed
    quadruple of numbers in the text.
    """
    answer = answer[:MAX_PARSE_CHARS]
    structured = _parse_structure(answer)
    if structured is not None:
        boxes = list(_walk(structured))
        if boxes:
            return boxes[:MAX_BOXES]
    qwen2 = [((float(a), float(b), float(c), float(d)), (label or None), None)
             for label, a, b, c, d in _QWEN2_BOX.findall(answer)] if "<|box_start|>" in answer else []
    if qwen2:
        return qwen2[:MAX_BOXES]
    return [(tuple(float(v) for v in quad), None, None) for quad in _QUAD.findall(answer)[:MAX_BOXES]]


def _parse_structure(answer: str) -> Any:
    """The JSON or Python-literal structure of an answer, or None.

    It is looked for inside the first markdown code fence (closed or cut off) when there is one,
    else in the whole answer, from the first ``[`` or ``{`` to the last ``]`` or ``}``: prose
    around it is ignored. When that span does not parse (typically a list cut off mid-way), the
    complete ``{...}`` objects written so far are kept.
    """
    text = _fenced(answer)
    opener = _OPENER.search(text)
    if opener is None:
        return None
    start = opener.start()
    end = max(text.rfind("]"), text.rfind("}")) + 1
    whole = _literal(text[start:end]) if end > start else None
    if whole is not None:
        return whole
    return _complete_objects(text[start:]) or None


def _fenced(text: str) -> str:
    """The content of the first markdown code fence of ``text`` (to the end when the fence is
    never closed), or ``text`` itself when it has none. A language tag such as ``json`` stays:
    the structure is looked for from its first bracket."""
    start = text.find(_FENCE)
    if start < 0:
        return text
    end = text.find(_FENCE, start + len(_FENCE))
    return text[start + len(_FENCE):end if end >= 0 else len(text)]


def _literal(text: str) -> Any:
    """``text`` parsed as JSON, else as a Python literal (Visual-RFT style:
    ``[{'Position': [...], 'Confidence': 0.9}]``), else None."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        with warnings.catch_warnings():  # model output such as `[1or 2]` makes the compiler warn on stderr
            warnings.simplefilter("ignore", SyntaxWarning)
            return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _complete_objects(text: str) -> list[Any]:
    """The outermost complete ``{...}`` objects of ``text`` that parse, in order: what a list cut
    off mid-way holds. One pass over the brackets and quotes (JSON or Python strings, escapes
    skipped), so a quote or brace inside a label does not end an object."""
    spans: list[tuple[int, int]] = []
    opened: list[int] = []
    quote = None
    for match in _STRUCTURE_CHARS.finditer(text):
        char = match.group()
        if quote is not None:
            quote = None if char == quote else quote
        elif char in ('"', "'"):
            quote = char
        elif char == "{":
            opened.append(match.start())
        elif char == "}" and opened:
            start = opened.pop()
            while spans and spans[-1][0] > start:  # objects nested in this one are part of it
                spans.pop()
            spans.append((start, match.end()))
    objects = (_literal(text[start:end]) for start, end in spans)
    return [obj for obj in objects if obj is not None]


def _walk(node: Any, depth: int = 0) -> Any:
    if depth > 4:
        return
    if isinstance(node, dict):
        lowered = {str(k).lower(): v for k, v in node.items()}
        coords = next((lowered[k] for k in BOX_KEYS if k in lowered), None)
        quad = _quad(coords)
        if quad is not None:
            label = next((lowered[k] for k in LABEL_KEYS if k in lowered), None)
            confidence = next((lowered[k] for k in CONFIDENCE_KEYS if k in lowered), None)
            yield quad, (str(label) if label is not None else None), _finite(confidence)
        return
    if isinstance(node, (list, tuple)):
        quad = _quad(node)
        if quad is not None:
            yield quad, None, None
            return
        for item in node:
            yield from _walk(item, depth + 1)


def _quad(value: Any) -> tuple[float, float, float, float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    numbers = [_finite(v) for v in value]
    if any(v is None for v in numbers):
        return None
    return tuple(numbers)  # type: ignore[return-value]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def to_canonical(raw: tuple[tuple[float, ...], str | None, float | None], decode: BoxDecoder | None,
                 size: Size | None) -> PredBox | None:
    """Convert one raw box to original pixels, clamp it to the image, drop it if degenerate.

    Reversed boxes (x2 < x1) are invalid, not swapped: the model must learn the convention.
    """
    coords, label, confidence = raw
    try:
        box = decode(coords) if decode else tuple(coords)
    except (ArithmeticError, ValueError):
        return None
    if not all(math.isfinite(v) for v in box):
        return None
    if size is not None:
        box = clamp_box(box, size)
    if box_area(box) <= 0:
        return None
    if confidence is not None:
        confidence = min(max(confidence, 0.0), 1.0)
    return PredBox(box=box, label=label, confidence=confidence)


def parse_completion(text: str, decode: BoxDecoder | None = None, size: Size | None = None,
                     truncated: bool = False) -> Parsed:
    """Answer, reasoning and canonical boxes of one completion text.

    Args:
        text: the completion.
        decode: the model family's ``from_model`` for this sample's image (None: already canonical).
        size: ``(width, height)`` of the original image, to clamp boxes to.
        truncated: the completion hit the token limit (see ``extract_answer``).
    """
    answer = extract_answer(text, truncated)
    raws = find_boxes(answer) if answer else []
    boxes = [box for box in (to_canonical(raw, decode, size) for raw in raws) if box is not None]
    return Parsed(answer=answer, think=extract_think(text), boxes=boxes)
