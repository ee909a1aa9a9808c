"""Parsing of untrusted completions: answers, reasoning and boxes (``vlreason.rewards.parsing``).

Every expected box is worked out by hand in a comment from the input text.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlreason.rewards import RewardScorer, get_reward, parse_completion, parsed_columns
from vlreason.rewards.parsing import MAX_BOXES, PredBox, completion_text, extract_answer, extract_think, find_boxes

PROPERTY = settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def relative_1000(size: tuple[int, int]):
    """Qwen2-VL style decoder: coordinates in 0..1000 of the image, to pixels of ``size``."""
    width, height = size
    return lambda c: (c[0] * width / 1000, c[1] * height / 1000, c[2] * width / 1000, c[3] * height / 1000)


def boxes_of(text: str, size: tuple[int, int] | None = (1000, 1000), decode=None) -> list[PredBox]:
    return parse_completion(text, decode, size).boxes


def coords_of(text: str, size: tuple[int, int] | None = (1000, 1000), decode=None) -> list[tuple[float, ...]]:
    return [b.box for b in boxes_of(text, size, decode)]


# --------------------------------------------------------------------------- answers / reasoning


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>look at it</think><answer> 42 </answer>", "42"),  # content of the answer tags, stripped
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last answer block
        ("  cat \n", "cat"),  # bare answer: the whole text
        ("<think>reasoning</think>\n dog", "dog"),  # text after a closed think block
        ("<think>reasoning</think><answer>cat", None),  # unclosed <answer>: cut off
        ("<think>still reasoning", None),  # unclosed <think>: cut off
        ("<think>reasoning</think>", None),  # nothing after the reasoning
        ("<answer>   </answer>", None),  # blank answer
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think> a b </think><answer>x</answer>", "a b"),
        ("<think></think><answer>x</answer>", ""),  # an empty think block is "" (TON), not None
        ("<think>first</think><think>second</think>", "first"),  # the first closed block
        ("<think>never closed", None),
        ("</think><think>reversed", None),
        ("no tags at all", None),
    ],
)
def test_extract_think(text: str, expected: str | None) -> None:
    assert extract_think(text) == expected


def test_template_opened_think_closes_it_in_the_completion() -> None:
    # Qwen3-VL thinking: the chat template writes <think>, so the completion holds only </think>.
    # The reasoning is what precedes it and the answer what follows; its numbers are no box.
    text = "The cat spans [1, 2, 3, 4] or so.\n</think>\n\n[10, 20, 30, 40]"
    parsed = parse_completion(text, None, (100, 100))
    assert parsed.think == "The cat spans [1, 2, 3, 4] or so."
    assert parsed.answer == "[10, 20, 30, 40]"
    assert [b.box for b in parsed.boxes] == [(10.0, 20.0, 30.0, 40.0)]
    # an <answer> block still wins over the text after </think>
    assert extract_answer("reasoning</think>prose <answer>7</answer>") == "7"
    assert extract_answer("only reasoning [1, 2, 3, 4]</think>") is None


def test_truncated_completion_without_closed_answer_has_no_answer() -> None:
    # cut off at max_new_tokens: the junk is not an answer, and nothing in it is a box
    junk = parse_completion("', 1, 1, 1,,,, one one", None, (100, 100), truncated=True)
    assert junk.answer is None and junk.boxes == []
    # a cut-off completion whose answer was closed keeps it
    closed = parse_completion("<think>r</think><answer>[1, 2, 3, 4]</answer> and then", None, (100, 100),
                              truncated=True)
    assert closed.answer == "[1, 2, 3, 4]" and closed.think == "r"
    # the same text that ended with end-of-sequence is a complete bare answer
    assert parse_completion("', 1, 1, 1,,,, one one", None, (100, 100)).answer == "', 1, 1, 1,,,, one one"


def test_parsed_columns_use_truncation_flags() -> None:
    completions = ["[1, 2, 3, 4]", "[1, 2, 3, 4]"]
    columns = parsed_columns(completions, [[(10, 10)], [(10, 10)]], truncated=[True, False])
    assert columns["pred_answer"] == [None, "[1, 2, 3, 4]"]
    assert [[b.box for b in row] for row in columns["pred_boxes"]] == [[], [(1.0, 2.0, 3.0, 4.0)]]


# --------------------------------------------------------------------------- raw boxes


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # JSON object with bbox_2d, label and confidence
        ('{"bbox_2d": [10, 20, 30, 40], "label": "cat", "confidence": 0.8}', [((10, 20, 30, 40), "cat", 0.8)]),
        # a JSON list of objects; other key spellings (bbox/name/score, box/class/conf)
        ('[{"bbox": [1, 2, 3, 4], "name": "a", "score": 0.5}, {"box": [5, 6, 7, 8], "class": "b", "conf": "0.25"}]',
         [((1, 2, 3, 4), "a", 0.5), ((5, 6, 7, 8), "b", 0.25)]),
        # Visual-RFT Python literal with capitalised keys
        ("[{'Position': [10, 20, 30, 40], 'Confidence': 0.9}]", [((10, 20, 30, 40), None, 0.9)]),
        # Qwen2-VL reference + box tokens
        ("<|object_ref_start|>dog<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|>",
         [((1, 2, 30, 40), "dog", None)]),
        # Qwen2-VL: a box without a reference, then one with a reference
        ("<|box_start|>(1, 2), (3, 4)<|box_end|> and <|object_ref_start|>cat<|object_ref_end|>"
         "<|box_start|>(5,6),(7,8)<|box_end|>", [((1, 2, 3, 4), None, None), ((5, 6, 7, 8), "cat", None)]),
        # a bracketed quadruple in prose; 4e1 = 40
        ("The box is [1, 2, 3.5, 4e1], I think.", [((1, 2, 3.5, 40), None, None)]),
        # a markdown code fence around JSON
        ('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}]\n```', [((10, 20, 30, 40), "cat", None)]),
        # a bare list of quadruples
        ("[[1, 2, 3, 4], [5, 6, 7, 8]]", [((1, 2, 3, 4), None, None), ((5, 6, 7, 8), None, None)]),
        # a JSON confidence that is not a number is no confidence
        ('{"bbox_2d": [1, 2, 3, 4], "confidence": "high"}', [((1, 2, 3, 4), None, None)]),
        ("[1, 2, 3]", []),  # three numbers are no box
        ("no box in here", []),
    ],
)
def test_find_boxes_forms(answer: str, expected: list) -> None:
    got = find_boxes(answer)
    assert [(tuple(c), label, conf) for c, label, conf in got] == [
        (tuple(float(v) for v in c), label, conf) for c, label, conf in expected
    ]


CAT_DOG = '[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}, {"bbox_2d": [50, 60, 70, 80], "label": "dog"}]'
CAT_DOG_BOXES = [((10.0, 20.0, 30.0, 40.0), "cat", None), ((50.0, 60.0, 70.0, 80.0), "dog", None)]


@pytest.mark.parametrize(
    "answer",
    [
        f"Here are the objects:\n```json\n{CAT_DOG}\n```",  # prose before the fence
        f"```json\n{CAT_DOG}\n```\nBoth are [clearly] visible.",  # prose (with brackets) after it
        f"I found:\n```json\n{CAT_DOG}",  # the fence is cut off: no closing ```
        f"```\n{CAT_DOG}\n```",  # a fence without a language tag
        f"The objects are {CAT_DOG}, as requested.",  # JSON inside prose, no fence
        f"{CAT_DOG[:-1]}, {{\"bbox_2d\": [5, 6,",  # the list is cut off inside its third object
        f"```json\n{CAT_DOG[:-1]}, {{\"bbox_2d\": [5, 6, 7, 8], \"lab",  # a cut-off list in a cut-off fence
        f"```json\n{CAT_DOG[:-1]},\n```",  # the list is never closed, then the fence is
        '{"objects": [{"bbox_2d": [10, 20, 30, 40], "label": "cat"}, '  # complete objects inside a cut-off object
        '{"bbox_2d": [50, 60, 70, 80], "label": "dog"}, {"bbox_2d": [1',
    ],
)
def test_labelled_boxes_survive_prose_fences_and_truncation(answer: str) -> None:
    assert find_boxes(answer) == CAT_DOG_BOXES


def test_truncated_python_literal_list_keeps_labels() -> None:
    answer = "[{'Position': [1, 2, 3, 4], 'Label': \"cat's toy\"}, {'Position': [5, 6, 7, 8], 'Label': 'd}og'}, {'Posi"
    assert find_boxes(answer) == [((1.0, 2.0, 3.0, 4.0), "cat's toy", None), ((5.0, 6.0, 7.0, 8.0), "d}og", None)]


def test_fenced_detection_answer_scores_full_map() -> None:
    # before: the fence with prose around it failed to parse, the quadruple fallback kept boxes
    # without labels, and the labelled ground truth matched nothing (0.0)
    text = f"<think>two animals</think><answer>Sure!\n```json\n{CAT_DOG}\n```\nDone.</answer>"
    columns = parsed_columns([text], [[(100, 100)]])
    columns |= {"boxes": [[[10, 20, 30, 40], [50, 60, 70, 80]]], "labels": [["cat", "dog"]]}
    table = RewardScorer({"map": get_reward("detection_map", match_labels=True)})([text], columns)
    assert table.column("map").tolist() == pytest.approx([1.0])


def test_malformed_literals_parse_quietly() -> None:
    # Python's compiler warns (on the user's terminal) about `1or` / `0x1for` before rejecting them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for answer in ["[1or 2]", "[0x1for]", "[12and 3, 4, 5]"]:
            assert find_boxes(answer) == []
    assert [str(w.message) for w in caught] == []


def test_qwen2_label_is_the_reference_right_before_the_box() -> None:
    # a reference without a box (a mention in prose) is not part of the next box's label
    text = ("The <|object_ref_start|>dog<|object_ref_end|> sits next to "
            "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|>")
    assert find_boxes(text) == [((1.0, 2.0, 30.0, 40.0), "the cat", None)]


# --------------------------------------------------------------------------- canonical boxes


def test_parse_completion_full_example() -> None:
    text = '<think>two animals</think><answer>[{"bbox_2d": [10, 20, 30, 40], "label": "cat", "confidence": 0.8}, ' \
           '{"bbox_2d": [50, 60, 70, 80], "label": "dog"}]</answer>'
    parsed = parse_completion(text, None, (100, 100))
    assert parsed.think == "two animals"
    assert parsed.answer.startswith("[{")
    assert parsed.boxes == [PredBox((10.0, 20.0, 30.0, 40.0), "cat", 0.8),
                            PredBox((50.0, 60.0, 70.0, 80.0), "dog", None)]


def test_boxes_come_only_from_the_answer() -> None:
    # the box inside <think> is reasoning, not the answer
    assert coords_of("<think>maybe [1, 2, 3, 4]</think><answer>[10, 20, 30, 40]</answer>") == [(10, 20, 30, 40)]
    # a cut-off answer has no boxes, even if the reasoning had some
    assert coords_of("<think>[1, 2, 3, 4]</think><answer>[10, 20, 30") == []


def test_decoder_converts_model_coordinates_to_pixels() -> None:
    size = (640, 480)
    text = "<|box_start|>(100,200),(500,1000)<|box_end|>"
    # 100*640/1000 = 64, 200*480/1000 = 96, 500*640/1000 = 320, 1000*480/1000 = 480
    assert coords_of(text, size, relative_1000(size)) == [(64.0, 96.0, 320.0, 480.0)]


def test_decoder_output_is_clamped_to_the_image() -> None:
    size = (640, 480)
    # (100, 200, 1200, 1100) -> (64, 96, 768, 528) -> clamped to (64, 96, 640, 480)
    assert coords_of("[100, 200, 1200, 1100]", size, relative_1000(size)) == [(64.0, 96.0, 640.0, 480.0)]


def test_decoder_that_fails_drops_the_box() -> None:
    def divide_by_zero(c):
        return (c[0] / 0, c[1], c[2], c[3])

    assert coords_of("[1, 2, 3, 4]", (10, 10), divide_by_zero) == []


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("[-10, 50, 700, 500]", [(0, 50, 640, 480)]),  # clamped to 640 x 480
        ("[30, 20, 10, 40]", []),  # reversed x: invalid, not swapped
        ("[10, 40, 30, 20]", []),  # reversed y
        ("[10, 20, 10, 40]", []),  # zero width
        ("[700, 10, 800, 20]", []),  # wholly right of the image: zero width after clamping
        ('[{"bbox_2d": [NaN, 20, 30, 40]}, {"bbox_2d": [10, 20, 30, 40]}]', [(10, 20, 30, 40)]),  # NaN dropped
        ('[{"bbox_2d": [10, 20, Infinity, 40]}]', []),
        ("[1e400, 2, 3, 4]", []),  # overflows to inf
        ("[0, 0, 1e300, 1e300]", [(0, 0, 640, 480)]),  # huge but finite: clamped
    ],
)
def test_invalid_boxes(answer: str, expected: list) -> None:
    assert coords_of(answer, (640, 480)) == [tuple(float(v) for v in box) for box in expected]


def test_confidence_is_clamped_to_unit_interval() -> None:
    text = '[{"bbox_2d": [1, 1, 5, 5], "confidence": 1.7}, {"bbox_2d": [2, 2, 6, 6], "confidence": -0.5}, ' \
           '{"bbox_2d": [3, 3, 7, 7], "confidence": 0.25}]'
    assert [b.confidence for b in boxes_of(text)] == [1.0, 0.0, 0.25]


def test_without_size_boxes_are_not_clamped() -> None:
    assert coords_of("[-5, -5, 5000, 5000]", None) == [(-5.0, -5.0, 5000.0, 5000.0)]


def test_box_count_is_capped() -> None:
    text = "<answer>" + " ".join(f"[{i}, 0, {i + 1}, 1]" for i in range(MAX_BOXES + 50)) + "</answer>"
    boxes = coords_of(text, (MAX_BOXES + 100, 10))
    assert len(boxes) == MAX_BOXES
    assert boxes[0] == (0.0, 0.0, 1.0, 1.0)


# --------------------------------------------------------------------------- completion_text


def test_completion_text_forms() -> None:
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "<answer>A</answer>"}]) == "<answer>A</answer>"
    # the last message counts
    assert completion_text([{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]) == "y"
    # content given as typed parts
    parts = [{"type": "text", "text": "<answer>"}, {"type": "image"}, {"type": "text", "text": "B</answer>"}]
    assert completion_text([{"role": "assistant", "content": parts}]) == "<answer>B</answer>"
    assert completion_text(None) == ""


def test_completion_text_of_message_without_content_is_empty() -> None:
    # An assistant message whose content is None (e.g. a tool-call turn) has no text. Its text must
    # not be the Python repr of the message list, which would then be parsed as a bare answer.
    message = [{"role": "assistant", "content": None}]
    assert completion_text(message) == ""
    assert parse_completion(completion_text(message)).answer is None


def test_conversational_completion_through_parsed_columns() -> None:
    completions = [[{"role": "assistant", "content": "<think>r</think><answer>[1, 2, 3, 4]</answer>"}], "7"]
    cols = parsed_columns(completions, [[(10, 10)], [(10, 10)]])
    assert cols["pred_answer"] == ["[1, 2, 3, 4]", "7"]
    assert cols["pred_think"] == ["r", None]
    assert [[b.box for b in row] for row in cols["pred_boxes"]] == [[(1.0, 2.0, 3.0, 4.0)], []]
    assert cols["image_sizes"] == [[(10, 10)], [(10, 10)]]


# --------------------------------------------------------------------------- huge inputs


def test_two_megabyte_inputs_parse() -> None:
    unit = "<answer>[1,2,"
    inputs = [
        unit * (2_000_000 // len(unit)),  # unclosed answers: None
        "[1,2," * 400_000,  # a bare answer of 2 MB of broken lists
        "<think>" * 300_000,
        "<answer>" + "[1, 2, 30, 40], " * 130_000 + "</answer>",  # 2 MB of boxes
        "{\"bbox_2d\": [" * 160_000,
    ]
    results = [parse_completion(text, None, (100, 100)) for text in inputs]
    assert results[0].answer is None and results[0].boxes == []
    assert results[1].boxes == []
    assert results[2].answer is None
    assert len(results[3].boxes) == MAX_BOXES and results[3].boxes[0].box == (1.0, 2.0, 30.0, 40.0)
    assert results[4].boxes == []


def _parse_digit_run() -> None:
    # a runaway number: "[" then 100k digits, never closed (degenerate generations look like this)
    assert parse_completion("[" + "1" * 100_000, None, (100, 100)).boxes == []
    assert parse_completion("<|box_start|>(" + "7" * 100_000, None, (100, 100)).boxes == []


def _parse_whitespace_run() -> None:
    # a long run of blank space between two words (degenerate generations repeat newlines), all of
    # it within the 100k characters that are searched for boxes
    assert parse_completion("x" + " \n" * 45_000 + "x", None, (100, 100)).boxes == []


def _parse_broken_structures() -> None:
    # cut-off lists, fences and objects at the 100k-character limit: each is scanned a bounded
    # number of times, never once per bracket
    texts = [
        "```json\n" + '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, ' * 3_000,  # many complete objects
        "[" + "{" * 100_000,  # objects opened, never closed
        "x [" + "{'a': '" * 30_000,  # Python strings never closed
        "```" * 40_000,  # fences without content
        "[" + "{}" * 50_000,  # many empty objects
        "say [" * 25_000 + "]",  # one huge span of prose between brackets
        "{" + '"\\' * 40_000,  # escapes inside an unclosed string
    ]
    for text in texts:
        assert len(parse_completion(text, None, (100, 100)).boxes) <= MAX_BOXES


def test_broken_structures_parse_in_linear_time(finishes) -> None:
    finishes(_parse_broken_structures)


def test_long_digit_run_parses_in_linear_time(finishes) -> None:
    finishes(_parse_digit_run)


def test_long_whitespace_run_parses_in_linear_time(finishes) -> None:
    finishes(_parse_whitespace_run)


# --------------------------------------------------------------------------- properties

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),  # includes nan, inf, -0.0, 1e+308
    st.integers(-10**30, 10**30).map(str),
    st.floats(-2000, 2000).map(lambda f: f"{f:.1f}"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 400, "1e-400", "-0", ".5", "5."]),
)
PLAUSIBLE = st.one_of(st.integers(-100, 3000), st.floats(-100, 3000))
ORDERED = st.tuples(PLAUSIBLE, PLAUSIBLE, st.floats(0.5, 2000), st.floats(0.5, 2000)).map(
    lambda q: tuple(f"{v:.3f}" for v in (q[0], q[1], q[0] + q[2], q[1] + q[3])))  # mostly valid boxes
QUAD = st.one_of(ORDERED, ORDERED, st.tuples(NUMBERS, NUMBERS, NUMBERS, NUMBERS))
FRAGMENTS = st.sampled_from([
    "<answer>", "</answer>", "<think>", "</think>", "[", "]", "{", "}", ",", ":", " ", "\n", '"', "'",
    '{"bbox_2d":', '"label":', '"cat"', '"confidence":', "{'Position':", "'Confidence':", "null", "true",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "(", ")", "```json\n", "```",
    "\x00", "é", "🙂", "\u202e", "\ufeff",
])
CHUNK = st.one_of(FRAGMENTS, NUMBERS, st.text(max_size=6))
BUILT = st.lists(CHUNK, max_size=40).map("".join)


@st.composite
def boxy_text(draw) -> str:
    """Text holding boxes in the supported syntaxes, with arbitrary (possibly invalid) numbers."""
    quads = draw(st.lists(QUAD, min_size=1, max_size=4))
    confidence = draw(NUMBERS)
    style = draw(st.sampled_from(["json", "python", "qwen2", "prose", "fenced", "cut"]))
    if style in ("json", "cut"):
        body = "[" + ", ".join(f'{{"bbox_2d": [{", ".join(q)}], "label": "x", "confidence": {confidence}}}'
                               for q in quads) + "]"
    elif style == "python":
        body = "[" + ", ".join(f"{{'Position': [{', '.join(q)}], 'Confidence': {confidence}}}" for q in quads) + "]"
    elif style == "qwen2":
        body = "".join(f"<|object_ref_start|>o<|object_ref_end|><|box_start|>({q[0]},{q[1]}),({q[2]},{q[3]})"
                       "<|box_end|>" for q in quads)
    elif style == "prose":
        body = " and ".join(f"[{', '.join(q)}]" for q in quads)
    else:
        body = "```json\n" + json.dumps([{"bbox_2d": [float(v) for v in q]} for q in quads]) + "\n```"
    if style == "cut":  # a list cut off anywhere, as a completion at the token limit is
        body = body[:draw(st.integers(0, len(body)))]
    prefix, suffix = draw(BUILT), draw(BUILT)
    return draw(st.sampled_from([f"<think>{prefix}</think><answer>{body}</answer>{suffix}", body,
                                 f"<answer>{body}</answer>", f"{prefix}{body}{suffix}"]))


ANY_TEXT = st.one_of(st.text(), BUILT, boxy_text())
SIZES = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


def assert_well_formed(parsed, size: tuple[int, int]) -> None:
    width, height = size
    assert parsed.answer is None or (isinstance(parsed.answer, str) and parsed.answer.strip() == parsed.answer != "")
    assert parsed.think is None or isinstance(parsed.think, str)
    assert len(parsed.boxes) <= MAX_BOXES
    for pred in parsed.boxes:
        x1, y1, x2, y2 = pred.box
        assert all(isinstance(v, float) and math.isfinite(v) for v in pred.box)
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert pred.label is None or isinstance(pred.label, str)
        assert pred.confidence is None or 0.0 <= pred.confidence <= 1.0


@PROPERTY
@given(text=ANY_TEXT, size=SIZES, relative=st.booleans(), truncated=st.booleans())
def test_parsing_never_raises_and_boxes_are_valid(text: str, size: tuple[int, int], relative: bool,
                                                  truncated: bool) -> None:
    parsed = parse_completion(text, relative_1000(size) if relative else None, size, truncated)
    assert_well_formed(parsed, size)
    extract_answer(text, truncated)
    extract_think(text)
    find_boxes(text)


@PROPERTY
@given(text=boxy_text(), size=SIZES)
def test_boxes_found_in_structured_text_are_valid(text: str, size: tuple[int, int]) -> None:
    assert_well_formed(parse_completion(text, None, size), size)


BUILTINS = {
    "format": get_reward("format"),
    "format_optional": get_reward("format", template="optional_think"),
    "format_pattern": get_reward("format", pattern=r"<answer>\d+</answer>"),
    "iou": get_reward("iou"),
    "iou_050": get_reward("iou", threshold=0.5),
    "multi_box_iou": get_reward("multi_box_iou", match_labels=True),
    "multi_box_hungarian": get_reward("multi_box_iou", matching="hungarian", confidence_weight=1.0,
                                      match_labels=False, duplicates="keep"),
    "detection_map": get_reward("detection_map", match_labels=True),
    "detection_ap50": get_reward("detection_map", metric="ap50", match_labels=False),
    "classification": get_reward("classification", synonyms={"cat": ["kitty"]}),
    "classification_contains": get_reward("classification", match="contains"),
    "numeric": get_reward("numeric"),
    "numeric_ramp": get_reward("numeric", mode="ramp"),
    "count": get_reward("numeric", column="count"),
    "choice": get_reward("choice"),
}
TRUTH = [  # ground-truth rows of different sample types, as a mixed batch has them
    {"answer": "12", "count": 12, "boxes": [[10, 10, 50, 60]], "labels": ["cat"], "label": "cat", "choices": None},
    {"answer": "B", "count": None, "boxes": [[0, 0, 5, 5], [20, 20, 40, 40]], "labels": ["cat", "dog"],
     "label": ["cat", "dog"], "choices": ["red", "green", "blue"]},
    {"answer": None, "count": 0, "boxes": [], "labels": [], "label": None, "choices": None},
    {"answer": "3.5", "count": "1,000", "boxes": None, "labels": None, "label": "dog", "choices": ["a", "b"]},
]
SCORER = RewardScorer(BUILTINS, on_error="raise")


@PROPERTY
@given(texts=st.lists(ANY_TEXT, min_size=1, max_size=4), conversational=st.booleans(), size=SIZES)
def test_every_builtin_reward_gives_a_finite_score_or_none(texts: list[str], conversational: bool,
                                                          size: tuple[int, int]) -> None:
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    rows = [TRUTH[i % len(TRUTH)] for i in range(len(texts))]
    columns = {key: [row[key] for row in rows] for key in TRUTH[0]}
    columns.update(parsed_columns(completions, [[size]] * len(texts)))
    # on_error=raise: a reward that raises or returns anything but one finite number or None per
    # completion (NaN, inf, a string, the wrong count) stops the scorer with a RewardError
    table = SCORER(completions, columns)
    assert table.values.shape == (len(texts), len(BUILTINS))
    assert not np.isinf(table.values).any()
    assert all(count == 0 for count in table.failures.values())
