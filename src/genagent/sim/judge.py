"""SIMULATOR judge: scores simulator images against a task, per constraint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from genagent.errors import ConfigurationError
from genagent.rewards._base import Reward, RewardContext
from genagent.rewards._output import RewardOutput
from genagent.sim._render import read_record
from genagent.sim._scene import SceneSpec, check_scene, parse_caption

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["SceneJudge", "spec_for"]


def spec_for(prompt: str, metadata: dict[str, Any] | None) -> SceneSpec:
    """The scene a task asks for: its GenEval ``include`` metadata, else the parsed prompt.

    Only a task with no ``include`` key at all is scored from its prompt. When ``include`` is
    present it must be valid (:meth:`SceneSpec.from_include`), whatever its value.

    Raises:
        ValueError: If the task has ``include`` metadata and it is malformed.
    """
    if metadata is not None and "include" in metadata:
        return SceneSpec.from_include(metadata["include"])
    return parse_caption(prompt)


class SceneJudge(Reward):
    """SIMULATOR judge: reads what a ``SceneTool`` image shows and checks every constraint.

    The score is strict by default, as GenEval's is: 1.0 when every constraint holds, else 0.0.
    ``components`` has one 0/1 entry per constraint (``"apple#0.count"``); ``info`` says what
    failed in words. An image without a simulator record scores ``None`` (a recorded failure),
    and so does a task whose ``include`` metadata is malformed: the judge never falls back to
    the prompt when a task has ``include`` metadata.

    Args:
        mode: ``"strict"`` (all or nothing) or ``"fraction"`` (share of constraints met).
    """

    name = "scene_judge"

    def __init__(self, mode: Literal["strict", "fraction"] = "strict") -> None:
        if mode not in ("strict", "fraction"):
            raise ConfigurationError(f"mode must be 'strict' or 'fraction', got {mode!r}")
        self.mode = mode

    def score(
        self, prompt: str, image: PILImage.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        """Score ``image`` for ``prompt`` (task metadata from ``ctx.task`` when given)."""
        record = read_record(image)
        if record is None:
            return RewardOutput(
                score=None,
                info={"error": "not a simulator image: it has no genagent.scene record"},
            )
        metadata = ctx.task.metadata if ctx is not None and ctx.task is not None else None
        try:
            spec = spec_for(prompt, metadata)
        except ValueError as exc:
            return RewardOutput(score=None, info={"error": f"invalid 'include' metadata: {exc}"})
        if not spec.objects:
            return RewardOutput(score=None, info={"error": "the prompt names no known object"})
        results = check_scene(spec, record.objects, record.width, record.height)
        components = {r.constraint.key(spec): 1.0 if r.passed else 0.0 for r in results}
        failed = [
            f"{r.constraint.describe(spec)} (observed: {r.observed})"
            for r in results
            if not r.passed
        ]
        passed = sum(1 for r in results if r.passed)
        score = float(not failed) if self.mode == "strict" else passed / len(results)
        return RewardOutput(
            score=score,
            components=components,
            info={"judge": "genagent.sim.SceneJudge", "mode": self.mode, "failed": failed},
        )

    def describe(self) -> dict[str, Any]:
        """Settings, for metadata."""
        return {**super().describe(), "mode": self.mode, "simulator": True}
