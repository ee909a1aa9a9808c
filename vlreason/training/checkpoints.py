"""Checkpoint folders of a stage: ``output_dir/checkpoint-<step>`` (resumable training state)
and ``output_dir/final`` (the model the next stage and ``vlreason eval`` load).

A checkpoint counts only once its marker, ``checkpoint.json``, exists: the marker is written
last (fsynced, then renamed into place), so a folder that a kill or a full disk interrupted is
never resumed from. GRPO writes a whole checkpoint into ``checkpoint-<step>.tmp`` and renames
it; SFT's ``Trainer`` writes in place and the marker follows its save. The marker also holds
the fingerprint of the training data, so resuming on different data fails with a message
instead of an index error or a silently different run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlreason.data.schema import Sample
from vlreason.training import TrainingStopped

logger = logging.getLogger(__name__)
MARKER = "checkpoint.json"
STAGE_RECORD = "stage.json"  # written when a stage finishes training, beside final/
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a stage, oldest first."""
    return [p for p in _numbered(out_dir) if (p / MARKER).is_file()]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None (logged) when there is none."""
    found = checkpoints(out_dir)
    if not found:
        logger.warning("resume: no checkpoint in %s; starting this stage from its beginning", out_dir)
        return None
    logger.info("resuming from %s", found[-1])
    return found[-1]


def checkpoint_step(path: Path | None) -> int | None:
    """The step a checkpoint folder was saved at (None for None)."""
    return int(_CHECKPOINT.match(path.name).group(1)) if path is not None else None


def refuse_training_checkpoint(path: str | Path) -> None:
    """Stop with a pointer to ``final/`` when ``path`` is a stage's checkpoint (training state for
    ``--resume``) rather than a model."""
    path = Path(path)
    if _CHECKPOINT.match(path.name) and path.is_dir():
        raise ValueError(f"{path} is a training checkpoint (the state --resume continues from), not a model to "
                         f"load; use the stage's final model: {path.parent / 'final'}")


def remove_incomplete(out_dir: str | Path) -> None:
    """Delete checkpoint folders without a marker and ``*.tmp`` leftovers: what a kill or a full
    disk interrupted. Only called while the run's lock is held, so nothing is writing them."""
    out = Path(out_dir)
    leftovers = [p for p in _numbered(out) if not (p / MARKER).is_file()]
    leftovers += [p for p in out.glob("*.tmp") if p.is_dir()] if out.is_dir() else []
    for path in leftovers:
        logger.warning("removing %s: an interrupted write (no %s)", path, MARKER)
        shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for old in checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def write_marker(folder: Path, info: dict[str, Any]) -> None:
    """Declare ``folder`` complete: ``info`` as JSON, written to a temporary file, fsynced and
    renamed to ``checkpoint.json``."""
    write_json_atomic(folder / MARKER, info)


def read_marker(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MARKER).read_text())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a kill leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def write_stage_record(out_dir: str | Path, steps: int, seconds: float) -> None:
    """Record that a stage finished training (``steps`` done, ``seconds`` of training)."""
    write_json_atomic(Path(out_dir) / STAGE_RECORD, {"steps": steps, "seconds": round(seconds, 3)})


def read_stage_record(out_dir: str | Path) -> dict[str, Any] | None:
    """What ``write_stage_record`` wrote, or None."""
    path = Path(out_dir) / STAGE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def data_fingerprint(samples: Sequence[Sample]) -> dict[str, Any]:
    """What identifies the training data a run's prompt order and steps refer to."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.id}\0{len(sample.messages)}\0{len(sample.images)}\n".encode())
    return {"samples": len(samples), "sha256": digest.hexdigest()[:16]}


def check_same_data(checkpoint: Path, samples: Sequence[Sample], data_path: str) -> None:
    """Stop before resuming on data that differs from the data the checkpoint was trained on."""
    saved = read_marker(checkpoint).get("data")
    now = data_fingerprint(samples)
    if saved is not None and saved != now:
        raise TrainingStopped(
            f"{checkpoint} was trained on other data ({saved['samples']} samples, fingerprint {saved['sha256']}) "
            f"than {data_path} holds now ({now['samples']} samples, fingerprint {now['sha256']}); resuming would "
            "not continue the same run. Restore the original data file (and data.max_samples), or start a new "
            "run (another output_dir, or --overwrite).")


def disk_full(exc: OSError, what: Path) -> TrainingStopped | None:
    """A clear error for a full disk while writing ``what`` (None for other OS errors)."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    free = shutil.disk_usage(what.parent if what.parent.exists() else Path.cwd()).free / 2**20
    return TrainingStopped(f"the disk is full: writing {what} failed ({free:.0f} MB free). Free some space, "
                           "then continue the run with --resume (it starts from the last complete checkpoint).")


def _numbered(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT.match(p.name)] if out.is_dir() else []
    return sorted(found, key=checkpoint_step)
