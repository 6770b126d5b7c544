"""Simulator tools: ``SceneTool`` (generation) and ``SceneEditTool`` (editing).

SIMULATOR: these draw labelled glyphs, not photographs. They stand in for a text-to-image model
so the whole agent loop runs offline, deterministically, and measurably.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Final

from genagent.errors import ConfigurationError, ToolArgumentError
from genagent.images import encode_png
from genagent.sim._generator import ErrorModel, draw_caption
from genagent.sim._render import SceneRecord, read_record, render, seeded_rng
from genagent.sim._scene import DrawnObject, parse_caption, tokenize
from genagent.sim._vocab import COLORS, NUMBERS, REGION_WORDS, SIZE_WORDS, noun, surface_forms
from genagent.tools._base import EditTool, GenerationTool, Tool, ToolContext, ToolResult

__all__ = ["EDIT_SUCCESS", "SceneEditTool", "SceneTool", "scene_tools"]

EDIT_SUCCESS: Final[dict[str, float]] = {
    "recolor": 0.85,
    "add": 0.8,
    "remove": 0.85,
    "move": 0.75,
    "resize": 0.8,
}
"""Probability that a simulated edit of each kind takes effect (otherwise it does nothing)."""

_FORMS = surface_forms()


class SceneTool(GenerationTool):
    """SIMULATOR generation tool: draws a caption's scene as labelled glyphs.

    It parses the caption (the 80 COCO classes, 10 colours, counts, sizes, left / right / top /
    bottom halves, left of / right of / above / below) and draws it, making the mistakes real
    generators make: a missing object, a count off by one, a colour bound to the wrong object, a
    flipped position, a size swap. Mistakes are likelier for complex scenes and rarer for
    explicit captions; every image is deterministic per (caption, seed) and carries a record of
    what was drawn in its PNG metadata (``genagent.scene``).

    Oversized scenes are rejected up front with a ``ToolArgumentError`` the policy sees: a
    caption over :attr:`max_caption_chars` characters, more than :attr:`max_groups` object
    groups, or a count above :attr:`max_count`.

    Args:
        size: Image side in pixels.
        error_scale: Multiplies every mistake probability (0 gives a perfect generator).
    """

    description: ClassVar[str] = (
        "Generate an image from a detailed caption. Describe every object with its exact count, "
        "colour, size and position. Returns the generated image."
    )
    max_images_per_call: ClassVar[int] = 64
    max_caption_chars: ClassVar[int] = 4000
    """Longest caption drawn (characters)."""
    max_groups: ClassVar[int] = 24
    """Most object groups in one scene."""
    max_count: ClassVar[int] = 20
    """Largest count of one group."""

    def __init__(self, *, size: int = 256, error_scale: float = 1.0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 2048:
            raise ConfigurationError(
                f"size must be an integer between 32 and 2048 pixels, got {size!r}"
            )
        _check_scale(error_scale)
        self.size = size
        self.error_model = ErrorModel(scale=error_scale)

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Draw one image per seed in ``ctx.seeds``."""
        images: list[Any] = [self.generate(args.caption, seed) for seed in ctx.seeds]
        return ToolResult(
            images=images,
            seeds=list(ctx.seeds),
            metadata={"simulator": True, "size": [self.size, self.size]},
        )

    def generate(self, caption: str, seed: int) -> bytes:
        """Draw ``caption`` with ``seed``; return PNG bytes (deterministic).

        Raises:
            ToolArgumentError: If the scene is too large to draw (see the class attributes).
        """
        if len(caption) > self.max_caption_chars:
            raise ToolArgumentError(
                f"the caption has {len(caption)} characters; the simulator draws captions of at "
                f"most {self.max_caption_chars}",
                hint="Write a shorter caption: each object once, with its count, colour, size "
                "and position.",
            )
        spec = parse_caption(caption)
        if len(spec.objects) > self.max_groups:
            raise ToolArgumentError(
                f"the caption describes {len(spec.objects)} object groups; the simulator draws "
                f"at most {self.max_groups}",
                hint=f"Describe at most {self.max_groups} kinds of objects, each stated once.",
            )
        big = next((o for o in spec.objects if o.count > self.max_count), None)
        if big is not None:
            raise ToolArgumentError(
                f"the caption asks for a count of {big.count} {noun(big.cls, big.count)}; the "
                f"simulator draws at most {self.max_count} objects of one kind",
                hint=f"Ask for at most {self.max_count} of each object.",
            )
        record = draw_caption(
            spec,
            caption,
            seed,
            width=self.size,
            height=self.size,
            model=self.error_model,
            tool=self.name,
        )
        return encode_png(render(record))

    def describe(self) -> dict[str, Any]:
        """Settings, for trajectory metadata."""
        return {
            **super().describe(),
            "simulator": True,
            "size": self.size,
            "error_scale": self.error_model.scale,
        }


