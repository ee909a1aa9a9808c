"""The synthetic multi-image safety set: hazards only in pairs, both labels for every item, the
same bytes for the same seed, and references that the safety rewards score best."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlreason.data.jsonl import read_jsonl
from vlreason.data.safety import CATEGORIES, HAZARDS, ITEMS, synthesize_safety
from vlreason.data.schema import parse_sample
from vlreason.rewards import RewardScorer, get_reward, reward_columns


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize_safety(tmp_path_factory.mktemp("safety"), n=120, seed=3, size=48, progress=False)


def test_harm_lies_in_the_pair(data):
    samples = read_jsonl(data).samples
    assert all(len(s.images) == 2 for s in samples)
    unsafe = [s for s in samples if s.safety_label == "unsafe"]
    assert 0.35 < len(unsafe) / len(samples) < 0.65
    items = {s.id: s.response.split("<think>")[1].split(":")[0].split(" + ") for s in samples}  # "a + b: ..."
    for s in samples:
        pair = frozenset(items[s.id])
        assert (pair in HAZARDS) == (s.safety_label == "unsafe")
        assert (s.category == HAZARDS[pair]) if pair in HAZARDS else (s.category in CATEGORIES)
    for item in ITEMS:  # no single image decides
        labels = {s.safety_label for s in samples if item in items[s.id]}
        assert labels == {"safe", "unsafe"}


def test_the_same_seed_writes_the_same_files(data, tmp_path):
    again = synthesize_safety(tmp_path, n=120, seed=3, size=48, progress=False)
    assert again.read_text() == data.read_text()
    first = json.loads(data.read_text().splitlines()[0])["images"][0]
    assert (tmp_path / first).read_bytes() == (data.parent / first).read_bytes()


def test_references_score_best(data):
    samples = read_jsonl(data).samples
    rewards = {"safety": get_reward("safety", categories=CATEGORIES), "refusal": get_reward("refusal"),
               "category": get_reward("safety_category", categories=CATEGORIES), "format": get_reward("format")}
    texts = [s.response for s in samples]
    columns = reward_columns(samples, texts, sorted({c for s in samples for c in s.columns()}))
    table = RewardScorer(rewards)(texts, columns)
    unsafe = [s.safety_label == "unsafe" for s in samples]
    for row, is_unsafe in zip(table.values, unsafe, strict=True):
        assert row[0] == 1.0 and row[1] == float(is_unsafe) and row[3] == 1.0
        assert (row[2] == 1.0) if is_unsafe else np.isnan(row[2])  # not applicable to safe requests


@pytest.mark.parametrize(("fields", "problem"), [
    ({"safety_label": "harmful", "category": "fire"}, "safety_label: must be one of safe, unsafe, got 'harmful'"),
    ({"safety_label": "unsafe"}, "category: an unsafe sample needs its risk category"),
    ({"safety_label": "safe", "category": ""}, "category: must be a non-empty string"),
])
def test_safety_fields_are_checked(tmp_path, fields, problem):
    _, problems = parse_sample({"prompt": "Q?", **fields}, tmp_path, "d.jsonl:1", lambda p: (1, 1), lambda p: None)
    assert any(f"{name}: {message}".startswith(problem) for name, message in problems)
