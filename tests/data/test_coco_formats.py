"""``vlreason data convert coco|lvis|refcoco``: annotation files written by the tests, malformed
entries named, the instances file read item by item, and a COCO round trip (convert, train,
evaluate) whose AP equals COCOeval's on the same predictions."""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import pytest
from PIL import Image, ImageDraw

from vlreason.cli import main
from vlreason.data.coco import read_coco
from vlreason.data.convert import convert
from vlreason.data.jsonl import read_jsonl
from vlreason.data.records import object_lists


def _images(folder, names, size=(100, 80)):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", size).save(folder / name)


def test_coco_images_become_detection_samples(tmp_path):
    (tmp_path / "val").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        Image.new("RGB", (100, 80)).save(tmp_path / "val" / name)
    coco = {"categories": [{"id": 3, "name": "car"}, {"id": 17, "name": "cat"}],  # ids not contiguous
            "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                       {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80},
                       {"id": 3, "file_name": "c.jpg", "width": 100, "height": 80},
                       {"id": 4, "file_name": "d.jpg", "width": 100, "height": 80},
                       {"id": 5, "file_name": "gone.jpg", "width": 100, "height": 80}],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "iscrowd": 0},
                {"id": 11, "image_id": 1, "category_id": 17, "bbox": [90, 70, 20, 20], "iscrowd": 0},  # clamped
                {"id": 12, "image_id": 1, "category_id": 17, "bbox": [0, 0, 50, 50], "iscrowd": 1},  # crowd
                {"id": 13, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # no area
                {"id": 14, "image_id": 4, "category_id": 99, "bbox": [5, 5, 10, 10], "iscrowd": 0},
                {"id": 15, "image_id": 5, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    result = convert("coco", path, tmp_path / "out", image_root=tmp_path / "val")
    assert result.converted == 1
    assert result.skipped[0] == "record coco-2: no box to find (no annotations, or only crowd regions and boxes " \
                                "without area)"
    assert result.skipped[1].startswith("record coco-3: no box to find")
    assert result.skipped[2] == "record coco-4: annotation 14: category id 99 is not in categories"
    assert result.skipped[3].startswith("record coco-5: image not found: ")
    (sample,) = read_jsonl(result.path).samples
    assert sample.boxes == [(10.0, 20.0, 40.0, 60.0), (90.0, 70.0, 100.0, 80.0)] and sample.labels == ["car", "cat"]
    assert sample.extra["crowd_regions"] == [{"box": [0.0, 0.0, 50.0, 50.0], "label": "cat"}]
    assert json.loads(sample.response.split("<answer>")[1].split("</answer>")[0])[1] == {
        "bbox_2d": [90, 70, 100, 80], "label": "cat"}
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[]")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        convert("coco", not_coco, tmp_path / "x")


def test_ap_on_converted_coco_equals_cocoeval_on_the_original(tmp_path):
    """The same detections scored by pycocotools on the original file and by evaluation on the
    converted one: non-contiguous ids, a crowd region with a detection on it, a missed object."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from vlreason.eval.evaluate import detection_metrics
    from vlreason.rewards.parsing import PredBox

    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (200, 150)).save(tmp_path / name)
    annotations = [(1, 7, [10, 10, 40, 30], 0), (1, 42, [100, 50, 50, 60], 0), (2, 7, [20, 30, 60, 40], 0),
                   (2, 42, [0, 0, 120, 100], 1), (3, 42, [30, 40, 80, 70], 0), (3, 7, [150, 100, 30, 30], 0)]
    coco = {"categories": [{"id": 7, "name": "dog"}, {"id": 42, "name": "person"}],
            "images": [{"id": i, "file_name": f"{n}.jpg", "width": 200, "height": 150} for i, n in
                       ((1, "a"), (2, "b"), (3, "c"))],
            "annotations": [{"id": k, "image_id": image, "category_id": cat, "bbox": box, "iscrowd": crowd,
                             "area": box[2] * box[3]} for k, (image, cat, box, crowd) in enumerate(annotations, 1)]}
    detections = [(1, 7, [12, 11, 38, 30], 0.9), (1, 42, [95, 55, 50, 50], 0.8), (1, 7, [60, 60, 20, 20], 0.7),
                  (2, 7, [22, 28, 55, 45], 0.6), (2, 42, [10, 10, 60, 50], 0.95),  # the second is on the crowd
                  (3, 42, [35, 45, 70, 60], 0.85), (3, 42, [0, 0, 30, 30], 0.3)]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(path))
        found = truth.loadRes([{"image_id": i, "category_id": c, "bbox": b, "score": p} for i, c, b, p in detections])
        reference = COCOeval(truth, found, iouType="bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    samples = read_jsonl(convert("coco", path, tmp_path / "out", progress=False).path).samples
    names = {7: "dog", 42: "person"}
    predictions = [[PredBox((b[0], b[1], b[0] + b[2], b[1] + b[3]), names[c], p) for i, c, b, p in detections
                    if f"coco-{i}" == sample.id] for sample in samples]
    ours = detection_metrics(samples, predictions)
    assert [ours["map"], ours["map50"], ours["map75"]] == pytest.approx(list(reference.stats[:3]), abs=1e-6)
    assert 0 < ours["map"] < 1
    for sample in samples:  # without the crowd region the detection on it is a false alarm
        sample.extra.pop("crowd_regions", None)
    assert detection_metrics(samples, predictions)["map"] < ours["map"] - 1e-3


@pytest.fixture
def scene(tmp_path):
    """A COCO file: image 1 with one dog, two people and a crowd of people; image 2 with one dog."""
    _images(tmp_path / "img", ["a.jpg", "b.jpg"])
    coco = {"info": {"year": 2017}, "licenses": [{"id": 1, "name": "x"}],
            "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                       {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "iscrowd": 0,
                 "segmentation": [[10, 10, 30, 10, 30, 30]]},
                {"id": 2, "image_id": 1, "category_id": 42, "bbox": [40, 10, 10, 30], "iscrowd": 0},
                {"id": 3, "image_id": 1, "category_id": 42, "bbox": [60, 10, 10, 30], "iscrowd": 0},
                {"id": 4, "image_id": 2, "category_id": 7, "bbox": [5, 5, 30, 30], "iscrowd": 0},
                {"id": 5, "image_id": 2, "category_id": 42, "bbox": [50, 5, 40, 40], "iscrowd": 1}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 42, "name": "person"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco, indent=2))
    return path


def test_the_instances_file_is_read_item_by_item_without_segmentations(scene):
    whole = json.loads(scene.read_text())
    streamed = list(object_lists(scene, ("images", "annotations"), chunk_chars=7))
    assert streamed == [("images", i) for i in whole["images"]] + [("annotations", a) for a in whole["annotations"]]
    index = read_coco(scene)
    assert [a.id for a in index.annotations[1]] == [1, 2, 3] and index.annotations[1][0].bbox == [10, 10, 20, 20]
    assert not hasattr(index.annotations[1][0], "segmentation")
    broken = scene.with_name("broken.json")
    broken.write_text(scene.read_text()[:300])
    with pytest.raises(ValueError, match="broken.json: the JSON breaks near character"):
        read_coco(broken)


def test_a_malformed_annotation_skips_its_image_with_the_annotation_named(scene, tmp_path):
    coco = json.loads(scene.read_text())
    coco["annotations"][3]["bbox"] = [5, 5, "wide", 30]
    scene.write_text(json.dumps(coco))
    result = convert("coco", scene, tmp_path / "out", image_root=tmp_path / "img", progress=False)
    assert result.converted == 1
    assert result.skipped == ["record coco-2: annotation 4: bbox must be [x, y, w, h], got [5, 5, 'wide', 30]"]


def test_grounding_takes_each_object_whose_category_is_alone_in_its_image(scene, tmp_path):
    result = convert("coco", scene, tmp_path / "out", image_root=tmp_path / "img", task="grounding", progress=False)
    assert result.path.name == "coco_grounding.jsonl"
    samples = read_jsonl(result.path).samples
    assert [s.id for s in samples] == ["coco-1-1", "coco-2-4"]  # the people share their category; the crowd
    assert samples[0].boxes == [(10.0, 10.0, 30.0, 30.0)] and samples[0].labels is None
    assert "Where is the dog?" in json.dumps(samples[0].messages[0]["content"])
    assert result.dropped["objects sharing their category in the image"] == 2
    assert result.dropped["crowd regions (not objects to locate)"] == 1
    with pytest.raises(ValueError, match="task 'segmentation': choose detection or grounding"):
        convert("coco", scene, tmp_path / "x", task="segmentation")
    with pytest.raises(ValueError, match="format coco: unknown option 'split'; it takes: task"):
        convert("coco", scene, tmp_path / "x", split="val")


def test_lvis_keeps_the_frequency_groups_asked_for(tmp_path):
    _images(tmp_path / "train2017", ["000000000001.jpg", "000000000002.jpg"])
    lvis = {"images": [{"id": i, "coco_url": f"http://images.cocodataset.org/train2017/00000000000{i}.jpg",
                        "width": 100, "height": 80, "neg_category_ids": [], "not_exhaustive_category_ids": []}
                       for i in (1, 2)],
            "categories": [{"id": 1, "name": "aglet", "frequency": "r"}, {"id": 2, "name": "apple", "frequency": "f"},
                           {"id": 3, "name": "banjo", "frequency": "c"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 1, 10, 10]},
                            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [20, 1, 10, 10]},
                            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [40, 1, 10, 10]}]}
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(lvis))
    rare = convert("lvis", path, tmp_path / "out", image_root=tmp_path, frequency="rare", progress=False)
    assert rare.path.name == "lvis_rare.jsonl"
    (sample,) = read_jsonl(rare.path).samples
    assert sample.id == "coco-1" and sample.labels == ["aglet"] and sample.images[0].endswith("000000000001.jpg")
    assert rare.skipped == ["record coco-2: no box to find (no annotations, or only crowd regions and boxes without "
                            "area)"]
    assert rare.dropped["boxes of other frequency groups"] == 1  # the apple beside the aglet
    both = read_jsonl(convert("lvis", path, tmp_path / "out", image_root=tmp_path, frequency="common,frequent",
                              progress=False).path).samples
    assert [s.labels for s in both] == [["apple"], ["apple", "banjo"]]
    with pytest.raises(ValueError, match="frequency 'often': give some of rare, common, frequent"):
        convert("lvis", path, tmp_path / "out", frequency="often")


@pytest.fixture
def refs(tmp_path):
    """A RefCOCO layout: refs(unc).p (a pickle, as released) beside instances.json."""
    _images(tmp_path / "train2014", ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg"])
    instances = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 100, "height": 80},
                            {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "width": 100, "height": 80},
                            {"id": 30, "file_name": "COCO_train2014_000000000030.jpg", "width": 100, "height": 80}],
                 "annotations": [{"id": 100, "image_id": 9, "category_id": 1, "bbox": [10, 20, 30, 40]},
                                 {"id": 101, "image_id": 9, "category_id": 1, "bbox": [50, 20, 30, 40]},
                                 {"id": 102, "image_id": 25, "category_id": 1, "bbox": [0, 0, 50, 50]},
                                 {"id": 103, "image_id": 30, "category_id": 1, "bbox": [0, 0, 50, 50]}],
                 "categories": [{"id": 1, "name": "person"}]}
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps(instances))
    refs = [{"ref_id": 0, "ann_id": 100, "image_id": 9, "split": "val", "category_id": 1,
             "file_name": "COCO_train2014_000000000009_100.jpg",
             "sentences": [{"sent_id": 0, "sent": "man on the left", "raw": "Man on the left."},
                           {"sent_id": 1, "sent": "left guy", "raw": "left guy"}]},
            {"ref_id": 1, "ann_id": 101, "image_id": 9, "split": "testA", "category_id": 1,
             "sentences": [{"sent_id": 2, "sent": "right man"}]},
            {"ref_id": 2, "ann_id": 999, "image_id": 9, "split": "val", "category_id": 1,
             "sentences": [{"sent_id": 3, "sent": "nobody"}]},
            {"ref_id": 3, "ann_id": 102, "image_id": 25, "split": "val", "category_id": 1, "sentences": []},
            {"ref_id": 4, "ann_id": 103, "image_id": 30, "split": "val", "category_id": 1,
             "sentences": [{"sent_id": 5, "sent": "the one whose picture is gone"}]}]
    path = tmp_path / "refcoco" / "refs(unc).p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    return path


def test_refcoco_sentences_become_grounding_samples_of_one_split(refs, tmp_path):
    result = convert("refcoco", refs, tmp_path / "out", image_root=tmp_path / "train2014", split="val",
                     progress=False)
    assert result.path.name == "refcoco_val.jsonl"
    samples = read_jsonl(result.path).samples
    assert [s.id for s in samples] == ["ref-0-0", "ref-0-1"]
    assert samples[0].boxes == [(10.0, 20.0, 40.0, 60.0)]
    assert '\\"man on the left\\"' in json.dumps(samples[0].messages[0]["content"])
    assert result.skipped[:2] == ["record ref-2: ann_id 999 is not among the instances' annotations",
                                  "record ref-3: no sentence"]
    assert result.skipped[2].startswith("record ref-4: image not found: ") and len(result.skipped) == 3
    with pytest.raises(ValueError, match=r"choose the split to convert with --split .*testA \(1 refs\), val \(4"):
        convert("refcoco", refs, tmp_path / "out", image_root=tmp_path / "train2014")


def _python2_pickle(value) -> bytes:
    """``value`` (lists, dicts, short strings, ints) pickled as Python 2 writes it: protocol 2,
    strings as UTF-8 byte strings (SHORT_BINSTRING), as the released refs files are."""
    def encode(item):
        if isinstance(item, str):
            return b"U" + bytes([len(item.encode())]) + item.encode()
        if isinstance(item, int):
            return b"J" + item.to_bytes(4, "little", signed=True)
        if isinstance(item, list):
            return b"]" + (b"(" + b"".join(map(encode, item)) + b"e" if item else b"")
        return b"}" + (b"(" + b"".join(encode(k) + encode(v) for k, v in item.items()) + b"u" if item else b"")
    return b"\x80\x02" + encode(value) + b"."


def test_a_python2_refs_pickle_reads_as_text(refs, tmp_path):
    py2 = refs.with_name("refs(google).p")
    py2.write_bytes(_python2_pickle([{"ref_id": 7, "ann_id": 100, "image_id": 9, "split": "train",
                                      "sentences": [{"sent_id": 70, "sent": "man by the café"}]}]))
    result = convert("refcoco", py2, tmp_path / "out", image_root=tmp_path / "train2014", split="train",
                     progress=False)
    (sample,) = read_jsonl(result.path).samples
    assert sample.id == "ref-7-70" and '"man by the café"' in sample.messages[0]["content"][-1]["text"]


def test_a_refs_pickle_that_asks_for_code_is_refused(refs, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    evil = refs.with_name("refs(evil).p")
    evil.write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(ValueError, match="not a refs pickle .*asks to build builtins.print"):
        convert("refcoco", evil, tmp_path / "out", split="val")


def test_refcoco_refs_as_json_and_through_the_cli(refs, tmp_path, capsys):
    as_json = refs.with_name("refs.json")
    as_json.write_text(json.dumps(pickle.loads(refs.read_bytes())))
    code = main(["data", "convert", "refcoco", str(as_json), "--out", str(tmp_path / "cli"), "--split", "testA",
                 "--image-root", str(tmp_path / "train2014")])
    assert code == 0 and "converted 1 sample(s)" in capsys.readouterr().out
    assert main(["data", "convert", "coco", str(as_json), "--out", str(tmp_path / "x"), "--split", "val"]) == 2
    assert "--split does not apply to format coco" in capsys.readouterr().err


def _shapes_coco(folder, ids):
    """COCO annotations of 112 px pictures (image ``ids``), each with a red and (every other) a
    blue square; category ids 5 and 9."""
    folder.mkdir()
    images, annotations = [], []
    for i in ids:
        picture = Image.new("RGB", (112, 112), (255, 255, 255))
        draw = ImageDraw.Draw(picture)
        squares = [(5, (4 + 5 * (i % 7), 6 + 3 * (i % 5), 36, 36), (220, 30, 30))]
        if i % 2:
            squares.append((9, (60 + 2 * (i % 3), 50 + 6 * (i % 4), 40, 30), (30, 30, 220)))
        for category, (x, y, w, h), colour in squares:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        picture.save(folder / f"{i:03d}.png")
        images.append({"id": i, "file_name": f"{i:03d}.png", "width": 112, "height": 112})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 5, "name": "red square"}, {"id": 9, "name": "blue square"}]}))
    return path


def test_coco_round_trip_convert_train_evaluate_matches_cocoeval(tmp_path):
    """The config names COCO files; the run converts them, trains, and evaluates on held-out images."""
    import yaml
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from vlreason.rewards.parsing import parse_completion

    source = _shapes_coco(tmp_path / "val", range(9, 15))
    config = {"output_dir": str(tmp_path / "run"), "seed": 0, "model": {"name_or_path": "tiny-qwen2.5-vl"},
              "data": {"train": f"coco:{_shapes_coco(tmp_path / 'train', range(1, 9))}",
                       "eval": {"format": "coco", "path": str(source), "options": {"task": "detection"}}},
              "logging": {"tensorboard": False, "progress": False}, "rollout": {"max_new_tokens": 80},
              "stages": [{"kind": "sft", "optim": {"learning_rate": 2e-3, "batch_size": 4, "max_steps": 60},
                          "save": {"every": 0}}]}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "sft.yaml")]) == 0
    converted = sorted((tmp_path / "run" / "data").glob("*/source.json"))
    assert sorted(json.loads(p.read_text())["converted"] for p in converted) == [6, 8]  # eval and train images
    report = json.loads((tmp_path / "run" / "sft" / "eval.json").read_text())
    names = {"red square": 5, "blue square": 9}
    detections = []
    for prediction in report["predictions"]:  # 112 px images are not resized: the model's pixels are the image's
        image_id = int(prediction["id"].removeprefix("coco-"))
        for box in parse_completion(prediction["completion"], size=(112, 112)).boxes:
            x1, y1, x2, y2 = box.box
            if box.label in names:  # a label that names no category cannot be submitted to COCOeval
                detections.append({"image_id": image_id, "category_id": names[box.label],
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0})
    assert len(detections) >= 6  # training taught the model to answer with boxes
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(source))
        reference = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    ours = report["metrics"]
    assert [ours["map"], ours["map50"], ours["map75"]] == pytest.approx(list(reference.stats[:3]), abs=1e-6)
    assert 0 < ours["map"] < 1 and ours["map50"] > 0.1  # near but not exact boxes on unseen images
