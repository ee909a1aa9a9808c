"""Sparse-to-dense frame scaling (Video-RTS): the vote, agreement by option, rounds and the CLI."""

from __future__ import annotations

import json

import pytest

from vlreason.cli import main
from vlreason.data.schema import Sample
from vlreason.eval.frame_scaling import answer_key, evaluate_frame_scaling, vote
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rollout.agent import AgentLoop
from vlreason.rollout.scripted import ScriptedEngine
from vlreason.vision.video import FrameSampling

pytest.importorskip("av")

LEFT, RIGHT = "<think>.</think><answer>left</answer>", "<think>.</think><answer>right</answer>"


def test_the_vote_keeps_the_first_vote_for_the_most_common_answer():
    assert vote([1, 1, 1]) == (0, True)
    assert vote([0, 1, 1]) == (1, False)
    assert vote([2, 0, 0, 2]) == (0, False)  # a tie: the answer voted first
    assert vote([None, 1, 1]) == (1, False)  # a vote without an answer is no agreement
    assert vote([None, None]) == (0, False)


def test_votes_agree_by_the_option_they_pick():
    sample = Sample("s", [], [], [], [], "data.jsonl:1", choices=["left", "right"])
    keys = {answer_key(f"<answer>{text}</answer>", False, sample) for text in ("left", "A", "(A)", "The answer is A")}
    assert keys == {0}
    assert answer_key("<answer>right", True, sample) is None  # cut off: no answer
    free = Sample("s", [], [], [], [], "data.jsonl:1")
    assert answer_key("<answer> Blue  Circle </answer>", False, free) == answer_key("<answer>blue circle</answer>",
                                                                                     False, free)


def test_a_sample_whose_votes_disagree_is_answered_again_from_more_frames(left_video_data):
    vlm = build_tiny_vlm("tiny-qwen3-vl")
    readers = [vlm.use_video(FrameSampling(fps=10, min_frames=n, max_frames=n)) for n in (2, 4, 8)]
    # round 1 (2 frames): s0 left, left (agreed); s1 left, right (open); round 2 (4 frames): s1 right, right
    engine = ScriptedEngine(vlm, [LEFT, LEFT, LEFT, RIGHT, RIGHT, RIGHT])
    report = evaluate_frame_scaling(vlm, left_video_data, readers, votes=2, loop=AgentLoop(vlm, engine), progress=False)
    metrics = report.metrics
    assert [p["completion"] for p in report.predictions] == [LEFT, RIGHT]
    assert metrics["choice_accuracy"] == 0.5
    assert metrics["mean_rounds"] == 1.5 and metrics["mean_frames"] == 3.0
    assert metrics["decided_at/2"] == 0.5 and metrics["decided_at/4"] == 0.5 and metrics["decided_at/8"] == 0.0


def test_the_last_round_takes_the_majority(left_video_data):
    vlm = build_tiny_vlm("tiny-qwen3-vl")
    readers = [vlm.use_video(FrameSampling(fps=10, min_frames=4, max_frames=4))]
    engine = ScriptedEngine(vlm, [RIGHT, LEFT, LEFT, LEFT, RIGHT, RIGHT])
    report = evaluate_frame_scaling(vlm, left_video_data, readers, votes=3, loop=AgentLoop(vlm, engine), progress=False)
    assert [p["completion"] for p in report.predictions] == [LEFT, RIGHT]
    assert report.metrics["decided_at/4"] == 1.0 and report.metrics["mean_frames"] == 4.0


def test_eval_cli_scales_frames(left_video_data, tmp_path, capsys):
    code = main(["eval", "tiny-qwen3-vl", "--data", str(left_video_data), "--frame-scaling", "2,4", "--votes", "2",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "report")])
    assert code == 0
    metrics = json.loads((tmp_path / "report" / "eval.json").read_text())["metrics"]
    assert metrics["decided_at/2"] + metrics["decided_at/4"] == pytest.approx(1.0)
    assert 2.0 <= metrics["mean_frames"] <= 4.0 and metrics["samples"] == 2
    with pytest.raises(SystemExit):
        main(["eval", "tiny-qwen3-vl", "--data", str(left_video_data), "--frame-scaling", "8,4"])
    assert "frame counts must grow" in capsys.readouterr().err
    data = str(left_video_data)
    assert main(["eval", "tiny-qwen3-vl", "--data", data, "--frame-scaling", "2,4", "--votes", "1"]) == 2
    assert "--votes >= 2" in capsys.readouterr().err
