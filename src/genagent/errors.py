"""The one exception tree of genagent.

Every error genagent raises derives from :class:`GenAgentError`. There are three branches, and the
branch says who can act on the error:

```text
GenAgentError
├── ModelVisibleError          the policy sees it and may recover (Agent(max_retries=...) bounds it)
│   ├── ProtocolError          an unusable reply (no tool call, bad JSON, unknown tool, ...)
│   ├── ToolArgumentError      arguments a tool rejected after validation
│   ├── ToolRefused            the generator refused the request (moderation, safety filter)
│   └── ToolExecutionError     the tool failed in a way a new call may avoid (unreadable image, ...)
├── RunError                   ends the run; carries the partial Trajectory in ``.trajectory``
│   ├── ToolUnavailable        the tool cannot serve calls (missing weights, server down, a bug)
│   ├── PolicyError            the policy backend failed (server error, out of scripted replies)
│   ├── HookError              a user hook raised
│   └── BudgetExceeded         raised inside tools/policies to stop work when the budget is spent
└── Usage errors               mistakes in how genagent is called or configured
    ├── ConfigurationError     an invalid Agent / tool / policy configuration
    │   └── ToolDefinitionError   a malformed Tool class, raised when the class is defined
    ├── TrajectoryError        a trajectory folder that cannot be read or written (names the file)
    └── InvalidImageError      bytes that are not a readable image, or an image over the size limits
```

How the agent loop treats them:

* A ``ModelVisibleError`` becomes a message to the policy and is recorded on the turn. The
  policy gets ``max_retries`` retries: error number ``max_retries + 1`` in a row ends the run
  with ``termination="error"``; the trajectory is returned, not raised, because the failure is
  the policy's and is itself a result.
* ``BudgetExceeded`` ends the run with ``termination="budget"``; the trajectory is returned.
* Any other ``RunError`` is raised from ``Agent.run`` with the partial trajectory attached, because
  the failure is the infrastructure's. ``run_batch`` records it on that run's trajectory instead.
  An unexpected exception from a custom component becomes a plain ``RunError`` the same way
  (the original chained as ``__cause__``), so that one broken run does not sink a batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genagent.trajectory import Trajectory

__all__ = [
    "BudgetExceeded",
    "ConfigurationError",
    "GenAgentError",
    "HookError",
    "InvalidImageError",
    "ModelVisibleError",
    "PolicyError",
    "ProtocolError",
    "RunError",
    "ToolArgumentError",
    "ToolDefinitionError",
    "ToolExecutionError",
    "ToolRefused",
    "ToolUnavailable",
    "TrajectoryError",
]


class GenAgentError(Exception):
    """Root of every error genagent raises."""


# --------------------------------------------------------------------------- model-visible


class ModelVisibleError(GenAgentError):
    """An error the policy is shown so that it can correct itself.

    Args:
        message: What went wrong, written for the model (and the user reading the trajectory).
        hint: Optional advice on how to fix it, appended to what the model sees.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def for_model(self) -> str:
        """Return the text shown to the policy."""
        return f"{self.message} {self.hint}" if self.hint else self.message


class ProtocolError(ModelVisibleError):
    """A policy reply that the protocol cannot turn into an action.

    Args:
        message: What is wrong with the reply.
        hint: How to write the reply instead.
        reply_excerpt: The offending part of the reply, for the record.
    """

    def __init__(
        self, message: str, *, hint: str | None = None, reply_excerpt: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.reply_excerpt = reply_excerpt


class ToolArgumentError(ModelVisibleError):
    """Arguments that a tool rejected (beyond what its ``Args`` schema checks)."""


class ToolRefused(ModelVisibleError):
    """The generator refused the request, e.g. a moderation or safety filter.

    The model sees the refusal and can answer with a new caption.
    """


class ToolExecutionError(ModelVisibleError):
    """A tool call failed in a way that another call may avoid (e.g. an unreadable image)."""


# --------------------------------------------------------------------------- run-ending


class RunError(GenAgentError):
    """An error that ends the run. The partial trajectory is attached as ``.trajectory``.

    Args:
        message: What went wrong and what to try.
        trajectory: The trajectory up to the failure, when there is one.
    """

    def __init__(self, message: str, *, trajectory: Trajectory | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.trajectory = trajectory


class ToolUnavailable(RunError):
    """The tool cannot serve calls: missing weights, a server that is down, a bug in the tool."""


class PolicyError(RunError):
    """The policy backend failed: a server error, an exhausted script, a malformed response."""


class HookError(RunError):
    """A user hook raised an exception; the original is chained as ``__cause__``."""


class BudgetExceeded(RunError):
    """The run's time budget is spent.

    Tools and policies raise it (see ``ToolContext.check_budget``) to stop long work early; the
    agent then ends the run with ``termination="budget"`` and returns the trajectory.
    """


# --------------------------------------------------------------------------- usage


class ConfigurationError(GenAgentError, ValueError):
    """An invalid configuration of an agent, tool, policy or reward."""


class ToolDefinitionError(ConfigurationError, TypeError):
    """A malformed tool definition, raised when the class (or ``@tool`` function) is defined."""


class TrajectoryError(GenAgentError):
    """A trajectory folder that cannot be read or written.

    Args:
        message: What is wrong.
        path: The file at fault.
    """

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        full = f"{path}: {message}" if path is not None else message
        super().__init__(full)
        self.message = full


class InvalidImageError(GenAgentError, ValueError):
    """Bytes that are not a readable image, or an image beyond the configured size limits."""
