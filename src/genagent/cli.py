"""The ``genagent`` command line: ``demo``, ``run``, ``eval``, ``train``, ``list``, ``version``.

Tools and policies are chosen by registry name (``--tool scene``, ``--policy heuristic``);
later releases and third-party packages add names through the registries in
:mod:`genagent.registry`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from genagent._eval_cli import eval_command
from genagent._version import __version__
from genagent.errors import GenAgentError

__all__ = ["app", "main"]

app = typer.Typer(
    name="genagent",
    help="Agentic text-to-image generation: a policy that calls image generators, judges, refines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(fn: F) -> F:
    """Turn genagent errors into a one-line message and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GenAgentError as exc:
            line = Text("error: ", style="bold red")
            line.append(f"{type(exc).__name__}: {exc}")  # verbatim: never rich markup
            err_console.print(line, highlight=False, soft_wrap=True)
            trajectory = getattr(exc, "trajectory", None)
            if trajectory is not None:
                err_console.print(
                    f"the partial trajectory has {len(trajectory.turns)} turns and "
                    f"{len(trajectory.images)} images",
                    highlight=False,
                )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@app.command()
@_friendly_errors
def demo(
    tasks: Annotated[int, typer.Option(min=1, help="Number of simulated tasks.")] = 200,
    rounds: Annotated[int, typer.Option(min=1, help="The agent's maximum rounds (images).")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of task sampling and generation.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for the trajectories and summary.json.")] = Path(
        "genagent-demo"
    ),
    save: Annotated[bool, typer.Option(help="Write the trajectories to --out.")] = True,
    concurrency: Annotated[int, typer.Option(min=1, help="Agent runs in flight.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Offline demo (SIMULATOR): single-shot generation against the agent after each round."""
    from genagent.sim.demo import run_demo

    if save and out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")

    if not as_json:
        console.print(
            f"[bold]genagent demo[/] [yellow](SIMULATOR: offline glyph generator, rule-based "
            f"policy and judge; no model weights)[/]\n{tasks} GenEval++-style tasks, "
            f"up to {rounds} rounds, seed {seed}",
            highlight=False,
        )
    report = run_demo(
        tasks,
        rounds=rounds,
        seed=seed,
        out=out if save else None,
        concurrency=concurrency,
        progress=None if not as_json else False,
    )
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
        return
    table = Table(title="Accuracy (SceneJudge, strict: every constraint must hold)")
    table.add_column("")
    table.add_column("accuracy", justify="right")
    table.add_column("95% CI", justify="right")
    for acc in [report.single_shot, report.best_of_n, *report.per_round]:
        table.add_row(
            acc.label, f"{100 * acc.value:.1f}%", f"[{100 * acc.low:.1f}, {100 * acc.high:.1f}]"
        )
    console.print(table)
    console.print(
        f"(best of {rounds}: the generator alone on the raw prompt with {rounds} seeds, counted "
        "correct if any image passes: an oracle picks, an upper bound for best-of-N)",
        highlight=False,
    )
    low, high = report.improvement_ci
    console.print(
        f"Agent after round {rounds} vs single-shot: [bold]{100 * report.improvement:+.1f} "
        f"points[/] (95% CI {100 * low:+.1f} to {100 * high:+.1f}); "
        f"{report.mean_rounds:.2f} images per run on average; "
        + ", ".join(f"{k}: {v}" for k, v in sorted(report.terminations.items())),
        highlight=False,
    )
    cats = Table(title="By category")
    cats.add_column("category")
    cats.add_column("tasks", justify="right")
    cats.add_column("single-shot", justify="right")
    cats.add_column(f"agent (round {rounds})", justify="right")
    for name, (single, final) in report.per_category.items():
        cats.add_row(
            name, str(single.total), f"{100 * single.value:.0f}%", f"{100 * final.value:.0f}%"
        )
    console.print(cats)
    if report.out is not None:
        console.print(
            f"Trajectories: {report.out / 'trajectories'}  summary: {report.out / 'summary.json'}  "
            f"({report.wall_s:.1f} s)",
            highlight=False,
        )


@app.command()
@_friendly_errors
def run(
    prompt: Annotated[str, typer.Argument(help="What to generate.")],
    tool: Annotated[
        str, typer.Option(help="Tool by registry name (see `genagent list`).")
    ] = "scene",
    policy: Annotated[
        str | None,
        typer.Option(
            help="Policy: a registry name, an OpenAI-compatible server URL, or a model id or "
            "folder (default: $GENAGENT_POLICY, else the simulator's with --tool scene, else "
            "the GenAgent weights)."
        ),
    ] = None,
    tool_arg: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE passed to the tool factory (repeatable).")
    ] = None,
    policy_arg: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE passed to the policy factory (repeatable).")
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Maximum images.")] = 3,
    candidates: Annotated[int, typer.Option(min=1, help="Images per tool call.")] = 1,
    judge: Annotated[
        str | None,
        typer.Option(help="Reward (registry name) that picks the best of --candidates images."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed (default: random).")] = None,
    budget: Annotated[float | None, typer.Option(min=0.001, help="Time budget in seconds.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the trajectory (default: genagent-runs/<id>).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the trajectory summary as JSON.")
    ] = False,
) -> None:
    """Run the agent on one prompt and save its trajectory."""
    if out is not None and out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")

    agent = _build_agent(
        tool, tool_arg, policy, policy_arg, rounds=rounds, candidates=candidates, judge=judge,
        budget=budget,
    )  # fmt: skip
    simulated = [
        part["name"]
        for part in _trajectory_parts(agent)
        if isinstance(part, dict) and part.get("simulator")
    ]
    trajectory = agent.run(prompt, seed=seed)
    folder = trajectory.save(out or Path("genagent-runs") / trajectory.id).resolve()
    final = trajectory.final_image_ref
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "simulator": bool(simulated),
                    "id": trajectory.id,
                    "termination": trajectory.termination.value if trajectory.termination else None,
                    "rounds": trajectory.num_rounds,
                    "answer": trajectory.answer,
                    "final_image": str(folder / "images" / final.filename) if final else None,
                    "folder": str(folder),
                }
            )
        )
        return
    if simulated:
        console.print(
            f"[yellow]SIMULATOR[/] ({', '.join(simulated)}): glyph drawings and rule-based "
            "decisions, not real models",
            highlight=False,
        )
    for turn in trajectory.turns:
        console.rule(f"turn {turn.index}", style="dim")
        action = turn.action
        if action is not None:
            if action.thought:
                _labelled("think", "cyan", action.thought)
            if action.judgment:
                _labelled("judge", "magenta", action.judgment)
            if action.tool_call is not None:
                args = json.dumps(action.tool_call.arguments, ensure_ascii=False)
                _labelled("call", "green", f"{action.tool_call.name} {args}")
            if action.answer is not None:
                _labelled("answer", "bold green", action.answer)
        if turn.error is not None:
            _labelled("error", "red", f"{turn.error.type}: {turn.error.message}")
    termination = trajectory.termination.value if trajectory.termination else "?"
    console.print(
        f"\n{termination} after {trajectory.num_rounds} image(s) in {trajectory.wall_s:.2f} s; "
        f"trajectory saved to {folder}",
        highlight=False,
    )
    if final is not None:
        console.print(f"final image: {folder / 'images' / final.filename}", highlight=False)


def _build_agent(
    tool: str,
    tool_arg: list[str] | None,
    policy: str | None,
    policy_arg: list[str] | None,
    *,
    rounds: int,
    candidates: int,
    judge: str | None,
    budget: float | None,
) -> Any:
    """The agent that ``--tool``, ``--policy``, ``--judge`` and their ``--*-arg`` options name."""
    from genagent import registry
    from genagent.agent import Agent
    from genagent.policies import policy_from_spec

    tools = registry.tools.create(tool, **_parse_kv(tool_arg, "--tool-arg"))
    chosen_policy = (
        policy_from_spec(policy, **_parse_kv(policy_arg, "--policy-arg"))
        if policy is not None
        else None
    )
    return Agent(
        tools if isinstance(tools, list) else [tools],
        policy=chosen_policy,
        max_rounds=rounds,
        candidates=candidates,
        judge=registry.rewards.create(judge) if judge is not None else None,
        time_budget_s=budget,
    )


def _trajectory_parts(agent: Any) -> list[Any]:
    """The descriptions of an agent's tools and policy (what trajectories record)."""
    from genagent.policies import describe_policy

    return [*(t.describe() for t in agent.tools.values()), describe_policy(agent.policy)]


def _labelled(label: str, style: str, text: str) -> None:
    """Print model-written text verbatim (never interpreted as rich markup)."""
    line = Text(f"{label:<7}", style=style)
    line.append(text)
    console.print(line, highlight=False)


@app.command()
@_friendly_errors
def serve(
    tool: Annotated[
        str, typer.Option(help="Tool by registry name (see `genagent list`): flux, scene, ...")
    ] = "scene-generate",
    tool_arg: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE passed to the tool factory (repeatable).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port.")] = 8000,
    max_concurrency: Annotated[
        int, typer.Option(min=1, help="Requests run at once (the rest queue).")
    ] = 4,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests allowed to wait; beyond, 429.")
    ] = 64,
    request_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a request may take, queue included.")
    ] = 600.0,
    grace: Annotated[
        float, typer.Option(min=0, help="Seconds in-flight requests get on shutdown.")
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    api_key_env: Annotated[
        str,
        typer.Option(
            help="Environment variable holding the API key clients must send (Authorization: "
            "Bearer); unset or empty: no key required."
        ),
    ] = "GENAGENT_SERVER_API_KEY",
) -> None:
    """Serve a tool over HTTP: POST /generate/ (the GenAgent protocol) and GET /health."""
    import os

    from genagent import registry
    from genagent.server import serve as serve_tool

    made = registry.tools.create(tool, **_parse_kv(tool_arg, "--tool-arg"))
    tools = made if isinstance(made, list) else [made]
    if len(tools) != 1:
        names = ", ".join(t.name for t in tools)
        raise typer.BadParameter(
            f"{tool!r} makes {len(tools)} tools ({names}); serve one per process "
            "(e.g. --tool scene-generate)",
            param_hint="--tool",
        )
    keyed = " (API key required)" if os.environ.get(api_key_env) else ""
    err_console.print(
        f"serving {tools[0].name} ({type(tools[0]).__name__}) on "
        f"http://{host}:{port}/generate/{keyed}",
        highlight=False,
    )
    serve_tool(
        tools[0],
        host=host,
        port=port,
        log_level=log_level,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        grace_s=grace,
        api_key=os.environ.get(api_key_env) or None,
    )


