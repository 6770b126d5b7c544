"""The RL reward of one trajectory: final-image quality, reflection accuracy, format penalties.

The total reward of a trajectory is

```text
R = w_final * final + w_reflection * reflection + w_format * format
```

* ``final``: any pointwise :class:`~genagent.rewards.Reward` of the final image (``SceneJudge``
  in the simulator, a ``ChecklistJudge`` or any ``@reward`` function otherwise). A run without
  an image, or a reward that fails, scores ``missing_score`` (0.0).
* ``reflection``: :class:`~genagent.rewards.ReflectionAccuracy`, the share of the policy's own
  ``<judge>`` verdicts (done? better / worse / same than the previous image?) that the
  reference judges agree with. A run without any verdict to check scores ``missing_score``.
* ``format``: minus the sum of the :class:`FormatPenalties` the run incurred (0 for a clean
  run): per turn, ``empty_reply`` for an empty reply, else ``protocol_error`` for a reply the
  protocol could not use (``Turn.error`` of type ``ProtocolError``, or no parsed action);
  per run, ``no_answer`` when the run ended without an ``<answer>`` (``max_rounds``,
  ``max_turns``, too many retries, budget). The per-turn part is recorded by turn in
  :attr:`RLRewardOutput.turn_rewards` (already multiplied by ``w_format``).

Default weights: ``final=1.0``, ``reflection=0.5``, ``format=1.0``; default penalties:
``protocol_error=0.25`` per turn, ``empty_reply=0.5`` per turn, ``no_answer=0.25`` per run,
the format term clipped at ``-max_format_penalty`` (1.0) so that it never dominates.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from genagent.errors import ConfigurationError
from genagent.rewards._base import Reward, RewardContext
from genagent.trajectory import Termination, Trajectory, Turn

if TYPE_CHECKING:
    from genagent.rewards.reflection import ReflectionAccuracy

__all__ = [
    "FormatPenalties",
    "RLReward",
    "RLRewardOutput",
    "RewardWeights",
    "combine_rewards",
    "format_penalties",
]

PROTOCOL_ERROR_TYPES = frozenset({"ProtocolError"})
"""``Turn.error.type`` values that count as a malformed reply."""


def _check_number(name: str, value: Any, *, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the three reward terms (see the module docstring).

    Attributes:
        final: Weight of the final image's pointwise reward.
        reflection: Weight of the reflection-accuracy reward.
        format: Weight of the (non-positive) format term.
    """

    final: float = 1.0
    reflection: float = 0.5
    format: float = 1.0

    def __post_init__(self) -> None:
        for name in ("final", "reflection", "format"):
            _check_number(f"RewardWeights.{name}", getattr(self, name))


@dataclass(frozen=True)
class FormatPenalties:
    """Penalty magnitudes (positive numbers, subtracted) for protocol violations.

    Attributes:
        protocol_error: Per turn whose reply the protocol rejected (``ProtocolError``) or could
            not parse into an action.
        empty_reply: Per turn whose reply is empty or whitespace (instead of
            ``protocol_error``).
        no_answer: Once per run that did not end with an ``<answer>``.
        max_total: The format term is clipped at ``-max_total``.
    """

    protocol_error: float = 0.25
    empty_reply: float = 0.5
    no_answer: float = 0.25
    max_total: float = 1.0

    def __post_init__(self) -> None:
        for name in ("protocol_error", "empty_reply", "no_answer", "max_total"):
            _check_number(f"FormatPenalties.{name}", getattr(self, name))


@dataclass(frozen=True)
class RLRewardOutput:
    """The reward of one trajectory, with its parts.

    Attributes:
        total: ``w_final * final + w_reflection * reflection + w_format * format``.
        final: The final image's reward (``missing_score`` if none).
        reflection: The reflection accuracy (``missing_score`` if none; 0.0 when disabled).
        format: The format term (``<= 0``).
        turn_rewards: Weighted per-turn format penalties, by turn index (only turns with one).
        components: Every part, by name (``"final"``, ``"reflection"``, ``"format"``,
            ``"format.protocol_error"``, ``"format.empty_reply"``, ``"format.no_answer"``).
        info: What the rewards reported (errors, verdicts).
    """

    total: float
    final: float
    reflection: float
    format: float
    turn_rewards: dict[int, float] = field(default_factory=dict)
    components: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _turn_penalty(turn: Turn, penalties: FormatPenalties) -> tuple[str, float] | None:
    if turn.interrupted:
        return None
    if not turn.reply.strip():
        return "empty_reply", penalties.empty_reply
    if turn.action is None or (turn.error is not None and turn.error.type in PROTOCOL_ERROR_TYPES):
        return "protocol_error", penalties.protocol_error
    return None


def format_penalties(
    trajectory: Trajectory, penalties: FormatPenalties | None = None
) -> tuple[float, dict[int, float], dict[str, float]]:
    """The format term of ``trajectory`` (unweighted).

    Args:
        trajectory: A finished run.
        penalties: Penalty magnitudes (default: :class:`FormatPenalties`).

    Returns:
        ``(format, per_turn, counts)``: the term (``<= 0``, clipped at ``-max_total``), the
        negative penalty of each penalised turn by index, and the number of each violation.
    """
    penalties = penalties or FormatPenalties()
    per_turn: dict[int, float] = {}
    counts = {"protocol_error": 0.0, "empty_reply": 0.0, "no_answer": 0.0}
    for turn in trajectory.turns:
        hit = _turn_penalty(turn, penalties)
        if hit is not None:
            counts[hit[0]] += 1
            per_turn[turn.index] = -hit[1]
    total = sum(per_turn.values())
    if trajectory.termination is not Termination.ANSWERED:
        counts["no_answer"] = 1.0
        total -= penalties.no_answer
    return max(total, -penalties.max_total), per_turn, counts


