"""Time and peak memory of ``vlreason data convert coco`` on 100k synthetic COCO annotations, against
loading the same file with pycocotools alone (``COCO(path)``: ``json.load`` and its index).

The instances file is written once into ``--workdir`` with COCO's proportions: 80 categories with
COCO's non-contiguous ids (1..90), about 7 annotations per image (14,286 images for 100,000
annotations), each with a segmentation polygon of 12 points, an area, and 1 % crowd regions. Every
image entry points at a 640 x 480 PNG (hard links of one file), so the conversion checks real
image headers. Each contestant runs in its own fresh process, ``--repeats`` times in turn: the
median wall time (imports left out) and the peak RSS of the process (``VmHWM``, libraries
included).

* ``pycocotools``: ``COCO(path)``, which reads the file whole and builds its index; it writes nothing.
* ``vlreason``: ``convert("coco", path, out)``: the file walked item by item keeping no
  segmentation, one detection sample per image validated as training reads it (fields, the image's
  header, boxes inside it) and written to JSONL.

    python benchmarks/coco_conversion.py --json benchmarks/results/coco_conversion.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ANNOTATIONS, PER_IMAGE, WIDTH, HEIGHT = 100_000, 7, 640, 480
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80 ids

CONTESTANTS = {
    "pycocotools": ("import contextlib, io\nfrom pycocotools.coco import COCO", """
with contextlib.redirect_stdout(io.StringIO()):
    index = COCO(PATH)
records, samples = len(index.imgs), 0
"""),
    "vlreason": ("from vlreason.data.convert import convert", """
result = convert("coco", PATH, OUT, progress=False)
records, samples = result.converted + len(result.skipped), result.converted
"""),
}
# peak RSS from VmHWM, which a new program starts afresh (getrusage's ru_maxrss keeps the forking
# parent's peak across exec, and the parent held the generated file)
TIMED = """
import re, sys, time
PATH, OUT = sys.argv[1], sys.argv[2]
{setup}
start = time.perf_counter()
{body}
elapsed = time.perf_counter() - start
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(elapsed, records, samples, peak_kb / 1024)
"""


def write_instances(folder: Path, annotations: int, seed: int = 0) -> Path:
    """The synthetic instances file and its images (see the module docstring)."""
    path = folder / f"instances_{annotations}.json"
    if path.is_file():
        return path
    rng = random.Random(seed)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    template = images_dir / "template.png"
    Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 150)).save(template)
    n_images = annotations // PER_IMAGE
    images = []
    for i in range(1, n_images + 1):
        name = f"{i:012d}.png"
        if not (images_dir / name).exists():
            os.link(template, images_dir / name)
        images.append({"id": i, "file_name": f"images/{name}", "width": WIDTH, "height": HEIGHT, "license": 1,
                       "date_captured": "2013-11-14 16:28:13"})
    entries = []
    for k in range(1, annotations + 1):
        w, h = rng.uniform(8, 300), rng.uniform(8, 300)
        x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
        polygon = [round(v, 2) for _ in range(12) for v in (x + rng.uniform(0, w), y + rng.uniform(0, h))]
        entries.append({"id": k, "image_id": 1 + (k - 1) % n_images, "category_id": rng.choice(COCO_IDS),
                        "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
                        "iscrowd": int(rng.random() < 0.01), "segmentation": [polygon]})
    categories = [{"id": i, "name": f"class {i}", "supercategory": "thing"} for i in COCO_IDS]
    path.write_text(json.dumps({"info": {"year": 2017}, "licenses": [{"id": 1, "name": "synthetic"}],
                                "images": images, "annotations": entries, "categories": categories}))
    return path


def run(name: str, source: Path, out: Path) -> tuple[float, int, int, float]:
    """One contestant in a fresh process: (seconds, records read, samples written, peak RSS in MB)."""
    setup, body = CONTESTANTS[name]
    done = subprocess.run([sys.executable, "-c", TIMED.format(setup=setup, body=body), str(source), str(out)],
                          capture_output=True, text=True, check=True)
    seconds, records, samples, peak = done.stdout.split()
    return float(seconds), int(records), int(samples), float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlreason-coco-bench"))
    parser.add_argument("--annotations", type=int, default=ANNOTATIONS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    started = time.perf_counter()
    source = write_instances(args.workdir, args.annotations)
    print(f"instances: {source} ({source.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s)")
    runs: dict[str, list[tuple[float, int, int, float]]] = {name: [] for name in CONTESTANTS}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both alike
        for name in CONTESTANTS:
            runs[name].append(run(name, source, args.workdir / "out"))
    results = {}
    for name, measured in runs.items():
        seconds = statistics.median(s for s, _, _, _ in measured)
        results[name] = {"seconds": round(seconds, 3), "all_seconds": [round(s, 3) for s, _, _, _ in measured],
                         "images": measured[0][1], "samples_written": measured[0][2],
                         "images_per_s": round(measured[0][1] / seconds), "annotations_per_s": round(
                             args.annotations / seconds), "peak_rss_mb": round(max(m for *_, m in measured), 1)}
    for key in ("seconds", "peak_rss_mb"):
        results["vlreason"][f"{key}_ratio_to_pycocotools"] = round(results["vlreason"][key]
                                                                   / results["pycocotools"][key], 2)
    for name, result in results.items():
        print(f"{name:12s} {result['seconds']:7.2f} s  {result['annotations_per_s']:8d} annotations/s  "
              f"{result['images_per_s']:6d} images/s  peak {result['peak_rss_mb']:7.1f} MB")
    if args.json:
        report = {"command": f"python benchmarks/coco_conversion.py --json {args.json}",
                  "source": {"annotations": args.annotations, "images": args.annotations // PER_IMAGE,
                             "categories": len(COCO_IDS), "mb": round(source.stat().st_size / 1e6, 1),
                             "polygon_points": 12, "crowd_fraction": 0.01},
                  "repeats": args.repeats, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                                      f"Python {platform.python_version()}",
                  "results": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
