"""VLM judges: rewards that ask a vision-language model about an image.

Each judge wraps any :class:`~genagent.policies.Policy` (a local ``TransformersPolicy``, an
``OpenAIPolicy`` on GPT-4.1 or a vLLM server, a ``ScriptedPolicy`` in tests), sends the image
with a fixed, versioned instruction, and parses the reply tolerantly (code fences, prose around
JSON, Python-literal dicts, ``<think>`` blocks). An unreadable reply is re-asked a bounded number
of times and then recorded as a failure (score ``None``, the raw reply kept), never dropped.
Every output records the judge model, the instruction's version, its text and SHA-256, and
the raw reply. See ``docs/judges.md``.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

from genagent.errors import ConfigurationError, PolicyError
from genagent.images import ImageRef, MemoryImageStore
from genagent.messages import Message
from genagent.policies._base import Policy, SamplingParams, describe_policy
from genagent.rewards._base import PairwiseReward, Reward, RewardContext
from genagent.rewards._output import PairwiseOutput, RewardOutput
from genagent.trajectory import Usage

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "ChecklistItem",
    "ChecklistJudge",
    "JudgeQuery",
    "JudgeVerdict",
    "PairwiseAsReward",
    "PairwiseJudge",
    "PointwiseJudge",
    "VLMJudge",
    "WiseJudge",
    "build_checklist",
    "counts_for",
]

logger = logging.getLogger("genagent.rewards")

_DEFAULT_SAMPLING: Final = SamplingParams(temperature=0.0, max_new_tokens=2048)
"""Greedy decoding: a judge should give the same verdict for the same image."""

_MAX_REPLY_CHARS: Final = 100_000  # longer replies are cut before parsing (hostile input guard)


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class JudgeVerdict:
    """What a judge's reply says, once parsed.

    Attributes:
        score: The score in ``[0, 1]`` (for a pairwise judge: the probability that the first
            image shown is the better one).
        components: Named sub-scores (per checklist item, per criterion).
        details: Reasons and anything else worth recording in ``info``.
    """

    score: float
    components: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeQuery:
    """One question to a judge model: the instruction, the reply format, and its parser.

    Attributes:
        text: The instruction sent after the image(s); recorded with every score.
        format: The expected reply format, repeated to the model when a reply is unreadable.
        parse: Turns the reply (reasoning blocks already removed) into a verdict; raises
            ``ValueError`` saying what is wrong when the reply cannot be read.
    """

    text: str
    format: str
    parse: Callable[[str], JudgeVerdict]

    @property
    def sha256(self) -> str:
        """SHA-256 of the instruction text."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass
class _Answer:
    """The outcome of asking: a verdict, or the error, with every raw reply."""

    verdict: JudgeVerdict | None
    replies: list[str]
    model: str | None
    usage: Usage
    error: dict[str, Any] | None = None


