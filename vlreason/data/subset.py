"""Few-shot subsets: k samples per class, drawn with a seed (``vlreason data subset``), as
Visual-RFT and CLS-RL train on.

A sample's classes are its ``label`` (one, or a list for multi-label), the ``labels`` of its
boxes (detection), or its ``category``. Samples are visited in a seeded random order and a sample
is kept while any of its classes has fewer than k kept; a kept sample counts for all its classes,
so with several classes per sample some classes end with more than k (as in the references'
few-shot detection splits). A class with fewer than k samples in the source keeps them all and is
reported. The subset is written in the source's order, every line as it was, with media paths
rewritten for the new file's folder.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlreason.data.jsonl import read_jsonl
from vlreason.data.schema import Sample


@dataclass
class Subset:
    """What ``few_shot`` wrote: the file, the kept samples per class, and the classes short of k."""

    path: Path
    kept: int
    per_class: dict[str, int] = field(default_factory=dict)
    short: dict[str, int] = field(default_factory=dict)  # class -> samples the source has (< k)


def classes_of(sample: Sample) -> list[str]:
    """The classes a sample counts for (see the module docstring); empty when it has none."""
    if sample.label is not None:
        return [sample.label] if isinstance(sample.label, str) else list(sample.label)
    if sample.labels:
        return sorted(set(sample.labels))
    return [sample.category] if sample.category else []


def few_shot(src: str | Path, out: str | Path, shots: int, seed: int = 0) -> Subset:
    """Write ``shots`` samples per class of ``src`` (JSONL) to ``out``.

    Raises:
        ValueError: ``shots`` < 1, or no sample of ``src`` has a class.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    src, out = Path(src), Path(out)
    samples = read_jsonl(src).samples
    classes = [classes_of(sample) for sample in samples]
    if not any(classes):
        raise ValueError(f"{src}: no sample has a class (label, labels or category) to draw shots of")
    available = Counter(name for names in classes for name in names)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    counts: Counter[str] = Counter()
    chosen = set()
    for index in order:
        if any(counts[name] < shots for name in classes[index]):
            chosen.add(index)
            counts.update(classes[index])
    lines = _source_lines(samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for index in sorted(chosen):
            handle.write(json.dumps(_moved(lines[index], src.parent, out.parent)) + "\n")
    return Subset(out, len(chosen), dict(sorted(counts.items())),
                  {name: n for name, n in sorted(available.items()) if n < shots})


def _source_lines(samples: list[Sample]) -> list[dict]:
    """Each sample's line as the source wrote it (by its ``file:line``)."""
    cache: dict[str, list[str]] = {}
    records = []
    for sample in samples:
        path, _, number = sample.source.rpartition(":")
        if path not in cache:
            cache[path] = Path(path).read_text().splitlines()
        records.append(json.loads(cache[path][int(number) - 1]))
    return records


def _moved(record: dict, old: Path, new: Path) -> dict:
    """``record`` with its relative media paths rewritten from folder ``old`` to folder ``new``."""
    moved = dict(record)
    for key in ("images", "videos"):
        paths = record.get(key)
        if isinstance(paths, str):
            paths = [paths]
        if paths:
            moved[key] = [p if p.startswith("data:") or Path(p).is_absolute()
                          else os.path.relpath((old / p).resolve(), new.resolve()) for p in paths]
    return moved
