"""Video file checks without a decoder: existence, emptiness and the container's leading bytes."""

from __future__ import annotations

import pytest

from vlreason.vision.video import video_container_problem, video_file_problem

PADDING = bytes(400)  # enough bytes after each header for any check that looks further in


def ts_packets(packet_size: int, prefix: int) -> bytes:
    """Three transport-stream packets of ``packet_size`` bytes, sync byte 0x47 at ``prefix``."""
    packet = bytes(prefix) + b"\x47" + bytes(packet_size - prefix - 1)
    return packet * 3


CONTAINERS = {
    "mp4": b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00" + PADDING,
    "mov": b"\x00\x00\x00\x14ftypqt  \x20\x05\x03\x00" + PADDING,
    "m4v": b"\x00\x00\x00\x1cftypM4V \x00\x00\x00\x01" + PADDING,
    "mov without ftyp": b"\x00\x00\x00\x08wide\x00\x00\x10\x00mdat" + PADDING,
    "mkv": b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01matroska" + PADDING,
    "webm": b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01webm" + PADDING,
    "avi": b"RIFF\x00\x10\x00\x00AVI LIST" + PADDING,
    "mpeg-ts": ts_packets(188, 0),
    "m2ts": ts_packets(192, 4),
    "mpeg-ps": b"\x00\x00\x01\xba\x44\x00\x04\x00\x04\x01" + PADDING,
    "flv": b"FLV\x01\x05\x00\x00\x00\x09" + PADDING,
    "ogg": b"OggS\x00\x02" + PADDING,
    "asf/wmv": b"\x30\x26\xb2\x75\x8e\x66\xcf\x11\xa6\xd9\x00\xaa\x00\x62\xce\x6c" + PADDING,
}


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_recognised_containers_pass(tmp_path, kind):
    path = tmp_path / "clip.bin"
    path.write_bytes(CONTAINERS[kind])
    assert video_container_problem(path) is None
    assert video_container_problem(str(path)) is None
    assert video_file_problem(path) is None


NOT_VIDEOS = {
    "text": b"frame 1\nframe 2\n",
    "png": b"\x89PNG\r\n\x1a\n" + PADDING,
    "wav (RIFF, not AVI)": b"RIFF\x00\x10\x00\x00WAVEfmt " + PADDING,
    "one sync-like byte only": b"G" + b"x" * 400,  # 'G' at byte 0 is not yet a transport stream
    "short": b"\x00\x00",
}


@pytest.mark.parametrize("kind", sorted(NOT_VIDEOS))
def test_unrecognised_bytes_are_a_problem_that_names_the_file_and_the_fix(tmp_path, kind):
    path = tmp_path / "clip.mp4"
    path.write_bytes(NOT_VIDEOS[kind])
    problem = video_container_problem(path)
    assert problem is not None
    assert str(path) in problem
    assert "not a recognised video container" in problem
    assert "MP4" in problem and "convert it" in problem
    assert video_file_problem(path) is None  # the cheap check does not read the bytes


def test_missing_empty_and_folder(tmp_path):
    missing = tmp_path / "nope.mp4"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    folder = tmp_path / "frames"
    folder.mkdir()
    for check in (video_file_problem, video_container_problem):
        assert f"{missing}: video file not found" in check(missing)
        assert "relative paths in a JSONL file are resolved against the file's folder" in check(missing)
        assert f"{empty}: the video is empty (0 bytes)" in check(empty)
        assert f"{folder}: is a folder" in check(folder)
        assert '"images"' in check(folder)  # frames as separate images is the accepted alternative
