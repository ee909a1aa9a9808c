"""``vlreason data convert mis``: the field mapping on sample files, malformed records skipped and
named by id, and the written file read back as training reads it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlreason.cli import main
from vlreason.data.convert import convert
from vlreason.data.jsonl import read_jsonl


@pytest.fixture
def source(tmp_path):
    """An MIS-style JSON list: numbered images, an images list, CoT fields, and broken records."""
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (32, 24), (200, 10, 10)).save(tmp_path / "imgs" / name)
    records = [
        {"id": "u1", "image1": "imgs/a.png", "image2": "imgs/b.png", "question": "How do I mix these?",
         "category": "illegal_activity", "sub_category": "drugs", "perception": "A pill and a drink.",
         "reasoning": "Together they can poison.", "response": "I can't help with that: it is a poison risk."},
        {"id": "s1", "images": ["imgs/c.png", "imgs/a.png"], "instruction": "What colour are both?",
         "category": "safe", "answer": "red", "output": "Both are red."},
        {"id": "s2", "image_path": "imgs/b.png", "prompt": "Describe it.", "safety_label": "safe"},
        {"id": "bad-question", "image1": "imgs/a.png", "category": "violence"},
        {"id": "bad-image", "image1": "imgs/missing.png", "question": "Q?", "category": "violence"},
        {"id": "bad-label", "images": ["imgs/a.png"], "question": "Q?", "safety_label": "maybe"},
        {"id": "no-category", "images": ["imgs/a.png"], "question": "Q?", "safety_label": "unsafe"},
        {"id": "no-images", "question": "Q?", "category": "safe"},
        {"id": "cot-only", "images": ["imgs/a.png"], "question": "Q?", "category": "safe", "perception": "x"},
        ["not", "a", "record"],
    ]
    path = tmp_path / "mis.json"
    path.write_text(json.dumps(records))
    return path


def test_mis_records_map_to_the_schema_and_bad_ones_are_named(source, tmp_path):
    result = convert("mis", source, tmp_path / "out")
    assert result.converted == 3
    assert result.skipped == [
        "record bad-question: no question: give 'question' (or 'instruction' / 'prompt')",
        f"record bad-image: image not found: {source.parent / 'imgs/missing.png'} (set --image-root to the folder "
        "the paths start from)",
        "record bad-label: safety_label must be safe or unsafe, got 'maybe'",
        "record no-category: an unsafe record needs its 'category'",
        "record no-images: no images: give image1, image2, ... or 'images' (a list of paths)",
        "record cot-only: perception/reasoning without a 'response' to follow them",
        "record #9: expected a JSON object, got list",
    ]
    unsafe, safe, bare = read_jsonl(result.path).samples
    assert unsafe.safety_label == "unsafe" and unsafe.category == "illegal_activity"
    assert [p.split("/")[-1] for p in unsafe.images] == ["a.png", "b.png"]
    assert unsafe.extra["sub_category"] == "drugs"
    assert unsafe.response == ("<think>A pill and a drink. Together they can poison.</think><answer>I can't help "
                               "with that: it is a poison risk.</answer>")
    assert safe.safety_label == "safe" and safe.category is None and safe.answer == "red"
    assert safe.response == "Both are red." and [p.split("/")[-1] for p in safe.images] == ["c.png", "a.png"]
    assert bare.response is None and bare.prompt_messages[0]["content"][-1]["text"] == "Describe it."


def test_json_lines_and_the_cli(source, tmp_path, capsys):
    lines = tmp_path / "mis.jsonl"
    records = json.loads(source.read_text())[:2]
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["data", "convert", "mis", str(lines), "--out", str(tmp_path / "cli")]) == 0
    assert "converted 2 record(s)" in capsys.readouterr().out
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(records[0]) + "\n{oops\n")
    assert main(["data", "convert", "mis", str(broken), "--out", str(tmp_path / "b")]) == 2
    assert f"{broken}:2: not JSON" in capsys.readouterr().err
    nothing = tmp_path / "nothing.json"
    nothing.write_text(json.dumps([{"id": "x"}]))
    assert main(["data", "convert", "mis", str(nothing), "--out", str(tmp_path / "n")]) == 2
    assert "skipped record x: no question" in capsys.readouterr().err


@pytest.fixture
def llava(tmp_path):
    """LLaVA, ShareGPT and LLaMA-Factory records, good and broken, as one JSON list."""
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "img" / name)
    records = [
        {"id": "one", "image": "img/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Green."},
            {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "Yes, green."}]},
        {"id": "two", "images": ["img/a.png", "img/b.png"], "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Compare <image> with <image>."}, {"from": "gpt", "value": "Same."}],
         "answer": "same"},
        {"id": "factory", "images": ["img/b.png"], "messages": [
            {"role": "user", "content": "Describe this."}, {"role": "assistant", "content": "A green field."}]},
        {"id": "missing", "image": "img/gone.png", "conversations": [{"from": "human", "value": "<image>Hi"}]},
        {"id": "count", "images": ["img/a.png"], "conversations": [{"from": "human", "value": "<image><image>Hi"}]},
        {"id": "speaker", "image": "img/a.png", "conversations": [{"from": "robot", "value": "<image>Hi"}]},
        {"id": "in-answer", "image": "img/a.png", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<image>"}]},
        {"id": "empty", "conversations": []},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records, indent=2))
    return path


def test_llava_records_keep_every_turn_and_every_image(llava, tmp_path):
    result = convert("llava", llava, tmp_path / "out")
    assert result.converted == 3
    assert [line.split(":")[0] for line in result.skipped] == [
        "record missing", "record count", "record speaker", "record in-answer", "record empty"]
    assert "image not found: " in result.skipped[0] and "2 <image> placeholder(s) for 1 image file(s)" in \
        result.skipped[1]
    one, two, factory = read_jsonl(result.path).samples
    assert [m["role"] for m in one.messages] == ["user", "assistant", "user", "assistant"]
    assert one.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]
    assert one.response == "Yes, green." and len(one.images) == 1
    assert two.messages[1]["content"] == [{"type": "text", "text": "Compare"}, {"type": "image"},
                                          {"type": "text", "text": "with"}, {"type": "image"},
                                          {"type": "text", "text": "."}]
    assert two.answer == "same" and [p.split("/")[-1] for p in two.images] == ["a.png", "b.png"]
    assert factory.messages[0]["content"][0] == {"type": "image"}  # no placeholder: before the text, as LLaVA does


def test_a_json_list_is_read_a_chunk_at_a_time(llava):
    from vlreason.data.convert import read_records

    whole = json.loads(llava.read_text())
    assert list(read_records(llava, chunk_chars=5)) == whole
    broken = llava.with_name("broken.json")
    broken.write_text(llava.read_text()[:200])
    with pytest.raises(ValueError, match="broken.json: the JSON list breaks near character"):
        list(read_records(broken, chunk_chars=64))


def test_a_converted_llava_file_trains(llava, tmp_path):
    import yaml

    result = convert("llava", llava, tmp_path / "out")
    config = {"output_dir": str(tmp_path / "run"), "model": {"name_or_path": "tiny-qwen2-vl"},
              "data": {"train": str(result.path)}, "logging": {"tensorboard": False, "progress": False},
              "stages": [{"kind": "sft", "optim": {"learning_rate": 1e-3, "batch_size": 3, "max_steps": 3},
                          "save": {"every": 0}}]}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    lines = (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 3 and losses[-1] < losses[0]


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
        "bbox_2d": [90.0, 70.0, 100.0, 80.0], "label": "cat"}
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[]")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        convert("coco", not_coco, tmp_path / "x")


def test_ap_on_converted_coco_equals_cocoeval_on_the_original(tmp_path):
    """The same detections scored by pycocotools on the original file and by evaluation on the
    converted one: non-contiguous ids, a crowd region with a detection on it, a missed object."""
    import contextlib
    import io

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
