"""A demonstration that a policy learns, on the CPU: SFT on the simulator's heuristic runs, then RL.

A tiny Qwen2.5-VL (``genagent.testing.tiny_qwen2_5_vl``: the real model class, random weights,
4 layers of width 128, tied embeddings) with a byte-level BPE tokenizer learned from the
training runs and the simulator's vocabulary (``qwen_tokenizer("bpe")``: Qwen2's
pre-tokenization and special tokens, about 1,000 tokens, so that object names are single tokens
as in a real vocabulary) is saved to a folder and loaded back through the real loading paths
(the trainers' loader, ``TransformersPolicy.from_pretrained``). Then:

1. **before SFT**: the random model runs held-out simulator tasks through the real agent;
2. **SFT**: ``SFTTrainer`` (full fine-tuning) on the trajectories ``HeuristicPolicy`` writes for
   training tasks (saved to disk, tokenised from their messages with the chat template);
3. **after SFT**: the same held-out evaluation;
4. **RL**: ``RLTrainer`` (multi-turn GRPO: group rollouts through the real agent with the model
   under training, ``SceneJudge`` as the final reward, reflection accuracy, format penalties);
5. **after RL**: the same held-out evaluation.

Evaluation runs greedy (temperature 0) on tasks that share no prompt with the training tasks.
A reply *parses* when the protocol turned it into an action (``Turn.action`` is set and the turn
has no ``ProtocolError``). The reward is ``SceneJudge`` on the run's final image (0 when the run
made none): ``strict`` (1 when every constraint holds, as GenEval scores) and ``fraction`` (the
share of the task's constraints that hold). Changes between stages are paired per task.

The system prompt is a compact form of GenAgent's (same reply format, same parser, tool
schemas shortened to names and arguments) so that rows stay short on a CPU.

Usage: python benchmarks/training_demo.py [--seed 0] [--quick] [--json] [--workdir DIR]
       [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genagent import Agent
from genagent.protocol import GenAgentProtocol
from genagent.sim import HeuristicPolicy, SceneJudge, sample_tasks, scene_tools
from genagent.sim.demo import wilson_interval
from genagent.tasks import Task
from genagent.tools._base import Tool
from genagent.trajectory import Termination, Trajectory

SYSTEM = (
    "You are GenAgent. You make images by calling tools. Reply with <think> </think>; after an "
    "image, judge it in <judge> </judge>; then call one tool in <tool_call> </tool_call>, or "
    "finish with <answer> </answer>.\n<tools>\n{tools}\n</tools>"
)


class CompactProtocol(GenAgentProtocol):
    """GenAgent's reply format and parser, with a short system prompt (names and arguments)."""

    name = "genagent-compact"

    def __init__(self) -> None:
        super().__init__(system_template=SYSTEM)

    def system_prompt(self, tools: Sequence[Tool]) -> str:
        lines = []
        for tool in tools:
            function = tool.schema()["function"]
            properties = {k: {} for k in function["parameters"].get("properties", {})}
            short = {"name": function["name"], "parameters": {"properties": properties}}
            lines.append(json.dumps({"type": "function", "function": short}))
        return SYSTEM.replace("{tools}", "\n".join(lines))


SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "vocab": 2048,
        "hidden": 128,
        "heads": 4,
        "layers": 4,
        "train_tasks": 2000,
        "eval_tasks": 64,
        "sft_epochs": 4,
        "sft_lr": 3e-3,
        # packs of 1k tokens (about two runs): many small steps learn more per CPU second than
        # few large ones, and the attention fallback on the CPU is quadratic in the pack
        "max_tokens": 1024,
        "rl_steps": 40,
        "rl_tasks_per_step": 4,
        "rl_group": 8,
        "rl_lr": 3e-4,
        "rl_temperature": 0.7,
        "rl_reflection_weight": 0.5,  # RewardWeights' default
        "max_new_tokens": 1024,
    },
    "quick": {
        "vocab": 512,
        "hidden": 64,
        "heads": 2,
        "layers": 2,
        "train_tasks": 12,
        "eval_tasks": 4,
        "sft_epochs": 1,
        "sft_lr": 2e-3,
        "max_tokens": 4096,
        "rl_steps": 1,
        "rl_tasks_per_step": 2,
        "rl_group": 2,
        "rl_lr": 2e-4,
        "rl_temperature": 1.0,
        "rl_reflection_weight": 0.5,
        "max_new_tokens": 48,
    },
}
MAX_ROUNDS = 2
BATCH_WAIT_S = 0.25  # how long the policy waits for a batch's requests (reproducible batches)
MAX_PIXELS = 56 * 56  # a 256x256 simulator image becomes 4 image tokens