class _Asker:
    """Sends a query with images to the policy, re-asking on an unreadable reply."""

    def __init__(self, policy: Policy, retries: int, sampling: SamplingParams | None) -> None:
        if not callable(getattr(policy, "generate", None)):
            raise ConfigurationError(
                f"a judge needs a Policy (an object with `async generate(messages, ...)`), got "
                f"{type(policy).__name__}; pass e.g. OpenAIPolicy(base_url, model=...)"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be an integer >= 0, got {retries!r}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ConfigurationError(
                f"sampling must be SamplingParams, got {type(sampling).__name__}"
            )
        self.policy = policy
        self.retries = retries
        self.sampling = sampling if sampling is not None else _DEFAULT_SAMPLING

    async def ask(self, parts: Sequence[str | ImageRef], query: JudgeQuery) -> _Answer:
        messages = [Message.user(*parts, query.text)]
        answer = _Answer(verdict=None, replies=[], model=None, usage=Usage())
        reason = ""
        for _ in range(self.retries + 1):
            try:
                output = await self.policy.generate(messages, sampling=self.sampling)
                text = output.text
                if not isinstance(text, str):
                    raise PolicyError(
                        f"the judge model returned {type(text).__name__} instead of text"
                    )
            except ConfigurationError:
                raise  # a judge model that cannot work at all (weights that do not load)
            except Exception as exc:  # the server, the GPU, a timeout: recorded, not raised
                # (CancelledError and KeyboardInterrupt are not Exceptions: they propagate)
                answer.error = {"type": type(exc).__name__, "message": str(exc) or repr(exc)}
                return answer
            answer.replies.append(text)
            answer.model = output.model or answer.model
            answer.usage = answer.usage + output.usage
            try:
                answer.verdict = query.parse(_answer_text(text))
                return answer
            except ValueError as exc:
                reason = str(exc)
            except Exception as exc:  # a parser tripped by a hostile reply: unreadable
                reason = f"{type(exc).__name__}: {exc}"
            messages = [
                *messages,
                Message.assistant(text),
                Message.user(
                    f"Your reply could not be read: {reason.rstrip('.')}. Reply again in exactly "
                    f"this format, with nothing else:\n{query.format}"
                ),
            ]
        answer.error = {
            "type": "unparseable_reply",
            "message": f"the judge's reply could not be read: {reason}",
            "attempts": len(answer.replies),
        }
        return answer

    def record(
        self, judge: str, version: str, query: JudgeQuery, answer: _Answer
    ) -> dict[str, Any]:
        """The provenance recorded with every score (never an API key)."""
        policy_info = describe_policy(self.policy)
        model = answer.model or policy_info.get("model") or getattr(self.policy, "name", None)
        info: dict[str, Any] = {
            "judge": judge,
            "judge_model": str(model) if model is not None else type(self.policy).__name__,
            "judge_policy": policy_info,
            "judge_version": version,
            "prompt_sha256": query.sha256,
            "prompt": query.text,
            "raw": answer.replies[-1] if answer.replies else None,
            "usage": answer.usage.model_dump(),
        }
        if len(answer.replies) > 1:
            info["raw_attempts"] = list(answer.replies)
        return info

    def describe(self) -> dict[str, Any]:
        return {
            "judge_policy": describe_policy(self.policy),
            "retries": self.retries,
            "sampling": self.sampling.model_dump(exclude_defaults=True),
        }

    async def aclose(self) -> None:
        close = getattr(self.policy, "aclose", None)
        if close is not None and inspect.iscoroutinefunction(close):
            await close()


async def _as_ref(image: PILImage.Image, ctx: RewardContext | None) -> ImageRef:
    """A readable reference to ``image``: the context's stored one when it is that image."""
    ref = ctx.image_ref if ctx is not None else None
    if ref is not None and ref.store is not None and (ref.width, ref.height) == image.size:
        return ref
    return await asyncio.to_thread(MemoryImageStore().put, image)


# --------------------------------------------------------------------------- VLMJudge


class VLMJudge(Reward, abstract=True):
    """Base class of judges that ask a vision-language model about one image.

    A subclass sets ``version`` (bump it whenever the instruction changes) and implements
    :meth:`build_query`; asking, re-asking, failure recording and provenance live here.

    Args:
        policy: The judge model: any policy (``OpenAIPolicy``, ``TransformersPolicy``, ...).
        retries: How many times an unreadable reply is re-asked (with a short reminder of the
            format) before the score is recorded as a failure.
        sampling: Sampling settings; default greedy (temperature 0).
        name: The reward's name (default: the snake-cased class name).

    Raises:
        ConfigurationError: If ``policy`` is not a policy, or ``retries`` is negative.
    """

    version: ClassVar[str] = "custom-v1"

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(abstract=abstract, **kwargs)
        if not abstract and cls.build_query is VLMJudge.build_query:
            raise ConfigurationError(
                f"judge class {cls.__qualname__}: implement `build_query(self, prompt, ctx) -> "
                "JudgeQuery` (or pass abstract=True for an intermediate base class)"
            )

    def __init__(
        self,
        policy: Policy,
        *,
        retries: int = 1,
        sampling: SamplingParams | None = None,
        name: str | None = None,
    ) -> None:
        self._asker = _Asker(policy, retries, sampling)
        if name is not None:
            self.name = name

    @property
    def policy(self) -> Policy:
        """The judge model."""
        return self._asker.policy

    @property
    def judge_version(self) -> str:
        """The version of the instruction this judge sends (recorded with every score)."""
        return self.version

    def build_query(self, prompt: str, ctx: RewardContext | None) -> JudgeQuery:
        """The question to ask about an image generated for ``prompt``.

        Raises:
            ValueError: If the task cannot be judged (e.g. malformed metadata); the score is
                then a recorded failure.
        """
        raise ConfigurationError(f"{type(self).__name__} must implement build_query")

    async def ascore(
        self, prompt: str, image: PILImage.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        """Ask the judge model about ``image``; an unreadable reply is a recorded failure."""
        judge = type(self).__name__
        try:
            query = self.build_query(prompt, ctx)
        except ValueError as exc:
            return RewardOutput(
                score=None,
                info={
                    "judge": judge,
                    "judge_version": self.judge_version,
                    "error": {"type": "invalid_task", "message": str(exc)},
                },
            )
        ref = await _as_ref(image, ctx)
        answer = await self._asker.ask([ref], query)
        info = self._asker.record(judge, self.judge_version, query, answer)
        if answer.verdict is None:
            return RewardOutput(score=None, info={**info, "error": answer.error})
        verdict = answer.verdict
        return RewardOutput(
            score=verdict.score,
            components=dict(verdict.components),
            info={**verdict.details, **info},  # provenance keys win over a parser's details
        )

    def describe(self) -> dict[str, Any]:
        """Settings, including the judge model and the instruction's version."""
        return {**super().describe(), "judge_version": self.judge_version, **self._asker.describe()}

    async def aclose(self) -> None:
        """Close the judge model's client on the running event loop (if it has one)."""
        await self._asker.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(policy={getattr(self.policy, 'name', self.policy)!r})"


# --------------------------------------------------------------------------- checklist

_NUMBER_WORDS: Final = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five",
    6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
}  # fmt: skip
_IRREGULAR_PLURALS: Final = {
    "person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep",
    "skis": "skis", "scissors": "scissors", "broccoli": "broccoli",
}  # fmt: skip
_LARGER: Final = frozenset({"large", "larger", "big", "bigger", "huge"})
_SMALLER: Final = frozenset({"small", "smaller", "tiny", "little"})
_REGIONS: Final = {
    "left": "on the left side of the image",
    "right": "on the right side of the image",
    "top": "in the upper half of the image",
    "above": "in the upper half of the image",
    "upper": "in the upper half of the image",
    "bottom": "in the lower half of the image",
    "below": "in the lower half of the image",
    "lower": "in the lower half of the image",
}
_RELATIONS: Final = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_INCLUDE_KEYS: Final = frozenset({"class", "count", "color", "position", "region", "size"})


@dataclass(frozen=True)
class ChecklistItem:
    """One statement a checklist judge verifies.

    Attributes:
        key: Name of the item in ``components`` (``"clock#0.count"``, ``"dog#1.position"``).
        statement: The statement the judge model answers yes or no to.
    """

    key: str
    statement: str


def _plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def _noun(cls: str, count: int) -> str:
    return cls if count == 1 else _plural(cls)


def _number(n: int) -> str:
    return _NUMBER_WORDS.get(n, str(n))


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be an integer >= 1, got {value!r}")
    return value


def build_checklist(
    prompt: str,
    metadata: Mapping[str, Any] | None = None,
    *,
    counts: Literal["exact", "at_least"] | None = None,
) -> list[ChecklistItem]:
    """The checklist for a task, from its GenEval / GenEval++ metadata.

    Each ``include`` entry (``{"class", "count", "color", "region", "size", "position"}``)
    gives one statement per constraint it carries: the count (always), the colour, the region
    of the image, the size relative to the other objects, and the position relative to another
    entry (``"position": [relation, index]``). Each ``exclude`` entry ``{"class", "count"}``
    gives "fewer than ``count``". ``metadata["checklist"]``, a list of statements, is used as
    it is. Without metadata the checklist is one statement: the image matches the prompt.

    Args:
        prompt: The task's prompt.
        metadata: The task's metadata.
        counts: ``"exact"`` (GenEval++: "three clocks" means exactly three; an ``exclude`` of
            ``count + 1`` adds nothing) or ``"at_least"`` (GenEval: ``include`` counts are
            minimums and ``exclude`` entries cap them). ``None`` (default) decides per task
            (:func:`counts_for`): ``"at_least"`` for a task of the ``geneval`` and
            ``geneval-long`` benchmarks (``metadata["benchmark"]``), else ``"exact"``.

    Returns:
        The items, in order.

    Raises:
        ValueError: If the metadata is malformed (never a looser checklist).
    """
    if counts is not None and counts not in ("exact", "at_least"):
        raise ValueError(f"counts must be 'exact', 'at_least' or None, got {counts!r}")
    metadata = metadata or {}
    if counts is None:
        counts = counts_for(metadata)
    explicit = metadata.get("checklist")
    if explicit is not None:
        if (
            isinstance(explicit, (str, bytes))
            or not isinstance(explicit, Sequence)
            or not explicit
            or not all(isinstance(s, str) and s.strip() for s in explicit)
        ):
            raise ValueError("'checklist' must be a non-empty list of statements (strings)")
        return [ChecklistItem(f"item{i + 1}", s.strip()) for i, s in enumerate(explicit)]
    include = metadata.get("include")
    if include is None:
        return [
            ChecklistItem(
                "prompt",
                f'The image shows everything the prompt "{prompt}" asks for: every object, count, '
                "colour, position and attribute.",
            )
        ]
    if isinstance(include, (str, bytes)) or not isinstance(include, Sequence) or not include:
        raise ValueError("'include' must be a non-empty list of object entries")
    entries: list[tuple[str, int, Mapping[str, Any]]] = []
    for i, entry in enumerate(include):
        where = f"include[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be an object entry with a 'class', got {entry!r}")
        unknown = sorted(str(k) for k in entry if k not in _INCLUDE_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; known: {sorted(_INCLUDE_KEYS)}")
        cls = entry.get("class")
        if not isinstance(cls, str) or not cls.strip():
            raise ValueError(f"{where}: 'class' must be a non-empty string, got {cls!r}")
        entries.append(
            (cls.strip(), _positive_int(entry.get("count", 1), f"{where}: 'count'"), entry)
        )
    classes = [cls for cls, _, _ in entries]
    items: list[ChecklistItem] = []
    for i, (cls, n, entry) in enumerate(entries):
        key = f"{cls}#{i}"
        noun = _noun(cls, n)
        the = f"The {noun} {'is' if n == 1 else 'are'}"
        if counts == "exact":
            items.append(
                ChecklistItem(f"{key}.count", f"The image contains exactly {_number(n)} {noun}.")
            )
        else:
            items.append(
                ChecklistItem(f"{key}.count", f"The image contains at least {_number(n)} {noun}.")
            )
        color = entry.get("color")
        if color is not None:
            if not isinstance(color, str) or not color.strip():
                raise ValueError(f"include[{i}]: 'color' must be a colour name, got {color!r}")
            if classes.count(cls) > 1:
                text = f"The image contains {_number(n)} {color} {noun}."
            else:
                text = f"{the} {color}." if n == 1 else f"All the {noun} are {color}."
            items.append(ChecklistItem(f"{key}.color", text))
        region = entry.get("region")
        if region is not None:
            if not isinstance(region, str) or region not in _REGIONS:
                raise ValueError(
                    f"include[{i}]: 'region' must be one of {sorted(_REGIONS)}, got {region!r}"
                )
            items.append(ChecklistItem(f"{key}.region", f"{the} {_REGIONS[region]}."))
        size = entry.get("size")
        if size is not None:
            if not isinstance(size, str) or size not in _LARGER | _SMALLER:
                raise ValueError(
                    f"include[{i}]: 'size' must be one of {sorted(_LARGER | _SMALLER)}, got "
                    f"{size!r}"
                )
            comparative = "larger" if size in _LARGER else "smaller"
            others = [_noun(c, m) for j, (c, m, _) in enumerate(entries) if j != i]
            if others:
                text = f"{the} {comparative} than the {' and the '.join(others)}."
            else:
                text = f"{the} {'large' if comparative == 'larger' else 'small'} in the image."
            items.append(ChecklistItem(f"{key}.size", text))
        position = entry.get("position")
        if position is not None:
            if (
                isinstance(position, (str, bytes))
                or not isinstance(position, Sequence)
                or len(position) != 2
                or position[0] not in _RELATIONS
                or isinstance(position[1], bool)
                or not isinstance(position[1], int)
                or not 0 <= position[1] < len(entries)
                or position[1] == i
            ):
                raise ValueError(
                    f"include[{i}]: 'position' must be [relation, index of another entry] with "
                    f"a relation in {sorted(_RELATIONS)}, got {position!r}"
                )
            relation, j = position[0], position[1]
            other = _noun(entries[j][0], entries[j][1])
            items.append(
                ChecklistItem(f"{key}.position", f"{the} {_RELATIONS[relation]} the {other}.")
            )
    exclude = metadata.get("exclude", [])
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Sequence):
        raise ValueError("'exclude' must be a list of {'class', 'count'} entries")
    for k, entry in enumerate(exclude):
        where = f"exclude[{k}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("class"), str):
            raise ValueError(f"{where} must be an entry with a 'class', got {entry!r}")
        unknown = sorted(str(key) for key in entry if key not in {"class", "count"})
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; known: ['class', 'count']")
        cls = entry["class"].strip()
        m = _positive_int(entry.get("count", 1), f"{where}: 'count'")
        if counts == "exact" and any(c == cls and n + 1 == m for c, n, _ in entries):
            continue  # "exactly n" already says "fewer than n + 1"
        text = (
            f"The image contains no {cls}."
            if m == 1
            else f"The image contains fewer than {_number(m)} {_plural(cls)}."
        )
        items.append(ChecklistItem(f"exclude#{k}.{cls}", text))
    return items


