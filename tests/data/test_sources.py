"""Data sources in a config (``data.train: coco:PATH`` or ``{format, path, options}``): parsed
and checked with the config, converted once into the run folder, converted again when the source
changes; evaluation metrics chosen in the config and checked before training."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from PIL import Image

from vlreason.cli import main
from vlreason.config import ConfigError, SourceConfig, load_config
from vlreason.data.sources import prepare_source


@pytest.fixture
def instances(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "b.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                       {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20]},
                            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [30, 10, 20, 30]}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def _raw(train, **data):
    return {"output_dir": "run", "model": {"name_or_path": "tiny-qwen2-vl"}, "data": {"train": train, **data},
            "stages": [{"kind": "sft"}]}


def test_sources_are_parsed_made_absolute_and_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (stage,) = load_config(None, raw=_raw("coco:ann/instances.json", eval="held_out.jsonl")).stages
    assert stage.data.train == SourceConfig(format="coco", path=str(tmp_path / "ann" / "instances.json"))
    assert stage.data.eval == str(tmp_path / "held_out.jsonl")
    refs = {"format": "refcoco", "path": "refs(unc).p", "image_root": "train2014",
            "options": {"split": "val", "instances": "instances.json"}}
    (stage,) = load_config(None, raw=_raw(refs)).stages
    assert stage.data.train.options == {"split": "val", "instances": str(tmp_path / "instances.json")}
    assert stage.data.train.image_root == str(tmp_path / "train2014")
    with pytest.raises(ConfigError, match=r"stages\[sft\]\.data\.train\.options\.splt: unknown key; did you mean "
                                          "'split'"):
        load_config(None, raw=_raw({**refs, "options": {"splt": "val"}}))
    with pytest.raises(ConfigError, match=r"data\.train\.format: 'voc' is not a data format; choose one of coco"):
        load_config(None, raw=_raw({"format": "voc", "path": "x.xml"}))
    with pytest.raises(ConfigError, match="data.eval_metrics: there is no data.eval to score"):
        load_config(None, raw=_raw("train.jsonl", eval_metrics=["map"]))


def test_a_source_is_converted_once_and_again_when_it_changes(instances, tmp_path):
    source = {"format": "coco", "path": str(instances), "image_root": None, "options": {}}
    first = prepare_source(source, tmp_path / "cache", progress=False)
    assert len(first.read_text().splitlines()) == 2
    stamp = json.loads(first.with_name("source.json").read_text())
    assert stamp["converted"] == 2 and stamp["format"] == "coco"
    written = first.stat().st_mtime_ns
    assert prepare_source(source, tmp_path / "cache", progress=False) == first
    assert first.stat().st_mtime_ns == written  # not converted again
    first.with_name("source.json").unlink()  # a conversion cut short: no stamp, so it is redone
    assert prepare_source(source, tmp_path / "cache", progress=False) == first
    coco = json.loads(instances.read_text())
    coco["annotations"].pop()
    instances.write_text(json.dumps(coco))
    os.utime(instances, ns=(1, 1))
    changed = prepare_source(source, tmp_path / "cache", progress=False)
    assert changed != first and len(changed.read_text().splitlines()) == 1


def test_eval_metrics_from_the_config_are_checked_first_and_reported(instances, tmp_path, capsys):
    config = {**_raw(f"coco:{instances}", eval=f"coco:{instances}"), "output_dir": str(tmp_path / "run"),
              "logging": {"tensorboard": False, "progress": False}, "rollout": {"max_new_tokens": 8}}
    config["stages"] = [{"kind": "sft", "optim": {"max_steps": 1, "batch_size": 2}, "save": {"every": 0}}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**config, "data": {**config["data"], "eval_metrics": ["count_accuracy"]}}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages[sft].data.eval_metrics:" in err and "count" in err
    assert not (tmp_path / "run" / "sft" / "final").exists()  # refused before training
    chosen = ["map50", {"f1_labels": {"reward": "multi_box_iou", "match_labels": True}}]
    path.write_text(yaml.safe_dump({**config, "data": {**config["data"], "eval_metrics": chosen}}))
    assert main(["train", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "sft" / "eval.json").read_text())["metrics"]
    assert {"map50", "f1_labels"} <= set(metrics) and "map" not in metrics and "format_rate" not in metrics
