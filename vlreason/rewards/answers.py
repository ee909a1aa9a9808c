"""Answer rewards: ``classification`` (CLS-RL), ``numeric`` (Reason-RFT) and ``choice``.

Each compares the parsed answer (``pred_answer``: the ``<answer>`` content, or a bare answer)
with a ground-truth column. A sample without that ground truth scores None, so these rewards
can share a batch with rewards for other sample types (mixed-reward recipes).
"""

from __future__ import annotations

import math
import re
import string
from typing import Any

from vlreason.choices import Choice
from vlreason.rewards.api import Reward, Score, register_reward

_EDGE_PUNCTUATION = "\"'`.,;:!?()[]{}* "
_EXPONENT = r"(?:[eE][-+]?\d+)?"  # "1e3", "2.5E-3": scientific notation is one number
_NUMBER = re.compile(rf"[-+]?(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?{_EXPONENT}|[-+]?\.\d+{_EXPONENT}")
_NUMBER_WORDS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_LEADING_LETTER = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.:)])")  # "(B) ...", "B. ...", "B: ...", "B) ..."
# "answer is B", "Answer: (B)", "the correct option is **C**", "choice D": the keyword in any case,
# the letter a capital standing alone. One character class runs from the keyword to the letter,
# so a long run of spaces costs linear time, not the cubic of several adjacent \s*.
_NAMED_LETTER = re.compile(
    r"(?i:\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be)\b)?)[\s:=(\[*\"']*([A-Z])(?![\w'])")
_PARENTHESISED_LETTER = re.compile(r"\(([A-Z])\)")
# a capital letter standing alone, with what starts its sentence when it opens one (so "I" and a
# sentence's first "A" before a lower-case word can be read as the pronoun and the article)
_LONE_LETTER = re.compile(r"(?:(?P<opens>^|[.!?:]\s+)|(?<![\w']))(?P<letter>[A-Z])(?![\w'])")
_BEFORE_WORD = re.compile(r"\s+[a-z]")


def normalise(text: str) -> str:
    """Case-folded, single-spaced, without surrounding quotes or punctuation."""
    return " ".join(text.split()).strip(_EDGE_PUNCTUATION).casefold()


def class_name(text: str) -> str:
    """A class name as every reward compares it: ``normalise``d with underscores read as spaces
    ("Hot_Dog." and "hot dog" are one class; Visual-RFT's classification reward also ignores
    underscores)."""
    return normalise(text.replace("_", " "))


class ClassMatch(Choice):
    EXACT = "exact"  # the answer is the class name
    CONTAINS = "contains"  # the class name appears in the answer as whole words


