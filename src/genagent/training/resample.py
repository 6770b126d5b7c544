"""Trajectory resampling and branching for agentic RL.

GRPO learns only from groups whose rewards differ: a group whose ``G`` trajectories all score
the same gives every token an advantage of 0. Two mechanisms put signal back:

**Resampling.** After a prompt's group of ``group_size`` rollouts is scored, if its total
rewards are all equal (population standard deviation ``<= min_std``), ``resample_size`` more
rollouts of the same prompt are run with fresh seeds and *appended* to the group; this repeats
at most ``max_resample`` times, stopping as soon as the group has signal. A group that still
has none is kept, flagged ``gave_up``, and contributes no gradient (its advantages are 0 and
the trainer drops it from the update).

**Branching.** From a prompt's group, ``branches_per_group`` branch points are drawn uniformly
without replacement (a seeded RNG) among all pairs ``(trajectory i, turn t)`` where ``t`` is a
branch point of trajectory ``i``. With ``branch_points="after_image"`` (default), ``t`` is a
turn whose previous turn produced an image: the policy's turn that judges that image (and
decides to answer, edit or regenerate); ``"any"`` allows every turn ``t >= 1``. For each drawn
point, ``branch_size`` new continuations are run: the first ``t`` turns are copied from the
parent (its replies, token ids and tool results are replayed, not recomputed) and the policy
continues from turn ``t`` with a fresh seed. The continuations of one prefix form their own
group: their advantages are normalised among themselves. In a branch's training row, only the
new turns' tokens (turn index ``>= t``) have ``loss_mask == 1``: the copied prefix is context,
never trained a second time. Branch groups are not resampled or branched again.

The decisions are pure functions (:func:`resample_decision`, :func:`branch_points`,
:func:`choose_branches`, :func:`mask_prefix`) so they are tested on fixed rewards; the rollouts
are in :func:`genagent.training.rl.rollout_groups`.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from genagent.errors import ConfigurationError, ToolExecutionError
from genagent.policies._base import PolicyOutput, SamplingParams, describe_policy
from genagent.tools._base import Tool, ToolContext, ToolResult
from genagent.training.advantages import group_has_signal
from genagent.trajectory import Trajectory, Turn

if TYPE_CHECKING:
    from genagent.agent import Agent
    from genagent.messages import Message

__all__ = [
    "BranchPoints",
    "ResampleConfig",
    "ResampleDecision",
    "branch_agent",
    "branch_points",
    "branch_run",
    "branch_start",
    "choose_branches",
    "mask_prefix",
    "resample_decision",
]

BranchPoints = Literal["after_image", "any"]
ResampleDecision = Literal["keep", "resample", "give_up"]
_SEED_LIMIT = 2**31 - 1
# errors raised before a tool is invoked: their turns made no tool call to replay
_NOT_INVOKED = frozenset({"ProtocolError", "ToolRefused"})


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ResampleConfig:
    """Settings of group rollouts, resampling and branching (see the module docstring).

    Attributes:
        group_size: Rollouts per prompt (``G``).
        max_resample: Most extra rounds of rollouts for a group without signal (0: never).
        resample_size: Rollouts per extra round (default: ``group_size``).
        min_std: Rewards whose population standard deviation is at most this are "all equal".
        branches_per_group: Branch points drawn per prompt group (0: no branching).
        branch_size: Continuations per branch point (default: ``group_size``).
        branch_points: ``"after_image"`` (the turn judging a new image) or ``"any"`` turn.
    """

    group_size: int = 8
    max_resample: int = 2
    resample_size: int | None = None
    min_std: float = 1e-6
    branches_per_group: int = 0
    branch_size: int | None = None
    branch_points: BranchPoints = "after_image"

    def __post_init__(self) -> None:
        _int("group_size", self.group_size, 1)
        _int("max_resample", self.max_resample, 0)
        if self.resample_size is not None:
            _int("resample_size", self.resample_size, 1)
        _int("branches_per_group", self.branches_per_group, 0)
        if self.branch_size is not None:
            _int("branch_size", self.branch_size, 1)
        if self.branch_points not in ("after_image", "any"):
            raise ConfigurationError(
                f"branch_points must be 'after_image' or 'any', got {self.branch_points!r}"
            )
        if isinstance(self.min_std, bool) or not (
            isinstance(self.min_std, (int, float)) and self.min_std >= 0
        ):
            raise ConfigurationError(f"min_std must be a number >= 0, got {self.min_std!r}")

    @property
    def resample_count(self) -> int:
        """Rollouts per resampling round."""
        return self.resample_size or self.group_size

    @property
    def branch_count(self) -> int:
        """Continuations per branch point."""
        return self.branch_size or self.group_size


def resample_decision(
    rewards: Sequence[float], rounds_done: int, config: ResampleConfig
) -> ResampleDecision:
    """What to do with a group after ``rounds_done`` resampling rounds.

    Returns:
        ``"keep"`` when the rewards differ (the group has signal), ``"resample"`` when they are
        all equal and fewer than ``max_resample`` rounds were done, else ``"give_up"``.
    """
    if group_has_signal(rewards, min_std=config.min_std):
        return "keep"
    return "resample" if rounds_done < config.max_resample else "give_up"


def branch_points(trajectory: Trajectory, mode: BranchPoints = "after_image") -> list[int]:
    """The turns of ``trajectory`` a branch may start at (the copied prefix is ``turns[:t]``).

    ``"after_image"``: every turn ``t`` whose previous turn's tool call produced an image
    (the policy's judgment of that image). ``"any"``: every turn ``t >= 1``. Interrupted turns
    are never branch points.
    """
    turns = trajectory.turns
    points: list[int] = []
    for t in range(1, len(turns)):
        if turns[t].interrupted:
            continue
        if mode == "any":
            points.append(t)
            continue
        outcome = turns[t - 1].tool_result
        if outcome is not None and outcome.round is not None and outcome.error is None:
            points.append(t)
    return points


def choose_branches(
    trajectories: Sequence[Trajectory],
    count: int,
    *,
    mode: BranchPoints = "after_image",
    rng: random.Random,
) -> list[tuple[int, int]]:
    """Draw ``count`` branch points ``(trajectory index, turn index)`` from a group.

    Uniformly without replacement among all branch points of all trajectories (fewer when
    there are fewer), sorted.
    """
    candidates = [(i, t) for i, traj in enumerate(trajectories) for t in branch_points(traj, mode)]
    if count <= 0 or not candidates:
        return []
    return sorted(rng.sample(candidates, min(count, len(candidates))))


def mask_prefix(row: Any, start_turn: int) -> Any:
    """A training row with the loss mask cleared on tokens of turns before ``start_turn``.

    Rows are ``TokenRow`` objects (``loss_mask`` and ``turn_of_token`` per token; a token
    outside any turn has a negative turn). Returns the row (a copy if it is frozen).
    """
    mask = [
        int(m) if (turn is not None and turn >= start_turn) else 0
        for m, turn in zip(row.loss_mask, row.turn_of_token, strict=True)
    ]
    params = getattr(type(row), "__dataclass_params__", None)
    if params is not None and params.frozen:
        return dataclasses.replace(row, loss_mask=type(row.loss_mask)(mask))
    try:
        row.loss_mask[:] = mask
    except TypeError:
        row.loss_mask = mask
    return row


# --------------------------------------------------------------------------- replaying a prefix


class _ReplayPolicy:
    """Returns the parent's recorded replies for the prefix turns, then asks the real policy."""

    def __init__(self, inner: Any, prefix: Sequence[Turn]) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self._queue: deque[Turn] = deque(prefix)

    def describe(self) -> dict[str, Any]:
        return describe_policy(self.inner)

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] = (),
        sampling: SamplingParams | None = None,
    ) -> PolicyOutput:
        if self._queue:
            turn = self._queue.popleft()
            return PolicyOutput(
                text=turn.reply,
                stop=turn.reply_suffix or None,
                finish_reason=turn.finish_reason,
                prompt_ids=turn.prompt_ids,
                output_ids=turn.output_ids,
                logprobs=turn.logprobs,
                usage=turn.usage,
            )
        output: PolicyOutput = await self.inner.generate(messages, stop=stop, sampling=sampling)
        return output

    async def aclose(self) -> None:  # the real policy is the caller's: never closed here
        return None


