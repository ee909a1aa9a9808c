"""The sample schema: one JSON object per line of a JSONL file.

A line holds the conversation, its media and its ground truth::

    {"id": "g-17",
     "images": ["images/17.png"],                      # paths relative to the JSONL file
     "prompt": "Where is the red triangle?",
     "response": "<think>...</think><answer>[12, 30, 40, 58]</answer>",   # optional (SFT)
     "boxes": [[12, 30, 40, 58]], "labels": ["red triangle"]}

Instead of ``prompt``/``response`` a line may give ``messages`` in chat form (``role``,
``content``), with one ``{"type": "image"}`` part per entry of ``images`` (and
``{"type": "video"}`` per video) where the media go. ``prompt`` puts the images, then the videos,
before the text. An optional ``system`` string goes with ``prompt``.

Media (a list, or one string):

* ``images``: image files (paths relative to the JSONL file) or ``data:image/...;base64,`` URIs;
  each must exist and have a readable header (``vlreason data check`` decodes it fully);
* ``videos``: video files (paths relative to the JSONL file; no data URIs); each must exist and
  be non-empty (``vlreason data check`` also checks the container, see ``vision.video``).

Forms written for other tools are problems that show the accepted form, not silent extra
columns or stray text:

* media fields other than ``images``/``videos`` (``MEDIA_FIELD_ALIASES``: ``image``, ``img``,
  ``image_path(s)``, ``image_file``, ``image_url``, ``video``, ``video_path``, ``video_file``,
  ``video_url``, ``frames``);
* LLaVA's ``conversations`` (``from``/``value``): write ``messages`` (``role``/``content``);
* media markers in any text (``prompt``, ``response``, ``system``, messages): LLaVA's ``<image>``
  and ``<video>``, and Qwen's vision tokens (``<|vision_start|>``, ``<|image_pad|>``, ...), which
  the processor inserts itself.

Ground-truth fields (all optional, validated when present):

* ``answer``: the reference answer as text (numbers are accepted and kept as text);
* ``choices``: options of a multiple-choice question; ``answer`` is then a letter (A, B, ...)
  or one of the options;
* ``boxes``: ``[[x1, y1, x2, y2], ...]`` in pixels of the *original* first image;
* ``labels``: one class name per box; ``label``: a class name, or a list for multi-label;
* ``count``: a non-negative integer;
* ``safety_label``: ``safe`` or ``unsafe`` (is the request harmful?); ``category``: its risk
  category (required when unsafe; on a safe look-alike, the category it resembles).

Any other field is an extra column, passed unchanged to reward functions by name; the names the
reward scorer fills in itself (``RESERVED_COLUMNS``) are refused.
Boxes written inside ``response`` text are in original-image pixels too.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlreason.vision.boxes import Box, Size, as_box, box_problem

Message = dict[str, Any]  # {"role": ..., "content": str | [{"type": "text"|"image"|"video", ...}]}
SizeReader = Callable[[str], Size]  # (width, height) of an image, or ValueError with the reason
VideoCheck = Callable[[str], str | None]  # what is wrong with a video file, or None

GROUND_TRUTH_FIELDS = ("answer", "choices", "boxes", "labels", "label", "count", "safety_label", "category")
SAFETY_LABELS = ("safe", "unsafe")
STRUCTURE_FIELDS = ("id", "messages", "prompt", "response", "system", "images", "videos")
# Names the reward scorer fills in itself; a data column must not shadow them.
RESERVED_COLUMNS = ("completions", "prompts", "completion_ids", "pred_answer", "pred_think", "pred_boxes",
                    "image_sizes", "video_paths", "trainer_state", "tool_calls", "tool_errors", "turns",
                    "images_seen", "images_dropped")
ROLES = ("system", "user", "assistant", "tool")
# Qwen-VL's vision tokens: the processor writes them around image and video pixels; never text
# (data is refused with them, sampling suppresses them)
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Fields other formats use for media. Any unknown field is an extra column, so without this a
# LLaVA line {"image": "x.png", ...} would train text-only and still pass as valid.
IMAGES_FORM = '"images": ["x.png"] (a list; paths relative to the JSONL file)'
VIDEOS_FORM = '"videos": ["clip.mp4"] (a list; paths relative to the JSONL file)'
MEDIA_FIELD_ALIASES = {
    **dict.fromkeys(("image", "img", "image_path", "image_paths", "image_file", "image_url"), IMAGES_FORM),
    **dict.fromkeys(("video", "video_path", "video_file", "video_url", "frames"), VIDEOS_FORM),
}
CONVERSATIONS_PROBLEM = ('vlreason reads a chat from "messages": [{"role": "user", "content": "..."}, '
                         '{"role": "assistant", "content": "..."}]; LLaVA\'s "from": "human"/"gpt" become '
                         '"role": "user"/"assistant" and "value" becomes "content"')

# Media markers other formats write into text. vlreason places media itself, so a LLaVA
# placeholder would reach the model as plain text, and a Qwen vision token in the text would not
# match the image tokens the processor inserts for the pixels it is given.
_LLAVA_PLACEHOLDER = "is a LLaVA placeholder, which would reach the model as plain text"
_QWEN_VISION_TOKEN = ("is a Qwen vision token, which the processor inserts itself; one in the text breaks the "
                      "image-token count")
TEXT_MEDIA_MARKERS = {
    "<image>": _LLAVA_PLACEHOLDER,
    "<video>": _LLAVA_PLACEHOLDER,
    **dict.fromkeys(VISION_SPECIAL_TOKENS, _QWEN_VISION_TOKEN),
}
PROMPT_MEDIA_HINT = ('with "prompt", the images in "images" (and videos in "videos") are put before the text '
                     "automatically, so delete it")
MESSAGES_MEDIA_HINT = ('with "messages", write a {"type": "image"} part where each image goes ({"type": "video"} '
                       'for a video), e.g. "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]')


@dataclass
class Sample:
    """One validated line of a data file."""

    id: str
    messages: list[Message]
    images: list[str]  # absolute paths or data URIs
    videos: list[str]
    image_sizes: list[Size]  # original (width, height) of each image
    source: str  # "file.jsonl:17", for messages about this sample
    answer: str | None = None
    choices: list[str] | None = None
    boxes: list[Box] | None = None
    labels: list[str] | None = None
    label: str | list[str] | None = None
    count: int | None = None
    safety_label: str | None = None
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def response(self) -> str | None:
        """Text of the final assistant message (the reference completion), if the sample has one."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            return None
        content = self.messages[-1]["content"]
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")

    @property
    def prompt_messages(self) -> list[Message]:
        """The conversation without its final assistant message."""
        return self.messages[:-1] if self.response is not None else list(self.messages)

    def columns(self) -> dict[str, Any]:
        """Ground truth and extra columns, by name, as reward functions receive them."""
        return {"id": self.id, **{name: getattr(self, name) for name in GROUND_TRUTH_FIELDS}, **self.extra}


