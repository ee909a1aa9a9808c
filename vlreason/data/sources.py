"""Training and evaluation data named in another format, converted on the fly.

A config's ``data.train`` / ``data.eval`` is a vlreason JSONL file, ``FORMAT:PATH``
(``llava:llava_instruct.json``: image paths from the source's folder, no options), or a mapping::

    data:
      train: {format: refcoco, path: refcoco/refs(unc).p, image_root: coco/train2014,
              options: {split: train}}
      eval: {format: refcoco, path: refcoco/refs(unc).p, image_root: coco/train2014,
             options: {split: val}}

``FORMAT`` is any of ``vlreason data convert``'s formats, and ``options`` its options. Before the
run is checked, ``resolve_sources`` converts each source with the same ``convert`` as the command
into ``<output_dir>/data/<name>-<key>/`` and puts the JSONL path in its place. ``key`` hashes the
format, the paths, the options and the source file's size and modification time, so a source is
converted once and again only when it changes; ``source.json`` beside the output records what was
converted (written last: a conversion cut short is redone).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from vlreason.data.convert import FORMATS, convert, output_name

logger = logging.getLogger(__name__)


def split_source(text: str) -> tuple[str, str] | None:
    """``(format, path)`` of a ``FORMAT:PATH`` string, or None for a plain path."""
    fmt, sep, path = text.partition(":")
    return (fmt, path) if sep and fmt in FORMATS and path else None


def converted_path(source: dict[str, Any], cache_root: Path) -> Path:
    """Where ``source`` (``{format, path, image_root, options}``) is converted to under ``cache_root``."""
    src = Path(source["path"])
    stat = src.stat() if src.exists() else None
    key = json.dumps({**source, "size": stat and stat.st_size, "mtime_ns": stat and stat.st_mtime_ns},
                     sort_keys=True, default=str)
    name = output_name(source["format"], source["options"])
    folder = cache_root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return folder / f"{name}.jsonl"


def prepare_source(source: dict[str, Any], cache_root: Path, progress: bool = True) -> Path:
    """The JSONL file of ``source``, converted now unless an earlier conversion of the same
    source is complete.

    Raises:
        ValueError: the conversion failed (unreadable source, no record converted, bad option).
    """
    path = converted_path(source, cache_root)
    stamp = path.with_name("source.json")
    if stamp.is_file() and path.is_file():
        return path
    logger.info("converting %s data %s into %s", source["format"], source["path"], path.parent)
    result = convert(source["format"], source["path"], path.parent, source.get("image_root"), progress,
                     **source["options"])
    if result.skipped:
        logger.warning("%s: skipped %d record(s), listed in %s", source["path"], len(result.skipped),
                       result.skipped_path)
    stamp.write_text(json.dumps({**source, "converted": result.converted, "skipped": len(result.skipped),
                                 "dropped": dict(result.dropped)}, indent=1))
    return path
