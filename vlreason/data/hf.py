"""Hugging Face ``datasets`` as vlreason samples (``vlreason data convert hf SRC``).

``SRC`` is a local file (``.parquet``, ``.arrow``, ``.json`` / ``.jsonl``, ``.csv``), a folder
written by ``Dataset.save_to_disk``, a folder of data files laid out as on the hub, or a hub id
(where the network allows). Files, folders and hub ids are streamed row by row, so memory does
not grow with the number of rows; option ``split`` chooses the split of a folder or hub id
(default ``train``).

Columns map to the schema's fields by option ``columns`` (``{field: column}``; on the command line
``--column field=column``, repeated). Unmapped fields take the first of these columns present:

=============  ===============================================================
field          default columns
=============  ===============================================================
``id``         ``id``
``prompt``     ``question``, ``query``, ``prompt``, ``problem``, ``instruction``
``images``     ``images``, ``image``
``answer``     ``answer``
``choices``    ``choices``, ``options``
``label``      ``label``
=============  ===============================================================

``prompt`` is required. An image value may be a PIL image (an ``Image`` feature), encoded bytes
(``{"bytes": ...}`` or raw), a path (against ``--image-root``), or a list of those; decoded
images are written as PNG and encoded ones as they are, under ``DIR/images/``. An integer
``label`` of a ``ClassLabel`` feature becomes its class name. A field not in the schema (e.g.
``--column difficulty=level``) is kept as an extra column; an integer ``answer`` with ``choices``
is the index of the right option (ScienceQA, A-OKVQA) and becomes its letter, unless the number is
itself one of the options; columns not mapped are left out. A
row without a question or with an unreadable image is skipped with the row's id and the reason.
"""

from __future__ import annotations

import io
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from vlreason.data.records import Converted, RecordError, Target

DEFAULT_COLUMNS = {"id": ("id",), "prompt": ("question", "query", "prompt", "problem", "instruction"),
                   "images": ("images", "image"), "answer": ("answer",), "choices": ("choices", "options"),
                   "label": ("label",)}
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def hf(src: Path, target: Target, split: str | None = None, columns: dict[str, str] | None = None
       ) -> Iterator[Converted]:
    """The rows of a Hugging Face dataset as samples (module docstring)."""
    dataset = open_dataset(src, split)
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"{src}: the dataset has no rows")
    mapping = column_mapping(list(first), columns or {})
    names = _class_names(dataset, mapping.get("label"))
    for number, row in enumerate(dataset):
        yield _row(row, number, mapping, names, target)


