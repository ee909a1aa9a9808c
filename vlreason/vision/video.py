"""Video files, checked without a decoder.

Decoding (decord, OpenCV) is optional and not built yet, so a data file's videos are checked the
way a decoder would first see them: the file exists, is not empty, and its leading bytes name a
container that FFmpeg-based decoders read. This catches wrong paths, placeholders and files
saved under the wrong extension before training, not at step 500; a damaged stream inside a
valid container is left to decoding.
"""

from __future__ import annotations

from pathlib import Path

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
