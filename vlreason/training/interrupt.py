"""Ctrl-C during training: finish the step, save a checkpoint, say how to continue.

The first SIGINT only raises a flag that the training loops check after every step; they then
save a checkpoint and raise ``TrainingInterrupted``, so ``--resume`` continues from that step.
A second Ctrl-C restores Python's default handling and stops at once (nothing saved since the
last checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlreason.training import TrainingStopped

logger = logging.getLogger(__name__)


class TrainingInterrupted(TrainingStopped):
    """Training stopped on Ctrl-C after saving ``checkpoint``."""

    def __init__(self, stage: str, step: int, checkpoint: Path):
        self.checkpoint = checkpoint
        super().__init__(f"interrupted: stage {stage} stopped after step {step}; checkpoint saved to {checkpoint}")


class InterruptFlag:
    """Set by the first Ctrl-C while ``catch_interrupt`` is active."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def catch_interrupt() -> Iterator[InterruptFlag]:
    """Turn the first SIGINT into a flag for the duration of the block (main thread only;
    elsewhere the flag is never set and Ctrl-C behaves as usual)."""
    flag = InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum: int, frame: object) -> None:
        flag.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        logger.warning("Ctrl-C: finishing this step and saving a checkpoint (press Ctrl-C again to stop now, "
                       "losing the steps since the last checkpoint)")

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
