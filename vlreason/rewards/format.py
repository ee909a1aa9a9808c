"""``format``: 1 when a completion follows the answer template, else 0."""

from __future__ import annotations

import re

from vlreason.choices import Choice
from vlreason.rewards.api import Reward, Score, register_reward


class FormatTemplate(Choice):
    THINK_ANSWER = "think_answer"  # <think>reasoning</think><answer>answer</answer>, both non-blank
    ANSWER = "answer"  # <answer>answer</answer> alone: the no-thinking variant (No-Thinking-CLS-RL)
    OPTIONAL_THINK = "optional_think"  # TON: a think block that may be empty, or none, then the answer


_THINK = r"<think>(?P<think>.*?)</think>\s*"
_ANSWER = r"<answer>(?P<answer>.*?)</answer>\s*"
_TEMPLATES = {
    FormatTemplate.THINK_ANSWER: re.compile(rf"\s*{_THINK}{_ANSWER}", re.S),
    FormatTemplate.ANSWER: re.compile(rf"\s*{_ANSWER}", re.S),
    FormatTemplate.OPTIONAL_THINK: re.compile(rf"\s*(?:{_THINK})?{_ANSWER}", re.S),
}
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@register_reward("format")
class FormatReward(Reward):
    """1.0 if the completion matches the template, else 0.0.

    Args:
        template: ``think_answer`` (default; reasoning must not be blank), ``answer`` (no
            thinking) or ``optional_think`` (TON: an empty ``<think></think>`` or none at all).
        pattern: a custom regular expression the whole completion must match instead.
        outer_whitespace: accept whitespace before the first tag and after the last (default;
            chat templates and tokenizers often leave a newline there). False rejects it, as the
            ``re.fullmatch`` of Visual-RFT's, Reason-RFT's and CLS-RL's format rewards does.

    With a template, each tag may appear once and the answer must not be blank; whitespace
    between the blocks is always accepted. ``pattern`` decides whitespace itself.
    """

    inputs = ("completions",)

    def __init__(self, template: FormatTemplate | str = FormatTemplate.THINK_ANSWER, pattern: str | None = None,
                 outer_whitespace: bool = True):
        super().__init__()
        self.template = FormatTemplate(template)
        self.pattern = re.compile(pattern, re.S) if pattern else None
        self.outer_whitespace = outer_whitespace

    def score(self, text: str) -> Score:
        if self.pattern is not None:
            return float(self.pattern.fullmatch(text) is not None)
        if any(text.count(tag) > 1 for tag in _TAGS):  # first: it also keeps the regex linear
            return 0.0
        if not self.outer_whitespace and text != text.strip():
            return 0.0
        match = _TEMPLATES[self.template].fullmatch(text)
        if match is None or not match.group("answer").strip():
            return 0.0
        think = match.groupdict().get("think")
        blank_think = self.template is FormatTemplate.THINK_ANSWER and not (think or "").strip()
        return 0.0 if blank_think else 1.0
