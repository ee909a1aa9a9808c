"""What every converter of ``vlreason data convert`` shares: reading a source a record at a time,
a record's verdict (``Converted``), and media paths checked and made relative to the output.

JSON is read by ``JsonStream``: a buffer refilled ``chunk_chars`` at a time from which one value
is decoded at a time, so a list of a million records costs the memory of one record, and the
lists inside a top-level object (COCO's ``images`` and ``annotations``) can be walked item by
item as well (``object_lists``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TextIO

_SPACE = re.compile(r"\s*")


class RecordError(ValueError):
    """A source record that cannot be converted (the message says why)."""


@dataclass
class Converted:
    """One source record's verdict: its samples, or the problem that skipped it; ``dropped``
    counts parts of it left out as documented (crowd regions, boxes without area, ...)."""

    name: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Target:
    """Where converted samples are written (``out_dir``) and where the source's relative media
    paths start (``image_root``)."""

    image_root: Path
    out_dir: Path

    def media(self, paths: list[str], kind: str = "image") -> list[str]:
        """``paths`` (against ``image_root``), each checked to exist, relative to ``out_dir``.

        Raises:
            RecordError: a file does not exist.
        """
        resolved = [os.path.join(self.image_root, path) for path in paths]
        missing = [path for path in resolved if not os.path.isfile(path)]
        if missing:
            raise RecordError(f"{kind} not found: {missing[0]} (set --image-root, or a config source's image_root, "
                              "to the folder the paths start from)")
        return [os.path.relpath(os.path.abspath(path), self._out) for path in resolved]

    @cached_property
    def _out(self) -> str:
        return os.path.abspath(self.out_dir)


def read_records(src: Path, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """The records of a JSON list, of a ``{"data": [...]}`` object, or of JSON Lines, one at a time
    (memory stays bounded by the largest record, not the file).

    Raises:
        ValueError: the file is none of those (with the line of a JSON Lines error or the
            character where the JSON broke).
    """
    with src.open() as handle:
        head = handle.read(chunk_chars)
        handle.seek(0)
        start = head.lstrip()[:1]
        if start == "[":
            yield from JsonStream(src, handle, chunk_chars).items()
        elif start == "{" and re.match(r'\s*\{\s*"data"\s*:\s*\[', head):
            yield from (item for _, item in object_lists(src, ("data",), chunk_chars=chunk_chars, handle=handle))
        else:
            yield from _json_lines(src, handle)


def object_lists(src: Path, keys: tuple[str, ...], kind: str = "JSON object", chunk_chars: int = 1 << 20,
                 handle: TextIO | None = None) -> Iterator[tuple[str, Any]]:
    """``(key, item)`` for each item of the lists under ``keys`` in a file holding one JSON object
    (a ``kind``, for messages), in file order, one item in memory at a time; other keys' values
    are decoded and dropped.

    Raises:
        ValueError: the file is not one JSON object, or a value under ``keys`` is not a list.
    """
    with handle or src.open() as opened:
        stream = JsonStream(src, opened, chunk_chars)
        if stream.peek() != "{":
            raise ValueError(f"{src}: not a {kind} (one JSON object {{...}})")
        for _ in stream.entries("{", "}"):
            key = stream.value()
            stream.expect(":")
            if key not in keys:
                stream.value()
            elif stream.peek() != "[":
                raise ValueError(f"{src}: {key!r} is not a list")
            else:
                yield from ((key, item) for item in stream.items())


class JsonStream:
    """JSON values decoded one at a time from a text handle read ``chunk_chars`` at a time.

    ``buffer[pos:]`` is what is read and not yet consumed; the consumed prefix is dropped only
    when more is read, so consuming an item costs its own length, not the buffer's."""

    def __init__(self, src: Path, handle: TextIO, chunk_chars: int):
        self.src, self.handle, self.chunk_chars = src, handle, chunk_chars
        self.buffer, self.pos, self.dropped = "", 0, 0  # dropped: characters discarded before buffer
        self.decoder = json.JSONDecoder()

    def peek(self) -> str:
        """The next character that is not white space ('' at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer) or not self._refill():
                return self.buffer[self.pos:self.pos + 1]

    def expect(self, char: str) -> None:
        """Consume ``char``, the next character that is not white space."""
        if self.peek() != char:
            raise self._broken(f"expected {char!r}", self.pos)
        self.pos += 1

    def items(self) -> Iterator[Any]:
        """The items of the list that starts here, one at a time."""
        for _ in self.entries("[", "]"):
            yield self.value()

    def entries(self, opener: str, closer: str) -> Iterator[None]:
        """Step through the list or object that starts here: once per entry, with the stream at
        the entry for the caller to read (the commas between entries checked and consumed)."""
        self.expect(opener)
        first = True
        while self.peek() != closer:
            if not first:
                self.expect(",")
            first = False
            yield
        self.pos += 1

    def value(self) -> Any:
        """The next whole JSON value."""
        self.peek()
        while True:
            try:
                item, end = self.decoder.raw_decode(self.buffer, self.pos)
                if end < len(self.buffer) or not self._refill():  # a number cut at the end also decodes
                    self.pos = end
                    return item
            except json.JSONDecodeError as exc:
                broken = self._broken(exc.msg, exc.pos)
                if not self._refill():
                    raise broken from None

    def _refill(self) -> bool:
        more = self.handle.read(self.chunk_chars)
        self.dropped += self.pos
        self.buffer, self.pos = self.buffer[self.pos:] + more, 0
        return bool(more)

    def _broken(self, why: str, at: int) -> ValueError:
        return ValueError(f"{self.src}: the JSON breaks near character {self.dropped + at} ({why})")


def _json_lines(src: Path, handle: TextIO) -> Iterator[Any]:
    for number, line in enumerate(handle, start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{src}:{number}: not JSON ({exc.msg}); give a JSON list of records or one "
                                 "JSON object per line") from None
