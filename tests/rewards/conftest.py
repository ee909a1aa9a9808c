"""Shared fixtures for the reward-layer tests."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import pytest

from vlreason.rewards.api import REWARDS


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The global reward registry, restored after the test (whatever the test registers)."""
    monkeypatch.setattr(REWARDS, "_entries", dict(REWARDS._entries))
    return REWARDS


@pytest.fixture
def finishes() -> Callable[..., None]:
    """Run ``fn(*args)`` in a forked child and fail if it has not returned after ``timeout`` s.

    This is a hang guard, not a speed assertion: the inputs given to it take milliseconds for a
    linear-time implementation and minutes for a quadratic one, and the bound is far above the
    former. Running in a child keeps a hanging implementation from stalling the whole suite.
    Assertions made inside ``fn`` count: a failing one gives a non-zero exit code.
    """

    def run(fn: Callable[..., Any], *args: Any, timeout: float = 5.0) -> None:
        process = multiprocessing.get_context("fork").Process(target=fn, args=args)
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish within {timeout:g} s "
                        "(a linear-time implementation needs well under a second): super-linear behaviour")
        assert process.exitcode == 0, f"{getattr(fn, '__name__', fn)} failed in the child (exit {process.exitcode})"

    return run