_AT_LEAST_BENCHMARKS: Final = frozenset({"geneval", "geneval-long"})


def counts_for(metadata: Mapping[str, Any] | None) -> Literal["exact", "at_least"]:
    """How a task's ``include`` counts are read when nothing forces it.

    GenEval's official evaluation reads an ``include`` count as a minimum (its ``exclude``
    entries cap it), so a task of ``geneval`` or ``geneval-long`` (``metadata["benchmark"]``,
    as :func:`~genagent.evals.load_benchmark` sets it) gets ``"at_least"``; every other task,
    GenEval++ included, gets ``"exact"``.
    """
    benchmark = (metadata or {}).get("benchmark")
    return (
        "at_least" if isinstance(benchmark, str) and benchmark in _AT_LEAST_BENCHMARKS else "exact"
    )


class ChecklistJudge(VLMJudge):
    """GenEval++-style checklist judge: yes or no, with a reason, for every constraint.

    The checklist comes from the task's GenEval metadata (:func:`build_checklist`); without
    metadata the judge is asked whether the image matches the prompt as a whole. The model
    answers every statement in one JSON reply.

    ``components`` has one 0/1 entry per item; ``info["items"]`` gives each statement, its
    verdict and the judge's reason, and ``info["failed"]`` the keys of the failed items.

    Args:
        policy: The judge model.
        mode: ``"strict"``: 1.0 only when every item passes, else 0.0 (GenEval's rule);
            ``"fraction"``: the share of items that pass.
        counts: How ``include`` counts are read: ``"exact"`` (GenEval++), ``"at_least"``
            (GenEval), or ``None`` (default): per task, ``"at_least"`` for a ``geneval`` /
            ``geneval-long`` task and ``"exact"`` otherwise (:func:`counts_for`). The counts
            used are recorded in ``info["counts"]``. See :func:`build_checklist`.
        retries: Re-asks after an unreadable reply.
        sampling: Sampling settings; default greedy.
        name: The reward's name.

    Example:
        ```python
        import asyncio
        from PIL import Image
        from genagent import ScriptedPolicy, Task
        from genagent.rewards import ChecklistJudge, RewardContext

        judge = ChecklistJudge(ScriptedPolicy([
            '{"items": [{"id": 1, "answer": "yes", "reason": "One apple."},'
            ' {"id": 2, "answer": "no", "reason": "It is green."}]}'
        ]))
        include = [{"class": "apple", "color": "red"}]
        task = Task(prompt="a red apple", metadata={"include": include})
        image = Image.new("RGB", (32, 32), "green")
        output = asyncio.run(judge.ascore(task.prompt, image, RewardContext(task=task)))
        print(output.score, output.components)  # 0.0 {'apple#0.count': 1.0, 'apple#0.color': 0.0}
        print(output.info["judge_version"], output.info["items"][1]["reason"])
        ```
    """

    version: ClassVar[str] = "checklist-v1"

    def __init__(
        self,
        policy: Policy,
        *,
        mode: Literal["strict", "fraction"] = "strict",
        counts: Literal["exact", "at_least"] | None = None,
        retries: int = 1,
        sampling: SamplingParams | None = None,
        name: str | None = None,
    ) -> None:
        if mode not in ("strict", "fraction"):
            raise ConfigurationError(f"mode must be 'strict' or 'fraction', got {mode!r}")
        if counts is not None and counts not in ("exact", "at_least"):
            raise ConfigurationError(
                f"counts must be 'exact' (GenEval++), 'at_least' (GenEval) or None (per task), "
                f"got {counts!r}"
            )
        super().__init__(policy, retries=retries, sampling=sampling, name=name)
        self.mode = mode
        self.counts = counts

    def build_query(self, prompt: str, ctx: RewardContext | None) -> JudgeQuery:
        """The checklist question for ``prompt`` (task metadata from ``ctx.task``)."""
        metadata = ctx.task.metadata if ctx is not None and ctx.task is not None else None
        counts = self.counts if self.counts is not None else counts_for(metadata)
        items = build_checklist(prompt, metadata, counts=counts)
        statements = "\n".join(f"{k}. {item.statement}" for k, item in enumerate(items, 1))
        example = ", ".join(
            f'{{"id": {k}, "answer": "yes" or "no", "reason": "<one short sentence>"}}'
            for k in range(1, min(len(items), 2) + 1)
        )
        more = ", ..." if len(items) > 2 else ""
        reply_format = (
            f'{{"items": [{example}{more}]}}\n'
            f"with exactly {len(items)} entries, one per statement, in order."
        )
        text = (
            "You are a strict visual inspector. Check an AI-generated image against a "
            "checklist.\n\n"
            f'The image was generated for the prompt: "{prompt}"\n\n'
            'For each statement below, answer "yes" only if it is clearly true in the image; '
            'answer "no" if it is false, only partly true, or impossible to verify. Count '
            "objects one by one. Judge only what is visible.\n\n"
            f"Statements:\n{statements}\n\n"
            f"Reply with a JSON object and nothing else, in this form:\n{reply_format}"
        )
        mode = self.mode

        def parse(reply: str) -> JudgeVerdict:
            answers = _checklist_answers(reply, len(items))
            components: dict[str, float | None] = {}
            details: list[dict[str, Any]] = []
            for item, (passed, reason) in zip(items, answers, strict=True):
                components[item.key] = 1.0 if passed else 0.0
                details.append(
                    {
                        "key": item.key,
                        "statement": item.statement,
                        "passed": passed,
                        "reason": reason,
                    }
                )
            passed_count = sum(1 for p, _ in answers if p)
            score = (
                float(passed_count == len(items)) if mode == "strict" else passed_count / len(items)
            )
            failed = [d["key"] for d in details if not d["passed"]]
            return JudgeVerdict(
                score, components, {"items": details, "failed": failed, "counts": counts}
            )

        return JudgeQuery(text=text, format=reply_format, parse=parse)

    def describe(self) -> dict[str, Any]:
        """Settings, including the judge model and the instruction's version."""
        return {**super().describe(), "mode": self.mode, "counts": self.counts or "per-task"}


