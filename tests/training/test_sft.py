"""SFT building blocks: assistant-only labels, and the collator (box conversion, thought dropout,
replacing samples whose image went missing). No Trainer runs here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlreason.config import load_config
from vlreason.data import read_jsonl
from vlreason.data.schema import Sample
from vlreason.data.synth import synthesize
from vlreason.models import TINY_PRESETS
from vlreason.models.adapters import BoxConvention
from vlreason.models.vlm import build_tiny_vlm, load_vlm
from vlreason.training import TrainingStopped
from vlreason.training.sft import (
    EMPTY_THINK,
    IGNORE_INDEX,
    SFTCollator,
    assistant_labels,
    empty_thoughts,
    run_sft,
)

# ---- assistant_labels on hand-built ids -------------------------------------------------------------

IM_START, IM_END, PAD, NL = 1, 2, 0, 9
SYSTEM, USER, ASSISTANT, TOOL = 20, 21, 22, 23
HEADER = [ASSISTANT, NL]
M = IGNORE_INDEX


def turn(role: int, content: list[int], end: bool = True) -> list[int]:
    return [IM_START, role, NL, *content] + ([IM_END, NL] if end else [])


def labels_of(*rows: list[int]) -> list[list[int]]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])  # left padding
    return assistant_labels(ids, IM_START, HEADER, IM_END).tolist()


def masked(n: int) -> list[int]:
    return [M] * n


def test_labels_keep_assistant_content_and_im_end_only():
    system, user = turn(SYSTEM, [40, 41]), turn(USER, [50, 51, 52])
    reply = turn(ASSISTANT, [60, 61, 62])
    (labels,) = labels_of(system + user + reply)
    expected = masked(len(system) + len(user)) + masked(3) + [60, 61, 62, IM_END] + [M]
    assert labels == expected


def test_labels_multiple_assistant_turns_and_tool_turn():
    ids = (turn(USER, [50]) + turn(ASSISTANT, [60, 61]) + turn(TOOL, [70, 71, 72])
           + turn(USER, [51]) + turn(ASSISTANT, [62]))
    (labels,) = labels_of(ids)
    expected = (masked(6) + masked(3) + [60, 61, IM_END, M] + masked(8) + masked(6)
                + masked(3) + [62, IM_END, M])
    assert labels == expected
    kept = [t for t in labels if t != M]
    assert kept == [60, 61, IM_END, 62, IM_END]


def test_labels_left_padding_masked_and_rows_independent():
    long_row = turn(USER, [50, 51, 52, 53]) + turn(ASSISTANT, [60])
    short_row = turn(USER, [50]) + turn(ASSISTANT, [61, 62])
    labels = labels_of(long_row, short_row)
    pad = len(long_row) - len(short_row)
    assert pad > 0
    assert labels[1][:pad] == masked(pad)
    assert [t for t in labels[0] if t != M] == [60, IM_END]
    assert [t for t in labels[1] if t != M] == [61, 62, IM_END]


def test_labels_unterminated_turn_trains_on_what_is_there():
    (labels,) = labels_of(turn(USER, [50]) + turn(ASSISTANT, [60, 61], end=False))
    assert labels == masked(6) + masked(3) + [60, 61]


def test_labels_empty_assistant_turn_keeps_im_end():
    (labels,) = labels_of(turn(USER, [50]) + turn(ASSISTANT, []))
    assert [t for t in labels if t != M] == [IM_END]


def test_labels_assistant_word_in_user_text_is_not_a_turn():
    """The header only counts right after <|im_start|>."""
    (labels,) = labels_of(turn(USER, [ASSISTANT, NL, 50]) + turn(ASSISTANT, [60]))
    assert [t for t in labels if t != M] == [60, IM_END]


def test_labels_without_assistant_turn_raise():
    with pytest.raises(ValueError, match="no assistant tokens"):
        labels_of(turn(SYSTEM, [40]) + turn(USER, [50]))


def test_labels_row_without_assistant_is_all_masked_when_another_row_has_one():
    labels = labels_of(turn(USER, [50]), turn(USER, [50]) + turn(ASSISTANT, [60]))
    assert set(labels[0]) == {M}
    assert [t for t in labels[1] if t != M] == [60, IM_END]


# ---- SFTCollator on a tiny model ---------------------------------------------------------------------

IMAGE_SIZE = 100  # not a multiple of the patch factor: the model input is resized, so boxes must be converted
_BOX = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")


@pytest.fixture(scope="module", params=list(TINY_PRESETS))
def vlm(request):
    return build_tiny_vlm(request.param, seed=0)


@pytest.fixture(scope="module")
def qwen25():
    return build_tiny_vlm("tiny-qwen2.5-vl", seed=0)


@pytest.fixture(scope="module")
def grounding(tmp_path_factory):
    out = tmp_path_factory.mktemp("grounding")
    return read_jsonl(synthesize("grounding", out, n=4, image_size=IMAGE_SIZE, progress=False)).samples


def expected_box_text(vlm, response: str, original: tuple[int, int]) -> str:
    """The response with its box in the family's convention, computed from the sizes alone."""
    (input_size,) = [info.input_size for info in vlm.prepare_images([_blank(original)])[1]]
    if vlm.adapter.box_convention is BoxConvention.INPUT_PIXELS:
        scale = (input_size[0] / original[0], input_size[1] / original[1])
    else:
        scale = (1000 / original[0], 1000 / original[1])

    def convert(match: re.Match[str]) -> str:
        values = [round(int(v) * scale[i % 2]) for i, v in enumerate(match.groups())]
        return "[" + ", ".join(str(v) for v in values) + "]"

    return _BOX.sub(convert, response)


