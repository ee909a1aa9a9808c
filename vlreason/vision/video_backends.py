"""Video decoders behind one small interface: PyAV, decord and OpenCV.

Each backend opens a file into a ``Reader``: the stream's facts (``VideoInfo``) and
``read(indices)``, which decodes only the requested frames (sorted, unique) by seeking to the
key frame before each one and decoding forward, never the whole file. Frames come back as
``[T, H, W, 3]`` uint8 RGB in stored orientation; ``vision.video`` applies the rotation. A
backend raises ``BackendError`` (or its subclass ``NoVideoStream``) with the decoder's own words;
``vision.video`` turns those into one message for the user.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from vlreason.vision.boxes import Size

# a gap between two wanted frames up to this many frames is decoded through, not seeked over
# (a seek lands on the key frame before the target and decodes forward anyway)
SEEK_GAP = 8
RESIZE_THREADS = 2  # frames resized at once


class BackendError(RuntimeError):
    """A decoder could not open or decode a file; the message is the decoder's."""


class NoVideoStream(BackendError):
    """The file opened but holds no video stream (an audio-only file, say)."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video stream holds, as its decoder reports it.

    ``width`` and ``height`` are the stored frame size; ``rotation`` is the clockwise rotation
    (0, 90, 180 or 270 degrees) the container asks players to apply when showing it.
    """

    frame_count: int
    fps: float
    width: int
    height: int
    rotation: int
    backend: str

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps

    @property
    def shown_size(self) -> tuple[int, int]:
        """``(width, height)`` as displayed, after the rotation."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


class Reader(Protocol):
    info: VideoInfo

    def read(self, indices: Sequence[int], size: Size | None = None) -> tuple[np.ndarray, list[float]]:
        """Frames ``indices`` (sorted, unique, within ``frame_count``) as ``[T, H, W, 3]`` uint8
        RGB in stored orientation, scaled (bicubic) to ``size`` ``(width, height)`` when given,
        and each frame's presentation time in seconds."""
        ...

    def close(self) -> None:
        ...


# The order backends are tried in. Measured here (benchmarks/video_decoding.py: 16 frames spread
# over a 5-minute 720p H.264 clip), PyAV seeks and decodes fastest and numbers frames exactly under
# variable frame rate; decord is as exact but slower on long clips; OpenCV seeks by time, so under
# variable frame rate its frame numbers and times are approximate.
BACKEND_ORDER = {"pyav": "av", "decord": "decord", "opencv": "cv2"}


def available() -> list[str]:
    """The installed backends, in ``BACKEND_ORDER``."""
    return [name for name, module in BACKEND_ORDER.items() if importlib.util.find_spec(module) is not None]


def open_reader(backend: str, path: str) -> Reader:
    """Open ``path`` with ``backend`` (``decord``, ``opencv`` or ``pyav``)."""
    return _OPENERS[backend](path)


def rotation_of(path: str) -> int:
    """The clockwise display rotation of the first video stream of ``path``: from OpenCV's
    orientation metadata, else PyAV's, else 0 (decord does not read it)."""
    if importlib.util.find_spec("cv2") is not None:
        import cv2

        capture = cv2.VideoCapture(path)
        try:
            if capture.isOpened():
                return _quarter_turns(capture.get(cv2.CAP_PROP_ORIENTATION_META))
        finally:
            capture.release()
    if importlib.util.find_spec("av") is not None:
        import av

        try:
            with av.open(path) as container:
                for frame in container.decode(video=0):
                    return _quarter_turns(-frame.rotation)  # PyAV counts counter-clockwise
        except (av.error.FFmpegError, StopIteration, IndexError):
            return 0
    return 0


def _quarter_turns(degrees: float) -> int:
    return int(round(degrees / 90)) % 4 * 90


class _Decord:
    """decord's ``VideoReader``: an index of every frame, ``get_batch`` seeks per frame."""

    def __init__(self, path: str):
        import decord

        try:
            self.video = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            first = self.video[0].shape
        except decord.DECORDError as exc:
            if "cannot find video stream" in str(exc):
                raise NoVideoStream("decord found no video stream") from exc
            raise BackendError(_first_line(exc)) from exc
        except (RuntimeError, IndexError) as exc:
            raise BackendError(_first_line(exc)) from exc
        self.info = VideoInfo(len(self.video), float(self.video.get_avg_fps()), first[1], first[0], 0, "decord")

    def read(self, indices: Sequence[int], size: Size | None = None) -> tuple[np.ndarray, list[float]]:
        import decord

        try:
            frames = self.video.get_batch(list(indices)).asnumpy()
            times = self.video.get_frame_timestamp(list(indices))[:, 0]
        except (decord.DECORDError, RuntimeError, IndexError) as exc:
            raise BackendError(_first_line(exc)) from exc
        return scaled(frames, size), [float(t) for t in times]

    def close(self) -> None:
        del self.video


