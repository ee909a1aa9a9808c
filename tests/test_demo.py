"""The demo's pieces without a browser: upload limits, the run-folder guard, the rollout viewer on
a short training run, the playground, the inference helper's boxes, and the app served on
127.0.0.1."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from vlreason import inference
from vlreason.config import load_config
from vlreason.data.synth import synthesize
from vlreason.demo import DemoError, RunFolders, check_upload, draw_boxes, launch, score_completion
from vlreason.models.vlm import build_tiny_vlm
from vlreason.registry import PluginError
from vlreason.rollout import ScriptedEngine
from vlreason.training.grpo import GRPOTrainer

REPO = Path(__file__).resolve().parents[1]


def test_uploads_are_images_or_videos_within_the_limit(tmp_path):
    image, video, script = tmp_path / "a.PNG", tmp_path / "clip.mp4", tmp_path / "x.sh"
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    video.write_bytes(b"\0" * 2048)
    script.write_text("rm -rf /")
    assert check_upload(image, 2**20) == "image" and check_upload(video, 2**20) == "video"
    with pytest.raises(DemoError, match=r"x.sh: .sh files are not accepted; upload images \(.png"):
        check_upload(script, 2**20)
    with pytest.raises(DemoError, match=r"clip.mp4: 0.0 MB is over the 0 MB upload limit"):
        check_upload(video, 1024)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """A two-step GRPO run (scripted completions) whose rollouts and metrics the viewer reads."""
    root = tmp_path_factory.mktemp("runs")
    data = synthesize("grounding", root.parent / "data", n=4, seed=1, image_size=56, progress=False)
    stage = {"kind": "grpo", "optim": {"learning_rate": 1e-3, "batch_size": 2, "max_steps": 2},
             "rollout": {"num_generations": 2, "max_new_tokens": 24, "engine": "scripted",
                         "engine_options": {"completions": ["<answer>[1, 2, 30, 40]</answer>", "no box"]}},
             "rewards": {"iou": {}}, "logging": {"tensorboard": False, "progress": False}, "save": {"every": 0}}
    raw = {"output_dir": str(root / "exp"), "model": {"name_or_path": "tiny-qwen2-vl"}, "data": {"train": str(data)},
           "stages": [stage]}
    GRPOTrainer(load_config(None, raw=raw).stages[0]).train()
    return root


def test_the_viewer_reads_a_run_and_nothing_outside_it(run_root):
    folders = RunFolders(run_root)
    assert folders.runs() == ["exp/grpo"]
    assert folders.steps("exp/grpo") == [1, 2]
    records = folders.rollouts("exp/grpo", 2)
    assert len(records) == 4 and {r["completion"] for r in records} == {"<answer>[1, 2, 30, 40]</answer>", "no box"}
    media = records[0]["media"]
    assert media and all(path.startswith(str(run_root / "exp" / "grpo")) for path in media)
    assert Image.open(media[0]).size == (56, 56)  # the prompt image, kept inside the run folder
    assert folders.curves("exp/grpo").is_file()
    for outside in ("..", "../..", "/etc", "exp/../../x"):
        with pytest.raises(DemoError, match="is not a run folder under"):
            folders.run(outside)
    with pytest.raises(DemoError, match="is outside the run folder"):
        folders.inside(folders.run("exp/grpo"), "../../../etc/passwd")


def test_the_rewards_playground_scores_and_explains():
    rows = score_completion("<think>x</think><answer>[10, 10, 50, 50]</answer>", '{"boxes": [[10, 10, 50, 60]]}',
                            ["iou", "format"], "100x100")
    assert rows == [["iou", 0.8], ["format", 1.0]]
    plugin = f"{REPO / 'rewards' / 'center_distance.py'}:CenterDistance"  # a user's file, named when launching
    (name, value), = score_completion("<answer>[10, 10, 50, 50]</answer>", '{"boxes": [[10, 10, 50, 50]]}', [plugin],
                                      "100x100")
    assert name == plugin and value == pytest.approx(1.0)
    with pytest.raises(PluginError, match="nope"):  # checked before any model loads
        launch("no/such-model", reward_plugins=["nope:missing"], block=False)
    with pytest.raises(DemoError, match="ground truth is not JSON"):
        score_completion("x", "{oops", ["format"])
    with pytest.raises(DemoError, match="pick at least one reward"):
        score_completion("x", "{}", [])
    with pytest.raises(DemoError, match="write WIDTHxHEIGHT"):
        score_completion("x", "{}", ["iou"], "wide")


def test_predict_gives_boxes_in_original_pixels(monkeypatch):
    vlm = build_tiny_vlm("tiny-qwen2.5-vl")  # boxes in pixels of the resized input
    image = Image.new("RGB", (600, 400), (250, 250, 250))
    answer = "<think>there</think><answer>[28, 28, 56, 84]</answer>"
    monkeypatch.setattr(inference, "HFEngine", lambda v: ScriptedEngine(v, [answer]))
    result = inference.predict(vlm, "Where?", [image])
    info = vlm.prepare_images([image])[1][0]
    assert result.answer == "[28, 28, 56, 84]" and result.think == "there"
    assert result.boxes[0].box == pytest.approx(vlm.adapter.from_model([28, 28, 56, 84], info))
    assert info.input_size != info.original_size and result.boxes[0].box[2] > 56  # scaled back up
    shown = draw_boxes(image, result.boxes)
    assert shown.size == image.size and shown.getpixel((int(result.boxes[0].box[0]), 150)) != (250, 250, 250)
    with pytest.raises(ValueError, match="ask a question"):
        inference.predict(vlm, "  ", [image])


def test_the_app_serves_on_localhost_only_and_refuses_oversized_uploads(run_root):
    import requests

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = launch("tiny-qwen3-vl", port=port, runs_root=run_root, max_upload_mb=0.01, block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            config = json.loads(response.read())
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        assert {"Question", "Completion", "Reward and KL curves"} <= labels
        assert app.server_name == "127.0.0.1" and not app.share
        upload = f"http://127.0.0.1:{port}/gradio_api/upload"
        small = requests.post(upload, files={"files": ("a.png", b"x" * 1000)}, timeout=30)
        big = requests.post(upload, files={"files": ("b.png", b"x" * 20_000)}, timeout=30)
        assert small.status_code == 200
        assert big.status_code == 413 and "maximum allowed size of 10485 bytes" in big.text
    finally:
        app.close()


def test_chat_refuses_a_bad_upload_and_answers_about_a_video(tmp_path, make_video):
    from vlreason.demo import chat

    vlm = build_tiny_vlm("tiny-qwen3-vl")
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(DemoError, match="notes.txt: .txt files are not accepted"):
        chat(vlm, [str(bad)], "What is it?", 0.0, 8, [], 2**20)
    clip = make_video(tmp_path / "clip.mp4", frames=8, size=(64, 48), fps=4)
    shown, reasoning, answer, tool_images, calls = chat(vlm, [str(clip)], "What happens?", 0.0, 8, [], 2**20)
    assert shown is None and answer and tool_images == [] and calls == ""
    with pytest.raises(DemoError, match="ImageLoadError"):  # a broken file is a message, not a traceback
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG not really")
        chat(vlm, [str(broken)], "What is it?", 0.0, 8, [], 2**20)


def test_the_chat_streams_the_turn_as_it_is_written(tmp_path):
    from vlreason.demo import chat_stream, partial_parts

    assert partial_parts("<think>It is up") == ("It is up", "")
    assert partial_parts("<think>Up.</think><answer>[1, 2") == ("Up.", "[1, 2")
    assert partial_parts("plain text") == ("plain text", "")
    vlm = build_tiny_vlm("tiny-qwen3-vl")
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    views = list(chat_stream(vlm, [str(image)], "What colour?", 0.0, 12, [], 2**20))
    assert len(views) >= 2  # partial texts, then the result
    final = views[-1]
    assert final[0] is not None and final[2]  # the image, and the answer (the text when no <answer>)
    assert views[-2][1] == final[2].strip()  # the last streamed text is the whole turn (no tags: all reasoning)
    with pytest.raises(DemoError, match="not accepted"):
        next(chat_stream(vlm, [str(tmp_path / "x.exe")], "Q?", 0.0, 8, [], 2**20))
