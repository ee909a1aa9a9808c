"""The ``vlreason`` command line, run in-process (and once as the installed console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlreason.cli import main

BUILT_IN_NEEDS = {
    "choice": "answer, choices",
    "classification": "label",
    "detection_map": "boxes",
    "format": "-",
    "iou": "boxes",
    "multi_box_iou": "boxes",
    "numeric": "answer",
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``vlreason ARGV`` in-process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def summary_row(out: str, label: str) -> list[str]:
    """The cells of the summary row named ``label`` (mean, min, max, n/a, failed)."""
    (line,) = [line for line in out.splitlines() if line.split()[:1] == [label]]
    return line.split()[1:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Grounding and counting files written through the CLI."""
    out = tmp_path_factory.mktemp("cli-data")
    for task, n in (("grounding", 30), ("counting", 30)):
        assert main(["data", "synth", task, "--out", str(out), "--n", str(n), "--seed", "3"]) == 0
    return out


def test_synth_then_check(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "synth", "detection", "--out", str(tmp_path), "--n", "12", "--image-size", "96")
    assert code == 0
    path = tmp_path / "detection.jsonl"
    assert f"wrote 12 detection samples to {path}" in out
    assert len(path.read_text().splitlines()) == 12
    code, out, _ = run(capsys, "data", "check", str(path))
    assert code == 0
    assert f"{path}: 12 valid sample(s), 0 problem(s) on 0 line(s)" in out


def test_synth_video_then_check_decodes_the_clips(tmp_path, capsys):
    pytest.importorskip("av")
    code, out, _ = run(capsys, "data", "synth", "video_qa", "--out", str(tmp_path), "--n", "3", "--image-size", "48")
    assert code == 0 and f"wrote 3 video_qa samples to {tmp_path / 'video_qa.jsonl'}" in out
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 3
    code, out, _ = run(capsys, "data", "check", str(tmp_path / "video_qa.jsonl"))
    assert code == 0 and "3 valid sample(s), 0 problem(s)" in out


def test_synth_unknown_task_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "synth", "segmentation", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "invalid choice: 'segmentation'" in capsys.readouterr().err


def test_synth_too_small_image_exits_2(tmp_path, capsys):
    code, _, err = run(capsys, "data", "synth", "grounding", "--out", str(tmp_path), "--n", "2", "--image-size", "20")
    assert code == 2
    assert "error: need n >= 1, image_size >= 48" in err


def test_check_reports_bad_lines_as_file_line_field(tmp_path, data_dir, capsys):
    good = data_dir / "grounding.jsonl"
    bad = tmp_path / "bad.jsonl"
    image = data_dir / "images" / "grounding_3_000000.png"
    bad.write_text("\n".join([
        json.dumps({"images": [str(image)], "prompt": "Where?", "boxes": [[5, 5, 200, 20]]}),
        "{not json",
        json.dumps({"prompt": "How many?", "count": -1}),
        json.dumps({"images": [str(image)], "prompt": "Where?", "boxes": [[1, 2, 3, 4]]}),
    ]) + "\n")
    code, out, _ = run(capsys, "data", "check", str(good), str(bad))
    assert code == 1
    lines = out.splitlines()
    assert f"{good}: 30 valid sample(s), 0 problem(s) on 0 line(s)" in lines
    assert f"{bad}: 1 valid sample(s), 3 problem(s) on 3 line(s)" in lines
    problems = [line for line in lines if line.startswith(f"{bad}:") and "valid sample(s)" not in line]
    assert [line.split(": ")[0:2] for line in problems] == [[f"{bad}:1", "boxes[0]"], [f"{bad}:2", "line"],
                                                           [f"{bad}:3", "count"]]
    assert "lies outside the 112x112 image" in problems[0]
    assert "malformed JSON" in problems[1]


