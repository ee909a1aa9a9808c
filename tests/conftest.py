"""Tests marked ``gpu`` need CUDA: without it they are skipped, so the default run stays CPU-only.
Fixtures shared across folders: ``make_video``."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_video():
    """``make_video(path, codec="libx264", frames=30, size=(64, 48), fps=10, pts=None, options=None)``
    writes a real video with PyAV (skipped without it): frame i is a flat grey of level
    ``(i * 8) % 256`` with a white marker at the top left; ``pts`` (in 1/1000 s) makes the frame
    rate variable; ``options`` go to the muxer (``{"movflags": "faststart"}``)."""
    pytest.importorskip("av")
    return _write_video


@pytest.fixture
def left_video_data(tmp_path, make_video) -> Path:
    """A JSONL file of two 16-frame video prompts asking "Which way?", both answered "left"
    (choices left / right)."""
    lines = []
    for i in range(2):
        make_video(tmp_path / f"v{i}.mp4", frames=16)
        lines.append(json.dumps({"id": f"s{i}", "videos": [f"v{i}.mp4"], "prompt": "Which way?", "answer": "left",
                                 "choices": ["left", "right"]}))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_video(path: Path, codec: str = "libx264", frames: int = 30, size: tuple[int, int] = (64, 48),
                 fps: int = 10, pts: list[int] | None = None, options: dict | None = None) -> Path:
    import av

    width, height = size
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if pts is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(frames):
            image = np.full((height, width, 3), (i * 8) % 256, np.uint8)
            image[:4, :8] = 255  # a marker in the top-left corner shows the orientation
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], stream.time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
