"""``Choice``: the base of every string option in vlreason (templates, policies, modes)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A string Enum whose invalid values fail with the list of allowed ones."""

    @classmethod
    def _missing_(cls, value: object) -> Choice:
        allowed = ", ".join(member.value for member in cls)
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; choose one of: {allowed}")
