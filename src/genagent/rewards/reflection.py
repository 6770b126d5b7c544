"""Reflection accuracy: how often the policy's own ``<judge>`` verdicts agree with a reference.

The GenAgent paper trains the policy with a pairwise reward on *reflection accuracy*: after each
image the policy judges it (done or not; better or worse than the previous image), and a
reference judge says what the right verdict was. :class:`ReflectionAccuracy` reads the policy's
verdicts from a trajectory, scores the same images with a reference reward (and, optionally, a
reference pairwise reward), and returns the share of verdicts that match. The definition, with
the keyword rules used to read a judgment, is in ``docs/judges.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from genagent._async import run_sync
from genagent.errors import ConfigurationError
from genagent.images import ImageRef
from genagent.rewards._base import PairwiseReward, Reward, RewardContext
from genagent.rewards._output import PairwiseOutput, RewardOutput

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from genagent.tasks import Task
    from genagent.trajectory import Trajectory

__all__ = ["PolicyVerdict", "ReflectionAccuracy", "read_judgment"]

Change = Literal["better", "worse", "same"]

# --------------------------------------------------------------------------- reading judgments

_SUBJECT = r"\b(?:the\s+)?(?:image|it|this|result|picture|output|generation)"
_OBJECT = (
    r"(?:request|requirements?|prompt|description|constraints?|instructions?|task|caption|"
    r"user'?s?\s+\w+)"
)
_VERB = r"(?:satisf\w*|meets?|fulfil\w*|match\w*|compl(?:y|ies)\s+with|follows?)"
_NOT_DONE_RES: Final = (
    re.compile(
        _SUBJECT + r"\s+(?:still\s+|now\s+)?(?:does\s+not|doesn't|did\s+not|didn't|do\s+not|"
        r"don't|fails?\s+to|failed\s+to|cannot|can't|won't)\s+(?:yet\s+|fully\s+|quite\s+|"
        r"completely\s+|entirely\s+)?" + _VERB,
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(?:does\s+not|doesn't|did\s+not|didn't|do\s+not|don't|fails?\s+to|failed\s+to)\s+"
        r"(?:yet\s+|fully\s+|quite\s+|completely\s+|entirely\s+)?" + _VERB + r"\s+(?:all\s+"
        r"(?:of\s+)?|every\s+|each\s+)?(?:the\s+|of\s+the\s+)?" + _OBJECT,
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(?:requirements?|constraints?|request|prompt)\s+(?:is|are)\s+(?:still\s+)?not\s+"
        r"(?:yet\s+|fully\s+)?(?:met|satisfied|fulfilled)",
        re.IGNORECASE,
    ),
    re.compile(
        r"\bnot\s+(?:yet\s+)?(?:done|finished|complete|acceptable|satisfactory)\b", re.IGNORECASE
    ),
    re.compile(
        r"\b(?:needs?|requires?)\s+(?:another|a\s+new|more|further|an?)\s+(?:edit|fix|attempt|"
        r"round|regeneration|try|change|correction)",
        re.IGNORECASE,
    ),
    # a failed check: "[fail] the cup is not blue", "[wrong] ...", "[missing] ..." ("[x]" is
    # left out: in Markdown it is a ticked box)
    re.compile(
        r"\[\s*(?:fail(?:ed|s|ure)?|wrong|incorrect|missing|no|\u2717|\u2718|\u274c)\s*\]",
        re.IGNORECASE,
    ),
    # "the image fails to show two cups", "it does not depict ..." (not "does not show any":
    # that is how an absence the prompt asks for is confirmed)
    re.compile(
        _SUBJECT + r"\s+(?:still\s+)?(?:fails?\s+to|failed\s+to|does\s+not|doesn't|did\s+not|"
        r"didn't)\s+(?:yet\s+|clearly\s+|fully\s+|correctly\s+)?(?:show|depict|display|render|"
        r"portray)\b(?!\s+any\b)",
        re.IGNORECASE,
    ),
    re.compile(
        _SUBJECT + r"\s+(?:still\s+)?(?:fails?\s+to|failed\s+to)\s+(?:contain|include|have|"
        r"capture)\b",
        re.IGNORECASE,
    ),
    # "the image is not quite right", "it is still not correct"
    re.compile(
        _SUBJECT + r"\s+(?:is|was)\s+(?:still\s+)?not\s+(?:yet\s+)?(?:quite\s+|fully\s+|"
        r"entirely\s+|completely\s+)?(?:correct|right|acceptable|accurate|complete|done|finished|"
        r"satisfactory|good\s+enough|faithful|what)\b",
        re.IGNORECASE,
    ),
)
_DONE_RES: Final = (
    re.compile(
        _SUBJECT + r"\s+(?:now\s+|fully\s+|correctly\s+|perfectly\s+|clearly\s+)?"
        r"(?:satisfies|meets|fulfil+s|matches|complies\s+with|follows)\s+(?:all\s+(?:of\s+)?|"
        r"every\s+|each\s+)?(?:the\s+|of\s+the\s+)?" + _OBJECT,
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(?:all|every|each)\s+(?:of\s+the\s+)?(?:requirements?|constraints?|details?|"
        r"conditions?)\s+(?:are|is|were|have\s+been)\s+(?:now\s+)?(?:met|satisfied|fulfilled|"
        r"correct)",
        re.IGNORECASE,
    ),
    re.compile(
        r"\bno\s+(?:further\s+|more\s+)?(?:changes?|edits?|fixes|corrections?|improvements?)\s+"
        r"(?:are\s+|is\s+)?(?:needed|necessary|required)",
        re.IGNORECASE,
    ),
    re.compile(r"\b(?:everything|all)\s+(?:is|looks)\s+(?:correct|right)\b", re.IGNORECASE),
)
_SAME_RES: Final = (
    re.compile(
        r"\b(?:no|not)\s+(?:any\s+)?(?:better|worse|improvement|improved|change|different|"
        r"progress)\b",
        re.IGNORECASE,
    ),
    re.compile(r"\b(?:unchanged|same\s+as\s+(?:before|the\s+previous|the\s+last))", re.IGNORECASE),
    re.compile(
        r"\b(?:did\s+not|didn't|does\s+not|doesn't|had\s+no|has\s+no)\s+(?:\w+\s+)?(?:help|"
        r"change|improve|fix|work|effect)\w*",
        re.IGNORECASE,
    ),
    re.compile(r"\bno\s+(?:effect|difference)\b", re.IGNORECASE),
)
# phrases that mention improvement without saying the image changed: masked before the change
# rules ("the colour needs improvement", "could be better", "no improvement is needed")
_NEUTRAL_CHANGE_RES: Final = (
    re.compile(
        r"\b(?:needs?|needed|requires?|required|could\s+use|calls?\s+for|room\s+for)\s+"
        r"(?:some\s+|more\s+|further\s+|an?\s+|significant\s+)?improvements?\b",
        re.IGNORECASE,
    ),
    re.compile(r"\b(?:needs?|requires?)\s+(?:to\s+be\s+)?improv(?:ed|ing)\b", re.IGNORECASE),
    re.compile(
        r"\b(?:could|can|should|might|would|must)\s+(?:still\s+)?(?:be\s+)?(?:further\s+|even\s+|"
        r"much\s+|a\s+lot\s+)?(?:improved|better)\b",
        re.IGNORECASE,
    ),
    re.compile(
        r"\bno\s+(?:further\s+|more\s+)?improvements?\s+(?:is\s+|are\s+)?(?:needed|necessary|"
        r"required)\b",
        re.IGNORECASE,
    ),
)
# "the previous image was better" says this one is worse (and "... was worse": better)
_PREVIOUS: Final = (
    r"\b(?:previous|earlier|last|prior|former|original|old|first)(?:\s+(?:image|one|version|"
    r"attempt|result|picture|output|generation|round|edit))?\s+(?:was|is|looked|looks|seemed|"
    r"seems|had\s+been)\s+(?:much\s+|slightly\s+|a\s+bit\s+|a\s+little\s+|far\s+|clearly\s+|"
    r"definitely\s+|somewhat\s+)?"
)
_PREVIOUS_BETTER_RES: Final = (
    re.compile(_PREVIOUS + r"(?:better|more\s+accurate|closer)\b", re.IGNORECASE),
)
_PREVIOUS_WORSE_RES: Final = (
    re.compile(_PREVIOUS + r"(?:worse|less\s+accurate)\b", re.IGNORECASE),
)
_WORSE_RES: Final = (
    re.compile(r"\b(?:worse|regress\w*|degrad\w*|deteriorat\w*|less\s+accurate)\b", re.IGNORECASE),
    re.compile(r"\bnew\s+(?:errors?|mistakes?|problems?)\b", re.IGNORECASE),
)
_BETTER_RES: Final = (
    re.compile(r"\b(?:better|improv(?:ed|es|ement)|closer\s+to|more\s+accurate)\b", re.IGNORECASE),
    re.compile(r"\bnow\s+(?:correct|right|fixed|matches|satisfies|shows|has)\b", re.IGNORECASE),
    re.compile(r"\b(?:is|are|was|were|has\s+been|have\s+been)\s+(?:now\s+)?fixed\b", re.IGNORECASE),
)


def _last_match(text: str, patterns: tuple[re.Pattern[str], ...]) -> tuple[int, str] | None:
    """The start of the last match of any pattern, and ``text`` with every match masked."""
    best = -1
    masked = text
    for pattern in patterns:
        for match in pattern.finditer(text):
            best = max(best, match.start())
            masked = (
                masked[: match.start()]
                + " " * (match.end() - match.start())
                + masked[match.end() :]
            )
    return (best, masked) if best >= 0 else None


def _classify(text: str, rules: list[tuple[Any, tuple[re.Pattern[str], ...]]]) -> Any:
    """The label of the rule matched last in ``text``; earlier rules mask their matches."""
    found: list[tuple[int, Any]] = []
    for label, patterns in rules:
        hit = _last_match(text, patterns)
        if hit is not None:
            found.append((hit[0], label))
            text = hit[1]  # "does not satisfy" must not also read as "satisfies"
    return max(found, key=lambda f: f[0])[1] if found else None


def read_judgment(judgment: str | None) -> tuple[bool | None, Change | None]:
    """Read a ``<judge>`` text: is the image done, and is it better than the previous one?

    Keyword rules (case-insensitive; where several verdicts appear, the one stated last wins,
    and negated phrases are read first so that "does not satisfy" never reads as "satisfies"):

    * not done: "the image does not satisfy / meet / match / fulfil the request", "the
      requirements are not met", "not yet done / complete", "needs another edit / attempt",
      "the image fails to show / does not show ...", "the image is not (quite) right /
      correct", a failed check marked "[fail]", "[wrong]", "[incorrect]", "[missing]" or "[no]";
    * done: "the image satisfies / meets / matches / fulfils the request (prompt, requirements,
      ...)", "all requirements are met", "no further changes are needed", "everything is
      correct";
    * same: "no better", "not worse", "no improvement", "unchanged", "same as before", "the edit
      did not help / change / fix";
    * worse: "worse", "regressed", "degraded", "less accurate", "new errors", "the previous
      (earlier, last, first, original) image was better";
    * better: "better", "improved", "closer to", "more accurate", "now correct", "is now fixed",
      "the previous image was worse".

    Phrases that ask for improvement without saying the image changed ("the colour needs
    improvement", "could be better", "no improvement is needed") say nothing about the change.

    Args:
        judgment: The text of the ``<judge>`` block.

    Returns:
        ``(done, change)``: each ``None`` when the judgment does not say.

    Example:
        ```python
        from genagent.rewards import read_judgment

        print(read_judgment("[ok] two cups. The image satisfies the request."))  # (True, None)
        print(read_judgment("Better than before, but the image does not satisfy the request yet."))
        ```
    """
    if not judgment:
        return None, None
    done = _classify(judgment, [(False, _NOT_DONE_RES), (True, _DONE_RES)])
    neutral = _last_match(judgment, _NEUTRAL_CHANGE_RES)
    change = _classify(
        neutral[1] if neutral is not None else judgment,
        [
            ("worse", _PREVIOUS_BETTER_RES),
            ("better", _PREVIOUS_WORSE_RES),
            ("same", _SAME_RES),
            ("worse", _WORSE_RES),
            ("better", _BETTER_RES),
        ],
    )
    return done, change


@dataclass(frozen=True)
class PolicyVerdict:
    """What the policy said about one image round.

    Attributes:
        round: The round (1-based).
        image: The round's image.
        previous: The previous round's image (``None`` for the first round).
        judgment: The ``<judge>`` text of the first reply after the image, if any.
        done: Whether the policy judged the image done; ``None`` if it never replied.
        done_from: Where ``done`` comes from: ``"judgment"`` (an explicit verdict in the text),
            else the action: ``"answer"`` (done) or ``"tool_call"`` (not done).
        change: ``"better"``, ``"worse"`` or ``"same"`` than the previous image, when the
            judgment says so (never for the first round).
    """

    round: int
    image: ImageRef
    previous: ImageRef | None
    judgment: str | None
    done: bool | None
    done_from: Literal["judgment", "answer", "tool_call"] | None
    change: Change | None


def policy_verdicts(trajectory: Trajectory) -> list[PolicyVerdict]:
    """The policy's verdict on each image round of ``trajectory``.

    The verdict on round ``k``'s image is in the first parsed reply after the turn whose tool
    call produced it (turns whose reply could not be parsed are skipped).
    """
    rounds = trajectory.rounds
    position = {turn.index: p for p, turn in enumerate(trajectory.turns)}
    verdicts: list[PolicyVerdict] = []
    for k, record in enumerate(rounds):
        start = position.get(record.turn_index)
        later = trajectory.turns[start + 1 :] if start is not None else []
        action = next((t.action for t in later if t.action is not None), None)
        judgment = action.judgment if action is not None else None
        done, change = read_judgment(judgment)
        source: Literal["judgment", "answer", "tool_call"] | None = "judgment"
        if done is None:
            if action is None:
                source = None
            else:
                done, source = action.kind == "answer", action.kind
        verdicts.append(
            PolicyVerdict(
                round=record.round,
                image=record.image,
                previous=rounds[k - 1].image if k > 0 else None,
                judgment=judgment,
                done=done,
                done_from=source,
                change=change if k > 0 else None,
            )
        )
    return verdicts


# --------------------------------------------------------------------------- the reward

_CACHE_SIZE: Final = 4096
_EPS: Final = 1e-9


class ReflectionAccuracy(Reward):
    """The share of the policy's own verdicts that a reference judge agrees with.

    For each image round ``k`` of the trajectory, the policy's verdicts (see
    :class:`PolicyVerdict` and :func:`read_judgment`) are compared with reference verdicts on
    the same images:

    * **done**: the reference says done when ``reference`` scores the image
      ``>= threshold``;
    * **change** (rounds ``k >= 2``, only when the judgment says better / worse / same): with
      ``pairwise``, ``p = P(image k better than image k-1)`` and ``d = p - 0.5``; without it,
      the reference scores' difference ``d = s_k - s_{k-1}``. "better" if ``d > 0`` and
      ``d >= margin``, "worse" if ``d < 0`` and ``d <= -margin``, else "same".

    The score is matched / compared over the verdicts the policy expressed and the reference
    could check; ``None`` (a recorded failure) when there are none. ``components`` has
    ``"round{k}.done"`` and ``"round{k}.better"`` (1.0 when matched); ``info`` lists every
    verdict, the mismatches and the reference's failures. Reference scores are cached by image
    SHA-256 (and task), so scoring many trajectories of one task, or resampled ones, does not
    re-score an image.

    As a reward it needs the trajectory (``ctx.trajectory``, as ``Agent(rewards=...)`` gives
    it); :meth:`ascore_trajectory` scores a trajectory directly.

    Args:
        reference: The reference pointwise judge (e.g. a ``ChecklistJudge``; ``SceneJudge`` in
            the simulator).
        pairwise: A reference pairwise judge for better / worse verdicts (e.g. a
            ``PairwiseJudge``); default: the difference of ``reference`` scores.
        threshold: Reference score from which an image counts as done (1.0 suits strict 0/1
            judges).
        margin: Smallest difference (from 0.5 for pairwise, from 0 for scores) read as better
            or worse; smaller differences are "same". 0 (default): any difference counts.
        name: The reward's name.

    Raises:
        ConfigurationError: For a reference that is not a ``Reward``, a ``pairwise`` that is
            not a ``PairwiseReward``, or a non-finite threshold or negative margin.

    Example:
        ```python
        from genagent import Agent
        from genagent.rewards import ReflectionAccuracy
        from genagent.sim import HeuristicPolicy, SceneJudge, sample_tasks, scene_tools

        agent = Agent(tools=scene_tools(), policy=HeuristicPolicy(seed=0), max_rounds=3)
        trajectory = agent.run(sample_tasks(1, seed=4)[0], seed=0)
        output = ReflectionAccuracy(SceneJudge()).score_trajectory(trajectory)
        print(output.score, output.components, output.info["mismatches"])
        ```
    """

    name = "reflection_accuracy"

    def __init__(
        self,
        reference: Reward,
        *,
        pairwise: PairwiseReward | None = None,
        threshold: float = 1.0,
        margin: float = 0.0,
        name: str | None = None,
    ) -> None:
        if not isinstance(reference, Reward):
            raise ConfigurationError(
                f"reference must be a Reward (e.g. ChecklistJudge(policy) or SceneJudge()), got "
                f"{type(reference).__name__}"
            )
        if pairwise is not None and not isinstance(pairwise, PairwiseReward):
            raise ConfigurationError(
                f"pairwise must be a PairwiseReward (e.g. PairwiseJudge(policy)) or None, got "
                f"{type(pairwise).__name__}"
            )
        for what, value in (("threshold", threshold), ("margin", margin)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigurationError(f"{what} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigurationError(f"{what} must be finite, got {value!r}")
        if margin < 0:
            raise ConfigurationError(f"margin must be >= 0, got {margin!r}")
        self.reference = reference
        self.pairwise = pairwise
        self.threshold = float(threshold)
        self.margin = float(margin)
        if name is not None:
            self.name = name
        self._cache: OrderedDict[Hashable, float] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def policy_verdicts(trajectory: Trajectory) -> list[PolicyVerdict]:
        """The policy's verdict on each image round (what is compared with the reference)."""
        return policy_verdicts(trajectory)

    async def ascore(
        self, prompt: str, image: PILImage.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        """Score ``ctx.trajectory`` (the image itself is not used)."""
        if ctx is None or ctx.trajectory is None:
            return RewardOutput(
                score=None,
                info={
                    "error": "reflection accuracy needs the trajectory: use it in "
                    "Agent(rewards=...), pass RewardContext(trajectory=...), or call "
                    "ascore_trajectory(trajectory)"
                },
            )
        return await self.ascore_trajectory(ctx.trajectory, task=ctx.task)

    def score_trajectory(self, trajectory: Trajectory, task: Task | None = None) -> RewardOutput:
        """Like :meth:`ascore_trajectory`, from synchronous code."""
        return run_sync(self.ascore_trajectory(trajectory, task=task))

    async def ascore_trajectory(
        self, trajectory: Trajectory, task: Task | None = None
    ) -> RewardOutput:
        """The reflection accuracy of ``trajectory``.

        Args:
            trajectory: A finished run (its images must be readable: a trajectory returned by
                ``Agent.run`` or loaded with ``Trajectory.load``).
            task: The task whose metadata the reference judges use (default: the
                trajectory's).
        """
        task = task if task is not None else trajectory.task
        verdicts = policy_verdicts(trajectory)
        task_key = _task_key(task)
        failures: list[dict[str, Any]] = []
        # reference scores: every image whose done verdict is compared, and both images of a
        # change verdict when there is no pairwise reference
        wanted: dict[str, tuple[ImageRef, int]] = {}
        for v in verdicts:
            if v.done is not None:
                wanted.setdefault(v.image.sha256, (v.image, v.round))
            if v.change is not None and self.pairwise is None and v.previous is not None:
                wanted.setdefault(v.image.sha256, (v.image, v.round))
                wanted.setdefault(v.previous.sha256, (v.previous, v.round - 1))
        pairs = [
            v
            for v in verdicts
            if v.change is not None and v.previous is not None and self.pairwise is not None
        ]
        shas = list(wanted)
        scored, compared_pairs = await asyncio.gather(
            asyncio.gather(
                *(self._score(wanted[s][0], wanted[s][1], trajectory, task, task_key) for s in shas)
            ),
            asyncio.gather(*(self._compare(v, trajectory, task, task_key) for v in pairs)),
        )
        scores: dict[str, float | None] = {}
        for sha, (value, failure) in zip(shas, scored, strict=True):
            scores[sha] = value
            if failure is not None:
                failures.append({"round": wanted[sha][1], "reference": "pointwise", **failure})
        probs: dict[int, float | None] = {}
        for v, (prob, failure) in zip(pairs, compared_pairs, strict=True):
            probs[v.round] = prob
            if failure is not None:
                failures.append({"round": v.round, "reference": "pairwise", **failure})

        components: dict[str, float | None] = {}
        mismatches: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        for v in verdicts:
            score = scores.get(v.image.sha256)
            done_ref = score >= self.threshold if score is not None else None
            change_ref = self._reference_change(v, scores, probs)
            records.append(
                {
                    "round": v.round,
                    "judgment": v.judgment,
                    "done": v.done,
                    "done_from": v.done_from,
                    "done_ref": done_ref if v.done is not None else None,
                    "reference_score": score,
                    "change": v.change,
                    "change_ref": change_ref,
                    "prob_better": probs.get(v.round),
                }
            )
            if v.done is not None and done_ref is not None:
                components[f"round{v.round}.done"] = float(v.done == done_ref)
                if v.done != done_ref:
                    mismatches.append(
                        {
                            "round": v.round,
                            "verdict": "done",
                            "policy": v.done,
                            "reference": done_ref,
                        }
                    )
            if v.change is not None and change_ref is not None:
                components[f"round{v.round}.better"] = float(v.change == change_ref)
                if v.change != change_ref:
                    mismatches.append(
                        {
                            "round": v.round,
                            "verdict": "better",
                            "policy": v.change,
                            "reference": change_ref,
                        }
                    )
        info: dict[str, Any] = {
            "verdicts": records,
            "mismatches": mismatches,
            "compared": len(components),
            "matched": int(sum(s or 0.0 for s in components.values())),
            "reference_failures": failures,
            "reference": self.reference.describe(),
            "pairwise": _describe_pairwise(self.pairwise),
            "threshold": self.threshold,
            "margin": self.margin,
        }
        if not components:
            info["error"] = (
                "no verdict to compare: the trajectory has no image rounds, the policy expressed "
                "no verdict, or the reference could not score the images"
            )
            return RewardOutput(score=None, info=info)
        return RewardOutput(
            score=info["matched"] / len(components), components=components, info=info
        )

    def describe(self) -> dict[str, Any]:
        """Settings, including the reference judges."""
        return {
            **super().describe(),
            "reference": self.reference.describe(),
            "pairwise": _describe_pairwise(self.pairwise),
            "threshold": self.threshold,
            "margin": self.margin,
        }

    # ------------------------------------------------------------------ reference verdicts

    def _reference_change(
        self,
        v: PolicyVerdict,
        scores: dict[str, float | None],
        probs: dict[int, float | None],
    ) -> Change | None:
        if v.previous is None or v.change is None:
            return None
        if self.pairwise is not None:
            prob = probs.get(v.round)
            delta = prob - 0.5 if prob is not None else None
        else:
            now, before = scores.get(v.image.sha256), scores.get(v.previous.sha256)
            delta = now - before if now is not None and before is not None else None
        if delta is None:
            return None
        # inclusive bounds (p = 0.6 with margin 0.1 is "better", despite 0.6 - 0.5 < 0.1 in
        # floating point); a zero difference is always "same"
        if delta > 0 and delta >= self.margin - _EPS:
            return "better"
        if delta < 0 and delta <= -self.margin + _EPS:
            return "worse"
        return "same"

    def _cached(self, key: Hashable) -> float | None:
        with self._lock:
            value = self._cache.get(key)
            if value is not None:
                self._cache.move_to_end(key)
            return value

    def _store(self, key: Hashable, value: float) -> None:
        with self._lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)

    async def _score(
        self, ref: ImageRef, round_: int, trajectory: Trajectory, task: Task, task_key: str
    ) -> tuple[float | None, dict[str, Any] | None]:
        key = ("score", ref.sha256, task_key)
        cached = self._cached(key)
        if cached is not None:
            return cached, None
        try:
            image = await asyncio.to_thread(ref.open)
        except Exception as exc:  # an unreadable image is a failed check, not a crash
            return None, {"error": f"{type(exc).__name__}: {exc}"}
        ctx = RewardContext(task=task, trajectory=trajectory, round=round_, image_ref=ref)
        output = await self.reference.safe_ascore(task.prompt, image, ctx)
        if output.score is None:
            return None, {"error": output.info.get("error", "the reference returned no score")}
        self._store(key, output.score)
        return output.score, None

    async def _compare(
        self, v: PolicyVerdict, trajectory: Trajectory, task: Task, task_key: str
    ) -> tuple[float | None, dict[str, Any] | None]:
        assert self.pairwise is not None and v.previous is not None
        key = ("pair", v.image.sha256, v.previous.sha256, task_key)
        cached = self._cached(key)
        if cached is not None:
            return cached, None
        try:
            now, before = await asyncio.gather(
                asyncio.to_thread(v.image.open), asyncio.to_thread(v.previous.open)
            )
            ctx = RewardContext(task=task, trajectory=trajectory, round=v.round, image_ref=v.image)
            output: PairwiseOutput = await self.pairwise.acompare(task.prompt, now, before, ctx)
        except ConfigurationError:
            raise
        except Exception as exc:  # like Reward.safe_ascore: a failed comparison is recorded
            return None, {"error": f"{type(exc).__name__}: {exc}"}
        if output.prob_a_better is None:
            return None, {"error": output.info.get("error", "the comparison failed")}
        self._store(key, output.prob_a_better)
        return output.prob_a_better, None


def _task_key(task: Task) -> str:
    payload = json.dumps(
        {"prompt": task.prompt, "metadata": task.metadata}, sort_keys=True, default=repr
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _describe_pairwise(pairwise: PairwiseReward | None) -> dict[str, Any] | None:
    if pairwise is None:
        return None
    describe = getattr(pairwise, "describe", None)
    if callable(describe):
        info = describe()
        if isinstance(info, dict):
            return info
    return {
        "name": pairwise.name,
        "class": f"{type(pairwise).__module__}.{type(pairwise).__qualname__}",
    }
