"""Tool-call parsing: Qwen's <tool_call> blocks, malformed calls as errors, never an exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlreason.tools import ToolCall, has_tool_call, parse_tool_calls

CROP = '<tool_call>\n{"name": "crop", "arguments": {"bbox_2d": [10, 20, 300, 400]}}\n</tool_call>'


def test_one_call_as_qwen_writes_it():
    text = "<think>The sign is small.</think>\n" + CROP
    assert parse_tool_calls(text) == [ToolCall("crop", {"bbox_2d": [10, 20, 300, 400]}, None, CROP)]
    assert has_tool_call(text)


def test_several_calls_in_order_whitespace_optional():
    compact = '<tool_call>{"name":"rotate","arguments":{"degrees":90}}</tool_call>'
    calls = parse_tool_calls(f"first {CROP} then {compact} done")
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("crop", {"bbox_2d": [10, 20, 300, 400]}, None),
        ("rotate", {"degrees": 90}, None),
    ]
    assert calls[1].raw == compact


def test_arguments_written_as_a_json_string_are_accepted():
    (call,) = parse_tool_calls('<tool_call>{"name": "crop", "arguments": "{\\"bbox_2d\\": [1, 2, 3, 4]}"}</tool_call>')
    assert call.arguments == {"bbox_2d": [1, 2, 3, 4]} and call.error is None


def test_no_call():
    assert parse_tool_calls("<answer>[1, 2, 3, 4]</answer>") == []
    assert not has_tool_call("<answer>42</answer> </tool_call>")


@pytest.mark.parametrize(("body", "name", "error"), [
    ('{"name": "crop", "arguments": {"bbox_2d": [1, 2, 3, 4]}', None, "not valid JSON (Expecting ',' delimiter"),
    ("[1, 2]", None, "must be a JSON object"),
    ('{"arguments": {}}', None, 'needs a "name" string'),
    ('{"name": 3, "arguments": {}}', None, 'needs a "name" string'),
    ('{"name": "", "arguments": {}}', None, 'needs a "name" string'),
    ('{"name": "crop"}', "crop", "tool 'crop': \"arguments\" must be a JSON object"),
    ('{"name": "crop", "arguments": [1, 2]}', "crop", '"arguments" must be a JSON object'),
    ('{"name": "crop", "arguments": "[1, 2]"}', "crop", '"arguments" must be a JSON object'),
    ('{"name": "crop", "arguments": "not json"}', "crop", '"arguments" must be a JSON object'),
    ("[" * 100_000, None, "not valid JSON"),
])
def test_malformed_calls_carry_an_error(body, name, error):
    raw = f"<tool_call>{body}</tool_call>"
    (call,) = parse_tool_calls("text " + raw + " more")
    assert call.name == name and call.arguments is None and call.raw == raw
    assert error in call.error


def test_unclosed_final_call_is_malformed_and_earlier_calls_stand():
    calls = parse_tool_calls(CROP + ' then <tool_call>{"name": "crop", "argu')
    assert calls[0].error is None
    assert calls[1].raw == '<tool_call>{"name": "crop", "argu'
    assert calls[1].error == "the tool call is not closed; end it with </tool_call>"


def test_many_opening_tags_parse_fast():
    calls = parse_tool_calls("<tool_call>" * 200_000)
    assert len(calls) == 1 and calls[0].error.startswith("the tool call is not closed")


def _check(calls: list[ToolCall]) -> None:
    for call in calls:
        assert (call.error is None) == (call.name is not None and call.arguments is not None)
        assert call.raw.startswith("<tool_call>")
        assert call.error is None or 0 < len(call.error) < 300


PIECES = st.sampled_from(["<tool_call>", "</tool_call>", '{"name": ', '"crop"', '"arguments": ', "{", "}", "[", "]",
                          '"', ",", ":", " ", "\n", "1", "NaN", "\\", "<", ">", "/"])


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES | st.text(max_size=3), max_size=40).map("".join) | st.text())
def test_fuzz_random_text_never_raises(text):
    _check(parse_tool_calls(text))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(name=JSON_VALUES | st.text(max_size=8), arguments=JSON_VALUES, cut=st.integers(0, 200),
       insert=st.text(max_size=5), drop=st.integers(0, 200))
def test_fuzz_mutated_calls_never_raise(name, arguments, cut, insert, drop):
    body = json.dumps({"name": name, "arguments": arguments})
    valid = f"<tool_call>\n{body}\n</tool_call>"
    calls = parse_tool_calls(valid)
    _check(calls)
    if isinstance(name, str) and name and isinstance(arguments, dict):
        assert calls[0].name == name and calls[0].error is None
    mutated = valid[:cut] + insert + valid[cut + (drop % 4):]
    _check(parse_tool_calls(mutated))
    _check(parse_tool_calls(valid[:cut]))
