"""SIMULATOR policy: a rule-based stand-in for a GenAgent VLM, speaking the full protocol.

``HeuristicPolicy`` reads the request, writes an explicit caption, looks at each returned image
(through the simulator's record of what it shows), judges it constraint by constraint, and then
answers, edits the one thing that is wrong, or regenerates with a caption that stresses what
failed. It sees only what an image shows (the record's drawn objects), never the generator's
list of mistakes or the image's source. Its judgment is imperfect both ways: it overlooks real
failures (``miss_rate``) and raises false alarms on constraints that hold
(``false_alarm_rate``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

from genagent.errors import ConfigurationError
from genagent.images import ImageRef
from genagent.messages import Message
from genagent.policies._base import PolicyOutput, SamplingParams
from genagent.policies.scripted import apply_stop
from genagent.sim._render import read_record, seeded_rng
from genagent.sim._scene import (
    CheckResult,
    DrawnObject,
    SceneSpec,
    check_scene,
    describe_group,
    instances_of,
    parse_caption,
)
from genagent.sim._vocab import NUMBER_WORDS, join_words, noun, plural

__all__ = ["HeuristicPolicy", "write_caption"]

_OPENERS: Final = (
    "A photo of",
    "A clear, well-lit photo of",
    "A realistic photograph showing",
    "A simple studio photo of",
    "A sharp, high-quality image of",
    "A clean photo that shows",
)
_TOOLS_RE = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)


class HeuristicPolicy:
    """SIMULATOR policy that speaks the GenAgent protocol (think, judge, tool call, answer).

    Args:
        prefer_edits: Fix a single remaining problem with the editing tool when one is offered
            (GenAgent v2 behaviour); otherwise always regenerate.
        miss_rate: Probability of overlooking each failed constraint when judging an image
            (a policy's judgment is not perfect); deterministic per image.
        false_alarm_rate: Probability of judging each constraint that holds as failed (the
            policy then edits or regenerates needlessly); deterministic per image. A false alarm
            on a count or presence overlooks one instance (so the policy may add one too many).
        seed: Seed of that perception noise.
        name: Recorded as the policy's name.
    """

    def __init__(
        self,
        *,
        prefer_edits: bool = True,
        miss_rate: float = 0.05,
        false_alarm_rate: float = 0.03,
        seed: int = 0,
        name: str = "heuristic",
    ) -> None:
        _check_rate("miss_rate", miss_rate)
        _check_rate("false_alarm_rate", false_alarm_rate)
        self.prefer_edits = prefer_edits
        self.miss_rate = miss_rate
        self.false_alarm_rate = false_alarm_rate
        self.seed = seed
        self.name = name

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] = (),
        sampling: SamplingParams | None = None,
    ) -> PolicyOutput:
        """Write the next reply."""
        start = time.perf_counter()
        text = self.reply(messages)
        text, matched = apply_stop(text, stop)
        return PolicyOutput(
            text=text,
            stop=matched,
            finish_reason="stop",
            latency_s=time.perf_counter() - start,
            model="genagent.sim.HeuristicPolicy",
        )

    def describe(self) -> dict[str, Any]:
        """Settings, for trajectory metadata."""
        return {
            "name": self.name,
            "class": "genagent.sim.HeuristicPolicy",
            "simulator": True,
            "prefer_edits": self.prefer_edits,
            "miss_rate": self.miss_rate,
            "false_alarm_rate": self.false_alarm_rate,
        }

    # ------------------------------------------------------------------ logic

    def reply(self, messages: Sequence[Message]) -> str:
        """The full reply text (before stop sequences are applied)."""
        generator, editor = _tool_names(messages)
        prompt = _request(messages)
        spec = parse_caption(prompt)
        images = [img for m in messages if m.role == "user" for img in m.images]
        previous = _previous_calls(messages)
        if not images:
            if not spec.objects:
                thought = "I cannot identify the objects in this request, so I will pass it on."
                return _call(thought, None, generator, {"caption": prompt})
            thought = (
                f"The request asks for {_summary(spec)}. I will write an explicit caption that "
                "states every count, colour, size and position."
            )
            return _call(thought, None, generator, {"caption": write_caption(spec, attempt=0)})
        shown = messages[-1].images if messages[-1].role == "user" else []
        latest = images[-1]
        record = read_record(latest.open())
        if record is None or not spec.objects:
            return (
                "<think>I cannot check this image against the request in detail.</think>\n"
                "<judge>I cannot verify the image; I accept it.</judge>\n"
                "<answer>Here is the generated image.</answer>"
            )
        select = ""
        if len(shown) > 1:
            # several candidates: judge each, keep the one with the fewest problems
            verdicts = [self._look(spec, ref) for ref in shown]
            readable = [(k, v) for k, v in enumerate(verdicts) if v is not None]
            if readable:
                k, _ = min(readable, key=lambda kv: sum(not r.passed for r in kv[1][0]))
                latest = shown[k]
                select = f"<select>{k + 1}</select>\n"
        return select + self._respond(spec, latest, generator, editor, previous, messages)

    def _look(
        self, spec: SceneSpec, image: ImageRef
    ) -> tuple[list[CheckResult], list[DrawnObject]] | None:
        """What the policy perceives in ``image`` (``None`` if it is not a simulator image)."""
        record = read_record(image.open())
        if record is None:
            return None
        # only what is visible: the drawn objects (never record.mistakes or record.source)
        results = check_scene(spec, record.objects, record.width, record.height)
        return self._perceive(spec, results, record.objects, image)

    def _respond(
        self,
        spec: SceneSpec,
        latest: ImageRef,
        generator: str,
        editor: str | None,
        previous: list[tuple[str, str]],
        messages: Sequence[Message],
    ) -> str:
        """Judge ``latest`` and answer, edit or regenerate."""
        looked = self._look(spec, latest)
        assert looked is not None
        perceived, seen = looked
        failed = [r for r in perceived if not r.passed]
        judgment = _judgment(spec, perceived)
        if not failed:
            return (
                f"<think>Every requirement is met, so I am done.</think>\n"
                f"<judge>{judgment}</judge>\n"
                f"<answer>The image shows {_summary(spec)}.</answer>"
            )
        instruction = edit_instruction(spec, failed[0], seen)
        last = previous[-1] if previous else None
        # An edit that had no effect (the same edit is needed again) or was rejected is not
        # repeated: regenerate instead.
        edit_failed = (
            last is not None
            and last[0] == editor
            and (_last_error(messages) or last[1] == json.dumps({"instruction": instruction}))
        )
        if editor is not None and self.prefer_edits and len(failed) == 1 and not edit_failed:
            thought = (
                f"Only one thing is wrong: {failed[0].constraint.describe(spec)} does not hold. "
                "An edit keeps everything that is already right."
            )
            return _call(thought, judgment, editor, {"instruction": instruction})
        attempt = sum(1 for name, _ in previous if name == generator)
        caption = write_caption(spec, attempt=attempt, focus=[r.constraint for r in failed])
        thought = (
            f"{len(failed)} requirement{'s' if len(failed) > 1 else ''} failed. I will regenerate "
            "with a caption that stresses "
            + ", ".join(r.constraint.describe(spec) for r in failed)
            + "."
        )
        return _call(thought, judgment, generator, {"caption": caption})

    def _perceive(
        self,
        spec: SceneSpec,
        results: list[CheckResult],
        drawn: Sequence[DrawnObject],
        image: ImageRef,
    ) -> tuple[list[CheckResult], list[DrawnObject]]:
        """The results as the policy judges them, and the objects as it believes it sees them.

        Each failed constraint is overlooked with probability ``miss_rate``; each constraint
        that holds is judged failed with probability ``false_alarm_rate`` (independent draws,
        deterministic per image and seed).
        """
        misses = seeded_rng("perceive", image.sha256, self.seed)
        alarms = seeded_rng("false-alarm", image.sha256, self.seed)
        seen = list(drawn)
        perceived: list[CheckResult] = []
        for r in results:
            if not r.passed:
                if self.miss_rate > 0 and misses.random() < self.miss_rate:
                    r = replace(r, passed=True)  # overlooked
            elif self.false_alarm_rate > 0 and alarms.random() < self.false_alarm_rate:
                observed, seen = _misperceive(spec, r, seen)
                r = CheckResult(r.constraint, False, observed)
            perceived.append(r)
        return perceived, seen


# --------------------------------------------------------------------------- writing


def write_caption(spec: SceneSpec, *, attempt: int = 0, focus: Sequence[Any] = ()) -> str:
    """An explicit caption for ``spec``; ``focus`` constraints are stated emphatically.

    Different ``attempt`` numbers word the caption differently (a new draw from the generator).
    """
    focus_keys = {(c.kind, c.group) for c in focus}
    related = {o.relation[1] for o in spec.objects if o.relation is not None}
    clauses: list[str] = []
    for i, obj in enumerate(spec.objects):
        if i in related:
            continue  # described inside the clause of the object related to it
        text = describe_group(obj)
        if obj.size:
            text = text.replace(
                f" {obj.size} ", f" much {'larger' if obj.size == 'large' else 'smaller'} ", 1
            )
        if obj.region:
            far = "far " if ("region", i) in focus_keys else ""
            text += f" on the {far}{obj.region} side of the image"
        if obj.relation is not None:
            relation, j = obj.relation
            text += f" {_relation_phrase(relation)} {describe_group(spec.objects[j])}"
        clauses.append(text)
    body = join_words(clauses)
    sentences = [f"{_OPENERS[attempt % len(_OPENERS)]} {body}."]
    for i, obj in enumerate(spec.objects):
        name = noun(obj.cls, obj.count)
        verb = "is" if obj.count == 1 else "are"
        if ("count", i) in focus_keys or ("presence", i) in focus_keys:
            sentences.append(
                f"There {verb} exactly {NUMBER_WORDS.get(obj.count, obj.count)} {name} in total, "
                "clearly visible."
            )
        if obj.color:
            emphasis = "entirely " if ("color", i) in focus_keys else ""
            sentences.append(f"The {name} {verb} {emphasis}{obj.color}.")
        if obj.relation is not None:
            relation, j = obj.relation
            other = spec.objects[j]
            opposite = {
                "left of": "right of",
                "right of": "left of",
                "above": "below",
                "below": "above",
            }[relation]
            clearly = "clearly " if ("relation", i) in focus_keys else ""
            sentences.append(
                f"The {noun(other.cls, other.count)} {'is' if other.count == 1 else 'are'} "
                f"{clearly}{_relation_phrase(opposite)} the {name}."
            )
    sentences.append("Nothing else is in the scene.")
    return " ".join(sentences)


def edit_instruction(spec: SceneSpec, failure: CheckResult, drawn: Sequence[Any]) -> str:
    """One edit instruction that fixes ``failure``."""
    group = failure.constraint.group
    obj = spec.objects[group]
    kind = failure.constraint.kind
    color = f"{obj.color} " if obj.color else ""
    where = f" on the {obj.region} side of the image" if obj.region else ""
    if kind in {"count", "presence"}:
        have = len(instances_of(spec, group, drawn))
        if have < obj.count:
            missing = obj.count - have
            more = " more" if have else ""
            number = NUMBER_WORDS.get(missing, str(missing))
            return f"add {number}{more} {color}{noun(obj.cls, missing)}{where}"
        extra = have - obj.count
        return f"remove {NUMBER_WORDS.get(extra, extra)} {color}{noun(obj.cls, extra)}"
    if kind == "color":
        return f"make all the {plural(obj.cls)} {obj.color}"
    if kind == "size":
        return f"make the {plural(obj.cls)} much {'larger' if obj.size == 'large' else 'smaller'}"
    if kind == "region":
        return f"move the {plural(obj.cls)} to the {obj.region} side of the image"
    assert obj.relation is not None
    relation, j = obj.relation
    return (
        f"move the {plural(obj.cls)} {_relation_phrase(relation)} the {plural(spec.objects[j].cls)}"
    )


# --------------------------------------------------------------------------- reading


def _request(messages: Sequence[Message]) -> str:
    for message in messages:
        if message.role == "user":
            return message.text.strip()
    return ""


def _tool_names(messages: Sequence[Message]) -> tuple[str, str | None]:
    generator, editor = "image_generation_tool", None
    system = next((m.text for m in messages if m.role == "system"), "")
    match = _TOOLS_RE.search(system)
    if not match:
        return generator, editor
    for line in match.group(1).splitlines():
        try:
            fn = json.loads(line)["function"]
            params = set(fn.get("parameters", {}).get("properties", {}))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if "caption" in params:
            generator = fn["name"]
        elif "instruction" in params:
            editor = fn["name"]
    return generator, editor


def _previous_calls(messages: Sequence[Message]) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    for message in messages:
        if message.role != "assistant":
            continue
        match = re.search(r"<tool_call>\s*(\{.*?\})\s*(?:</tool_call>|$)", message.text, re.DOTALL)
        if not match:
            continue
        try:
            obj = json.loads(match.group(1))
            args = obj.get("arguments", {})
            calls.append((str(obj["name"]), json.dumps(args, sort_keys=True)))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return calls


def _last_error(messages: Sequence[Message]) -> bool:
    last = messages[-1] if messages else None
    return last is not None and last.role == "user" and not last.images


def _summary(spec: SceneSpec) -> str:
    parts = []
    for obj in spec.objects:
        text = describe_group(obj, exact=False)
        if obj.region:
            text += f" on the {obj.region}"
        if obj.relation is not None:
            other = spec.objects[obj.relation[1]]
            text += f" {obj.relation[0]} the {noun(other.cls, other.count)}"
        parts.append(text)
    return join_words(parts)


def _judgment(spec: SceneSpec, perceived: list[CheckResult]) -> str:
    lines = []
    for r in perceived:
        lines.append(
            f"{'[ok]' if r.passed else '[wrong]'} {r.constraint.describe(spec)}"
            + ("" if r.passed else f": {r.observed}")
        )
    verdict = (
        "The image satisfies the request."
        if all(r.passed for r in perceived)
        else "The image does not satisfy the request yet."
    )
    return "; ".join(lines) + ". " + verdict


def _misperceive(
    spec: SceneSpec, result: CheckResult, seen: list[DrawnObject]
) -> tuple[str, list[DrawnObject]]:
    """A false alarm on ``result`` (which holds): what the policy believes it sees instead.

    On a count or presence it overlooks one instance (and so may add one too many); on other
    kinds it doubts what is there, and its edit restates what already holds.
    """
    group = result.constraint.group
    obj = spec.objects[group]
    name = noun(obj.cls, 2)
    kind = result.constraint.kind
    if kind in {"count", "presence"}:
        inst = instances_of(spec, group, seen)
        if not inst:
            return f"the {name} are hard to make out", seen
        last = len(seen) - 1 - seen[::-1].index(inst[-1])
        seen = seen[:last] + seen[last + 1 :]
        have = len(inst) - 1
        return f"{have} {noun(obj.cls, have)}", seen
    if kind == "color":
        return f"the {name} do not look {obj.color}", seen
    if kind == "size":
        return f"the {name} do not look {obj.size} enough", seen
    if kind == "region":
        return f"the {name} look too close to the middle", seen
    assert obj.relation is not None
    other = noun(spec.objects[obj.relation[1]].cls, 2)
    return f"the {name} do not look clearly {obj.relation[0]} the {other}", seen


def _check_rate(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0.0 <= value <= 1.0
    ):
        raise ConfigurationError(f"{name} must be a number in [0, 1], got {value!r}")


def _relation_phrase(relation: str) -> str:
    return {"left of": "to the left of", "right of": "to the right of"}.get(relation, relation)


def _call(thought: str, judgment: str | None, name: str, arguments: dict[str, str]) -> str:
    judge = f"<judge>{judgment}</judge>\n" if judgment else ""
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<think>{thought}</think>\n{judge}<tool_call>\n{payload}\n</tool_call>"
