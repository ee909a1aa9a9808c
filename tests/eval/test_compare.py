"""Several models side by side (``vlreason.eval.compare``), from hand-made reports: no model runs."""

from __future__ import annotations

import json

import pytest

from vlreason.eval.compare import best_columns, compare_models, short_name
from vlreason.eval.evaluate import EvalReport

REPORTS = {
    "runs/grounding/sft/final": {"format_rate": 0.5, "mean_iou": 0.25, "truncated_rate": 0.5, "samples": 4},
    "runs/grounding/grpo/final": {"format_rate": 1.0, "mean_iou": 0.5, "truncated_rate": 0.0, "samples": 4},
}


def test_compare_writes_each_report_and_the_table_with_the_best_in_bold(tmp_path) -> None:
    evaluated = []

    def evaluate_model(model: str) -> EvalReport:
        evaluated.append(model)
        return EvalReport(data="eval.jsonl", metrics=dict(REPORTS[model]),
                          predictions=[{"id": "s0", "completion": "<answer>x</answer>"}])

    comparison, json_path, md_path = compare_models(list(REPORTS), evaluate_model, tmp_path)
    assert evaluated == list(REPORTS)  # one after another, in the order given
    assert comparison.names == ["1-sft_final", "2-grpo_final"]
    for name in comparison.names:
        assert (tmp_path / name / "eval.json").is_file() and (tmp_path / name / "eval.md").is_file()
    written = json.loads(json_path.read_text())
    assert written["data"] == "eval.jsonl"
    assert [(m["name"], m["model"], m["metrics"]) for m in written["models"]] == [
        ("1-sft_final", "runs/grounding/sft/final", REPORTS["runs/grounding/sft/final"]),
        ("2-grpo_final", "runs/grounding/grpo/final", REPORTS["runs/grounding/grpo/final"])]
    markdown = md_path.read_text()
    assert "| metric | 1-sft_final | 2-grpo_final |" in markdown
    assert "| mean_iou | 0.2500 | **0.5000** |" in markdown
    assert "| truncated_rate | 0.5000 | **0.0000** |" in markdown  # lower is better
    assert "| samples | 4 | 4 |" in markdown
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG" and "](compare.png)" in markdown


@pytest.mark.parametrize("metric, values, best", [
    ("accuracy/flashes", [0.5, 0.75, 0.75], {1, 2}),  # ties all count
    ("over_refusal_rate/fire", [0.5, 0.25, None], {1}),  # lower is better; a model without it is left out
    ("format_rate", [0.5, 0.5], set()),  # no difference, no bold
    ("turns_per_sample", [1.0, 2.0], set()),  # describes, does not rank
])
def test_best_columns(metric, values, best) -> None:
    assert best_columns(metric, values) == best


@pytest.mark.parametrize("model, name", [("runs/grounding/grpo/final", "grpo_final"),
                                         ("Qwen/Qwen2-VL-2B-Instruct", "Qwen_Qwen2-VL-2B-Instruct"),
                                         ("tiny-qwen3-vl", "tiny-qwen3-vl"), ("/tmp/my model/", "tmp_my_model")])
def test_short_name_is_folder_safe(model, name) -> None:
    assert short_name(model) == name