def _replay_tool(inner: Tool, outcomes: deque[tuple[Trajectory, Any]]) -> Tool:
    """A tool with ``inner``'s interface that first returns the parent's recorded results."""
    base = type(inner)
    served_by_call: dict[int, int] = {}

    class _Replay(Tool):
        name: ClassVar[str] = inner.name
        description: ClassVar[str] = getattr(base, "description", "")
        Args: ClassVar[Any] = inner.Args
        requires_image: ClassVar[bool] = inner.requires_image
        max_images_per_call: ClassVar[int] = inner.max_images_per_call

        async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
            if outcomes:
                parent, outcome = outcomes[0]
                if outcome.error is not None:
                    outcomes.popleft()
                    raise ToolExecutionError(outcome.error.message, hint=outcome.error.hint)
                # a call split in chunks (candidates > max_images_per_call) takes its images
                # chunk by chunk
                served = served_by_call.get(id(outcome), 0)
                take = outcome.images[served : served + max(1, ctx.num_images)]
                served_by_call[id(outcome)] = served + len(take)
                if served + len(take) >= len(outcome.images):
                    outcomes.popleft()
                seeds = outcome.seeds[served : served + len(take)]
                return ToolResult(
                    images=[parent.images[i] for i in take],
                    text=outcome.text if served == 0 else None,
                    seeds=list(seeds) if len(seeds) == len(take) else None,
                    metadata=dict(outcome.metadata),
                )
            await inner.ensure_setup()
            result: ToolResult = await inner.invoke(args, ctx)
            return result

        def describe(self) -> dict[str, Any]:
            return inner.describe()

    _Replay.__name__ = _Replay.__qualname__ = f"Replay{base.__name__}"
    return _Replay()


