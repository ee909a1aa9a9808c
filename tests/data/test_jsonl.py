"""The JSONL reader and checker: valid files in both forms, and every kind of bad line reported as
``file:line: field: problem``."""

from __future__ import annotations

import base64
import io
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlreason.data import DataError, DataProblem, OnBadSample, check_jsonl, read_jsonl
from vlreason.data.schema import RESERVED_COLUMNS

IMAGE_SIZE = (64, 48)
GOOD_BOX = [1, 2, 30, 40]


# ----------------------------------------------------------------------------- valid files


def test_prompt_form_with_system_and_response(tmp_path, make_png, write_jsonl, monkeypatch):
    make_png("set/imgs/a.png", size=(80, 60))
    path = write_jsonl(
        [{"id": "g-1", "images": ["imgs/a.png"], "system": "Be brief.", "prompt": "Where is it?",
          "response": "<answer>[1, 2, 3, 4]</answer>", "boxes": [[1, 2, 3, 4]], "labels": ["red square"]}],
        name="set/train.jsonl",
    )
    monkeypatch.chdir(tmp_path / "set" / "imgs")  # media paths must not depend on the working directory
    (sample,) = read_jsonl(path).samples
    assert sample.id == "g-1"
    assert sample.images == [str((tmp_path / "set" / "imgs" / "a.png").resolve())]
    assert Path(sample.images[0]).is_absolute()
    assert sample.image_sizes == [(80, 60)]
    assert sample.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]},
        {"role": "assistant", "content": "<answer>[1, 2, 3, 4]</answer>"},
    ]
    assert sample.response == "<answer>[1, 2, 3, 4]</answer>"
    assert sample.prompt_messages == sample.messages[:2]
    assert sample.boxes == [(1.0, 2.0, 3.0, 4.0)]
    assert sample.labels == ["red square"]
    assert sample.source == f"{path}:1"


def test_prompt_form_without_response(make_png, write_jsonl):
    make_png("a.png")
    path = write_jsonl([{"images": "a.png", "prompt": "Count.", "answer": 3}])
    (sample,) = read_jsonl(path).samples
    assert sample.response is None
    assert sample.prompt_messages == sample.messages
    assert sample.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]}]
    assert sample.answer == "3"  # numbers are kept as text
    assert sample.id == f"{path}:1"  # no id: the source names it


def test_messages_form_with_image_parts(make_png, write_jsonl):
    make_png("one.png", size=(10, 20))
    make_png("sub/two.png", size=(30, 40))
    messages = [
        {"role": "system", "content": "You look carefully."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                     {"type": "image"}, {"type": "text", "text": " these."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<think>...</think>"},
                                          {"type": "text", "text": "<answer>B</answer>"}]},
    ]
    path = write_jsonl([{"id": 7, "images": ["one.png", "sub/two.png"], "messages": messages,
                         "choices": ["left", "right"], "answer": "B"}])
    (sample,) = read_jsonl(path).samples
    assert sample.id == "7"
    assert sample.image_sizes == [(10, 20), (30, 40)]
    assert sample.messages == messages
    assert sample.response == "<think>...</think><answer>B</answer>"
    assert sample.prompt_messages == messages[:2]
    assert sample.choices == ["left", "right"] and sample.answer == "B"


def test_columns_include_ground_truth_and_extra_fields(make_png, write_jsonl):
    make_png("a.png")
    path = write_jsonl([
        {"id": "a", "images": ["a.png"], "prompt": "x", "boxes": [GOOD_BOX], "difficulty": "hard",
         "meta": {"source": "synthetic", "tags": [1, 2]}},
        {"id": "b", "prompt": "y", "answer": "4", "count": 4, "label": ["cat", "dog"]},
        "",
    ])
    data = read_jsonl(path)
    first, second = data.samples
    assert first.columns() == {
        "id": "a", "answer": None, "choices": None, "boxes": [(1.0, 2.0, 30.0, 40.0)], "labels": None,
        "label": None, "count": None, "safety_label": None, "category": None, "difficulty": "hard",
        "meta": {"source": "synthetic", "tags": [1, 2]},
    }
    assert second.columns()["label"] == ["cat", "dog"] and second.columns()["count"] == 4
    assert "difficulty" not in second.columns()
    assert data.columns == {"id", "boxes", "difficulty", "meta", "answer", "count", "label"}
    assert data.skipped == []


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"choices": ["cat", "dog", "cow"], "answer": "c"}, "c"),  # a letter, any case
        ({"choices": ["cat", "dog"], "answer": " Dog "}, " Dog "),  # one of the options
        ({"answer": 12}, "12"),
        ({"answer": 2.5}, "2.5"),
        ({"count": 0}, None),
    ],
)
def test_accepted_ground_truth(write_jsonl, record, expected):
    (sample,) = read_jsonl(write_jsonl([{"prompt": "q", **record}])).samples
    assert sample.answer == expected


