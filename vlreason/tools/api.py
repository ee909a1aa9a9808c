"""The tool plugin API.

A tool is a typed function the model can call during a rollout::

    @register_tool("measure")
    def measure(context: ToolContext, unit: Literal["px", "percent"] = "px") -> str:
        \"\"\"Report the size of the first image.

        Args:
            unit: pixels, or percent of the model's pixel budget.
        \"\"\"

The first parameter receives the ``ToolContext`` (the sample's images at original resolution,
their sizes, the model family's box convention and pixel budget, its videos' clips); the others are the arguments
the model writes. Their type hints and the docstring's ``Args:`` section become the JSON schema
shown to the model, and the model's arguments are checked against the hints before the call.

A tool with settings is a small ``Tool`` subclass: ``__init__`` takes the options (as reward
classes do), ``run(self, context, ...)`` is the typed function, the class docstring describes it.

A tool returns text, a PIL image, a ``ToolResult`` or a list of those. It refuses a call by
raising ``ToolError``: its message becomes the observation the model reads, so it says what was
wrong and what to write instead.
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from vlreason.registry import PluginError, Registry, instantiate

if TYPE_CHECKING:
    from vlreason.models.adapters import FamilyAdapter
    from vlreason.vision.images import ImageInfo, ResizePolicy
    from vlreason.vision.video import Clip

TOOLS = Registry("tool", "vlreason.tools")

_SCALARS: dict[type, tuple[str, str]] = {  # Python type -> (JSON schema type, how the model reads it)
    str: ("string", "a string"),
    int: ("integer", "an integer"),
    float: ("number", "a number"),
    bool: ("boolean", "true or false"),
}
_SUPPORTED = "str, int, float, bool, list[str], list[int], list[float], list[bool] or Literal[...] of str or int"
_ARG_LINE = re.compile(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")  # "name (type): description"


class ToolError(Exception):
    """A tool's refusal or a bad argument. The message is shown to the model as the observation,
    so it is short and says what to do, e.g. ``bbox_2d must be 4 numbers [x1, y1, x2, y2], got 3``."""


@dataclass
class ToolResult:
    """What a tool returns to the model: text and/or new images."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class ToolContext:
    """What a tool sees of the sample it acts on.

    Boxes the model writes are in its family's convention; ``adapter.from_model(values, infos[i])``
    maps them to pixels of ``images[i]``.
    """

    images: list[Image.Image]  # the sample's prompt images, RGB, at original resolution
    infos: list[ImageInfo]  # original_size and (model) input_size of each image
    adapter: FamilyAdapter  # the model family: box convention (from_model / to_model)
    resize: ResizePolicy  # the model's pixel budget: factor, min_pixels, max_pixels
    clips: list[Clip] = field(default_factory=list)  # the sample's videos as the prompt showed them


@dataclass(frozen=True)
class Argument:
    """One argument of a tool, read from its signature and docstring."""

    name: str
    hint: Any  # the type hint: a scalar type, list[scalar] or Literal[...]
    required: bool  # no default value
    description: str  # from the docstring's Args: section; may be empty


def as_result(value: Any) -> ToolResult:
    """Normalise what a tool returned: a ``ToolResult``, a str (text), a PIL image, or a list of
    those (texts joined by newlines, images kept in order).

    Raises:
        ToolError: for any other type.
    """
    if isinstance(value, ToolResult):
        return value
    if isinstance(value, str):
        return ToolResult(text=value)
    if isinstance(value, Image.Image):
        return ToolResult(images=[value])
    if isinstance(value, (list, tuple)) and not any(isinstance(v, (list, tuple)) for v in value):
        parts = [as_result(v) for v in value]
        return ToolResult(text="\n".join(p.text for p in parts if p.text), images=[i for p in parts for i in p.images])
    raise ToolError(f"the tool returned {type(value).__name__}; a tool returns a str, a PIL image, a ToolResult "
                    "or a list of those")


