"""The evaluation runner behind ``genagent eval``.

An evaluation runs a benchmark's prompts through the generator alone (``baseline``: the raw
prompt, one image) and through the agent (``agent``: up to ``rounds`` images), scores every
round's image with a judge, and aggregates the scores by the benchmark's official rule. The
per-round scores of the agent give the test-time scaling curve.

Everything lands in one folder::

    OUT/config.json                       what was run (no secrets)
    OUT/results/baseline/<task>.json      one file per prompt and mode, written atomically
    OUT/results/agent/<task>.json
    OUT/baseline/<task>.png               the baseline's image
    OUT/trajectories/<task>/              the agent's trajectory (Trajectory.save)
    OUT/summary.json                      the figures; OUT/scaling.png the curve

A result file is written only once its prompt is completely done (its trajectory saved first),
by a rename, so a killed evaluation resumes where it stopped: prompts with a result are skipped,
the others are run again, and no result is lost or counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from genagent._async import gather_or_cancel
from genagent._progress import progress_bar
from genagent._version import __version__
from genagent.errors import ConfigurationError, ModelVisibleError, RunError, ToolExecutionError
from genagent.evals.benchmarks import Benchmark, BenchmarkSummary
from genagent.images import ImageRef, MemoryImageStore, _atomic_write
from genagent.rewards._base import Reward, RewardContext
from genagent.rewards._output import RewardOutput
from genagent.tasks import Task
from genagent.tools._base import Tool, ToolContext, coerce_tool_result

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from genagent.agent import Agent

__all__ = [
    "EvalResult",
    "EvalSummary",
    "Evaluation",
    "ModeSummary",
    "PromptResult",
    "RoundScore",
    "load_results",
    "plot_scaling",
]

logger = logging.getLogger("genagent.evals")

Mode = Literal["baseline", "agent"]
MODES: tuple[Mode, ...] = ("baseline", "agent")
_SEED_STRIDE = 1_000_003


class RoundScore(BaseModel):
    """The judge's score of the image a run had after one round.

    Attributes:
        round: 1-based round.
        score: The judge's score, ``None`` when the judge failed (recorded in ``info``).
        components: The judge's sub-scores (per constraint, per criterion).
        info: The judge's reasons, model, prompt and raw reply.
        image_sha256: The image scored (rounds that kept the same image share it).
    """

    round: int
    score: float | None
    components: dict[str, float | None] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)
    image_sha256: str | None = None


class PromptResult(BaseModel):
    """Everything recorded about one prompt in one mode (``results/<mode>/<task>.json``).

    Attributes:
        task: The prompt and its metadata.
        mode: ``"baseline"`` or ``"agent"``.
        score: The score the benchmark aggregates: the last round's. ``0.0`` when the run made
            no image; ``None`` when the judge failed on it.
        rounds: One score per round (the baseline has one).
        termination: How the agent's run ended (``None`` for the baseline).
        num_rounds: Images the agent made.
        trajectory: The trajectory folder, relative to the evaluation folder (agent).
        image: The image file, relative to the evaluation folder (baseline).
        seed: The run's base seed.
        wall_s: Wall time of the run and its scoring.
        error: The error that ended the run, if any.
        retry: Whether the prompt failed for a reason outside the model's control (the policy or
            generator could not be reached or crashed, the judge's model failed): a resumed
            evaluation runs it again. Refusals, unparseable judge replies and spent budgets are
            outcomes, not retried.
    """

    task: Task
    mode: Mode
    score: float | None
    rounds: list[RoundScore] = Field(default_factory=list)
    termination: str | None = None
    num_rounds: int = 0
    trajectory: str | None = None
    image: str | None = None
    seed: int | None = None
    wall_s: float = 0.0
    error: dict[str, Any] | None = None
    retry: bool = False


class ModeSummary(BaseModel):
    """The figures of one mode.

    Attributes:
        final: The benchmark's aggregate of the final scores.
        per_round: For the agent, the aggregate after each round (the scaling curve).
        terminations: How the runs ended, counted.
        mean_rounds: Mean images per run.
        judge_failures: Images the judge could not score.
    """

    final: BenchmarkSummary
    per_round: list[BenchmarkSummary] = Field(default_factory=list)
    terminations: dict[str, int] = Field(default_factory=dict)
    mean_rounds: float = 0.0
    judge_failures: int = 0


class EvalSummary(BaseModel):
    """``summary.json``: the evaluation's figures.

    Attributes:
        benchmark: The benchmark's name.
        rule: Its official aggregation rule, in words.
        tasks: Prompts in the evaluation.
        complete: Whether every prompt has a result in every mode.
        modes: The figures per mode (``"baseline"``, ``"agent"``).
        config: What was run.
        wall_s: Wall time of this invocation.
    """

    benchmark: str
    rule: str
    tasks: int
    complete: bool
    modes: dict[str, ModeSummary]
    config: dict[str, Any] = Field(default_factory=dict)
    wall_s: float = 0.0


class EvalResult:
    """What :meth:`Evaluation.run` returns: the summary, the results and where they are.

    Attributes:
        summary: The figures.
        results: Per mode, the result of every prompt, in benchmark order.
        out: The evaluation folder.
        ran: Prompts run by this invocation, per mode (the rest were resumed from disk).
    """

    def __init__(
        self,
        summary: EvalSummary,
        results: dict[str, list[PromptResult]],
        out: Path,
        ran: dict[str, int],
    ) -> None:
        self.summary = summary
        self.results = results
        self.out = out
        self.ran = ran

    def __repr__(self) -> str:
        figures = ", ".join(
            f"{mode}={summary.final.overall:.3f}" for mode, summary in self.summary.modes.items()
        )
        return f"EvalResult({self.summary.benchmark}, {figures}, out={str(self.out)!r})"


class Evaluation:
    """Run a benchmark through the generator alone and through the agent, and score it.

    Args:
        benchmark: The prompts and their aggregation rule (:func:`~genagent.evals.load_benchmark`).
        agent: The agent to evaluate. Its tools also serve the baseline: the first tool that
            generates from a caption draws each raw prompt once.
        judge: The reward that scores images (``SceneJudge``, ``ChecklistJudge``,
            ``WiseJudge``, ...). It scores every round's image; its failures are recorded and
            count as 0 in the official figure.
        out: The evaluation folder. An existing one is resumed.
        modes: Which of ``"baseline"`` and ``"agent"`` to run.
        concurrency: Prompts in flight at once.
        seed: Base seed: prompt ``i`` runs with ``seed * 1000003 + i``, so reruns and resumed
            runs draw the same images. The baseline's image uses the seed of the agent's first.
        overwrite: Delete the folder's earlier results instead of resuming them.
        retry_errors: On resuming, run again the prompts that failed for a reason outside the
            model's control (``PromptResult.retry``).
        fail_fast: Stop when this many prompts in a row fail that way (a server that is down,
            a model that does not load): their results are kept and the evaluation resumes once
            the cause is fixed. ``0`` never stops.
        progress: Show a progress bar (default: when standard error is a terminal).

    Raises:
        ConfigurationError: If ``out`` holds an evaluation with other settings (another
            benchmark, judge, seed or agent settings), or the agent has no generation tool for
            the baseline.

    Example:
        ```python
        import tempfile
        from pathlib import Path

        from genagent import Agent
        from genagent.evals import Evaluation, load_prompts
        from genagent.sim import HeuristicPolicy, SceneJudge, scene_tools

        folder = Path(tempfile.mkdtemp())
        (folder / "prompts.txt").write_text("a photo of two red apples")
        agent = Agent(tools=scene_tools(), policy=HeuristicPolicy(), max_rounds=3)
        result = Evaluation(
            load_prompts(folder / "prompts.txt"), agent=agent, judge=SceneJudge(),
            out=folder / "eval", progress=False,
        ).run()
        print(result.summary.modes["agent"].final.overall)
        ```
    """

    def __init__(
        self,
        benchmark: Benchmark,
        *,
        agent: Agent,
        judge: Reward,
        out: str | os.PathLike[str],
        modes: Sequence[Mode] = MODES,
        concurrency: int = 8,
        seed: int = 0,
        overwrite: bool = False,
        retry_errors: bool = True,
        fail_fast: int = 8,
        progress: bool | None = None,
    ) -> None:
        if not isinstance(judge, Reward):
            raise ConfigurationError(
                f"judge must be a Reward (SceneJudge, ChecklistJudge, ...), got {judge!r}"
            )
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise ConfigurationError(f"modes are 'baseline' and/or 'agent', got {list(modes)!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive int, got {concurrency!r}")
        if not benchmark.tasks:
            raise ConfigurationError(f"benchmark {benchmark.name!r} has no prompts")
        self.benchmark = benchmark
        self.agent = agent
        self.judge = judge
        self.out = Path(out)
        self.modes: tuple[Mode, ...] = tuple(m for m in MODES if m in modes)
        self.concurrency = concurrency
        self.seed = seed
        self.overwrite = overwrite
        self.retry_errors = retry_errors
        self.fail_fast = fail_fast
        self.progress = progress
        self.generator: Tool | None = next(
            (t for t in agent.tools.values() if not t.requires_image), None
        )
        if "baseline" in self.modes and self.generator is None:
            raise ConfigurationError(
                "the baseline needs a tool that generates from a caption; the agent has only "
                f"editing tools ({', '.join(agent.tools)}); run with modes=('agent',)"
            )
        # every prompt needs an id: it names the prompt's files and makes resuming possible
        self.tasks: list[Task] = [
            task if task.id is not None else task.model_copy(update={"id": f"{i:05d}"})
            for i, task in enumerate(benchmark.tasks)
        ]
        self._files = _file_names(self.tasks)
        self._cache: dict[str, RewardOutput] = {}

    # ------------------------------------------------------------------ public

    def config(self) -> dict[str, Any]:
        """What is being run, as recorded in ``config.json`` (no secrets)."""
        agent = self.agent.describe()
        return {
            "genagent": __version__,
            "benchmark": {
                "name": self.benchmark.name,
                "source": self.benchmark.source,
                "sha256": self.benchmark.sha256,
                "scoring": self.benchmark.scoring,
                "tasks": len(self.benchmark.tasks),
            },
            "modes": list(self.modes),
            "seed": self.seed,
            "judge": self.judge.describe(),
            "agent": {k: v for k, v in agent.items() if k not in ("hooks",)},
            "tools": [tool.describe() for tool in self.agent.tools.values()],
            "policy": _describe_policy(self.agent),
        }

    def run(self) -> EvalResult:
        """Run (or resume) the evaluation and write its summary."""
        from genagent._async import run_sync

        return run_sync(self._closing())

    async def arun(self) -> EvalResult:
        """Async :meth:`run`."""
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.out):
            return await self._arun(started)

    async def _arun(self, started: float) -> EvalResult:
        self._prepare()
        results: dict[str, dict[str, PromptResult]] = {m: self._load_done(m) for m in self.modes}
        todo = {
            mode: [
                (i, task)
                for i, task in enumerate(self.tasks)
                if task.id not in results[mode]
                or (self.retry_errors and results[mode][task.id or ""].retry)
            ]
            for mode in self.modes
        }
        ran: dict[str, int] = {mode: len(items) for mode, items in todo.items()}
        for mode in self.modes:
            done = len(self.tasks) - len(todo[mode])
            again = sum(1 for _, t in todo[mode] if t.id in results[mode])
            if done or again:
                logger.info(
                    "%s: resuming; %d of %d prompts done, %d that failed run again",
                    mode,
                    done,
                    len(self.tasks),
                    again,
                )
        slots = asyncio.Semaphore(self.concurrency)
        runner = {"baseline": self._baseline, "agent": self._agent}
        for mode in self.modes:
            items = todo[mode]
            label = f"{self.benchmark.name} {mode}"
            # consecutive failures outside the model's control
            streak: list[PromptResult] = []
            with progress_bar(len(items), label, enabled=self.progress) as advance:

                async def one(
                    index: int, task: Task, mode: Mode = mode, streak: list[PromptResult] = streak
                ) -> None:
                    async with slots:
                        result = await runner[mode](index, task)
                    self._write_result(result)
                    results[mode][task.id or ""] = result
                    advance()
                    if not result.retry:
                        streak.clear()
                        return
                    streak.append(result)
                    if self.fail_fast and len(streak) >= self.fail_fast:
                        reason = streak[-1].error or {}
                        raise RunError(
                            f"{len(streak)} prompts in a row failed in {mode} mode, the last "
                            f"with {reason.get('type', 'an error')}: "
                            f"{str(reason.get('message', ''))[:300]}. Their results are kept; "
                            "fix the cause and run the same command again to resume"
                        )

                await _all(one(i, t) for i, t in items)
        summary = self._summarize(results, time.perf_counter() - started)
        _write_json(self.out / "summary.json", summary.model_dump(mode="json"))
        with contextlib.suppress(Exception):  # the plot is a convenience; never fail on it
            plot_scaling(summary, self.out / "scaling.png")
        ordered: dict[str, list[PromptResult]] = {
            mode: [results[mode][t.id or ""] for t in self.tasks] for mode in self.modes
        }
        return EvalResult(summary, ordered, self.out, ran)

    # ------------------------------------------------------------------ running

    async def _closing(self) -> EvalResult:
        try:
            return await self.arun()
        finally:
            await self.agent.aclose()
            close = getattr(self.judge, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def _run_seed(self, index: int, task: Task) -> int:
        """The run's seed, from the task's position in the whole benchmark when it is known.

        So a ``--limit`` or ``--category`` slice draws what the full run draws.
        """
        position = task.metadata.get("index")
        if not isinstance(position, int) or isinstance(position, bool):
            position = index
        return (self.seed * _SEED_STRIDE + position) % 2**32

    async def _baseline(self, index: int, task: Task) -> PromptResult:
        assert self.generator is not None
        started = time.perf_counter()
        run_seed = self._run_seed(index, task)
        image_seed = self.agent.derive_seeds(run_seed, 1, 1)[0]
        name = self._files[task.id or ""]
        relative = f"baseline/{name}.png"
        ctx = ToolContext(run_id=f"baseline-{name}", task=task, round=1, seeds=[image_seed])
        try:
            await self.generator.ensure_setup()
            args = self.generator.parse_args({"caption": task.prompt})
            outcome = coerce_tool_result(await self.generator.invoke(args, ctx))
            if not outcome.images:
                raise ToolExecutionError(f"{self.generator.name} returned no image")
            ref = await asyncio.to_thread(MemoryImageStore().put, outcome.images[0])
        except Exception as exc:
            # the generator failed on the raw prompt: the prompt scores 0, with the reason
            logger.warning(
                "baseline %s: the generator failed: %s: %s", name, type(exc).__name__, exc
            )
            return PromptResult(
                task=task,
                mode="baseline",
                score=0.0,
                rounds=[RoundScore(round=1, score=0.0, info={"error": "no image"})],
                seed=run_seed,
                wall_s=time.perf_counter() - started,
                error={"type": type(exc).__name__, "message": str(exc)},
                retry=not isinstance(exc, ModelVisibleError),  # a refusal is an outcome
            )
        await asyncio.to_thread(_write_bytes, self.out / relative, ref.read_bytes())
        scored = await self._score(task, ref, 1)
        return PromptResult(
            task=task,
            mode="baseline",
            score=scored.score,
            rounds=[_round_score(1, scored, ref)],
            image=relative,
            seed=run_seed,
            wall_s=time.perf_counter() - started,
            retry=_judge_failed_outside(scored),
        )

    async def _agent(self, index: int, task: Task) -> PromptResult:
        started = time.perf_counter()
        run_seed = self._run_seed(index, task)
        name = self._files[task.id or ""]
        try:
            trajectory = await self.agent.arun(task, seed=run_seed)
        except RunError as exc:  # recorded on its partial trajectory
            if exc.trajectory is None:
                raise
            trajectory = exc.trajectory
        last = trajectory.num_rounds
        refs = [trajectory.image_after_round(k) for k in range(1, self.agent.max_rounds + 1)]
        distinct = {ref.sha256: (k, ref) for k, ref in reversed(list(enumerate(refs, 1))) if ref}
        scored = dict(
            zip(
                distinct,
                await gather_or_cancel(
                    [self._score(task, ref, min(k, last)) for k, ref in distinct.values()]
                ),
                strict=True,
            )
        )
        rounds = [
            _round_score(k, scored[ref.sha256], ref)
            if ref is not None
            else RoundScore(round=k, score=0.0, info={"error": "no image yet"})
            for k, ref in enumerate(refs, start=1)
        ]
        final = rounds[-1]
        if trajectory.final_image_ref is not None:
            trajectory.rewards[self.judge.name] = RewardOutput(
                score=final.score, components=final.components, info=final.info
            )
        relative = f"trajectories/{name}"
        folder = self.out / relative
        await asyncio.to_thread(_remove_tree, folder)  # a run again starts from a clean folder
        await asyncio.to_thread(trajectory.save, folder)
        error = trajectory.error
        outside = error is not None and error.type in _OUTSIDE_ERRORS
        return PromptResult(
            task=task,
            mode="agent",
            score=final.score,
            rounds=rounds,
            termination=trajectory.termination.value if trajectory.termination else None,
            num_rounds=trajectory.num_rounds,
            trajectory=relative,
            seed=run_seed,
            wall_s=time.perf_counter() - started,
            error=error.model_dump(mode="json") if error is not None else None,
            retry=outside or any(_judge_failed_outside(o) for o in scored.values()),
        )

    async def _score(self, task: Task, ref: ImageRef, round_: int) -> RewardOutput:
        """The judge's score of an image, once per distinct image of a prompt."""
        key = f"{task.id}:{ref.sha256}"
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        image = await asyncio.to_thread(_open, ref)
        ctx = RewardContext(task=task, round=round_, image_ref=ref)
        output = await self.judge.safe_ascore(task.prompt, image, ctx)
        value = output.score
        if value is not None and self.benchmark.scoring != "mean" and not 0.0 <= value <= 1.0:
            # the benchmark's rule takes scores in [0, 1]: say so now, not at summary time
            output = output.model_copy(
                update={
                    "score": None,
                    "info": {
                        **output.info,
                        "error": {
                            "type": "ScoreOutOfRange",
                            "message": f"{self.judge.name} gave {value!r}; "
                            f"{self.benchmark.name} aggregates scores in [0, 1]",
                        },
                    },
                }
            )
        self._cache[key] = output
        return output

    # ------------------------------------------------------------------ files

    def _prepare(self) -> None:
        config = self.config()
        path = self.out / "config.json"
        if self.overwrite and self.out.exists():
            for sub in ("results", "baseline", "trajectories"):
                _remove_tree(self.out / sub)
            for name in ("summary.json", "scaling.png", "config.json"):
                with contextlib.suppress(FileNotFoundError):
                    (self.out / name).unlink()
        if path.exists():
            try:
                earlier = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigurationError(
                    f"{path} is unreadable ({exc}); use another --out, or --overwrite"
                ) from None
            different = [
                key for key in _IDENTITY if _identity(earlier, key) != _identity(config, key)
            ]
            if different:
                raise ConfigurationError(
                    f"{self.out} holds an evaluation with other settings "
                    f"({', '.join(different)} differ); resume it with the same settings, use "
                    "another --out, or pass --overwrite to start again"
                )
            # the modes may grow: an agent-only evaluation can be extended by a baseline
            config["modes"] = sorted(set(earlier.get("modes", [])) | set(self.modes))
        (self.out / "results").mkdir(parents=True, exist_ok=True)
        _write_json(path, config)

    def _load_done(self, mode: Mode) -> dict[str, PromptResult]:
        """The results already on disk for ``mode``, by task id (unreadable ones are redone)."""
        folder = self.out / "results" / mode
        done: dict[str, PromptResult] = {}
        if not folder.is_dir():
            return done
        for stale in folder.glob(".*.tmp"):  # a write the kill interrupted
            stale.unlink(missing_ok=True)
        wanted = {self._files[t.id or ""]: t for t in self.tasks}
        for path in sorted(folder.glob("*.json")):
            task = wanted.get(path.stem)
            if task is None:
                continue  # not part of this benchmark (another --limit): left alone
            try:
                result = PromptResult.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                logger.warning("%s is unreadable (%s); that prompt is run again", path, exc)
                continue
            if result.task.id != task.id or result.mode != mode:
                logger.warning("%s belongs to another prompt; that prompt is run again", path)
                continue
            done[task.id or ""] = result
        return done

    def _write_result(self, result: PromptResult) -> None:
        name = self._files[result.task.id or ""]
        _write_json(
            self.out / "results" / result.mode / f"{name}.json", result.model_dump(mode="json")
        )

    # ------------------------------------------------------------------ summary

    def _summarize(
        self, results: Mapping[str, Mapping[str, PromptResult]], wall_s: float
    ) -> EvalSummary:
        modes: dict[str, ModeSummary] = {}
        complete = True
        rule = ""
        for mode in self.modes:
            by_id = results[mode]
            complete = complete and len(by_id) == len(self.tasks)
            final = self.benchmark.summarize({k: r.score for k, r in by_id.items()})
            rule = final.rule
            per_round: list[BenchmarkSummary] = []
            if mode == "agent":
                for k in range(1, self.agent.max_rounds + 1):
                    per_round.append(
                        self.benchmark.summarize({tid: _score_at(r, k) for tid, r in by_id.items()})
                    )
            terminations = Counter(r.termination or "none" for r in by_id.values())
            modes[mode] = ModeSummary(
                final=final,
                per_round=per_round,
                terminations=dict(terminations) if mode == "agent" else {},
                mean_rounds=(
                    sum(r.num_rounds for r in by_id.values()) / len(by_id)
                    if by_id and mode == "agent"
                    else (1.0 if by_id else 0.0)
                ),
                judge_failures=sum(
                    len({s.image_sha256 for s in r.rounds if s.score is None})
                    for r in by_id.values()
                ),
            )
        return EvalSummary(
            benchmark=self.benchmark.name,
            rule=rule,
            tasks=len(self.tasks),
            complete=complete,
            modes=modes,
            config=self.config(),
            wall_s=wall_s,
        )