def test_float_answer_is_kept_as_text_without_losing_digits(write_jsonl):
    """The schema says numbers are accepted and kept as text; 1234567.5 must not become '1.23457e+06'."""
    (sample,) = read_jsonl(write_jsonl([{"prompt": "q", "answer": 1234567.5}])).samples
    assert float(sample.answer) == 1234567.5
    (sample,) = read_jsonl(write_jsonl([{"prompt": "q", "answer": 3.14159265}])).samples
    assert float(sample.answer) == 3.14159265


def test_data_uri_image_and_empty_boxes(make_png, write_jsonl):
    uri = "data:image/png;base64," + base64.b64encode(make_png("a.png", size=(12, 9)).read_bytes()).decode()
    (sample,) = read_jsonl(write_jsonl([{"images": [uri], "prompt": "q", "boxes": [], "labels": []}])).samples
    assert sample.images == [uri]
    assert sample.image_sizes == [(12, 9)]
    assert sample.boxes == [] and sample.labels == []


def test_blank_lines_are_ignored_but_counted(write_jsonl):
    path = write_jsonl(["", "   \t", {"prompt": "a"}, "", {"prompt": "b", "count": -2}, "\r"])
    data = read_jsonl(path, on_bad_sample="skip")
    assert [s.source for s in data.samples] == [f"{path}:3"]
    assert [(p.line, p.field) for p in data.skipped] == [(5, "count")]


@pytest.mark.parametrize("lines", [[], ["", "  ", "\r"]], ids=["empty", "blank lines"])
def test_file_without_samples_is_an_error_naming_it(write_jsonl, lines):
    path = write_jsonl(lines)
    for policy in ("error", "skip"):
        with pytest.raises(ValueError) as info:
            read_jsonl(path, on_bad_sample=policy)
        assert str(info.value).startswith(f"{path}: no samples: the file is empty or holds only blank lines")
    assert check_jsonl(path) == (0, [])