class Tool:
    """A function the model can call: a name, a description, typed arguments and ``run``.

    Subclass it for a tool with options: set ``name``, take the options in ``__init__``, and
    write ``run(self, context, ...)`` with typed, documented arguments. The class docstring's
    first paragraph is the description the model reads (or set ``description``). A typed
    function becomes a tool through ``register_tool`` or ``get_tool`` (see ``FunctionTool``).
    """

    name: str = ""

    def run(self, context: ToolContext, **arguments: Any) -> Any:
        """Do the work; return text, an image, a ``ToolResult`` or a list of those."""
        raise NotImplementedError(f"{type(self).__name__} must implement run(self, context, ...)")

    @cached_property
    def description(self) -> str:
        """The first paragraph of the class docstring, on one line."""
        return _first_paragraph(type(self).__doc__)

    @cached_property
    def arguments(self) -> dict[str, Argument]:
        """The arguments the model writes, by name, in signature order.

        Raises:
            TypeError: a parameter without a supported type hint, or ``*args`` / ``**kwargs``.
        """
        return tool_arguments(self._typed_function(), self.name)

    @property
    def parameters(self) -> dict[str, Any]:
        """JSON schema of the arguments: ``{"type": "object", "properties": ..., "required": ...}``."""
        properties = {a.name: _property_schema(a) for a in self.arguments.values()}
        required = [a.name for a in self.arguments.values() if a.required]
        return {"type": "object", "properties": properties, "required": required}

    def schema(self) -> dict[str, Any]:
        """The OpenAI / Qwen function form the chat template lists under ``# Tools``."""
        if not self.name:
            raise TypeError(f"tool class {type(self).__name__} has no name; set the class attribute name = '...'")
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def __call__(self, context: ToolContext, arguments: dict[str, Any]) -> ToolResult:
        """Check the model's ``arguments`` against the type hints, run the tool, normalise its result.

        Raises:
            ToolError: bad arguments, the tool's own refusal or an unusable result, as
                ``"name: message"``. Other exceptions are the tool's bugs and propagate.
        """
        try:
            checked = check_arguments(self.arguments, arguments)
            return as_result(self.run(context, **checked))
        except ToolError as exc:
            raise ToolError(f"{self.name}: {exc}") from exc

    def _typed_function(self) -> Callable[..., Any]:
        """The callable whose signature (after the context) and docstring define the arguments."""
        return self.run


