"""The simulated generator: turn a caption into a drawn scene, making realistic mistakes.

The error model (documented in ``docs/simulator.md``): each constraint of the parsed caption
fails with a probability that depends on its kind, grows with the scene's complexity, and shrinks
with how explicitly the caption states it. Draws are deterministic per (caption, seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from genagent.sim._render import DrawGroup, SceneRecord, place, seeded_rng
from genagent.sim._scene import ObjectSpec, SceneSpec
from genagent.sim._vocab import COLORS, OPPOSITE_REGION

BASE_ERROR: Final[dict[str, float]] = {
    "presence": 0.05,
    "count": 0.07,
    "count_per_extra": 0.06,
    "color_binding": 0.2,
    "color_single": 0.06,
    "region": 0.26,
    "relation": 0.3,
    "size": 0.24,
}
"""Per-constraint mistake probabilities for a plain caption of a simple scene."""

EXPLICIT_FACTOR: Final = (1.0, 0.6, 0.4)
"""Multiplier on a mistake's probability by explicitness level 0, 1, 2."""

_NEUTRAL_COLORS: Final = ("brown", "white", "black", "orange", "green", "blue", "red", "yellow")


@dataclass(frozen=True)
class ErrorModel:
    """Settings of the simulated generator's mistakes.

    Attributes:
        scale: Multiplies every mistake probability (0 for a perfect generator).
        complexity_slope: How fast mistakes grow with the number of constraints.
    """

    scale: float = 1.0
    complexity_slope: float = 0.09

    def complexity(self, spec: SceneSpec) -> float:
        """Multiplier from scene complexity (1.0 for 3 constraints beyond presence)."""
        n = sum(1 for c in spec.constraints() if c.kind != "presence")
        return max(0.7, min(1.8, 1.0 + self.complexity_slope * (n - 3)))

    def p(
        self,
        spec: SceneSpec,
        base: float,
        kind: str,
        group: int,
        *,
        complexity: float | None = None,
    ) -> float:
        """Probability of one mistake.

        ``complexity`` is ``self.complexity(spec)``, computed here when not given; callers
        that draw many mistakes for one scene pass it once (it is O(groups) to compute).
        """
        if complexity is None:
            complexity = self.complexity(spec)
        factor = EXPLICIT_FACTOR[min(spec.level(kind, group), 2)]
        return min(0.95, self.scale * base * complexity * factor)


def imagine(
    spec: SceneSpec, rng: random.Random, model: ErrorModel
) -> tuple[list[DrawGroup], list[str]]:
    """Decide what to draw for ``spec``, mistakes included; returns the groups and the mistakes."""
    mistakes: list[str] = []
    cx = model.complexity(spec)  # once per scene, not once per draw
    objects = [ObjectSpec(**vars(o)) for o in spec.objects]
    colors = [o.color or _natural_color(o.cls, rng) for o in objects]
    sizes = [o.size for o in objects]
    colored = [i for i, o in enumerate(objects) if o.color]
    counts = [o.count for o in objects]
    present = [True] * len(objects)

    for i, obj in enumerate(objects):
        if len(objects) > 1 and rng.random() < model.p(
            spec,
            BASE_ERROR["presence"] * (1 + 0.4 * (len(objects) - 1)),
            "presence",
            i,
            complexity=cx,
        ):
            present[i] = False
            mistakes.append(f"missing {obj.cls}")
            continue
        p_count = BASE_ERROR["count"] + BASE_ERROR["count_per_extra"] * (obj.count - 1)
        if rng.random() < model.p(spec, p_count, "count", i, complexity=cx):
            delta = 1 if obj.count == 1 or rng.random() < 0.5 else -1
            counts[i] = obj.count + delta
            mistakes.append(f"{obj.cls} count {obj.count}->{counts[i]}")
    if len(colored) >= 2:
        for i in colored:
            if rng.random() < model.p(spec, BASE_ERROR["color_binding"], "color", i, complexity=cx):
                j = rng.choice([k for k in colored if k != i])
                if colors[j] != colors[i]:
                    colors[i] = objects[j].color or colors[i]
                    mistakes.append(f"{objects[i].cls} took the colour of the {objects[j].cls}")
    elif colored:
        i = colored[0]
        if rng.random() < model.p(spec, BASE_ERROR["color_single"], "color", i, complexity=cx):
            colors[i] = rng.choice([c for c in COLORS if c != objects[i].color])
            mistakes.append(f"{objects[i].cls} drawn {colors[i]}")
    for i, obj in enumerate(objects):
        if obj.size and rng.random() < model.p(spec, BASE_ERROR["size"], "size", i, complexity=cx):
            sizes[i] = "small" if obj.size == "large" else "large"
            mistakes.append(f"{obj.cls} drawn {sizes[i]}")

    regions = [o.region for o in objects]
    for i, obj in enumerate(objects):
        if obj.region and rng.random() < model.p(
            spec, BASE_ERROR["region"], "region", i, complexity=cx
        ):
            regions[i] = OPPOSITE_REGION[obj.region]
            mistakes.append(f"{obj.cls} on the {regions[i]}")
    flips = set()
    for i, obj in enumerate(objects):
        if obj.relation is not None and rng.random() < model.p(
            spec, BASE_ERROR["relation"], "relation", i, complexity=cx
        ):
            flips.add(i)
            mistakes.append(f"{obj.cls} {obj.relation[0]} flipped")
    boxes = layout(objects, regions, flips, rng)
    groups = [
        DrawGroup(cls=o.cls, count=counts[i], color=colors[i], size=sizes[i], box=boxes[i])
        for i, o in enumerate(objects)
        if present[i]
    ]
    return groups, mistakes