class SceneEditTool(EditTool):
    """SIMULATOR editing tool: applies one instruction to the latest simulator image.

    Understood instructions (one change each): recolour ("make the cup blue", "change the red
    apples to green", "make the small cup blue"), add ("add one more apple", "add 12 red cups
    on the left"), remove ("remove 2 apples", "remove the cup"), move ("move the cup to the
    right side", "move the dog to the left of the cat"), resize ("make the bench larger").
    Colour and size words before the object select which instances to edit; counts (words or
    digits, 1 to 20) say how many (see :func:`parse_edit`). An edit takes effect with
    the probabilities in :data:`EDIT_SUCCESS`, deterministically per (instruction, image, seed);
    otherwise the image comes back unchanged. Anything else is rejected with a
    ``ToolArgumentError`` that the policy sees.

    Args:
        error_scale: Multiplies the probability that an edit fails.
    """

    description: ClassVar[str] = (
        "Edit the most recent image with one precise instruction (recolour, add, remove, move or "
        "resize an object). Returns the edited image."
    )

    def __init__(self, *, error_scale: float = 1.0) -> None:
        _check_scale(error_scale)
        self.error_scale = error_scale

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Edit ``ctx.current_image``."""
        if ctx.current_image is None:
            raise ToolArgumentError("there is no image to edit yet")
        record = read_record(ctx.current_image.open())
        if record is None:
            raise ToolArgumentError(
                "the simulator's editor can only edit simulator images",
                hint="Generate the image with the simulator's image_generation_tool.",
            )
        images: list[Any] = []
        for seed in ctx.seeds:
            edited = self.edit(record, args.instruction, seed, parent=ctx.current_image.sha256)
            images.append(encode_png(render(edited)))
        return ToolResult(images=images, seeds=list(ctx.seeds), metadata={"simulator": True})

    def edit(
        self, record: SceneRecord, instruction: str, seed: int, *, parent: str = ""
    ) -> SceneRecord:
        """Apply ``instruction`` to ``record`` and return the new record.

        Raises:
            ToolArgumentError: If the instruction is not one the simulator understands.
        """
        op = parse_edit(instruction)
        rng = seeded_rng("edit", instruction, parent, seed)
        objects = list(record.objects)
        mistakes: list[str] = []
        p_ok = 1.0 - self.error_scale * (1.0 - EDIT_SUCCESS[op.kind])
        if rng.random() >= p_ok:
            mistakes.append(f"{op.kind} edit had no effect")
        else:
            objects = _apply(op, objects, record.width, record.height, rng)
        return SceneRecord(
            width=record.width,
            height=record.height,
            objects=objects,
            source={"tool": self.name, "instruction": instruction, "seed": seed, "parent": parent},
            mistakes=mistakes,
        )

    def describe(self) -> dict[str, Any]:
        """Settings, for trajectory metadata."""
        return {**super().describe(), "simulator": True, "error_scale": self.error_scale}


def _check_scale(error_scale: float) -> None:
    if (
        isinstance(error_scale, bool)
        or not isinstance(error_scale, (int, float))
        or not math.isfinite(error_scale)
        or error_scale < 0
    ):
        raise ConfigurationError(f"error_scale must be a finite number >= 0, got {error_scale!r}")


def scene_tools(*, size: int = 256, error_scale: float = 1.0) -> list[Tool]:
    """The simulator's generation and editing tools (GenAgent v2 tool set)."""
    return [SceneTool(size=size, error_scale=error_scale), SceneEditTool(error_scale=error_scale)]


# --------------------------------------------------------------------------- edit parsing


class EditOp:
    """A parsed edit instruction.

    Attributes:
        kind: ``"recolor"``, ``"add"``, ``"remove"``, ``"move"`` or ``"resize"``.
        cls: The class edited.
        source_color: Only objects of this colour are edited (a selector).
        source_size: Only the ``"large"`` / ``"small"`` ones among them (a selector).
        color: Target colour (recolour) or colour of the new objects (add).
        count: How many to add; for other kinds, how many of the selected objects to edit
            (``None``: all of them).
        region: Target half (move) or where to add.
        relation: ``(relation, other class)`` to move next to.
        size: Target size (resize).
    """

    def __init__(
        self,
        kind: str,
        cls: str,
        *,
        source_color: str | None = None,
        source_size: str | None = None,
        color: str | None = None,
        count: int | None = None,
        region: str | None = None,
        relation: tuple[str, str] | None = None,
        size: str | None = None,
    ) -> None:
        self.kind = kind
        self.cls = cls
        self.source_color = source_color
        self.source_size = source_size
        self.color = color
        self.count = count
        self.region = region
        self.relation = relation
        self.size = size

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"EditOp({fields})"


