"""Helpers for writing data files: small images and JSONL lines (dicts, raw text or raw bytes)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from PIL import Image


def png_bytes(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def make_png(tmp_path) -> Callable[..., Path]:
    """``make_png(relative_path, size=(w, h))`` writes a solid PNG under tmp_path and returns its path."""

    def make(name: str, size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(size, colour))
        return path

    return make


@pytest.fixture
def write_jsonl(tmp_path) -> Callable[..., Path]:
    """``write_jsonl(lines, name)``: a dict is written as JSON, a str as text, bytes unchanged; one per line."""

    def write(lines: Sequence[dict | str | bytes], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = b"".join(
            (line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
            + b"\n"
            for line in lines
        )
        path.write_bytes(raw)
        return path

    return write