def map_assistant_text(message: Message, fn: Callable[[str], str]) -> Message:
    """``message`` with ``fn`` applied to its text when it is an assistant message (string content
    or text parts); other messages are returned unchanged."""
    if message["role"] != "assistant":
        return message
    if isinstance(message["content"], str):
        return {**message, "content": fn(message["content"])}
    parts = [{**p, "text": fn(p["text"])} if p.get("type") == "text" else p for p in message["content"]]
    return {**message, "content": parts}


class FieldProblems:
    """Collects ``(field, message)`` problems while one record is validated."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, name: str, message: str) -> None:
        self.items.append((name, message))


def parse_sample(record: Any, base_dir: Path, source: str, sizes: SizeReader,
                 video_problem: VideoCheck) -> tuple[Sample | None, list]:
    """Validate one decoded JSON record.

    Args:
        record: the decoded line.
        base_dir: folder that relative media paths are resolved against.
        source: ``file:line`` for the sample's id and messages.
        sizes: reads an image's ``(width, height)``; raises ``ValueError`` with a reason.
        video_problem: what is wrong with a video file (by absolute path), or None.

    Returns:
        The sample (None when any problem was found) and the ``(field, message)`` problems.
    """
    problems = FieldProblems()
    if not isinstance(record, dict):
        problems.add("line", f"expected a JSON object, got {type(record).__name__}")
        return None, problems.items
    for name in RESERVED_COLUMNS:
        if name in record:
            problems.add(name, "this name is reserved for what the reward scorer computes; rename the field")
    _check_foreign_fields(record, problems)
    images = _media_list(record, "images", base_dir, problems)
    videos = _media_list(record, "videos", base_dir, problems)
    image_sizes = _image_sizes(images, sizes, problems)
    _check_videos(videos, video_problem, problems)
    messages = _messages(record, len(images), len(videos), problems)
    truth = _ground_truth(record, image_sizes[0] if image_sizes else None, bool(images), problems)
    if problems.items:
        return None, problems.items
    known = set(GROUND_TRUTH_FIELDS) | set(STRUCTURE_FIELDS)
    extra = {key: value for key, value in record.items() if key not in known}
    sample = Sample(id=str(record.get("id", source)), messages=messages, images=images, videos=videos,
                    image_sizes=image_sizes, source=source, extra=extra, **truth)
    return sample, []


def _check_foreign_fields(record: dict, problems: FieldProblems) -> None:
    """Media and chat fields of other formats, each a problem showing vlreason's form."""
    for name in record:
        if name in MEDIA_FIELD_ALIASES:
            problems.add(name, f"vlreason reads media from {MEDIA_FIELD_ALIASES[name]}")
        elif name == "conversations":
            problems.add(name, CONVERSATIONS_PROBLEM)


