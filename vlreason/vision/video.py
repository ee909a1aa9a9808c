"""Video files: checked without a decoder, probed and sampled with one.

``video_container_problem`` checks a file the way a decoder would first see it (exists, not
empty, a known container's signature) and needs no decoder. ``read_video`` decodes the frames a
sample uses: sampled by frame rate within frame-count bounds (the qwen-vl-utils rule), or
explicit frame indices or timestamps, optionally within a time range; only those frames are
decoded (see ``video_backends``), rotated as the container says, each with its presentation
time. Decoders are tried in ``video_backends.BACKEND_ORDER``: PyAV, decord, OpenCV (``pip install
'vlreason[video]'``).
Every problem with a file is a ``VideoError`` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vlreason.vision import video_backends
from vlreason.vision.boxes import Size
from vlreason.vision.video_backends import BackendError, NoVideoStream, VideoInfo

SNIFF_BYTES = 200  # enough for every signature below (an M2TS second sync byte sits at 196)
CONTAINERS = "MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS, FLV, Ogg or ASF/WMV"
# ISO base media (MP4, MOV, M4V, 3GP) files begin with a box: 4 size bytes, then its type; most
# begin with ``ftyp``, QuickTime files written without one begin with one of the others.
ISO_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free")
PREFIXES = (
    b"\x1a\x45\xdf\xa3",  # EBML header: Matroska (MKV) and WebM
    b"\x00\x00\x01\xba",  # MPEG program stream pack header (.mpg, .vob)
    b"FLV",  # Flash video
    b"OggS",  # Ogg (Theora)
    b"\x30\x26\xb2\x75\x8e\x66\xcf\x11",  # ASF header GUID (.wmv, .asf)
)
TS_SYNC = 0x47  # first byte of every MPEG transport-stream packet


def video_file_problem(path: str | Path) -> str | None:
    """What makes ``path`` unusable as a video file without reading it (missing, a folder,
    empty), or None. Cheap: it reads no bytes."""
    path = Path(path)
    if path.is_dir():
        return (f"{path}: is a folder, not a video file; give one video file per entry, or list the "
                'frames as image files in "images"')
    if not path.is_file():
        return (f"{path}: video file not found; check the path (relative paths in a JSONL file are "
                "resolved against the file's folder)")
    if path.stat().st_size == 0:
        return f"{path}: the video is empty (0 bytes); re-export or drop it"
    return None


def video_container_problem(path: str | Path) -> str | None:
    """What makes ``path`` unusable as a video file, or None: the checks of
    ``video_file_problem`` plus whether its leading bytes are a known container's signature."""
    problem = video_file_problem(path)
    if problem:
        return problem
    with Path(path).open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if _is_known_container(head):
        return None
    return (f"{path}: not a recognised video container (expected {CONTAINERS}); convert it to MP4, "
            "e.g. ffmpeg -i IN -c:v libx264 OUT.mp4")