_VERBS: Final = {
    "add": "add", "insert": "add", "put": "add", "place": "add", "remove": "remove",
    "delete": "remove", "erase": "remove", "move": "move", "shift": "move", "recolor": "recolor",
    "recolour": "recolor", "paint": "recolor", "color": "recolor", "colour": "recolor",
    "change": "recolor", "make": "make", "turn": "recolor", "enlarge": "resize",
    "shrink": "resize",
}  # fmt: skip
_RELATION_WORDS: Final = {
    ("left", "of"): "left of", ("right", "of"): "right of", ("above",): "above",
    ("below",): "below", ("under",): "below", ("over",): "above",
}  # fmt: skip
SUPPORTED_EDITS: Final = (
    "'make the cup blue', 'make the small cup blue', 'add one more apple', 'add 12 red apples', "
    "'remove 2 apples', 'move the cup to the right side', 'move the dog to the left of the "
    "cat', 'make the bench larger'"
)
MAX_EDIT_COUNT: Final = 20
"""Most objects one edit adds or removes (the same cap as ``SceneTool.max_count``)."""
MAX_INSTRUCTION_CHARS: Final = 4000
"""Longest edit instruction understood."""


def parse_edit(instruction: str) -> EditOp:
    """Parse one edit instruction (see :class:`SceneEditTool`).

    The first object mentioned is the one edited. Colour and size words *before* it select
    which of its instances to edit ("the small cup", "the red apples"); a colour word *after*
    it is a recolour target ("make the small cup blue"), else a size word after it is a resize
    target ("make the bench much larger"). Words describing a later object ("next to the red
    apple") are not read as targets. Counts (number words or digits, "remove 2 apples",
    "add 12 more apples") say how many to add, remove or edit.

    Raises:
        ToolArgumentError: If it is not understood.
    """
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise ToolArgumentError(
            f"the edit instruction has {len(instruction)} characters; the simulator's editor "
            f"reads at most {MAX_INSTRUCTION_CHARS}",
            hint=f"Give one short change, e.g. {SUPPORTED_EDITS}.",
        )
    tokens = tokenize(instruction)
    verb = next((_VERBS[t] for t in tokens if t in _VERBS), None)
    mentions = _mentions(tokens)
    if verb is None or not mentions:
        raise ToolArgumentError(
            f"the simulator's editor does not understand {instruction[:120]!r}",
            hint=f"Give one change naming an object, e.g. {SUPPORTED_EDITS}.",
        )
    start, end, cls = mentions[0]
    before = tokens[max(0, start - 5) : start]
    after = tokens[end:]
    count = _count(before, instruction)
    colors_before = [t for t in before if t in COLORS]
    source_size = _first([SIZE_WORDS[t] for t in before if t in SIZE_WORDS])
    own = _own_words(tokens, end, mentions)
    colors_after = [t for t in own if t in COLORS]
    size_after = _first([SIZE_WORDS[t] for t in own if t in SIZE_WORDS])
    if verb in {"make", "recolor"}:
        if colors_after:
            verb = "recolor"
        elif size_after is not None:
            verb = "resize"
        elif verb == "make":
            raise ToolArgumentError(
                f"the instruction {instruction[:120]!r} names no target colour or size",
                hint="Say e.g. 'make the cup blue' or 'make the cup much larger'.",
            )
    if verb == "resize":
        size = size_after or ("large" if "enlarge" in tokens else "small")
        return EditOp(
            "resize",
            cls,
            source_color=_first(colors_before),
            source_size=source_size,
            count=count,
            size=size,
        )
    if verb == "recolor":
        target = _first(colors_after) or (colors_before[-1] if len(colors_before) == 1 else None)
        if target is None:
            raise ToolArgumentError(
                f"the recolour instruction {instruction[:120]!r} names no target colour",
                hint="Say e.g. 'make the cup blue'.",
            )
        source = colors_before[0] if colors_before and colors_before[0] != target else None
        return EditOp(
            "recolor", cls, source_color=source, source_size=source_size, color=target, count=count
        )
    if verb == "add":
        region = _region(after)
        return EditOp("add", cls, color=_first(colors_before), count=count or 1, region=region)
    if verb == "remove":
        # "remove one apple" removes one; "remove the cups" / "remove all cups" removes them all
        return EditOp(
            "remove",
            cls,
            source_color=_first(colors_before),
            source_size=source_size,
            count=count,
        )
    # move
    relation = _relation(after, mentions)
    region = _region(after) if relation is None else None
    if relation is None and region is None:
        raise ToolArgumentError(
            f"the move instruction {instruction[:120]!r} says nowhere to move to",
            hint="Say e.g. 'move the cup to the right side' or 'move the dog to the left of the "
            "cat'.",
        )
    return EditOp(
        "move",
        cls,
        source_color=_first(colors_before),
        source_size=source_size,
        count=count,
        region=region,
        relation=relation,
    )