app.command("eval")(_friendly_errors(eval_command))

train_app = typer.Typer(
    name="train",
    help="Fine-tune a policy: supervised fine-tuning (sft) and agentic RL (rl).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(train_app, name="train")


def _training_log_to_stderr() -> None:
    import logging

    training_logger = logging.getLogger("genagent.training")
    if not training_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        training_logger.addHandler(handler)
    training_logger.setLevel(logging.INFO)


@train_app.command("sft")
@_friendly_errors
def train_sft(
    config: Annotated[
        Path,
        typer.Argument(metavar="CONFIG", help="A .toml, .yaml or .json SFT configuration."),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a configuration value (repeatable; dotted keys: lora.r=8).",
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="A checkpoint folder, or 'latest', to resume from."),
    ] = None,
) -> None:
    """Supervised fine-tuning (assistant-only loss) of the model in CONFIG."""
    from genagent.training.config import SFTConfig
    from genagent.training.distributed import end_processes
    from genagent.training.sft import SFTTrainer

    _training_log_to_stderr()
    sft_config = SFTConfig.from_file(config, set_ or [])
    result = SFTTrainer(sft_config, resume_from=resume).train()
    end_processes()
    last = result.losses[max(result.losses)] if result.losses else float("nan")
    console.print(
        f"trained {result.steps} steps (last loss {last:.4f}); saved to {result.final_dir}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@train_app.command("rl")
@_friendly_errors
def train_rl(
    config: Annotated[
        Path,
        typer.Argument(metavar="CONFIG", help="A .toml, .yaml or .json RL configuration."),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a configuration value (repeatable; dotted keys: reward.no_answer=0.5).",
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="A checkpoint folder, or 'latest', to resume from."),
    ] = None,
) -> None:
    """Agentic RL (multi-turn GRPO with resampling and branching) of the model in CONFIG."""
    from genagent.training.distributed import end_processes
    from genagent.training.rl import RLConfig, RLTrainer

    _training_log_to_stderr()
    rl_config = RLConfig.from_file(config, set_ or [])
    result = RLTrainer(rl_config, resume_from=resume).train()
    end_processes()
    last = result.history[-1] if result.history else {}
    console.print(
        f"trained {result.steps} RL steps (last reward mean "
        f"{last.get('reward_mean', float('nan')):.4f}); saved to {result.final_dir}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def report(
    folder: Annotated[
        Path,
        typer.Argument(
            metavar="FOLDER",
            help="A folder of saved runs: an evaluation, `genagent demo --out`, or trajectories.",
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the report (default: FOLDER/report).")
    ] = None,
    title: Annotated[
        str | None, typer.Option(help="Title of the index page (default: the folder's name).")
    ] = None,
    embed: Annotated[
        bool,
        typer.Option(
            "--embed/--no-embed",
            help="Embed images in the pages (self-contained files), or link to the image files.",
        ),
    ] = True,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the index in the default web browser.")
    ] = False,
) -> None:
    """Write an HTML report (an index and a page per run) of the runs saved in FOLDER."""
    from genagent.errors import ConfigurationError, TrajectoryError
    from genagent.evals.report import write_report

    try:
        index = write_report(folder, out, title=title, embed_images=embed)
    except (ConfigurationError, TrajectoryError) as exc:
        # a wrong folder or output is a usage error: exit status 2, like a bad option
        line = Text("error: ", style="bold red")
        line.append(str(exc))  # verbatim: paths may hold rich markup characters
        err_console.print(line, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(str(index), markup=False, highlight=False, soft_wrap=True)
    console.print(index.as_uri(), markup=False, highlight=False, soft_wrap=True)
    if open_browser:
        import webbrowser

        webbrowser.open(index.as_uri())


@app.command("list")
def list_entries() -> None:
    """List the registered tools, policies and judges (rewards)."""
    from genagent import registry

    for title, reg in (
        ("tools", registry.tools),
        ("policies", registry.policies),
        ("judges (rewards)", registry.rewards),
    ):
        table = Table(title=title)
        table.add_column("name")
        table.add_column("description")
        for entry in reg.entries():
            # descriptions are plain text: "FLUX.1 [dev]" is not rich markup
            table.add_row(escape(entry.name), escape(entry.description))
        console.print(table)


@app.command()
def version() -> None:
    """Print the genagent version."""
    console.print(f"genagent {__version__}", highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``genagent`` script."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="genagent")
