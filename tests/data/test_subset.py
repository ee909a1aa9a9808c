"""``vlreason data subset``: k shots per class with a seed, over labels, box labels and categories,
media paths that still resolve, the same subset for the same seed, and short classes reported."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vlreason.cli import main
from vlreason.data.jsonl import read_jsonl
from vlreason.data.subset import classes_of, few_shot
from vlreason.data.synth import synthesize


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    return synthesize("classification", tmp_path_factory.mktemp("cls"), n=120, seed=2, image_size=48, progress=False)


def test_k_shots_per_class_from_the_seed(classification, tmp_path):
    subset = few_shot(classification, tmp_path / "sub" / "four.jsonl", shots=4, seed=1)
    samples = read_jsonl(subset.path).samples  # the media still resolve from the new folder
    counts = Counter(s.label for s in samples)
    source = Counter(s.label for s in read_jsonl(classification).samples)
    assert counts == {label: min(4, n) for label, n in source.items()}
    assert subset.short == {label: n for label, n in source.items() if n < 4}
    again = few_shot(classification, tmp_path / "again.jsonl", shots=4, seed=1)
    other = few_shot(classification, tmp_path / "other.jsonl", shots=4, seed=2)
    ids = lambda path: [json.loads(line)["id"] for line in path.read_text().splitlines()]  # noqa: E731
    assert ids(again.path) == ids(subset.path) and ids(other.path) != ids(subset.path)
    order = [json.loads(line)["id"] for line in classification.read_text().splitlines()]
    assert ids(subset.path) == sorted(ids(subset.path), key=order.index)  # in the source's order


def test_detection_counts_each_box_label(tmp_path):
    data = synthesize("detection", tmp_path / "det", n=40, seed=0, image_size=64, progress=False)
    subset = few_shot(data, tmp_path / "det_2.jsonl", shots=2, seed=0)
    source = Counter(name for s in read_jsonl(data).samples for name in classes_of(s))
    kept = Counter(name for s in read_jsonl(subset.path).samples for name in classes_of(s))
    assert kept == subset.per_class and set(kept) == set(source)
    assert all(kept[name] >= min(2, source[name]) for name in source)  # every class has its shots
    assert subset.kept < 40


def test_the_cli_reports_and_refuses(classification, tmp_path, capsys):
    assert main(["data", "subset", str(classification), "--shots", "2", "--out", str(tmp_path / "two.jsonl")]) == 0
    assert "(2 shots per class, seed 0)" in capsys.readouterr().out
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "hi", "answer": "4"}) + "\n")
    assert main(["data", "subset", str(plain), "--shots", "2", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "no sample has a class" in capsys.readouterr().err
