"""Answer rewards: ``classification`` (CLS-RL), ``numeric`` (Reason-RFT) and ``choice``.

Each compares the parsed answer (``pred_answer``: the ``<answer>`` content, or a bare answer)
with a ground-truth column. A sample without that ground truth scores None, so these rewards
can share a batch with rewards for other sample types (mixed-reward recipes).
"""

from __future__ import annotations

import math
import re
import string

from vlreason.choices import Choice
from vlreason.rewards.api import Reward, Score, register_reward

_EDGE_PUNCTUATION = "\"'`.,;:!?()[]{} "
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_NUMBER_WORDS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_LEADING_LETTER = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.:)])")  # "(B) ...", "B. ...", "B: ...", "B) ..."


def normalise(text: str) -> str:
    """Case-folded, single-spaced, without surrounding quotes or punctuation."""
    return " ".join(text.split()).strip(_EDGE_PUNCTUATION).casefold()


class ClassMatch(Choice):
    EXACT = "exact"  # the answer is the class name
    CONTAINS = "contains"  # the class name appears in the answer as whole words


@register_reward("classification")
class ClassificationReward(Reward):
    """Class-name match between the answer and ``label`` (case- and whitespace-insensitive).

    Args:
        synonyms: ``{class name: [other names]}``; an answer naming a synonym counts as the class.
        match: ``exact`` (default) or ``contains`` (the class name appears as whole words).
        separator: splits a multi-label answer; a list-valued ``label`` is scored by F1 between
            the sets of named classes.
    """

    inputs = ("pred_answer", "label")

    def __init__(self, synonyms: dict[str, list[str]] | None = None, match: ClassMatch | str = ClassMatch.EXACT,
                 separator: str = ","):
        super().__init__()
        self.canonical = {normalise(alias): normalise(name)
                          for name, aliases in (synonyms or {}).items() for alias in [name, *aliases]}
        self.match = ClassMatch(match)
        self.separator = separator

    def _name(self, text: str) -> str:
        key = normalise(text)
        return self.canonical.get(key, key)

    def score(self, pred_answer: str | None, label: str | list[str] | None) -> Score:
        if label is None:
            return None
        if pred_answer is None:
            return 0.0
        if isinstance(label, list):
            return self._f1(pred_answer, {self._name(lbl) for lbl in label})
        if self.match is ClassMatch.EXACT:
            return float(self._name(pred_answer) == self._name(label))
        aliases = {a for a, name in self.canonical.items() if name == self._name(label)} | {self._name(label)}
        answer = normalise(pred_answer)
        return float(any(re.search(rf"(?<!\w){re.escape(alias)}(?!\w)", answer) for alias in aliases))

    def _f1(self, pred_answer: str, truth: set[str]) -> float:
        predicted = {self._name(part) for part in pred_answer.split(self.separator) if normalise(part)}
        hits = len(predicted & truth)
        if not hits:
            return 0.0
        precision, recall = hits / len(predicted), hits / len(truth)
        return 2 * precision * recall / (precision + recall)


def parse_number(text: str | None) -> float | None:
    """The number an answer states: the whole answer if it is a number (digits or a word up to
    twenty), else the last number in it. Thousands separators are understood."""
    if text is None:
        return None
    if normalise(text) in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[normalise(text)])
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        value = float(found[-1].replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class NumericMode(Choice):
    EXACT = "exact"  # counting: the number must be right
    RAMP = "ramp"  # Reason-RFT tolerance ramp


@register_reward("numeric")
class NumericReward(Reward):
    """Numeric answer accuracy.

    Args:
        column: the ground-truth column (default ``answer``; e.g. ``count``).
        mode: ``exact`` (default, for counting) or ``ramp``: with d = |pred - gt|, 1 if
            d < low*|gt|, 0 if d > high*|gt|, else 0.5 * (cos(pi * (d - low|gt|) / ((high - low)|gt|)) + 1)
            (Reason-RFT; low = 0.05, high = 0.20). For gt = 0 the ramp needs an exact answer.

    None for samples whose ground truth is missing or not a number.
    """

    def __init__(self, column: str = "answer", mode: NumericMode | str = NumericMode.EXACT,
                 low: float = 0.05, high: float = 0.20):
        super().__init__()
        if not 0 <= low < high:
            raise ValueError(f"need 0 <= low < high, got low={low}, high={high}")
        self.inputs = ("pred_answer", column)
        self.mode = NumericMode(mode)
        self.low, self.high = low, high

    def score(self, pred_answer: str | None, truth: str | int | float | None) -> Score:
        gt = parse_number(str(truth)) if truth is not None else None
        if gt is None:
            return None
        pred = parse_number(pred_answer)
        if pred is None:
            return 0.0
        d = abs(pred - gt)
        if self.mode is NumericMode.EXACT or gt == 0:
            return float(math.isclose(pred, gt, rel_tol=1e-9, abs_tol=1e-12))
        low, high = self.low * abs(gt), self.high * abs(gt)
        if d < low:
            return 1.0
        if d > high:
            return 0.0
        return 0.5 * (math.cos(math.pi * (d - low) / (high - low)) + 1)


def choice_index(text: str | None, choices: list[str]) -> int | None:
    """Which option an answer picks: an option letter ("B", "(B)", "B. text") or the option's text."""
    if text is None:
        return None
    options = [normalise(c) for c in choices]
    if normalise(text) in options:
        return options.index(normalise(text))
    letters = string.ascii_uppercase[: len(choices)]
    bare = text.strip().strip("()").strip()
    if len(bare) == 1 and bare.upper() in letters:
        return letters.index(bare.upper())
    match = _LEADING_LETTER.match(text.strip())  # capitals with a delimiter: "A big cat" is not A
    letter = match and (match.group(1) or match.group(2))
    if letter and letter in letters:
        return letters.index(letter)
    return None


@register_reward("choice")
class ChoiceReward(Reward):
    """Multiple-choice accuracy: 1 when the answer picks the same option as ``answer``.

    Options may be named by letter (``B``, ``(B)``, ``B. ...``) or by their text. None for
    samples without ``choices``.
    """

    inputs = ("pred_answer", "answer", "choices")

    def score(self, pred_answer: str | None, answer: str | None, choices: list[str] | None) -> Score:
        if answer is None or not choices:
            return None
        truth = choice_index(answer, choices)
        if truth is None:
            return None
        return float(choice_index(pred_answer, choices) == truth)