def _mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95% interval (t would be wider for tiny n)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = statistics.fmean(values)
    if n < 2:
        return mean, mean, mean
    half = 1.96 * statistics.stdev(values) / math.sqrt(n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def _final_scores(trajectory: Trajectory) -> tuple[float, float]:
    image = trajectory.final_image
    if image is None:
        return 0.0, 0.0
    task = trajectory.task
    from genagent.rewards import RewardContext

    ctx = RewardContext(task=task)
    strict = SceneJudge().score(task.prompt, image, ctx).score
    fraction = SceneJudge(mode="fraction").score(task.prompt, image, ctx).score
    return float(strict or 0.0), float(fraction or 0.0)


def _parsed(turn: Any) -> bool:
    return turn.action is not None and not (turn.error and turn.error.type == "ProtocolError")


def summarize(stage: str, trajectories: Sequence[Trajectory], wall_s: float) -> dict[str, Any]:
    """The evaluation figures of one stage."""
    turns = [t for tr in trajectories for t in tr.turns if not t.interrupted]
    parsed = sum(_parsed(t) for t in turns)
    runs_ok = [all(_parsed(t) for t in tr.turns) and bool(tr.turns) for tr in trajectories]
    scores = [_final_scores(tr) for tr in trajectories]
    strict = [s for s, _ in scores]
    fraction = [f for _, f in scores]
    answered = [tr.termination == Termination.ANSWERED for tr in trajectories]
    lo, hi = wilson_interval(parsed, len(turns))
    rlo, rhi = wilson_interval(sum(runs_ok), len(runs_ok))
    s_mean, s_lo, s_hi = _mean_ci(strict)
    f_mean, f_lo, f_hi = _mean_ci(fraction)
    a_lo, a_hi = wilson_interval(sum(answered), len(answered))
    terminations: dict[str, int] = {}
    for tr in trajectories:
        key = getattr(tr.termination, "value", str(tr.termination))
        terminations[key] = terminations.get(key, 0) + 1
    _log(
        f"{stage}: parsed {parsed}/{len(turns)}, reward strict "
        f"{statistics.fmean(strict or [0]):.3f}, fraction {statistics.fmean(fraction or [0]):.3f}"
        f", {wall_s:.0f} s"
    )
    return {
        "stage": stage,
        "runs": len(trajectories),
        "replies": len(turns),
        "parsed": parsed,
        "parsed_fraction": parsed / len(turns) if turns else 0.0,
        "parsed_ci95": [lo, hi],
        "runs_all_parsed": sum(runs_ok),
        "runs_all_parsed_fraction": sum(runs_ok) / len(runs_ok) if runs_ok else 0.0,
        "runs_all_parsed_ci95": [rlo, rhi],
        "reward_strict": s_mean,
        "reward_strict_ci95": [s_lo, s_hi],
        "reward_fraction": f_mean,
        "reward_fraction_ci95": [f_lo, f_hi],
        "answered": sum(answered),
        "answered_fraction": sum(answered) / len(answered) if answered else 0.0,
        "answered_ci95": [a_lo, a_hi],
        "terminations": terminations,
        "wall_s": round(wall_s, 1),
        "per_run_strict": strict,
        "per_run_fraction": fraction,
    }


def paired_delta(before: dict[str, Any], after: dict[str, Any], key: str) -> dict[str, Any]:
    """Mean per-task change of a reward from one stage to the next, with a paired 95% CI.

    Both stages ran the same held-out tasks in the same order, so the per-task differences are
    paired; the interval is the normal approximation on their mean.
    """
    a, b = before[f"per_run_{key}"], after[f"per_run_{key}"]
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else 0.0
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0
    return {
        "from": before["stage"],
        "to": after["stage"],
        "reward": key,
        "mean": mean,
        "ci95": [mean - half, mean + half],
        "better": sum(d > 0 for d in diffs),
        "worse": sum(d < 0 for d in diffs),
        "same": sum(d == 0 for d in diffs),
    }


def evaluate(model_dir: Path, tasks: list[Task], max_new_tokens: int, seed: int) -> list[Any]:
    """Greedy held-out runs of the checkpoint in ``model_dir`` through the real agent."""
    from genagent.policies import SamplingParams
    from genagent.policies.transformers import TransformersPolicy

    policy = TransformersPolicy.from_pretrained(
        str(model_dir),
        device="cpu",
        dtype="float32",
        max_batch_size=len(tasks),
        batch_wait_s=BATCH_WAIT_S,
    )
    agent = Agent(
        tools=scene_tools(),
        policy=policy,
        protocol=CompactProtocol(),
        max_rounds=MAX_ROUNDS,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
        max_retries=0,  # a reply that does not parse ends the run
        seed=seed,
    )
    try:
        return agent.run_batch(tasks, concurrency=len(tasks), progress=False)
    finally:
        policy.close()


def heuristic_runs(tasks: list[Task], seed: int) -> list[Trajectory]:
    agent = Agent(
        tools=scene_tools(),
        policy=HeuristicPolicy(seed=seed),
        protocol=CompactProtocol(),
        max_rounds=MAX_ROUNDS,
        seed=seed,
    )
    return agent.run_batch(tasks, concurrency=16, progress=False)


def tokenizer_corpus(runs: Sequence[Trajectory]) -> list[str]:
    """Texts to learn the tokenizer's merges from: the teacher's training runs and the vocabulary.

    The training runs' messages (system prompt, requests, replies, tool results), plus every
    class name (singular and plural), colour, size and number word of the simulator, so that
    words of held-out prompts are single tokens too, as in a real vocabulary. Nothing from the
    held-out runs is used.
    """
    from genagent.sim._vocab import CLASSES, COLORS, NUMBER_WORDS, SIZE_WORDS, plural

    texts = [m.text for tr in runs for m in tr.to_messages() if m.text]
    words = [*CLASSES, *(plural(c) for c in CLASSES), *COLORS, *SIZE_WORDS, *NUMBER_WORDS.values()]
    texts += [f"a photo of {w} and {w}" for w in words for _ in range(4)]
    return texts


def split_tasks(n_train: int, n_eval: int, seed: int) -> tuple[list[Task], list[Task]]:
    """Training tasks, and held-out tasks sharing no prompt with them."""
    train = sample_tasks(n_train, seed=seed)
    seen = {t.prompt for t in train}
    held: list[Task] = []
    for task in sample_tasks(n_eval * 3 + 20, seed=seed + 10_000):
        if task.prompt not in seen:
            held.append(task)
            seen.add(task.prompt)
        if len(held) == n_eval:
            break
    return train, held


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from genagent.testing import qwen_tokenizer, tiny_qwen2_5_vl
    from genagent.training.config import SFTConfig
    from genagent.training.rewards import RLReward
    from genagent.training.rl import RLConfig
    from genagent.training.rl_trainer import RLTrainer
    from genagent.training.sft import SFTTrainer

    s = dict(SETTINGS["quick" if args.quick else "full"])
    for item in getattr(args, "set", []):
        key, _, value = item.partition("=")
        if key not in s:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(sorted(s))}")
        try:
            s[key] = type(s[key])(value)
        except ValueError:
            raise SystemExit(
                f"--set {key}={value!r}: {key} takes a {type(s[key]).__name__}"
            ) from None
    torch.manual_seed(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="genagent-training-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages: list[dict[str, Any]] = []
    timings: dict[str, float] = {}

    train_tasks, held_out = split_tasks(s["train_tasks"], s["eval_tasks"], args.seed)

    # SFT data: the heuristic policy's runs on the training tasks, saved as trajectories
    t0 = time.perf_counter()
    data_dir = work / "sft-data"
    runs = heuristic_runs(train_tasks, args.seed)
    for i, trajectory in enumerate(runs):
        trajectory.save(data_dir / f"{i:05d}")
    timings["sft_data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer = qwen_tokenizer("bpe", corpus=tokenizer_corpus(runs), vocab_size=s["vocab"])
    base = tiny_qwen2_5_vl(
        work / "base",
        tokenizer=tokenizer,
        seed=args.seed,
        hidden_size=s["hidden"],
        layers=s["layers"],
        heads=s["heads"],
        tie_word_embeddings=True,
        max_pixels=MAX_PIXELS,
    )
    timings["build_model_s"] = time.perf_counter() - t0

    def evaluate_stage(stage: str, model_dir: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        runs = evaluate(model_dir, held_out, s["max_new_tokens"], args.seed)
        return summarize(stage, runs, time.perf_counter() - t0)

    # the teacher, for reference, on the held-out tasks
    t0 = time.perf_counter()
    teacher = summarize("heuristic teacher", heuristic_runs(held_out, args.seed + 1), 0.0)
    teacher["wall_s"] = round(time.perf_counter() - t0, 1)

    stages.append(evaluate_stage("before SFT", base))

    t0 = time.perf_counter()
    sft_config = SFTConfig(
        model=str(base),
        output_dir=work / "sft",
        trajectories=[str(data_dir)],
        lora=None,
        epochs=s["sft_epochs"],
        lr=s["sft_lr"],
        warmup_steps=5,
        schedule="cosine",
        min_lr_ratio=0.1,
        max_tokens=s["max_tokens"],
        grad_accum=1,
        seed=args.seed,
        log_every=10_000,
        tensorboard=False,
    )
    sft = SFTTrainer(sft_config)
    sft_result = sft.train()
    losses = list(sft_result.losses.values())
    sft_dir = sft_result.final_dir / "model"
    timings["sft_train_s"] = time.perf_counter() - t0
    sft_info = {
        "rows": sft_result.rows,
        "steps": sft_result.steps,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_s": round(timings["sft_train_s"], 1),
    }
    _log(f"SFT: {sft_info}")

    stages.append(evaluate_stage("after SFT", sft_dir))

    # RL: group rollouts through the real agent with the model under training
    t0 = time.perf_counter()
    from genagent.rewards.reflection import ReflectionAccuracy

    rl_config = RLConfig(
        model=str(sft_dir),
        output_dir=work / "rl",
        lora=None,
        max_steps=s["rl_steps"],
        tasks_per_step=s["rl_tasks_per_step"],
        group_size=s["rl_group"],
        max_resample=0,
        lr=s["rl_lr"],
        schedule="constant",
        max_tokens=s["max_tokens"],
        max_rounds=MAX_ROUNDS,
        max_new_tokens=s["max_new_tokens"],
        temperature=s["rl_temperature"],
        concurrency=s["rl_tasks_per_step"] * s["rl_group"],
        seed=args.seed,
        log_every=10_000,
        tensorboard=False,
    )
    from genagent.training.rewards import RewardWeights

    reward = RLReward(
        SceneJudge(mode="fraction"),
        reflection=ReflectionAccuracy(SceneJudge()),
        weights=RewardWeights(reflection=s["rl_reflection_weight"]),
    )
    trainer = RLTrainer(
        rl_config,
        reward=reward,
        tasks=train_tasks,
        policy_kwargs={
            "max_batch_size": s["rl_tasks_per_step"] * s["rl_group"],
            # wait for the step's concurrent requests, so that batches (and their rows'
            # floating-point results) do not depend on how fast the tools answered
            "batch_wait_s": BATCH_WAIT_S,
        },
        # as in the evaluation: the compact prompt, and an unusable reply ends the run
        agent_kwargs={"protocol": CompactProtocol(), "max_retries": 0},
    )
    rl_result = trainer.train()
    rl_dir = rl_result.final_dir / "model"
    timings["rl_train_s"] = time.perf_counter() - t0
    rl_info = {
        "steps": rl_result.steps,
        "reward_mean_per_step": [round(h.get("reward_mean", 0.0), 4) for h in rl_result.history],
        # the unweighted parts: the final image's SceneJudge fraction, reflection accuracy,
        # format penalties (the total is final + rl_reflection_weight * reflection + format)
        **{
            f"reward_{part}_per_step": [
                round(h.get(f"reward_{part}", 0.0), 4) for h in rl_result.history
            ]
            for part in ("final", "reflection", "format")
        },
        "groups_with_signal_per_step": [
            int(h.get("groups_with_signal", 0)) for h in rl_result.history
        ],
        "train_s": round(timings["rl_train_s"], 1),
    }
    _log(f"RL: {rl_info}")

    stages.append(evaluate_stage("after RL", rl_dir))

    return {
        "setting": "quick" if args.quick else "full",
        "seed": args.seed,
        "settings": s,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "train_tasks": len(train_tasks),
        "held_out_tasks": len(held_out),
        "teacher": teacher,
        "stages": stages,
        "changes": [
            paired_delta(stages[i], stages[i + 1], key)
            for i in range(len(stages) - 1)
            for key in ("fraction", "strict")
        ],
        "sft": sft_info,
        "rl": rl_info,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - started, 1),
        "workdir": str(work),
    }


def _log(message: str) -> None:
    print(f"[training_demo] {message}", file=sys.stderr, flush=True)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(report: dict[str, Any]) -> str:
    header = (
        "| stage | replies parsed (95% CI) | runs fully parsed | reward, strict (95% CI) "
        "| reward, fraction (95% CI) | answered | wall |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in [*report["stages"], report["teacher"]]:
        p_lo, p_hi = row["parsed_ci95"]
        s_lo, s_hi = row["reward_strict_ci95"]
        f_lo, f_hi = row["reward_fraction_ci95"]
        lines.append(
            f"| {row['stage']} | {row['parsed']}/{row['replies']} = {_pct(row['parsed_fraction'])}"
            f" ({_pct(p_lo)}-{_pct(p_hi)}) | {row['runs_all_parsed']}/{row['runs']} "
            f"| {row['reward_strict']:.3f} ({s_lo:.3f}-{s_hi:.3f}) "
            f"| {row['reward_fraction']:.3f} ({f_lo:.3f}-{f_hi:.3f}) "
            f"| {row['answered']}/{row['runs']} | {row['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny setting for a smoke test")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--workdir", help="where models and data go (default: a temp folder)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (e.g. --set sft_epochs=2); the report records the settings",
    )
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
        print(
            f"\nSFT: {report['sft']['rows']} rows, {report['sft']['steps']} steps, loss "
            f"{report['sft']['loss_first']:.3f} -> {report['sft']['loss_last']:.3f}, "
            f"{report['sft']['train_s']:.0f} s"
        )
        print(
            f"RL: {report['rl']['steps']} steps, rollout reward per step "
            f"{report['rl']['reward_mean_per_step']}, {report['rl']['train_s']:.0f} s"
        )
        for change in report["changes"]:
            lo, hi = change["ci95"]
            print(
                f"{change['from']} -> {change['to']}, reward {change['reward']}: "
                f"{change['mean']:+.3f} (paired 95% CI {lo:+.3f} to {hi:+.3f}; "
                f"{change['better']} tasks better, {change['worse']} worse, "
                f"{change['same']} the same)"
            )
        print(f"total: {report['total_s']:.0f} s on {report['machine']['platform']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
