"""The output folder of a run: one writer at a time, and never a silent overwrite.

* ``RunLock``: an exclusive ``flock`` on ``output_dir/.vlreason.lock`` for the whole run; a
  second run into the same folder stops at once, naming the first one's process. The kernel
  releases the lock when the process ends, however it ends (kill -9 included).
* ``earlier_run_outputs`` finds what an earlier run left in a folder; a new run refuses such a
  folder unless told to ``--resume`` it or to ``--overwrite`` it.
* ``remove_run_outputs`` deletes exactly those outputs (checkpoints, logs, final models,
  reports) and nothing else a user may keep in the folder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import IO

from vlreason.config import ConfigError

LOCK_FILE = ".vlreason.lock"
PIPELINE_OUTPUTS = ("config.yaml", "pipeline.json")
STAGE_OUTPUTS = ("checkpoint-*", "final", "final.tmp", "metrics.jsonl", "rollouts.jsonl", "tensorboard",
                 "reward_curve.png", "eval.json", "eval.md", "metrics.png", "safety.png", "media", "stage.json",
                 "wandb")


class RunLock:
    """Exclusive use of ``folder`` by this process (a context manager; creates the folder)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.handle: IO[str] | None = None

    def __enter__(self) -> RunLock:
        ensure_writable_dir(self.folder, "output_dir")
        handle = (self.folder / LOCK_FILE).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"output_dir {self.folder}: another vlreason run is writing into it ({holder}); "
                              "wait for it to finish, or choose another output_dir") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def ensure_writable_dir(folder: Path, key: str) -> None:
    """Create ``folder`` if needed and check that files can be written into it.

    Raises:
        ConfigError: naming ``key`` and the reason (a file in the way, no permission, read-only).
    """
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key} {folder}: is a file, not a folder; choose another {key}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key} {folder}: cannot write there ({exc.strerror or exc}); choose a folder you can "
                          f"write to, e.g. {key}=runs/my_run") from None


def earlier_run_outputs(pipeline_dir: Path, stage_dirs: list[Path]) -> list[Path]:
    """What earlier runs left in the pipeline folder and the stage folders."""
    found = [pipeline_dir / name for name in PIPELINE_OUTPUTS if (pipeline_dir / name).exists()]
    return found + [path for folder in stage_dirs for path in stage_outputs(folder)]


def stage_outputs(folder: Path) -> list[Path]:
    """What a stage's training left in its folder."""
    return [path for pattern in STAGE_OUTPUTS for path in sorted(folder.glob(pattern))]


def remove_run_outputs(paths: list[Path]) -> None:
    """Delete what ``earlier_run_outputs`` found."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