# --------------------------------------------------------------------------- WISE

# The criteria and the 0-2 scale follow the official WISE judge (PKU-YuanGroup/WISE,
# gpt_eval.py: consistency, realism and aesthetic quality, each 0/1/2, scored by
# gpt-4o-2024-05-13; WiScore = (0.7 C + 0.2 R + 0.1 A) / 2). The "verified" mode follows
# WISE_Verified (same repository, README of 2026-04-19: a binary 0/1 score of world-knowledge
# consistency and realism, judged by Qwen3.5-35B-A3B behind vLLM). The wording here is ours.
_WISE_FORMAT: Final = (
    "Consistency: <0, 1 or 2>\nRealism: <0, 1 or 2>\nAesthetic Quality: <0, 1 or 2>"
)
_WISE_KEYS: Final = ("consistency", "realism", "aesthetic_quality")
_WISE_TENTHS: Final = {"consistency": 7, "realism": 2, "aesthetic_quality": 1}
_VERIFIED_FORMAT: Final = '{"reason": "<one or two sentences>", "score": <0 or 1>}'


def _explanation(ctx: RewardContext | None) -> str | None:
    metadata = ctx.task.metadata if ctx is not None and ctx.task is not None else {}
    for key in ("explanation", "Explanation"):
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


class WiseJudge(VLMJudge):
    """WISE-style world-knowledge judge.

    ``mode="wiscore"`` (default) scores consistency, realism and aesthetic quality, each an
    integer 0-2, on the criteria of the official WISE judge, and returns the WiScore
    ``(0.7 * consistency + 0.2 * realism + 0.1 * aesthetic) / 2`` in ``[0, 1]``; the three
    raw scores are the ``components``. ``mode="verified"`` asks WISE_Verified's binary
    question instead: does the image correctly show what the prompt implies (score 0 or 1,
    component ``"verified"``, with a reason). Both use the task's WISE explanation
    (``task.metadata["explanation"]``) when there is one.

    Args:
        policy: The judge model.
        mode: ``"wiscore"`` or ``"verified"``.
        retries: Re-asks after an unreadable reply.
        sampling: Sampling settings; default greedy.
        name: The reward's name.
    """

    version: ClassVar[str] = "wise-v1"
    verified_version: ClassVar[str] = "wise-verified-v1"

    def __init__(
        self,
        policy: Policy,
        *,
        mode: Literal["wiscore", "verified"] = "wiscore",
        retries: int = 1,
        sampling: SamplingParams | None = None,
        name: str | None = None,
    ) -> None:
        if mode not in ("wiscore", "verified"):
            raise ConfigurationError(f"mode must be 'wiscore' or 'verified', got {mode!r}")
        super().__init__(policy, retries=retries, sampling=sampling, name=name)
        self.mode = mode

    @property
    def judge_version(self) -> str:
        """``wise-v1`` for WiScore, ``wise-verified-v1`` for the binary WISE_Verified question."""
        return self.verified_version if self.mode == "verified" else self.version

    def build_query(self, prompt: str, ctx: RewardContext | None) -> JudgeQuery:
        """The WISE question for ``prompt`` (explanation from ``ctx.task``)."""
        explanation = _explanation(ctx)
        given = f'Prompt: "{prompt}"\n' + (
            f'Explanation: "{explanation}"\n' if explanation is not None else ""
        )
        if self.mode == "verified":
            return self._verified_query(given, explanation is not None)
        explained = (
            " The explanation says what the prompt refers to; judge against it."
            if explanation is not None
            else ""
        )
        text = (
            "You are a strict quality auditor for text-to-image generation. Score the image on "
            "three criteria, each an integer 0, 1 or 2. Be very strict: a 2 is rare and only for "
            "an image that fully meets the highest standard; when in doubt, give the lower "
            "score.\n\n"
            f"Consistency (0-2): does the image show what the prompt means, accurately and "
            f"completely?{explained}\n"
            "  0: key elements are missing, wrong, or contradict the prompt.\n"
            "  1: partly right: some elements are present but not all, or not accurately.\n"
            "  2: every element and nuance of the prompt is shown correctly and unambiguously.\n"
            "Realism (0-2): how realistic and physically plausible the image is.\n"
            "  0: clearly artificial or physically impossible.\n"
            "  1: mostly believable, with noticeable flaws.\n"
            "  2: indistinguishable from a real photograph: correct physics, materials and "
            "lighting.\n"
            "Aesthetic Quality (0-2): composition, colour and artistic merit.\n"
            "  0: unappealing, poorly composed.\n"
            "  1: acceptable composition and colours, but nothing distinctive.\n"
            "  2: exceptional: striking composition, harmonious colours, strong style.\n\n"
            f"{given}\n"
            f"Reply with exactly these three lines and nothing else:\n{_WISE_FORMAT}"
        )
        return JudgeQuery(text=text, format=_WISE_FORMAT, parse=_parse_wiscore)

    def _verified_query(self, given: str, explained: bool) -> JudgeQuery:
        what = (
            "what the prompt implies, as the explanation describes it"
            if explained
            else "what the prompt implies (apply your world knowledge)"
        )
        text = (
            "You are a strict judge of world knowledge in text-to-image generation. The prompt "
            "may describe its subject indirectly.\n\n"
            f"{given}\n"
            f"Answer 1 only if the image clearly and correctly shows {what}: the right object, "
            "scene or phenomenon, with the details it requires, rendered realistically enough "
            "to be recognised without doubt. Otherwise answer 0: a wrong or missing subject, a "
            "literal rendering that misses the implied meaning, wrong details, or flaws that "
            "make it hard to recognise.\n\n"
            f"Reply with a JSON object and nothing else:\n{_VERIFIED_FORMAT}"
        )
        return JudgeQuery(text=text, format=_VERIFIED_FORMAT, parse=_parse_verified)

    def describe(self) -> dict[str, Any]:
        """Settings, including the judge model and the instruction's version."""
        return {**super().describe(), "mode": self.mode}


# --------------------------------------------------------------------------- pointwise


class PointwiseJudge(VLMJudge):
    """A judge that rates an image on your criterion, on a numeric scale.

    The score is normalised to ``[0, 1]``: ``(rating - low) / (high - low)``; the raw rating
    is ``components["rating"]`` and the judge's reason ``info["reason"]``.

    Args:
        policy: The judge model.
        criterion: What to rate, in words (e.g. "How well does the image follow the prompt?").
        scale: The ``(low, high)`` integer scale the model rates on.
        retries: Re-asks after an unreadable reply.
        sampling: Sampling settings; default greedy.
        name: The reward's name.

    Raises:
        ConfigurationError: If the criterion is empty or the scale is not two increasing
            integers.
    """

    version: ClassVar[str] = "pointwise-v1"

    def __init__(
        self,
        policy: Policy,
        criterion: str,
        *,
        scale: tuple[int, int] = (0, 10),
        retries: int = 1,
        sampling: SamplingParams | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(criterion, str) or not criterion.strip():
            raise ConfigurationError(
                "criterion must be a non-empty string saying what to rate, e.g. 'How well does "
                "the image follow the prompt?'"
            )
        if (
            not isinstance(scale, tuple)
            or len(scale) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in scale)
            or scale[0] >= scale[1]
        ):
            raise ConfigurationError(
                f"scale must be two increasing integers (low, high), e.g. (0, 10); got {scale!r}"
            )
        super().__init__(policy, retries=retries, sampling=sampling, name=name)
        self.criterion = criterion.strip()
        self.scale = scale

    def build_query(self, prompt: str, ctx: RewardContext | None) -> JudgeQuery:
        """The rating question for ``prompt``."""
        low, high = self.scale
        reply_format = (
            f'{{"reason": "<one or two sentences>", "score": <a number from {low} to {high}>}}'
        )
        text = (
            f'An AI model generated this image for the prompt: "{prompt}"\n\n'
            f"Rate the image on this criterion:\n{self.criterion}\n\n"
            f"Use the scale from {low} (worst) to {high} (best). Be strict and consistent.\n\n"
            f"Reply with a JSON object and nothing else:\n{reply_format}"
        )

        def parse(reply: str) -> JudgeVerdict:
            rating, reason = _parse_rating(reply, low, high)
            return JudgeVerdict(
                (rating - low) / (high - low), {"rating": rating}, {"reason": reason}
            )

        return JudgeQuery(text=text, format=reply_format, parse=parse)

    def describe(self) -> dict[str, Any]:
        """Settings, including the judge model and the instruction's version."""
        return {**super().describe(), "criterion": self.criterion, "scale": list(self.scale)}