def _first(items: list[str]) -> str | None:
    return items[0] if items else None


def _count(before: list[str], instruction: str) -> int | None:
    """The count in the words before the object: a number word or digits ("a" / "an": 1)."""
    count: int | None = None
    for tok in before:
        if tok.isdigit():
            count = int(tok) if len(tok) <= 6 else MAX_EDIT_COUNT + 1
            break
        if tok in NUMBERS and tok not in {"a", "an"}:
            count = NUMBERS[tok]
            break
    if count is None and any(t in {"a", "an"} for t in before):
        count = 1
    if count is not None and not 1 <= count <= MAX_EDIT_COUNT:
        raise ToolArgumentError(
            f"the edit instruction {instruction[:120]!r} asks for a count of {count}; one edit "
            f"adds or removes 1 to {MAX_EDIT_COUNT} objects",
            hint=f"Give a count from 1 to {MAX_EDIT_COUNT}, e.g. 'remove 2 apples'.",
        )
    return count


def _own_words(tokens: list[str], end: int, mentions: list[tuple[int, int, str]]) -> list[str]:
    """The tokens after the edited object, less colour / size words that describe a later one.

    In "make the cup next to the red apple blue", "red" describes the apple; "blue" is the
    target. Linear: one backward pass marks the adjectives of later mentions.
    """
    starts = {s for s, _, _ in mentions[1:]}
    n = len(tokens)
    attached = [False] * (n + 1)
    for j in range(n - 1, end - 1, -1):
        nxt = j + 1
        attached[j] = nxt in starts or (
            nxt < n and (tokens[nxt] in COLORS or tokens[nxt] in SIZE_WORDS) and attached[nxt]
        )
    return [tokens[j] for j in range(end, n) if not attached[j]]


def _mentions(tokens: list[str]) -> list[tuple[int, int, str]]:
    found: list[tuple[int, int, str]] = []
    i = 0
    while i < len(tokens):
        for length in (3, 2, 1):
            form = tuple(tokens[i : i + length])
            if len(form) == length and form in _FORMS:
                if (
                    _FORMS[form] == "orange"
                    and length == 1
                    and i + 1 < len(tokens)
                    and any(tuple(tokens[i + 1 : i + 1 + n]) in _FORMS for n in (1, 2, 3))
                ):
                    continue
                found.append((i, i + length, _FORMS[form]))
                i += length
                break
        else:
            i += 1
    return found


def _region(tokens: list[str]) -> str | None:
    for i, tok in enumerate(tokens):
        if tok not in REGION_WORDS:
            continue
        if i > 0 and tokens[i - 1] not in {"the", "far", "very", "to", "on", "at"}:
            continue
        if tokens[i + 1 : i + 2] == ["of"] and tokens[i + 2 : i + 4] != ["the", "image"]:
            continue  # "left of the cat" is a relation, not a region
        return REGION_WORDS[tok]
    return None


def _relation(tokens: list[str], mentions: list[tuple[int, int, str]]) -> tuple[str, str] | None:
    if len(mentions) < 2:
        return None
    for phrase, relation in _RELATION_WORDS.items():
        n = len(phrase)
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i : i + n]) == phrase:
                return relation, mentions[1][2]
    return None


def _select(objects: list[DrawnObject], op: EditOp) -> list[int]:
    """The objects an edit applies to: by class, colour, size and (except to add) count."""
    chosen = [
        i
        for i, o in enumerate(objects)
        if o.cls == op.cls and (op.source_color is None or o.color == op.source_color)
    ]
    if op.source_size is not None and len(chosen) > 1:
        areas = [objects[i].area for i in chosen]
        lo, hi = min(areas), max(areas)
        if hi > 1.4 * lo:  # tell the large ones from the small ones
            cut = math.sqrt(lo * hi) if lo > 0 else hi / 2
            large = op.source_size == "large"
            chosen = [i for i, a in zip(chosen, areas, strict=True) if (a >= cut) == large]
    if op.kind != "add" and op.count is not None:
        chosen = chosen[-op.count :]
    return chosen


