"""The offline demo: single-shot generation against the agent, round by round (SIMULATOR).

``run_demo`` samples GenEval++-style tasks, generates each raw prompt once with ``SceneTool``
(the paper's baseline: the generator alone), runs the agent (``HeuristicPolicy`` with
``SceneTool`` and ``SceneEditTool``) for up to ``rounds`` images, and scores everything with
``SceneJudge``. Accuracy after round k is that of the image the run would have ended with had
it stopped after k rounds (the test-time scaling curve). A compute-matched baseline,
``best_of_n``, draws the raw prompt with ``rounds`` seeds and counts a task correct if any image
passes: best-of-N with a perfect verifier, an upper bound on what picking among N raw draws
achieves.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genagent._progress import progress_bar
from genagent.agent import Agent
from genagent.rewards._base import RewardContext
from genagent.sim.judge import SceneJudge
from genagent.sim.policy import HeuristicPolicy
from genagent.sim.tasks import sample_tasks
from genagent.sim.tools import SceneTool, scene_tools
from genagent.tasks import Task
from genagent.trajectory import Trajectory

__all__ = ["Accuracy", "DemoReport", "run_demo", "wilson_interval"]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its 95% Wilson interval.

    Attributes:
        label: What was measured ("single-shot", "agent, round 2").
        correct: Tasks judged correct.
        total: Tasks.
        low: Lower bound of the 95% interval.
        high: Upper bound.
    """

    label: str
    correct: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        """The accuracy."""
        return self.correct / self.total if self.total else 0.0

    @classmethod
    def of(cls, label: str, outcomes: Sequence[bool]) -> Accuracy:
        """Accuracy of a list of outcomes."""
        correct = sum(outcomes)
        low, high = wilson_interval(correct, len(outcomes))
        return cls(label, correct, len(outcomes), low, high)