async def combine_rewards(
    trajectory: Trajectory,
    *,
    final: Reward,
    reflection: ReflectionAccuracy | None = None,
    weights: RewardWeights | None = None,
    penalties: FormatPenalties | None = None,
    missing_score: float = 0.0,
) -> RLRewardOutput:
    """The RL reward of one trajectory (see the module docstring for the definition).

    Args:
        trajectory: A finished run whose images are readable.
        final: Pointwise reward of the final image.
        reflection: The reflection-accuracy reward (``None``: the term is 0).
        weights: Term weights (default: :class:`RewardWeights`).
        penalties: Format penalties (default: :class:`FormatPenalties`).
        missing_score: Score of a term that cannot be computed (no image, no verdict, a
            failed reward).

    Returns:
        The total and its parts.
    """
    weights = weights or RewardWeights()
    info: dict[str, Any] = {}

    async def final_score() -> float | None:
        ref = trajectory.final_image_ref
        if ref is None:
            info["final_error"] = "the run produced no image"
            return None
        image = await asyncio.to_thread(ref.open)
        ctx = RewardContext(
            task=trajectory.task,
            trajectory=trajectory,
            round=trajectory.num_rounds,
            image_ref=ref,
        )
        output = await final.safe_ascore(trajectory.prompt, image, ctx)
        if output.score is None:
            info["final_error"] = output.info.get("error", "the reward returned no score")
        return output.score

    async def reflection_score() -> float | None:
        if reflection is None:
            return None
        output = await reflection.ascore_trajectory(trajectory)
        if output.score is None:
            info["reflection_error"] = output.info.get("error", "no score")
        info["reflection"] = {
            "compared": output.info.get("compared"),
            "mismatches": output.info.get("mismatches"),
        }
        return output.score

    final_value, reflection_value = await asyncio.gather(final_score(), reflection_score())
    f = missing_score if final_value is None else float(final_value)
    r = (
        0.0
        if reflection is None
        else (missing_score if reflection_value is None else float(reflection_value))
    )
    fmt, per_turn, counts = format_penalties(trajectory, penalties)
    total = weights.final * f + weights.reflection * r + weights.format * fmt
    components = {
        "final": f,
        "reflection": r,
        "format": fmt,
        **{f"format.{k}": v for k, v in counts.items()},
    }
    return RLRewardOutput(
        total=total,
        final=f,
        reflection=r,
        format=fmt,
        turn_rewards={i: weights.format * p for i, p in per_turn.items()},
        components=components,
        info=info,
    )


class RLReward:
    """The RL reward as an object: the final reward, reflection accuracy, weights, penalties.

    Args:
        final: Pointwise reward of the final image (any :class:`~genagent.rewards.Reward`).
        reflection: :class:`~genagent.rewards.ReflectionAccuracy` (``None``: not used).
        weights: Term weights.
        penalties: Format penalties.
        missing_score: Score of a term that cannot be computed.

    Example:
        ```python
        from genagent.rewards import ReflectionAccuracy
        from genagent.sim import SceneJudge
        from genagent.training.rewards import RLReward

        reward = RLReward(SceneJudge(), reflection=ReflectionAccuracy(SceneJudge()))
        ```
    """

    def __init__(
        self,
        final: Reward,
        *,
        reflection: ReflectionAccuracy | None = None,
        weights: RewardWeights | None = None,
        penalties: FormatPenalties | None = None,
        missing_score: float = 0.0,
    ) -> None:
        if not isinstance(final, Reward):
            raise ConfigurationError(
                f"final must be a Reward (e.g. SceneJudge() or ChecklistJudge(policy)), got "
                f"{type(final).__name__}"
            )
        from genagent.rewards.reflection import ReflectionAccuracy

        if reflection is not None and not isinstance(reflection, ReflectionAccuracy):
            raise ConfigurationError(
                f"reflection must be a ReflectionAccuracy or None, got {type(reflection).__name__}"
            )
        self.final = final
        self.reflection = reflection
        self.weights = weights or RewardWeights()
        self.penalties = penalties or FormatPenalties()
        self.missing_score = _check_number("missing_score", missing_score, minimum=None)

    async def ascore(self, trajectory: Trajectory) -> RLRewardOutput:
        """The reward of one trajectory."""
        return await combine_rewards(
            trajectory,
            final=self.final,
            reflection=self.reflection,
            weights=self.weights,
            penalties=self.penalties,
            missing_score=self.missing_score,
        )

    async def ascore_many(self, trajectories: Sequence[Trajectory]) -> list[RLRewardOutput]:
        """The rewards of several trajectories, concurrently, in order."""
        return list(await asyncio.gather(*(self.ascore(t) for t in trajectories)))

    def describe(self) -> dict[str, Any]:
        """Settings, for logs and checkpoints."""
        return {
            "final": self.final.describe(),
            "reflection": self.reflection.describe() if self.reflection is not None else None,
            "weights": vars(self.weights).copy(),
            "penalties": vars(self.penalties).copy(),
            "missing_score": self.missing_score,
        }