@pytest.mark.parametrize("text", ["", "\n  \n"], ids=["empty", "blank lines"])
def test_check_file_without_samples_exits_1(tmp_path, capsys, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    code, out, _ = run(capsys, "data", "check", str(path))
    assert code == 1
    assert out.splitlines() == [f"{path}: no samples: the file is empty or holds only blank lines; "
                                "write one JSON object (a sample) per line"]


def test_check_reports_llava_fields_and_bad_videos(tmp_path, capsys):
    (tmp_path / "clip.mp4").write_text("not a video")
    path = tmp_path / "llava.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"image": "x.png", "prompt": "What is this?"},
        {"videos": ["clip.mp4"], "prompt": "What happens?"},
    ]) + "\n")
    code, out, _ = run(capsys, "data", "check", str(path))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == (f'{path}:1: image: vlreason reads media from "images": ["x.png"] '
                        "(a list; paths relative to the JSONL file)")
    assert lines[1].startswith(f"{path}:2: videos[0]: {tmp_path / 'clip.mp4'}: not a recognised video container")
    assert lines[2] == f"{path}: 0 valid sample(s), 2 problem(s) on 2 line(s)"


def test_check_missing_file_exits_2(tmp_path, capsys):
    code, _, err = run(capsys, "data", "check", str(tmp_path / "nope.jsonl"))
    assert code == 2
    assert "data file not found" in err and "nope.jsonl" in err


def test_rewards_list_names_builtins_and_needed_columns(capsys):
    code, out, _ = run(capsys, "rewards", "list")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    for name, needs in BUILT_IN_NEEDS.items():
        assert name in rows, f"{name} not listed"
        cells = [cell.strip() for cell in rows[name].split("  ") if cell.strip()]
        assert cells[1] == needs, (name, cells)
    assert "package.module:attr" in out and "file.py:attr" in out


def test_tools_list_names_builtins_and_what_they_do(capsys):
    code, out, _ = run(capsys, "tools", "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["tool", "what", "it", "does"]
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert rows["crop"].split(None, 1)[1] == "Zoom in on a region of the image: returns the region cut from the " \
        "full-resolution image, enlarged."
    assert "package.module:attr" in out and "tools/README.md" in out


def test_rewards_check_scores_reference_answers(data_dir, capsys):
    code, out, _ = run(capsys, "rewards", "check", "iou", "format", "--data", str(data_dir / "grounding.jsonl"),
                       "--show", "5")
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("over 30"))
    assert header.split()[2:] == ["iou", "format"]
    assert summary_row(out, "mean") == ["1.000", "1.000"]
    assert summary_row(out, "min") == ["1.000", "1.000"]
    assert summary_row(out, "n/a") == ["0", "0"]
    assert summary_row(out, "failed") == ["0", "0"]
    assert "... 25 more sample(s)" in out
    assert sum(line.split()[1:2] == ["grounding-3-0"] for line in out.splitlines()) == 1


def test_rewards_check_with_an_option(data_dir, capsys):
    code, out, _ = run(capsys, "rewards", "check", "numeric", "-o", "mode=ramp", "--data",
                       str(data_dir / "counting.jsonl"))
    assert code == 0
    assert summary_row(out, "mean") == ["1.000"]


def test_bad_option_value_exits_2(data_dir, capsys):
    code, _, err = run(capsys, "rewards", "check", "numeric", "-o", "mode=sideways", "--data",
                       str(data_dir / "counting.jsonl"))
    assert code == 2
    assert err.startswith("error:") and "sideways" in err


def test_option_with_two_specs_exits_2(data_dir, capsys):
    code, out, err = run(capsys, "rewards", "check", "iou", "format", "-o", "threshold=0.5", "--data",
                         str(data_dir / "grounding.jsonl"))
    assert code == 2
    assert "error: --option applies to a single SPEC" in err
    assert out == ""


def test_option_without_equals_exits_2(data_dir, capsys):
    code, _, err = run(capsys, "rewards", "check", "numeric", "-o", "ramp", "--data", str(data_dir / "counting.jsonl"))
    assert code == 2
    assert "expected KEY=VALUE" in err


def test_unknown_reward_suggests_close_names(data_dir, capsys):
    code, _, err = run(capsys, "rewards", "check", "iuo", "--data", str(data_dir / "grounding.jsonl"))
    assert code == 2
    assert "unknown reward 'iuo'" in err and "did you mean iou" in err


def test_reward_needing_a_missing_column_exits_2(data_dir, capsys):
    code, _, err = run(capsys, "rewards", "check", "numeric", "--data", str(data_dir / "grounding.jsonl"))
    assert code == 2
    assert "reward 'numeric' needs column(s) answer" in err