def _is_known_container(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts with a video container's signature."""
    if head[4:8] in ISO_FIRST_BOXES or head.startswith(PREFIXES):
        return True
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return True
    # Transport streams: the sync byte repeats every packet, 188 bytes (.ts) or 192 bytes (.m2ts,
    # .mts, with a 4-byte timestamp before each packet); one byte alone would match any "G...".
    return any(len(head) > offset + size and head[offset] == head[offset + size] == TS_SYNC
               for offset, size in ((0, 188), (4, 192)))


FRAME_FACTOR = 2  # Qwen-VL's temporal patch: frame counts sampled by rate are even (qwen-vl-utils)
REENCODE = "re-encode it, e.g. ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4"


class VideoError(ValueError):
    """A video file cannot give the frames asked for; the message names the file and the fix."""


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video a sample uses.

    By rate (the default): ``fps`` frames per second of the clip (or of ``[start_s, end_s)``),
    at least ``min_frames`` and at most ``max_frames``, never more than the clip holds, rounded
    down to an even count (qwen-vl-utils' ``smart_nframes``), spread evenly from the first frame
    to the last. A one-frame clip gives its one frame. Or explicitly: ``indices`` (frame
    numbers) or ``timestamps`` (seconds; the frame showing at that time).
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 16
    indices: tuple[int, ...] | None = None
    timestamps: tuple[float, ...] | None = None
    start_s: float | None = None
    end_s: float | None = None

    def __post_init__(self) -> None:
        if self.indices is not None and self.timestamps is not None:
            raise ValueError("give frame indices or timestamps, not both")
        if not self.fps > 0 or not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need fps > 0 and 1 <= min_frames <= max_frames, got fps={self.fps}, "
                             f"min_frames={self.min_frames}, max_frames={self.max_frames}")


@dataclass
class Clip:
    """Decoded frames of one video.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB, rotated for display.
        indices: the frame number of each frame.
        timestamps: each frame's presentation time in seconds (for Qwen2.5-VL's
            ``second_per_grid_ts`` and Qwen3-VL's timestamp text).
        info: the stream's facts.
        path: the video file.
    """

    frames: np.ndarray
    indices: list[int]
    timestamps: list[float]
    info: VideoInfo
    path: str = ""

    @property
    def sample_fps(self) -> float:
        """Frames taken per second of the span they cover (first to last frame inclusive): for
        frames sampled over a whole clip, qwen-vl-utils' ``video_sample_fps``."""
        return len(self.indices) * self.info.fps / (self.indices[-1] - self.indices[0] + 1)


@dataclass(frozen=True)
class ClipReader:
    """Decodes a sample's video the same way every time: which frames (``sampling``), with
    which decoder (``backend``, None: the first installed) and at what size (``fit``, see
    ``read_video``). With ``shuffle_seed`` the frames come in a fixed random order per video
    (their times stay in order), the control for whether a model uses frame order."""

    sampling: FrameSampling
    backend: str | None = None
    fit: Callable[[Size, int], Size] | None = None
    shuffle_seed: int | None = None

    def __call__(self, path: str | Path) -> Clip:
        clip = read_video(path, self.sampling, self.backend, self.fit)
        if self.shuffle_seed is not None:
            clip = shuffle_frames(clip, f"{self.shuffle_seed}:{Path(path).name}")
        return clip


def shuffle_frames(clip: Clip, seed: str) -> Clip:
    """``clip`` with its frames in a random order fixed by ``seed`` (their times and frame numbers
    stay in order): what a model sees when frame order carries no information."""
    digest = hashlib.sha256(seed.encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "big")).permutation(len(clip.frames))
    return replace(clip, frames=clip.frames[order])


def sample_indices(info: VideoInfo, sampling: FrameSampling, source: str = "video") -> list[int]:
    """The frame numbers ``sampling`` asks for, sorted and unique.

    Raises:
        VideoError: an index or time past the end of the clip, or an empty time range.
    """
    last = info.frame_count - 1
    if sampling.indices is not None:
        wanted = list(sampling.indices)
    elif sampling.timestamps is not None:
        wanted = [_frame_at(t, info, source) for t in sampling.timestamps]
    else:
        first, stop = _range_frames(info, sampling, source)
        count = _rate_count(stop - first, info.fps, sampling)
        wanted = np.linspace(first, stop - 1, count).round().astype(int).tolist() if count > 1 else [first]
    outside = [i for i in wanted if not 0 <= i <= last]
    if outside:
        raise VideoError(f"{source}: frame {outside[0]} is past the end: the video has {info.frame_count} frames "
                         f"(0-{last}, {info.duration_s:.2f} s at {info.fps:g} fps)")
    return sorted(set(wanted))


def _rate_count(frames: int, fps: float, sampling: FrameSampling) -> int:
    """qwen-vl-utils' frame count for a clip of ``frames`` at ``fps``: ``frames / fps *
    sampling.fps`` within ``[min_frames, max_frames]`` and the clip, rounded down to even (a clip
    of one frame keeps it)."""
    if frames < FRAME_FACTOR:
        return frames
    low = math.ceil(sampling.min_frames / FRAME_FACTOR) * FRAME_FACTOR
    high = math.floor(min(sampling.max_frames, frames) / FRAME_FACTOR) * FRAME_FACTOR
    count = min(max(frames / fps * sampling.fps, low), high, frames)
    return max(FRAME_FACTOR, math.floor(count / FRAME_FACTOR) * FRAME_FACTOR)


def _frame_at(seconds: float, info: VideoInfo, source: str) -> int:
    if not 0 <= seconds < info.duration_s:
        raise VideoError(f"{source}: time {seconds:g} s is past the end: the video lasts {info.duration_s:.2f} s "
                         f"({info.frame_count} frames at {info.fps:g} fps)")
    return min(int(seconds * info.fps), info.frame_count - 1)