def _media_list(record: dict, name: str, base_dir: Path, problems: FieldProblems) -> list[str]:
    value = record.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        uris = " or data URIs" if name == "images" else ""
        problems.add(name, f"must be a list of file paths (relative to the JSONL file){uris}")
        return []
    return [v if v.startswith("data:") else str((base_dir / v).resolve()) for v in value]


def _image_sizes(images: list[str], sizes: SizeReader, problems: FieldProblems) -> list[Size]:
    found = []
    for index, image in enumerate(images):
        try:
            found.append(sizes(image))
        except ValueError as exc:
            problems.add(f"images[{index}]", str(exc))
    return found


def _check_videos(videos: list[str], video_problem: VideoCheck, problems: FieldProblems) -> None:
    for index, video in enumerate(videos):
        if video.startswith("data:"):
            problem = "a video must be a file path (relative to the JSONL file), not a data URI"
        else:
            problem = video_problem(video)
        if problem:
            problems.add(f"videos[{index}]", problem)


def _messages(record: dict, n_images: int, n_videos: int, problems: FieldProblems) -> list[Message]:
    has_messages, has_prompt = "messages" in record, "prompt" in record
    if has_messages == has_prompt:
        if has_messages or "conversations" not in record:  # a LLaVA chat has its own problem
            problems.add("messages", "give either 'messages' or 'prompt' (with an optional 'response'), not "
                         + ("both" if has_messages else "neither"))
        return []
    if has_prompt:
        return _messages_from_prompt(record, n_images, n_videos, problems)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        problems.add("messages", "must be a non-empty list of {'role': ..., 'content': ...} objects")
        return []
    counts = {"image": 0, "video": 0}
    for index, message in enumerate(messages):
        _check_message(message, f"messages[{index}]", counts, problems)
    if counts["image"] != n_images:
        problems.add("messages", f"{counts['image']} image parts but {n_images} entries in 'images'")
    if counts["video"] != n_videos:
        problems.add("messages", f"{counts['video']} video parts but {n_videos} entries in 'videos'")
    return messages


def _messages_from_prompt(record: dict, n_images: int, n_videos: int, problems: FieldProblems) -> list[Message]:
    for name in ("response", "system"):
        if name in record and not isinstance(record[name], str):
            problems.add(name, "must be a string")
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        problems.add("prompt", "must be a non-empty string")
        return []
    for name in ("system", "prompt", "response"):
        if isinstance(record.get(name), str):
            _check_text(record[name], name, PROMPT_MEDIA_HINT, problems)
    media = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
    messages: list[Message] = []
    if isinstance(record.get("system"), str):
        messages.append({"role": "system", "content": record["system"]})
    messages.append({"role": "user", "content": [*media, {"type": "text", "text": record["prompt"]}]})
    if isinstance(record.get("response"), str):
        messages.append({"role": "assistant", "content": record["response"]})
    return messages


def _check_message(message: Any, where: str, counts: dict[str, int], problems: FieldProblems) -> None:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        problems.add(where, f"must be an object with 'role' in {ROLES} and 'content'")
        return
    content = message.get("content")
    if isinstance(content, str):
        _check_text(content, f"{where}.content", MESSAGES_MEDIA_HINT, problems)
        return
    if not isinstance(content, list):
        problems.add(f"{where}.content", "must be a string or a list of parts")
        return
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in counts:
            counts[kind] += 1
        elif kind != "text" or not isinstance(part.get("text"), str):
            problems.add(f"{where}.content[{index}]", "must be {'type': 'text', 'text': str}, "
                         "{'type': 'image'} or {'type': 'video'}")
        else:
            _check_text(part["text"], f"{where}.content[{index}]", MESSAGES_MEDIA_HINT, problems)


