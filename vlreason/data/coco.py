"""COCO, LVIS and RefCOCO annotations as vlreason samples (``vlreason data convert coco|lvis|refcoco``).

All three read an instances file (``images``, ``annotations``, ``categories``) with ``read_coco``,
which walks it item by item and keeps per annotation only its id, category, box and crowd flag:
segmentation polygons, the bulk of the file, are never held (pycocotools keeps them all).
Boxes become ``[x1, y1, x2, y2]`` from ``[x, y, w, h]``, clamped to the image; labels are the
categories' names, so category ids need not be contiguous. Image paths are ``file_name``
against ``--image-root`` (LVIS v1 has no ``file_name``: the last two parts of ``coco_url``,
``train2017/000000391895.jpg``, against the COCO root). An annotation whose category id is not
among the categories skips its image with that message.

``coco`` (option ``task``):

* ``detection`` (default): one sample per image with every box and its label. Crowd regions
  (``iscrowd``) are not objects to find: they go to the extra column ``crowd_regions``
  (``[{"box", "label"}]``), which evaluation's COCO AP reads as COCOeval does (a detection on one
  is neither a hit nor a false alarm). Boxes without area are left out and counted. An image
  left with no box (or without annotations) is skipped with that reason.
* ``grounding``: one sample per object whose category appears once in its image ("Where is the
  dog?" has one answer); objects sharing their category with another object or crowd region of
  the image have no unambiguous referent and are left out and counted.

``lvis``: as ``coco`` detection (or grounding), keeping the categories of the ``frequency`` groups
asked for (``rare``, ``common``, ``frequent``, comma-separated; default all), as Visual-RFT's
rare-category split does. An image with no box of those categories is skipped. LVIS's federated
labels (``neg_category_ids``, ``not_exhaustive_category_ids``) are not kept: evaluation scores
converted LVIS with plain COCO AP, not LVIS's federated AP.

``refcoco`` (RefCOCO, RefCOCO+, RefCOCOg): the source is the refs file (``refs(unc).p``,
``refs(umd).p``, ...; a pickle as released, or the same list as JSON) and option ``instances``
names the instances file (default: ``instances.json`` beside it). Option ``split`` (``train``,
``val``, ``testA``, ``testB``, ``test``) chooses the refs converted; each of a ref's sentences
becomes a grounding sample, the referring expression as the question and the referred
annotation's box as the answer (RefCOCO accuracy is then evaluation's ``iou@0.5``). The pickle is
read by an unpickler that builds only plain data (lists, dicts, strings, numbers): a refs file
that asks for anything else is refused, so a tampered file cannot run code. The released files
are Python 2 pickles; their byte strings are read as UTF-8 text.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from vlreason.data.records import Converted, RecordError, Target, object_lists, read_records

DETECT_PROMPT = 'Detect every object. Answer with a JSON list of {"bbox_2d": [x1, y1, x2, y2], "label": ...}.'
BOX_ANSWER = "Answer with its bounding box [x1, y1, x2, y2]."
TASKS = ("detection", "grounding")
FREQUENCIES = {"rare": "r", "common": "c", "frequent": "f"}
REF_SPLITS = ("train", "val", "test", "testA", "testB", "testC")


class Annotation(NamedTuple):
    """The part of a COCO annotation a sample needs (``bbox``: ``[x, y, w, h]`` as in the file)."""

    id: Any
    category_id: Any
    bbox: Any
    crowd: bool


@dataclass
class CocoIndex:
    """An instances file without its segmentations: images in file order, annotations by image id."""

    images: list[dict[str, Any]]  # {"id", "file_name", "width", "height"}
    annotations: dict[Any, list[Annotation]]
    categories: dict[Any, dict[str, Any]]  # id -> {"name", "frequency"}
    by_id: dict[Any, int]  # image id -> index in images


def read_coco(src: Path) -> CocoIndex:
    """The images, annotations (by image) and categories of a COCO or LVIS instances file.

    Raises:
        ValueError: the file is not JSON, or lacks an ``images``, ``annotations`` or ``categories`` list.
    """
    index = CocoIndex([], {}, {}, {})
    seen = set()
    for key, item in object_lists(src, ("images", "annotations", "categories"), "COCO instances file"):
        seen.add(key)
        if not isinstance(item, dict):
            raise ValueError(f"{src}: an entry of {key!r} is not an object: {str(item)[:80]}")
        if key == "annotations":
            index.annotations.setdefault(item.get("image_id"), []).append(
                Annotation(item.get("id"), item.get("category_id"), item.get("bbox"), bool(item.get("iscrowd"))))
        elif key == "images":
            index.by_id[item.get("id")] = len(index.images)
            index.images.append({"id": item.get("id"), "file_name": _file_name(item),
                                 "width": item.get("width"), "height": item.get("height")})
        else:
            index.categories[item.get("id")] = {"name": item.get("name"), "frequency": item.get("frequency")}
    missing = [key for key in ("images", "annotations", "categories") if key not in seen]
    if missing:
        raise ValueError(f"{src}: not a COCO instances file (no {', '.join(missing)} list)")
    return index


def _file_name(image: dict[str, Any]) -> Any:
    """COCO's ``file_name``, or for LVIS v1 the last two parts of ``coco_url`` (``train2017/x.jpg``)."""
    if image.get("file_name") is None and isinstance(image.get("coco_url"), str):
        return "/".join(image["coco_url"].rsplit("/", 2)[-2:])
    return image.get("file_name")