def _blank(size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size)


def label_text(vlm, labels: torch.Tensor) -> str:
    return vlm.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)


def test_collator_labels_are_the_converted_response(vlm, grounding):
    collator = SFTCollator(vlm, grounding)
    batch = collator(grounding)
    assert set(batch) >= {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                          "labels"}
    assert batch["labels"].shape == batch["input_ids"].shape
    assert collator.skipped == 0
    input_size = vlm.prepare_images([_blank((IMAGE_SIZE, IMAGE_SIZE))])[1][0].input_size
    assert input_size != (IMAGE_SIZE, IMAGE_SIZE)
    for row, sample in enumerate(grounding):
        response = sample.response
        expected = expected_box_text(vlm, response, (IMAGE_SIZE, IMAGE_SIZE))
        assert expected != response  # the box really changes
        assert label_text(vlm, batch["labels"][row]) == expected + "<|im_end|>"
        # the labelled tokens are the input tokens at those positions, at the end of the row
        keep = batch["labels"][row] != IGNORE_INDEX
        assert torch.equal(batch["labels"][row][keep], batch["input_ids"][row][keep])
        last = int(keep.nonzero().max())
        assert last >= batch["input_ids"].shape[1] - 2  # <|im_end|> then the template's final newline


def test_collator_masks_image_pads_prompt_and_padding(vlm, grounding):
    batch = SFTCollator(vlm, grounding)(grounding)
    labels, ids = batch["labels"], batch["input_ids"]
    image_pad = vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (ids == image_pad).sum() > 0
    assert (labels[ids == image_pad] == IGNORE_INDEX).all()
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (labels[batch["mm_token_type_ids"] != 0] == IGNORE_INDEX).all()
    prompt_text = vlm.tokenizer.decode(ids[0][labels[0] == IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert "Where is the" in prompt_text and "<|im_start|>assistant\n" in prompt_text
    # the model input holds the converted box too (not the original-pixel one)
    full = vlm.tokenizer.decode(ids[0].tolist(), skip_special_tokens=False)
    assert expected_box_text(vlm, grounding[0].response, (IMAGE_SIZE, IMAGE_SIZE)) in full


def test_collator_box_conventions_by_family(grounding):
    """Qwen2.5-VL writes boxes in resized input pixels, Qwen2-VL in 0..1000 of the image."""
    response = grounding[0].response
    (x1, y1, x2, y2) = (int(v) for v in _BOX.search(response).groups())
    texts = {}
    for preset in ("tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl"):
        vlm = build_tiny_vlm(preset, seed=0)
        texts[preset] = label_text(vlm, SFTCollator(vlm, grounding)(grounding[:1])["labels"][0])
    scale = 112 / IMAGE_SIZE  # 100 px -> 112 (4 tokens of 28 px)
    expected_25 = [round(v * scale) for v in (x1, y1, x2, y2)]
    assert f"[{', '.join(map(str, expected_25))}]" in texts["tiny-qwen2.5-vl"]
    expected_1000 = f"[{x1 * 10}, {y1 * 10}, {x2 * 10}, {y2 * 10}]"
    assert expected_1000 in texts["tiny-qwen2-vl"]
    assert expected_1000 in texts["tiny-qwen3-vl"]


def test_thought_dropout_one_empties_think_zero_keeps(qwen25, grounding):
    kept = SFTCollator(qwen25, grounding, thought_dropout=0.0)(grounding)
    dropped = SFTCollator(qwen25, grounding, thought_dropout=1.0)(grounding)
    for row, sample in enumerate(grounding):
        expected = expected_box_text(qwen25, sample.response, (IMAGE_SIZE, IMAGE_SIZE))
        assert label_text(qwen25, kept["labels"][row]) == expected + "<|im_end|>"
        empty = re.sub(r"<think>.*?</think>", EMPTY_THINK, expected, flags=re.DOTALL)
        assert empty != expected
        assert label_text(qwen25, dropped["labels"][row]) == empty + "<|im_end|>"
        assert "<think>\n\n</think><answer>" in label_text(qwen25, dropped["labels"][row])


def fake_samples(n: int) -> list[Sample]:
    return [Sample(id=str(i), messages=[], images=[], videos=[], image_sizes=[], source=f"data.jsonl:{i + 1}")
            for i in range(n)]


def test_thought_dropout_rate_and_its_reproducible_decisions(qwen25):
    samples = fake_samples(400)
    collator = SFTCollator(qwen25, samples, thought_dropout=0.5, seed=3)
    epoch0 = [collator.drops_thoughts(s) for s in samples]
    assert 0.4 < sum(epoch0) / 400 < 0.6
    # a decision depends on the seed, the epoch and the sample only: not on call order or earlier calls
    again = SFTCollator(qwen25, samples, thought_dropout=0.5, seed=3)
    assert [again.drops_thoughts(s) for s in reversed(samples)] == epoch0[::-1]
    collator.epoch = 1
    epoch1 = [collator.drops_thoughts(s) for s in samples]
    assert epoch1 != epoch0 and 0.4 < sum(epoch1) / 400 < 0.6
    other_seed = SFTCollator(qwen25, samples, thought_dropout=0.5, seed=4)
    assert [other_seed.drops_thoughts(s) for s in samples] != epoch0
    assert not any(SFTCollator(qwen25, samples, thought_dropout=0.0).drops_thoughts(s) for s in samples)


def test_empty_thoughts_on_assistant_text_only():
    messages = [{"role": "user", "content": "<think>u</think>"},
                {"role": "assistant", "content": "<think>a\nb</think>x<think>c</think>"}]
    emptied = empty_thoughts(messages)
    assert emptied[1]["content"] == f"{EMPTY_THINK}x{EMPTY_THINK}"
    assert emptied[0]["content"] == "<think>u</think>"  # user text is never touched
    assert messages[1]["content"] == "<think>a\nb</think>x<think>c</think>"  # input not mutated


def test_empty_thoughts_on_assistant_parts():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": [{"type": "text", "text": "<think>long</think><answer>1</answer>"}]}]
    assert empty_thoughts(messages)[1]["content"] == [{"type": "text", "text": f"{EMPTY_THINK}<answer>1</answer>"}]


def test_collator_parts_content_and_multi_turn(qwen25, tmp_path):
    """Messages given as parts: every assistant turn is labelled and its boxes are converted."""
    out = synthesize("grounding", tmp_path, n=1, image_size=IMAGE_SIZE, progress=False)
    record = json.loads(out.read_text().splitlines()[0])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>[10, 20, 50, 60]</answer>"}]},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "content": "<answer>[0, 0, 100, 100]</answer>"},
    ]
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps({"images": record["images"], "messages": messages}) + "\n")
    (sample,) = read_jsonl(path).samples
    batch = SFTCollator(qwen25, [sample])([sample])
    assert label_text(qwen25, batch["labels"][0]) == (
        "<answer>[11, 22, 56, 67]</answer><|im_end|><answer>[0, 0, 112, 112]</answer><|im_end|>")