def _check_text(text: str, where: str, hint: str, problems: FieldProblems) -> None:
    """One problem per media marker of another format found in ``text``; ``hint`` gives the accepted form."""
    for marker, why in TEXT_MEDIA_MARKERS.items():
        if marker in text:
            problems.add(where, f'"{marker}" {why}; {hint}')


def _ground_truth(record: dict, image_size: Size | None, has_image: bool, problems: FieldProblems) -> dict:
    truth: dict[str, Any] = {}
    if "answer" in record:
        truth["answer"] = _answer(record["answer"], problems)
    if "choices" in record:
        truth["choices"] = _string_list(record["choices"], "choices", problems, min_len=2)
        _check_choice_answer(truth.get("answer"), truth["choices"], problems)
    if "boxes" in record:
        truth["boxes"] = _boxes(record["boxes"], image_size, has_image, problems)
    if "labels" in record:
        truth["labels"] = _string_list(record["labels"], "labels", problems, min_len=0)
        boxes = record.get("boxes")
        n_boxes = len(boxes) if isinstance(boxes, list) else 0
        if truth["labels"] is not None and len(truth["labels"]) != n_boxes:
            problems.add("labels", f"{len(truth['labels'])} labels for {n_boxes} boxes; give one label per box")
    if "label" in record:
        truth["label"] = _label(record["label"], problems)
    if "count" in record:
        count = record["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            problems.add("count", f"must be a non-negative integer, got {count!r}")
        truth["count"] = count
    truth |= _safety(record, problems)
    return truth


def _safety(record: dict, problems: FieldProblems) -> dict[str, str]:
    """``safety_label`` and ``category``, checked together."""
    truth = {}
    if "safety_label" in record:
        label = record["safety_label"]
        if label not in SAFETY_LABELS:
            problems.add("safety_label", f"must be one of {', '.join(SAFETY_LABELS)}, got {label!r}")
        truth["safety_label"] = label
    if "category" in record:
        category = record["category"]
        if not isinstance(category, str) or not category.strip():
            problems.add("category", f"must be a non-empty string (the risk category), got {category!r}")
        truth["category"] = category
    if truth.get("safety_label") == "unsafe" and "category" not in truth:
        problems.add("category", "an unsafe sample needs its risk category (the safety reward pays a refusal "
                                 "that names it)")
    return truth


def _answer(value: Any, problems: FieldProblems) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        problems.add("answer", f"must be text or a number, got {type(value).__name__}")
        return None
    if isinstance(value, float) and not math.isfinite(value):
        problems.add("answer", "is NaN or infinite")
        return None
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return value if isinstance(value, str) else str(value)


def _string_list(value: Any, name: str, problems: FieldProblems, min_len: int) -> list[str] | None:
    if not isinstance(value, list) or len(value) < min_len or not all(isinstance(v, str) and v for v in value):
        problems.add(name, f"must be a list of at least {min_len} non-empty strings")
        return None
    return value


def _label(value: Any, problems: FieldProblems) -> str | list[str] | None:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        return _string_list(value, "label", problems, min_len=1)
    problems.add("label", "must be a non-empty string, or a list of strings for multi-label")
    return None


def _check_choice_answer(answer: str | None, choices: list[str] | None, problems: FieldProblems) -> None:
    if answer is None or choices is None:
        return
    letters = string.ascii_uppercase[: len(choices)]
    in_letters = len(answer.strip()) == 1 and answer.strip().upper() in letters
    in_options = answer.strip().casefold() in {c.strip().casefold() for c in choices}
    if not (in_letters or in_options):
        problems.add("answer", f"{answer!r} is neither a letter {letters[0]}-{letters[-1]} nor one of the choices")


def _boxes(value: Any, image_size: Size | None, has_image: bool, problems: FieldProblems) -> list[Box] | None:
    if not has_image:
        problems.add("boxes", "boxes refer to the first image, but the sample has no images")
        return None
    hint = "boxes are [x1, y1, x2, y2] in original-image pixels"
    if not isinstance(value, list) or (value and not all(isinstance(b, list) for b in value)):
        problems.add("boxes", f"must be a list of boxes, e.g. [[10, 20, 50, 60]] for one box; {hint}")
        return None
    boxes = []
    for index, box in enumerate(value):
        problem = box_problem(box, image_size)
        if problem:
            problems.add(f"boxes[{index}]", f"{box} {problem}; {hint}")
        else:
            boxes.append(as_box(box))
    return boxes