PLUGIN = '''
def answer_in_completion(completions, answer, **columns):
    return [1.0 if f"<answer>{a}</answer>" in c else 0.0 for c, a in zip(completions, answer)]


def half(completions, **columns):
    return [0.5 for _ in completions]
'''


def test_reward_plugin_file(tmp_path, data_dir, capsys):
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(PLUGIN)
    counting, grounding = str(data_dir / "counting.jsonl"), str(data_dir / "grounding.jsonl")

    code, out, _ = run(capsys, "rewards", "check", f"{plugin}:answer_in_completion", f"{plugin}:half", "format",
                       "--data", counting)
    assert code == 0
    assert summary_row(out, "mean") == ["1.000", "0.500", "1.000"]

    code, _, err = run(capsys, "rewards", "check", f"{plugin}:answer_in_completion", "--data", grounding)
    assert code == 2
    assert "needs column(s) answer" in err

    code, _, err = run(capsys, "rewards", "check", f"{plugin}:answer_in_completoin", "--data", counting)
    assert code == 2
    assert "did you mean answer_in_completion" in err


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, _ = run(capsys)
    assert code == 2
    assert "usage: vlreason" in out


def test_console_script_entry_point():
    script = Path(sys.executable).parent / "vlreason"
    found = str(script) if script.exists() else shutil.which("vlreason")
    command = [found] if found else [sys.executable, "-m", "vlreason.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: vlreason")
    for words in ("data check", "data synth", "rewards list", "rewards check"):
        assert words in result.stdout


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--max-new-tokens", "-3"), ("--limit", "x")])
def test_eval_rejects_a_bad_number_without_a_traceback(data_dir, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        main(["eval", "tiny-qwen2-vl", "--data", str(data_dir / "grounding.jsonl"), flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err


def test_eval_on_a_training_checkpoint_points_at_the_final_model(tmp_path, data_dir, capsys):
    checkpoint = tmp_path / "sft" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")  # what Trainer leaves: weights, no processor
    code, _, err = run(capsys, "eval", str(checkpoint), "--data", str(data_dir / "grounding.jsonl"))
    assert code == 2
    assert f"{checkpoint} is a training checkpoint" in err and str(tmp_path / "sft" / "final") in err


def test_eval_on_a_model_folder_without_processor_files_says_what_is_missing(tmp_path, data_dir, capsys):
    from vlreason.models.vlm import build_tiny_vlm

    build_tiny_vlm("tiny-qwen2-vl").model.save_pretrained(tmp_path / "weights_only")
    code, _, err = run(capsys, "eval", str(tmp_path / "weights_only"), "--data", str(data_dir / "grounding.jsonl"))
    assert code == 2
    assert "holds model weights but no image processor or tokenizer files" in err


def test_eval_with_tools_reports_the_tool_use(tmp_path, capsys):
    from vlreason.data.zoom import synthesize_zoom

    data, _ = synthesize_zoom(tmp_path / "zoom", n=3, canvas=256, progress=False)
    code, out, _ = run(capsys, "eval", "tiny-qwen3-vl", "--data", str(data), "--tools", "crop", "--max-new-tokens",
                       "8", "--memory-window", "1", "--out", str(tmp_path / "report"))
    assert code == 0
    for metric in ("tool_call_rate", "invalid_call_rate", "turns_per_sample", "accuracy"):
        assert metric in out
    assert "tool_call_rate" in json.loads((tmp_path / "report" / "eval.json").read_text())["metrics"]


def test_eval_with_an_unknown_tool_fails_before_loading_a_model(data_dir, capsys):
    code, _, err = run(capsys, "eval", "no/such-model", "--data", str(data_dir / "grounding.jsonl"), "--tools", "corp")
    assert code == 2
    assert "unknown tool 'corp'; did you mean crop?" in err
    code, _, err = run(capsys, "eval", "no/such-model", "--data", str(data_dir / "grounding.jsonl"),
                       "--memory-window", "2")
    assert code == 2 and "--memory-window holds the images tools return; add --tools" in err


def test_eval_reads_videos_as_the_flags_say(tmp_path, capsys):
    pytest.importorskip("av")
    from vlreason.data.video_qa import synthesize_video_qa

    data = synthesize_video_qa(tmp_path / "video", n=3, size=48, frames=8, fps=4, progress=False)
    code, out, _ = run(capsys, "eval", "tiny-qwen2.5-vl", "--data", str(data), "--out", str(tmp_path / "report"),
                       "--max-new-tokens", "4", "--video-fps", "4", "--video-min-frames", "8",
                       "--video-max-frames", "8")
    assert code == 0 and "choice_accuracy/direction" in out
    code, _, err = run(capsys, "eval", "tiny-qwen2.5-vl", "--data", str(data), "--video-min-frames", "9",
                       "--video-max-frames", "8")
    assert code == 2 and "error: need fps > 0 and 1 <= min_frames <= max_frames" in err


def test_eval_on_safety_data_reports_both_sides_with_the_judge_given(tmp_path, capsys):
    from vlreason.data.safety import synthesize_safety

    data = synthesize_safety(tmp_path / "safety", n=6, size=32, progress=False)
    judge = tmp_path / "judge.py"
    judge.write_text("def always(completions, **columns):\n    return [1.0] * len(completions)\n")
    code, out, _ = run(capsys, "eval", "tiny-qwen3-vl", "--data", str(data), "--max-new-tokens", "4",
                       "--safety-option", f"judge={judge}:always", "--out", str(tmp_path / "report"))
    assert code == 0 and "attack_success_rate" in out
    metrics = json.loads((tmp_path / "report" / "eval.json").read_text())["metrics"]
    assert metrics["attack_success_rate"] == 0.0 and metrics["over_refusal_rate"] == 1.0  # it refuses everything
    assert (tmp_path / "report" / "safety.png").is_file()


def test_eval_compare_writes_each_report_and_the_comparison(tmp_path, data_dir, capsys):
    out = tmp_path / "compare"
    code, stdout, _ = run(capsys, "eval", "--compare", "tiny-qwen2-vl", "tiny-qwen3-vl", "--data",
                          str(data_dir / "counting.jsonl"), "--limit", "2", "--max-new-tokens", "4",
                          "--metric", "accuracy", "--metric", "fmt=format", "--out", str(out))
    assert code == 0
    assert stdout.splitlines()[0].split() == ["metric", "1-tiny-qwen2-vl", "2-tiny-qwen3-vl"]
    written = json.loads((out / "compare.json").read_text())
    assert [m["model"] for m in written["models"]] == ["tiny-qwen2-vl", "tiny-qwen3-vl"]
    for model in written["models"]:
        assert list(model["metrics"]) == ["accuracy", "fmt", "truncated_rate", "samples"]
        assert (out / model["name"] / "eval.md").is_file() and (out / model["name"] / "metrics.png").is_file()
    markdown = (out / "compare.md").read_text()
    assert "| metric | 1-tiny-qwen2-vl | 2-tiny-qwen3-vl |" in markdown
    assert "| samples | 2 | 2 |" in markdown and "](compare.png)" in markdown


@pytest.mark.parametrize("argv, message", [
    (["tiny-qwen2-vl", "--compare", "tiny-qwen2-vl", "tiny-qwen3-vl"], "give either MODEL"),
    ([], "name the model to evaluate"),
    (["--compare", "tiny-qwen2-vl"], "--compare needs two or more models"),
    (["--compare", "no/such-a", "no/such-b", "--frame-scaling", "4,8"], "--frame-scaling does not combine with"),
    (["no/such-model", "--metric", "count_accuracy"], "count_accuracy needs `count`"),
    (["no/such-model", "--metric", "acuracy"], "unknown metric 'acuracy'; did you mean accuracy, count_accuracy"),
    (["no/such-model", "--metric", "near=iou"], "reward 'near' needs column(s) boxes"),
], ids=["model and compare", "no model", "one to compare", "frame scaling", "no ground truth", "unknown metric",
        "reward lacks its column"])
def test_eval_refuses_before_loading_a_model(data_dir, capsys, argv, message):
    code, out, err = run(capsys, "eval", *argv, "--data", str(data_dir / "counting.jsonl"))
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
