"""Data in other layouts, converted to vlreason's JSONL (``vlreason data convert FORMAT SRC --out DIR``).

Each converter reads its source record by record (``read_records``: a JSON list streamed a chunk
at a time, or JSON Lines) and writes ``DIR/<format>.jsonl``; a record it cannot convert is
skipped and reported as ``record <id>: <problem>``. The written file is then read back with
``read_jsonl``, so what a conversion reports as converted is what training reads.

``llava`` — LLaVA / ShareGPT records (``conversations``: ``from`` human / gpt / system, ``value``)
and LLaMA-Factory's (``messages``: ``role``, ``content``), with ``image`` / ``images`` and
``video`` / ``videos`` (paths against ``--image-root``, default the source's folder). Every turn
becomes a message (multi-turn kept; the last assistant turn is what SFT trains on); each
``<image>`` / ``<video>`` placeholder becomes the media part in its place, so a record needs as
many placeholders as files, or none — then the media go before the first user message's text,
as LLaVA places them. A missing file, a placeholder count that does not match, or a placeholder
outside a user turn skips the record with that message: no image is dropped silently. Other
fields (``answer``, ``boxes``, ...) are kept.

``coco`` — a COCO instances file (``images``, ``annotations``, ``categories``; read whole): one
detection sample per image with every box as ``[x1, y1, x2, y2]`` (from ``[x, y, w, h]``, clamped
to the image) and its category's name as its label, so non-contiguous category ids do not matter.
Crowd regions (``iscrowd``) are not objects to find: they go to the extra column
``crowd_regions`` (``[{"box", "label"}]``), which evaluation's COCO AP reads as COCOeval does
(a detection on one is neither a hit nor a false alarm). Boxes without area are left out;
an image left with no box (or with none to begin with) is skipped with that reason, and so is
an annotation whose category id is not among the categories. Image paths are ``file_name``
against ``--image-root``.

``mis`` — an MIS-style safety layout (a JSON list of records, a ``{"data": [...]}`` object, or
JSON Lines). Field mapping:

==========================================  ===============================================
source                                      vlreason
==========================================  ===============================================
``id``                                      ``id`` (default ``mis-<n>``, n counting from 0)
``image1``, ``image2``, ... (in order), or   ``images``, resolved against ``--image-root``
``images`` / ``image_paths`` /              (default: the source's folder) and written
``image_path`` (a list or one path)         relative to DIR; each must exist
``question`` / ``instruction`` / ``prompt``  ``prompt`` (required)
``safety_label`` (``safe`` / ``unsafe``)    ``safety_label``; when absent, ``safe`` if
                                            ``category`` is ``safe``, ``benign`` or ``none``,
                                            else ``unsafe``
``category``                                ``category`` (required for unsafe records)
``sub_category``                            kept as the extra column ``sub_category``
``perception``, ``reasoning``, ``response``  ``response``: ``<think>perception reasoning</think>
(or ``output``)                             <answer>response</answer>``; without perception and
                                            reasoning the response text as it is
``answer``                                  ``answer`` (ground truth of a safe request)
==========================================  ===============================================
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlreason.data.jsonl import read_jsonl

SAFE_CATEGORIES = ("safe", "benign", "none")


class RecordError(ValueError):
    """A source record that cannot be converted (the message says why)."""


@dataclass
class Conversion:
    """What a conversion wrote and what it skipped (``record <id>: <problem>``)."""

    path: Path
    converted: int = 0
    skipped: list[str] = field(default_factory=list)


def read_records(src: Path, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """The records of a JSON list or of JSON Lines, read ``chunk_chars`` at a time (memory stays
    bounded by the largest record, not the file), or of a ``{"data": [...]}`` object (read whole).

    Raises:
        ValueError: the file is none of those (with the line of a JSON Lines error or the
            character where the list broke).
    """
    with src.open() as handle:
        head = handle.read(chunk_chars)
        start = head.lstrip()[:1]
        handle.seek(0)
        if start == "[":
            yield from _json_list(src, handle, chunk_chars)
        elif start == "{" and _is_wrapped(head):
            parsed = json.load(handle)
            if not isinstance(parsed.get("data"), list):
                raise ValueError(f"{src}: an object without a 'data' list; give a JSON list of records")
            yield from parsed["data"]
        else:
            yield from _json_lines(src, handle)


def _is_wrapped(head: str) -> bool:
    """Whether a file starting with ``head`` is one object holding the records (``{"data": [...``)."""
    return re.match(r'\s*\{\s*"data"\s*:\s*\[', head) is not None


def _json_lines(src: Path, handle: Any) -> Iterator[Any]:
    for number, line in enumerate(handle, start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{src}:{number}: not JSON ({exc.msg}); give a JSON list of records or one "
                                 "JSON object per line") from None


def _json_list(src: Path, handle: Any, chunk_chars: int) -> Iterator[Any]:
    """The items of a top-level JSON list, decoded one at a time from a growing buffer."""
    decoder = json.JSONDecoder()
    buffer, offset, position, expect_item = handle.read(chunk_chars).lstrip()[1:], 0, 0, True
    while True:
        buffer = buffer[position:].lstrip()
        offset += position
        position = 0
        if not expect_item and buffer[:1] == ",":
            buffer, expect_item = buffer[1:].lstrip(), True
        if buffer[:1] == "]":
            return
        try:
            item, position = decoder.raw_decode(buffer)
            if position == len(buffer):  # a number cut at the buffer's end also decodes: read on first
                raise json.JSONDecodeError("the buffer ends here", buffer, position)
        except json.JSONDecodeError as exc:
            more = handle.read(chunk_chars)
            if not more:
                raise ValueError(f"{src}: the JSON list breaks near character {offset + exc.pos} ({exc.msg})") from None
            buffer += more
            position = 0
            continue
        if not expect_item:
            raise ValueError(f"{src}: a ',' is missing near character {offset}")
        expect_item = False
        yield item


def mis_record(record: Any, index: int, image_root: Path, out_dir: Path) -> dict[str, Any]:
    """One MIS-style record in vlreason's schema (see the module docstring).

    Raises:
        RecordError: what is missing or wrong.
    """
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    prompt = _first(record, ("question", "instruction", "prompt"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError("no question: give 'question' (or 'instruction' / 'prompt')")
    category = record.get("category")
    label = record.get("safety_label")
    if label is None:
        label = "safe" if str(category).strip().lower() in SAFE_CATEGORIES else "unsafe"
    if label not in ("safe", "unsafe"):
        raise RecordError(f"safety_label must be safe or unsafe, got {label!r}")
    if label == "unsafe" and not (isinstance(category, str) and category.strip()):
        raise RecordError("an unsafe record needs its 'category'")
    converted: dict[str, Any] = {"id": str(record.get("id", f"mis-{index}")), "images": _images(record, image_root,
                                                                                                out_dir),
                                 "prompt": prompt, "safety_label": label}
    if isinstance(category, str) and category.strip().lower() not in SAFE_CATEGORIES:
        converted["category"] = category
    for key in ("sub_category", "answer"):
        if record.get(key) is not None:
            converted[key] = record[key]
    response = _response(record)
    if response is not None:
        converted["response"] = response
    return converted


def _first(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((record[key] for key in keys if record.get(key) is not None), None)


def _images(record: dict[str, Any], image_root: Path, out_dir: Path) -> list[str]:
    numbered = sorted((int(m.group(1)), key) for key in record if (m := re.fullmatch(r"image(\d+)", key)))
    paths = [record[key] for _, key in numbered] or _first(record, ("images", "image_paths", "image_path"))
    if isinstance(paths, str):
        paths = [paths]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise RecordError("no images: give image1, image2, ... or 'images' (a list of paths)")
    return _relocated(paths, "image", image_root, out_dir)


def _relocated(paths: list[str], kind: str, root: Path, out_dir: Path) -> list[str]:
    """``paths`` (against ``root``), each checked to exist, relative to ``out_dir``."""
    resolved = [root / path for path in paths]
    missing = [str(path) for path in resolved if not path.is_file()]
    if missing:
        raise RecordError(f"{kind} not found: {missing[0]} (set --image-root to the folder the paths start from)")
    return [os.path.relpath(path.resolve(), out_dir.resolve()) for path in resolved]


def _response(record: dict[str, Any]) -> str | None:
    reply = _first(record, ("response", "output"))
    thoughts = [str(record[key]).strip() for key in ("perception", "reasoning") if record.get(key)]
    if reply is None:
        if thoughts:
            raise RecordError("perception/reasoning without a 'response' to follow them")
        return None
    return f"<think>{' '.join(thoughts)}</think><answer>{reply}</answer>" if thoughts else str(reply)


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}
_PLACEHOLDER = re.compile(r"<(image|video)>")


def llava_record(record: Any, index: int, image_root: Path, out_dir: Path) -> dict[str, Any]:
    """One LLaVA / ShareGPT (``conversations`` of ``from``/``value``) or LLaMA-Factory
    (``messages`` of ``role``/``content``) record in vlreason's schema (see the module docstring).

    Raises:
        RecordError: what is missing or wrong.
    """
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise RecordError("no conversation: give 'conversations' (from/value) or 'messages' (role/content)")
    media = {kind: _media_paths(record, kind, image_root, out_dir) for kind in ("image", "video")}
    messages = [_message(turn, number) for number, turn in enumerate(turns)]
    _place_media(messages, {kind: len(paths) for kind, paths in media.items()})
    converted = {"id": str(record.get("id", f"llava-{index}")), "messages": messages}
    converted |= {f"{kind}s": paths for kind, paths in media.items() if paths}
    known = {"id", "conversations", "messages", "image", "images", "video", "videos"}
    return converted | {key: value for key, value in record.items() if key not in known}


def _media_paths(record: dict[str, Any], kind: str, root: Path, out_dir: Path) -> list[str]:
    """The record's ``<kind>`` or ``<kind>s`` files, resolved and checked, relative to ``out_dir``."""
    paths = record.get(f"{kind}s", record.get(kind)) or []
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise RecordError(f"'{kind}'/'{kind}s' must be a path or a list of paths, got {paths!r}")
    return _relocated(paths, kind, root, out_dir)


def _message(turn: Any, number: int) -> dict[str, Any]:
    """One turn as a message whose ``<image>``/``<video>`` placeholders became media parts."""
    if not isinstance(turn, dict):
        raise RecordError(f"turn {number}: expected an object, got {type(turn).__name__}")
    speaker = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if speaker not in ROLES:
        raise RecordError(f"turn {number}: speaker {speaker!r} is not one of {', '.join(ROLES)}")
    if not isinstance(text, str):
        raise RecordError(f"turn {number}: the text ('value' or 'content') must be a string, got {text!r}")
    parts = []
    for piece in _PLACEHOLDER.split(text):  # text, kind, text, kind, ...
        if piece in ("image", "video"):
            parts.append({"type": piece})
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return {"role": ROLES[speaker], "content": parts}


def _place_media(messages: list[dict[str, Any]], counts: dict[str, int]) -> None:
    """Check the placeholders against the media; without any, the media go before the first user
    message's text (LLaVA's convention). Media parts outside user messages are refused."""
    found = {kind: sum(part["type"] == kind for m in messages for part in m["content"]) for kind in counts}
    for kind, count in counts.items():
        if found[kind] and found[kind] != count:
            raise RecordError(f"{found[kind]} <{kind}> placeholder(s) for {count} {kind} file(s); give one per file")
    for message in messages:
        if message["role"] != "user" and any(part["type"] != "text" for part in message["content"]):
            raise RecordError(f"a {message['role']} turn holds an image or video placeholder; media go in user turns")
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        raise RecordError("no user turn")
    missing = [{"type": kind} for kind, count in counts.items() if not found[kind] for _ in range(count)]
    first_user["content"] = missing + first_user["content"]


DETECT_PROMPT = 'Detect every object. Answer with a JSON list of {"bbox_2d": [x1, y1, x2, y2], "label": ...}.'


def coco_images(src: Path) -> Iterator[dict[str, Any]]:
    """A COCO instances file as one record per image: its entry, its annotations and the
    category names (the file is one JSON object, read whole, as pycocotools reads it).

    Raises:
        ValueError: the file lacks ``images``, ``annotations`` or ``categories``.
    """
    try:
        data = json.loads(src.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{src}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        data = {}
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"{src}: not a COCO instances file (no {', '.join(missing)} list)")
    names = {category["id"]: category["name"] for category in data["categories"]}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation.get("image_id"), []).append(annotation)
    for image in data["images"]:
        yield {"id": f"coco-{image.get('id')}", "image": image, "annotations": by_image.get(image.get("id"), []),
               "names": names}


def coco_record(record: dict[str, Any], index: int, image_root: Path, out_dir: Path) -> dict[str, Any]:
    """One COCO image as a detection sample: every box (``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``,
    clamped to the image) with its category name; crowd regions in ``crowd_regions``; boxes
    without area left out. An image left with no box is skipped, and so is one whose category id
    is unknown.

    Raises:
        RecordError: what is missing or wrong.
    """
    image = record["image"]
    width, height = image.get("width"), image.get("height")
    if not isinstance(image.get("file_name"), str) or not all(isinstance(v, int) and v > 0 for v in (width, height)):
        raise RecordError("the image entry needs file_name, width and height")
    boxes, labels, crowd = [], [], []
    for annotation in record["annotations"]:
        if annotation.get("category_id") not in record["names"]:
            raise RecordError(f"annotation {annotation.get('id')}: category id {annotation.get('category_id')} is "
                              "not in categories")
        x, y, w, h = annotation["bbox"]
        box = [max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)]
        label = record["names"][annotation["category_id"]]
        if annotation.get("iscrowd"):
            crowd.append({"box": box, "label": label})
        elif box[2] > box[0] and box[3] > box[1]:
            boxes.append(box)
            labels.append(label)
    if not boxes:
        raise RecordError("no box to find (no annotations, or only crowd regions and boxes without area)")
    objects = [{"bbox_2d": box, "label": label} for box, label in zip(boxes, labels, strict=True)]
    images = _relocated([image["file_name"]], "image", image_root, out_dir)
    converted = {"id": record["id"], "images": images, "prompt": DETECT_PROMPT, "boxes": boxes, "labels": labels,
                 "response": f"<answer>{json.dumps(objects)}</answer>"}
    return converted | ({"crowd_regions": crowd} if crowd else {})


