"""Benchmark prompt sets (GenEval, GenEval++, WISE) and their official aggregation rules.

:func:`load_benchmark` reads a benchmark from a local copy (a file, a folder, or a checkout of
the official repository), or downloads it from the official repository at a pinned commit,
checked by sha256 and cached. :func:`load_prompts` reads your own ``.txt`` / ``.jsonl`` prompts.
A :class:`Benchmark` holds :class:`~genagent.tasks.Task` objects and knows how to turn per-prompt
scores into the official figure (:meth:`Benchmark.summarize`); the rules are also plain
functions (:func:`aggregate`, :func:`summarize_scores`, :func:`wiscore`).

The benchmark files are never shipped with genagent: their licences differ (GenEval is MIT,
Echo-4o's GenEval++ is Apache-2.0, WISE has no licence file: evaluation use only).

Errors (all are :class:`~genagent.errors.ConfigurationError`, so one ``except`` catches them):

```text
BenchmarkError               the benchmark cannot be loaded (not found locally: how to get it)
├── BenchmarkFileError       a malformed or wrong file (names the file and the line or record)
├── BenchmarkChecksumError   a download or cached copy whose sha256 is not the pinned one
└── BenchmarkDownloadError   the download failed (HTTP status, network, size cap)
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from genagent.errors import ConfigurationError
from genagent.tasks import Task

__all__ = [
    "BENCHMARKS",
    "GENEVAL_PP_TAGS",
    "GENEVAL_TAGS",
    "SCORING_RULES",
    "WISE_CATEGORIES",
    "WISE_LEGACY_RANGES",
    "WISE_LEGACY_WEIGHTS",
    "WISE_VERIFIED_RANGES",
    "WISE_VERIFIED_WEIGHTS",
    "Benchmark",
    "BenchmarkChecksumError",
    "BenchmarkDownloadError",
    "BenchmarkError",
    "BenchmarkFileError",
    "BenchmarkSummary",
    "CategoryScore",
    "Scoring",
    "aggregate",
    "default_cache_dir",
    "load_benchmark",
    "load_prompts",
    "summarize_scores",
    "wiscore",
]

logger = logging.getLogger("genagent.evals")

Scoring = Literal["strict", "wiscore", "binary", "mean"]
"""How per-prompt scores become the overall figure (see :data:`SCORING_RULES`)."""

_SCORINGS: Final = ("strict", "wiscore", "binary", "mean")

# --------------------------------------------------------------------------- the rules

GENEVAL_TAGS: Final[tuple[str, ...]] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)  # fmt: skip
"""GenEval's 6 tags (tasks), in the order of ``evaluation_metadata.jsonl``."""

GENEVAL_PP_TAGS: Final[tuple[str, ...]] = (
    "color_attr", "spatial_count_attr", "color_spatial_attr", "color_count_attr",
    "multi_object_count_attr", "size_spatial_attr", "counting",
)  # fmt: skip
"""GenEval++'s 7 tags, in the order of ``Geneval++.jsonl``."""

WISE_CATEGORIES: Final[tuple[str, ...]] = (
    "cultural", "time", "space", "biology", "physics", "chemistry",
)  # fmt: skip
"""WISE's 6 canonical categories (the official scripts' CULTURE, TIME, SPACE, ...)."""

# The official WISE scripts assign a prompt to a category by its prompt_id, not by the
# record's "Category" field (the legacy rewrite file has one "Ecology" record, id 748, which
# therefore counts as biology). Inclusive ranges, as in the scripts.
WISE_LEGACY_RANGES: Final[Mapping[str, tuple[int, int]]] = MappingProxyType(
    {
        "cultural": (1, 400),
        "time": (401, 567),
        "space": (568, 700),
        "biology": (701, 800),
        "physics": (801, 900),
        "chemistry": (901, 1000),
    }
)
"""WISE legacy: category of each ``prompt_id`` range (inclusive), as in ``Calculate.py``."""

WISE_VERIFIED_RANGES: Final[Mapping[str, tuple[int, int]]] = MappingProxyType(
    {
        "cultural": (1, 400),
        "time": (401, 520),
        "space": (521, 640),
        "biology": (641, 760),
        "physics": (761, 880),
        "chemistry": (881, 1000),
    }
)
"""WISE Verified: category of each ``prompt_id`` range (inclusive)."""

WISE_LEGACY_WEIGHTS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "cultural": 0.4,
        "time": 0.167,
        "space": 0.133,
        "biology": 0.1,
        "physics": 0.1,
        "chemistry": 0.1,
    }
)
"""WISE legacy: weight of each category mean in the overall WiScore."""

WISE_VERIFIED_WEIGHTS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "cultural": 0.4,
        "time": 0.12,
        "space": 0.12,
        "biology": 0.12,
        "physics": 0.12,
        "chemistry": 0.12,
    }
)
"""WISE Verified: weight of each category mean in the overall score."""

_FAILURE_NOTE: Final = (
    " A prompt whose judge failed (score None) counts as 0 and is reported as a failure; "
    "a prompt with no score yet is reported as missing and left out."
)

# Verified against the official code (see the module-level comments below for each source).
SCORING_RULES: Final[Mapping[str, str]] = MappingProxyType(
    {
        # djghosh13/geneval evaluation/summary_scores.py: `task_scores.append(task_df['correct']
        # .mean())` for each tag, then `np.mean(task_scores)` ("avg. over tasks").
        "geneval": (
            "GenEval (djghosh13/geneval evaluation/summary_scores.py): each prompt scores 1 "
            "when its image is correct, else 0 (the mean over its images when there are "
            "several); a tag's score is the mean over its prompts; overall = the unweighted "
            "mean of the 6 tag scores (mean of task means)."
        ),
        # The evaluator script itself (yejy53/Echo-4o test_scripts/Eval-gpt-4.1-geneval++.py)
        # is not in the searchable index; its documented output (Echo-4o Eval.md, mirrored in
        # yejy53/Nano-banana-150k Eval.md) prints per-tag accuracy and "Overall score (mean of
        # tag accuracies)", which is what is implemented here.
        "geneval++": (
            "GenEval++ (yejy53/Echo-4o test_scripts/Eval-gpt-4.1-geneval++.py): each prompt "
            "scores 1 when the judge finds every requirement met, else 0; a tag's accuracy is "
            "the mean over its prompts; overall = the unweighted mean of the 7 tag accuracies."
        ),
        # PKU-YuanGroup/WISE WISE_legacy Calculate.py: calculate_wiscore(c, r, a) =
        # (0.7c + 0.2r + 0.1a) / 2, category by prompt_id range, overall_wiscore = 0.4 CULTURE
        # + 0.167 TIME + 0.133 SPACE + 0.1 BIOLOGY + 0.1 PHYSICS + 0.1 CHEMISTRY.
        "wise-legacy": (
            "WISE legacy (PKU-YuanGroup/WISE WISE_legacy/Calculate.py): WiScore = (0.7 * "
            "consistency + 0.2 * realism + 0.1 * aesthetic quality) / 2 per prompt, in [0, 1]; "
            "category by prompt_id (1-400 cultural, 401-567 time, 568-700 space, 701-800 "
            "biology, 801-900 physics, 901-1000 chemistry); category score = mean WiScore; "
            "overall = 0.4 cultural + 0.167 time + 0.133 space + 0.1 biology + 0.1 physics + "
            "0.1 chemistry."
        ),
        # PKU-YuanGroup/WISE, the WISE_Verified Calculate script: calculate_wiscore(score) =
        # float(score) with score in {0, 1}; ranges 1-400/401-520/521-640/641-760/761-880/
        # 881-1000; "0.4*CULTURE + 0.12*(TIME + SPACE + BIOLOGY + PHYSICS + CHEMISTRY)".
        "wise-verified": (
            "WISE Verified (PKU-YuanGroup/WISE, WISE_Verified Calculate.py): each prompt scores "
            "1 (semantically correct and visually usable) or 0; category by prompt_id (1-400 "
            "cultural, 401-520 time, 521-640 space, 641-760 biology, 761-880 physics, 881-1000 "
            "chemistry); category score = mean; overall = 0.4 cultural + 0.12 (time + space + "
            "biology + physics + chemistry)."
        ),
        "custom": (
            "Custom prompts: overall = the plain mean of the per-prompt scores; a category's "
            "score is the mean over its prompts."
        ),
    }
)
"""The official aggregation rule of each benchmark, in words (``BenchmarkSummary.rule``)."""