@register_reward("classification")
class ClassificationReward(Reward):
    """Class-name match between the answer and ``label`` (``class_name``: case, spacing,
    underscores and edge punctuation aside).

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
        self.canonical = {class_name(alias): class_name(name)
                          for name, aliases in (synonyms or {}).items() for alias in [name, *aliases]}
        self.match = ClassMatch(match)
        self.separator = separator

    def _name(self, text: str) -> str:
        key = class_name(text)
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
        answer = class_name(pred_answer)
        return float(any(re.search(rf"(?<!\w){re.escape(alias)}(?!\w)", answer) for alias in aliases))

    def _f1(self, pred_answer: str, truth: set[str]) -> float:
        predicted = {self._name(part) for part in pred_answer.split(self.separator) if class_name(part)}
        hits = len(predicted & truth)
        if not hits:
            return 0.0
        precision, recall = hits / len(predicted), hits / len(truth)
        return 2 * precision * recall / (precision + recall)


def parse_number(text: str | None) -> float | None:
    """The number an answer states: the whole answer if it is a number (digits or a word up to
    twenty), else the last number in it. Thousands separators ("12,500") and scientific
    notation ("1e3", "2.5E-3") are understood."""
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
    """Which option an answer picks, or None when it names none or several.

    Read in this order, the first that names exactly one option within range winning:

    1. the whole answer is an option's text ("a red circle"), case and edge punctuation aside;
    2. the whole answer is a letter, in either case and with edge punctuation or markdown
       ("B", "(b)", "**B**.");
    3. a keyword names a capital letter ("The answer is B.", "Answer: (B)", "Option B",
       "the correct choice is **C**"); the last such mention counts;
    4. the answer starts with a letter and a delimiter ("B. text", "(B) text", "B: text", "B) text");
    5. capitals in parentheses ("... so (C)");
    6. capitals standing alone ("I think B"), except "I" before a lower-case word (the pronoun)
       and a sentence's first "A" before one (the article: "A cat sits");
    7. an option's text inside the answer, as whole words ("it is the red circle" for
       "red circle"); an option whose text lies inside another found option's text yields to it.

    Lower-case letters inside sentences never count ("a red triangle" is not option A).
    """
    if text is None:
        return None
    letters = string.ascii_uppercase[: len(choices)]
    options = [normalise(c) for c in choices]
    if normalise(text) in options:
        return options.index(normalise(text))
    bare = normalise(text).upper()
    if len(bare) == 1:
        return letters.index(bare) if bare in letters else None
    text = text.strip()
    leading = _LEADING_LETTER.match(text)
    named = [m.group(1) for m in _NAMED_LETTER.finditer(text) if m.group(1) in letters]
    for found in (named[-1:],
                  [leading.group(1) or leading.group(2)] if leading else [],
                  {m.group(1) for m in _PARENTHESISED_LETTER.finditer(text)},
                  set(_lone_letters(text))):
        candidates = {letter for letter in found if letter in letters}
        if len(candidates) == 1:
            return letters.index(candidates.pop())
        if candidates:
            return None
    return _option_named(normalise(text), options)


def _lone_letters(text: str) -> list[str]:
    """Capital letters standing alone in ``text``, without the pronoun "I" and a sentence's
    first article "A" (each followed by a lower-case word: "I think", "A cat")."""
    letters = []
    for match in _LONE_LETTER.finditer(text):
        letter = match.group("letter")
        before_word = _BEFORE_WORD.match(text, match.end()) is not None
        if before_word and (letter == "I" or (letter == "A" and match.group("opens") is not None)):
            continue
        letters.append(letter)
    return letters


def _option_named(answer: str, options: list[str]) -> int | None:
    """The one option whose text appears in the normalised ``answer`` as whole words (options
    found only inside a longer found option's text do not count), or None."""
    found = [i for i, option in enumerate(options)
             if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", answer)]
    longest = [i for i in found if not any(options[i] != options[j] and options[i] in options[j] for j in found)]
    return longest[0] if len(longest) == 1 else None


@register_reward("choice")
class ChoiceReward(Reward):
    """Multiple-choice accuracy: 1 when the answer picks the same option as ``answer``.

    Options may be named by letter ("B", "(B)", "B. ...", "The answer is B", "Option B") or by
    their text; ``choice_index`` gives the rules. An answer naming several options scores 0.
    None for samples without ``choices``.
    """

    inputs = ("pred_answer", "answer", "choices")

    def score(self, pred_answer: str | None, answer: str | None, choices: list[str] | None) -> Score:
        if answer is None or not choices:
            return None
        truth = choice_index(answer, choices)
        if truth is None:
            return None
        return float(choice_index(pred_answer, choices) == truth)


_DEFAULT_JUDGES = (ClassificationReward(), ChoiceReward(), NumericReward())


def answer_correct(pred_answer: str | None, answer: str | None, label: Any, choices: list[str] | None
                   ) -> bool | None:
    """Whether ``pred_answer`` is right by a sample's ground truth, judged with the default
    options: ``label`` as ``classification`` does, ``choices`` as ``choice`` does, else a numeric
    ``answer`` as ``numeric`` does, else the same text (case and spacing aside). None: the sample
    has no ground truth. Rewards that pay only for correct answers (``tool_use``,
    ``semantic_consistency``) judge with this."""
    classification, choice, numeric = _DEFAULT_JUDGES
    if label is not None:
        return classification.score(pred_answer, label) == 1.0
    if choices:
        return choice.score(pred_answer, answer, choices) == 1.0
    if answer is None:
        return None
    if parse_number(answer) is not None:
        return numeric.score(pred_answer, answer) == 1.0
    return pred_answer is not None and normalise(pred_answer) == normalise(answer)
