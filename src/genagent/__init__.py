"""genagent: agentic text-to-image generation.

A multimodal LLM (the *policy*) treats image generators as *tools*: it reasons about a request,
writes a detailed caption, calls a generator, looks at the image, judges it, and regenerates,
edits or stops. ``Agent(tool=...).run(prompt)`` returns a :class:`Trajectory`.

The public surface is listed in ``__all__``; everything else is private.
"""

from genagent._version import __version__
from genagent.agent import Agent, FinalStep, PolicyStep, SeedPolicy, Step, ToolStep
from genagent.errors import (
    BudgetExceeded,
    ConfigurationError,
    GenAgentError,
    HookError,
    InvalidImageError,
    ModelVisibleError,
    PolicyError,
    ProtocolError,
    RunError,
    ToolArgumentError,
    ToolDefinitionError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
    TrajectoryError,
)
from genagent.hooks import HookList, Hooks, RunContext
from genagent.images import DirectoryImageStore, ImageRef, ImageStore, MemoryImageStore
from genagent.messages import ImagePart, Message, TextPart
from genagent.policies import (
    FunctionPolicy,
    Policy,
    PolicyOutput,
    SamplingParams,
    ScriptedPolicy,
)
from genagent.protocol import GenAgentProtocol, ProtocolState, ReplyProtocol
from genagent.rewards import (
    CompositeReward,
    PairwiseOutput,
    PairwiseReward,
    Reward,
    RewardContext,
    RewardOutput,
    reward,
)
from genagent.tasks import Task
from genagent.tools import (
    EditTool,
    GenerationTool,
    Tool,
    ToolContext,
    ToolProgress,
    ToolResult,
    tool,
)
from genagent.trajectory import (
    Action,
    ErrorInfo,
    RoundRecord,
    Termination,
    ToolCall,
    ToolOutcome,
    Trajectory,
    Turn,
    Usage,
)

__all__ = [
    "Action",
    "Agent",
    "BudgetExceeded",
    "CompositeReward",
    "ConfigurationError",
    "DirectoryImageStore",
    "EditTool",
    "ErrorInfo",
    "FinalStep",
    "FunctionPolicy",
    "GenAgentError",
    "GenAgentProtocol",
    "GenerationTool",
    "HookError",
    "HookList",
    "Hooks",
    "ImagePart",
    "ImageRef",
    "ImageStore",
    "InvalidImageError",
    "MemoryImageStore",
    "Message",
    "ModelVisibleError",
    "PairwiseOutput",
    "PairwiseReward",
    "Policy",
    "PolicyError",
    "PolicyOutput",
    "PolicyStep",
    "ProtocolError",
    "ProtocolState",
    "ReplyProtocol",
    "Reward",
    "RewardContext",
    "RewardOutput",
    "RoundRecord",
    "RunContext",
    "RunError",
    "SamplingParams",
    "ScriptedPolicy",
    "SeedPolicy",
    "Step",
    "Task",
    "Termination",
    "TextPart",
    "Tool",
    "ToolArgumentError",
    "ToolCall",
    "ToolContext",
    "ToolDefinitionError",
    "ToolExecutionError",
    "ToolOutcome",
    "ToolProgress",
    "ToolRefused",
    "ToolResult",
    "ToolStep",
    "ToolUnavailable",
    "Trajectory",
    "TrajectoryError",
    "Turn",
    "Usage",
    "__version__",
    "reward",
    "tool",
]