FORMATS: dict[str, Callable[[Any, int, Path, Path], dict[str, Any]]] = {
    "mis": mis_record, "llava": llava_record, "coco": coco_record}
READERS: dict[str, Callable[[Path], Iterator[Any]]] = {"coco": coco_images}  # default: read_records


def convert(fmt: str, src: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
            progress: bool = True) -> Conversion:
    """Convert ``src`` (in format ``fmt``) to ``out_dir/<fmt>.jsonl``; bad records are skipped and
    listed (``progress``: a bar counting the records).

    Raises:
        ValueError: unknown format, unreadable source, or a written file that does not read back.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out_dir)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    root = Path(image_root) if image_root is not None else src.parent
    out.mkdir(parents=True, exist_ok=True)
    result = Conversion(out / f"{fmt}.jsonl")
    with result.path.open("w") as handle:
        records = tqdm(READERS.get(fmt, read_records)(src), desc=f"convert {fmt}", unit="record",
                       disable=not progress)
        for index, record in enumerate(records):
            name = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
            try:
                converted = FORMATS[fmt](record, index, root, out)
            except RecordError as exc:
                result.skipped.append(f"record {name}: {exc}")
                continue
            handle.write(json.dumps(converted) + "\n")
            result.converted += 1
    if result.converted:
        read_jsonl(result.path)  # what was written must read back as training reads it
    return result
