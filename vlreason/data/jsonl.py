"""Read and check JSONL data files, reporting every problem as ``file:line: field: problem``.

``read_jsonl`` validates each line (structure, ground truth, that each image exists and its
header gives a size, that boxes fit inside it, that each video exists and is not empty) and
refuses a file that yields no sample. ``check_jsonl`` also decodes every image fully and checks
each video's container, so truncated or mislabelled files are caught before training rather than
at step 500.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from vlreason.choices import Choice
from vlreason.data.schema import GROUND_TRUTH_FIELDS, Sample, SizeReader, VideoCheck, parse_sample
from vlreason.vision.images import load_image, read_image_size
from vlreason.vision.video import video_decode_problem, video_file_problem

logger = logging.getLogger(__name__)
MAX_LOGGED_SKIPS = 10
NO_SAMPLES = "no samples: the file is empty or holds only blank lines; write one JSON object (a sample) per line"


class OnBadSample(Choice):
    """What to do with a line that fails validation."""

    ERROR = "error"  # stop and list every problem in the file
    SKIP = "skip"  # drop the line, count it and log it


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with one line of a data file."""

    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


class DataError(ValueError):
    """A data file has problems; ``problems`` lists all of them."""

    def __init__(self, problems: list[DataProblem], limit: int = 20):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{len(problems)} problem(s) in the data; run `vlreason data check FILE` for all of "
                         f"them, fix the lines or set data.on_bad_sample=skip:\n{shown}{more}")


@dataclass
class DataFile:
    """The valid samples of a file and the problems of the lines that were skipped."""

    path: Path
    samples: list[Sample]
    skipped: list[DataProblem] = field(default_factory=list)

    @property
    def columns(self) -> set[str]:
        """Column names present in at least one sample (ground truth and extras)."""
        names = {"id"}
        for sample in self.samples:
            names.update(n for n in GROUND_TRUTH_FIELDS if getattr(sample, n) is not None)
            names.update(sample.extra)
        return names

    @property
    def video_sources(self) -> list[str]:
        """``file:line`` of each sample with videos, for stages that cannot train on video to name them."""
        return [sample.source for sample in self.samples if sample.videos]


def read_jsonl(path: str | Path, on_bad_sample: OnBadSample | str = OnBadSample.ERROR) -> DataFile:
    """Read and validate a JSONL data file.

    Raises:
        DataError: listing every problem, when ``on_bad_sample`` is ``error`` and any line is bad.
        ValueError: the file yields no sample (it is empty, or every line was skipped).
        FileNotFoundError: the file does not exist.
    """
    policy = OnBadSample(on_bad_sample)
    samples, problems = _scan(Path(path), read_image_size, video_file_problem)  # ImageLoadError is a ValueError
    if problems and policy is OnBadSample.ERROR:
        raise DataError(problems)
    if problems:
        _log_skips(Path(path), problems, len(samples))
    if not samples:
        raise ValueError(_no_samples_message(Path(path), problems))
    return DataFile(path=Path(path), samples=samples, skipped=problems)


def check_jsonl(path: str | Path) -> tuple[int, list[DataProblem]]:
    """Validate every line, fully decode every image and decode the frames each video gives
    (``video_decode_problem``; its container alone without a decoder installed).

    Returns:
        The number of valid samples and the list of all problems found (a file without any
        sample has neither; report it with ``NO_SAMPLES``).
    """
    samples, problems = _scan(Path(path), lambda image: load_image(image).size, video_decode_problem)
    return len(samples), problems


def _no_samples_message(path: Path, skipped: list[DataProblem]) -> str:
    if not skipped:
        return f"{path}: {NO_SAMPLES}"
    lines = len({p.line for p in skipped})
    return (f"{path}: no valid samples: all {lines} non-blank line(s) have problems and were skipped; "
            f"run `vlreason data check {path}` to list them")


def _scan(path: Path, sizes: SizeReader, video_problem: VideoCheck) -> tuple[list[Sample], list[DataProblem]]:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    samples: list[Sample] = []
    problems: list[DataProblem] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # blank line
            record, error = _decode_line(raw)
            if error:
                problems.append(DataProblem(str(path), number, "line", error))
                continue
            sample, found = parse_sample(record, path.parent, f"{path}:{number}", sizes, video_problem)
            problems.extend(DataProblem(str(path), number, name, message) for name, message in found)
            if sample is not None:
                samples.append(sample)
    return samples, problems


def _decode_line(raw: bytes) -> tuple[object, str | None]:
    """The decoded JSON value of a non-blank line, or an error message."""
    try:
        text = raw.decode("utf-8-sig").rstrip("\r\n")  # tolerates a byte-order mark on the first line
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON: {exc.msg} at column {exc.colno}"


def _log_skips(path: Path, problems: list[DataProblem], kept: int) -> None:
    for problem in problems[:MAX_LOGGED_SKIPS]:
        logger.warning("skipped: %s", problem)
    lines = len({p.line for p in problems})
    logger.warning("%s: skipped %d bad line(s) (%d problems), kept %d samples", path, lines, len(problems), kept)