def _apply(
    op: EditOp, objects: list[DrawnObject], width: int, height: int, rng: Any
) -> list[DrawnObject]:
    chosen = _select(objects, op)
    if op.kind == "recolor":
        return [
            DrawnObject(o.cls, op.color or o.color, o.bbox) if i in chosen else o
            for i, o in enumerate(objects)
        ]
    if op.kind == "remove":
        drop = set(chosen)
        return [o for i, o in enumerate(objects) if i not in drop]
    if op.kind == "resize":
        factor = 1.8 if op.size == "large" else 0.55
        return [
            _scaled(o, factor, width, height) if i in chosen else o for i, o in enumerate(objects)
        ]
    if op.kind == "add":
        template = [objects[i] for i in chosen]
        side = (
            (template[0].bbox[2] - template[0].bbox[0]) if template else 0.16 * min(width, height)
        )
        color = op.color or (template[0].color if template else "white")
        new = list(objects)
        for _ in range(op.count or 1):
            x0, y0, x1, y1 = _free_spot(new, side, width, height, op.region, template, rng)
            new.append(DrawnObject(op.cls, color, (x0, y0, x1, y1)))
        return new
    # move
    moved = list(objects)
    if op.relation is not None:
        relation, other_cls = op.relation
        others = [o for o in objects if o.cls == other_cls]
        if not others:
            return moved
        ox = sum(o.center[0] for o in others) / len(others)
        oy = sum(o.center[1] for o in others) / len(others)
        for i in chosen:
            o = moved[i]
            cx, cy = o.center
            if relation in {"left of", "right of"}:
                gap = 0.22 * width
                nx = ox - gap if relation == "left of" else ox + gap
                nx = min(max(nx, 0.08 * width), 0.92 * width)
                moved[i] = _shifted(o, nx - cx, 0.0)
            else:
                gap = 0.22 * height
                ny = oy - gap if relation == "above" else oy + gap
                ny = min(max(ny, 0.08 * height), 0.92 * height)
                moved[i] = _shifted(o, 0.0, ny - cy)
        return moved
    for i in chosen:
        o = moved[i]
        cx, cy = o.center
        if op.region in {"left", "right"}:
            target = cx if (cx < width / 2) == (op.region == "left") else width - cx
            moved[i] = _shifted(o, target - cx, 0.0)
        elif op.region in {"top", "bottom"}:
            target = cy if (cy < height / 2) == (op.region == "top") else height - cy
            moved[i] = _shifted(o, 0.0, target - cy)
    return moved


def _shifted(o: DrawnObject, dx: float, dy: float) -> DrawnObject:
    x0, y0, x1, y1 = o.bbox
    return DrawnObject(o.cls, o.color, (x0 + dx, y0 + dy, x1 + dx, y1 + dy))


def _scaled(o: DrawnObject, factor: float, width: int, height: int) -> DrawnObject:
    cx, cy = o.center
    x0, y0, x1, y1 = o.bbox
    hw, hh = (x1 - x0) * factor / 2, (y1 - y0) * factor / 2
    return DrawnObject(
        o.cls,
        o.color,
        (max(0.0, cx - hw), max(0.0, cy - hh), min(width, cx + hw), min(height, cy + hh)),
    )


def _free_spot(
    objects: list[DrawnObject],
    side: float,
    width: int,
    height: int,
    region: str | None,
    near: list[DrawnObject],
    rng: Any,
) -> tuple[float, float, float, float]:
    x_lo, x_hi, y_lo, y_hi = side / 2, width - side / 2, side / 2, height - side / 2
    if region == "left":
        x_hi = width / 2 - side / 2
    elif region == "right":
        x_lo = width / 2 + side / 2
    elif region == "top":
        y_hi = height / 2 - side / 2
    elif region == "bottom":
        y_lo = height / 2 + side / 2
    elif near:
        # stay on the same side as the existing instances
        cx = sum(o.center[0] for o in near) / len(near)
        if cx < width / 2:
            x_hi = width / 2 - side / 2
        else:
            x_lo = width / 2 + side / 2
    best: tuple[float, float] = ((x_lo + x_hi) / 2, (y_lo + y_hi) / 2)
    best_gap = -1.0
    for _ in range(24):
        cx = rng.uniform(x_lo, max(x_lo, x_hi))
        cy = rng.uniform(y_lo, max(y_lo, y_hi))
        gap = min((abs(cx - o.center[0]) + abs(cy - o.center[1]) for o in objects), default=1e9)
        if gap > best_gap:
            best, best_gap = (cx, cy), gap
    cx, cy = best
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
