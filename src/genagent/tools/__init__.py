"""Tools: the tool contract, micro-batching, and the built-in local generators.

``Tool``, ``GenerationTool``, ``EditTool`` and ``@tool`` define the contract; see
``docs/tools.md`` for how to write one. ``DiffusersTool`` and the family tools (``FluxTool``,
``SD3Tool``, ``SDXLTool``, ``QwenImageTool``, ``FluxKontextTool``, ``QwenImageEditTool``) run
diffusers pipelines locally (extra ``[diffusers]``; importing them does not import torch, set-up
does); see ``docs/generators.md``. The remote adapters (``GenAgentServerTool``, ...) live in
``genagent.tools.http`` and are importable from here too (loaded on first use).
"""

from typing import Any

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

_REMOTE = (
    "A1111EditTool",
    "A1111Tool",
    "BFLEditTool",
    "BFLTool",
    "ComfyUIEditTool",
    "ComfyUITool",
    "FalEditTool",
    "FalTool",
    "GenAgentServerEditTool",
    "GenAgentServerTool",
    "OpenAIImageEditTool",
    "OpenAIImagesTool",
    "RemoteTool",
    "ReplicateEditTool",
    "ReplicateTool",
)


def __getattr__(name: str) -> Any:
    # the HTTP adapters import httpx: only when asked for, so `import genagent` stays light
    if name in _REMOTE:
        from genagent.tools import http

        return getattr(http, name)
    raise AttributeError(f"module 'genagent.tools' has no attribute {name!r}")


__all__ = [
    "A1111EditTool",
    "A1111Tool",
    "BFLEditTool",
    "BFLTool",
    "BatcherStats",
    "ComfyUIEditTool",
    "ComfyUITool",
    "DiffusersEditTool",
    "DiffusersTool",
    "EditArgs",
    "EditTool",
    "FalEditTool",
    "FalTool",
    "Family",
    "FluxKontextTool",
    "FluxTool",
    "GenAgentServerEditTool",
    "GenAgentServerTool",
    "GenerationArgs",
    "GenerationSettings",
    "GenerationTool",
    "Lora",
    "MicroBatcher",
    "OpenAIImageEditTool",
    "OpenAIImagesTool",
    "QwenImageEditTool",
    "QwenImageTool",
    "RemoteTool",
    "ReplicateEditTool",
    "ReplicateTool",
    "SD3Tool",
    "SDXLTool",
    "Tool",
    "ToolContext",
    "ToolProgress",
    "ToolResult",
    "tool",
]
