"""Video decoding on real files written here with PyAV: several codecs, containers and sizes, a
rotated file, variable frame rate, one-frame clips, and broken files (truncated, empty,
audio-only). Every frame written is a flat grey whose level encodes its frame number, so a
decoded frame tells which frame it is."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("cv2")

from vlreason.vision import video_backends  # noqa: E402
from vlreason.vision.video import FrameSampling, VideoError, probe_video, read_video, sample_indices  # noqa: E402
from vlreason.vision.video_backends import VideoInfo  # noqa: E402

STEP = 8  # the grey level per frame number that the make_video fixture writes
BACKENDS = video_backends.available()


def grey(frame: np.ndarray) -> int:
    """The frame number a decoded frame shows (its centre's grey level / STEP)."""
    h, w = frame.shape[:2]
    return round(float(frame[h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2].mean()) / STEP)


def rotate_mp4(path: Path, out: Path) -> Path:
    """A copy of an MP4 whose track header asks players to turn it 90 degrees clockwise."""
    data = bytearray(path.read_bytes())
    box = data.find(b"tkhd")
    assert data[box + 4] == 0, "version-0 track header expected"
    matrix = box + 4 + 4 + 4 * 5 + 8 + 2 * 4  # version/flags, times, track id, duration; reserved, layer ...
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(("codec", "suffix", "size"), [
    ("libx264", ".mp4", (64, 48)),
    ("libvpx-vp9", ".webm", (96, 64)),
    ("mpeg4", ".avi", (80, 60)),
    ("mjpeg", ".mov", (33, 17)),  # odd sizes
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_codecs_and_containers_give_the_requested_frames(tmp_path, codec, suffix, size, backend, make_video):
    path = make_video(tmp_path / f"clip{suffix}", codec, size=size)
    clip = read_video(path, FrameSampling(indices=(0, 3, 17, 29)), backend=backend)
    assert clip.info.backend == backend
    assert clip.frames.shape == (4, size[1], size[0], 3) and clip.frames.dtype == np.uint8
    assert [grey(f) for f in clip.frames] == [0, 3, 17, 29]
    assert clip.timestamps == pytest.approx([0.0, 0.3, 1.7, 2.9], abs=1e-6)
    assert (clip.info.frame_count, clip.info.fps) == (30, 10.0)


@pytest.mark.parametrize("backend", video_backends.available())
def test_every_backend_decodes_the_same_frames_by_seeking(tmp_path, backend, make_video):
    path = make_video(tmp_path / "long.mp4", frames=120)
    reader = video_backends.open_reader(backend, str(path))
    try:
        frames, times = reader.read([2, 5, 31, 32, 90, 119])  # near, far, adjacent and last frames
    finally:
        reader.close()
    assert [grey(f) % 32 for f in frames] == [2, 5, 31, 0, 26, 23]  # grey wraps every 32 frames
    assert times == pytest.approx([0.2, 0.5, 3.1, 3.2, 9.0, 11.9], abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_can_be_scaled_while_decoding(tmp_path, backend, make_video):
    path = make_video(tmp_path / "clip.mp4", size=(96, 64))
    asked = []

    def fit(size, frames):
        asked.append((size, frames))
        return (48, 32)

    clip = read_video(path, FrameSampling(indices=(4, 20)), backend=backend, fit=fit)
    assert asked == [((96, 64), 2)]
    assert clip.frames.shape == (2, 32, 48, 3) and [grey(f) for f in clip.frames] == [4, 20]


def test_a_rotated_clip_is_fitted_in_its_shown_orientation(tmp_path, make_video):
    path = rotate_mp4(make_video(tmp_path / "plain.mp4", size=(96, 64)), tmp_path / "rotated.mp4")
    asked = []
    clip = read_video(path, FrameSampling(indices=(0,)), fit=lambda size, frames: asked.append(size) or (32, 48))
    assert asked == [(64, 96)] and clip.frames.shape == (1, 48, 32, 3)


def test_sampling_by_rate_follows_the_qwen_vl_utils_frame_count():
    info = VideoInfo(frame_count=300, fps=30.0, width=64, height=48, rotation=0, backend="test")
    # 10 s at 2 fps = 20 frames, capped at max_frames = 16, spread from the first frame to the last
    assert sample_indices(info, FrameSampling(fps=2, max_frames=16)) == np.linspace(0, 299, 16).round().tolist()
    # 10 s at 0.1 fps = 1 frame, raised to min_frames = 4
    assert len(sample_indices(info, FrameSampling(fps=0.1, min_frames=4))) == 4
    # 3 frames at 10 fps: 6 by rate, at most the clip's 3, then rounded down to even
    short = VideoInfo(frame_count=3, fps=10.0, width=64, height=48, rotation=0, backend="test")
    assert sample_indices(short, FrameSampling(fps=20)) == [0, 2]
    # odd caps are rounded to even too: min 5 -> 6, max 15 -> 14
    assert len(sample_indices(info, FrameSampling(fps=0.1, min_frames=5, max_frames=15))) == 6
    assert len(sample_indices(info, FrameSampling(fps=30, min_frames=5, max_frames=15))) == 14


def test_frame_counts_and_indices_equal_qwen_vl_utils():
    """Where qwen-vl-utils loads (it needs torchvision: `make test-vllm`), its frame count
    (``smart_nframes``) and frame positions (``linspace(0, n - 1, count).round()``) are ours."""
    vision_process = pytest.importorskip("qwen_vl_utils.vision_process")
    import torch

    compared = 0
    for total, video_fps in [(300, 30.0), (16, 8.0), (17, 8.0), (9000, 29.97), (3, 10.0), (251, 25.0), (61, 24.0)]:
        for fps, low, high in [(2.0, 4, 16), (0.5, 4, 768), (8.0, 5, 15), (1.0, 2, 64), (30.0, 4, 32)]:
            try:
                count = vision_process.smart_nframes({"fps": fps, "min_frames": low, "max_frames": high}, total,
                                                     video_fps)
            except ValueError:  # qwen-vl-utils refuses fewer than 2 frames; a 1-frame clip keeps its frame here
                continue
            info = VideoInfo(frame_count=total, fps=video_fps, width=64, height=48, rotation=0, backend="test")
            expected = torch.linspace(0, total - 1, count).round().long().tolist()
            assert sample_indices(info, FrameSampling(fps=fps, min_frames=low, max_frames=high)) == expected
            compared += 1
    assert compared >= 30


def test_a_time_range_samples_within_it():
    info = VideoInfo(frame_count=300, fps=30.0, width=64, height=48, rotation=0, backend="test")
    indices = sample_indices(info, FrameSampling(fps=2, start_s=2.0, end_s=4.0))  # 2 s -> 4 frames in 60..119
    assert indices == [60, 80, 99, 119]
    assert sample_indices(info, FrameSampling(timestamps=(0.0, 1.5, 9.99))) == [0, 45, 299]


def test_a_one_frame_clip_gives_its_frame(tmp_path, make_video):
    path = make_video(tmp_path / "still.mp4", frames=1)
    clip = read_video(path)
    assert clip.indices == [0] and clip.frames.shape == (1, 48, 64, 3)


def test_rotation_metadata_turns_the_frames(tmp_path, make_video):
    path = rotate_mp4(make_video(tmp_path / "plain.mp4"), tmp_path / "rotated.mp4")
    clip = read_video(path, FrameSampling(indices=(0, 10)))
    assert clip.info.rotation == 90 and clip.info.backend != "decord"  # decord mishandles rotation
    assert clip.frames.shape == (2, 64, 48, 3)  # 64 x 48 stored, shown as 48 x 64
    assert [grey(f) for f in clip.frames] == [0, 10]
    # turned clockwise: the stored top-left marker is now at the top right
    assert clip.frames[0, :8, -4:].mean() > 200 and clip.frames[0, :8, :4].mean() < 50


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "opencv"])  # OpenCV seeks by time
def test_variable_frame_rate_keeps_each_frame_and_its_time(tmp_path, backend, make_video):
    times_ms = [0, 100, 150, 400, 420, 1000, 1100, 1900, 1950, 2000]
    path = make_video(tmp_path / "vfr.mkv", frames=10, pts=times_ms)
    clip = read_video(path, FrameSampling(indices=(0, 2, 3, 4, 8, 9)), backend=backend)
    assert [grey(f) for f in clip.frames] == [0, 2, 3, 4, 8, 9]
    assert clip.timestamps == pytest.approx([times_ms[i] / 1000 for i in clip.indices], abs=2e-3)


def test_an_uninstalled_decoder_is_named(tmp_path, make_video, monkeypatch):
    path = make_video(tmp_path / "clip.mp4")
    monkeypatch.setattr(video_backends, "available", lambda: ["opencv"])
    with pytest.raises(VideoError, match=r"the video decoder 'pyav' is not installed \(installed: opencv\)"):
        read_video(path, backend="pyav")
    monkeypatch.setattr(video_backends, "available", lambda: [])
    with pytest.raises(VideoError, match=r"no video decoder is installed: pip install 'vlreason\[video\]'"):
        read_video(path)


def test_requests_past_the_end_are_refused_with_the_length(tmp_path, make_video):
    path = make_video(tmp_path / "clip.mp4")
    with pytest.raises(VideoError, match=r"clip.mp4: frame 30 is past the end: the video has 30 frames \(0-29"):
        read_video(path, FrameSampling(indices=(3, 30)))
    with pytest.raises(VideoError, match=r"time 3.5 s is past the end: the video lasts 3.00 s"):
        read_video(path, FrameSampling(timestamps=(3.5,)))


def test_a_file_truncated_mid_stream_is_refused(tmp_path, make_video):
    # the index (moov) comes first, so the cut file opens and claims 60 frames it does not hold
    path = make_video(tmp_path / "full.mp4", frames=60, options={"movflags": "faststart"})
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(VideoError, match=r"cut.mp4: .*truncated or damaged.*ffmpeg -i"):
        read_video(cut, FrameSampling(indices=(5, 59)))
    # cut before its index: nothing can open it
    plain = make_video(tmp_path / "plain.mp4")
    head = tmp_path / "head.mp4"
    head.write_bytes(plain.read_bytes()[:200])
    with pytest.raises(VideoError, match=r"head.mp4: no decoder can read it .*truncated, damaged or not a video"):
        probe_video(head)


def test_an_empty_and_a_missing_file_are_refused(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty.mp4: the video is empty \(0 bytes\)"):
        read_video(tmp_path / "empty.mp4")
    with pytest.raises(VideoError, match=r"gone.mp4: video file not found"):
        read_video(tmp_path / "gone.mp4")


def test_an_audio_only_file_is_refused(tmp_path):
    path = tmp_path / "speech.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        silence.sample_rate = 16000
        for _ in range(10):
            for packet in stream.encode(silence):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(VideoError, match=r"speech.m4a: has no video stream \(an audio-only file\?\)"):
        read_video(path)


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="indices or timestamps, not both"):
        FrameSampling(indices=(1,), timestamps=(0.1,))
    with pytest.raises(ValueError, match="min_frames <= max_frames"):
        FrameSampling(min_frames=8, max_frames=4)


def test_a_shuffling_reader_keeps_one_random_order_per_video(tmp_path, make_video):
    from vlreason.vision.video import ClipReader

    path = make_video(tmp_path / "clip.mp4", frames=16)
    sampling = FrameSampling(indices=tuple(range(16)))
    ordered = [grey(f) for f in ClipReader(sampling)(path).frames]
    shuffled = [grey(f) for f in ClipReader(sampling, shuffle_seed=0)(path).frames]
    assert ordered == list(range(16)) and sorted(shuffled) == ordered and shuffled != ordered
    assert [grey(f) for f in ClipReader(sampling, shuffle_seed=0)(path).frames] == shuffled  # the same every time
    assert [grey(f) for f in ClipReader(sampling, shuffle_seed=1)(path).frames] != shuffled
    assert ClipReader(sampling, shuffle_seed=0)(path).timestamps == ClipReader(sampling)(path).timestamps
