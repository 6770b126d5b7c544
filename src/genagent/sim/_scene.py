"""Scene specifications: parsing captions, writing captions, and checking drawn scenes.

A :class:`SceneSpec` is a list of object groups in the GenEval ``include`` format (class,
count, colour, size, region, position relative to another group). Captions are parsed into a
spec plus *explicitness* levels (how emphatically each constraint is stated), which the error
model uses: explicit captions make fewer mistakes, as they do with real generators.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, Literal

from genagent.sim._vocab import (
    CLASSES,
    COLORS,
    NUMBER_WORDS,
    NUMBERS,
    OPPOSITE_RELATION,
    REGION_WORDS,
    RELATIONS,
    SIZE_WORDS,
    article,
    join_words,
    noun,
    surface_forms,
)

ConstraintKind = Literal["presence", "count", "color", "region", "relation", "size"]

_FORMS = surface_forms()
_MAX_FORM = max(len(k) for k in _FORMS)
_TOKEN_RE = re.compile(r"[a-z]+|\d+|[.,;:!?()]")
_STOP_BEFORE = {"and", "with", "of", "beside", "next", "plus", ",", ";", ".", ":", "!", "?", "("}
_REFERENCE = {"the", "all", "both", "each", "every", "these", "those"}
_RELATION_PHRASES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("to", "the", "left", "of"), "left of"),
    (("to", "the", "right", "of"), "right of"),
    (("on", "the", "left", "of"), "left of"),
    (("on", "the", "right", "of"), "right of"),
    (("left", "of"), "left of"),
    (("right", "of"), "right of"),
    (("on", "top", "of"), "above"),
    (("above",), "above"),
    (("over",), "above"),
    (("below",), "below"),
    (("under",), "below"),
    (("underneath",), "below"),
    (("beneath",), "below"),
)
_DETERMINER_WORDS = {"a", "an", "the", "exactly", "one", "single"} | set(NUMBERS) | set(COLORS)
_INCLUDE_KEYS = frozenset({"class", "count", "color", "size", "region", "position"})


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class ObjectSpec:
    """One group of identical objects.

    Attributes:
        cls: COCO class name.
        count: How many.
        color: Required colour, if any.
        size: ``"large"`` / ``"small"``, if required.
        region: ``"left"`` / ``"right"`` / ``"top"`` / ``"bottom"`` half of the image, if required.
        relation: ``(relation, other_group_index)``: this group is ``relation`` the other.
    """

    cls: str
    count: int = 1
    color: str | None = None
    size: str | None = None
    region: str | None = None
    relation: tuple[str, int] | None = None


@dataclass
class SceneSpec:
    """A scene: object groups and the explicitness of each constraint.

    Attributes:
        objects: The groups.
        explicit: ``{(kind, group): level}`` with level 0 (plain), 1 (explicit), 2 (emphasised).
    """

    objects: list[ObjectSpec] = field(default_factory=list)
    explicit: dict[tuple[str, int], int] = field(default_factory=dict)

    def constraints(self) -> list[Constraint]:
        """Every checkable constraint of the scene, in a stable order."""
        out: list[Constraint] = []
        for i, obj in enumerate(self.objects):
            out.append(Constraint("presence", i))
            out.append(Constraint("count", i))
            if obj.color:
                out.append(Constraint("color", i))
            if obj.size:
                out.append(Constraint("size", i))
            if obj.region:
                out.append(Constraint("region", i))
            if obj.relation is not None:
                out.append(Constraint("relation", i))
        return out

    def level(self, kind: str, group: int) -> int:
        """Explicitness level of a constraint (0, 1 or 2)."""
        return self.explicit.get((kind, group), 0)

    def to_include(self) -> list[dict[str, Any]]:
        """The GenEval ``include`` list of this scene."""
        out: list[dict[str, Any]] = []
        for obj in self.objects:
            item: dict[str, Any] = {"class": obj.cls, "count": obj.count}
            if obj.color:
                item["color"] = obj.color
            if obj.size:
                item["size"] = "larger" if obj.size == "large" else "smaller"
            if obj.region:
                item["region"] = {"top": "above", "bottom": "below"}.get(obj.region, obj.region)
            if obj.relation is not None:
                item["position"] = [obj.relation[0], obj.relation[1]]
            out.append(item)
        return out

    @classmethod
    def from_include(cls, include: object) -> SceneSpec:
        """Build a scene from a GenEval / GenEval++ ``include`` list, validating it strictly.

        Each entry needs a ``class`` (one of the 80 COCO classes, as GenEval names them) and may
        give ``count`` (an int >= 1, default 1), ``color`` (one of the 10 colours), ``size``
        (a size word: ``"larger"``, ``"small"``, ...), ``region`` (``"left"``, ``"above"``, ...)
        and ``position`` (``[relation, index of another entry]``). Nothing is coerced or
        dropped: a malformed entry is an error, never a looser spec.

        Raises:
            ValueError: Saying precisely what is malformed.
        """
        if isinstance(include, (str, bytes)) or not isinstance(include, Sequence):
            raise ValueError(
                f"'include' must be a list of object entries, got {type(include).__name__}"
            )
        if not include:
            raise ValueError("'include' is empty; it must list at least one object entry")
        objects: list[ObjectSpec] = []
        for n, item in enumerate(include):
            where = f"include[{n}]"
            if not isinstance(item, Mapping):
                raise ValueError(
                    f"{where} must be an object entry with a 'class', got {_short(item)}"
                )
            unknown = sorted(str(k) for k in item if k not in _INCLUDE_KEYS)
            if unknown:
                raise ValueError(
                    f"{where} has unknown keys {unknown}; known: {sorted(_INCLUDE_KEYS)}"
                )
            name = item.get("class")
            if not isinstance(name, str) or name not in CLASSES:
                raise ValueError(
                    f"{where}: 'class' must be one of the 80 COCO classes (e.g. 'apple', "
                    f"'wine glass'), got {_short(name)}"
                )
            count = item.get("count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{where}: 'count' must be an integer >= 1, got {_short(count)}")
            color = item.get("color")
            if color is not None and (not isinstance(color, str) or color not in COLORS):
                raise ValueError(
                    f"{where}: 'color' must be one of {sorted(COLORS)}, got {_short(color)}"
                )
            size = item.get("size")
            if size is not None and (not isinstance(size, str) or size not in SIZE_WORDS):
                raise ValueError(
                    f"{where}: 'size' must be one of {sorted(SIZE_WORDS)}, got {_short(size)}"
                )
            region = item.get("region")
            if region is not None and (not isinstance(region, str) or region not in REGION_WORDS):
                raise ValueError(
                    f"{where}: 'region' must be one of {sorted(REGION_WORDS)}, got {_short(region)}"
                )
            position = item.get("position")
            relation: tuple[str, int] | None = None
            if position is not None:
                if (
                    isinstance(position, (str, bytes))
                    or not isinstance(position, Sequence)
                    or len(position) != 2
                    or not isinstance(position[0], str)
                    or position[0] not in RELATIONS
                    or isinstance(position[1], bool)
                    or not isinstance(position[1], int)
                ):
                    raise ValueError(
                        f"{where}: 'position' must be [relation, index] with relation one of "
                        f"{list(RELATIONS)}, got {_short(position)}"
                    )
                if not 0 <= position[1] < len(include) or position[1] == n:
                    raise ValueError(
                        f"{where}: 'position' refers to entry {position[1]}, which must be "
                        f"another entry (0 to {len(include) - 1})"
                    )
                relation = (position[0], position[1])
            objects.append(
                ObjectSpec(
                    cls=name,
                    count=count,
                    color=color,
                    size=SIZE_WORDS[size] if size is not None else None,
                    region=REGION_WORDS[region] if region is not None else None,
                    relation=relation,
                )
            )
        return cls(objects=objects)


@dataclass(frozen=True)
class Constraint:
    """One checkable requirement: ``kind`` of group ``group``."""

    kind: ConstraintKind
    group: int

    def key(self, spec: SceneSpec) -> str:
        """A readable key, e.g. ``"apple#0.count"``."""
        return f"{spec.objects[self.group].cls}#{self.group}.{self.kind}"

    def describe(self, spec: SceneSpec) -> str:
        """The requirement in words."""
        obj = spec.objects[self.group]
        name = noun(obj.cls, obj.count)
        if self.kind == "presence":
            return f"there is {article(obj.cls)} {obj.cls}"
        if self.kind == "count":
            verb = "is" if obj.count == 1 else "are"
            return f"there {verb} exactly {NUMBER_WORDS.get(obj.count, obj.count)} {name}"
        if self.kind == "color":
            return f"the {name} {'is' if obj.count == 1 else 'are'} {obj.color}"
        if self.kind == "size":
            return f"the {name} {'is' if obj.count == 1 else 'are'} {obj.size}"
        if self.kind == "region":
            return f"the {name} {'is' if obj.count == 1 else 'are'} in the {obj.region} half"
        assert obj.relation is not None
        other = spec.objects[obj.relation[1]]
        verb = "is" if obj.count == 1 else "are"
        return f"the {name} {verb} {obj.relation[0]} the {noun(other.cls, other.count)}"


# --------------------------------------------------------------------------- parsing


@dataclass
class _Mention:
    start: int
    end: int
    cls: str
    plural: bool
    group: int = -1


def tokenize(text: str) -> list[str]:
    """Lower-case word, number and punctuation tokens."""
    return _TOKEN_RE.findall(text.lower())


def parse_caption(text: str) -> SceneSpec:
    """Parse a caption or prompt into a scene with explicitness levels.

    The grammar is the GenEval / GenEval++ family (counts, colours, sizes, regions, relations)
    plus the restatements detailed captions use ("the cup is blue", "exactly three apples").
    A mention introduced by "the", "all", "both" or "each" refers back to an earlier group of
    the same class instead of adding one.

    Parsing takes time linear in the length of the text (every look-up of an earlier group is
    a dictionary look-up), so a caption of any length is safe to parse.
    """
    tokens = tokenize(text)
    mentions = _find_mentions(tokens)
    spec = SceneSpec()
    index = _GroupIndex(spec)
    pending_relations: list[tuple[int, str, int]] = []  # (group, relation, mention index)
    global_emphasis = _has_any(tokens, {"nothing", "only", "no"})
    for k, mention in enumerate(mentions):
        prev_end = mentions[k - 1].end if k > 0 else 0
        next_start = mentions[k + 1].start if k + 1 < len(mentions) else len(tokens)
        before = _window_before(tokens[prev_end : mention.start])
        after = tokens[mention.end : next_start]
        count, color, size, exact, is_reference = _read_determiners(before)
        group = (
            index.reference(mention.cls, color)
            if is_reference
            else index.restatement(mention.cls, count, color)
        )
        if group is None:
            if count is None:
                count = 1 if not mention.plural else 2
            spec.objects.append(ObjectSpec(cls=mention.cls, count=count, color=color, size=size))
            group = len(spec.objects) - 1
            index.add(group)
            _bump(spec, "presence", group, 0)
            if exact:
                _bump(spec, "count", group, 1)
            if color:
                _bump(spec, "color", group, 0)
        else:
            obj = spec.objects[group]
            _bump(spec, "presence", group, 1)
            if count is not None and count == obj.count:
                _bump(spec, "count", group, 2 if exact else 1)
            if color and color == obj.color:
                _bump(spec, "color", group, 1)
            if size and obj.size is None:
                obj.size = size
        mention.group = group
        obj = spec.objects[group]
        _read_after(spec, index, group, after, k, mentions, pending_relations)
        if global_emphasis:
            _bump(spec, "count", group, 1)
    for group, relation, target_mention in pending_relations:
        target = mentions[target_mention].group
        if target >= 0 and target != group:
            obj = spec.objects[group]
            if obj.relation is None:
                obj.relation = (relation, target)
                _bump(spec, "relation", group, 0)
            elif obj.relation == (relation, target):
                _bump(spec, "relation", group, 1)
            other = spec.objects[target]
            if other.relation == (OPPOSITE_RELATION[relation], group):
                # both directions stated: the relation is explicit
                _bump(spec, "relation", target, 1)
                _bump(spec, "relation", group, 1)
    _drop_self_evident_relations(spec)
    _emphasis(spec, tokens)
    return spec


def _find_mentions(tokens: list[str]) -> list[_Mention]:
    mentions: list[_Mention] = []
    i = 0
    while i < len(tokens):
        match: tuple[int, str] | None = None
        for length in range(min(_MAX_FORM, len(tokens) - i), 0, -1):
            form = tuple(tokens[i : i + length])
            cls = _FORMS.get(form)
            if cls is None:
                continue
            if (
                cls == "orange"
                and length == 1
                and (
                    _class_follows(tokens, i + 1)
                    or (i > 0 and tokens[i - 1] in {"is", "are", "entirely", "all", "completely"})
                )
            ):
                continue  # "orange" is a colour here
            match = (length, cls)
            break
        if match is None:
            i += 1
            continue
        length, cls = match
        last = tokens[i + length - 1]
        is_plural = last != cls.split()[-1] and last not in {
            "skis",
            "scissors",
            "sheep",
            "broccoli",
        }
        mentions.append(_Mention(start=i, end=i + length, cls=cls, plural=is_plural))
        i += length
    return mentions


def _class_follows(tokens: list[str], i: int) -> bool:
    for length in range(min(_MAX_FORM, len(tokens) - i), 0, -1):
        if tuple(tokens[i : i + length]) in _FORMS:
            return True
    return i < len(tokens) and (tokens[i] in SIZE_WORDS or tokens[i] in COLORS)


def _window_before(tokens: list[str]) -> list[str]:
    window: list[str] = []
    for tok in reversed(tokens):
        if tok in _STOP_BEFORE or len(window) >= 5:
            break
        window.append(tok)
    return list(reversed(window))


def _read_determiners(
    window: list[str],
) -> tuple[int | None, str | None, str | None, bool, bool]:
    count: int | None = None
    color: str | None = None
    size: str | None = None
    exact = False
    reference = False
    for tok in window:
        if tok in _REFERENCE:
            reference = True
        if tok == "exactly":
            exact = True
        if tok in NUMBERS and count is None:
            count = NUMBERS[tok]
        elif tok.isdigit() and count is None and len(tok) <= 3:
            count = int(tok)
        elif tok in COLORS:
            color = tok
        elif tok in SIZE_WORDS:
            size = SIZE_WORDS[tok]
    if "the" in window and count is None and not reference:
        reference = True
    return count, color, size, exact, reference


class _GroupIndex:
    """Look-ups of earlier groups in O(1), kept up to date as groups gain colours.

    ``reference(cls, colour)`` is the last group of the class (with that colour, else the last
    uncoloured one when a colour is given); ``restatement(cls, count, colour)`` is the first
    group of the class with that count (and colour, when given).
    """

    def __init__(self, spec: SceneSpec) -> None:
        self.spec = spec
        self.last: dict[str, int] = {}
        self.last_colored: dict[tuple[str, str], int] = {}
        self.uncolored: dict[str, list[int]] = {}  # ascending; pruned lazily from the end
        self.first_count: dict[tuple[str, int], int] = {}
        self.first_count_color: dict[tuple[str, int, str], int] = {}

    def add(self, group: int) -> None:
        obj = self.spec.objects[group]
        self.last[obj.cls] = group
        self.first_count.setdefault((obj.cls, obj.count), group)
        if obj.color is None:
            self.uncolored.setdefault(obj.cls, []).append(group)
        else:
            self._colored(group)

    def set_color(self, group: int, color: str) -> None:
        self.spec.objects[group].color = color
        self._colored(group)

    def _colored(self, group: int) -> None:
        obj = self.spec.objects[group]
        assert obj.color is not None
        key = (obj.cls, obj.color)
        self.last_colored[key] = max(self.last_colored.get(key, group), group)
        ckey = (obj.cls, obj.count, obj.color)
        self.first_count_color[ckey] = min(self.first_count_color.get(ckey, group), group)

    def reference(self, cls: str, color: str | None) -> int | None:
        if color is None:
            return self.last.get(cls)
        group = self.last_colored.get((cls, color))
        if group is not None:
            return group
        stack = self.uncolored.get(cls, [])
        while stack and self.spec.objects[stack[-1]].color is not None:
            stack.pop()
        return stack[-1] if stack else None

    def restatement(self, cls: str, count: int | None, color: str | None) -> int | None:
        """A mention without "the" that repeats a group ("exactly three apples in total")."""
        if count is None:
            return None
        if color is None:
            return self.first_count.get((cls, count))
        return self.first_count_color.get((cls, count, color))


def _read_after(
    spec: SceneSpec,
    index: _GroupIndex,
    group: int,
    after: list[str],
    k: int,
    mentions: list[_Mention],
    pending: list[tuple[int, str, int]],
) -> None:
    obj = spec.objects[group]
    # copula attributes: "the cup is blue", "the apples are all red and large"
    if after[:1] in (["is"], ["are"]):
        for tok in after[1:6]:
            if tok in _STOP_BEFORE and tok != "and":
                break
            if tok in COLORS:
                if obj.color is None:
                    index.set_color(group, tok)
                    _bump(spec, "color", group, 0)
                elif obj.color == tok:
                    _bump(spec, "color", group, 1)
            elif tok in SIZE_WORDS and obj.size is None:
                obj.size = SIZE_WORDS[tok]
    # relation to the next mention: "... left of a kite"
    for phrase, relation in _RELATION_PHRASES:
        pos = _find_phrase(after, phrase)
        if pos < 0:
            continue
        rest = after[pos + len(phrase) :]
        if k + 1 < len(mentions) and all(t in _DETERMINER_WORDS for t in rest):
            pending.append((group, relation, k + 1))
            return
    # region: "on the left", "on the left side of the image", "at the top", "on the above"
    region, level = _read_region(after)
    if region is not None:
        if obj.region is None:
            obj.region = region
            _bump(spec, "region", group, level)
        elif obj.region == region:
            _bump(spec, "region", group, max(level, 1))
    for tok in after[:4]:
        if tok in SIZE_WORDS and obj.size is None:
            obj.size = SIZE_WORDS[tok]


def _read_region(after: list[str]) -> tuple[str | None, int]:
    for i, tok in enumerate(after[:10]):
        if tok in {"and", ";", "."} and i > 0:
            break
        if tok in REGION_WORDS and (
            i == 0 or after[i - 1] in {"the", "far", "very", "upper", "lower"}
        ):
            prev = after[max(0, i - 3) : i]
            if not any(p in {"on", "at", "in", "to"} for p in prev) and i != 0:
                continue
            region = REGION_WORDS[tok]
            level = 0
            tail = after[i + 1 : i + 6]
            if any(t in {"side", "half", "image", "picture", "frame"} for t in tail):
                level = 1
            if any(p in {"far", "very"} for p in prev) or "edge" in tail:
                level = 2
            return region, level
    return None, 0


def _find_phrase(tokens: list[str], phrase: tuple[str, ...]) -> int:
    n = len(phrase)
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i : i + n]) == phrase:
            return i
    return -1


def _has_any(tokens: list[str], words: set[str]) -> bool:
    return any(t in words for t in tokens)


def _bump(spec: SceneSpec, kind: str, group: int, level: int) -> None:
    key = (kind, group)
    spec.explicit[key] = max(spec.explicit.get(key, 0), level)


def _emphasis(spec: SceneSpec, tokens: list[str]) -> None:
    # Everything is precomputed from one pass over the tokens; each group is then O(1).
    present = set(tokens)
    pairs = {(a, b) for a, b in pairwise(tokens) if a in {"entirely", "all"}}
    in_total: set[tuple[str, ...]] = set()  # the words before each "in total"
    for i in range(len(tokens) - 1):
        if tokens[i] == "in" and tokens[i + 1] == "total":
            for n in range(2, _MAX_FORM + 2):
                if i >= n:
                    in_total.add(tuple(tokens[i - n : i]))
    for i, obj in enumerate(spec.objects):
        phrase = (str(NUMBER_WORDS.get(obj.count, obj.count)), *noun(obj.cls, obj.count).split())
        if phrase in in_total:
            _bump(spec, "count", i, 2)
        if obj.color and (("entirely", obj.color) in pairs or ("all", obj.color) in pairs):
            _bump(spec, "color", i, 2)
        if obj.size and ("clearly" in present or "much" in present):
            _bump(spec, "size", i, 1)
        if "clearly" in present and obj.relation is not None:
            _bump(spec, "relation", i, 2 if spec.level("relation", i) >= 1 else 1)
        if "visible" in present:
            _bump(spec, "presence", i, 2)


def _drop_self_evident_relations(spec: SceneSpec) -> None:
    """Keep one direction of a relation stated both ways (A left of B and B right of A)."""
    for i, obj in enumerate(spec.objects):
        if obj.relation is None:
            continue
        rel, j = obj.relation
        other = spec.objects[j]
        if other.relation == (OPPOSITE_RELATION[rel], i) and j > i:
            spec.objects[j] = replace(other, relation=None)


# --------------------------------------------------------------------------- writing


def describe_group(obj: ObjectSpec, *, exact: bool = True) -> str:
    """``"exactly three large red apples"``."""
    words: list[str] = []
    if exact:
        words += ["exactly", NUMBER_WORDS.get(obj.count, str(obj.count))]
    else:
        words.append(
            NUMBER_WORDS.get(obj.count, str(obj.count))
            if obj.count > 1
            else article(obj.size or obj.color or obj.cls)
        )
    if obj.size:
        words.append(obj.size)
    if obj.color:
        words.append(obj.color)
    words.append(noun(obj.cls, obj.count))
    return " ".join(words)


def prompt_for(spec: SceneSpec) -> str:
    """A short, GenEval++-style prompt for a scene (what a user would type)."""
    parts: list[str] = []
    for obj in spec.objects:
        text = describe_group(obj, exact=False)
        if obj.region:
            text += f" on the {obj.region}"
        if obj.relation is not None:
            other = spec.objects[obj.relation[1]]
            text += f" {obj.relation[0]} {describe_group(other, exact=False)}"
        parts.append(text)
    related = {o.relation[1] for o in spec.objects if o.relation is not None}
    parts = [p for i, p in enumerate(parts) if i not in related]
    return f"a photo of {join_words(parts)}"


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class DrawnObject:
    """One object instance as drawn (what is visible in the image).

    Attributes:
        cls: Its class.
        color: Its colour name.
        bbox: ``(x0, y0, x1, y1)`` in pixels.
    """

    cls: str
    color: str
    bbox: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box."""
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def area(self) -> float:
        """Area of the box."""
        x0, y0, x1, y1 = self.bbox
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one constraint.

    Attributes:
        constraint: The constraint.
        passed: Whether the image satisfies it.
        observed: What the image shows, in words (for judgments and edit instructions).
    """

    constraint: Constraint
    passed: bool
    observed: str


def instances_of(spec: SceneSpec, group: int, drawn: Sequence[DrawnObject]) -> list[DrawnObject]:
    """The drawn objects that stand for ``group``.

    That is every object of its class, or, when the scene has several groups of that class, those
    of its colour.
    """
    obj = spec.objects[group]
    same_class = [d for d in drawn if d.cls == obj.cls]
    siblings = [o for o in spec.objects if o.cls == obj.cls]
    if len(siblings) == 1:
        return same_class
    if obj.color:
        return [d for d in same_class if d.color == obj.color]
    claimed = {o.color for o in siblings if o.color}
    return [d for d in same_class if d.color not in claimed]


def check_scene(
    spec: SceneSpec, drawn: Sequence[DrawnObject], width: int, height: int
) -> list[CheckResult]:
    """Check every constraint of ``spec`` against the drawn objects."""
    results: list[CheckResult] = []
    for constraint in spec.constraints():
        obj = spec.objects[constraint.group]
        inst = instances_of(spec, constraint.group, drawn)
        name = noun(obj.cls, 2)
        passed: bool
        observed: str
        if constraint.kind == "presence":
            any_of_class = [d for d in drawn if d.cls == obj.cls]
            passed = bool(any_of_class)
            observed = f"{len(any_of_class)} {noun(obj.cls, len(any_of_class))}"
        elif constraint.kind == "count":
            passed = len(inst) == obj.count
            observed = f"{len(inst)} {noun(obj.cls, len(inst))}"
        elif constraint.kind == "color":
            colors = sorted({d.color for d in inst}) or sorted(
                {d.color for d in drawn if d.cls == obj.cls}
            )
            passed = bool(inst) and all(d.color == obj.color for d in inst)
            observed = f"the {name} are {' and '.join(colors) or 'missing'}"
        elif constraint.kind == "region":
            if not inst:
                passed, observed = False, f"no {name}"
            else:
                regions = sorted({_half(d.center, width, height, obj.region or "") for d in inst})
                passed = regions == [obj.region]
                observed = (
                    f"the {name} are on the {' and '.join(r for r in regions if r) or 'wrong side'}"
                )
        elif constraint.kind == "relation":
            assert obj.relation is not None
            relation, target = obj.relation
            other = instances_of(spec, target, drawn)
            if not inst or not other:
                passed, observed = False, "one of the two objects is missing"
            else:
                actual = _relation(_mean_center(inst), _mean_center(other), relation, width, height)
                passed = actual == relation
                other_name = noun(spec.objects[target].cls, 2)
                observed = f"the {name} are {actual} the {other_name}"
        else:  # size
            passed, observed = _check_size(spec, constraint.group, inst, drawn, width)
        results.append(CheckResult(constraint, passed, observed))
    return results


def _half(center: tuple[float, float], width: int, height: int, axis_hint: str) -> str:
    cx, cy = center
    if axis_hint in {"top", "bottom"}:
        return "top" if cy < height / 2 else "bottom"
    return "left" if cx < width / 2 else "right"


def _mean_center(objs: Sequence[DrawnObject]) -> tuple[float, float]:
    xs = [d.center[0] for d in objs]
    ys = [d.center[1] for d in objs]
    return sum(xs) / len(xs), sum(ys) / len(ys)


def _relation(
    a: tuple[float, float], b: tuple[float, float], wanted: str, width: int, height: int
) -> str:
    margin_x, margin_y = 0.04 * width, 0.04 * height
    if wanted in {"left of", "right of"}:
        if a[0] < b[0] - margin_x:
            return "left of"
        if a[0] > b[0] + margin_x:
            return "right of"
        return "level with"
    if a[1] < b[1] - margin_y:
        return "above"
    if a[1] > b[1] + margin_y:
        return "below"
    return "level with"


def _check_size(
    spec: SceneSpec,
    group: int,
    inst: Sequence[DrawnObject],
    drawn: Sequence[DrawnObject],
    width: int,
) -> tuple[bool, str]:
    obj = spec.objects[group]
    name = noun(obj.cls, 2)
    if not inst:
        return False, f"no {name}"
    mean = sum(d.area for d in inst) / len(inst)
    others = [i for i, o in enumerate(spec.objects) if i != group and o.size and o.size != obj.size]
    if others:
        other_inst = [d for i in others for d in instances_of(spec, i, drawn)]
        if not other_inst:
            return True, f"the {name} are the only sized objects"
        other_mean = sum(d.area for d in other_inst) / len(other_inst)
        ratio = mean / other_mean if other_mean else float("inf")
        if obj.size == "large":
            return (
                ratio > 1.4,
                f"the {name} are {'larger' if ratio > 1 else 'smaller'} than the others",
            )
        return (
            ratio < 1 / 1.4,
            f"the {name} are {'smaller' if ratio < 1 else 'larger'} than the others",
        )
    side = mean**0.5 / width
    if obj.size == "large":
        return side >= 0.24, f"the {name} are {'large' if side >= 0.24 else 'small'}"
    return side <= 0.14, f"the {name} are {'small' if side <= 0.14 else 'large'}"