def coco(src: Path, target: Target, task: str = "detection") -> Iterator[Converted]:
    """A COCO instances file: per image, a detection sample or grounding samples (module docstring)."""
    _check_task(task)
    index = read_coco(src)
    for image in index.images:
        yield image_samples(image, index.annotations.get(image["id"], []), index.categories, target, task)


def lvis(src: Path, target: Target, task: str = "detection", frequency: str = "rare,common,frequent"
         ) -> Iterator[Converted]:
    """An LVIS instances file, keeping the categories of the ``frequency`` groups (module docstring)."""
    _check_task(task)
    groups = _frequency_codes(frequency)
    index = read_coco(src)
    kept = {cid: c for cid, c in index.categories.items() if c["frequency"] in groups}
    if not kept:
        raise ValueError(f"{src}: no category has frequency {frequency!r} (LVIS categories carry 'frequency': r, c "
                         "or f)")
    for image in index.images:
        annotations = index.annotations.get(image["id"], [])
        chosen = [a for a in annotations if a.category_id in kept or a.category_id not in index.categories]
        result = image_samples(image, chosen, index.categories, target, task)
        result.dropped["boxes of other frequency groups"] += len(annotations) - len(chosen)
        yield result


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task {task!r}: choose {' or '.join(TASKS)}")


def _frequency_codes(frequency: str) -> set[str]:
    names = [name.strip() for name in frequency.split(",") if name.strip()]
    unknown = [name for name in names if name not in FREQUENCIES]
    if unknown or not names:
        raise ValueError(f"frequency {frequency!r}: give some of {', '.join(FREQUENCIES)}, comma-separated")
    return {FREQUENCIES[name] for name in names}


def image_samples(image: dict[str, Any], annotations: list[Annotation], categories: dict[Any, dict[str, Any]],
                  target: Target, task: str) -> Converted:
    """One image's detection sample, or its grounding samples (``task``)."""
    result = Converted(f"coco-{image['id']}")
    try:
        objects, crowd = _objects(image, annotations, categories, result.dropped)
        images = target.media([image["file_name"]])
    except RecordError as exc:
        result.problem = str(exc)
        return result
    if task == "detection":
        result.samples = [_detection(result.name, images, objects, crowd)]
        result.dropped["crowd regions (kept in crowd_regions)"] += len(crowd)
        return result
    result.dropped["crowd regions (not objects to locate)"] += len(crowd)
    counts = Counter(label for _, label, _ in objects) + Counter(label for _, label in crowd)
    result.samples = [_grounding(f"{result.name}-{ann_id}", images, box, f"Where is the {label}? {BOX_ANSWER}")
                      for box, label, ann_id in objects if counts[label] == 1]
    result.dropped["objects sharing their category in the image"] += len(objects) - len(result.samples)
    if not result.samples:
        result.problem = "no object whose category appears once in the image"
    return result


def _objects(image: dict[str, Any], annotations: list[Annotation], categories: dict[Any, dict[str, Any]],
             dropped: Counter[str]) -> tuple[list[tuple[list[float], str, Any]], list[tuple[list[float], str]]]:
    """The image's objects ``(box, label, annotation id)`` and crowd regions ``(box, label)``.

    Raises:
        RecordError: a bad image entry or annotation, or no object left.
    """
    width, height = image["width"], image["height"]
    if not isinstance(image["file_name"], str) or not all(isinstance(v, int) and v > 0 for v in (width, height)):
        raise RecordError("the image entry needs file_name (or coco_url), width and height")
    objects, crowd = [], []
    for annotation in annotations:
        if annotation.category_id not in categories:
            raise RecordError(f"annotation {annotation.id}: category id {annotation.category_id} is not in categories")
        box = _xyxy(annotation, width, height)
        label = categories[annotation.category_id]["name"]
        if annotation.crowd:
            crowd.append((box, label))
        elif box[2] > box[0] and box[3] > box[1]:
            objects.append((box, label, annotation.id))
        else:
            dropped["boxes without area"] += 1
    if not objects:
        raise RecordError("no box to find (no annotations, or only crowd regions and boxes without area)")
    return objects, crowd


