"""The policy contract: ``Policy``, ``PolicyOutput`` and ``SamplingParams``.

A policy turns the conversation so far into the next reply. Backends (local transformers,
OpenAI-compatible servers, the scripted test double, the simulator's heuristic policy) all
implement the one coroutine ``generate(messages, *, stop, sampling)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from genagent.messages import Message
from genagent.trajectory import Usage

__all__ = ["Policy", "PolicyOutput", "SamplingParams", "describe_policy"]


class SamplingParams(BaseModel):
    """Sampling settings for a policy call. ``None`` means the backend's default.

    Attributes:
        temperature: Sampling temperature (0 for greedy).
        top_p: Nucleus sampling mass.
        top_k: Top-k sampling.
        max_new_tokens: Most tokens to generate per reply.
        repetition_penalty: Repetition penalty, where the backend supports it.
        seed: Seed for sampling, where the backend supports it.
        extra: Backend-specific settings passed through unchanged.
    """

    model_config = ConfigDict(frozen=True)

    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    max_new_tokens: int = Field(default=2048, gt=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class PolicyOutput(BaseModel):
    """One reply of a policy.

    Attributes:
        text: The reply text, exactly as generated (cut before a matched stop sequence).
        stop: The stop sequence that ended generation, when known.
        finish_reason: ``"stop"``, ``"length"`` or a backend-specific reason.
        prompt_ids: Exact token ids of the prompt, when the backend has them.
        output_ids: Exact generated token ids, when the backend has them.
        logprobs: Log-probability of each generated token, when the backend has them.
        usage: Token counts.
        latency_s: Wall time of the call, as measured by the backend (the agent also times it).
        model: The model that produced the reply.
    """

    text: str
    stop: str | None = None
    finish_reason: str | None = None
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None
    logprobs: list[float] | None = None
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = 0.0
    model: str | None = None


@runtime_checkable
class Policy(Protocol):
    """What the agent needs from a policy.

    Implementations also expose a ``name`` (recorded in trajectories; a plain attribute or a
    read-only property) and may expose ``describe() -> dict`` for richer metadata.
    """

    @property
    def name(self) -> str:
        """The policy's name, as recorded in trajectories."""
        ...

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] = (),
        sampling: SamplingParams | None = None,
    ) -> PolicyOutput:
        """Return the next reply to ``messages``.

        Args:
            messages: The conversation, system message first. Image parts are bound
                ``ImageRef`` objects: ``part.image.read_bytes()`` gives the encoded image.
            stop: Stop sequences; generation ends before (OpenAI style) or at them.
            sampling: Sampling settings.

        Raises:
            PolicyError: If the backend fails.
        """
        ...


def describe_policy(policy: Any) -> dict[str, Any]:
    """A JSON-able summary of a policy for trajectory metadata."""
    describe = getattr(policy, "describe", None)
    if callable(describe):
        info = describe()
        if isinstance(info, dict):
            return info
    return {
        "name": getattr(policy, "name", type(policy).__name__),
        "class": f"{type(policy).__module__}.{type(policy).__qualname__}",
    }