# --------------------------------------------------------------------------- pairwise

_PAIRWISE_CRITERION: Final = (
    "Which image satisfies the prompt better? Judge first whether every object, count, colour, "
    "position and attribute the prompt asks for is shown correctly, then overall image quality."
)
_PAIRWISE_FORMAT: Final = '{"reason": "<one or two sentences>", "better": "1" or "2" or "tie"}'


class PairwiseJudge(PairwiseReward):
    """A judge that says which of two images better satisfies the prompt.

    Both images are sent in one message ("Image 1", "Image 2"). VLM judges favour one position;
    with ``swap=True`` (default) the judge is asked twice, with the order swapped, and the two
    answers are averaged, so a judge that always picks the first image gives 0.5. A tie counts
    0.5. If either order cannot be read, the comparison fails (``prob_a_better=None``, the
    error and both raw replies in ``info``): half a swapped comparison is not bias-free.

    Args:
        policy: The judge model.
        criterion: What "better" means (default: prompt fidelity first, then quality).
        swap: Ask in both orders and average.
        retries: Re-asks after an unreadable reply.
        sampling: Sampling settings; default greedy.
        name: The reward's name.
    """

    version: ClassVar[str] = "pairwise-v1"

    def __init__(
        self,
        policy: Policy,
        *,
        criterion: str | None = None,
        swap: bool = True,
        retries: int = 1,
        sampling: SamplingParams | None = None,
        name: str | None = None,
    ) -> None:
        if criterion is not None and (not isinstance(criterion, str) or not criterion.strip()):
            raise ConfigurationError(
                "criterion must be a non-empty string, or None for the default"
            )
        if not isinstance(swap, bool):
            raise ConfigurationError(f"swap must be True or False, got {swap!r}")
        self._asker = _Asker(policy, retries, sampling)
        self.criterion = criterion.strip() if criterion is not None else _PAIRWISE_CRITERION
        self.swap = swap
        if name is not None:
            self.name = name

    @property
    def policy(self) -> Policy:
        """The judge model."""
        return self._asker.policy

    def build_query(self, prompt: str) -> JudgeQuery:
        """The comparison question for ``prompt`` (the images come before it)."""
        text = (
            f'Image 1 and Image 2 were generated by AI models for the prompt: "{prompt}"\n\n'
            f"{self.criterion}\n"
            'Answer "tie" only if neither image is better.\n\n'
            f"Reply with a JSON object and nothing else:\n{_PAIRWISE_FORMAT}"
        )
        return JudgeQuery(text=text, format=_PAIRWISE_FORMAT, parse=_parse_preference)

    async def acompare(
        self,
        prompt: str,
        a: PILImage.Image,
        b: PILImage.Image,
        ctx: RewardContext | None = None,
    ) -> PairwiseOutput:
        """The probability that ``a`` satisfies ``prompt`` better than ``b``."""
        query = self.build_query(prompt)
        ref_a, ref_b = await asyncio.gather(_as_ref(a, None), _as_ref(b, None))
        orders = [("a", ref_a, ref_b)] + ([("b", ref_b, ref_a)] if self.swap else [])
        answers = await asyncio.gather(
            *(self._asker.ask(["Image 1:", x, "Image 2:", y], query) for _, x, y in orders)
        )
        merged = _Answer(
            verdict=None,
            replies=[r for ans in answers for r in ans.replies],
            model=next((ans.model for ans in answers if ans.model), None),
            usage=sum((ans.usage for ans in answers), Usage()),
        )
        info = self._asker.record(type(self).__name__, self.version, query, merged)
        info["raw"] = [ans.replies[-1] if ans.replies else None for ans in answers]
        info.pop("raw_attempts", None)
        probs: list[float] = []
        info["orders"] = []
        for (first, _, _), ans in zip(orders, answers, strict=True):
            entry: dict[str, Any] = {"first": first, "attempts": len(ans.replies)}
            if ans.verdict is not None:
                # the verdict's score is P(the image shown first is better)
                prob_a = ans.verdict.score if first == "a" else 1.0 - ans.verdict.score
                entry.update(ans.verdict.details, prob_a_better=prob_a)
                probs.append(prob_a)
            else:
                entry["error"] = ans.error
            info["orders"].append(entry)
        failed = [e for e in info["orders"] if "error" in e]
        if failed:
            info["error"] = failed[0]["error"]
            return PairwiseOutput(prob_a_better=None, info=info)
        if self.swap:
            info["position_consistent"] = probs[0] == probs[1]
        return PairwiseOutput(prob_a_better=sum(probs) / len(probs), info=info)

    def describe(self) -> dict[str, Any]:
        """Settings, including the judge model and the instruction's version."""
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "judge_version": self.version,
            "swap": self.swap,
            "criterion": self.criterion,
            **self._asker.describe(),
        }

    async def aclose(self) -> None:
        """Close the judge model's client on the running event loop (if it has one)."""
        await self._asker.aclose()

    def __repr__(self) -> str:
        return (
            f"PairwiseJudge(policy={getattr(self.policy, 'name', self.policy)!r}, swap={self.swap})"
        )

    def against(self, reference: Any = "previous", *, name: str | None = None) -> PairwiseAsReward:
        """This judge as a pointwise reward (a :class:`PairwiseAsReward`).

        ``PairwiseJudge(policy).against("previous")`` scores an image by the probability that
        it is better than the run's previous image, so that it can serve as
        ``Agent(judge=...)``, ``Agent(rewards=...)``, an ``Evaluation`` judge or ``--judge``.
        """
        return PairwiseAsReward(self, reference, name=name)


# --------------------------------------------------------------------------- pairwise as reward

_RUN_REFERENCES: Final = ("previous", "first")


