"""What a stage checks before it trains: video samples (decoder, engine, settings), overlong
samples, SFT responses, changed data on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlreason.cli import main
from vlreason.config import ConfigError, load_config
from vlreason.data.jsonl import DataError
from vlreason.data.synth import synthesize
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rollout import ScriptedEngine
from vlreason.rollout.engine import ENGINES
from vlreason.training.preflight import fit_length, stage_inputs
from vlreason.vision import video_backends


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthesize("grounding", tmp_path_factory.mktemp("data"), n=6, seed=4, image_size=56, progress=False)


def stage(data: Path, kind: str = "grpo", **data_section):
    entry = {"kind": kind, "rewards": {"iou": {}}} if kind == "grpo" else {"kind": kind}
    raw = {"output_dir": str(data.parent / "runs"), "data": {"train": str(data), **data_section}, "stages": [entry]}
    return load_config(None, raw=raw).stages[0]


def with_lines(data: Path, folder: Path, *records: dict) -> Path:
    """``data``'s lines plus ``records``, written next to its images."""
    path = data.parent / f"{folder.name}.jsonl"
    path.write_text(data.read_text() + "".join(json.dumps(r) + "\n" for r in records))
    return path


def test_video_samples_need_a_decoder_and_the_hf_engine(data, tmp_path, monkeypatch, make_video):
    make_video(data.parent / "clip.mp4")
    path = with_lines(data, tmp_path, {"videos": ["clip.mp4"], "prompt": "What happens?", "answer": "x"})
    assert [s.videos for s in stage_inputs(stage(path)).samples][-1] == [str(data.parent / "clip.mp4")]
    vllm = load_config(None, raw={"output_dir": str(tmp_path / "runs"), "data": {"train": str(path)},
                                  "rollout": {"engine": "vllm"}, "stages": [{"kind": "grpo", "rewards": {"iou": {}}}]})
    with pytest.raises(ConfigError, match=r"stages\[grpo\]\.data\.train: 1 sample\(s\) have videos \(first: .*:7\); "
                                          r"the rollout engine 'vllm' takes images only: set rollout.engine=hf"):
        stage_inputs(vllm.stages[0])
    monkeypatch.setattr(video_backends, "available", lambda: [])
    with pytest.raises(ConfigError, match=r"stages\[grpo\]\.data\.eval: .* a video decoder is not installed "
                                          r"\(installed: none\): pip install 'vlreason\[video\]'"):
        stage_inputs(stage(data, eval=str(path)))
    with pytest.raises(ConfigError, match=r"video: need fps > 0 .* \(keys video.fps"):
        stage_inputs(load_config(None, raw={"output_dir": str(tmp_path / "runs"), "data": {"train": str(path)},
                                            "video": {"fps": 0}, "stages": [{"kind": "sft"}]}).stages[0])


@ENGINES.register("tests-append-only")
class AppendOnlyEngine(ScriptedEngine):
    hides_tokens = False


def test_the_memory_window_needs_an_engine_that_hides_tokens(data, tmp_path):
    def grpo(**sections):
        entry = {"kind": "grpo", "rewards": {"iou": {}},
                 "agent": {"mode": "tools", "tools": ["crop"], "memory_window": 1}, **sections}
        return load_config(None, raw={"output_dir": str(tmp_path / "runs"), "data": {"train": str(data)},
                                      "stages": [entry]}).stages[0]

    assert stage_inputs(grpo()).agent is not None  # the HF engine hides them
    with pytest.raises(ConfigError, match=r"stages\[grpo\]\.agent\.memory_window: the rollout engine "
                                          r"'tests-append-only' cannot take images out of view; set rollout.engine=hf"):
        stage_inputs(grpo(rollout={"engine": "tests-append-only", "engine_options": {"completions": ["x"]}}))
    with pytest.raises(ConfigError, match=r"memory_window with optim.gradient_checkpointing needs "
                                          r"model.attn_implementation sdpa or eager, not flash_attention_2"):
        stage_inputs(grpo(optim={"gradient_checkpointing": True}, model={"attn_implementation": "flash_attention_2"}))


def test_a_prompt_longer_than_max_tokens_stops_or_is_skipped(data, tmp_path):
    huge = {"images": [json.loads(data.read_text().splitlines()[0])["images"][0]], "prompt": "where? " * 30_000,
            "boxes": [[1, 1, 5, 5]]}
    path = with_lines(data, tmp_path, huge)
    vlm = build_tiny_vlm("tiny-qwen3-vl")
    strict = stage(path)
    with pytest.raises(DataError, match=r":7: prompt: \d+ tokens \(images and videos included\) exceed "
                                        r"data.max_tokens=8192"):
        fit_length(vlm, stage_inputs(strict).samples, strict)
    lenient = stage(path, on_bad_sample="skip")
    kept = fit_length(vlm, stage_inputs(lenient).samples, lenient)
    assert [s.source.rsplit(":", 1)[1] for s in kept] == ["1", "2", "3", "4", "5", "6"]
    unlimited = stage(path, max_tokens=None)
    assert len(fit_length(vlm, stage_inputs(unlimited).samples, unlimited)) == 7


