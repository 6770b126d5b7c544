"""Drawing scenes as labelled glyphs, and the record of what was drawn, embedded in the PNG."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from genagent.sim._scene import DrawnObject
from genagent.sim._vocab import COLORS, SHAPES

if TYPE_CHECKING:
    from PIL import Image as PILImage
    from PIL import ImageDraw

RECORD_KEY = "genagent.scene"
"""PNG text chunk that holds the simulator's record of what it drew."""

_BACKGROUND = (206, 214, 222)
_GROUND = (188, 198, 206)
_OUTLINE = (55, 55, 60)
SIZE_FACTORS = {None: 1.0, "large": 1.55, "small": 0.55}


@dataclass
class DrawGroup:
    """A group to draw: what the simulated generator *decided* to draw (mistakes included).

    Attributes:
        cls: Class.
        count: Instances.
        color: Colour name.
        size: ``"large"`` / ``"small"`` / ``None``.
        box: Normalised ``(x0, y0, x1, y1)`` area the instances go in.
    """

    cls: str
    count: int
    color: str
    size: str | None
    box: tuple[float, float, float, float]


@dataclass
class SceneRecord:
    """The record embedded in every simulator image.

    Attributes:
        width: Image width.
        height: Image height.
        objects: What was drawn.
        source: ``{"tool": ..., "caption" or "instruction": ..., "seed": ...}``.
        mistakes: The simulated generator's mistakes (for inspection; judges and the heuristic
            policy look only at ``objects``, i.e. at what is visible).
    """

    width: int
    height: int
    objects: list[DrawnObject]
    source: dict[str, Any] = field(default_factory=dict)
    mistakes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Serialise."""
        return json.dumps(
            {
                "simulator": "genagent.sim",
                "version": 1,
                "width": self.width,
                "height": self.height,
                "objects": [
                    {"class": o.cls, "color": o.color, "bbox": [round(v, 2) for v in o.bbox]}
                    for o in self.objects
                ],
                "source": self.source,
                "mistakes": self.mistakes,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> SceneRecord | None:
        """Parse a record; ``None`` if it is not one."""
        try:
            data = json.loads(text)
            objects = [
                DrawnObject(
                    cls=str(o["class"]),
                    color=str(o["color"]),
                    bbox=(
                        float(o["bbox"][0]),
                        float(o["bbox"][1]),
                        float(o["bbox"][2]),
                        float(o["bbox"][3]),
                    ),
                )
                for o in data["objects"]
            ]
            return cls(
                width=int(data["width"]),
                height=int(data["height"]),
                objects=objects,
                source=dict(data.get("source") or {}),
                mistakes=[str(m) for m in data.get("mistakes") or []],
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return None


def read_record(image: PILImage.Image) -> SceneRecord | None:
    """The simulator record of ``image``, or ``None`` if it is not a simulator image."""
    text = getattr(image, "text", None) or image.info
    raw = text.get(RECORD_KEY) if isinstance(text, dict) else None
    return SceneRecord.from_json(raw) if isinstance(raw, str) else None


def seeded_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from a stable hash of ``parts``."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def place(
    groups: Sequence[DrawGroup], width: int, height: int, rng: random.Random
) -> list[DrawnObject]:
    """Lay the instances of each group out inside its box."""
    objects: list[DrawnObject] = []
    base = 0.2 * min(width, height)
    for group in groups:
        if group.count <= 0:
            continue
        x0, y0, x1, y1 = group.box
        bw, bh = (x1 - x0) * width, (y1 - y0) * height
        cols = max(1, round(math.sqrt(group.count * bw / max(bh, 1.0))))
        cols = min(cols, group.count)
        rows = math.ceil(group.count / cols)
        cell_w, cell_h = bw / cols, bh / rows
        side = min(base, 0.78 * min(cell_w, cell_h)) * SIZE_FACTORS.get(group.size, 1.0)
        side = max(6.0, min(side, 0.98 * min(cell_w, cell_h) * 1.6))
        for n in range(group.count):
            r, c = divmod(n, cols)
            cx = x0 * width + (c + 0.5) * cell_w + rng.uniform(-0.12, 0.12) * cell_w
            cy = y0 * height + (r + 0.5) * cell_h + rng.uniform(-0.12, 0.12) * cell_h
            half = side / 2
            box = (
                max(0.0, cx - half),
                max(0.0, cy - half),
                min(float(width), cx + half),
                min(float(height), cy + half),
            )
            objects.append(DrawnObject(cls=group.cls, color=group.color, bbox=box))
    return objects


def render(record: SceneRecord) -> PILImage.Image:
    """Draw the record's objects as labelled glyphs and embed the record."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (record.width, record.height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(record.height * 0.62), record.width, record.height), fill=_GROUND)
    for obj in record.objects:
        _glyph(draw, obj)
    image.info["genagent.scene"] = record.to_json()
    return image


@lru_cache(maxsize=128)
def shape_of(cls: str) -> str:
    """The glyph shape of a class (stable)."""
    return SHAPES[
        int(hashlib.md5(cls.encode(), usedforsecurity=False).hexdigest(), 16) % len(SHAPES)
    ]


def _glyph(draw: ImageDraw.ImageDraw, obj: DrawnObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    fill = COLORS.get(obj.color, (128, 128, 128))
    shape = shape_of(obj.cls)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill, outline=_OUTLINE, width=2)
    elif shape == "ellipse":
        draw.ellipse((x0, cy - ry * 0.65, x1, cy + ry * 0.65), fill=fill, outline=_OUTLINE, width=2)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill, outline=_OUTLINE, width=2)
    else:
        points = _polygon(shape, cx, cy, rx, ry)
        draw.polygon(points, fill=fill, outline=_OUTLINE)
    label = obj.cls if len(obj.cls) <= 12 else obj.cls[:11] + "."
    tw = 6 * len(label)
    draw.text((cx - tw / 2, min(y1 + 1, draw.im.size[1] - 11)), label, fill=(20, 20, 20))


def _polygon(shape: str, cx: float, cy: float, rx: float, ry: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)]
    if shape == "diamond":
        return [(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)]
    if shape == "hexagon":
        return [
            (cx + rx * math.cos(a), cy + ry * math.sin(a))
            for a in (math.pi / 3 * k for k in range(6))
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)))
        return pts
    # "house": a square with a roof
    return [
        (cx - rx, cy + ry),
        (cx - rx, cy - ry * 0.2),
        (cx, cy - ry),
        (cx + rx, cy - ry * 0.2),
        (cx + rx, cy + ry),
    ]