def open_dataset(src: Path, split: str | None) -> Any:
    """The ``split`` (default ``train``) of a dataset folder or hub id, or the rows of a dataset
    file (one split), as an iterable of row dicts.

    Raises:
        ValueError: an unknown file type, a split for a single file, a missing split, or a source
            that neither exists here nor loads from the hub.
    """
    try:
        import datasets
    except ImportError:
        raise ValueError("format hf reads Hugging Face datasets: pip install 'vlreason[datasets]'") from None
    saved = src.is_dir() and (src / "state.json").is_file()  # one Dataset.save_to_disk split
    if (src.is_file() or saved) and split not in (None, "train"):
        raise ValueError(f"{src}: holds one split; --split (options.split) is for a folder of splits or a hub id")
    if src.is_file():
        if src.suffix not in FILE_BUILDERS:
            raise ValueError(f"{src}: give a {', '.join(FILE_BUILDERS)} file, a dataset folder or a hub id")
        return datasets.load_dataset(FILE_BUILDERS[src.suffix], data_files=str(src), split="train", streaming=True)
    if saved:
        return datasets.load_from_disk(str(src))
    split = split or "train"
    if src.is_dir() and (src / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        splits = datasets.load_from_disk(str(src))
        if split not in splits:
            raise ValueError(f"{src}: no split {split!r}; it has {', '.join(splits)} (set --split)")
        return splits[split]
    try:
        return datasets.load_dataset(str(src), split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - hub, network and builder errors all mean "cannot load this"
        where = "a folder here" if src.is_dir() else "not a file or folder here, and as a hub id"
        raise ValueError(f"{src}: {where} it does not load ({type(exc).__name__}: {str(exc)[:300]})") from None


def column_mapping(available: list[str], columns: dict[str, str]) -> dict[str, str]:
    """``{field: column}``: the given mapping, then each unmapped field's first default column present.

    Raises:
        ValueError: a mapped column that does not exist, or no question column.
    """
    missing = [f"{name}={column}" for name, column in columns.items() if column not in available]
    if missing:
        raise ValueError(f"column {missing[0]!r}: the dataset has no such column; its columns: "
                         f"{', '.join(available)}")
    mapping = dict(columns)
    for name, candidates in DEFAULT_COLUMNS.items():
        found = next((c for c in candidates if c in available and c not in mapping.values()), None)
        if name not in mapping and found is not None:
            mapping[name] = found
    if "prompt" not in mapping:
        raise ValueError(f"no question column: map one with --column prompt=NAME (columns: {', '.join(available)})")
    return mapping


def _class_names(dataset: Any, column: str | None) -> list[str] | None:
    """The class names of a ``ClassLabel`` label column, when the dataset declares one."""
    feature = (getattr(dataset, "features", None) or {}).get(column) if column else None
    return list(feature.names) if hasattr(feature, "names") else None


def _row(row: dict[str, Any], number: int, mapping: dict[str, str], names: list[str] | None,
         target: Target) -> Converted:
    name = str(row.get(mapping["id"])) if "id" in mapping else f"row-{number}"
    try:
        if not isinstance(row.get(mapping["prompt"]), str) or not row[mapping["prompt"]].strip():
            raise RecordError(f"no question in column {mapping['prompt']!r}")
        sample: dict[str, Any] = {"id": name}
        for field_name, column in mapping.items():
            value = row.get(column)
            if field_name == "images":
                sample["images"] = _images(value, number, target)
            elif field_name == "label" and names is not None and isinstance(value, int):
                sample["label"] = names[value]
            elif value is not None and field_name != "id":
                sample[field_name] = value
        if "answer" in sample:
            sample["answer"] = _choice_letter(sample["answer"], sample.get("choices"))
    except RecordError as exc:
        return Converted(name, problem=str(exc))
    return Converted(name, [sample])


def _choice_letter(answer: Any, choices: Any) -> Any:
    """An integer answer to a list of choices as the letter of the option it indexes (ScienceQA,
    A-OKVQA), unless it is itself an option's text ("2" among "1", "2", "3" stays)."""
    if isinstance(answer, int) and not isinstance(answer, bool) and isinstance(choices, list) \
            and str(answer) not in map(str, choices) and 0 <= answer < min(len(choices), 26):
        return string.ascii_uppercase[answer]
    return answer


def _images(value: Any, number: int, target: Target) -> list[str]:
    """The row's images as files relative to the output folder (written there unless they are paths)."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    paths = []
    for k, item in enumerate(values):
        if isinstance(item, dict):
            item = item.get("bytes") or item.get("path")
        if isinstance(item, str):
            paths += target.media([item])
        elif isinstance(item, (bytes, Image.Image)):
            paths.append(_write_image(item, f"{number:07d}-{k}", target.out_dir))
        else:
            raise RecordError(f"image {k}: expected a PIL image, bytes or a path, got {type(item).__name__}")
    return paths


def _write_image(image: bytes | Image.Image, stem: str, out_dir: Path) -> str:
    """An image written under ``out_dir/images`` (bytes as they are, decoded images as PNG)."""
    folder = out_dir / "images"
    folder.mkdir(exist_ok=True)
    if isinstance(image, Image.Image):
        path = folder / f"{stem}.png"
        image.save(path)
    else:
        try:
            kind = Image.open(io.BytesIO(image)).format or "bin"
        except (OSError, ValueError) as exc:
            raise RecordError(f"image bytes that do not open ({exc})") from None
        path = folder / f"{stem}.{kind.lower()}"
        path.write_bytes(image)
    return str(path.relative_to(out_dir))
