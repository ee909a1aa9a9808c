"""The semantic_consistency reward (VideoRFT): formula, gating by correctness, frames and model loading."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from vlreason.models.embedding import EmbedderError, ImageTextEmbedder
from vlreason.rewards import get_reward
from vlreason.rewards.semantic import frame_scores, reasoning_text

pytest.importorskip("av")


def test_frame_score_is_twice_the_positive_cosine_capped_at_one():
    text = torch.tensor([1.0, 0.0])
    angles = {-0.3: 0.0, 0.0: 0.0, 0.2: 0.4, 0.45: 0.9, 0.7: 1.0, 1.0: 1.0}
    frames = torch.tensor([[cos, float(np.sqrt(1 - cos**2))] for cos in angles])
    assert frame_scores(text, frames).tolist() == pytest.approx(list(angles.values()))


def test_the_first_sentence_is_dropped():
    assert reasoning_text("The question asks for a direction. The circle starts left. It ends right.") == \
        "The circle starts left. It ends right."
    assert reasoning_text("Only one sentence here.") == ""
    assert reasoning_text("Only one sentence here.", drop_first_sentence=False) == "Only one sentence here."
    assert reasoning_text(None) == ""


class _ColourEmbedder:
    """Texts naming red or blue, and frames mostly red or blue, as unit vectors on two axes."""

    def texts(self, texts):
        return torch.tensor([[1.0, 0.0] if "red" in t else [0.0, 1.0] if "blue" in t else [0.6, 0.8] for t in texts])

    def images(self, images):
        rows = [np.asarray(image, dtype=float).reshape(-1, 3).mean(0) for image in images]
        return torch.nn.functional.normalize(torch.tensor([[r[0], r[2]] for r in rows], dtype=torch.float32), dim=-1)


def _red_video(path):
    """An 8-frame clip of flat red frames."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(8):
            frame = np.zeros((32, 32, 3), np.uint8)
            frame[..., 0] = 220
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _columns(videos, pred_answers, thinks, answer="left", choices=("left", "right")):
    n = len(pred_answers)
    return {"pred_answer": pred_answers, "pred_think": thinks, "answer": [answer] * n,
            "choices": [list(choices)] * n, "label": [None] * n, "video_paths": [videos] * n}


def test_scores_follow_the_frames_and_pay_only_correct_answers(tmp_path):
    video = _red_video(tmp_path / "red.mp4")
    reward = get_reward("semantic_consistency", model="tiny-clip", frames=4)
    reward._embedder = _ColourEmbedder()
    thinks = ["I look at the clip. The shape is red.", "I look at the clip. The shape is blue.",
              "I look at the clip. The shape is red.", "Just one sentence.", None]
    scores = reward(["..."] * 5, **_columns([video], ["left", "left", "right", "left", "left"], thinks))
    assert scores[0] == pytest.approx(1.0, abs=0.02)  # red reasoning, red frames: cos ~1 -> capped at 1
    assert scores[1] == pytest.approx(0.0, abs=0.05)  # blue reasoning, red frames: cos ~0
    assert scores[2] == 0.0  # a wrong answer earns nothing, however well the reasoning matches
    assert scores[3] == 0.0 and scores[4] == 0.0  # no reasoning after the first sentence


def test_rows_without_videos_or_ground_truth_do_not_apply(tmp_path):
    video = _red_video(tmp_path / "red.mp4")
    reward = get_reward("semantic_consistency", model="tiny-clip")
    columns = _columns([], ["left"], ["A. B."]) | {"video_paths": [[]]}
    assert reward(["x"], **columns) == [None]
    columns = _columns([video], ["left"], ["A. B."]) | {"answer": [None], "choices": [None]}
    assert reward(["x"], **columns) == [None]
    with pytest.raises(KeyError, match="video_paths"):
        reward(["x"], pred_answer=["left"], pred_think=["A. B."], answer=["left"])


def test_tiny_clip_end_to_end_equals_the_embedder_by_hand(tmp_path, make_video, monkeypatch):
    from PIL import Image

    import vlreason.rewards.semantic as semantic
    from vlreason.vision.video import FrameSampling, read_video

    path = str(make_video(tmp_path / "grey.mp4", frames=16))
    reads = []
    monkeypatch.setattr(semantic, "read_video", lambda *a, **k: reads.append(a) or read_video(*a, **k))
    reward = get_reward("semantic_consistency", model="tiny-clip", frames=4, device="cpu")
    think = "First I read the question. The grey square gets brighter over time."
    scores = reward(["x"] * 3, **_columns([path], ["left"] * 3, [think] * 3))
    assert len(reads) == 1  # the group's completions share one decode of the video
    embedder = ImageTextEmbedder.load("tiny-clip", device="cpu")
    frames = read_video(path, FrameSampling(indices=(0, 5, 10, 15))).frames
    expected = frame_scores(embedder.texts([reasoning_text(think)])[0],
                            embedder.images([Image.fromarray(f) for f in frames])).mean()
    assert scores == pytest.approx([float(expected)] * 3, abs=1e-5)
    assert 0.0 <= scores[0] <= 1.0
    restored = pickle.loads(pickle.dumps(reward))  # worker processes get it without the model
    assert restored._embedder is None and not restored._video_cache
    assert restored(["x"], **_columns([path], ["left"], [think])) == pytest.approx([scores[0]], abs=1e-5)


def test_a_model_that_cannot_load_names_the_option(tmp_path):
    with pytest.raises(EmbedderError, match="CLIP or SigLIP"):
        ImageTextEmbedder.load(str(tmp_path / "no-such-model"), device="cpu")