class FunctionTool(Tool):
    """A tool made from a typed function ``fn(context, **arguments)``; its docstring's first
    paragraph is the description and its ``Args:`` section describes the arguments."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        self.description = _first_paragraph(fn.__doc__)

    def run(self, context: ToolContext, **arguments: Any) -> Any:
        return self.fn(context, **arguments)

    def _typed_function(self) -> Callable[..., Any]:
        return self.fn


def _first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, its lines joined by spaces."""
    paragraph = inspect.cleandoc(doc or "").split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def _docstring_args(doc: str | None) -> dict[str, str]:
    """Descriptions from a Google-style ``Args:`` section, continuation lines joined by spaces."""
    lines = inspect.cleandoc(doc or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
    if not starts:
        return {}
    found: dict[str, str] = {}
    current, indent = None, None
    for line in lines[starts[0] + 1:]:
        if line.strip() and not line[0].isspace():
            break  # the next section
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None and line.strip() else indent
        match = _ARG_LINE.fullmatch(line.strip())
        if depth == indent and match:
            current = match.group(1)
            found[current] = match.group(2)
        elif current and line.strip():
            found[current] = f"{found[current]} {line.strip()}".strip()
    return found


def tool_arguments(fn: Callable[..., Any], tool_name: str) -> dict[str, Argument]:
    """The arguments of ``fn(context, ...)``: every parameter after the first, with its hint,
    whether it is required (no default) and its docstring description.

    Raises:
        TypeError: no context parameter, ``*args`` / ``**kwargs``, a missing or unsupported hint.
    """
    parameters = list(inspect.signature(fn).parameters.values())
    if not parameters:
        raise TypeError(f"tool {tool_name!r}: the function must take the ToolContext as its first parameter")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # evaluating string annotations can raise anything
        raise TypeError(f"tool {tool_name!r}: cannot evaluate the type hints ({exc})") from exc
    described = _docstring_args(fn.__doc__)
    arguments = {}
    for parameter in parameters[1:]:
        where = f"tool {tool_name!r}, argument {parameter.name!r}"
        if parameter.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            raise TypeError(f"{where}: *args, **kwargs and positional-only parameters cannot be described to a "
                            "model; list each argument as a typed parameter")
        if parameter.name not in hints:
            raise TypeError(f"{where} has no type hint; annotate it with {_SUPPORTED}")
        _check_hint(hints[parameter.name], where)
        arguments[parameter.name] = Argument(parameter.name, hints[parameter.name],
                                             parameter.default is inspect.Parameter.empty,
                                             described.get(parameter.name, ""))
    return arguments


def _check_hint(hint: Any, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        kinds = {type(a) for a in args}
        if kinds in ({str}, {int}):
            return
    elif origin is list:
        if len(args) == 1 and args[0] in _SCALARS:
            return
    elif hint in _SCALARS:
        return
    raise TypeError(f"{where} has type {hint!r}, which a tool argument cannot have; use {_SUPPORTED}")


def _property_schema(argument: Argument) -> dict[str, Any]:
    schema = _type_schema(argument.hint)
    return schema | {"description": argument.description} if argument.description else schema


def _type_schema(hint: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return {"type": _SCALARS[type(args[0])][0], "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    return {"type": _SCALARS[hint][0]}


def check_arguments(arguments: dict[str, Argument], given: Any) -> dict[str, Any]:
    """Check the model's arguments against the tool's; ints become floats where a float is expected.

    Raises:
        ToolError: not an object, an unknown or missing argument, or a value of the wrong type.
    """
    if not isinstance(given, dict):
        raise ToolError(f"arguments must be a JSON object, got {_json_kind(given)}")
    names = ", ".join(arguments) or "no arguments"
    for key in given:
        if key not in arguments:
            close = difflib.get_close_matches(str(key), list(arguments), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ToolError(f"unknown argument {key!r}; {hint}it takes: {names}")
    for argument in arguments.values():
        if argument.required and argument.name not in given:
            raise ToolError(f"missing argument {argument.name!r} ({_describe(argument.hint)})")
    return {key: _convert(key, value, arguments[key].hint) for key, value in given.items()}


def _convert(name: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if any(type(value) is type(option) and value == option for option in args):
            return value
        raise ToolError(f"{name} must be {_describe(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ToolError(f"{name} must be {_describe(hint)}, got {_json_kind(value)}")
        return [_convert(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if hint is float and type(value) is int:
        if abs(value) > 1e308:  # float() would overflow
            raise ToolError(f"{name} is too large to be a number, got an integer of {len(str(value))} digits")
        return float(value)
    if type(value) is not hint:  # exact: bool is an int subclass, and a bool is no integer here
        raise ToolError(f"{name} must be {_describe(hint)}, got {_json_kind(value)}")
    return value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin is list:
        return "a list of " + {str: "strings", int: "integers", float: "numbers", bool: "booleans"}[args[0]]
    return _SCALARS[hint][1]


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def register_tool(name: str) -> Callable[[Any], Any]:
    """Decorator registering a tool under ``name``, the name the model calls it by.

    On a typed function it returns a ``FunctionTool`` (the function stays reachable as ``.fn``);
    on a ``Tool`` subclass it returns the class, setting its ``name`` when the class has none.

    Example::

        @register_tool("image_size")
        def image_size(context: ToolContext) -> str:
            \"\"\"The width and height of the first image in pixels.\"\"\"
            width, height = context.images[0].size
            return f"{width}x{height}"
    """

    def decorate(target: Any) -> Any:
        if inspect.isclass(target):
            if not issubclass(target, Tool):
                raise TypeError(f"register_tool({name!r}) decorates a typed function or a Tool subclass, "
                                f"not the class {target.__name__}")
            if target.name and target.name != name:
                raise ValueError(f"tool class {target.__name__} is named {target.name!r} but registered as "
                                 f"{name!r}; use one name")
            target.name = name
            return TOOLS.register(name)(target)
        return TOOLS.register(name)(FunctionTool(target, name=name))

    return decorate


def list_tools() -> list[str]:
    """Names of the built-in, registered and entry-point tools."""
    return TOOLS.names()


def get_tool(spec: str, base_dir: str | Path | None = None, **options: Any) -> Tool:
    """Resolve a tool spec (name, ``module:attr`` or ``file.py:attr``) to a ready ``Tool``.

    ``Tool`` subclasses are instantiated with ``options``; plain typed functions are wrapped in a
    ``FunctionTool`` and take no options. The schema is built here, so a tool the model cannot be
    told about fails at start-up.

    Raises:
        PluginError: unknown spec, bad options, options for a function, or a broken definition.
    """
    tool = _instantiate(spec, TOOLS.resolve(spec, base_dir), options)
    try:
        tool.schema()
    except TypeError as exc:
        raise PluginError(f"tool {spec!r} cannot be described to a model: {exc}") from exc
    return tool


def _instantiate(spec: str, target: Any, options: dict[str, Any]) -> Tool:
    if inspect.isclass(target) and issubclass(target, Tool):
        return instantiate(target, options, "tool", spec)
    if options:
        raise PluginError(f"tool {spec!r} is a function and takes no options (got {sorted(options)}); "
                          "put settings in a Tool subclass")
    if isinstance(target, Tool):
        return target
    if inspect.isfunction(target):
        return FunctionTool(target)
    raise PluginError(f"tool {spec!r} resolved to a {type(target).__name__}; a tool is a typed function "
                      "fn(context, ...) or a Tool subclass")