class PairwiseAsReward(Reward):
    """A pairwise judge used as a pointwise reward: P(the image is better than a reference).

    The score of an image is the pairwise judge's probability that it satisfies the prompt
    better than the reference image (``PairwiseJudge`` asks in both orders by default), so
    higher is better and 0.5 means "no better, no worse". The reference is:

    * ``"previous"`` (default): the image the run had before this one, read from
      ``ctx.trajectory`` and ``ctx.round`` — the image kept after round ``k - 1`` for an image
      of round ``k``. In ``Agent(candidates=N, judge=...)`` every candidate of a round is
      compared with the image the run continued from; in ``Agent(rewards=...)`` the final
      image is compared with the one before it.
    * ``"first"``: the image kept after the run's first round.
    * an image (a PIL image, a bound ``ImageRef``, or the path of an image file): a fixed
      anchor, the same for every image. Use this where the images are scored without their
      run, as ``genagent eval`` / ``Evaluation`` do.

    When there is nothing to compare with (round 1, or a context without a trajectory) the
    score is 0.5 and nothing is asked; ``info["compared"]`` is ``False`` with the reason in
    ``info["note"]``. An image identical to its reference also scores 0.5 unasked. A failed
    comparison is a recorded failure (score ``None``, the pairwise judge's ``info`` kept).
    ``info["reference"]`` says which image the score is relative to.

    Args:
        pairwise: The pairwise judge (a :class:`PairwiseJudge`, or any ``PairwiseReward``).
        reference: ``"previous"``, ``"first"``, or an image / image file.
        name: The reward's name (default ``"pairwise"``).

    Raises:
        ConfigurationError: If ``pairwise`` is not a ``PairwiseReward`` or the reference is
            none of the above (an unreadable file, an unbound ``ImageRef``).

    Example:
        ```python
        from genagent import Agent, ScriptedPolicy
        from genagent.rewards import PairwiseJudge

        judge = PairwiseJudge(ScriptedPolicy(['{"better": "1"}'], cycle=True)).against("previous")
        # Agent(tool, policy=..., candidates=4, judge=judge): keeps the candidate most likely to
        # beat the image the run continued from
        ```
    """

    name = "pairwise"

    def __init__(
        self, pairwise: PairwiseReward, reference: Any = "previous", *, name: str | None = None
    ) -> None:
        if not isinstance(pairwise, PairwiseReward):
            raise ConfigurationError(
                f"PairwiseAsReward needs a PairwiseReward (e.g. PairwiseJudge(policy)), got "
                f"{type(pairwise).__name__}"
            )
        self.pairwise = pairwise
        self.reference: str = "image"
        self._anchor: PILImage.Image | None = None
        self._anchor_sha256: str | None = None
        if isinstance(reference, str) and reference in _RUN_REFERENCES:
            self.reference = reference
        else:
            self._anchor, self._anchor_sha256 = _anchor_image(reference)
        if name is not None:
            self.name = name
        self._warned = False

    async def ascore(
        self, prompt: str, image: PILImage.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        """P(``image`` is better than the reference), 0.5 when there is nothing to compare."""
        base: dict[str, Any] = {"judge": type(self.pairwise).__name__}
        if self._anchor is not None:
            other: PILImage.Image = self._anchor
            where: dict[str, Any] = {"kind": "image", "sha256": self._anchor_sha256}
        else:
            ref, where, note = _run_reference(self.reference, ctx)
            if ref is None:
                if ctx is None or ctx.trajectory is None:
                    self._warn_once()
                return RewardOutput(
                    score=0.5, info={**base, "reference": where, "compared": False, "note": note}
                )
            own = ctx.image_ref if ctx is not None else None
            if own is not None and own.sha256 == ref.sha256:
                return RewardOutput(
                    score=0.5,
                    info={
                        **base,
                        "reference": where,
                        "compared": False,
                        "note": "the image is its own reference",
                    },
                )
            other = await asyncio.to_thread(ref.open)
        output = await self.pairwise.acompare(prompt, image, other, ctx)
        info = {**base, **output.info, "reference": where, "compared": True}
        if output.prob_a_better is None:
            return RewardOutput(score=None, info=info)
        return RewardOutput(
            score=output.prob_a_better, components={"prob_better": output.prob_a_better}, info=info
        )

    def _warn_once(self) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "reward %r compares with the run's %s image, but it was called without a "
                "trajectory (ctx.trajectory): every such image scores 0.5. Give it a fixed "
                "reference image to score images outside a run (e.g. in an Evaluation).",
                self.name,
                self.reference,
            )

    def describe(self) -> dict[str, Any]:
        """Settings: the reference, and the pairwise judge's own description."""
        describe = getattr(self.pairwise, "describe", None)
        return {
            **super().describe(),
            "reference": self.reference
            if self._anchor is None
            else {"image_sha256": self._anchor_sha256},
            "pairwise": describe()
            if callable(describe)
            else {"class": type(self.pairwise).__qualname__},
        }

    async def aclose(self) -> None:
        """Close the pairwise judge's client (if it has one)."""
        close = getattr(self.pairwise, "aclose", None)
        if close is not None and inspect.iscoroutinefunction(close):
            await close()

    def __repr__(self) -> str:
        reference = self.reference if self._anchor is None else f"image {self._anchor_sha256}"
        return f"PairwiseAsReward({self.pairwise!r}, reference={reference!r})"


def _anchor_image(reference: Any) -> tuple[PILImage.Image, str]:
    """A fixed reference image, decoded, and the SHA-256 of its stored encoding."""
    from PIL import Image as PILImageModule

    if isinstance(reference, ImageRef):
        if reference.store is None:
            raise ConfigurationError(
                "the reference ImageRef is not bound to an image store; pass a PIL image or a "
                "file path instead"
            )
        return reference.open(), reference.sha256
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        try:
            with PILImageModule.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"reference must be 'previous', 'first', an image, or the path of an image "
                f"file; {os.fspath(reference)!r} cannot be read as an image ({exc})"
            ) from None
    elif isinstance(reference, PILImageModule.Image):
        image = reference.copy()
    else:
        raise ConfigurationError(
            "reference must be 'previous', 'first', an image, or the path of an image file, "
            f"got {type(reference).__name__}"
        )
    return image, MemoryImageStore().put(image).sha256


def _run_reference(
    reference: str, ctx: RewardContext | None
) -> tuple[ImageRef | None, dict[str, Any], str]:
    """The run's image to compare with: (its reference, where it comes from, why none)."""
    where: dict[str, Any] = {"kind": reference}
    trajectory = ctx.trajectory if ctx is not None else None
    if ctx is None or trajectory is None:
        return None, where, "no trajectory in the context: nothing to compare with"
    rounds = trajectory.rounds
    current = ctx.round
    if current is None:  # the image's own round, else an image after the last round
        own = ctx.image_ref.sha256 if ctx.image_ref is not None else None
        current = next(
            (
                r.round
                for r in rounds
                if own is not None and own in {c.sha256 for c in r.candidates}
            ),
            len(rounds) + 1,
        )
    target = 1 if reference == "first" else current - 1
    where["round"] = current
    if target < 1 or target >= current:
        return None, where, f"round {current} has no earlier image to compare with"
    ref = trajectory.image_after_round(target)
    if ref is None:
        return None, where, f"the run has no image after round {target}"
    where.update(reference_round=target, sha256=ref.sha256)
    return ref, where, ""


# --------------------------------------------------------------------------- parsing

_THINK_END_RE: Final = re.compile(r"</think\s*>", re.IGNORECASE)
_THINK_OPEN_RE: Final = re.compile(r"<think\s*>", re.IGNORECASE)
_FENCE_RE: Final = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_YES: Final = frozenset({"yes", "y", "true", "pass", "passed", "correct", "1", "satisfied", "met"})
_NO: Final = frozenset({"no", "n", "false", "fail", "failed", "incorrect", "0", "unsatisfied"})
_LEADING_YES_NO_RE: Final = re.compile(r"^\W*(yes|no|true|false|pass|fail)\b", re.IGNORECASE)
# every quantifier here is linear: no two adjacent ones can match the same characters
_NUMBERED_RE: Final = re.compile(
    r"^\W*(?:(?:item|statement)\s*)?(\d{1,6})\W*(yes|no|true|false|pass|fail)\b\W*(.*)$",
    re.IGNORECASE,
)
_TOKEN_RE: Final = re.compile(r"[{}\[\]\"'\\]")
_SCAN_STARTS: Final = (48, 16)  # brackets tried: the first 48 and the last 16
_SCAN_BUDGET: Final = 20_000  # bracket / quote tokens visited by _balanced, in all
_LOAD_BUDGET: Final = 4 * _MAX_REPLY_CHARS  # characters handed to json.loads, in all
_LITERAL_MAX: Final = 16_000  # longest text tried as a Python literal (ast is slow)
_ITEMS_KEYS: Final = ("items", "checklist", "answers", "results", "statements", "verdicts")
_ANSWER_KEYS: Final = ("answer", "passed", "pass", "verdict", "result", "satisfied", "value", "ok")


