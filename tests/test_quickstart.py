"""The quickstart on a plan small enough for a test: every stage runs, the report is complete, and
the same seed gives the same report (budgets are steps, not seconds)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vlreason.quickstart import QuickstartPlan, clear_previous_run, format_report, loosen, run_quickstart

TINY_PLAN = QuickstartPlan(
    train_samples=12, eval_samples=4, sft_steps=4, sft_batch_size=4, grpo_steps=3, grpo_batch_size=2,
    num_generations=2, max_new_tokens=8, sft_more_steps=2,
)
TIMINGS = ("seconds", "training_seconds")


def test_loosen_grows_every_side_by_the_margin_and_rewrites_the_response():
    record = {"prompt": "Where is the red circle?", "boxes": [[40, 20, 60, 60]],
              "response": "<think>left</think><answer>[40, 20, 60, 60]</answer>"}
    loose = loosen(record, margin=0.25, image_size=112)
    assert loose["boxes"] == [[35, 10, 65, 70]]
    assert loose["response"] == "<think>left</think><answer>[35, 10, 65, 70]</answer>"
    assert record["boxes"] == [[40, 20, 60, 60]]  # the input is left as it was


def test_loosen_clamps_to_the_image():
    record = {"boxes": [[0, 90, 20, 112]], "response": "<answer>[0, 90, 20, 112]</answer>"}
    assert loosen(record, margin=0.5, image_size=112)["boxes"] == [[0, 79, 30, 112]]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return out, run_quickstart(out, seed=0, plan=TINY_PLAN)


def test_quickstart_writes_the_report_and_the_reward_curve(quickstart_run):
    out, report = quickstart_run
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "reward_curve.png").stat().st_size > 0
    for name in ("base", "sft", "sft_more", "grpo"):
        assert 0.0 <= report[name]["mean_iou"] <= 1.0
        assert 0.0 <= report[name]["format_rate"] <= 1.0
    assert report["seconds"] > 0
    assert report["steps"] == {"sft": 4, "grpo": 3, "sft_more": 2}


def test_quickstart_trains_sft_on_loose_boxes_and_grpo_on_exact_ones(quickstart_run):
    out, _ = quickstart_run
    exact = [json.loads(line) for line in (out / "data" / "train" / "grounding.jsonl").open()]
    loose = [json.loads(line) for line in (out / "data" / "train" / "sft_loose.jsonl").open()]
    assert len(exact) == len(loose) == TINY_PLAN.train_samples
    for e, s in zip(exact, loose, strict=True):
        (ex1, ey1, ex2, ey2), (lx1, ly1, lx2, ly2) = e["boxes"][0], s["boxes"][0]
        assert lx1 <= ex1 and ly1 <= ey1 and lx2 >= ex2 and ly2 >= ey2
        assert (lx2 - lx1) * (ly2 - ly1) > (ex2 - ex1) * (ey2 - ey1)


def test_the_same_seed_gives_the_same_report_and_weights(quickstart_run, tmp_path):
    out, report = quickstart_run
    again = run_quickstart(tmp_path, seed=0, plan=TINY_PLAN)
    assert {k: v for k, v in again.items() if k not in TIMINGS} == {k: v for k, v in report.items() if k not in TIMINGS}
    first = load_file(out / "runs" / "grpo" / "final" / "model.safetensors")
    second = load_file(tmp_path / "runs" / "grpo" / "final" / "model.safetensors")
    base = load_file(out / "runs" / "base" / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], base[k]) for k in first)  # it trained: equal is not trivially equal


def test_format_report_has_a_row_per_model(quickstart_run):
    _, report = quickstart_run
    table = format_report(report)
    for name in ("base", "sft", "sft_more", "grpo"):
        assert f"| {name} |" in table
    assert "mean_iou" in table


def test_a_folder_with_other_files_is_never_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        clear_previous_run(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_earlier_quickstart_output_is_replaced(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "report.json").write_text("{}")
    clear_previous_run(tmp_path)
    assert not tmp_path.exists()