def load_results(folder: str | os.PathLike[str], mode: Mode = "agent") -> list[PromptResult]:
    """Read an evaluation folder's per-prompt results of one mode (in file-name order).

    Raises:
        ConfigurationError: If the folder has no results for ``mode``.
    """
    path = Path(folder) / "results" / mode
    if not path.is_dir():
        raise ConfigurationError(f"{folder} has no {mode} results (no {path})")
    results = []
    for file in sorted(path.glob("*.json")):
        try:
            results.append(PromptResult.model_validate_json(file.read_bytes()))
        except (OSError, ValidationError) as exc:
            raise ConfigurationError(f"{file} is not a readable result: {exc}") from None
    return results


# ---------------------------------------------------------------------------- plot


def plot_scaling(summary: EvalSummary, path: str | os.PathLike[str]) -> Path:
    """Draw the score against rounds (the test-time scaling curve) as a PNG.

    The agent's score after each round is a line with its points; the baseline (the generator
    alone) is a dashed line. Drawn with Pillow, so no plotting library is needed.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = 720, 440
    left, right, top, bottom = 70, 30, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    agent = summary.modes.get("agent")
    baseline = summary.modes.get("baseline")
    points = [s.overall for s in agent.per_round] if agent is not None else []
    rounds = max(1, len(points))
    values = [*points, *([baseline.final.overall] if baseline is not None else [])]
    high = max([1e-9, *values])
    ceiling = 1.0 if high <= 1.0 else float(math.ceil(high))

    def x_of(k: int) -> float:
        inner_left, inner_right = left + 40, width - right - 40  # points clear of the axes
        if rounds == 1:
            return (inner_left + inner_right) / 2
        return inner_left + (k - 1) * (inner_right - inner_left) / (rounds - 1)

    def y_of(v: float) -> float:
        return top + (1 - v / ceiling) * (height - top - bottom)

    for i in range(6):  # grid and y labels
        v = ceiling * i / 5
        y = y_of(v)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{v:.1f}", fill="black", font=font, anchor="rm")
    for k in range(1, rounds + 1):
        draw.text((x_of(k), height - bottom + 10), str(k), fill="black", font=font, anchor="mt")
    draw.text(((width) / 2, height - 22), "round", fill="black", font=font, anchor="mm")
    draw.text(
        (width / 2, 20),
        f"{summary.benchmark}: score by round",
        fill="black",
        font=font,
        anchor="mm",
    )
    draw.line(
        [(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black"
    )
    if baseline is not None:
        y = y_of(baseline.final.overall)
        for x in range(left, width - right, 12):
            draw.line([(x, y), (min(x + 6, width - right), y)], fill=(200, 80, 60), width=2)
        draw.text(
            (width - right, y - 6),
            f"generator alone {baseline.final.overall:.3f}",
            fill=(200, 80, 60),
            font=font,
            anchor="rb",
        )
    if points:
        xy = [(x_of(k), y_of(v)) for k, v in enumerate(points, start=1)]
        if len(xy) > 1:
            draw.line(xy, fill=(40, 80, 200), width=3)
        for (px, py), v in zip(xy, points, strict=True):
            draw.ellipse([(px - 5, py - 5), (px + 5, py + 5)], fill=(40, 80, 200))
            draw.text((px, py - 10), f"{v:.3f}", fill=(40, 80, 200), font=font, anchor="mb")
        draw.text(
            (left + 10, top + 6),
            "agent, after each round",
            fill=(40, 80, 200),
            font=font,
            anchor="lt",
        )
    target = Path(path)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    _write_bytes(target, buffer.getvalue())
    return target


# ---------------------------------------------------------------------------- helpers

_IDENTITY = ("benchmark", "seed", "judge", "agent", "tools", "policy")

# errors that say nothing about the model: the service or the machine failed
_OUTSIDE_ERRORS = frozenset(
    {"PolicyError", "ToolUnavailable", "HookError", "TimeoutError", "ConnectionError", "OSError"}
)


def _judge_failed_outside(output: RewardOutput) -> bool:
    """Whether a judge failure was the judge model's service, not its reply."""
    if output.score is not None:
        return False
    error = output.info.get("error")
    kind = error.get("type") if isinstance(error, Mapping) else None
    return kind in _OUTSIDE_ERRORS


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` for this process: two evaluations must not write one folder.

    An ``flock`` lock: the system releases it when the process dies, even by SIGKILL. On
    systems without ``fcntl`` (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = folder / ".lock"
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigurationError(
                f"{folder} is being written by another evaluation ({holder}); wait for it to "
                "finish or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _identity(config: Mapping[str, Any], key: str) -> Any:
    value = config.get(key)
    if key == "benchmark" and isinstance(value, Mapping):
        # not the number of tasks: a --limit or --category slice may grow into the whole file
        return {k: value.get(k) for k in ("name", "sha256", "scoring")}
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _describe_policy(agent: Agent) -> Any:
    from genagent.policies import describe_policy

    return describe_policy(agent.policy)


def _score_at(result: PromptResult, k: int) -> float | None:
    if not result.rounds:
        return result.score
    return result.rounds[min(k, len(result.rounds)) - 1].score


def _round_score(k: int, output: RewardOutput, ref: ImageRef) -> RoundScore:
    return RoundScore(
        round=k,
        score=output.score,
        components=dict(output.components),
        info=dict(output.info),
        image_sha256=ref.sha256,
    )


def _open(ref: ImageRef) -> PILImage.Image:
    image = ref.open()
    image.load()
    return image


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{n}" for p in ("com", "lpt") for n in range(10)}


def _file_names(tasks: Sequence[Task]) -> dict[str, str]:
    """A file-system-safe, unique name per task id (the id itself when it is already safe).

    Unique without regard to case (case-insensitive file systems), never hidden (no leading
    dot), never a reserved Windows device name.
    """
    names: dict[str, str] = {}
    taken: set[str] = set()
    for index, task in enumerate(tasks):
        key = task.id if task.id is not None else f"{index}"
        if key in names:
            raise ConfigurationError(f"two prompts share the id {key!r}; ids must be unique")
        name = key if key and not _SAFE.search(key) and len(key) <= 80 else ""
        attempt = 0
        while (
            not name
            or name.startswith(".")
            or name.lower() in taken
            or name.split(".")[0].lower() in _RESERVED
        ):
            digest = hashlib.sha256(f"{key}\0{attempt}".encode()).hexdigest()[:12]
            cleaned = _SAFE.sub("_", key).lstrip(".")[:40]
            name = f"{cleaned}-{digest}" if cleaned else digest
            attempt += 1
        taken.add(name.lower())
        names[key] = name
    return names


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)


def _write_json(path: Path, data: Any) -> None:
    _write_bytes(path, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


async def _all(coros: Any) -> None:
    """Run coroutines concurrently; the first failure cancels the rest and is raised."""
    from genagent._async import gather_or_cancel

    await gather_or_cancel(list(coros))
