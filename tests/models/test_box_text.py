"""Boxes written in text: FamilyAdapter.text_boxes_to_model, VLM.encode(convert_boxes=True) and
VLM.box_decoder (the way back to original pixels)."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from vlreason.models import TINY_PRESETS
from vlreason.models.adapters import QWEN2_5_VL, QWEN2_VL, QWEN3_VL
from vlreason.models.vlm import build_tiny_vlm
from vlreason.vision.images import ImageInfo

INFO = ImageInfo(original_size=(100, 200), input_size=(112, 224))  # Qwen2.5-VL input pixels: x1.12 on both axes


# ---- text_boxes_to_model ------------------------------------------------------------------------------


def test_quadruple_rewritten_per_convention():
    text = "<answer>[10, 20, 50, 60]</answer>"
    assert QWEN2_5_VL.text_boxes_to_model(text, INFO) == "<answer>[11, 22, 56, 67]</answer>"
    assert QWEN2_VL.text_boxes_to_model(text, INFO) == "<answer>[100, 100, 500, 300]</answer>"
    assert QWEN3_VL.text_boxes_to_model(text, INFO) == "<answer>[100, 100, 500, 300]</answer>"


@pytest.mark.parametrize("written", ["[10,20,50,60]", "[ 10 , 20 , 50 , 60 ]", "[10,\n20,\t50, 60]"])
def test_spacing_variants_are_normalised(written):
    assert QWEN2_VL.text_boxes_to_model(f"box {written}.", INFO) == "box [100, 100, 500, 300]."


@pytest.mark.parametrize("text", [
    "[50, 20, 10, 60]",  # x2 < x1
    "[10, 60, 50, 20]",  # y2 < y1
    "coordinates [30, 40, 20, 10] are reversed",
])
def test_reversed_quadruples_left_alone(text):
    assert QWEN2_5_VL.text_boxes_to_model(text, INFO) == text
    assert QWEN2_VL.text_boxes_to_model(text, INFO) == text


def test_floats_are_converted_to_integers():
    text = "[10.4, 20.6, 50.0, 60.8]"
    assert QWEN2_VL.text_boxes_to_model(text, INFO) == "[104, 103, 500, 304]"
    assert QWEN2_5_VL.text_boxes_to_model(text, INFO) == "[12, 23, 56, 68]"


def test_several_boxes_all_rewritten():
    text = ('[{"bbox_2d": [10, 20, 50, 60], "label": "red square"}, '
            '{"bbox_2d": [0, 100, 100, 200], "label": "blue circle"}]')
    expected = ('[{"bbox_2d": [100, 100, 500, 300], "label": "red square"}, '
                '{"bbox_2d": [0, 500, 1000, 1000], "label": "blue circle"}]')
    assert QWEN2_VL.text_boxes_to_model(text, INFO) == expected
    mixed = "first [10, 20, 50, 60] then [60, 20, 10, 60] then [0, 0, 100, 200]"
    expected_mixed = "first [11, 22, 56, 67] then [60, 20, 10, 60] then [0, 0, 112, 224]"
    assert QWEN2_5_VL.text_boxes_to_model(mixed, INFO) == expected_mixed


@pytest.mark.parametrize("text", [
    "",
    "no boxes here",
    "<think>I count 3 circles.</think><answer>3</answer>",
    "[1, 2, 3]",
    "[1, 2, 3, 4, 5]",
    "[a, b, c, d]",
    "(10, 20, 50, 60)",
    "[10, 20, 50]60]",
])
def test_text_without_boxes_unchanged(text):
    assert QWEN2_5_VL.text_boxes_to_model(text, INFO) == text
    assert QWEN2_VL.text_boxes_to_model(text, INFO) == text


def test_boxes_outside_the_image_are_clamped():
    assert QWEN2_VL.text_boxes_to_model("[-5, 0, 150, 250]", INFO) == "[0, 0, 1000, 1000]"
    assert QWEN2_5_VL.text_boxes_to_model("[-5, 0, 150, 250]", INFO) == "[0, 0, 112, 224]"


def test_nested_box_list():
    assert QWEN2_VL.text_boxes_to_model("[[10, 20, 50, 60]]", INFO) == "[[100, 100, 500, 300]]"


# ---- VLM.encode(convert_boxes=True) ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(TINY_PRESETS))
def vlm(request):
    return build_tiny_vlm(request.param, seed=0)


def conversation(answer, question: str = "Where is [10, 20, 50, 60]?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]


def decoded(vlm, inputs, row: int = 0) -> str:
    return vlm.tokenizer.decode(inputs["input_ids"][row].tolist(), skip_special_tokens=False)


def test_encode_converts_assistant_boxes_only(vlm):
    image = Image.new("RGB", (100, 200))
    inputs, infos = vlm.encode([conversation("<answer>[10, 20, 50, 60]</answer>")], [[image]],
                               add_generation_prompt=False, convert_boxes=True)
    (info,) = infos[0]
    converted = vlm.adapter.text_boxes_to_model("[10, 20, 50, 60]", info)
    assert converted != "[10, 20, 50, 60]"
    text = decoded(vlm, inputs)
    assert f"<|im_start|>assistant\n<answer>{converted}</answer><|im_end|>" in text
    assert "Where is [10, 20, 50, 60]?" in text  # the user's text is not rewritten

    plain, _ = vlm.encode([conversation("<answer>[10, 20, 50, 60]</answer>")], [[image]],
                          add_generation_prompt=False)
    assert "<answer>[10, 20, 50, 60]</answer>" in decoded(vlm, plain)


def test_encode_converts_parts_and_uses_each_rows_first_image(vlm):
    parts = [{"type": "text", "text": "<answer>"}, {"type": "text", "text": "[0, 0, 100, 200]</answer>"}]
    rows = [conversation(parts), conversation("[0, 0, 100, 200]")]
    images = [[Image.new("RGB", (100, 200))], [Image.new("RGB", (300, 100))]]
    inputs, infos = vlm.encode(rows, images, add_generation_prompt=False, convert_boxes=True)
    first = vlm.adapter.text_boxes_to_model("[0, 0, 100, 200]", infos[0][0])
    second = vlm.adapter.text_boxes_to_model("[0, 0, 100, 200]", infos[1][0])
    assert f"<answer>{first}</answer><|im_end|>" in decoded(vlm, inputs, 0)
    assert f"assistant\n{second}<|im_end|>" in decoded(vlm, inputs, 1)
    if vlm.adapter is QWEN2_5_VL:
        assert first == f"[0, 0, {infos[0][0].input_size[0]}, {infos[0][0].input_size[1]}]"
    else:
        assert first == "[0, 0, 1000, 1000]"
        assert second == "[0, 0, 333, 1000]"


def test_encode_without_images_leaves_boxes(vlm):
    conv = [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "[10, 20, 50, 60]"}]
    inputs, infos = vlm.encode([conv], [[]], add_generation_prompt=False, convert_boxes=True)
    assert infos == [[]]
    assert "assistant\n[10, 20, 50, 60]<|im_end|>" in decoded(vlm, inputs)


# ---- box_decoder ------------------------------------------------------------------------------------------


def test_box_decoder_none_without_images(vlm):
    assert vlm.box_decoder([]) is None


def test_box_decoder_round_trips_to_model_within_a_pixel(vlm):
    """Back within half a written unit; that is within 1 px unless the image was downscaled for the model."""
    rng = random.Random(0)
    for width, height in ((100, 200), (57, 91), (333, 217), (640, 480)):
        _, (info,) = vlm.prepare_images([Image.new("RGB", (width, height))])
        units = info.input_size if vlm.adapter is QWEN2_5_VL else (1000, 1000)
        tolerance = [0.5 * size / unit + 1e-9 for size, unit in zip(info.original_size, units, strict=True)]
        upscaled = info.input_size[0] >= width and info.input_size[1] >= height
        decode = vlm.box_decoder([info])
        for _ in range(50):
            x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
            y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
            box = (x1, y1, x2, y2)
            back = decode(vlm.adapter.to_model(box, info))
            errors = [abs(a - b) for a, b in zip(back, box, strict=True)]
            assert all(e <= tolerance[i % 2] for i, e in enumerate(errors)), (info, box, back)
            if upscaled:
                assert max(errors) <= 1.0, (info, box, back)


def test_box_decoder_round_trips_text_conversion(vlm):
    image = Image.new("RGB", (333, 217))
    _, (info,) = vlm.prepare_images([image])
    written = vlm.adapter.text_boxes_to_model("[30, 40, 200, 180]", info)
    values = [int(v) for v in written.strip("[]").split(", ")]
    back = vlm.box_decoder([info])(values)
    assert all(abs(a - b) <= 1.0 for a, b in zip(back, (30, 40, 200, 180), strict=True))


def test_box_decoder_uses_the_first_image(vlm):
    _, infos = vlm.prepare_images([Image.new("RGB", (100, 200)), Image.new("RGB", (400, 100))])
    decode = vlm.box_decoder(infos)
    assert decode(vlm.adapter.to_model((0, 0, 100, 200), infos[0])) == pytest.approx((0, 0, 100, 200), abs=1)


def test_box_decoder_known_values():
    info = ImageInfo(original_size=(100, 200), input_size=(112, 224))
    vlm = build_tiny_vlm("tiny-qwen2-vl", seed=0)
    assert vlm.box_decoder([info])([100, 100, 500, 300]) == pytest.approx((10, 20, 50, 60))
    assert vlm.box_decoder([info])([0, 0, 1200, 1000]) == pytest.approx((0, 0, 120, 200))  # unclamped
    vlm25 = build_tiny_vlm("tiny-qwen2.5-vl", seed=0)
    assert vlm25.box_decoder([info])([11.2, 22.4, 56, 67.2]) == pytest.approx((10, 20, 50, 60))