def branch_agent(agent: Agent, parent: Trajectory, turn_index: int) -> Agent:
    """A copy of ``agent`` whose next run replays ``parent.turns[:turn_index]`` and continues.

    The copy shares the real policy and tools; it must be used for exactly one run.
    """
    if not 1 <= turn_index < len(parent.turns) + 1:
        raise ConfigurationError(
            f"cannot branch trajectory {parent.id} at turn {turn_index}: it has "
            f"{len(parent.turns)} turns (branch at 1..{len(parent.turns)})"
        )
    prefix = parent.turns[:turn_index]
    if any(t.interrupted for t in prefix):
        raise ConfigurationError("cannot branch after an interrupted turn")
    per_tool: dict[str, deque[tuple[Trajectory, Any]]] = {name: deque() for name in agent.tools}
    for turn in prefix:
        outcome = turn.tool_result
        if outcome is None or outcome.tool not in per_tool:
            continue
        if outcome.error is not None and outcome.error.type in _NOT_INVOKED:
            continue
        per_tool[outcome.tool].append((parent, outcome))
    clone = copy.copy(agent)
    clone.policy = _ReplayPolicy(agent.policy, prefix)
    clone.tools = {name: _replay_tool(tool, per_tool[name]) for name, tool in agent.tools.items()}
    return clone


async def branch_run(
    agent: Agent,
    parent: Trajectory,
    turn_index: int,
    *,
    seed: int,
) -> Trajectory:
    """Run a new continuation of ``parent`` from turn ``turn_index``.

    The first ``turn_index`` turns replay the parent's recorded replies (with their token ids
    and log-probabilities) and tool results; from turn ``turn_index`` on, the real policy and
    tools run, with base seed ``seed`` (and sampling seed ``seed``). The result records
    ``metadata["branch"] = {"parent": parent.id, "turn": turn_index}``.

    Raises:
        ConfigurationError: If ``turn_index`` is not a turn of ``parent`` (1..len(turns)).
    """
    clone = branch_agent(agent, parent, turn_index)
    clone.sampling = agent.sampling.model_copy(update={"seed": seed % _SEED_LIMIT})
    trajectory = await clone.arun(
        parent.task,
        seed=seed % _SEED_LIMIT,
        metadata={"branch": {"parent": parent.id, "turn": turn_index}},
    )
    replayed = [t.reply for t in trajectory.turns[:turn_index]]
    if replayed != [t.reply for t in parent.turns[:turn_index]]:
        trajectory.metadata["branch"]["diverged"] = True
    return trajectory


def branch_start(trajectory: Trajectory) -> int:
    """The first trained turn of a trajectory: its branch turn, 0 if it is not a branch."""
    branch = trajectory.metadata.get("branch")
    return int(branch["turn"]) if isinstance(branch, dict) and "turn" in branch else 0