def _answer_text(reply: str) -> str:
    """The answer part of a reply: what follows the last ``</think>``, capped in length."""
    parts = _THINK_END_RE.split(reply)
    text = parts[-1] if len(parts) > 1 else _THINK_OPEN_RE.sub("", reply)
    return text.strip()[:_MAX_REPLY_CHARS]


def _balanced(text: str, budget: int = _SCAN_BUDGET) -> list[str]:
    """Balanced ``{...}`` and ``[...]`` substrings (strings scanned correctly), in order.

    The work is bounded whatever the text, so that a hostile reply cannot stall the event
    loop: the brackets, quotes and backslashes from the first bracket on are listed in one
    pass (at most ``2 * budget`` of them), only the first and last few brackets are tried as
    starts, each scan steps from one such token to the next (plain text costs nothing), and
    the scans stop after ``budget`` tokens in all.
    """
    opening = [k for k in (text.find("{"), text.find("[")) if k >= 0]
    if not opening:
        return []
    positions: list[int] = []
    chars: list[str] = []
    for match in itertools.islice(_TOKEN_RE.finditer(text, min(opening)), 2 * budget):
        positions.append(match.start())
        chars.append(match.group())
    first, last = _SCAN_STARTS
    openers = (i for i, ch in enumerate(chars) if ch in "{[")
    closing = (i for i in range(len(chars) - 1, -1, -1) if chars[i] in "{[")
    starts = sorted(set(itertools.islice(openers, first)) | set(itertools.islice(closing, last)))
    found: list[str] = []
    for begin in starts:
        stack: list[str] = []
        quote: str | None = None
        escaped_at = -1
        for i in range(begin, len(chars)):
            budget -= 1
            if budget < 0:
                return found
            ch = chars[i]
            if quote:
                if positions[i] == escaped_at:
                    continue
                if ch == "\\":
                    escaped_at = positions[i] + 1
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch in "{[":
                stack.append("}" if ch == "{" else "]")
            elif ch in "}]":
                if not stack or stack.pop() != ch:
                    break
                if not stack:
                    found.append(text[positions[begin] : positions[i] + 1])
                    break
    return found


