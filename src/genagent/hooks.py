"""Lifecycle hooks: observe every step of a run, and replace messages, tool calls and results.

Subclass :class:`Hooks` and override the async ``on_*`` / ``before_*`` / ``after_*`` methods you
need; the others are no-ops. ``Agent(hooks=[a, b])`` runs hooks in list order; a replacement
returned by one hook is what the next one sees. Hook exceptions end the run with a
:class:`~genagent.errors.HookError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from genagent.errors import GenAgentError
from genagent.messages import Message
from genagent.policies._base import PolicyOutput
from genagent.tasks import Task
from genagent.tools._base import ToolProgress, ToolResult
from genagent.trajectory import ToolCall, Trajectory, Turn

if TYPE_CHECKING:
    from genagent.agent import Agent

__all__ = ["HookList", "Hooks", "RunContext"]


@dataclass
class RunContext:
    """The state of one run, handed to every hook.

    Attributes:
        agent: The agent running.
        trajectory: The trajectory so far (live; do not mutate it from hooks).
        completed_rounds: Image rounds completed so far (a round with several candidates counts
            once). ``ToolContext.round`` is the round a tool call is producing: one more.
        turn: Index of the current turn.
        deadline: Clock time at which the budget is spent, if there is a budget.
        state: Free-form per-run storage for hooks.
    """

    agent: Agent
    trajectory: Trajectory
    completed_rounds: int = 0
    turn: int = 0
    deadline: float | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """The trajectory's id."""
        return self.trajectory.id

    @property
    def task(self) -> Task:
        """The run's task."""
        return self.trajectory.task

    def remaining_s(self) -> float | None:
        """Seconds left in the budget, or ``None`` without a budget."""
        if self.deadline is None:
            return None
        return self.deadline - self.agent.clock()


class Hooks:
    """Base class of lifecycle hooks; every method is a no-op until overridden.

    Methods that return a value may return a replacement (or ``None`` to keep the original).
    """

    async def on_run_start(self, ctx: RunContext) -> None:
        """A run starts (the trajectory has its task and metadata, no turns)."""

    async def before_policy(self, ctx: RunContext, messages: list[Message]) -> list[Message] | None:
        """Before a policy call: return a replacement message list to send instead.

        The trajectory records the replacement in ``Turn.sent_messages``; the canonical
        conversation is unchanged.
        """
        return None

    async def after_policy(self, ctx: RunContext, output: PolicyOutput) -> None:
        """After a policy call, before its reply is parsed."""

    async def before_tool(self, ctx: RunContext, call: ToolCall) -> ToolCall | None:
        """Before a tool call: return a replacement call (re-validated against the tool)."""
        return None

    async def after_tool(
        self, ctx: RunContext, call: ToolCall, result: ToolResult
    ) -> ToolResult | None:
        """After a tool call, before its images are stored: return a replacement result."""
        return None

    async def on_turn_end(self, ctx: RunContext, turn: Turn) -> None:
        """A turn is complete (its tool result, if any, recorded)."""

    async def on_run_end(self, ctx: RunContext, trajectory: Trajectory) -> None:
        """The run ended (``trajectory.termination`` is set)."""

    async def on_error(self, ctx: RunContext, error: GenAgentError) -> None:
        """An error occurred: shown to the model (recoverable) or ending the run."""

    def on_tool_progress(self, ctx: RunContext, progress: ToolProgress) -> None:
        """A tool reported progress. Synchronous: it may be called from a worker thread."""


class HookList(Hooks):
    """Several hooks run in order; replacements are chained."""

    def __init__(self, hooks: Sequence[Hooks] = ()) -> None:
        self.hooks = list(hooks)

    async def on_run_start(self, ctx: RunContext) -> None:
        """Call every hook's ``on_run_start``."""
        for hook in self.hooks:
            await hook.on_run_start(ctx)

    async def before_policy(self, ctx: RunContext, messages: list[Message]) -> list[Message] | None:
        """Chain ``before_policy`` replacements."""
        replaced: list[Message] | None = None
        for hook in self.hooks:
            result = await hook.before_policy(ctx, replaced if replaced is not None else messages)
            if result is not None:
                replaced = list(result)
        return replaced

    async def after_policy(self, ctx: RunContext, output: PolicyOutput) -> None:
        """Call every hook's ``after_policy``."""
        for hook in self.hooks:
            await hook.after_policy(ctx, output)

    async def before_tool(self, ctx: RunContext, call: ToolCall) -> ToolCall | None:
        """Chain ``before_tool`` replacements."""
        replaced: ToolCall | None = None
        for hook in self.hooks:
            result = await hook.before_tool(ctx, replaced or call)
            if result is not None:
                replaced = result
        return replaced

    async def after_tool(
        self, ctx: RunContext, call: ToolCall, result: ToolResult
    ) -> ToolResult | None:
        """Chain ``after_tool`` replacements."""
        replaced: ToolResult | None = None
        for hook in self.hooks:
            new = await hook.after_tool(ctx, call, replaced or result)
            if new is not None:
                replaced = new
        return replaced

    async def on_turn_end(self, ctx: RunContext, turn: Turn) -> None:
        """Call every hook's ``on_turn_end``."""
        for hook in self.hooks:
            await hook.on_turn_end(ctx, turn)

    async def on_run_end(self, ctx: RunContext, trajectory: Trajectory) -> None:
        """Call every hook's ``on_run_end``."""
        for hook in self.hooks:
            await hook.on_run_end(ctx, trajectory)

    async def on_error(self, ctx: RunContext, error: GenAgentError) -> None:
        """Call every hook's ``on_error``."""
        for hook in self.hooks:
            await hook.on_error(ctx, error)

    def on_tool_progress(self, ctx: RunContext, progress: ToolProgress) -> None:
        """Call every hook's ``on_tool_progress``."""
        for hook in self.hooks:
            hook.on_tool_progress(ctx, progress)