@dataclass
class DemoReport:
    """Results of :func:`run_demo`.

    Attributes:
        tasks: Number of tasks.
        rounds: Maximum rounds of the agent.
        seed: Sampling seed.
        single_shot: Accuracy of the generator alone on the raw prompt.
        per_round: Agent accuracy after each round (1..rounds).
        best_of_n: The generator alone on the raw prompt with ``rounds`` seeds (those of the
            agent's rounds 1..rounds), correct if ANY image passes the judge: an oracle picks,
            so this is an upper bound on best-of-N with a perfect verifier.
        improvement: Agent accuracy after the last round minus single-shot.
        improvement_ci: 95% interval of that difference (paired, normal approximation).
        per_category: ``{category: (single-shot, agent final)}`` accuracies.
        terminations: How runs ended.
        mean_rounds: Mean images per run.
        wall_s: Wall time.
        out: Where trajectories were written, if anywhere.
        trajectories: The agent's trajectories.
    """

    tasks: int
    rounds: int
    seed: int
    single_shot: Accuracy
    per_round: list[Accuracy]
    best_of_n: Accuracy
    improvement: float
    improvement_ci: tuple[float, float]
    per_category: dict[str, tuple[Accuracy, Accuracy]]
    terminations: dict[str, int]
    mean_rounds: float
    wall_s: float
    out: Path | None = None
    trajectories: list[Trajectory] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the trajectories)."""
        return {
            "simulator": True,
            "tasks": self.tasks,
            "rounds": self.rounds,
            "seed": self.seed,
            "single_shot": _acc_dict(self.single_shot),
            "per_round": [_acc_dict(a) for a in self.per_round],
            "best_of_n": _acc_dict(self.best_of_n),
            "improvement": self.improvement,
            "improvement_ci": list(self.improvement_ci),
            "per_category": {
                k: {"single_shot": _acc_dict(a), "agent": _acc_dict(b)}
                for k, (a, b) in self.per_category.items()
            },
            "terminations": self.terminations,
            "mean_rounds": self.mean_rounds,
            "wall_s": self.wall_s,
        }


def _acc_dict(a: Accuracy) -> dict[str, Any]:
    return {**asdict(a), "value": a.value}


def run_demo(
    tasks: int = 200,
    *,
    rounds: int = 3,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    concurrency: int = 8,
    progress: bool | None = None,
    error_scale: float = 1.0,
) -> DemoReport:
    """Run the offline comparison (SIMULATOR) and optionally write every trajectory.

    Args:
        tasks: Number of sampled tasks.
        rounds: The agent's ``max_rounds``.
        seed: Seed of task sampling and generation.
        out: Folder for ``trajectories/<n>-<task id>/`` and ``summary.json`` (``None``: none).
        concurrency: Agent runs in flight.
        progress: Show progress bars (default: when standard error is a terminal).
        error_scale: Multiplies the simulated generator's mistake probabilities.
    """
    started = time.perf_counter()
    task_list = sample_tasks(tasks, seed)
    judge = SceneJudge()
    generator = SceneTool(error_scale=error_scale)
    agent = Agent(
        tools=scene_tools(error_scale=error_scale),
        policy=HeuristicPolicy(seed=seed),
        max_rounds=rounds,
        rewards={"scene_judge": judge},
    )
    run_seeds = [seed * 1_000_003 + i for i in range(tasks)]

    baseline: list[bool] = []
    best_of_n: list[bool] = []
    with progress_bar(tasks, "single-shot", enabled=progress) as advance:
        for task, run_seed in zip(task_list, run_seeds, strict=True):
            # Round k of the baseline uses the seed of the agent's k-th image. Draws are seeded
            # on (caption, seed), so the agent's captions still draw independently of these.
            outcomes = [
                _judge_bytes(
                    judge,
                    task,
                    generator.generate(task.prompt, agent.derive_seeds(run_seed, k, 1)[0]),
                )
                for k in range(1, rounds + 1)
            ]
            baseline.append(outcomes[0])
            best_of_n.append(any(outcomes))  # an oracle picks: an upper bound on best-of-N
            advance()

    trajectories = agent.run_batch(
        task_list, seeds=run_seeds, concurrency=concurrency, progress=progress
    )
    per_round_outcomes: list[list[bool]] = [[] for _ in range(rounds)]
    for task, trajectory in zip(task_list, trajectories, strict=True):
        for k in range(1, rounds + 1):
            ref = trajectory.image_after_round(k)
            per_round_outcomes[k - 1].append(
                ref is not None and _judge_bytes(judge, task, ref.read_bytes())
            )
    final = per_round_outcomes[-1]
    diffs = [int(a) - int(b) for a, b in zip(final, baseline, strict=True)]
    mean = sum(diffs) / len(diffs) if diffs else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else 0.0
    half = 1.96 * math.sqrt(var / len(diffs)) if diffs else 0.0

    by_category: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(task_list):
        by_category[task.category or "uncategorised"].append(i)
    terminations: dict[str, int] = defaultdict(int)
    for trajectory in trajectories:
        terminations[trajectory.termination.value if trajectory.termination else "none"] += 1

    report = DemoReport(
        tasks=tasks,
        rounds=rounds,
        seed=seed,
        single_shot=Accuracy.of("single-shot", baseline),
        per_round=[
            Accuracy.of(f"agent, round {k + 1}", outcomes)
            for k, outcomes in enumerate(per_round_outcomes)
        ],
        best_of_n=Accuracy.of(f"best of {rounds}, raw prompt (oracle pick)", best_of_n),
        improvement=mean,
        improvement_ci=(mean - half, mean + half),
        per_category={
            cat: (
                Accuracy.of("single-shot", [baseline[i] for i in idx]),
                Accuracy.of("agent", [final[i] for i in idx]),
            )
            for cat, idx in sorted(by_category.items())
        },
        terminations=dict(terminations),
        mean_rounds=sum(t.num_rounds for t in trajectories) / max(1, len(trajectories)),
        wall_s=0.0,
        trajectories=trajectories,
    )
    if out is not None:
        report.out = _write(Path(out), task_list, trajectories, progress)
    report.wall_s = time.perf_counter() - started
    if report.out is not None:
        (report.out / "summary.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _judge_bytes(judge: SceneJudge, task: Task, data: bytes) -> bool:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    return judge.score(task.prompt, image, RewardContext(task=task)).score == 1.0


def _write(
    root: Path, tasks: Sequence[Task], trajectories: Sequence[Trajectory], progress: bool | None
) -> Path:
    folder = root / "trajectories"
    with progress_bar(len(trajectories), "saving", enabled=progress) as advance:
        for i, (task, trajectory) in enumerate(zip(tasks, trajectories, strict=True)):
            trajectory.save(folder / f"{i:05d}-{task.id}")
            advance()
    return root
