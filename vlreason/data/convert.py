"""Data in the community's layouts, converted to vlreason's JSONL (``vlreason data convert FORMAT
SRC --out DIR``, or a config's ``data.train: {format: ..., path: ...}``, see ``vlreason.data.sources``).

A format is a function ``(src, target, **options)`` yielding one ``Converted`` per source record
(``FORMATS``): ``coco``, ``lvis`` and ``refcoco`` (``vlreason.data.coco``), ``hf`` (Hugging Face
``datasets``, ``vlreason.data.hf``), ``llava`` and ``mis`` (here). ``convert`` runs one with a
progress bar and writes ``DIR/<name>.jsonl`` (the format, then the ``task``, ``split`` and
``frequency`` options given: ``refcoco_val.jsonl``). Every sample is validated as training reads
it (``parse_sample``: fields, images that open, boxes inside them) before it is written, so what a
conversion counts as converted is what training reads; a record that cannot be converted is
skipped and reported as ``record <id>: <problem>`` (all of them in ``DIR/<name>.skipped.txt``),
and parts of records left out as documented (crowd regions, boxes without area, ...) are counted.
The file appears only when complete (written under a temporary name, then renamed).

``llava`` — LLaVA / ShareGPT records (``conversations``: ``from`` human / gpt / system, ``value``)
and LLaMA-Factory's (``messages``: ``role``, ``content``), with ``image`` / ``images`` and
``video`` / ``videos`` (paths against ``--image-root``, default the source's folder). Every turn
becomes a message (multi-turn kept; the last assistant turn is what SFT trains on); each
``<image>`` / ``<video>`` placeholder becomes the media part in its place, so a record needs as
many placeholders as files, or none — then the media go before the first user message's text,
as LLaVA places them. A missing file, a placeholder count that does not match, or a placeholder
outside a user turn skips the record with that message: no image is dropped silently. Other
fields (``answer``, ``boxes``, ...) are kept.

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

import inspect
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlreason.data.coco import coco, lvis, refcoco
from vlreason.data.hf import hf
from vlreason.data.records import Converted, RecordError, Target, read_records
from vlreason.data.schema import parse_sample
from vlreason.vision.images import read_image_size
from vlreason.vision.video import video_file_problem

SAFE_CATEGORIES = ("safe", "benign", "none")
NAMING_OPTIONS = ("task", "split", "frequency")  # options that name the output file
PATH_OPTIONS = ("instances",)  # options that are paths (a config resolves them like other paths)


@dataclass
class Conversion:
    """What a conversion wrote (``path``), how many samples, the records it skipped
    (``record <id>: <problem>``, also in ``skipped_path``) and the parts of records left out."""

    path: Path
    converted: int = 0
    skipped: list[str] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def skipped_path(self) -> Path:
        return self.path.with_suffix(".skipped.txt")

def mis_record(record: Any, index: int, target: Target) -> dict[str, Any]:
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
    converted: dict[str, Any] = {"id": str(record.get("id", f"mis-{index}")), "images": _images(record, target),
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


def _images(record: dict[str, Any], target: Target) -> list[str]:
    numbered = sorted((int(m.group(1)), key) for key in record if (m := re.fullmatch(r"image(\d+)", key)))
    paths = [record[key] for _, key in numbered] or _first(record, ("images", "image_paths", "image_path"))
    if isinstance(paths, str):
        paths = [paths]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise RecordError("no images: give image1, image2, ... or 'images' (a list of paths)")
    return target.media(paths)


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


def llava_record(record: Any, index: int, target: Target) -> dict[str, Any]:
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
    media = {kind: _media_paths(record, kind, target) for kind in ("image", "video")}
    messages = [_message(turn, number) for number, turn in enumerate(turns)]
    _place_media(messages, {kind: len(paths) for kind, paths in media.items()})
    converted = {"id": str(record.get("id", f"llava-{index}")), "messages": messages}
    converted |= {f"{kind}s": paths for kind, paths in media.items() if paths}
    known = {"id", "conversations", "messages", "image", "images", "video", "videos"}
    return converted | {key: value for key, value in record.items() if key not in known}


def _media_paths(record: dict[str, Any], kind: str, target: Target) -> list[str]:
    """The record's ``<kind>`` or ``<kind>s`` files, resolved and checked, relative to ``out_dir``."""
    paths = record.get(f"{kind}s", record.get(kind)) or []
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise RecordError(f"'{kind}'/'{kind}s' must be a path or a list of paths, got {paths!r}")
    return target.media(paths, kind)


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