def layout(
    objects: list[ObjectSpec],
    regions: list[str | None],
    flips: set[int],
    rng: random.Random,
) -> list[tuple[float, float, float, float]]:
    """Assign each group a normalised box honouring regions and (unflipped) relations."""
    zones: list[str | None] = list(regions)
    for i, obj in enumerate(objects):
        if obj.relation is None:
            continue
        relation, j = obj.relation
        side = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}[relation]
        if i in flips:
            side = OPPOSITE_REGION[side]
        if zones[i] is None and zones[j] is None:
            zones[i], zones[j] = side, OPPOSITE_REGION[side]
        elif zones[i] is None:
            zones[i] = zones[j]  # share the other's half; the order inside it is left to chance
        elif zones[j] is None:
            zones[j] = zones[i]
    horizontal = [z for z in zones if z in ("left", "right")]
    vertical = [z for z in zones if z in ("top", "bottom")]
    for i, zone in enumerate(zones):
        if zone is not None:
            continue
        if horizontal:
            zones[i] = "right" if horizontal.count("left") >= horizontal.count("right") else "left"
            horizontal.append(zones[i] or "")
        elif vertical:
            zones[i] = "bottom" if vertical.count("top") >= vertical.count("bottom") else "top"
            vertical.append(zones[i] or "")
    full = (0.04, 0.06, 0.96, 0.9)
    zone_box = {
        None: full,
        "left": (0.03, 0.06, 0.47, 0.9),
        "right": (0.53, 0.06, 0.97, 0.9),
        "top": (0.04, 0.04, 0.96, 0.46),
        "bottom": (0.04, 0.54, 0.96, 0.94),
    }
    boxes: list[tuple[float, float, float, float]] = [full] * len(objects)
    for zone in dict.fromkeys(zones):  # first-seen order: a set's order varies per process
        members = [i for i, z in enumerate(zones) if z == zone]
        rng.shuffle(members)
        x0, y0, x1, y1 = zone_box[zone]
        split_rows = zone in ("left", "right")
        weights = [max(1, objects[i].count) ** 0.5 for i in members]
        total = sum(weights)
        pos = 0.0
        for i, w in zip(members, weights, strict=True):
            frac0, frac1 = pos / total, (pos + w) / total
            pos += w
            if split_rows:
                boxes[i] = (x0, y0 + (y1 - y0) * frac0, x1, y0 + (y1 - y0) * frac1)
            else:
                boxes[i] = (x0 + (x1 - x0) * frac0, y0, x0 + (x1 - x0) * frac1, y1)
    return boxes


def draw_caption(
    spec: SceneSpec,
    caption: str,
    seed: int,
    *,
    width: int,
    height: int,
    model: ErrorModel,
    tool: str,
) -> SceneRecord:
    """The full generator: mistakes, layout, placement; returns the record to render."""
    rng = seeded_rng("generate", caption, seed)
    groups, mistakes = imagine(spec, rng, model)
    objects = place(groups, width, height, rng)
    return SceneRecord(
        width=width,
        height=height,
        objects=objects,
        source={"tool": tool, "caption": caption, "seed": seed},
        mistakes=mistakes,
    )


def _natural_color(cls: str, rng: random.Random) -> str:
    natural = {
        "banana": "yellow", "broccoli": "green", "carrot": "orange", "orange": "orange",
        "apple": "red", "stop sign": "red", "fire hydrant": "red", "zebra": "white",
        "elephant": "black", "bear": "brown", "horse": "brown", "cow": "white", "sheep": "white",
        "pizza": "orange", "cake": "pink", "donut": "brown", "potted plant": "green",
    }  # fmt: skip
    return natural.get(cls) or _NEUTRAL_COLORS[rng.randrange(len(_NEUTRAL_COLORS))]
