"""Tools: the plugin API (``register_tool``, ``get_tool``, ``Tool``), tool-call parsing, and the
built-in tools: ``crop`` (its geometry: ``vision.crops``) and ``select_frames`` (videos)."""

from vlreason.tools import crop, frames  # noqa: F401  (register built-ins)
from vlreason.tools.api import (
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
from vlreason.tools.parsing import ToolCall, has_tool_call, parse_tool_calls

__all__ = [
    "TOOLS",
    "FunctionTool",
    "Tool",
    "ToolCall",
    "ToolContext",
    "ToolError",
    "ToolResult",
    "as_result",
    "get_tool",
    "has_tool_call",
    "list_tools",
    "parse_tool_calls",
    "register_tool",
]
