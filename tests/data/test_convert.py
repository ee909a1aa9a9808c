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
        f"record bad-image: image not found: {source.parent / 'imgs/missing.png'} (set --image-root, or a config "
        "source's image_root, to the folder the paths start from)",
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
    assert "converted 2 sample(s)" in capsys.readouterr().out
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(records[0]) + "\n{oops\n")
    assert main(["data", "convert", "mis", str(broken), "--out", str(tmp_path / "b")]) == 2
    assert f"{broken}:2: not JSON" in capsys.readouterr().err
    nothing = tmp_path / "nothing.json"
    nothing.write_text(json.dumps([{"id": "x"}]))
    assert main(["data", "convert", "mis", str(nothing), "--out", str(tmp_path / "n")]) == 2
    assert "no record converted" in (err := capsys.readouterr().err) and "record x: no question" in err


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
    from vlreason.data.records import read_records

    whole = json.loads(llava.read_text())
    assert list(read_records(llava, chunk_chars=5)) == whole
    broken = llava.with_name("broken.json")
    broken.write_text(llava.read_text()[:200])
    with pytest.raises(ValueError, match="broken.json: the JSON breaks near character"):
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


def test_a_conversion_that_breaks_leaves_no_file(llava, tmp_path):
    broken = llava.with_name("cut.json")
    broken.write_text(llava.read_text()[:-40])
    with pytest.raises(ValueError, match="the JSON breaks"):
        convert("llava", broken, tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []
