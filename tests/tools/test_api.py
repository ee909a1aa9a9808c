"""The tool API: schemas from type hints and docstrings, argument checks, registry, results."""

from __future__ import annotations

from typing import Literal

import pytest
from PIL import Image

from vlreason.models.adapters import QWEN2_5_VL
from vlreason.registry import PluginError
from vlreason.tools import (
    TOOLS,
    FunctionTool,
    Tool,
    ToolContext,
    ToolError,
    ToolResult,
    as_result,
    get_tool,
    list_tools,
    register_tool,
)
from vlreason.vision.images import ImageInfo


def measure(context: ToolContext, region: list[int], unit: Literal["px", "percent"] = "px", scale: float = 1.0,
            exact: bool = False) -> str:
    """Measure a region
    of the image.

    More detail for developers; not shown to the model.

    Args:
        region: the region as [x1, y1, x2, y2],
            in pixels.
        unit (str): how to report the size.
        scale: a factor applied to the result.

    Returns:
        the size as text.
    """
    return f"{region} {unit} {scale!r} {exact}"


class Stamp(Tool):
    """Write a word on a copy of the first image.

    Args:
        colour: the ink (an option of the class, not an argument for the model).
    """

    name = "stamp"

    def __init__(self, colour: str = "red"):
        if colour not in ("red", "blue"):
            raise ValueError(f"colour must be red or blue, got {colour!r}")
        self.colour = colour

    def run(self, context: ToolContext, word: str, times: int = 1) -> ToolResult:
        """Stamp the word.

        Args:
            word: what to write.
            times: how often.
        """
        return ToolResult(text=f"{word * times} in {self.colour}", images=[context.images[0].copy()])


@pytest.fixture
def context() -> ToolContext:
    return ToolContext(images=[Image.new("RGB", (40, 20))], infos=[ImageInfo((40, 20), (56, 28))],
                       adapter=QWEN2_5_VL, resize=QWEN2_5_VL.resize_policy(3136, 12845056))


def test_schema_from_hints_and_docstring():
    assert FunctionTool(measure).schema() == {"type": "function", "function": {
        "name": "measure",
        "description": "Measure a region of the image.",
        "parameters": {
            "type": "object",
            "properties": {
                "region": {"type": "array", "items": {"type": "integer"},
                           "description": "the region as [x1, y1, x2, y2], in pixels."},
                "unit": {"type": "string", "enum": ["px", "percent"], "description": "how to report the size."},
                "scale": {"type": "number", "description": "a factor applied to the result."},
                "exact": {"type": "boolean"},  # not in Args: no description
            },
            "required": ["region"],
        },
    }}


def test_schema_of_lists_and_integer_choices():
    def pick(context: ToolContext, tags: list[str], weights: list[float], flags: list[bool],
             degrees: Literal[90, 180] = 90) -> str:
        return ""

    assert FunctionTool(pick).parameters["properties"] == {
        "tags": {"type": "array", "items": {"type": "string"}},
        "weights": {"type": "array", "items": {"type": "number"}},
        "flags": {"type": "array", "items": {"type": "boolean"}},
        "degrees": {"type": "integer", "enum": [90, 180]},
    }
    assert FunctionTool(pick).description == ""


def test_class_schema_reads_the_class_docstring_and_run():
    schema = Stamp().schema()["function"]
    assert schema["name"] == "stamp"
    assert schema["description"] == "Write a word on a copy of the first image."
    assert schema["parameters"] == {"type": "object", "required": ["word"], "properties": {
        "word": {"type": "string", "description": "what to write."},
        "times": {"type": "integer", "description": "how often."},
    }}


@pytest.mark.parametrize(("bad", "message"), [
    ("def f(context, x): pass", "argument 'x' has no type hint"),
    ("def f(context, x: dict): pass", "argument 'x' has type <class 'dict'>"),
    ("def f(context, x: list): pass", "argument 'x' has type <class 'list'>"),
    ("def f(context, x: Literal['a', 1]): pass", "argument 'x' has type"),
    ("def f(context, x: Literal[True]): pass", "argument 'x' has type"),
    ("def f(context, x: int | None = None): pass", "argument 'x' has type"),
    ("def f(context, x: 'Missing'): pass", "cannot evaluate the type hints"),
    ("def f(context, **x: int): pass", r"\*args, \*\*kwargs"),
    ("def f(): pass", "must take the ToolContext as its first parameter"),
])
def test_definitions_a_model_cannot_be_told_about(bad, message):
    namespace = {"Literal": Literal}
    exec(bad, namespace)
    with pytest.raises(TypeError, match=message):
        FunctionTool(namespace["f"]).schema()


@pytest.mark.parametrize(("arguments", "message"), [
    ({}, r"missing argument 'region' \(a list of integers\)"),
    ({"region": [1, 2], "scal": 3}, r"unknown argument 'scal'; did you mean scale\? it takes: region, unit, scale"),
    ({"region": [1, 2], "zoom": 3}, r"unknown argument 'zoom'; it takes: region, unit, scale, exact"),
    ({"region": "1, 2"}, "region must be a list of integers, got a string"),
    ({"region": [1, 2.5]}, r"region\[1\] must be an integer, got a number"),
    ({"region": [1, True]}, r"region\[1\] must be an integer, got a boolean"),
    ({"region": [1], "unit": "cm"}, "unit must be one of 'px', 'percent', got 'cm'"),
    ({"region": [1], "scale": "2"}, "scale must be a number, got a string"),
    ({"region": [1], "exact": 1}, "exact must be true or false, got an integer"),
    ({"region": [1], "scale": None}, "scale must be a number, got null"),
    ({"region": [1], "scale": 10**400}, "scale is too large to be a number, got an integer of 401 digits"),
])
def test_bad_arguments_say_what_is_wrong(context, arguments, message):
    tool = FunctionTool(measure)
    with pytest.raises(ToolError, match=r"^measure: " + message):
        tool(context, arguments)


