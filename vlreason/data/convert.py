"""Data in other layouts, converted to vlreason's JSONL (``vlreason data convert FORMAT SRC --out DIR``).

Each converter reads its source record by record and writes ``DIR/<format>.jsonl``; a record it
cannot convert is skipped and reported as ``record <id>: <problem>``. The written file is then
read back with ``read_jsonl``, so what a conversion reports as converted is what training reads.

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


def read_records(src: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON list, a ``{"data": [...]}`` object, or JSON Lines.

    Raises:
        ValueError: the file is not one of those (with the line of a JSON Lines error).
    """
    text = src.read_text()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
        parsed = parsed["data"]
    if isinstance(parsed, list):
        yield from parsed
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{src}:{number}: not JSON ({exc.msg}); give a JSON list of records or one "
                                 "JSON object per line") from None


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
    resolved = [image_root / path for path in paths]
    missing = [str(path) for path in resolved if not path.is_file()]
    if missing:
        raise RecordError(f"image not found: {missing[0]} (set --image-root to the folder the paths start from)")
    return [os.path.relpath(path.resolve(), out_dir.resolve()) for path in resolved]


def _response(record: dict[str, Any]) -> str | None:
    reply = _first(record, ("response", "output"))
    thoughts = [str(record[key]).strip() for key in ("perception", "reasoning") if record.get(key)]
    if reply is None:
        if thoughts:
            raise RecordError("perception/reasoning without a 'response' to follow them")
        return None
    return f"<think>{' '.join(thoughts)}</think><answer>{reply}</answer>" if thoughts else str(reply)


FORMATS: dict[str, Callable[[Any, int, Path, Path], dict[str, Any]]] = {"mis": mis_record}


def convert(fmt: str, src: str | Path, out_dir: str | Path, image_root: str | Path | None = None) -> Conversion:
    """Convert ``src`` (in format ``fmt``) to ``out_dir/<fmt>.jsonl``; bad records are skipped and listed.

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
        for index, record in enumerate(read_records(src)):
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
