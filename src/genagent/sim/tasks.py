"""SIMULATOR task sampler: GenEval++-style compositional tasks with scoring metadata."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Final

from genagent.errors import ConfigurationError
from genagent.sim._scene import ObjectSpec, SceneSpec, prompt_for
from genagent.sim._vocab import CLASSES, COLORS, MAX_COUNT, RELATIONS
from genagent.tasks import Task

__all__ = ["CATEGORIES", "sample_tasks"]

_COLOR_NAMES: Final = tuple(COLORS)


def _classes(rng: random.Random, k: int) -> list[str]:
    return rng.sample(CLASSES, k)


def _colors(rng: random.Random, k: int) -> list[str]:
    return rng.sample(_COLOR_NAMES, k)


def _regions(rng: random.Random) -> tuple[str, str]:
    return rng.choice([("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")])


def _color_attr(rng: random.Random) -> list[ObjectSpec]:
    return [
        ObjectSpec(c, 1, color=col)
        for c, col in zip(_classes(rng, 3), _colors(rng, 3), strict=True)
    ]


def _counting(rng: random.Random) -> list[ObjectSpec]:
    return [ObjectSpec(_classes(rng, 1)[0], rng.randint(2, MAX_COUNT))]


def _multi_count(rng: random.Random) -> list[ObjectSpec]:
    k = rng.choice([2, 2, 3])
    return [ObjectSpec(c, rng.randint(1, 4)) for c in _classes(rng, k)]


def _spatial_count(rng: random.Random) -> list[ObjectSpec]:
    a, b = _classes(rng, 2)
    ra, rb = _regions(rng)
    return [
        ObjectSpec(a, rng.randint(1, 4), region=ra),
        ObjectSpec(b, rng.randint(1, 4), region=rb),
    ]


def _size_spatial(rng: random.Random) -> list[ObjectSpec]:
    a, b = _classes(rng, 2)
    ra, rb = _regions(rng)
    sa, sb = rng.choice([("large", "small"), ("small", "large")])
    return [ObjectSpec(a, 1, size=sa, region=ra), ObjectSpec(b, 1, size=sb, region=rb)]


def _color_spatial(rng: random.Random) -> list[ObjectSpec]:
    a, b = _classes(rng, 2)
    ca, cb = _colors(rng, 2)
    ra, rb = _regions(rng)
    return [ObjectSpec(a, 1, color=ca, region=ra), ObjectSpec(b, 1, color=cb, region=rb)]


def _color_count(rng: random.Random) -> list[ObjectSpec]:
    a, b = _classes(rng, 2)
    ca, cb = _colors(rng, 2)
    return [ObjectSpec(a, rng.randint(1, 4), color=ca), ObjectSpec(b, rng.randint(1, 4), color=cb)]


def _position(rng: random.Random) -> list[ObjectSpec]:
    a, b = _classes(rng, 2)
    return [ObjectSpec(a, 1), ObjectSpec(b, 1, relation=(rng.choice(RELATIONS), 0))]


CATEGORIES: Final[dict[str, Callable[[random.Random], list[ObjectSpec]]]] = {
    "color_attr": _color_attr,
    "counting": _counting,
    "multi_object_count_attr": _multi_count,
    "spatial_count_attr": _spatial_count,
    "size_spatial_attr": _size_spatial,
    "color_spatial_attr": _color_spatial,
    "color_count_attr": _color_count,
    "position": _position,
}
"""Task categories: the seven GenEval++ tags plus GenEval's ``position``."""


def sample_tasks(n: int, seed: int = 0, *, categories: Sequence[str] | None = None) -> list[Task]:
    """Sample ``n`` SIMULATOR tasks, cycling through the categories (deterministic per seed).

    Each task has a short GenEval++-style prompt ("a photo of three clocks on the left and a
    cat on the right"), its category, and GenEval ``include`` metadata that ``SceneJudge``
    scores against.

    Args:
        n: How many tasks.
        seed: Sampling seed.
        categories: Restrict to these categories (default: all of :data:`CATEGORIES`).

    Raises:
        ConfigurationError: For an unknown category or a negative ``n`` (a ``ValueError``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigurationError(f"n must be an integer >= 0, got {n!r}")
    names = list(categories) if categories is not None else list(CATEGORIES)
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown or not names:
        raise ConfigurationError(f"unknown categories {unknown}; known: {sorted(CATEGORIES)}")
    rng = random.Random(seed)
    tasks: list[Task] = []
    for i in range(n):
        category = names[i % len(names)]
        spec = SceneSpec(objects=CATEGORIES[category](rng))
        tasks.append(
            Task(
                id=f"sim-{seed}-{i:05d}",
                prompt=prompt_for(spec),
                category=category,
                metadata={"tag": category, "include": spec.to_include(), "simulator": True},
            )
        )
    return tasks
