"""The agent: configuration, and the multi-turn loop that runs it.

An :class:`Agent` holds what to do (policy, tools, protocol, limits, judge, hooks); ``run``,
``arun``, ``run_batch`` and ``iter`` do it. One run:

```text
prompt -> policy.generate(messages) -> reply -> protocol.parse -> tool call -> tool(args, ctx)
   ^                                                                               |
   +------------- observation message (<tool_response> image </tool_response>) <--+
                                              ... until <answer>, max_rounds, max_turns, budget
```

Every step is recorded as a :class:`~genagent.trajectory.Turn` and shown to the hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
import os
import random
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from genagent._async import run_sync
from genagent._version import __version__
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
    ToolExecutionError,
    ToolUnavailable,
)
from genagent.hooks import HookList, Hooks, RunContext
from genagent.images import ImageRef, ImageStore, MemoryImageStore
from genagent.messages import Message
from genagent.policies._base import Policy, PolicyOutput, SamplingParams, describe_policy
from genagent.protocol import GenAgentProtocol, ProtocolState, ReplyProtocol
from genagent.rewards._base import Reward, RewardContext
from genagent.rewards._output import RewardOutput
from genagent.tasks import Task
from genagent.tools._base import (
    Tool,
    ToolContext,
    ToolProgress,
    ToolResult,
    coerce_tool_result,
)
from genagent.trajectory import (
    Action,
    ErrorInfo,
    Termination,
    ToolCall,
    ToolOutcome,
    Trajectory,
    Turn,
)

__all__ = ["Agent", "FinalStep", "PolicyStep", "SeedPolicy", "Step", "ToolStep"]

logger = logging.getLogger("genagent")

SeedPolicy = Literal["per_round", "fixed", "random"]
T = TypeVar("T")
_SEED_LIMIT = 2**31 - 1
_RESERVED_METADATA = frozenset({"genagent_version", "policy", "tools", "protocol", "agent", "seed"})


@dataclass(frozen=True)
class PolicyStep:
    """The policy replied; ``turn.action`` is the parsed action, or ``turn.error`` says why not.

    Attributes:
        turn: The turn (live: its tool result is filled in by a later ``ToolStep``).
        output: The raw policy output.
    """

    turn: Turn
    output: PolicyOutput


@dataclass(frozen=True)
class ToolStep:
    """A tool call finished: images were produced, or ``outcome.error`` says what failed.

    Attributes:
        turn: The turn that made the call.
        call: The call as executed (after hooks).
        outcome: What was recorded.
        images: The images produced (all candidates).
    """

    turn: Turn
    call: ToolCall
    outcome: ToolOutcome
    images: tuple[ImageRef, ...]


@dataclass(frozen=True)
class FinalStep:
    """The run ended; ``trajectory.termination`` says why."""

    trajectory: Trajectory


Step = PolicyStep | ToolStep | FinalStep
"""What ``Agent.iter`` yields."""


class Agent:
    """An agentic text-to-image generator: a policy that calls image tools, judges and refines.

    Configuration only; ``run`` / ``arun`` / ``run_batch`` / ``iter`` execute it. An agent is
    safe to share between concurrent runs.

    Args:
        tool: The tool, or a list of tools (e.g. a generator and an editor). Default: the
            offline simulator's tools (``SceneTool`` and ``SceneEditTool``).
        tools: Alternative spelling of ``tool`` for several tools.
        policy: The policy, or a spec string as ``GENAGENT_POLICY`` takes it (a server URL, a
            registry name, a model id or folder). Default: ``$GENAGENT_POLICY``, else the
            simulator's ``HeuristicPolicy`` when every tool is a simulator tool, else the
            GenAgent weights.
        protocol: The reply protocol (default: :class:`~genagent.protocol.GenAgentProtocol`).
        max_rounds: Most images (tool calls that produce images) per run.
        max_turns: Most policy calls per run (default ``2 * max_rounds + 2``).
        time_budget_s: Wall-clock budget per run; when spent the run ends with
            ``termination="budget"``.
        candidates: Images per tool call (width scaling). With a ``judge``, the best one
            continues the run; without, the policy sees them all and the first continues.
        judge: A :class:`~genagent.rewards.Reward` that picks the best candidate.
        show_candidates: ``"selected"`` (only the chosen image is shown to the policy) or
            ``"all"``. Default: ``"selected"`` with a judge, ``"all"`` without.
        rewards: Rewards computed on the final image of every run, stored in
            ``Trajectory.rewards`` (a mapping name -> reward, or a list named by ``reward.name``).
        max_retries: Consecutive unusable replies or model-visible tool errors tolerated before
            the run ends with ``termination="error"``.
        sampling: Sampling settings for the policy.
        seed: Base seed of every run (``None``: a random one per run, recorded).
        seed_policy: ``"per_round"`` (a new seed each round, derived from the base seed),
            ``"fixed"`` (the base seed every round, as the GenAgent authors did) or ``"random"``.
        hooks: A :class:`~genagent.hooks.Hooks` or a list of them, run in order.
        image_store: Factory of the store each run puts its images in (default: in memory).
        clock: Monotonic clock used for budgets (injectable for tests).

    Example:
        ```python
        from genagent import Agent

        trajectory = Agent().run("three red apples left of a blue cup", seed=0)
        print(trajectory.termination, trajectory.num_rounds)
        ```
    """

    def __init__(
        self,
        tool: Tool | Sequence[Tool] | None = None,
        *,
        tools: Sequence[Tool] | None = None,
        policy: Policy | str | None = None,
        protocol: ReplyProtocol | None = None,
        max_rounds: int = 3,
        max_turns: int | None = None,
        time_budget_s: float | None = None,
        candidates: int = 1,
        judge: Reward | None = None,
        show_candidates: Literal["selected", "all"] | None = None,
        rewards: Mapping[str, Reward] | Sequence[Reward] = (),
        max_retries: int = 2,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        seed_policy: SeedPolicy = "per_round",
        hooks: Hooks | Sequence[Hooks] = (),
        image_store: Callable[[], ImageStore] = MemoryImageStore,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tools: dict[str, Tool] = _resolve_tools(tool, tools)
        self.policy: Policy = _resolve_policy(policy, self.tools)
        if protocol is not None and not isinstance(protocol, ReplyProtocol):
            raise ConfigurationError(f"protocol must be a ReplyProtocol, got {protocol!r}")
        self.protocol: ReplyProtocol = protocol if protocol is not None else GenAgentProtocol()
        self.max_rounds = _positive_int("max_rounds", max_rounds)
        self.max_turns = _positive_int(
            "max_turns", max_turns if max_turns is not None else 2 * self.max_rounds + 2
        )
        if time_budget_s is not None and not (
            isinstance(time_budget_s, (int, float))
            and not isinstance(time_budget_s, bool)
            and math.isfinite(time_budget_s)
            and time_budget_s > 0
        ):
            raise ConfigurationError(
                f"time_budget_s must be a positive number of seconds, got {time_budget_s!r}"
            )
        self.time_budget_s = time_budget_s
        self.candidates = _positive_int("candidates", candidates)
        if judge is not None and not isinstance(judge, Reward):
            raise ConfigurationError(f"judge must be a Reward, got {type(judge).__name__}")
        self.judge = judge
        if show_candidates not in (None, "selected", "all"):
            raise ConfigurationError(
                f"show_candidates must be 'selected' or 'all', got {show_candidates!r}"
            )
        self.show_candidates: Literal["selected", "all"] = show_candidates or (
            "selected" if judge is not None else "all"
        )
        self.rewards: dict[str, Reward] = _resolve_rewards(rewards)
        self.max_retries = _positive_int("max_retries", max_retries, minimum=0)
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ConfigurationError(f"sampling must be SamplingParams, got {sampling!r}")
        self.sampling = sampling or SamplingParams()
        self.seed = _seed(seed)
        if seed_policy not in ("per_round", "fixed", "random"):
            raise ConfigurationError(
                f"seed_policy must be 'per_round', 'fixed' or 'random', got {seed_policy!r}"
            )
        self.seed_policy: SeedPolicy = seed_policy
        hook_list = [hooks] if isinstance(hooks, Hooks) else list(hooks)
        for hook in hook_list:
            if not isinstance(hook, Hooks):
                raise ConfigurationError(f"hooks must be Hooks instances, got {hook!r}")
        self.hooks = HookList(hook_list)
        self.image_store = image_store
        self.clock = clock

    # ------------------------------------------------------------------ public API

    def run(
        self,
        prompt: str | Task,
        *,
        seed: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Trajectory:
        """Run the agent on one request and return its trajectory.

        Works from plain scripts and from notebooks (where an event loop is already running).

        Args:
            prompt: The request, or a :class:`~genagent.tasks.Task` with scoring metadata.
            seed: Base seed of this run (overrides the agent's).
            metadata: Extra metadata recorded on the trajectory.

        Raises:
            RunError: ``ToolUnavailable``, ``PolicyError`` or ``HookError`` when the run cannot
                go on; ``error.trajectory`` holds the partial trajectory.
        """
        return run_sync(self._closing(self.arun(prompt, seed=seed, metadata=metadata)))

    async def arun(
        self,
        prompt: str | Task,
        *,
        seed: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Trajectory:
        """Async :meth:`run`."""
        final: Trajectory | None = None
        async with contextlib.aclosing(self.iter(prompt, seed=seed, metadata=metadata)) as steps:
            async for step in steps:
                if isinstance(step, FinalStep):
                    final = step.trajectory
        assert final is not None  # the loop always ends with a FinalStep or raises
        return final

    def run_batch(
        self,
        prompts: Iterable[str | Task],
        *,
        concurrency: int = 8,
        seeds: Iterable[int | None] | None = None,
        metadata: Mapping[str, Any] | None = None,
        raise_errors: bool = False,
        progress: bool | None = None,
    ) -> list[Trajectory]:
        """Run many requests with at most ``concurrency`` runs in flight; results in order.

        Args:
            prompts: Requests or tasks.
            concurrency: Most runs in flight at once.
            seeds: One base seed per prompt (default: the agent's seed policy).
            metadata: Extra metadata recorded on every trajectory.
            raise_errors: Re-raise the first run-ending error instead of recording it on that
                run's trajectory (``termination="error"``).
            progress: Show a progress bar (default: when standard error is a terminal).
        """
        return run_sync(
            self._closing(
                self.arun_batch(
                    prompts,
                    concurrency=concurrency,
                    seeds=seeds,
                    metadata=metadata,
                    raise_errors=raise_errors,
                    progress=progress,
                )
            )
        )

    async def aclose(self) -> None:
        """Release what the tools, the policy and the judge hold on the running event loop.

        ``run`` and ``run_batch`` call this before their event loop ends. Call it yourself when
        you drive ``arun`` / ``iter`` from an event loop that is about to close.
        """
        parts: list[Any] = [*self.tools.values(), self.policy, self.judge]
        for part in parts:
            close = getattr(part, "aclose", None)
            if close is not None and inspect.iscoroutinefunction(close):
                try:
                    await close()
                except Exception as exc:  # closing must not hide the run's own result
                    logger.warning("closing %r failed: %s", part, exc)

    async def _closing(self, work: Awaitable[T]) -> T:
        try:
            return await work
        finally:
            await self.aclose()

    async def arun_batch(
        self,
        prompts: Iterable[str | Task],
        *,
        concurrency: int = 8,
        seeds: Iterable[int | None] | None = None,
        metadata: Mapping[str, Any] | None = None,
        raise_errors: bool = False,
        progress: bool | None = None,
    ) -> list[Trajectory]:
        """Async :meth:`run_batch`."""
        from genagent._progress import progress_bar

        if isinstance(prompts, (str, Task)):
            raise ConfigurationError(
                "run_batch takes a list of prompts; use run() (or arun()) for a single one"
            )
        tasks = [Task.coerce(p) for p in prompts]
        _positive_int("concurrency", concurrency)
        seed_list = [_seed(s) for s in seeds] if seeds is not None else None
        if seed_list is not None and len(seed_list) != len(tasks):
            raise ConfigurationError(f"got {len(seed_list)} seeds for {len(tasks)} prompts")
        semaphore = asyncio.Semaphore(concurrency)
        results: list[Trajectory | None] = [None] * len(tasks)

        with progress_bar(len(tasks), "runs", enabled=progress) as advance:

            async def one(i: int) -> None:
                async with semaphore:
                    seed = seed_list[i] if seed_list is not None else None
                    try:
                        results[i] = await self.arun(tasks[i], seed=seed, metadata=metadata)
                    except RunError as exc:
                        if raise_errors or exc.trajectory is None:
                            raise
                        results[i] = exc.trajectory
                    finally:
                        advance()

            await _gather_or_cancel([one(i) for i in range(len(tasks))])
        return [r for r in results if r is not None]

    async def iter(
        self,
        prompt: str | Task,
        *,
        seed: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AsyncGenerator[Step, None]:
        """Run the agent step by step, yielding typed steps.

        Yields a :class:`PolicyStep` per policy reply, a :class:`ToolStep` per tool call, and a
        final :class:`FinalStep`.

        Stopping the iteration early ends the run with ``termination="cancelled"``.

        Example:
            ```python
            import asyncio
            from genagent import Agent, FinalStep

            async def main():
                async for step in Agent().iter("two cats", seed=1):
                    if isinstance(step, FinalStep):
                        print(step.trajectory.termination)

            asyncio.run(main())
            ```
        """
        reserved = _RESERVED_METADATA.intersection(metadata or {})
        if reserved:
            raise ConfigurationError(
                f"metadata keys {sorted(reserved)} are recorded by genagent itself; choose "
                "other names"
            )
        run = _Run(self, Task.coerce(prompt), _seed(seed), metadata)
        # Close the inner generator with this one, so that stopping early records the
        # cancellation now rather than whenever the inner generator is garbage-collected.
        async with contextlib.aclosing(run.steps()) as steps:
            async for step in steps:
                yield step

    # ------------------------------------------------------------------ helpers

    def derive_seeds(self, base_seed: int, round_number: int, count: int, /) -> list[int]:
        """The seeds of ``count`` images of round ``round_number`` (1-based), per the policy."""
        if self.seed_policy == "random":
            rng = random.SystemRandom()
            return [rng.randrange(_SEED_LIMIT) for _ in range(count)]
        if self.seed_policy == "fixed":
            return [(base_seed + i) % _SEED_LIMIT for i in range(count)]
        return [_hash_seed(base_seed, round_number, i) for i in range(count)]

    def describe(self) -> dict[str, Any]:
        """The agent's settings, as recorded in trajectory metadata."""
        return {
            "max_rounds": self.max_rounds,
            "max_turns": self.max_turns,
            "time_budget_s": self.time_budget_s,
            "candidates": self.candidates,
            "judge": self.judge.describe() if self.judge is not None else None,
            "show_candidates": self.show_candidates,
            "max_retries": self.max_retries,
            "seed_policy": self.seed_policy,
            "sampling": self.sampling.model_dump(exclude_defaults=True),
        }

    def __repr__(self) -> str:
        return (
            f"Agent(tools={list(self.tools)}, policy={getattr(self.policy, 'name', '?')!r}, "
            f"max_rounds={self.max_rounds})"
        )


# --------------------------------------------------------------------------- the loop


@dataclass
class _ToolTurn:
    call: ToolCall
    outcome: ToolOutcome
    images: tuple[ImageRef, ...] = ()
    error: ModelVisibleError | None = None


class _Run:
    """The state of one run. Private: the public face is ``Agent.iter``."""

    def __init__(
        self,
        agent: Agent,
        task: Task,
        seed: int | None,
        metadata: Mapping[str, Any] | None,
    ) -> None:
        self.agent = agent
        self.store = agent.image_store()
        base_seed = seed if seed is not None else agent.seed
        if base_seed is None:
            base_seed = random.SystemRandom().randrange(_SEED_LIMIT)
        self.base_seed = base_seed
        self.trajectory = Trajectory(
            task=task,
            metadata=_jsonable(
                {
                    "genagent_version": __version__,
                    "policy": describe_policy(agent.policy),
                    "tools": [t.describe() for t in agent.tools.values()],
                    "protocol": agent.protocol.describe(),
                    "agent": agent.describe(),
                    "seed": base_seed,
                    **(dict(metadata) if metadata else {}),
                }
            ),
        )
        self.started = agent.clock()
        deadline = self.started + agent.time_budget_s if agent.time_budget_s is not None else None
        self.ctx = RunContext(agent=agent, trajectory=self.trajectory, deadline=deadline)
        self.conversation: list[Message] = []
        self.current: int | None = None  # index in trajectory.images of the current image
        # the last tool response's outcome and the images it showed (for <select>)
        self.shown: tuple[ToolOutcome, list[ImageRef]] | None = None
        self.retries = 0
        self.termination: Termination | None = None
        self.ended = False  # on_run_end has been called

    # ------------------------------------------------------------------ driver

    async def steps(self) -> AsyncGenerator[Step, None]:
        traj = self.trajectory
        try:
            termination: Termination | None = None
            try:
                async for step in self._loop():
                    yield step
                termination = self.termination
            except BudgetExceeded:  # raised by a hook or a tool to stop the run
                termination = Termination.BUDGET
            await self._finish(termination or Termination.ERROR)
        except RunError as exc:
            await self._fail(exc)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            await self._cancelled()
            raise
        except Exception as exc:
            # A bug in a custom component (or in genagent): end the run like any other failure,
            # with the partial trajectory, so that one broken run does not sink a batch.
            wrapped = RunError(
                f"the run failed unexpectedly: {type(exc).__name__}: {exc} (the original "
                "exception is chained as __cause__)"
            )
            wrapped.__cause__ = exc
            await self._fail(wrapped)
            raise wrapped from exc
        yield FinalStep(trajectory=traj)

    async def _loop(self) -> AsyncGenerator[Step, None]:
        """The turns of the run; sets ``self.termination`` when it stops."""
        agent, traj = self.agent, self.trajectory
        await self._hook(agent.hooks.on_run_start(self.ctx))
        system = Message.system(agent.protocol.system_prompt(list(agent.tools.values())))
        pending = [system, agent.protocol.user_message(traj.task)]
        while self.termination is None:
            if len(traj.turns) >= agent.max_turns:
                self.termination = Termination.MAX_TURNS
                break
            if self._budget_spent():
                self.termination = Termination.BUDGET
                break
            # interrupted until the reply arrives: a call cut short leaves no empty reply
            turn = Turn(index=len(traj.turns), messages=pending, interrupted=True)
            self.ctx.turn = turn.index
            self.conversation.extend(pending)
            traj.turns.append(turn)

            output = await self._call_policy(turn)
            if output is None:
                self.termination = Termination.BUDGET
                await self._hook(agent.hooks.on_turn_end(self.ctx, turn))
                break
            parsed = self._parse(turn)
            yield PolicyStep(turn=turn, output=output)

            error: ModelVisibleError | None = None
            during = "reply"
            if isinstance(parsed, ProtocolError):
                error = parsed
            elif parsed.kind == "answer":
                traj.answer = parsed.answer
                self.termination = Termination.ANSWERED
            else:
                assert parsed.tool_call is not None
                done = await self._tool_turn(turn, parsed.tool_call)
                if done is None:
                    self.termination = Termination.BUDGET
                    await self._hook(agent.hooks.on_turn_end(self.ctx, turn))
                    break
                yield ToolStep(turn=turn, call=done.call, outcome=done.outcome, images=done.images)
                error, during = done.error, "tool"
                if error is None:
                    pending = [self._observation(done)]
                    if self.ctx.completed_rounds >= agent.max_rounds:
                        self.termination = Termination.MAX_ROUNDS
            if error is not None:
                turn.error = ErrorInfo.from_exception(error)
                self.retries += 1
                await self._hook(agent.hooks.on_error(self.ctx, error))
                pending = [agent.protocol.error_message(error, during=during)]
                if self.retries > agent.max_retries:
                    self.termination = Termination.ERROR
                    traj.error = ErrorInfo(
                        type="TooManyRetries",
                        message=f"{self.retries} consecutive unusable turns (max_retries="
                        f"{agent.max_retries}); last: {turn.error.message}",
                    )
            else:
                self.retries = 0
            await self._hook(agent.hooks.on_turn_end(self.ctx, turn))

    def _observation(self, done: _ToolTurn) -> Message:
        record, images = done.outcome, done.images
        if self.agent.show_candidates == "all":
            shown = list(images)
        else:
            shown = [images[record.selected]] if record.selected is not None else []
        self.shown = (record, shown)
        kept = record.selected if len(shown) > 1 and record.selected is not None else 0
        return self.agent.protocol.observation(shown, record.text, kept=kept)

    # ------------------------------------------------------------------ policy

    async def _call_policy(self, turn: Turn) -> PolicyOutput | None:
        agent = self.agent
        messages = list(self.conversation)
        replaced = await self._hook(agent.hooks.before_policy(self.ctx, messages))
        if replaced is not None:
            if not isinstance(replaced, list) or not all(isinstance(m, Message) for m in replaced):
                raise HookError(
                    f"before_policy returned {type(replaced).__name__}; return a list of "
                    "Message or None"
                )
            turn.sent_messages = list(replaced)
            messages = list(replaced)
        start = time.perf_counter()
        try:
            output = await self._within_budget(
                lambda: agent.policy.generate(
                    messages, stop=agent.protocol.stop, sampling=agent.sampling
                )
            )
        except BudgetExceeded:
            return None
        except RunError:
            raise
        except GenAgentError as exc:
            raise PolicyError(f"policy {_name(agent.policy)} failed: {exc}") from exc
        except Exception as exc:
            raise PolicyError(
                f"policy {_name(agent.policy)} raised {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            elapsed = time.perf_counter() - start
            turn.policy_latency_s = elapsed
            self.trajectory.policy_s += elapsed
        if not isinstance(output, PolicyOutput):
            raise PolicyError(
                f"policy {_name(agent.policy)} returned {type(output).__name__}, not a PolicyOutput"
            )
        turn.interrupted = False
        text = _clean_text(output.text)
        turn.reply = text
        turn.reply_suffix = agent.protocol.reply_suffix(output)
        turn.prompt_ids = output.prompt_ids
        turn.output_ids = output.output_ids
        turn.logprobs = output.logprobs
        turn.finish_reason = output.finish_reason
        turn.usage = output.usage
        self.trajectory.usage = self.trajectory.usage + output.usage
        self.conversation.append(turn.assistant_message)
        await self._hook(agent.hooks.after_policy(self.ctx, output))
        return output

    def _parse(self, turn: Turn) -> Action | ProtocolError:
        state = ProtocolState(
            tools=self.agent.tools,
            num_images=len(self.trajectory.images),
            candidates=len(self.shown[1]) if self.shown is not None else 1,
        )
        try:
            action = self.agent.protocol.parse(turn.reply, state)
        except ProtocolError as exc:
            return exc
        turn.action = action
        if action.selected is not None and self.shown is not None and len(self.shown[1]) > 1:
            self._keep(self.shown[0], action.selected - 1, "policy")
        return action

    def _keep(
        self, record: ToolOutcome, position: int, by: Literal["default", "judge", "policy"]
    ) -> None:
        """Make candidate ``position`` of ``record`` the image the run continues with."""
        record.selected = position
        record.selected_by = by
        self.current = record.images[position]
        self.trajectory.final_image_index = self.current

    # ------------------------------------------------------------------ tools

    async def _tool_turn(self, turn: Turn, call: ToolCall) -> _ToolTurn | None:
        """Run the call; ``None`` when the budget ran out."""
        agent, traj = self.agent, self.trajectory
        start = time.perf_counter()
        record = ToolOutcome(tool=call.name)
        turn.tool_result = record
        done = _ToolTurn(call=call, outcome=record)
        try:
            # inside the try: a hook may refuse the call (ToolRefused) for the model to see
            replaced = await self._hook(agent.hooks.before_tool(self.ctx, call), model_visible=True)
            if replaced is not None:
                if not isinstance(replaced, ToolCall):
                    raise HookError(
                        f"before_tool returned {type(replaced).__name__}; return a ToolCall or None"
                    )
                call = done.call = replaced
                record.tool = call.name
                record.call = call
            tool = agent.tools.get(call.name)
            if tool is None:
                raise ProtocolError(
                    f"unknown tool {call.name!r}", hint=f"Available tools: {sorted(agent.tools)}."
                )
            if tool.requires_image and self.current is None:
                # the parser checks this too; a before_tool hook may have swapped the call
                raise ProtocolError(
                    f"{call.name} edits the latest image, but no image exists yet",
                    hint="Generate an image first.",
                )
            try:
                args = tool.parse_args(call.arguments)
            except ValidationError as exc:
                raise ProtocolError(
                    f"invalid arguments for {call.name}: {exc.error_count()} errors"
                ) from None
            result, seeds = await self._execute(tool, call, args)
            replaced_result = await self._hook(
                agent.hooks.after_tool(self.ctx, call, result), model_visible=True
            )
            if replaced_result is not None:
                if not isinstance(replaced_result, ToolResult):
                    raise HookError(
                        f"after_tool returned {type(replaced_result).__name__}; return a "
                        "ToolResult or None"
                    )
                result = _checked_result(replaced_result, "the after_tool hook")
            images = tuple(await self._store(result))
            record.text = result.text
            record.metadata = _jsonable(result.metadata)
            record.seeds = list(result.seeds) if result.seeds is not None else list(seeds)
            if images:
                first = len(traj.images)
                traj.images.extend(images)
                record.images = list(range(first, first + len(images)))
                scores, best = await self._select(images)
                record.scores = scores
                self.ctx.completed_rounds += 1
                record.round = self.ctx.completed_rounds
                self._keep(record, best, "judge" if scores is not None else "default")
                done.images = images
            elif record.text is None:
                raise ToolExecutionError(f"{call.name} returned neither an image nor text")
        except ModelVisibleError as exc:
            record.error = ErrorInfo.from_exception(exc)
            done.error = exc
        except BudgetExceeded:
            return None
        finally:
            record.latency_s = time.perf_counter() - start
            traj.tool_s += record.latency_s
        return done

    async def _execute(
        self, tool: Tool, call: ToolCall, args: BaseModel
    ) -> tuple[ToolResult, list[int]]:
        agent = self.agent
        try:
            await self._within_budget(tool.ensure_setup)
        except (BudgetExceeded, ToolUnavailable):
            raise
        except Exception as exc:
            raise ToolUnavailable(
                f"tool {call.name} failed to set up: {type(exc).__name__}: {exc}"
            ) from exc
        round_ = self.ctx.completed_rounds + 1
        seeds = agent.derive_seeds(self.base_seed, round_, agent.candidates)
        per_call = max(1, tool.max_images_per_call)
        chunks = [seeds[i : i + per_call] for i in range(0, len(seeds), per_call)]
        current = self.trajectory.images[self.current] if self.current is not None else None

        def progress(p: ToolProgress) -> None:
            progress_event = p if p.tool else ToolProgress(call.name, p.step, p.total, p.info)
            try:
                agent.hooks.on_tool_progress(self.ctx, progress_event)
            except GenAgentError:
                raise
            except Exception as exc:
                raise HookError(
                    f"hook on_tool_progress raised {type(exc).__name__}: {exc}"
                ) from exc

        async def one(chunk: list[int]) -> ToolResult:
            ctx = ToolContext(
                run_id=self.trajectory.id,
                task=self.trajectory.task,
                round=round_,
                num_images=len(chunk),
                seeds=chunk,
                seed_policy=agent.seed_policy,
                images=tuple(self.trajectory.images),
                current_image=current,
                deadline=self.ctx.deadline,
                clock=agent.clock,
                state=self.ctx.state,
                progress_callback=progress,
            )
            try:
                result: Any = await tool.invoke(args, ctx)
            except (ModelVisibleError, RunError):
                raise
            except InvalidImageError as exc:
                raise ToolExecutionError(
                    f"the tool returned an unreadable image: {exc}",
                    hint="Try the call again, perhaps with a different caption.",
                ) from exc
            except Exception as exc:
                raise ToolUnavailable(
                    f"tool {call.name} raised {type(exc).__name__}: {exc}"
                ) from exc
            # acall implementations may return an image or a list of images
            return _checked_result(coerce_tool_result(result), f"tool {call.name}")

        results = await self._within_budget(lambda: _gather_or_cancel([one(c) for c in chunks]))
        merged = ToolResult(
            images=[img for r in results for img in r.images],
            text="\n".join(r.text for r in results if r.text) or None,
            seeds=_merge_seeds(results, chunks),
            metadata=results[0].metadata
            if len(results) == 1
            else {"calls": [r.metadata for r in results]},
        )
        return merged, seeds

    async def _store(self, result: ToolResult) -> list[ImageRef]:
        # Encoding a PIL image and decoding every stored image take milliseconds (about 0.1 s
        # and 30 ms for a 1024 px PNG; a small file may hide a huge image): always off the
        # event loop, so that concurrent runs are not stalled by them.
        if not result.images:
            return []
        return await asyncio.to_thread(self._store_sync, result)

    def _store_sync(self, result: ToolResult) -> list[ImageRef]:
        refs: list[ImageRef] = []
        for i, image in enumerate(result.images):
            try:
                refs.append(self.store.put(image))
            except InvalidImageError as exc:
                raise ToolExecutionError(
                    f"the tool returned an unreadable image (#{i + 1}): {exc}",
                    hint="Try the call again, perhaps with a different caption.",
                ) from exc
            except (TypeError, AttributeError) as exc:
                raise ToolUnavailable(
                    f"the tool returned {type(image).__name__} as an image; tools return PIL "
                    "images, encoded bytes or ImageRefs"
                ) from exc
        return refs

    async def _select(self, images: Sequence[ImageRef]) -> tuple[list[float | None] | None, int]:
        """The judge's scores and the best candidate.

        The first candidate when there is no judge, or when the budget runs out while judging.
        """
        judge = self.agent.judge
        if judge is None or len(images) < 2:
            return None, 0

        async def score(ref: ImageRef) -> RewardOutput:
            image = await asyncio.to_thread(ref.open)
            context = RewardContext(
                task=self.trajectory.task,
                trajectory=self.trajectory,
                round=self.ctx.completed_rounds + 1,
                image_ref=ref,
            )
            return await judge.safe_ascore(self.trajectory.prompt, image, context)

        try:
            outputs = await self._within_budget(
                lambda: asyncio.gather(*(score(ref) for ref in images))
            )
        except BudgetExceeded:
            return None, 0  # the loop ends with "budget" at its next check
        scores = [o.score for o in outputs]
        best = max(
            range(len(scores)),
            key=lambda i: (scores[i] is not None, scores[i] or 0.0, -i),
        )
        return scores, best

    # ------------------------------------------------------------------ endings

    async def _finish(self, termination: Termination) -> None:
        self._finalize(termination)
        traj = self.trajectory
        if self.agent.rewards:
            traj.rewards = await self._final_rewards()
            traj.wall_s = self.agent.clock() - self.started  # rewards are part of the run
        self.ended = True
        await self._hook(self.agent.hooks.on_run_end(self.ctx, traj))

    async def _fail(self, exc: RunError) -> None:
        """Record a run-ending error (also one raised by ``on_run_end``, which is not re-run)."""
        traj = self.trajectory
        traj.error = ErrorInfo.from_exception(exc)
        self._finalize(Termination.ERROR)
        exc.trajectory = traj
        try:
            await self.agent.hooks.on_error(self.ctx, exc)
            if not self.ended:
                self.ended = True
                await self.agent.hooks.on_run_end(self.ctx, traj)
        except Exception:
            logger.exception("a hook failed while handling %s", type(exc).__name__)

    async def _cancelled(self) -> None:
        self._finalize(Termination.CANCELLED)
        if not self.ended:
            self.ended = True
            try:
                await self.agent.hooks.on_run_end(self.ctx, self.trajectory)
            except Exception:
                logger.exception("a hook failed in on_run_end of a cancelled run")

    def _finalize(self, termination: Termination) -> None:
        traj = self.trajectory
        traj.termination = termination
        traj.final_image_index = self.current
        traj.wall_s = self.agent.clock() - self.started
        # described again at the end: a policy may only learn its model during the run (a
        # server's model discovered from /v1/models, weights loaded on the first call)
        traj.metadata["policy"] = _jsonable(describe_policy(self.agent.policy))

    async def _final_rewards(self) -> dict[str, RewardOutput]:
        traj = self.trajectory
        ref = traj.final_image_ref
        names = list(self.agent.rewards)
        if ref is None:
            return {
                n: RewardOutput(score=None, info={"error": "the run produced no image"})
                for n in names
            }
        image = await asyncio.to_thread(ref.open)
        ctx = RewardContext(task=traj.task, trajectory=traj, round=traj.num_rounds, image_ref=ref)
        outputs = await asyncio.gather(
            *(self.agent.rewards[n].safe_ascore(traj.prompt, image, ctx) for n in names)
        )
        return dict(zip(names, outputs, strict=True))

    # ------------------------------------------------------------------ utilities

    def _budget_spent(self) -> bool:
        remaining = self.ctx.remaining_s()
        return remaining is not None and remaining <= 0

    async def _within_budget(self, start: Callable[[], Awaitable[T]]) -> T:
        """Start the work and await it within the budget; ``BudgetExceeded`` if it runs out.

        ``start`` is called only when budget remains, so no coroutine is created (and left
        un-awaited) once the budget is spent.

        Not ``asyncio.wait_for``: its ``TimeoutError`` cannot be told apart from one raised by
        the policy or tool itself (a server timeout), which is a failure, not a spent budget.
        """
        remaining = self.ctx.remaining_s()
        if remaining is None:
            return await start()
        if remaining <= 0:
            raise BudgetExceeded("time budget spent")
        task = asyncio.ensure_future(start())
        try:
            done, _ = await asyncio.wait({task}, timeout=remaining)
        except BaseException:
            task.cancel()
            raise
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise BudgetExceeded("time budget spent")
        return task.result()

    async def _hook(self, awaitable: Awaitable[T], *, model_visible: bool = False) -> T:
        """Await a hook; its exceptions end the run as ``HookError``.

        ``RunError`` passes through (``BudgetExceeded`` ends the run as a budget stop), and so
        does ``ModelVisibleError`` where the caller shows it to the model (``model_visible``).
        """
        try:
            return await awaitable
        except RunError:
            raise
        except ModelVisibleError as exc:
            if model_visible:
                raise
            raise HookError(f"a hook raised {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise HookError(f"a hook raised {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- helpers


def _resolve_tools(
    tool: Tool | Sequence[Tool] | None, tools: Sequence[Tool] | None
) -> dict[str, Tool]:
    if tool is not None and tools is not None:
        raise ConfigurationError("pass either tool= or tools=, not both")
    given = tools if tools is not None else tool
    if given is None:
        from genagent.sim import scene_tools

        given = scene_tools()
    items = [given] if isinstance(given, Tool) or not isinstance(given, Sequence) else given
    resolved: dict[str, Tool] = {}
    for item in items:
        if isinstance(item, type) and issubclass(item, Tool):
            raise ConfigurationError(
                f"pass a tool instance, not the class: {item.__name__}() instead of {item.__name__}"
            )
        if not isinstance(item, Tool):
            raise ConfigurationError(
                f"{item!r} is not a Tool; subclass genagent.Tool or decorate a function with "
                "@genagent.tool"
            )
        if item.name in resolved:
            raise ConfigurationError(
                f"two tools are named {item.name!r}; give one of them another name"
            )
        resolved[item.name] = item
    if not resolved:
        raise ConfigurationError("the agent needs at least one tool")
    if all(t.requires_image for t in resolved.values()):
        raise ConfigurationError(
            "every tool requires an existing image; add a generation tool to produce the first"
        )
    return resolved


def _resolve_policy(policy: Policy | str | None, tools: Mapping[str, Tool]) -> Policy:
    if isinstance(policy, str):
        from genagent.policies._resolve import policy_from_spec

        return cast("Policy", policy_from_spec(policy))
    if policy is not None:
        if not callable(getattr(policy, "generate", None)):
            raise ConfigurationError(
                f"{type(policy).__name__} is not a policy: it needs an async generate(messages, "
                "*, stop, sampling) method"
            )
        return policy
    from genagent.policies._resolve import POLICY_ENV, default_policy, policy_from_spec

    configured = os.environ.get(POLICY_ENV)
    if configured:
        return cast("Policy", policy_from_spec(configured))
    if all(type(t).__module__.startswith("genagent.sim") for t in tools.values()):
        from genagent.sim import HeuristicPolicy

        return HeuristicPolicy()
    return cast("Policy", default_policy())


def _resolve_rewards(rewards: Mapping[str, Reward] | Sequence[Reward]) -> dict[str, Reward]:
    items = (
        list(rewards.items()) if isinstance(rewards, Mapping) else [(r.name, r) for r in rewards]
    )
    out: dict[str, Reward] = {}
    for name, reward in items:
        if not isinstance(reward, Reward):
            raise ConfigurationError(f"reward {name!r} is not a Reward: {reward!r}")
        if name in out:
            raise ConfigurationError(f"two rewards are named {name!r}; pass a mapping to rename")
        out[name] = reward
    return out


def _checked_result(result: ToolResult, source: str) -> ToolResult:
    """Check the shape of a tool result in one place; a malformed one is the tool's bug."""
    problems = []
    # typed as Any: a tool's dataclass fields hold whatever the tool put there
    images: Any = result.images
    text: Any = result.text
    seeds: Any = result.seeds
    metadata: Any = result.metadata
    if not isinstance(images, (list, tuple)):
        problems.append(f"images is {type(images).__name__}, not a list")
    if text is not None and not isinstance(text, str):
        problems.append(f"text is {type(text).__name__}, not a str")
    if seeds is not None and not (
        isinstance(seeds, (list, tuple))
        and all(s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in seeds)
    ):
        problems.append("seeds is not a list of ints")
    if not isinstance(metadata, dict):
        problems.append(f"metadata is {type(metadata).__name__}, not a dict")
    if problems:
        raise ToolUnavailable(f"{source} returned a malformed ToolResult: {'; '.join(problems)}")
    return result


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    """Metadata as JSON values, so that a trajectory saves and loads back equal.

    Tuples become lists and objects JSON cannot hold become their ``repr``.
    """
    result: dict[str, Any] = to_jsonable_python(value, fallback=repr)
    return result


def _positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _seed(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigurationError(f"a seed must be an int or None, got {value!r}")
    return value


def _hash_seed(base: int, round_: int, index: int) -> int:
    digest = hashlib.blake2b(f"{base}:{round_}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _SEED_LIMIT


def _merge_seeds(results: Sequence[ToolResult], chunks: Sequence[list[int]]) -> list[int | None]:
    """One seed per returned image.

    The tool's own report when it gives one, else the seeds it was given; ``None`` for images
    beyond them.
    """
    seeds: list[int | None] = []
    for result, chunk in zip(results, chunks, strict=True):
        given: list[int | None] = list(result.seeds) if result.seeds is not None else list(chunk)
        count = len(result.images)
        seeds.extend((given + [None] * count)[:count])
    return seeds


def _name(policy: Any) -> str:
    return repr(getattr(policy, "name", type(policy).__name__))


def _clean_text(text: Any) -> str:
    """Replies are recorded as valid Unicode (lone surrogates would break JSON serialisation)."""
    if not isinstance(text, str):
        return str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


async def _gather_or_cancel(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Like ``asyncio.gather``, but the first failure cancels the others (and is re-raised)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
