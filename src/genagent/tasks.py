"""A task: a prompt plus the metadata a judge needs to score images for it.

Benchmarks (GenEval, GenEval++, WISE) and the simulator's task sampler produce tasks; an agent run
accepts a plain prompt or a task. The metadata follows the GenEval convention where it applies:
``include`` / ``exclude`` lists of ``{"class", "count", "color", "position", "region", "size"}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from genagent.errors import ConfigurationError

__all__ = ["Task"]


class Task(BaseModel):
    """A generation request with optional scoring metadata.

    Attributes:
        prompt: The user's request, as the policy sees it.
        id: A stable identifier (benchmark line, sample index).
        category: The benchmark category or tag (``"counting"``, ``"color_attr"``, ...).
        metadata: Anything a judge needs (GenEval ``include`` / ``exclude``, WISE explanation).
    """

    model_config = ConfigDict(frozen=True)

    prompt: str = Field(min_length=1)
    id: str | None = None
    category: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def coerce(cls, value: str | Task) -> Task:
        """Return ``value`` as a task (a string becomes a task with no metadata).

        Raises:
            ConfigurationError: If ``value`` is an empty prompt or neither a str nor a Task.
        """
        if isinstance(value, Task):
            return value
        if not isinstance(value, str):
            raise ConfigurationError(f"a prompt is a str or a Task, got {type(value).__name__}")
        if not value.strip():
            raise ConfigurationError("the prompt is empty; say what to generate")
        return cls(prompt=value)
