"""``vlreason data convert hf``: local parquet, arrow folders and JSON written by the tests, image
columns as decoded images, bytes and paths, a column mapping, and rows that cannot convert named.
The ``datasets`` extra is optional: without it these tests skip, and the command says what to
install."""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import pytest
from PIL import Image

from vlreason.cli import main
from vlreason.data.convert import convert
from vlreason.data.jsonl import read_jsonl

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="the datasets extra is not installed")


def _png(colour, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def rows():
    """A VQA-style table: an Image feature, a ClassLabel, a question column named 'query'."""
    return {"query": ["What colour is it?", "Which shape?", ""],
            "image": [_png((255, 0, 0)), _png((0, 0, 255)), _png((0, 255, 0))],
            "label": [0, 1, 0], "level": ["easy", "hard", "easy"], "uid": ["r0", "r1", "r2"]}


def _dataset(rows):
    import datasets

    features = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["red", "blue"]),
                                  "level": datasets.Value("string"), "uid": datasets.Value("string")})
    return datasets.Dataset.from_dict({**rows, "image": [{"bytes": b, "path": None} for b in rows["image"]]},
                                      features=features)


@needs_datasets
def test_a_parquet_file_with_an_image_feature_and_a_mapping(rows, tmp_path):
    _dataset(rows).to_parquet(str(tmp_path / "vqa.parquet"))
    result = convert("hf", tmp_path / "vqa.parquet", tmp_path / "out", progress=False,
                     columns={"prompt": "query", "id": "uid", "difficulty": "level"})
    assert result.path.name == "hf.jsonl"
    assert result.skipped == ["record r2: no question in column 'query'"]
    samples = read_jsonl(result.path).samples
    assert [s.id for s in samples] == ["r0", "r1"]
    assert [s.label for s in samples] == ["red", "blue"]  # ClassLabel ids became names
    assert samples[1].extra == {"difficulty": "hard"}
    image = Image.open(result.path.parent / samples[1].images[0])
    assert image.size == (40, 30) and image.getpixel((0, 0)) == (0, 0, 255)
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2  # nothing written for the skipped row
    with pytest.raises(ValueError, match="holds one split"):
        convert("hf", tmp_path / "vqa.parquet", tmp_path / "x", split="test", columns={"prompt": "query"})


@needs_datasets
def test_a_saved_dataset_folder_and_its_splits(rows, tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": _dataset(rows), "validation": _dataset(rows).select([1])}).save_to_disk(str(saved))
    result = convert("hf", saved, tmp_path / "out", split="validation", progress=False,
                     columns={"prompt": "query"})
    assert result.path.name == "hf_validation.jsonl" and result.converted == 1
    with pytest.raises(ValueError, match="no split 'test'; it has train, validation"):
        convert("hf", saved, tmp_path / "out", split="test", columns={"prompt": "query"})
    _dataset(rows).save_to_disk(str(tmp_path / "one"))  # one split saved alone
    assert convert("hf", tmp_path / "one", tmp_path / "one_out", progress=False, columns={"prompt": "query"}
                   ).converted == 2


@needs_datasets
def test_image_paths_default_columns_and_clear_errors(tmp_path, capsys):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "qa.jsonl").write_text(
        json.dumps({"question": "How many?", "image": "a.png", "answer": 3}) + "\n"
        + json.dumps({"question": "And here?", "image": "gone.png", "answer": 1}) + "\n")
    code = main(["data", "convert", "hf", str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "out")])
    assert code == 0
    captured = capsys.readouterr()
    assert "converted 1 sample(s)" in captured.out and "record row-1: image not found" in captured.err
    (sample,) = read_jsonl(tmp_path / "out" / "hf.jsonl").samples
    assert sample.answer == "3" and sample.images[0].endswith("a.png")
    assert main(["data", "convert", "hf", str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "x"),
                 "--column", "prompt=text"]) == 2
    assert "column 'prompt=text': the dataset has no such column; its columns: question, image, answer" in \
        capsys.readouterr().err
    assert main(["data", "convert", "hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere: not a file or folder here, and as a hub id it does not load" in capsys.readouterr().err


@needs_datasets
def test_an_answer_given_as_the_index_of_a_choice_becomes_its_letter(tmp_path):
    rows = [{"question": "Which is a bird?", "choices": ["cat", "owl", "fish"], "answer": 1},
            {"question": "How many legs?", "choices": ["1", "2", "4"], "answer": 2}]  # 2 is an option: kept
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = read_jsonl(convert("hf", tmp_path / "mc.jsonl", tmp_path / "out", progress=False).path).samples
    assert [s.answer for s in samples] == ["B", "2"]


def test_without_the_datasets_extra_the_error_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "Q?"}) + "\n")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'vlreason\[datasets\]'"):
        convert("hf", tmp_path / "qa.jsonl", tmp_path / "out", progress=False)