def _load(text: str) -> Any:
    """JSON, else a (short) Python literal; ``_FAIL`` when neither."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    if text.lstrip()[:1] in ("{", "[") and len(text) <= _LITERAL_MAX:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return _FAIL


_FAIL: Final = object()


def _structured(reply: str) -> Iterator[Any]:
    """Every JSON / Python-literal value in ``reply``.

    Tried in order: the whole reply, fenced blocks, then the balanced objects from the last one
    back (the final answer usually comes last). The characters decoded are bounded in all.
    """
    seen: set[str] = set()
    fences = [block.strip() for block in _FENCE_RE.findall(reply)]
    first, last = _SCAN_STARTS
    if len(fences) > first + last:
        fences = fences[:first] + fences[-last:]
    candidates = [reply, *fences, *reversed(_balanced(reply))]
    budget = _LOAD_BUDGET
    for candidate in candidates:
        if not candidate or candidate in seen:
            continue
        seen.add(candidate)
        budget -= len(candidate)
        if budget < 0:
            return
        value = _load(candidate)
        if value is not _FAIL:
            yield value


def _norm_key(key: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(key)[:200].lower()).strip("_")


def _yes_no(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().strip("*_.!\"'` ").lower()
        if word in _YES:
            return True
        if word in _NO:
            return False
        match = _LEADING_YES_NO_RE.match(value)
        if match:
            return match.group(1).lower() in _YES
    return None


def _entry_answer(entry: Any) -> tuple[bool | None, str]:
    if isinstance(entry, Mapping):
        fields = {_norm_key(k): v for k, v in entry.items()}
        for key in _ANSWER_KEYS:
            if key in fields:
                reason = fields.get("reason") or fields.get("explanation") or ""
                return _yes_no(fields[key]), str(reason)
        return None, ""
    return _yes_no(entry), ""


def _item_id(key: Any) -> int | None:
    """The item number in a key such as ``"1"``, ``"item 2"`` or ``"statement_3"``."""
    match = re.fullmatch(r"\W*(?:item|statement|q|question)?[\s_#-]*(\d{1,6})\W*", str(key)[:40])
    return int(match.group(1)) if match else None


def _checklist_answers(reply: str, n: int) -> list[tuple[bool, str]]:
    """The yes/no answers to items 1..n.

    Read, in order of preference: a JSON object that carries the answers under ``"items"`` (or
    ``"answers"``, ...), as asked; numbered lines (``1. yes - ...``) that answer every item; a
    list of answer objects (``[{"answer": "yes"}, ...]``) or an object keyed by item number
    (``{"1": "yes", ...}``). A bare list of scalars (``["yes", "no"]``, ``[0, 1]``) is never an
    answer: such lists turn up in prose, and would override what the reply says.
    """
    values = list(_structured(reply))
    for value in values:
        answers = _explicit_answers(value, n)
        if answers is not None:
            return answers
    lines: dict[int, tuple[bool, str]] = {}
    for line in reply.splitlines():
        match = _NUMBERED_RE.match(line.strip())
        if match:
            lines[int(match.group(1))] = (match.group(2).lower() in _YES, match.group(3).strip())
    if all(k in lines for k in range(1, n + 1)):
        return [lines[k] for k in range(1, n + 1)]
    for value in values:
        answers = _implicit_answers(value, n)
        if answers is not None:
            return answers
    missing = [k for k in range(1, n + 1) if k not in lines]
    raise ValueError(
        f"expected a yes/no answer for each of the {n} statements; found no JSON with them and "
        f"no numbered answer for statement(s) {missing[:10]}"
    )


def _explicit_answers(value: Any, n: int) -> list[tuple[bool, str]] | None:
    """Answers from an object that holds them under ``"items"`` (or a synonym)."""
    if not isinstance(value, Mapping):
        return None
    fields = {_norm_key(k): v for k, v in value.items()}
    for key in _ITEMS_KEYS:
        if key in fields:
            entries = fields[key]
            if isinstance(entries, Mapping):
                return _keyed_answers(entries, n)
            if isinstance(entries, list):
                return _listed_answers(entries, n, scalars=True)
            return None
    return None


def _implicit_answers(value: Any, n: int) -> list[tuple[bool, str]] | None:
    """Answers from a list of answer objects, or from an object keyed by item number."""
    if isinstance(value, list):
        return _listed_answers(value, n, scalars=False)
    if isinstance(value, Mapping) and value and all(_item_id(k) is not None for k in value):
        return _keyed_answers(value, n)
    return None


def _keyed_answers(entries: Mapping[Any, Any], n: int) -> list[tuple[bool, str]] | None:
    by_id: dict[int, tuple[bool | None, str]] = {}
    for key, entry in entries.items():
        ident = _item_id(key)
        if ident is not None:
            by_id[ident] = _entry_answer(entry)
    return _in_order(by_id, n)


def _listed_answers(entries: list[Any], n: int, *, scalars: bool) -> list[tuple[bool, str]] | None:
    by_id: dict[int, tuple[bool | None, str]] = {}
    for position, entry in enumerate(entries, 1):
        ident = position
        if isinstance(entry, Mapping):
            fields = {_norm_key(k): v for k, v in entry.items()}
            if not any(key in fields for key in _ANSWER_KEYS):
                return None
            raw_id = fields.get("id", fields.get("item", fields.get("index", position)))
            found = _item_id(raw_id)
            ident = found if found is not None else position
        elif not scalars:
            return None  # a bare list of scalars is not an answer
        by_id[ident] = _entry_answer(entry)
    return _in_order(by_id, n)


def _in_order(by_id: dict[int, tuple[bool | None, str]], n: int) -> list[tuple[bool, str]] | None:
    if 0 in by_id and n not in by_id:  # numbered from 0
        by_id = {k + 1: v for k, v in by_id.items()}
    out: list[tuple[bool, str]] = []
    for k in range(1, n + 1):
        passed, reason = by_id.get(k, (None, ""))
        if passed is None:
            return None
        out.append((passed, reason))
    return out


def _int_0_2(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be 0, 1 or 2, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} must be 0, 1 or 2, got {value!r}"[:200]) from None
    if number not in (0.0, 1.0, 2.0):
        raise ValueError(f"{what} must be 0, 1 or 2, got {value!r}")
    return int(number)


# "Consistency: 2", "**Realism:** 1", "Aesthetic Quality (0-2) = 0": the name, then ":" or "=",
# then the number; a mention without the separator ("a Consistency 2 would need ...") is not one
_WISE_LINE_RE: Final = re.compile(
    r"\b(consistency|realism|aesthetic[ \t_]*quality|aesthetics?)[\s*]*(?:\([^)\n]{0,40}\)[\s*]*)?"
    r"[:：=][\s*]*(-?\d+(?:\.\d+)?)",
    re.IGNORECASE,
)


def _parse_wiscore(reply: str) -> JudgeVerdict:
    scores: dict[str, Any] = {}
    for value in _structured(reply):
        if isinstance(value, Mapping):
            fields = {_norm_key(k): v for k, v in value.items()}
            fields.setdefault(
                "aesthetic_quality", fields.get("aesthetic", fields.get("aesthetics"))
            )
            if all(fields.get(k) is not None for k in _WISE_KEYS):
                scores = {k: fields[k] for k in _WISE_KEYS}
                break
    if not scores:
        for match in _WISE_LINE_RE.finditer(reply):  # the first line for each score wins
            key = _norm_key(match.group(1))
            scores.setdefault(
                "aesthetic_quality" if key.startswith("aesthetic") else key, match.group(2)
            )
    missing = [k for k in _WISE_KEYS if k not in scores]
    if missing:
        raise ValueError(f"no score for {', '.join(missing)}")
    values = {k: _int_0_2(scores[k], k) for k in _WISE_KEYS}
    # (0.7 C + 0.2 R + 0.1 A) / 2, in integer tenths so that a perfect image scores exactly 1.0
    wiscore = sum(_WISE_TENTHS[k] * values[k] for k in _WISE_KEYS) / 20
    components: dict[str, float | None] = {k: float(v) for k, v in values.items()}
    return JudgeVerdict(wiscore, components)


_VERDICT_LINE_RE: Final = re.compile(
    r"(?:score|verdict|answer|verified|correct)[^\w:=]{0,4}[:=][\s*]*(0|1|yes|no|true|false)\b",
    re.IGNORECASE,
)


def _parse_verified(reply: str) -> JudgeVerdict:
    for value in _structured(reply):
        if isinstance(value, Mapping):
            fields = {_norm_key(k): v for k, v in value.items()}
            for key in ("score", "verified", "correct", "answer", "verdict"):
                if key in fields:
                    verdict = _yes_no(fields[key])
                    if verdict is None:
                        raise ValueError(f'"{key}" must be 0 or 1, got {fields[key]!r}')
                    reason = str(fields.get("reason") or fields.get("explanation") or "")
                    return JudgeVerdict(
                        float(verdict), {"verified": float(verdict)}, {"reason": reason}
                    )
    matches = list(_VERDICT_LINE_RE.finditer(reply))
    bare = _yes_no(reply) if len(reply) <= 8 else None
    if matches:
        bare = _yes_no(matches[-1].group(1))
    if bare is None:
        raise ValueError('expected a JSON object with "score": 0 or 1')
    return JudgeVerdict(float(bare), {"verified": float(bare)}, {"reason": ""})


_RATING_RE: Final = re.compile(
    r"(?:score|rating)[^\w:=]{0,4}[:=][\s*]*(-?\d{1,12}(?:\.\d{1,12})?)"
    r"(?:[ \t]*/[ \t]*(\d{1,12}))?",
    re.IGNORECASE,
)


def _rating_value(value: Any, low: int, high: int) -> float:
    if isinstance(value, bool):
        raise ValueError(f"the score must be a number from {low} to {high}, got {value!r}")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d{1,12}(?:\.\d{1,12})?)\s*(?:/\s*(\d{1,12}))?\s*", value)
        if not match or (match.group(2) is not None and int(match.group(2)) != high):
            raise ValueError(
                f"the score must be a number from {low} to {high}, got {value!r}"[:200]
            )
        value = match.group(1)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"the score must be a number from {low} to {high}, got {value!r}"[:200]
        ) from None
    if not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"the score must be a number from {low} to {high}, got {value!r}")
    return number


def _parse_rating(reply: str, low: int, high: int) -> tuple[float, str]:
    for value in _structured(reply):
        if isinstance(value, Mapping):
            fields = {_norm_key(k): v for k, v in value.items()}
            for key in ("score", "rating"):
                if key in fields:
                    reason = str(fields.get("reason") or fields.get("explanation") or "")
                    return _rating_value(fields[key], low, high), reason
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return _rating_value(value, low, high), ""
    matches = list(_RATING_RE.finditer(reply))
    if matches:
        match = matches[-1]
        if match.group(2) is not None and int(match.group(2)) != high:
            raise ValueError(f"the score is out of {match.group(2)}; use the scale {low} to {high}")
        return _rating_value(match.group(1), low, high), ""
    raise ValueError(f'expected a JSON object with "score": a number from {low} to {high}')


_FIRST: Final = frozenset({"1", "image1", "image_1", "first", "a", "imagea", "image_a", "one"})
_SECOND: Final = frozenset({"2", "image2", "image_2", "second", "b", "imageb", "image_b", "two"})
_TIE: Final = frozenset({"tie", "equal", "same", "both", "neither", "none", "0", "draw", "0_5"})
_PREFERENCE_RE: Final = re.compile(
    r"(?:better|winner|choice|preferred|preference|answer)[^\w:=]{0,4}[:=][\s*]*"
    r"(image\s*[12ab]|[12]|tie|equal|first|second)\b",
    re.IGNORECASE,
)


def _preference(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        # never int(value): JSON's Infinity, NaN and 1e999 are floats that int() rejects
        finite = not isinstance(value, float) or math.isfinite(value)
        labels: dict[float, str] = {1: "1", 2: "2", 0: "tie"}
        value = labels.get(value, "") if finite else ""
    if not isinstance(value, str):
        return None
    word = _norm_key(value)
    if word in _FIRST:
        return 1.0
    if word in _SECOND:
        return 0.0
    if word in _TIE:
        return 0.5
    return None


def _parse_preference(reply: str) -> JudgeVerdict:
    for value in _structured(reply):
        if isinstance(value, Mapping):
            fields = {_norm_key(k): v for k, v in value.items()}
            for key in ("better", "winner", "choice", "preferred", "preference", "answer"):
                if key in fields:
                    prob = _preference(fields[key])
                    if prob is None:
                        raise ValueError(f'"{key}" must be "1", "2" or "tie", got {fields[key]!r}')
                    reason = str(fields.get("reason") or fields.get("explanation") or "")
                    return JudgeVerdict(prob, {}, {"better": _LABELS[prob], "reason": reason})
    matches = list(_PREFERENCE_RE.finditer(reply))
    prob = _preference(matches[-1].group(1)) if matches else None
    if prob is None and len(reply) <= 10:
        prob = _preference(reply)
    if prob is None:
        raise ValueError('expected a JSON object with "better": "1", "2" or "tie"')
    return JudgeVerdict(prob, {}, {"better": _LABELS[prob], "reason": ""})


_LABELS: Final = {1.0: "1", 0.0: "2", 0.5: "tie"}
