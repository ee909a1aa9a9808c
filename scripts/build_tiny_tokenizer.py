"""Build the tiny byte-level BPE tokenizer committed under vlreason/assets/tiny_tokenizer/.

Tests and the quickstart cannot download a real Qwen tokenizer, so the tiny models use this
one. It keeps what matters for the code paths under test:

* the Qwen chat and vision special tokens (``<|im_start|>``, ``<|vision_start|>``,
  ``<|image_pad|>``, ...), each a single token, so prompts render and tokenize like Qwen's;
* tool and reasoning tags (``<tool_call>``, ``<think>``, ``<answer>``, ...) as single tokens;
* digits split one per token (Qwen's pre-tokenizer does the same), so box coordinates and counts
  are short, regular sequences a tiny model can learn.

Run once (the output is committed; rerun only to change the vocabulary)::

    python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

OUT_DIR = Path(__file__).resolve().parents[1] / "vlreason" / "assets" / "tiny_tokenizer"
VOCAB_SIZE = 1024

# Special tokens, in Qwen's order. Vision tokens are "special" (skipped when decoding).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Tags that appear in model text: single tokens, but kept when decoding.
TEXT_TAGS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
]
# GPT-style split with single digits, the shape of Qwen's pre-tokenizer.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

WORDS = (
    "the a an is are there where what which how many of in on at to and or with image picture photo "
    "video frame object objects shape shapes box boxes bounding coordinates answer question red "
    "green blue yellow purple orange black white gray brown pink cyan circle square triangle "
    "rectangle star left right top bottom upper lower middle center corner near far above below "
    "count number total first second third I see look find locate detect output format reasoning "
    "think step because so therefore it its this that one two three four five six seven eight nine "
    "zero yes no not none label class category person car dog cat bird tree house safe unsafe "
    "request help cannot sorry refuse tool call crop zoom region select time seconds user assistant "
    "system you helpful"
).split()


def training_corpus(n_lines: int = 20000, seed: int = 0) -> list[str]:
    """Sentences shaped like vlreason prompts and answers (boxes, JSON, tags, numbers)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        box = [rng.randint(0, 999) for _ in range(4)]
        kind = rng.randrange(5)
        if kind == 0:
            lines.append(f"<think>{words.capitalize()}.</think><answer>{box}</answer>")
        elif kind == 1:
            lines.append(f'[{{"bbox_2d": {box}, "label": "{rng.choice(WORDS)} {rng.choice(WORDS)}"}}]')
        elif kind == 2:
            lines.append(f"{words.capitalize()}? Answer: {rng.randint(0, 20)}.")
        elif kind == 3:
            lines.append(f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{words}")
        else:
            lines.append(f'<tool_call>\n{{"name": "crop", "arguments": {{"bbox_2d": {box}}}}}\n</tool_call>')
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the BPE model and wrap it as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    tok.add_tokens(TEXT_TAGS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )


def main() -> None:
    tokenizer = build_tokenizer()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(OUT_DIR)
    print(f"wrote {OUT_DIR} ({len(tokenizer)} tokens)")


if __name__ == "__main__":
    main()