def per_record(convert_one: Callable[[Any, int, Target], dict[str, Any]]) -> Callable[..., Iterator[Converted]]:
    """A format from a function converting one record of a JSON list / JSON Lines file to one sample."""

    def records(src: Path, target: Target) -> Iterator[Converted]:
        for index, record in enumerate(read_records(src)):
            name = str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"
            try:
                yield Converted(name, [convert_one(record, index, target)])
            except RecordError as exc:
                yield Converted(name, problem=str(exc))

    records.__doc__ = convert_one.__doc__
    return records


FORMATS: dict[str, Callable[..., Iterator[Converted]]] = {
    "coco": coco, "lvis": lvis, "refcoco": refcoco, "hf": hf, "llava": per_record(llava_record),
    "mis": per_record(mis_record)}


def format_options(fmt: str) -> list[str]:
    """The options format ``fmt`` takes (keyword arguments after ``src`` and ``target``)."""
    return list(inspect.signature(FORMATS[fmt]).parameters)[2:]


def output_name(fmt: str, options: dict[str, Any]) -> str:
    """The output file's stem: the format, then the naming options given (``refcoco_val``)."""
    tags = [str(options[key]).replace(",", "+") for key in NAMING_OPTIONS if options.get(key) is not None]
    return "_".join([fmt, *tags])


def convert(fmt: str, src: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
            progress: bool = True, **options: Any) -> Conversion:
    """Convert ``src`` (in format ``fmt``, with the format's ``options``) to
    ``out_dir/<output_name>.jsonl``; bad records are skipped and listed (``progress``: a bar
    counting the records). Hugging Face's ``hf`` also takes a folder or a hub id as ``src``.

    Raises:
        ValueError: unknown format or option, unreadable source, or no sample converted.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    unknown = sorted(set(options) - set(format_options(fmt)))
    if unknown:
        raise ValueError(f"format {fmt}: unknown option {unknown[0]!r}; it takes: "
                         f"{', '.join(format_options(fmt)) or 'none'}")
    src, out = Path(src), Path(out_dir)
    if fmt != "hf" and not src.is_file():
        raise ValueError(f"{src}: no such file")
    target = Target(Path(image_root) if image_root is not None else src.parent, out)
    out.mkdir(parents=True, exist_ok=True)
    result = Conversion(out / f"{output_name(fmt, options)}.jsonl")
    partial = result.path.with_suffix(".jsonl.partial")
    try:
        with partial.open("w") as handle:
            for record in tqdm(FORMATS[fmt](src, target, **options), desc=f"convert {fmt}", unit="record",
                               disable=not progress):
                _write(record, handle, result, out)
    except BaseException:  # a broken source, Ctrl-C, a full disk: no half file is left behind
        partial.unlink(missing_ok=True)
        raise
    result.skipped_path.write_text("".join(f"{line}\n" for line in result.skipped))
    if not result.converted:
        partial.unlink()
        shown = "\n  ".join(result.skipped[:5])
        raise ValueError(f"{src}: no record converted ({len(result.skipped)} skipped, all listed in "
                         f"{result.skipped_path}):\n  {shown}")
    os.replace(partial, result.path)
    return result


def _write(record: Converted, handle: Any, result: Conversion, out: Path) -> None:
    """Validate a record's samples as training reads them and write them, or count its skip."""
    problem = record.problem
    for sample in record.samples if problem is None else []:
        _, found = parse_sample(sample, out, f"record {record.name}", read_image_size, video_file_problem)
        if found:
            problem = "; ".join(f"{name}: {message}" for name, message in found)
            break
    if problem is not None:
        result.skipped.append(f"record {record.name}: {problem}")
        return
    handle.writelines(json.dumps(sample) + "\n" for sample in record.samples)
    result.converted += len(record.samples)
    result.dropped.update(record.dropped)