def test_file_whose_every_line_is_skipped_is_an_error_naming_it(write_jsonl):
    path = write_jsonl([{"prompt": "a", "count": -1}, "", "{broken"])
    with pytest.raises(ValueError) as info:
        read_jsonl(path, on_bad_sample="skip")
    assert not isinstance(info.value, DataError)
    assert str(info.value).startswith(f"{path}: no valid samples: all 2 non-blank line(s) have problems")
    assert f"vlreason data check {path}" in str(info.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        check_jsonl(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- a file of bad lines


def image_record(**fields) -> dict:
    return {"images": ["img.png"], "prompt": "Where?", **fields}


# (line content, expected field, a fragment of the message); None field: a valid or blank line.
BAD_FILE = [
    (image_record(id="good-1", boxes=[GOOD_BOX], labels=["red square"]), None, None),
    ('{"prompt": "x",', "line", "malformed JSON"),
    ("[1, 2, 3]", "line", "expected a JSON object, got list"),
    (b'{"prompt": "caf\xe9"}', "line", "not valid UTF-8"),
    ("", None, None),
    ({"images": ["missing.png"], "prompt": "x"}, "images[0]", "not found"),
    ({"images": ["notes.png"], "prompt": "x"}, "images[0]", "not an image format"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "messages", "not both"),
    ({"id": "neither", "answer": "4"}, "messages", "not neither"),
    ({"images": ["img.png"], "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "messages", "0 image parts but 1 entries in 'images'"),
    (image_record(boxes=[[30, 2, 10, 40]]), "boxes[0]", "x2 (10) <= x1 (30)"),
    (image_record(boxes=[GOOD_BOX, [1, 2, 70, 40]]), "boxes[1]", "lies outside the 64x48 image"),
    (image_record(boxes=[[math.nan, 2, 30, 40]]), "boxes[0]", "NaN or infinite"),
    (image_record(boxes=GOOD_BOX), "boxes", "must be a list of boxes, e.g. [[10, 20, 50, 60]]"),
    (image_record(boxes=[GOOD_BOX], labels=["a", "b"]), "labels", "2 labels for 1 boxes"),
    ({"prompt": "x", "boxes": [GOOD_BOX]}, "boxes", "the sample has no images"),
    ({"prompt": "x", "count": -1}, "count", "non-negative integer, got -1"),
    ({"prompt": "x", "count": 2.5}, "count", "non-negative integer, got 2.5"),
    ({"prompt": "x", "count": True}, "count", "non-negative integer, got True"),
    ({"prompt": "x", "label": ""}, "label", "non-empty string"),
    ({"prompt": "x", "choices": ["cat", "dog"], "answer": "E"}, "answer", "neither a letter A-B nor one of the"),
    ({"prompt": "x", "pred_boxes": [GOOD_BOX]}, "pred_boxes", "reserved"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "messages[0]", "'role' in"),
    ("   \t", None, None),
    ({"id": "good-2", "images": ["img.png"], "count": 2,
      "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]},
     None, None),
]
EXPECTED = [(number, field, fragment) for number, (_, field, fragment) in enumerate(BAD_FILE, 1) if field]


@pytest.fixture
def bad_file(tmp_path, make_png, write_jsonl) -> Path:
    make_png("img.png", size=IMAGE_SIZE)
    (tmp_path / "notes.png").write_text("not an image\n")
    return write_jsonl([line for line, _, _ in BAD_FILE], name="bad.jsonl")


def assert_problems_match(problems: list[DataProblem], path: Path) -> None:
    assert [(p.line, p.field) for p in problems] == [(line, field) for line, field, _ in EXPECTED]
    for problem, (line, field, fragment) in zip(problems, EXPECTED, strict=True):
        assert fragment in problem.message, (line, field, problem.message)
        assert problem.path == str(path)
        assert str(problem) == f"{path}:{line}: {field}: {problem.message}"


def test_check_jsonl_reports_every_problem_with_line_and_field(bad_file):
    valid, problems = check_jsonl(bad_file)
    assert valid == 2
    assert_problems_match(problems, bad_file)


def test_read_jsonl_raises_data_error_listing_problems(bad_file):
    with pytest.raises(DataError) as info:
        read_jsonl(bad_file)
    error = info.value
    assert_problems_match(error.problems, bad_file)
    message = str(error)
    assert message.startswith(f"{len(EXPECTED)} problem(s) in the data")
    assert "vlreason data check" in message and "set data.on_bad_sample=skip" in message  # the config key
    for problem in error.problems[:20]:
        assert f"  {problem}" in message
    assert f"... and {len(EXPECTED) - 20} more" in message
    assert isinstance(error, ValueError)


def test_skip_keeps_good_lines_and_logs_the_problems(bad_file, caplog):
    with caplog.at_level(logging.WARNING, logger="vlreason.data.jsonl"):
        data = read_jsonl(bad_file, on_bad_sample=OnBadSample.SKIP)
    assert [s.id for s in data.samples] == ["good-1", "good-2"]
    assert data.samples[1].count == 2
    assert_problems_match(data.skipped, bad_file)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"skipped: {data.skipped[0]}" in warnings
    summary = f"{bad_file}: skipped {len(EXPECTED)} bad line(s) ({len(EXPECTED)} problems), kept 2 samples"
    assert summary in warnings


def test_skip_as_a_string(bad_file):
    assert len(read_jsonl(bad_file, on_bad_sample="skip").samples) == 2


def test_one_line_with_several_problems_reports_each(tmp_path, make_png, write_jsonl):
    make_png("img.png", size=IMAGE_SIZE)
    path = write_jsonl([image_record(boxes=[[0, 0, 10, 10], [5, 5, 1, 1], [0, 0, 99, 10]], count=-3,
                                     completions=["x"])])
    _, problems = check_jsonl(path)
    assert sorted((p.line, p.field) for p in problems) == [
        (1, "boxes[1]"), (1, "boxes[2]"), (1, "completions"), (1, "count")]


def test_labels_are_counted_against_the_boxes_given(make_png, write_jsonl):
    """Two boxes and two labels: only the invalid second box is a problem, not the label count."""
    make_png("img.png", size=IMAGE_SIZE)
    path = write_jsonl([image_record(boxes=[GOOD_BOX, [30, 2, 10, 40]], labels=["a", "b"])])
    _, problems = check_jsonl(path)
    assert [(p.field, p.message.split(";")[0]) for p in problems] == [
        ("boxes[1]", "[30, 2, 10, 40] x2 (10) <= x1 (30)")]


def test_null_line_is_reported_not_skipped(write_jsonl):
    """Every non-blank line must hold a JSON object; ``null`` is not a blank line."""
    path = write_jsonl([{"prompt": "a"}, "null", {"prompt": "b"}])
    valid, problems = check_jsonl(path)
    assert valid == 2
    assert [(p.line, p.field) for p in problems] == [(2, "line")]


def test_every_reserved_column_is_refused(write_jsonl):
    path = write_jsonl([{"prompt": "x", name: 1} for name in RESERVED_COLUMNS])
    _, problems = check_jsonl(path)
    assert [(p.line, p.field) for p in problems] == [(i, name) for i, name in enumerate(RESERVED_COLUMNS, 1)]


# ----------------------------------------------------------------------------- header vs full decode


def test_truncated_image_passes_header_check_but_not_full_check(tmp_path, write_jsonl):
    noise = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise, "RGB").save(buffer, "PNG")
    (tmp_path / "half.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    path = write_jsonl([{"images": ["half.png"], "prompt": "x", "boxes": [GOOD_BOX]}])

    (sample,) = read_jsonl(path).samples  # header only: the size is readable
    assert sample.image_sizes == [IMAGE_SIZE]
    valid, problems = check_jsonl(path)
    assert valid == 0
    assert [(p.line, p.field) for p in problems] == [(1, "images[0]")]
    assert "truncated" in problems[0].message and "half.png" in problems[0].message