def test_good_arguments_are_checked_and_ints_become_floats(context):
    tool = FunctionTool(measure)
    assert tool(context, {"region": [1, 2], "scale": 2}).text == "[1, 2] px 2.0 False"
    assert tool(context, {"region": [], "unit": "percent", "exact": True}).text == "[] percent 1.0 True"


def test_tool_errors_are_prefixed_with_the_tool_name(context):
    def refuse(context: ToolContext) -> str:
        raise ToolError("not today; ask tomorrow")

    with pytest.raises(ToolError, match="^refuse: not today; ask tomorrow$"):
        FunctionTool(refuse)(context, {})
    with pytest.raises(ToolError, match="^refuse: arguments must be a JSON object, got a list$"):
        FunctionTool(refuse)(context, [])


def test_result_normalisation():
    image = Image.new("RGB", (2, 2))
    assert as_result("text") == ToolResult(text="text")
    assert as_result(image) == ToolResult(images=[image])
    assert as_result(["a", image, ToolResult("b", [image])]) == ToolResult(text="a\nb", images=[image, image])
    assert as_result([]) == ToolResult()
    for bad, kind in (({"a": 1}, "dict"), (None, "NoneType"), ([["nested"]], "list"), (3, "int")):
        with pytest.raises(ToolError, match=f"the tool returned {kind}; a tool returns a str"):
            as_result(bad)


def test_registry_by_name_with_did_you_mean():
    assert "crop" in list_tools()
    assert get_tool("crop").name == "crop"
    with pytest.raises(PluginError, match="unknown tool 'corp'; did you mean crop"):
        get_tool("corp")


def test_registry_by_module_attr(tmp_path, monkeypatch):
    (tmp_path / "tools_for_test_api.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    echo = get_tool("tools_for_test_api:echo")
    assert isinstance(echo, FunctionTool) and echo.name == "echo"  # a plain typed function, wrapped
    assert get_tool("tools_for_test_api:Shout", times=2).name == "shout"
    assert get_tool("vlreason.tools.crop:crop") is TOOLS.resolve("crop")
    with pytest.raises(PluginError, match="is a function and takes no options"):
        get_tool("vlreason.tools.crop:crop", scale=2)
    with pytest.raises(PluginError, match="has no tool 'ecko'; did you mean echo"):
        get_tool("tools_for_test_api:ecko")


def test_registry_by_file_and_class_options(tmp_path, context):
    plugin = tmp_path / "my_tools.py"
    plugin.write_text(PLUGIN)
    echo = get_tool("my_tools.py:echo", base_dir=tmp_path)
    assert echo.schema()["function"]["parameters"]["required"] == ["word"]
    assert echo(context, {"word": "hi"}) == ToolResult(text="hi")
    shout = get_tool("my_tools.py:Shout", base_dir=tmp_path, times=3)
    assert shout(context, {"word": "hi"}).text == "HIHIHI"
    with pytest.raises(PluginError, match=r"bad options \['loud'\].*accepted: times"):
        get_tool("my_tools.py:Shout", base_dir=tmp_path, loud=True)
    with pytest.raises(ValueError, match="tool 'my_tools.py:Shout': times must be positive"):
        get_tool("my_tools.py:Shout", base_dir=tmp_path, times=0)
    with pytest.raises(PluginError, match="resolved to a int; a tool is a typed function"):
        get_tool("my_tools.py:LIMIT", base_dir=tmp_path)
    with pytest.raises(PluginError, match="cannot be described to a model: .*argument 'options' has type"):
        get_tool("my_tools.py:untyped", base_dir=tmp_path)


PLUGIN = '''
from vlreason.tools import Tool


def echo(context, word: str):
    """Say the word back."""
    return word


def untyped(context, options: dict):
    """Not describable."""


class Shout(Tool):
    """Say the word back, loudly."""

    name = "shout"

    def __init__(self, times: int = 1):
        if times < 1:
            raise ValueError(f"times must be positive, got {times}")
        self.times = times

    def run(self, context, word: str):
        return word.upper() * self.times


LIMIT = 3
'''


def test_register_tool_on_functions_and_classes(context):
    @register_tool("test_api_upper")
    def upper(context: ToolContext, word: str) -> str:
        """Upper-case a word."""
        return word.upper()

    assert isinstance(upper, FunctionTool) and upper.fn(context, "a") == "A"
    assert get_tool("test_api_upper") is upper

    @register_tool("test_api_stamp")
    class NamedByRegistry(Stamp):
        """Stamp under another name."""

        name = ""

    assert get_tool("test_api_stamp", colour="blue")(context, {"word": "x"}).text == "x in blue"
    with pytest.raises(ValueError, match="named 'stamp' but registered as 'other'"):
        register_tool("other")(Stamp)
    with pytest.raises(TypeError, match="decorates a typed function or a Tool subclass"):
        register_tool("other")(dict)


def test_class_without_a_name_is_refused():
    class Nameless(Tool):
        """Nothing."""

        def run(self, context: ToolContext) -> str:
            return ""

    with pytest.raises(TypeError, match="tool class Nameless has no name"):
        Nameless().schema()