def _xyxy(annotation: Annotation, width: int, height: int) -> list[float]:
    """``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` clamped to the image (rounded to 1e-6 pixels: COCO gives
    two decimals, so this removes only the float noise of ``x + w``)."""
    bbox = annotation.bbox
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise RecordError(f"annotation {annotation.id}: bbox must be [x, y, w, h], got {bbox!r}")
    x, y, w, h = bbox
    return [round(v, 6) for v in (max(0.0, x), max(0.0, y), min(width, x + w), min(height, y + h))]


def _detection(name: str, images: list[str], objects: list[tuple[list[float], str, Any]],
               crowd: list[tuple[list[float], str]]) -> dict[str, Any]:
    answer = [{"bbox_2d": _rounded(box), "label": label} for box, label, _ in objects]
    sample = {"id": name, "images": images, "prompt": DETECT_PROMPT, "boxes": [box for box, _, _ in objects],
              "labels": [label for _, label, _ in objects], "response": f"<answer>{json.dumps(answer)}</answer>"}
    return sample | ({"crowd_regions": [{"box": box, "label": label} for box, label in crowd]} if crowd else {})


def _grounding(name: str, images: list[str], box: list[float], question: str) -> dict[str, Any]:
    """A single-box sample; the SFT reference rounds the box to whole pixels, the ground truth keeps it."""
    return {"id": name, "images": images, "prompt": question,
            "boxes": [box], "response": f"<answer>{json.dumps(_rounded(box))}</answer>"}


def _rounded(box: list[float]) -> list[int]:
    return [round(v) for v in box]


def refcoco(src: Path, target: Target, split: str | None = None, instances: str | None = None
            ) -> Iterator[Converted]:
    """RefCOCO / RefCOCO+ / RefCOCOg refs of one ``split``: a grounding sample per sentence (module docstring)."""
    refs = read_refs(src)
    present = Counter(str(ref.get("split")) for ref in refs if isinstance(ref, dict))
    if split not in present:
        found = ", ".join(f"{name} ({count} refs)" for name, count in sorted(present.items())) or "none"
        raise ValueError(f"{src}: choose the split to convert with --split (refcoco: split=...); its splits: {found}")
    index = read_coco(Path(instances) if instances else src.parent / "instances.json")
    boxes = {a.id: (image_id, a) for image_id, annotations in index.annotations.items() for a in annotations}
    for number, ref in enumerate(refs):
        if isinstance(ref, dict) and ref.get("split") == split:
            yield _ref_samples(ref, number, index, boxes, target)


def _ref_samples(ref: dict[str, Any], number: int, index: CocoIndex, boxes: dict[Any, tuple[Any, Annotation]],
                 target: Target) -> Converted:
    result = Converted(f"ref-{ref.get('ref_id', f'#{number}')}")
    try:
        if ref.get("ann_id") not in boxes:
            raise RecordError(f"ann_id {ref.get('ann_id')} is not among the instances' annotations")
        image_id, annotation = boxes[ref["ann_id"]]
        image = index.images[index.by_id[image_id]] if image_id in index.by_id else None
        if image is None:
            raise RecordError(f"image {image_id} is not among the instances' images")
        ((box, _, _),), _ = _objects(image, [annotation], index.categories, Counter())
        images = target.media([image["file_name"]])
        sentences = [(s.get("sent_id", k), s.get("sent") or s.get("raw"))
                     for k, s in enumerate(ref.get("sentences") or []) if isinstance(s, dict)]
        if not any(text for _, text in sentences):
            raise RecordError("no sentence")
    except RecordError as exc:
        result.problem = str(exc)
        return result
    result.samples = [_grounding(f"{result.name}-{sent_id}", images, box, f'Where is "{text.strip()}"? {BOX_ANSWER}')
                      for sent_id, text in sentences if text]
    return result


def read_refs(src: Path) -> list[Any]:
    """The refs list of a RefCOCO-family refs file: a pickle (plain data only) or JSON / JSON Lines.

    Raises:
        ValueError: unreadable, not a list, or a pickle asking to build something other than plain data.
    """
    if src.suffix in (".json", ".jsonl"):
        return list(read_records(src))
    try:
        with src.open("rb") as handle:
            refs = _text(_PlainUnpickler(handle, encoding="bytes").load())
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{src}: not a refs pickle ({exc})") from None
    if not isinstance(refs, list):
        raise ValueError(f"{src}: a refs file holds a list of refs, got {type(refs).__name__}")
    return refs


def _text(value: Any) -> Any:
    """Python 2's byte strings (the released refs files' keys and sentences) as UTF-8 text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_text(item) for item in value]
    if isinstance(value, dict):
        return {_text(key): _text(item) for key, item in value.items()}
    return value


class _PlainUnpickler(pickle.Unpickler):
    """Builds lists, dicts, strings and numbers only: any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it asks to build {module}.{name}; a refs file holds only lists, dicts, "
                                     "strings and numbers")
