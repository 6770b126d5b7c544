"""Tools: the tool contract, and the built-in generators.

``Tool``, ``GenerationTool``, ``EditTool`` and ``@tool`` define the contract; see
``docs/tools.md`` for how to write one.
"""

from genagent.tools._base import (
    EditArgs,
    EditTool,
    GenerationArgs,
    GenerationTool,
    Tool,
    ToolContext,
    ToolProgress,
    ToolResult,
    tool,
)

__all__ = [
    "EditArgs",
    "EditTool",
    "GenerationArgs",
    "GenerationTool",
    "Tool",
    "ToolContext",
    "ToolProgress",
    "ToolResult",
    "tool",
]
