"""The simulator's vocabulary: the 80 COCO classes, colours, numbers, sizes and positions."""

from __future__ import annotations

from typing import Final

CLASSES: Final[tuple[str, ...]] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse",
    "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip
"""The 80 COCO object classes, as GenEval names them."""

_IRREGULAR_PLURALS: Final = {
    "person": "people",
    "bus": "buses",
    "skis": "skis",
    "sheep": "sheep",
    "knife": "knives",
    "sandwich": "sandwiches",
    "couch": "couches",
    "bench": "benches",
    "wine glass": "wine glasses",
    "computer mouse": "computer mice",
    "scissors": "scissors",
    "toothbrush": "toothbrushes",
    "broccoli": "broccoli",
    "hair drier": "hair driers",
    "tv": "tvs",
    "box": "boxes",
    "tomato": "tomatoes",
    "potato": "potatoes",
    "peach": "peaches",
    "glass": "glasses",
}

COLORS: Final[dict[str, tuple[int, int, int]]] = {
    "red": (214, 39, 40),
    "orange": (247, 129, 23),
    "yellow": (240, 208, 36),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "purple": (128, 60, 170),
    "pink": (240, 128, 180),
    "brown": (128, 78, 38),
    "black": (22, 22, 22),
    "white": (248, 248, 248),
}
"""The 10 GenEval colours and the RGB the simulator paints them with."""

NUMBERS: Final[dict[str, int]] = {
    "a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "pair": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip
NUMBER_WORDS: Final = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
    9: "nine", 10: "ten",
}  # fmt: skip
MAX_COUNT: Final = 7
"""Largest count the task sampler asks for (GenEval++ counts go to 7)."""

SIZE_WORDS: Final[dict[str, str]] = {
    "large": "large", "larger": "large", "big": "large", "bigger": "large", "huge": "large",
    "small": "small", "smaller": "small", "tiny": "small", "little": "small",
}  # fmt: skip

REGIONS: Final = ("left", "right", "top", "bottom")
REGION_WORDS: Final[dict[str, str]] = {
    "left": "left", "right": "right", "top": "top", "bottom": "bottom", "above": "top",
    "below": "bottom", "upper": "top", "lower": "bottom",
}  # fmt: skip
RELATIONS: Final = ("left of", "right of", "above", "below")
OPPOSITE_RELATION: Final = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above"
}  # fmt: skip
OPPOSITE_REGION: Final = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
RELATION_OF_REGION: Final = {
    "left": "left of",
    "right": "right of",
    "top": "above",
    "bottom": "below",
}

SHAPES: Final = ("circle", "square", "triangle", "diamond", "hexagon", "star", "ellipse", "house")


def plural(name: str) -> str:
    """English plural of a class name (``"bus"`` -> ``"buses"``, ``"person"`` -> ``"people"``)."""
    if name in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[name]
    head, _, last = name.rpartition(" ")
    prefix = f"{head} " if head else ""
    if last.endswith(("s", "x", "ch", "sh")):
        return f"{prefix}{last}es"
    if last.endswith("y") and last[-2:-1] not in "aeiou":
        return f"{prefix}{last[:-1]}ies"
    return f"{prefix}{last}s"


def noun(name: str, count: int) -> str:
    """The class name, singular or plural for ``count``."""
    return name if count == 1 else plural(name)


def article(word: str) -> str:
    """``"a"`` or ``"an"`` for ``word``."""
    return "an" if word[:1] in "aeiou" else "a"


def surface_forms() -> dict[tuple[str, ...], str]:
    """Every way a class is written (singular, plural, naive plural), as token tuples -> class."""
    forms: dict[tuple[str, ...], str] = {}
    for name in CLASSES:
        variants = {name, plural(name), f"{name}s", f"{name}es"}
        if name == "tv":
            variants |= {"television", "televisions"}
        if name == "person":
            variants |= {"persons", "man", "men", "woman", "women"}
        if name == "couch":
            variants |= {"sofa", "sofas"}
        if name == "cell phone":
            variants |= {"phone", "phones", "smartphone", "smartphones"}
        if name == "donut":
            variants |= {"doughnut", "doughnuts"}
        if name == "hair drier":
            variants |= {"hair dryer", "hair dryers"}
        for variant in variants:
            forms[tuple(variant.split())] = name
    return forms


def join_words(parts: list[str]) -> str:
    """``"a, b and c"``."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]