def test_a_video_that_cannot_be_opened_stops_or_is_skipped_before_training(data, tmp_path, make_video):
    make_video(data.parent / "fine.mp4")
    whole = make_video(data.parent / "whole.mp4", frames=40)
    (data.parent / "cut.mp4").write_bytes(whole.read_bytes()[:300])  # the index is cut off: nothing opens it
    path = with_lines(data, tmp_path, {"videos": ["fine.mp4"], "prompt": "What happens?", "answer": "x"},
                      {"videos": ["cut.mp4"], "prompt": "What happens?", "answer": "x"})
    vlm = build_tiny_vlm("tiny-qwen2.5-vl")
    strict = stage(path)
    reader = vlm.use_video(strict.video.sampling())
    with pytest.raises(DataError, match=r":8: videos: .*cut.mp4: no decoder can read it"):
        fit_length(vlm, stage_inputs(strict).samples, strict, reader=reader)
    lenient = stage(path, on_bad_sample="skip")
    kept = fit_length(vlm, stage_inputs(lenient).samples, lenient, reader=reader)
    assert [s.source.rsplit(":", 1)[1] for s in kept] == ["1", "2", "3", "4", "5", "6", "7"]


def test_sft_counts_the_whole_conversation(data):
    vlm = build_tiny_vlm("tiny-qwen3-vl")
    samples = stage_inputs(stage(data, "sft")).samples
    prompt_only = vlm.token_counts([s.prompt_messages for s in samples], [s.image_sizes for s in samples])
    whole = vlm.token_counts([s.messages for s in samples], [s.image_sizes for s in samples], False)
    assert all(w > p for w, p in zip(whole, prompt_only, strict=True))
    limit = min(whole) - 1
    with pytest.raises(DataError, match=f"messages: .* exceed data.max_tokens={limit}"):
        fit_length(vlm, samples, stage(data, "sft", max_tokens=limit))


def test_sft_needs_a_response_in_every_sample(data, tmp_path):
    path = with_lines(data, tmp_path, {"images": [], "prompt": "hello"})
    with pytest.raises(ValueError, match=r"SFT needs a reference response in every sample; 1 have none \(first: .*:7"):
        stage_inputs(stage(path, "sft"))


def test_resuming_on_changed_data_says_so(data, tmp_path, capsys):
    lines = data.read_text().splitlines()
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for line in lines:  # the images, next to the copy
        image = json.loads(line)["images"][0]
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / image).write_bytes((data.parent / image).read_bytes())
    config = tmp_path / "grpo.yaml"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": "tiny-qwen2.5-vl"},
        "data": {"train": str(path)}, "logging": {"tensorboard": False, "progress": False},
        "stages": [{"kind": "grpo", "rewards": {"format": {}}, "optim": {"max_steps": 2, "batch_size": 2},
                    "rollout": {"num_generations": 2, "max_new_tokens": 4}, "save": {"every": 1}}]}))
    assert main(["train", str(config)]) == 0
    path.write_text("\n".join(lines[:3]) + "\n")  # the file shrank since
    assert main(["train", str(config), "grpo.optim.max_steps=3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-2 was trained on other data (6 samples" in err and "(3 samples" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("section", "message"), [
    ({"rollout": {"engine": "hff"}}, "unknown rollout engine 'hff'; did you mean hf"),
    ({"rollout": {"engine": "hf", "engine_options": {"gpu_memory": 0.5}}},
     "rollout.engine_options: got an unexpected keyword argument 'gpu_memory' for engine 'hf' (it takes: no options)"),
    ({"rollout": {"engine": "scripted"}}, "missing a required argument: 'completions'"),
    ({"agent": {"mode": "tools", "tools": ["corp"]}}, "unknown tool 'corp'; did you mean crop"),
    ({"agent": {"mode": "tools", "tools": ["tools/none.py:spin"]}}, "tool plugin file not found: "),
])
def test_engine_and_tools_are_checked_before_any_model_loads(data, section, message):
    entry = {"kind": "grpo", "rewards": {"iou": {}}, **section}
    raw = {"output_dir": str(data.parent / "runs"), "data": {"train": str(data)}, "stages": [entry]}
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        stage_inputs(load_config(None, raw=raw).stages[0])
