"""A task: a prompt plus the metadata a judge needs to score images for it.

Benchmarks (GenEval, GenEval++, WISE) and the simulator's task sampler produce tasks; an agent run
accepts a plain prompt or a task. The metadata follows the GenEval convention where it applies:
``include`` / ``exclude`` lists of ``{"class", "count", "color", "position", "region", "size"}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import to_jsonable_python

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

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is blank; say what to generate")
        return prompt

    @field_validator("metadata")
    @classmethod
    def _json_values(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        # JSON values only, so that a trajectory carrying the task saves and loads back equal
        result: dict[str, Any] = to_jsonable_python(metadata, fallback=repr)
        return result

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
