"""Time and peak memory to sample 16 frames from a 5-minute 720p clip: decord and OpenCV alone,
against vlreason's pipeline end to end (probe -> decode the 16 frames -> resize -> patches).

The clip is written once with PyAV (H.264, 1280 x 720, 30 fps, 9,000 frames, x264's default
key-frame interval) into ``--workdir``. Each contestant runs in its own fresh process, ``--repeats``
times in turn: the median wall time of the sampling (imports left out, the file opened inside
the timed part) and the peak RSS of the process (libraries included). The 16 frames are the same
for all: spread evenly from the first frame to the last, as ``FrameSampling(max_frames=16)``
picks them.

* ``decord``: ``VideoReader`` + ``get_batch`` of the 16 indices (decord seeks per frame);
* ``opencv``: ``VideoCapture``, a seek (``CAP_PROP_POS_FRAMES``) and a read per frame;
* ``vlreason``: ``read_video`` (rotation probe, decoder choice: PyAV, the frames scaled to the
  model's size as they are converted) and ``patch_video`` with Qwen2.5-VL's geometry (patch 14,
  merge 2) and a 256-token-per-frame budget.

    python benchmarks/video_decoding.py --json benchmarks/results/video_decoding.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SECONDS, FPS, WIDTH, HEIGHT, FRAMES_WANTED = 300, 30, 1280, 720, 16

# each contestant: (imports, untimed; the sampling, timed)
CONTESTANTS = {
    "decord": ("import decord, numpy as np", """
video = decord.VideoReader(PATH, ctx=decord.cpu(0))
indices = np.linspace(0, len(video) - 1, 16).round().astype(int).tolist()
frames = video.get_batch(indices).asnumpy()
assert frames.shape == (16, 720, 1280, 3)
"""),
    "opencv": ("import cv2, numpy as np", """
capture = cv2.VideoCapture(PATH)
count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
frames = []
for index in np.linspace(0, count - 1, 16).round().astype(int).tolist():
    capture.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, frame = capture.read()
    assert ok
    frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
assert np.stack(frames).shape == (16, 720, 1280, 3)
"""),
    "vlreason": ("""
import cv2, decord, av
from vlreason.vision.video import FrameSampling, read_video
from vlreason.vision.video_patches import VideoPatching, patch_video
""", """
patching = VideoPatching(14, 2, min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28)
clip = read_video(PATH, FrameSampling(max_frames=16), fit=patching.frame_size)
patches = patch_video(clip.frames, patching)
assert len(clip.indices) == 16 and patches.grid_thw[0] == 8
"""),
}
TIMED = """
import resource, sys, time
PATH = sys.argv[1]
{setup}
start = time.perf_counter()
{body}
elapsed = time.perf_counter() - start
backend = clip.info.backend if "clip" in globals() else "-"
print(elapsed, backend, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_clip(path: Path) -> Path:
    """A 5-minute 720p H.264 clip of moving gradients (so frames differ and compress like video)."""
    import av

    if path.is_file():
        return path
    ramp = np.linspace(0, 255, WIDTH, dtype=np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(SECONDS * FPS):
            row = (ramp + i * 3) % 256
            image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
            image[..., 0] = row.astype(np.uint8)
            image[..., 1] = (i * 2) % 256
            image[..., 2] = np.arange(HEIGHT, dtype=np.uint8)[:, None]
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def run(name: str, clip: Path) -> tuple[float, float, str]:
    """One contestant in a fresh process: (seconds, peak RSS in MB, the decoder vlreason chose)."""
    setup, body = CONTESTANTS[name]
    code = TIMED.format(setup=setup, body=body)
    done = subprocess.run([sys.executable, "-c", code, str(clip)], capture_output=True, text=True, check=True)
    seconds, backend, peak_mb = done.stdout.split()
    return float(seconds), float(peak_mb), backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlreason-video-bench"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    clip = write_clip(args.workdir / "clip_720p_5min.mp4")
    print(f"clip: {clip} ({clip.stat().st_size / 1e6:.1f} MB, written in {time.perf_counter() - started:.0f} s)")
    runs: dict[str, list[tuple[float, float, str]]] = {name: [] for name in CONTESTANTS}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits all alike
        for name in CONTESTANTS:
            runs[name].append(run(name, clip))
    results = {name: {"seconds": round(statistics.median(s for s, _, _ in r), 3),
                      "peak_rss_mb": round(max(m for _, m, _ in r), 1),
                      "all_seconds": [round(s, 3) for s, _, _ in r]} for name, r in runs.items()}
    results["vlreason"]["decoder"] = runs["vlreason"][0][2]
    fastest_raw = min(results["decord"]["seconds"], results["opencv"]["seconds"])
    results["vlreason"]["ratio_to_fastest_raw"] = round(results["vlreason"]["seconds"] / fastest_raw, 2)
    for name, result in results.items():
        print(f"{name:9s} {result['seconds']:7.3f} s  peak {result['peak_rss_mb']:7.1f} MB")
    print(f"vlreason / fastest raw decoder: {results['vlreason']['ratio_to_fastest_raw']:.2f}x")
    if args.json:
        report = {"command": "python benchmarks/video_decoding.py --json " + str(args.json),
                  "clip": {"seconds": SECONDS, "fps": FPS, "size": [WIDTH, HEIGHT], "codec": "h264",
                           "frames_sampled": FRAMES_WANTED},
                  "repeats": args.repeats, "machine": f"{platform.machine()}, Python {platform.python_version()}",
                  "results": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
