"""Checkpoint folders of a stage: ``output_dir/checkpoint-<step>`` (resumable training state)
and ``output_dir/final`` (the model the next stage and ``vlreason eval`` load)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a stage, oldest first (``*.tmp`` leftovers are ignored)."""
    out = Path(out_dir)
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT.match(p.name)] if out.is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint to resume from, or None (logged) when there is none."""
    found = checkpoints(out_dir)
    if not found:
        logger.warning("resume: no checkpoint in %s; starting this stage from its beginning", out_dir)
        return None
    logger.info("resuming from %s", found[-1])
    return found[-1]


def checkpoint_step(path: Path | None) -> int | None:
    """The step a checkpoint folder was saved at (None for None)."""
    return int(_CHECKPOINT.match(path.name).group(1)) if path is not None else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