class _OpenCV:
    """OpenCV's ``VideoCapture``: seeks by frame number, reads forward through short gaps."""

    def __init__(self, path: str):
        import cv2

        self.cv2 = cv2
        self.capture = cv2.VideoCapture(path)
        if not self.capture.isOpened():
            raise BackendError("OpenCV could not open it")
        self.capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)  # vision.video rotates, the same for every backend
        count, fps = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT)), float(self.capture.get(cv2.CAP_PROP_FPS))
        width = int(self.capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(self.capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if count <= 0 or fps <= 0 or width <= 0 or height <= 0:
            self.capture.release()
            raise BackendError(f"OpenCV reports {count} frames of {width}x{height} at {fps:g} fps")
        self.info = VideoInfo(count, fps, width, height, 0, "opencv")
        self.position = 0

    def read(self, indices: Sequence[int], size: Size | None = None) -> tuple[np.ndarray, list[float]]:
        frames = []
        for index in indices:
            if not 0 <= index - self.position <= SEEK_GAP:
                self.capture.set(self.cv2.CAP_PROP_POS_FRAMES, index)
                self.position = index
            while self.position < index:
                self._next(grab_only=True)
            frames.append(self.cv2.cvtColor(self._next(grab_only=False), self.cv2.COLOR_BGR2RGB))
        return scaled(np.stack(frames), size), [index / self.info.fps for index in indices]

    def _next(self, grab_only: bool) -> Any:
        ok = self.capture.grab()
        frame = None
        if ok and not grab_only:
            ok, frame = self.capture.retrieve()
        if not ok:
            raise BackendError(f"frame {self.position} could not be decoded (the stream ends early)")
        self.position += 1
        return frame

    def close(self) -> None:
        self.capture.release()


class _PyAV:
    """PyAV (FFmpeg). Opening reads the stream's packets without decoding them (a fraction of a
    second for a long clip), so frame ``i`` is the packet with the i-th smallest presentation time:
    exact under variable frame rate. Reading seeks to the key frame before each wanted frame and
    decodes forward to it."""

    def __init__(self, path: str):
        import av

        self.av = av
        try:
            self.container = av.open(path)
        except av.error.FFmpegError as exc:
            raise BackendError(str(exc)) from exc
        if not self.container.streams.video:
            self.container.close()
            raise NoVideoStream("PyAV found no video stream")
        self.stream = self.container.streams.video[0]
        try:
            self.pts = sorted(packet.pts for packet in self.container.demux(self.stream)
                              if packet.size and packet.pts is not None)
        except av.error.FFmpegError as exc:
            self.container.close()
            raise BackendError(str(exc)) from exc
        rate = self.stream.average_rate or self.stream.guessed_rate
        problem = _stream_problem(len(self.pts), self.stream.frames, rate)
        if problem:
            self.container.close()
            raise BackendError(problem)
        self.info = VideoInfo(len(self.pts), float(rate), self.stream.width, self.stream.height, 0, "pyav")

    def read(self, indices: Sequence[int], size: Size | None = None) -> tuple[np.ndarray, list[float]]:
        try:
            return self._read(indices, size)
        except self.av.error.FFmpegError as exc:
            raise BackendError(str(exc)) from exc

    def _read(self, indices: Sequence[int], size: Size | None) -> tuple[np.ndarray, list[float]]:
        """Decode forward from key frames; FFmpeg converts each frame to RGB and scales it in one
        pass (cheaper than converting at full size and resizing after)."""
        scale = {"width": size[0], "height": size[1], "interpolation": "BICUBIC"} if size else {}
        frames, times = [], []
        decoded: Any = iter(())
        last = None  # the frame number decoded last
        for index in indices:
            target = self.pts[index]
            if last is None or not 0 < index - last <= SEEK_GAP:
                self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
                decoded = self.container.decode(self.stream)
            for frame in decoded:
                if frame.pts is not None and frame.pts >= target:
                    frames.append(frame.to_ndarray(format="rgb24", **scale))
                    times.append(float(frame.time))
                    last = index
                    break
            else:
                raise BackendError(f"frame {index} could not be decoded (the stream ends early)")
        return np.stack(frames), times

    def close(self) -> None:
        self.container.close()


def scaled(frames: np.ndarray, size: Size | None) -> np.ndarray:
    """``[T, H, W, 3]`` frames resized (bicubic, as images are) to ``size`` ``(width, height)``;
    as they are without a size or at that size already."""
    if size is None or (frames.shape[2], frames.shape[1]) == tuple(size):
        return frames
    with ThreadPoolExecutor(RESIZE_THREADS) as pool:  # Pillow lets go of the GIL while it resamples
        return np.stack(list(pool.map(lambda frame: np.asarray(Image.fromarray(frame).resize(
            tuple(size), Image.Resampling.BICUBIC)), frames)))


def _stream_problem(found: int, listed: int, rate: Any) -> str | None:
    """What is wrong with a stream of ``found`` frames whose header lists ``listed`` (0: not
    said) at frame rate ``rate``, or None."""
    if not found:
        return "PyAV found no frames"
    if not rate:
        return "PyAV found no frame rate"
    if found < listed:
        return f"the container lists {listed} frames but the file holds {found}: it is truncated"
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


_OPENERS: dict[str, Callable[[str], Reader]] = {"decord": _Decord, "opencv": _OpenCV, "pyav": _PyAV}
