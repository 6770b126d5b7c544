"""Tools: the tool contract, micro-batching, and the built-in local generators.

``Tool``, ``GenerationTool``, ``EditTool`` and ``@tool`` define the contract; see
``docs/tools.md`` for how to write one. ``DiffusersTool`` and the family tools (``FluxTool``,
``SD3Tool``, ``SDXLTool``, ``QwenImageTool``, ``FluxKontextTool``, ``QwenImageEditTool``) run
diffusers pipelines locally (extra ``[diffusers]``; importing them does not import torch, set-up
does); see ``docs/generators.md``.
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
from genagent.tools._batching import BatcherStats, MicroBatcher
from genagent.tools._diffusers import (
    DiffusersEditTool,
    DiffusersTool,
    Family,
    GenerationSettings,
    Lora,
)
from genagent.tools._families import (
    FluxKontextTool,
    FluxTool,
    QwenImageEditTool,
    QwenImageTool,
    SD3Tool,
    SDXLTool,
)

__all__ = [
    "BatcherStats",
    "DiffusersEditTool",
    "DiffusersTool",
    "EditArgs",
    "EditTool",
    "Family",
    "FluxKontextTool",
    "FluxTool",
    "GenerationArgs",
    "GenerationSettings",
    "GenerationTool",
    "Lora",
    "MicroBatcher",
    "QwenImageEditTool",
    "QwenImageTool",
    "SD3Tool",
    "SDXLTool",
    "Tool",
    "ToolContext",
    "ToolProgress",
    "ToolResult",
    "tool",
]
