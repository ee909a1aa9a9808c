"""The zoom task: both files validate, the trace's crop is what the tool returns, and an SFT batch
of traces labels the model's turns only, with the tool call's box in the family's convention."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from vlreason.data.jsonl import read_jsonl
from vlreason.data.zoom import DOT_COLOURS, synthesize_zoom
from vlreason.models.vlm import build_tiny_vlm
from vlreason.tools import get_tool
from vlreason.training.sft import IGNORE_INDEX, SFTCollator
from vlreason.vision.crops import crop_region


def test_zoom_files_validate_and_agree(tmp_path):
    vlm = build_tiny_vlm("tiny-qwen3-vl", max_pixels=16384)
    direct_path, trace_path = synthesize_zoom(tmp_path, n=3, seed=5, canvas=512, resize=vlm.resize, progress=False)
    direct, traces = read_jsonl(direct_path).samples, read_jsonl(trace_path).samples
    assert [s.label for s in direct] == [s.label for s in traces] and {s.label for s in direct} <= set(DOT_COLOURS)
    for sample, trace in zip(direct, traces, strict=True):
        assert sample.response.endswith(f"<answer>{sample.label}</answer>")
        assert [m["role"] for m in trace.messages] == ["user", "assistant", "tool", "assistant"]
        call = trace.messages[1]["content"]
        box = json.loads(call[call.index("{"):call.rindex("}") + 1])["arguments"]["bbox_2d"]
        canvas = Image.open(trace.images[0]).convert("RGB")
        written = np.asarray(Image.open(trace.images[1]).convert("RGB"))
        np.testing.assert_array_equal(written, np.asarray(crop_region(canvas, tuple(map(float, box)), vlm.resize)))
        # the dot at the frame's centre has the label's colour in the crop
        centre = written[written.shape[0] // 2, written.shape[1] // 2]
        assert np.abs(centre.astype(int) - DOT_COLOURS[trace.label]).max() < 40


def test_sft_on_traces_learns_the_turns_and_the_call_in_the_model_convention(tmp_path):
    vlm = build_tiny_vlm("tiny-qwen3-vl", max_pixels=16384)
    _, trace_path = synthesize_zoom(tmp_path, n=2, seed=1, canvas=512, resize=vlm.resize, progress=False)
    samples = read_jsonl(trace_path).samples
    schemas = [get_tool("crop").schema()]
    batch = SFTCollator(vlm, samples, tools=schemas)(samples)
    text = vlm.tokenizer.decode(batch["input_ids"][0])
    assert "# Tools" in text and '"name": "crop"' in text  # the schema in the system prompt
    assert "<tool_response>" in text and batch["image_grid_thw"].shape[0] == 4  # two images per sample
    learned = vlm.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX])
    assert "<tool_call>" in learned and "<answer>" in learned
    assert "tool_response" not in learned and "What colour" not in learned
    # the call's box: original pixels in the data, 0..1000 of the image for Qwen3-VL in the target
    box = json.loads(samples[0].messages[1]["content"].split("\n")[1])["arguments"]["bbox_2d"]
    expected = [round(v * 1000 / 512) for v in box]
    assert f'"bbox_2d": [{", ".join(map(str, expected))}]' in learned