_RULE_OF_SCORING: Final = {
    "strict": "geneval",
    "wiscore": "wise-legacy",
    "binary": "wise-verified",
    "mean": "custom",
}
_UNCATEGORIZED: Final = "uncategorized"


def wiscore(consistency: float, realism: float, aesthetic_quality: float) -> float:
    """WISE legacy's per-prompt WiScore, in [0, 1], from the judge's three 0-2 scores.

    ``(0.7 * consistency + 0.2 * realism + 0.1 * aesthetic_quality) / 2``, as
    ``calculate_wiscore`` in the official ``WISE_legacy/Calculate.py``.

    Raises:
        ConfigurationError: If a score is not a number in [0, 2].
    """
    for name, value in (
        ("consistency", consistency),
        ("realism", realism),
        ("aesthetic_quality", aesthetic_quality),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
            raise ConfigurationError(f"{name} must be a number in [0, 2], got {value!r}")
    return (0.7 * consistency + 0.2 * realism + 0.1 * aesthetic_quality) / 2


class CategoryScore(BaseModel):
    """One category's (tag's) score.

    Attributes:
        mean: Mean per-prompt score over its scored prompts (failures count as 0).
        n: Scored prompts (failures included, missing ones not).
        failures: Prompts whose judge failed (scored 0).
        weight: The weight of this category's mean in the overall figure, as computed (the
            official weight; renormalized over the categories present when some have no
            scored prompt; for ``"mean"`` scoring, its share of the prompts).
    """

    model_config = ConfigDict(frozen=True)

    mean: float
    n: int
    failures: int
    weight: float | None = None


class BenchmarkSummary(BaseModel):
    """The official figure of a benchmark for a set of per-prompt scores.

    Attributes:
        benchmark: The benchmark's name.
        rule: The official aggregation rule, in words.
        overall: The official overall figure (0.0 when nothing is scored).
        per_category: Category (GenEval tag, WISE category) -> its score, in benchmark order.
        n: Scored prompts (failures included).
        failures: Prompts whose judge failed; they count as 0.
        missing: Benchmark prompts with no score; they are left out of every figure.
        scoring: The scoring kind (``"strict"``, ``"wiscore"``, ``"binary"``, ``"mean"``).
        complete: Whether every prompt of the whole benchmark is scored (``missing == 0``
            and not a slice); only then is ``overall`` the benchmark's official figure.
        partial: Whether the scored benchmark is a slice (``--limit`` / ``--category``,
            :meth:`Benchmark.subset`) of fewer prompts than the whole benchmark: the figure
            aggregates the slice by the official rule but is not the official figure (the
            rule text says so).
        total: The whole benchmark's prompt count when ``partial`` (else ``None``).
    """

    model_config = ConfigDict(frozen=True)

    benchmark: str
    rule: str
    overall: float
    per_category: dict[str, CategoryScore]
    n: int
    failures: int
    missing: int
    scoring: str = "mean"
    complete: bool = True
    partial: bool = False
    total: int | None = None


def _check_scoring(scoring: str) -> None:
    if scoring not in _SCORINGS:
        raise ConfigurationError(f"scoring must be one of {list(_SCORINGS)}, got {scoring!r}")


def _check_score(scoring: str, where: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(
            f"the score of {where} must be a finite number or None (judge failed), got {value!r}"
        )
    if scoring != "mean" and not 0.0 <= value <= 1.0:
        raise ConfigurationError(
            f"the score of {where} is {value!r}; {scoring!r} scoring takes per-prompt scores "
            "in [0, 1] (for WISE legacy, convert the judge's 0-2 scores with wiscore())"
        )
    return float(value)


def summarize_scores(
    scoring: Scoring | str,
    scores_by_category: Mapping[str, Sequence[float | None]],
    *,
    benchmark: str | None = None,
    missing: int = 0,
) -> BenchmarkSummary:
    """Apply an official aggregation rule to per-prompt scores grouped by category.

    Args:
        scoring: ``"strict"`` (GenEval / GenEval++: mean of the category means),
            ``"wiscore"`` (WISE legacy weights), ``"binary"`` (WISE Verified weights) or
            ``"mean"`` (plain mean over prompts).
        scores_by_category: Category -> the per-prompt scores of its scored prompts; ``None``
            is a failed judgment and counts as 0. For WISE the categories are
            :data:`WISE_CATEGORIES`.
        benchmark: The benchmark's name, for the rule text (default: from ``scoring``).
        missing: How many prompts have no score (reported, never scored).

    Returns:
        The summary. When some categories have no scored prompt, ``overall`` is computed over
        the categories present (WISE weights renormalized to sum to 1) and ``complete`` is
        false.

    Raises:
        ConfigurationError: For an unknown scoring, a WISE category name that is not one of
            :data:`WISE_CATEGORIES`, or a score that is not a finite number in [0, 1].
    """
    _check_scoring(scoring)
    name = benchmark or _RULE_OF_SCORING[scoring]
    rule = SCORING_RULES.get(name, SCORING_RULES[_RULE_OF_SCORING[scoring]]) + _FAILURE_NOTE
    official: Mapping[str, float] | None = None
    if scoring == "wiscore":
        official = WISE_LEGACY_WEIGHTS
    elif scoring == "binary":
        official = WISE_VERIFIED_WEIGHTS
    if official is not None:
        unknown = [c for c in scores_by_category if c not in official]
        if unknown:
            raise ConfigurationError(
                f"{scoring!r} scoring has the WISE categories {list(official)}; got {unknown}"
            )
    means: dict[str, tuple[float, int, int]] = {}
    total_sum, total_n, total_failures = 0.0, 0, 0
    for category, raw in scores_by_category.items():
        values = [_check_score(scoring, f"a prompt of {category!r}", v) for v in raw]
        if not values:
            continue
        failures = sum(1 for v in values if v is None)
        category_sum = sum(v for v in values if v is not None)
        means[category] = (category_sum / len(values), len(values), failures)
        total_sum += category_sum
        total_n += len(values)
        total_failures += failures
    weights: dict[str, float] = {}
    if means:
        if scoring == "strict":
            weights = dict.fromkeys(means, 1 / len(means))
        elif scoring == "mean":
            weights = {c: n / total_n for c, (_, n, _) in means.items()}
        else:
            assert official is not None
            present = {c: official[c] for c in means}
            if len(present) < len(official):
                # Not every category is scored: renormalize over those that are.
                mass = sum(present.values())
                present = {c: w / mass for c, w in present.items()}
            weights = present
    if not means:
        overall = 0.0
    elif scoring == "mean":
        overall = total_sum / total_n
    elif scoring == "strict":
        overall = sum(m for m, _, _ in means.values()) / len(means)
    else:
        overall = sum(weights[c] * m for c, (m, _, _) in means.items())
    order = [c for c in official if c in means] if official is not None else list(means)
    return BenchmarkSummary(
        benchmark=name,
        rule=rule,
        overall=overall,
        per_category={
            c: CategoryScore(
                mean=means[c][0], n=means[c][1], failures=means[c][2], weight=weights.get(c)
            )
            for c in order
        },
        n=total_n,
        failures=total_failures,
        missing=missing,
        scoring=scoring,
        complete=missing == 0
        and (official is None or all(c in means for c in official))
        and total_n > 0,
    )


def aggregate(
    scoring: Scoring | str, scores_by_category: Mapping[str, Sequence[float | None]]
) -> float:
    """The official overall figure for per-prompt scores grouped by category.

    The plain-function form of :func:`summarize_scores` (its ``overall``):

    ```python
    from genagent.evals import aggregate

    # GenEval: the mean of the tag means, not the mean over prompts
    print(aggregate("strict", {"counting": [1, 0], "colors": [1, 1, 1, 0]}))  # 0.625
    ```

    Raises:
        ConfigurationError: As :func:`summarize_scores`.
    """
    return summarize_scores(scoring, scores_by_category).overall


# --------------------------------------------------------------------------- errors


class BenchmarkError(ConfigurationError):
    """A benchmark that cannot be loaded; the message says how to get or fix it."""


class BenchmarkFileError(BenchmarkError):
    """A malformed benchmark file, or the wrong file for the benchmark asked for.

    Args:
        message: What is wrong and what to do.
        path: The file.
        line: The 1-based line (JSON lines and text files), when known.
        record: The 1-based record (WISE JSON arrays), when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str],
        line: int | None = None,
        record: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.record = record
        where = f"{path}"
        if line is not None:
            where += f", line {line}"
        elif record is not None:
            where += f", record {record}"
        self.message = f"{where}: {message}"
        super().__init__(self.message)


class BenchmarkChecksumError(BenchmarkError):
    """A downloaded or cached benchmark file whose sha256 is not the pinned one.

    Args:
        message: What happened and what to do.
        url: The file's official URL.
        expected: The pinned sha256.
        actual: The sha256 of what was received or found.
    """

    def __init__(self, message: str, *, url: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.url = url
        self.expected = expected
        self.actual = actual


class BenchmarkDownloadError(BenchmarkError):
    """A benchmark download that failed (HTTP error, network error, size cap)."""


# --------------------------------------------------------------------------- official files

_RAW_BASE: Final = "https://raw.githubusercontent.com"
_MIRROR_ENV: Final = "GENAGENT_BENCHMARK_MIRROR"
_DIR_ENV: Final = "GENAGENT_BENCHMARKS_DIR"  # a folder holding the official files
_MAX_DOWNLOAD_BYTES: Final = 32 * 1024 * 1024  # the largest official file is ~400 KB
_ATTEMPTS: Final = 4
_BACKOFF_S: Final = 0.25
_MAX_WAIT_S: Final = 30.0
_DEADLINE_FACTOR: Final = 10  # a whole file within 10 request timeouts

_GENEVAL_REPO: Final = ("djghosh13/geneval", "af4902f24d3ca90ebbb446dd9891a59e0f82725f")
_ECHO4O_REPO: Final = ("yejy53/Echo-4o", "28f36d76558e5f53b9deceda78bf025ef0d0ea24")
_WISE_REPO: Final = ("PKU-YuanGroup/WISE", "eb51174483a5de2e34e8614cf9dfb3319ee7fcd0")


@dataclass(frozen=True)
class _OfficialFile:
    repo: str
    commit: str
    path: str  # inside the repository
    sha256: str
    local: tuple[str, ...]  # where a local copy may sit, relative to a folder the user gives

    @property
    def basename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def url(self, mirror: str | None = None) -> str:
        base = (mirror or _RAW_BASE).rstrip("/")
        return f"{base}/{self.repo}/{self.commit}/{urllib.parse.quote(self.path, safe='/+')}"

    def cache_path(self, cache_dir: Path) -> Path:
        return cache_dir / self.repo.replace("/", "__") / self.commit[:12] / self.path


def _geneval_file(path: str, sha256: str, *local: str) -> _OfficialFile:
    return _OfficialFile(*_GENEVAL_REPO, path=path, sha256=sha256, local=local)


def _echo_file(path: str, sha256: str, *local: str) -> _OfficialFile:
    return _OfficialFile(*_ECHO4O_REPO, path=path, sha256=sha256, local=local)


def _wise_file(folder: str, name: str, sha256: str, *local_folders: str) -> _OfficialFile:
    return _OfficialFile(
        *_WISE_REPO,
        path=f"{folder}/{name}",
        sha256=sha256,
        local=tuple(f"{f}/{name}" if f else name for f in ("", folder, *local_folders)),
    )


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: Literal["geneval", "wise"]
    scoring: Scoring
    description: str
    license: str
    files: tuple[_OfficialFile, ...]
    tags: tuple[str, ...] = ()
    ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    merged: tuple[str, ...] = ()  # where one file holding every record may sit instead


_GENEVAL_LICENSE: Final = "MIT (djghosh13/geneval LICENSE)"
_ECHO_LICENSE: Final = "Apache-2.0 (yejy53/Echo-4o LICENSE)"
_WISE_LICENSE: Final = (
    "none: PKU-YuanGroup/WISE has no licence file or statement (all rights reserved); use it "
    "for local research evaluation only and do not redistribute it (paper: arXiv:2503.07265; "
    "contact: niuyuwei04@gmail.com)"
)

_LEGACY_FOLDERS: Final = ("data", "legacy", "wise/legacy")
_VERIFIED_FOLDERS: Final = ("verified", "wise/verified")

_SPECS: Final[dict[str, _Spec]] = {
    "geneval": _Spec(
        name="geneval",
        kind="geneval",
        scoring="strict",
        description=(
            "GenEval: 553 short compositional prompts in 6 tags (single_object, two_object, "
            "counting, colors, position, color_attr); strict 0/1 per prompt; overall = mean of "
            "the tag means. MIT."
        ),
        license=_GENEVAL_LICENSE,
        tags=GENEVAL_TAGS,
        files=(
            _geneval_file(
                "prompts/evaluation_metadata.jsonl",
                "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13",
                "evaluation_metadata.jsonl",
                "prompts/evaluation_metadata.jsonl",
                "geneval/evaluation_metadata.jsonl",
                "eval/gen/geneval/prompts/evaluation_metadata.jsonl",  # the copy in Echo-4o
            ),
        ),
    ),
    "geneval-long": _Spec(
        name="geneval-long",
        kind="geneval",
        scoring="strict",
        description=(
            "GenEval with Echo-4o's long descriptive rewrites of the 553 prompts (same tags, "
            "metadata and scoring as GenEval). Apache-2.0."
        ),
        license=_ECHO_LICENSE,
        tags=GENEVAL_TAGS,
        files=(
            _echo_file(
                "eval/gen/geneval/prompts/evaluation_metadata_long.jsonl",
                "09472cc9c24e225417b1d5df27e688e5f2a0fcac9ec772f33d9debe4e5d49f27",
                "evaluation_metadata_long.jsonl",
                "evaluation_metadata_long.from_Echo-4o.jsonl",
                "eval/gen/geneval/prompts/evaluation_metadata_long.jsonl",
                "geneval/evaluation_metadata_long.from_Echo-4o.jsonl",
                "geneval/evaluation_metadata_long.jsonl",
            ),
        ),
    ),
    "geneval++": _Spec(
        name="geneval++",
        kind="geneval",
        scoring="strict",
        description=(
            "GenEval++ (Echo-4o): 280 harder compositional prompts in 7 tags (40 each); 0/1 per "
            "prompt; overall = mean of the 7 tag accuracies. Apache-2.0."
        ),
        license=_ECHO_LICENSE,
        tags=GENEVAL_PP_TAGS,
        files=(
            _echo_file(
                "test_scripts/Geneval++.jsonl",
                "9c1216a3f6fe2d99e4ffd63f3a6dba71f3dd7ab30a7c09cb41f03629b35d3e8f",
                "Geneval++.jsonl",
                "test_scripts/Geneval++.jsonl",
                "geneval_pp/Geneval++.jsonl",
            ),
        ),
    ),
    "wise-legacy": _Spec(
        name="wise-legacy",
        kind="wise",
        scoring="wiscore",
        description=(
            "WISE (original, GPT-4o-judged release): 1000 world-knowledge prompts in 6 "
            "categories; WiScore in [0, 1] per prompt; overall = 0.4 cultural + 0.167 time + "
            "0.133 space + 0.1 biology + 0.1 physics + 0.1 chemistry. No licence: evaluation "
            "use only."
        ),
        license=_WISE_LICENSE,
        ranges=WISE_LEGACY_RANGES,
        files=tuple(
            _wise_file("WISE_legacy/data", name, sha, *_LEGACY_FOLDERS)
            for name, sha in (
                (
                    "cultural_common_sense.json",
                    "7a59216c768698280cea37caa574b52f3faf054d73b398b9bb6b3161baf8e3aa",
                ),
                (
                    "spatio-temporal_reasoning.json",
                    "e27d797885ad86e64d857d0cc93d33e04be572a8dcae95692a2c7e7876233f9a",
                ),
                (
                    "natural_science.json",
                    "b262fae58e413c7a4bd3c3d5a089f8c6529feac227e4b6606be261a949035544",
                ),
            )
        ),
    ),
    "wise-legacy-rewrite": _Spec(
        name="wise-legacy-rewrite",
        kind="wise",
        scoring="wiscore",
        description=(
            "WISE legacy with the prompts rewritten to name the answer (e.g. 'Carnation' for "
            "'the plant often gifted on Mother's Day'); same ids, categories and scoring. No "
            "licence: evaluation use only."
        ),
        license=_WISE_LICENSE,
        ranges=WISE_LEGACY_RANGES,
        files=tuple(
            _wise_file("WISE_legacy/data", name, sha, *_LEGACY_FOLDERS)
            for name, sha in (
                (
                    "cultural_common_sense_rewrite.json",
                    "4383290c349703776c24cfa864bfa3e065dae2e3f408cf46af702f2b7affea9f",
                ),
                (
                    "spatio-temporal_reasoning_rewrite.json",
                    "f63c98fff301e81c3ca6d3918683fb49757c3159d9b9e45dda8b2c9cf6a75d64",
                ),
                (
                    "natural_science_rewrite.json",
                    "6aee690e100ffb65b292de3fbe35ce89fa1ca2b92063a99d227d04eaa51af2b3",
                ),
            )
        ),
    ),
    "wise-verified": _Spec(
        name="wise-verified",
        kind="wise",
        scoring="binary",
        description=(
            "WISE Verified (2026 revision): 1000 re-verified world-knowledge prompts in 6 "
            "categories; 0/1 per prompt; overall = 0.4 cultural + 0.12 each of time, space, "
            "biology, physics, chemistry. No licence: evaluation use only."
        ),
        license=_WISE_LICENSE,
        ranges=WISE_VERIFIED_RANGES,
        merged=tuple(f"{f}merge.json" for f in ("", "data_verified/", *_VERIFIED_FOLDERS)),
        files=tuple(
            _wise_file("data_verified", name, sha, *_VERIFIED_FOLDERS)
            for name, sha in (
                (
                    "cultural_common_sense_verified.json",
                    "23482925266e2784b2ba24b75239fdc6691bf85ae253d2c4aa38b71b45fefa89",
                ),
                (
                    "spatio-temporal_reasoning_verified.json",
                    "42c0b9d829365e392c2d4af283850dc76b1f922ab0c79198366de4f306eaf2b6",
                ),
                (
                    "natural_science_verified.json",
                    "6f346c336f16f611e5c73e0fcacdccb336c200d534cf111526b22d50ea912555",
                ),
            )
        ),
    ),
}

# data_verified/merge.json is the union of the three files above; a path to it is accepted.
_KNOWN_SHA256: Final = {f.sha256 for s in _SPECS.values() for f in s.files} | {
    "10f2690624ed8f03f21bd3e9c535e26f791da8bab67ac857903bede65985b82d"  # merge.json
}

_ALIASES: Final = {"wise": "wise-verified"}

BENCHMARKS: Final[Mapping[str, str]] = MappingProxyType(
    {
        **{name: spec.description for name, spec in _SPECS.items()},
        "wise": "Alias of wise-verified.",
    }
)
"""The benchmarks :func:`load_benchmark` knows, with a one-line description each."""


def default_cache_dir() -> Path:
    """Where downloaded benchmark files are cached.

    ``$GENAGENT_CACHE/benchmarks``, else ``$XDG_CACHE_HOME/genagent/benchmarks``, else
    ``~/.cache/genagent/benchmarks``.
    """
    root = os.environ.get("GENAGENT_CACHE")
    if root:
        return Path(root).expanduser() / "benchmarks"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "genagent" / "benchmarks"


# --------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its tasks and its official aggregation rule.

    Attributes:
        name: ``"geneval"``, ``"geneval-long"``, ``"geneval++"``, ``"wise-legacy"``,
            ``"wise-legacy-rewrite"``, ``"wise-verified"`` or ``"custom"``.
        tasks: The prompts as tasks with unique string ids; ``category`` is the GenEval /
            GenEval++ tag or the canonical WISE category (:data:`WISE_CATEGORIES`).
        source: The file (or folder) or official URL the tasks came from.
        sha256: sha256 of the source file; for several files, the sha256 of the lines
            ``"<file sha256>  <file name>"`` (each ending in a newline), sorted.
        scoring: ``"strict"`` (per-prompt 0/1, mean of category means), ``"wiscore"`` (WISE
            legacy weights), ``"binary"`` (WISE Verified weights) or ``"mean"`` (plain mean).
        description: One line about the benchmark.
        license: The licence of the prompt files.
        files: The local files read.
        full_tasks: For a slice (:meth:`subset`, ``limit=``): the whole benchmark's task
            count; ``None`` for a whole benchmark.
        full_categories: For a slice: the whole benchmark's categories, in order.
    """

    name: str
    tasks: list[Task]
    source: str
    sha256: str | None
    scoring: Scoring
    description: str = ""
    license: str = ""
    files: tuple[str, ...] = ()
    full_tasks: int | None = None
    full_categories: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_scoring(self.scoring)
        seen: set[str] = set()
        for task in self.tasks:
            if not task.id:
                raise ConfigurationError(
                    f"benchmark {self.name!r}: every task needs an id; {task.prompt[:60]!r} has "
                    "none"
                )
            if task.id in seen:
                raise ConfigurationError(f"benchmark {self.name!r}: duplicate task id {task.id!r}")
            seen.add(task.id)
        if self.full_tasks is not None and (
            isinstance(self.full_tasks, bool)
            or not isinstance(self.full_tasks, int)
            or self.full_tasks < len(self.tasks)
        ):
            raise ConfigurationError(
                f"benchmark {self.name!r}: full_tasks must be an int >= its {len(self.tasks)} "
                f"tasks, got {self.full_tasks!r}"
            )

    def __len__(self) -> int:
        return len(self.tasks)

    def subset(self, tasks: Sequence[Task]) -> Benchmark:
        """The same benchmark restricted to ``tasks`` (a ``--limit`` or ``--category`` slice).

        The slice remembers the whole benchmark (:attr:`full_tasks`, :attr:`full_categories`,
        kept through a slice of a slice). Its summaries aggregate the slice by the same rule
        over the categories present (WISE weights are renormalised over them), and when it
        holds fewer tasks than the whole benchmark they say so: ``partial=True``,
        ``complete=False`` and a note in the rule text.

        Raises:
            ConfigurationError: If a task is not one of this benchmark's.
        """
        ids = {t.id for t in self.tasks}
        foreign = [t.id for t in tasks if t.id not in ids]
        if foreign:
            raise ConfigurationError(
                f"{len(foreign)} task(s) are not part of benchmark {self.name!r}: {foreign[:3]}"
            )
        return dataclasses.replace(
            self,
            tasks=list(tasks),
            full_tasks=self.full_tasks if self.full_tasks is not None else len(self.tasks),
            full_categories=(
                self.full_categories if self.full_categories is not None else tuple(self.categories)
            ),
        )

    @property
    def is_partial(self) -> bool:
        """Whether this is a slice of fewer tasks than the whole benchmark."""
        return self.full_tasks is not None and len(self.tasks) < self.full_tasks

    @property
    def categories(self) -> list[str]:
        """The categories, in the order they first appear."""
        return list(dict.fromkeys(t.category or _UNCATEGORIZED for t in self.tasks))

    @property
    def rule(self) -> str:
        """The official aggregation rule, in words."""
        return SCORING_RULES.get(self.name, SCORING_RULES[_RULE_OF_SCORING[self.scoring]])

    def summarize(self, scores: Mapping[str, float | None]) -> BenchmarkSummary:
        """The official figure for per-prompt scores.

        Args:
            scores: Task id -> the prompt's score (in [0, 1] for official benchmarks; a
                WiScore for WISE legacy). ``None`` means the judge failed: it counts as 0 in
                the official figure and is reported as a failure. Tasks absent from
                ``scores`` are reported as missing and not scored.

        Raises:
            ConfigurationError: If ``scores`` names a task id the benchmark does not have, or
                a score is not a finite number in [0, 1].
        """
        ids = {t.id for t in self.tasks}
        unknown = [k for k in scores if k not in ids]
        if unknown:
            shown = ", ".join(repr(k) for k in unknown[:5])
            raise ConfigurationError(
                f"{len(unknown)} scored id(s) are not tasks of benchmark {self.name!r} "
                f"({shown}{', ...' if len(unknown) > 5 else ''}); score this benchmark's tasks"
            )
        by_category: dict[str, list[float | None]] = {}
        missing = 0
        for task in self.tasks:
            category = task.category or _UNCATEGORIZED
            by_category.setdefault(category, [])
            if task.id not in scores:
                missing += 1
                continue
            by_category[category].append(scores[task.id or ""])
        # checked here, not in summarize_scores, so that the error names the task
        for task_id, value in scores.items():
            _check_score(self.scoring, f"task {task_id!r}", value)
        summary = summarize_scores(self.scoring, by_category, benchmark=self.name, missing=missing)
        if not self.is_partial:
            return summary
        assert self.full_tasks is not None
        cats = ""
        if self.full_categories is not None and len(self.categories) < len(self.full_categories):
            cats = f", {len(self.categories)} of its {len(self.full_categories)} categories"
        note = (
            f" PARTIAL: a slice of {len(self.tasks)} of {self.full_tasks} prompts{cats}, "
            "aggregated by the rule above; not the official figure."
        )
        return summary.model_copy(
            update={
                "rule": summary.rule + note,
                "complete": False,
                "partial": True,
                "total": self.full_tasks,
            }
        )


# --------------------------------------------------------------------------- loading


def load_benchmark(
    name: str | os.PathLike[str],
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    variant: Literal["original", "rewrite"] = "original",
    mirror: str | None = None,
    timeout_s: float = 30.0,
) -> Benchmark:
    """Load a benchmark by name, from a local copy or the official repository.

    ```py
    from genagent.evals import load_benchmark

    geneval = load_benchmark("geneval", download=True)         # fetched once, then cached
    wise = load_benchmark("wise", "path/to/WISE")              # a checkout of the repository
    mine = load_benchmark("my_prompts.jsonl")                  # same as load_prompts(...)
    ```

    Args:
        name: One of :data:`BENCHMARKS` (``"geneval"``, ``"geneval-long"``, ``"geneval++"``,
            ``"wise"`` = ``"wise-verified"``, ``"wise-legacy"``, ``"wise-legacy-rewrite"``),
            or the path of a custom ``.txt`` / ``.jsonl`` prompt file (:func:`load_prompts`).
        path: A local copy: the benchmark file itself (for WISE, one category file or
            ``merge.json`` also works), or a folder holding it, e.g. a checkout of the official
            repository or a folder of the downloaded files. Takes precedence over the cache and
            ``download``.
        download: Fetch missing files from the official repository at the pinned commit,
            check their sha256 and cache them.
        cache_dir: Where downloads are cached (default: :func:`default_cache_dir`). A cached
            file is used without ``download`` and re-verified on every load.
        limit: Keep only the first ``limit`` tasks (quick runs): a slice, as
            :meth:`Benchmark.subset`, whose summaries are ``partial`` and not ``complete``.
        variant: ``"rewrite"`` loads WISE legacy's rewritten prompts (= ``"wise-legacy-rewrite"``).
        mirror: Base URL that replaces ``https://raw.githubusercontent.com`` (default:
            ``$GENAGENT_BENCHMARK_MIRROR``), e.g. an internal mirror with the same layout.
        timeout_s: Timeout of each download request.

    Raises:
        BenchmarkError: If the files are not available locally (the message gives the URL and
            the licence) or a name is unknown.
        BenchmarkFileError: If a file is malformed or is not the benchmark asked for.
        BenchmarkChecksumError: If a download or cached copy does not match its pinned sha256.
        BenchmarkDownloadError: If the download fails.
    """
    key = os.fspath(name)
    key = _ALIASES.get(key, key)
    if variant not in ("original", "rewrite"):
        raise ConfigurationError(f"variant must be 'original' or 'rewrite', got {variant!r}")
    if variant == "rewrite":
        if key not in ("wise-legacy", "wise-legacy-rewrite"):
            raise ConfigurationError(
                f"variant='rewrite' exists only for WISE legacy ('wise-legacy'), not {key!r}"
            )
        key = "wise-legacy-rewrite"
    _check_limit(limit)
    spec = _SPECS.get(key)
    if spec is None:
        candidate = Path(key).expanduser()
        if candidate.suffix.lower() in (".txt", ".jsonl") and candidate.is_file():
            return load_prompts(candidate, limit=limit)
        raise BenchmarkError(
            f"unknown benchmark {key!r}; known: {sorted(BENCHMARKS)}, or the path of a custom "
            "prompt file (.txt: one prompt per line; .jsonl: objects with a 'prompt')"
        )
    shared = os.environ.get(_DIR_ENV)
    if path is None and shared:
        # a shared folder of benchmark files (a lab's copy), used when it has this benchmark
        try:
            _local_files(spec, Path(shared).expanduser())
        except BenchmarkError:
            logger.info("%s=%s has no %s; trying the cache", _DIR_ENV, shared, spec.name)
        else:
            path = shared
    if path is not None:
        files, source = _local_files(spec, Path(path).expanduser())
        shown_source = source
    else:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        base = mirror if mirror is not None else os.environ.get(_MIRROR_ENV) or None
        files = _cached_files(spec, cache, download=download, mirror=base, timeout_s=timeout_s)
        shown_source = _common_url(spec)
    tasks: list[Task] = []
    for file, _ in files:
        if spec.kind == "geneval":
            tasks.extend(_read_geneval(spec, file))
        else:
            tasks.extend(_read_wise(spec, file))
    if spec.kind == "wise":
        tasks = _dedupe_wise(spec, tasks, [f for f, _ in files])
    if not tasks:
        raise BenchmarkFileError("no prompts in the file", path=files[0][0])
    bench = Benchmark(
        name=spec.name,
        tasks=tasks,
        source=shown_source,
        sha256=_joined_sha(files),
        scoring=spec.scoring,
        description=spec.description,
        license=spec.license,
        files=tuple(str(f) for f, _ in files),
    )
    return bench.subset(tasks[:limit]) if limit is not None else bench


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(f"limit must be a positive int or None, got {limit!r}")


def _common_url(spec: _Spec) -> str:
    urls = [f.url() for f in spec.files]
    if len(urls) == 1:
        return urls[0]
    folders = {url.rsplit("/", 1)[0] for url in urls}
    return folders.pop() + "/" if len(folders) == 1 else ", ".join(urls)


def _joined_sha(files: Sequence[tuple[Path, tuple[str, str]]]) -> str:
    if len(files) == 1:
        return files[0][1][0]
    lines = sorted(f"{sha}  {name}\n" for _, (sha, name) in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _how_to_get(spec: _Spec, cache: Path | None = None) -> str:
    urls = "\n".join(f"  {f.url()}" for f in spec.files)
    where = f" into {cache}" if cache is not None else ""
    return (
        f"Pass path= (a copy of the file(s) or a checkout of https://github.com/{spec.files[0].repo}"
        f"), set {_DIR_ENV} to a folder holding them, or download=True (CLI: --download) to "
        f"fetch{where}, checked by sha256:\n{urls}\n"
        f"Licence: {spec.license}."
    )


def _local_files(spec: _Spec, path: Path) -> tuple[list[tuple[Path, tuple[str, str]]], str]:
    """The local files of ``spec`` under ``path``: (file, (sha256, canonical name))."""
    if path.is_file():
        sha = _sha256_file(path)
        if sha not in _KNOWN_SHA256:
            logger.warning(
                "%s differs from the pinned snapshots of %s (sha256 %s); results may not be "
                "comparable with published figures",
                path,
                spec.name,
                sha[:12],
            )
        return [(path, (sha, path.name))], str(path)
    if not path.is_dir():
        raise BenchmarkError(f"{path} does not exist. {_how_to_get(spec)}")
    found: list[tuple[Path, tuple[str, str]]] = []
    absent: list[str] = []
    for official in spec.files:
        hit = next((path / rel for rel in official.local if (path / rel).is_file()), None)
        if hit is None:
            absent.append(official.basename)
            continue
        sha = _sha256_file(hit)
        if sha != official.sha256:
            logger.warning(
                "%s differs from the pinned snapshot %s@%s (sha256 %s, pinned %s); results may "
                "not be comparable with published figures",
                hit,
                official.repo,
                official.commit[:12],
                sha[:12],
                official.sha256[:12],
            )
        found.append((hit, (sha, official.basename)))
    if absent:
        merged = next((path / rel for rel in spec.merged if (path / rel).is_file()), None)
        if merged is not None:
            return _local_files(spec, merged)
        tried = ", ".join(spec.files[0].local)
        raise BenchmarkError(
            f"{path} has no {' / '.join(absent)} for {spec.name} (looked for e.g. {tried}). "
            f"{_how_to_get(spec)}"
        )
    return found, str(path)


def _cached_files(
    spec: _Spec, cache: Path, *, download: bool, mirror: str | None, timeout_s: float
) -> list[tuple[Path, tuple[str, str]]]:
    found: list[tuple[Path, tuple[str, str]]] = []
    for official in spec.files:
        target = official.cache_path(cache)
        if target.is_file():
            sha = _sha256_file(target)
            if sha == official.sha256:
                found.append((target, (sha, official.basename)))
                continue
            target.unlink()
            if not download:
                raise BenchmarkChecksumError(
                    f"the cached {target} does not match its pinned sha256 (found {sha}, pinned "
                    f"{official.sha256}); it was damaged or edited and has been removed. Load "
                    "again with download=True (CLI: --download) to fetch a fresh copy.",
                    url=official.url(),
                    expected=official.sha256,
                    actual=sha,
                )
        if not download:
            raise BenchmarkError(
                f"{spec.name} is not available locally. {_how_to_get(spec, cache)}"
            )
        _download(official, target, mirror=mirror, timeout_s=timeout_s)
        found.append((target, (official.sha256, official.basename)))
    return found


def _download(
    official: _OfficialFile, target: Path, *, mirror: str | None, timeout_s: float
) -> None:
    """Fetch ``official`` into ``target`` atomically, retrying 5xx / 429 / network errors."""
    import httpx

    from genagent._http import retry_after

    url = official.url(mirror)
    logger.info("downloading %s", url)
    target.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    with httpx.Client(timeout=timeout_s, follow_redirects=True) as client:
        for attempt in range(_ATTEMPTS):
            wait: float | None = None
            try:
                with client.stream("GET", url) as response:
                    if response.status_code >= 500 or response.status_code in (408, 429):
                        last = f"HTTP {response.status_code}"
                        wait = retry_after(response.headers, response.status_code)
                    elif response.status_code != 200:
                        raise BenchmarkDownloadError(
                            f"GET {url} answered HTTP {response.status_code}; check the URL "
                            f"(mirror: {mirror or 'none'}) or fetch the file by hand and pass "
                            "path="
                        )
                    else:
                        _receive(official, url, response, target, timeout_s)
                        return
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < _ATTEMPTS:
                delay = min(wait if wait is not None else _BACKOFF_S * 2**attempt, _MAX_WAIT_S)
                logger.info("retrying %s in %.2fs (%s)", url, delay, last)
                time.sleep(delay)
    raise BenchmarkDownloadError(
        f"GET {url} failed {_ATTEMPTS} times (last: {last}); try again later, set a mirror "
        f"(mirror= or ${_MIRROR_ENV}), or fetch the file by hand and pass path="
    )


def _receive(
    official: _OfficialFile, url: str, response: Any, target: Path, timeout_s: float
) -> None:
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > _MAX_DOWNLOAD_BYTES:
        raise BenchmarkDownloadError(
            f"GET {url} announces {declared} bytes, over the {_MAX_DOWNLOAD_BYTES}-byte cap "
            "for a benchmark file; check the URL or mirror"
        )
    digest = hashlib.sha256()
    size = 0
    deadline = time.monotonic() + _DEADLINE_FACTOR * timeout_s
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, removed on failure
        dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
    )
    temp = Path(handle.name)
    try:
        with handle:
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > _MAX_DOWNLOAD_BYTES:
                    raise BenchmarkDownloadError(
                        f"GET {url} sent more than {_MAX_DOWNLOAD_BYTES} bytes, over the cap "
                        "for a benchmark file; check the URL or mirror"
                    )
                if time.monotonic() > deadline:
                    raise BenchmarkDownloadError(
                        f"GET {url} took over {_DEADLINE_FACTOR * timeout_s:.0f}s (a stalled "
                        "transfer); try again, or fetch the file by hand and pass path="
                    )
                digest.update(chunk)
                handle.write(chunk)
        actual = digest.hexdigest()
        if actual != official.sha256:
            raise BenchmarkChecksumError(
                f"{url} has sha256 {actual}, not the pinned {official.sha256}: the file changed "
                "upstream or in transit (a mirror or proxy serving another version), so it was "
                "not kept. Retry; check the mirror; or fetch the file by hand and pass path= (a "
                "file that differs from the pinned snapshot loads with a warning: published "
                "figures use the snapshot).",
                url=url,
                expected=official.sha256,
                actual=actual,
            )
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- file formats


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BenchmarkFileError(f"cannot be read ({exc.strerror or exc})", path=path) from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # exc.start counts from after a BOM that utf-8-sig dropped
        start = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        raise BenchmarkFileError(
            f"is not UTF-8 text (byte {start} is {data[start : start + 1]!r}); is it the right "
            "file? Save it as UTF-8",
            path=path,
            line=line,
        ) from exc


def _lines(text: str) -> list[str]:
    r"""The lines of ``text``, split at ``"\n"`` only (a trailing ``"\r"`` dropped).

    Not :meth:`str.splitlines`, which also splits at U+2028, U+0085, form feed and others:
    those may sit inside a JSON string or a prompt, and line numbers would stop matching what
    an editor shows.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _lone_surrogate(value: object) -> tuple[str, str] | None:
    r"""(where, the code point) of a lone surrogate in a JSON value's strings.

    ``json`` decodes an escaped half of a surrogate pair (``"\ud83d"``) to a str that cannot
    be written as UTF-8; such a string would fail later, far from the file. Walked without
    recursion, so that deep nesting cannot overflow the stack.
    """
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return where or "the value", f"U+{ord(item[exc.start]):04X}"
        elif isinstance(item, dict):
            for key, child in item.items():
                inner = f"{where}[{key!r}]" if where else repr(key)
                stack.append((f"a key in {where or 'the record'}", key))
                stack.append((inner, child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", child) for i, child in enumerate(item))
    return None


def _too_deep(path: Path, *, line: int | None = None) -> BenchmarkFileError:
    """The error for JSON that ``json`` cannot read without overflowing the stack."""
    return BenchmarkFileError(
        "holds JSON nested too deeply to read (thousands of levels of [ or {); the file is "
        "corrupt or not a prompt file",
        path=path,
        line=line,
    )


def _task(path: Path, *, line: int | None = None, record: int | None = None, **fields: Any) -> Task:
    """A :class:`Task`; a value it refuses is a :class:`BenchmarkFileError` naming the line."""
    try:
        return Task(**fields)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0] if errors else {"loc": (), "msg": str(exc)}
        field_name = ".".join(str(part) for part in first["loc"]) or "the record"
        raise BenchmarkFileError(
            f"has a {field_name!r} that is not valid ({first['msg']})",
            path=path,
            line=line,
            record=record,
        ) from exc


def _check_unicode(
    value: object, path: Path, *, line: int | None = None, record: int | None = None
) -> None:
    found = _lone_surrogate(value)
    if found is not None:
        where, code = found
        raise BenchmarkFileError(
            f"has a lone surrogate {code} in {where} (an escaped half of a UTF-16 pair, "
            "such as \\ud83d without its partner), which is not text; fix or remove it",
            path=path,
            line=line,
            record=record,
        )


def _json_lines(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    text = _read_text(path)
    if not text.strip():
        raise BenchmarkFileError(f"is empty; expected {what}", path=path)
    if text.lstrip().startswith("["):
        raise BenchmarkFileError(
            f"is a JSON array (a WISE file?), not JSON lines; expected {what}", path=path
        )
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise _too_deep(path, line=number) from None
        except ValueError as exc:
            raise BenchmarkFileError(
                f"is not valid JSON ({exc}); the file may be truncated or corrupt: fetch it again",
                path=path,
                line=number,
            ) from exc
        if not isinstance(record, dict):
            raise BenchmarkFileError(
                f"holds {type(record).__name__}, not a JSON object; expected {what}",
                path=path,
                line=number,
            )
        _check_unicode(record, path, line=number)
        records.append((number, record))
    return records


def _read_geneval(spec: _Spec, path: Path) -> list[Task]:
    what = f"{spec.name} records with 'prompt', 'tag' and 'include'"
    other = {"geneval": "geneval++", "geneval-long": "geneval++", "geneval++": "geneval"}
    tasks: list[Task] = []
    for index, (number, record) in enumerate(_json_lines(path, what), 1):
        if "Prompt" in record and "prompt_id" in record:
            raise BenchmarkFileError(
                f"is a WISE record, not {spec.name}; load it with load_benchmark('wise-legacy' "
                "or 'wise-verified', path=...)",
                path=path,
                line=number,
            )
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BenchmarkFileError(
                f"has no 'prompt' (a non-empty string); expected {what}", path=path, line=number
            )
        tag = record.get("tag")
        if tag not in spec.tags:
            hint = ""
            alt = other[spec.name]
            if tag in _SPECS[alt].tags:
                hint = f"; this looks like {alt}: load it with load_benchmark({alt!r}, ...)"
            raise BenchmarkFileError(
                f"has tag {tag!r}, which is not a {spec.name} tag {list(spec.tags)}{hint}",
                path=path,
                line=number,
            )
        include = record.get("include")
        if (
            not isinstance(include, list)
            or not include
            or not all(isinstance(i, dict) and isinstance(i.get("class"), str) for i in include)
        ):
            raise BenchmarkFileError(
                "has no valid 'include' (a non-empty list of objects with a 'class')",
                path=path,
                line=number,
            )
        metadata: dict[str, Any] = {"include": include}
        if "exclude" in record:
            if not isinstance(record["exclude"], list):
                raise BenchmarkFileError(
                    "has an 'exclude' that is not a list", path=path, line=number
                )
            metadata["exclude"] = record["exclude"]
        metadata["benchmark"] = spec.name
        # Echo-4o's GenEval++ evaluator reads image <line>.jpg; GenEval's scripts write the
        # images of record <line> to folder f"{line - 1:05d}".
        metadata["line"] = index
        metadata["index"] = index - 1
        tasks.append(
            _task(
                path, line=number, prompt=prompt, id=f"{index:04d}", category=tag, metadata=metadata
            )
        )
    return tasks


_WISE_RAW_CATEGORY: Final = {
    "cultural knowledge": "cultural",
    "time": "time",
    "space": "space",
    "biology": "biology",
    "ecology": "biology",  # the one "Ecology" record of the legacy rewrite file (id 748)
    "physical knowledge": "physics",
    "physics": "physics",
    "chemistry": "chemistry",
}


def _wise_category(ranges: Mapping[str, tuple[int, int]], prompt_id: int) -> str | None:
    for category, (low, high) in ranges.items():
        if low <= prompt_id <= high:
            return category
    return None


def _read_wise(spec: _Spec, path: Path) -> list[Task]:
    text = _read_text(path)
    if not text.strip():
        raise BenchmarkFileError("is empty; expected a JSON array of WISE records", path=path)
    try:
        data = json.loads(text)
    except RecursionError:
        raise _too_deep(path) from None
    except ValueError as exc:
        hint = " the file may be truncated or corrupt: fetch it again"
        first = _lines(text.lstrip())[0] if text.strip() else ""
        try:
            head = json.loads(first)
        except (ValueError, RecursionError):
            head = None
        if isinstance(head, dict) and "include" in head:
            hint = " it is a GenEval-style JSON-lines file: load it with 'geneval' or 'geneval++'"
        line = getattr(exc, "lineno", None)
        raise BenchmarkFileError(f"is not valid JSON ({exc});{hint}", path=path, line=line) from exc
    if not isinstance(data, list):
        raise BenchmarkFileError(
            f"holds a JSON {type(data).__name__}; a WISE file is a JSON array of records",
            path=path,
        )
    if not data:
        raise BenchmarkFileError("holds no records (an empty JSON array)", path=path)
    tasks: list[Task] = []
    for number, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise BenchmarkFileError(
                f"is {type(record).__name__}, not a WISE record object", path=path, record=number
            )
        missing = [
            key
            for key in ("Prompt", "Explanation", "Category", "Subcategory")
            if not isinstance(record.get(key), str)
        ]
        prompt_id = record.get("prompt_id")
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, int):
            missing.append("prompt_id")
        if missing:
            hint = (
                "; it looks like a GenEval record: load it with 'geneval'"
                if "include" in record
                else ""
            )
            raise BenchmarkFileError(
                f"lacks {missing} (WISE records have 'Prompt', 'Explanation', 'Category', "
                f"'Subcategory' strings and an integer 'prompt_id'){hint}",
                path=path,
                record=number,
            )
        assert isinstance(prompt_id, int)
        _check_unicode(record, path, record=number)
        prompt = record["Prompt"]
        if not prompt.strip():
            raise BenchmarkFileError(
                f"prompt_id {prompt_id} has an empty 'Prompt'", path=path, record=number
            )
        category = _wise_category(spec.ranges, prompt_id)
        if category is None:
            raise BenchmarkFileError(
                f"prompt_id {prompt_id} is outside WISE's 1-1000", path=path, record=number
            )
        raw = record["Category"]
        stated = _WISE_RAW_CATEGORY.get(raw.strip().lower())
        if stated is not None and stated != category:
            other = "wise-verified" if spec.ranges is WISE_LEGACY_RANGES else "wise-legacy"
            raise BenchmarkFileError(
                f"prompt_id {prompt_id} is {raw!r}, but {spec.name}'s prompt_id ranges put it in "
                f"{category!r}: this file belongs to another WISE release; try {other!r}",
                path=path,
                record=number,
            )
        tasks.append(
            _task(
                path,
                record=number,
                prompt=prompt,
                id=str(prompt_id),
                category=category,
                metadata={
                    "explanation": record["Explanation"],
                    "subcategory": record["Subcategory"],
                    "category_raw": raw,
                    "prompt_id": prompt_id,
                    "benchmark": spec.name,
                },
            )
        )
    return tasks


def _dedupe_wise(spec: _Spec, tasks: list[Task], files: Sequence[Path]) -> list[Task]:
    seen: dict[str, Task] = {}
    for task in tasks:
        assert task.id is not None
        if task.id in seen:
            raise BenchmarkFileError(
                f"prompt_id {task.id} appears twice in {spec.name} (files: "
                f"{', '.join(str(f) for f in files)}); each prompt_id must be unique",
                path=files[0] if len(files) == 1 else files[0].parent,
            )
        seen[task.id] = task
    ordered = sorted(seen.values(), key=lambda t: int(t.id or 0))
    return [
        t.model_copy(update={"metadata": {**t.metadata, "index": i}}) for i, t in enumerate(ordered)
    ]


# --------------------------------------------------------------------------- custom prompts

_CUSTOM_KEYS: Final = frozenset({"prompt", "id", "category", "tag"})


def load_prompts(path: str | os.PathLike[str], *, limit: int | None = None) -> Benchmark:
    """Load your own prompts as a ``"custom"`` benchmark (plain-mean scoring).

    * ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
      The id is the 1-based line number, zero-padded (``"0003"``).
    * ``.jsonl``: one JSON object per line with a ``"prompt"``, and optionally ``"id"``
      (default: the line number), ``"category"`` (or ``"tag"``), GenEval-style ``"include"`` /
      ``"exclude"`` (which ``SceneJudge`` scores against) and any other keys, all of which go
      into the task's metadata.

    ```py
    from genagent.evals import load_prompts

    bench = load_prompts("prompts.jsonl")
    print(len(bench.tasks), bench.categories)
    ```

    Args:
        path: The file.
        limit: Keep only the first ``limit`` prompts: a slice, as :meth:`Benchmark.subset`.

    Raises:
        BenchmarkFileError: For an unreadable or empty file, a bad line, a record without a
            prompt, or duplicate ids (naming the file and line).
        BenchmarkError: For a missing file or another extension.
    """
    _check_limit(limit)
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise BenchmarkError(
            f"{file}: custom prompts are a .txt file (one prompt per line) or a .jsonl file "
            "(objects with a 'prompt'); for GenEval / WISE files use load_benchmark(name, path)"
        )
    if not file.is_file():
        raise BenchmarkError(f"{file} does not exist (or is not a file)")
    tasks = _read_txt(file) if suffix == ".txt" else _read_custom_jsonl(file)
    if not tasks:
        raise BenchmarkFileError("holds no prompts", path=file)
    bench = Benchmark(
        name="custom",
        tasks=tasks,
        source=str(file),
        sha256=_sha256_file(file),
        scoring="mean",
        description=f"custom prompts from {file.name}",
        files=(str(file),),
    )
    return bench.subset(tasks[:limit]) if limit is not None else bench


def _width(lines: int) -> int:
    return max(4, len(str(lines)))


def _read_txt(path: Path) -> list[Task]:
    lines = _lines(_read_text(path))
    width = _width(len(lines))
    tasks: list[Task] = []
    for number, line in enumerate(lines, 1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        tasks.append(
            _task(
                path,
                line=number,
                prompt=prompt,
                id=f"{number:0{width}d}",
                metadata={"benchmark": "custom", "line": number, "index": len(tasks)},
            )
        )
    return tasks


def _read_custom_jsonl(path: Path) -> list[Task]:
    what = "objects with a 'prompt'"
    records = _json_lines(path, what)
    width = _width(records[-1][0] if records else 0)
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    for number, record in records:
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            hint = (
                " (a WISE record? use load_benchmark('wise', path))" if "Prompt" in record else ""
            )
            raise BenchmarkFileError(
                f"has no 'prompt' (a non-empty string){hint}", path=path, line=number
            )
        raw_id = record.get("id", f"{number:0{width}d}")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id):
            raise BenchmarkFileError(
                f"has an 'id' that is not a non-empty string or integer: {raw_id!r}",
                path=path,
                line=number,
            )
        task_id = str(raw_id)
        if task_id in seen:
            raise BenchmarkFileError(
                f"repeats id {task_id!r} of line {seen[task_id]}; ids must be unique",
                path=path,
                line=number,
            )
        seen[task_id] = number
        category = record.get("category", record.get("tag"))
        if category is not None and not isinstance(category, str):
            raise BenchmarkFileError(
                f"has a 'category' that is not a string: {category!r}", path=path, line=number
            )
        metadata = {k: v for k, v in record.items() if k not in _CUSTOM_KEYS}
        if "tag" in record:
            metadata["tag"] = record["tag"]
        metadata.setdefault("benchmark", "custom")
        metadata.setdefault("line", number)
        if "index" in metadata:  # "index" is the loader's; the record's own is kept beside it
            metadata["record_index"] = metadata.pop("index")
        metadata["index"] = len(tasks)
        tasks.append(
            _task(
                path, line=number, prompt=prompt, id=task_id, category=category, metadata=metadata
            )
        )
    return tasks