def _range_frames(info: VideoInfo, sampling: FrameSampling, source: str) -> tuple[int, int]:
    """``[first, stop)`` frame numbers of the sampled time range (the whole clip by default)."""
    start = 0 if sampling.start_s is None else _frame_at(sampling.start_s, info, source)
    stop = info.frame_count if sampling.end_s is None else min(math.ceil(sampling.end_s * info.fps), info.frame_count)
    if stop <= start:
        raise VideoError(f"{source}: the time range {sampling.start_s}-{sampling.end_s} s holds no frame")
    return start, stop


def probe_video(path: str | Path, backend: str | None = None) -> VideoInfo:
    """The stream facts of a video file, from the first decoder that opens it (or ``backend``).

    Raises:
        VideoError: missing, empty, no video stream, or no decoder can open it.
    """
    reader = _open(str(path), backend)
    reader.close()
    return reader.info


def read_video(path: str | Path, sampling: FrameSampling = FrameSampling(), backend: str | None = None,
               fit: Callable[[Size, int], Size] | None = None) -> Clip:
    """Decode the frames ``sampling`` asks for (and only those) from a video file.

    Args:
        backend: ``pyav``, ``decord`` or ``opencv``; None tries them in ``BACKEND_ORDER``.
        fit: the ``(width, height)`` to give the frames, from the video's shown size and the
            number of frames taken (``VideoPatching.frame_size``); the decoder scales them
            (bicubic) as it converts them. None keeps the video's own size.

    Raises:
        VideoError: missing, empty, audio-only, truncated or undecodable files, and requests
            past the end, each naming the file.
    """
    path = str(path)
    reader = _open(path, backend)
    try:
        indices = sample_indices(reader.info, sampling, path)
        size = fit(reader.info.shown_size, len(indices)) if fit else None
        if size is not None and reader.info.rotation in (90, 270):
            size = (size[1], size[0])  # frames are scaled before they are turned
        frames, timestamps = reader.read(indices, size)
    except BackendError as exc:
        raise VideoError(f"{path}: frames {indices[0]}-{indices[-1]} could not be decoded by {reader.info.backend} "
                         f"({exc}); the file may be truncated or damaged: {REENCODE}") from exc
    finally:
        reader.close()
    return Clip(_rotated(frames, reader.info.rotation), indices, timestamps, reader.info, str(path))


def video_decode_problem(path: str | Path, sampling: FrameSampling = FrameSampling()) -> str | None:
    """What keeps ``path`` from giving the frames ``sampling`` takes, found by decoding them;
    without a decoder installed, what ``video_container_problem`` finds. None when fine."""
    problem = video_container_problem(path)
    if problem or not video_backends.available():
        return problem
    try:
        read_video(path, sampling)
    except VideoError as exc:
        return str(exc)
    return None


def _open(path: str, backend: str | None) -> video_backends.Reader:
    """A reader from the first backend that opens ``path`` (only ``backend`` when given), with
    its rotation filled in. decord is skipped for rotated videos (it mishandles display rotation)."""
    problem = video_file_problem(path)
    if problem:
        raise VideoError(problem)
    installed = video_backends.available()
    if backend is not None and backend not in installed:
        raise VideoError(f"{path}: the video decoder {backend!r} is not installed (installed: "
                         f"{', '.join(installed) or 'none'}); pip install 'vlreason[video]'")
    backends = [backend] if backend else installed
    if not backends:
        raise VideoError(f"{path}: no video decoder is installed: pip install 'vlreason[video]' "
                         "(PyAV, decord and OpenCV)")
    rotation = video_backends.rotation_of(path)
    failures = []
    for backend in backends:
        if backend == "decord" and rotation:
            continue
        try:
            reader = video_backends.open_reader(backend, path)
        except NoVideoStream as exc:
            raise VideoError(f"{path}: has no video stream (an audio-only file?): {exc}") from exc
        except BackendError as exc:
            failures.append(f"{backend}: {exc}")
            continue
        reader.info = VideoInfo(**{**vars(reader.info), "rotation": rotation})
        return reader
    raise VideoError(f"{path}: no decoder can read it ({'; '.join(failures)}); it may be truncated, damaged or "
                     f"not a video: {REENCODE}")


def _rotated(frames: np.ndarray, rotation: int) -> np.ndarray:
    """``[T, H, W, 3]`` frames turned ``rotation`` degrees clockwise."""
    return np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=(1, 2))) if rotation else frames