def test_collator_replaces_and_counts_samples_whose_image_vanished(qwen25, tmp_path):
    samples = read_jsonl(synthesize("grounding", tmp_path, n=3, image_size=IMAGE_SIZE, progress=False)).samples
    Path(samples[1].images[0]).unlink()  # deleted after the data file was read and checked
    collator = SFTCollator(qwen25, samples)
    batch = collator(samples)
    assert collator.skipped == 1
    assert batch["input_ids"].shape[0] == 3 and batch["image_grid_thw"].shape[0] == 3  # the batch keeps its size
    for row, sample in enumerate((samples[0], samples[2], samples[2])):  # the next sample that loads stands in
        expected = expected_box_text(qwen25, sample.response, (IMAGE_SIZE, IMAGE_SIZE))
        assert label_text(qwen25, batch["labels"][row]) == expected + "<|im_end|>"
    assert collator([samples[1]])["input_ids"].shape[0] == 1  # a batch of only broken samples is refilled too
    assert collator.skipped == 2


def test_collator_stops_when_no_image_of_the_data_loads(qwen25, tmp_path):
    samples = read_jsonl(synthesize("grounding", tmp_path, n=2, image_size=IMAGE_SIZE, progress=False)).samples
    for sample in samples:
        Path(sample.images[0]).unlink()
    with pytest.raises(TrainingStopped, match="all 2 failed"):
        SFTCollator(qwen25, samples)(samples[:1])


def test_sft_with_gradient_checkpointing_trains(tmp_path):
    data = synthesize("grounding", tmp_path / "data", n=4, image_size=IMAGE_SIZE, progress=False)
    raw = {"output_dir": str(tmp_path / "run"), "data": {"train": str(data)},
           "model": {"name_or_path": "tiny-qwen3-vl", "device": "cpu"},
           "stages": [{"kind": "sft", "optim": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2,
                                                 "gradient_checkpointing": True},
                       "logging": {"tensorboard": False, "progress": False}, "save": {"every": 0}}]}
    stage = load_config(None, raw=raw).stages[0]
    before = build_tiny_vlm("tiny-qwen3-vl", seed=0).model.state_dict()
    result = run_sft(stage)
    after = load_vlm(result.final_path, device="cpu").model.state_dict()
    assert result.steps == 2
    assert any(not torch.equal(after[k], before[k]) for k in after if "language_model" in k)
    records = [json.loads(line) for line in (Path(stage.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("loss" in r for r in records)  # no end-of-run duplicate
