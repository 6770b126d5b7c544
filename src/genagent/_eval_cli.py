"""``genagent eval``: the command (registered on the main typer app in ``genagent.cli``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["eval_command", "print_summary"]

console = Console()


def eval_command(
    benchmark: Annotated[
        str,
        typer.Argument(
            help="geneval, geneval-long, geneval++, wise (= wise-verified), wise-legacy, or a "
            "prompt file (.txt / .jsonl)."
        ),
    ],
    tool: Annotated[str, typer.Option(help="Tool by registry name (see `genagent list`).")] = "sim",
    policy: Annotated[
        str | None,
        typer.Option(
            help="Policy: a registry name, an OpenAI-compatible server URL, or a model id or "
            "folder (default as for `genagent run`)."
        ),
    ] = None,
    judge: Annotated[
        str,
        typer.Option(
            help="Reward that scores the images, by registry name (scene, checklist, ...)."
        ),
    ] = "scene",
    path: Annotated[
        Path | None,
        typer.Option(help="The benchmark's file or folder (a copy of the official files)."),
    ] = None,
    download: Annotated[
        bool,
        typer.Option(
            help="Fetch the benchmark from its official repository (pinned, sha256-checked)."
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Evaluation folder; an existing one is resumed (default: "
            "genagent-evals/<benchmark>-<tool>-<policy>-<judge>)."
        ),
    ] = None,
    mode: Annotated[
        str, typer.Option(help="both, agent, or baseline (the generator alone on the raw prompt).")
    ] = "both",
    rounds: Annotated[int, typer.Option(min=1, help="The agent's maximum images.")] = 3,
    candidates: Annotated[int, typer.Option(min=1, help="Images per tool call.")] = 1,
    pick_judge: Annotated[
        str | None,
        typer.Option(help="Reward that picks the best of --candidates images (registry name)."),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Prompts in flight.")] = 8,
    seed: Annotated[int, typer.Option(help="Base seed (prompt i uses seed * 1000003 + i).")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts.")] = None,
    category: Annotated[
        list[str] | None, typer.Option(help="Only these categories / tags (repeatable).")
    ] = None,
    tool_arg: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE passed to the tool factory (repeatable).")
    ] = None,
    policy_arg: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE passed to the policy factory (repeatable).")
    ] = None,
    judge_arg: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE passed to the judge factory (repeatable).")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(min=0.001, help="Time budget per run in seconds.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start again: delete the folder's earlier results.")
    ] = False,
    report: Annotated[bool, typer.Option(help="Also write the HTML report (report/).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    progress: Annotated[
        bool | None, typer.Option(help="Show progress bars (default: on a terminal).")
    ] = None,
) -> None:
    """Evaluate a benchmark: the generator alone and the agent, scored per round by a judge.

    Results are written per prompt as they finish; run the same command again to resume a
    killed evaluation.
    """
    from genagent import registry
    from genagent.cli import _build_agent, _parse_kv
    from genagent.evals import Evaluation, load_benchmark

    modes = {"both": ("baseline", "agent"), "agent": ("agent",), "baseline": ("baseline",)}
    if mode not in modes:
        raise typer.BadParameter("use both, agent or baseline", param_hint="--mode")
    bench = load_benchmark(benchmark, path, download=download)
    if category:
        wanted = set(category)
        known = sorted({t.category or "" for t in bench.tasks})
        missing = wanted.difference(known)
        if missing:
            raise typer.BadParameter(
                f"{', '.join(sorted(missing))} not in {bench.name}; its categories: "
                f"{', '.join(known)}",
                param_hint="--category",
            )
        bench = bench.subset([t for t in bench.tasks if t.category in wanted])
    if limit is not None:
        bench = bench.subset(bench.tasks[:limit])
    agent = _build_agent(
        tool, tool_arg, policy, policy_arg, rounds=rounds, candidates=candidates,
        judge=pick_judge, budget=budget,
    )  # fmt: skip
    scorer = registry.rewards.create(judge, **_parse_kv(judge_arg, "--judge-arg"))
    folder = out or Path("genagent-evals") / _slug(
        f"{bench.name}-{tool}-{_label(policy) if policy else 'default'}-{judge}"
    )
    evaluation = Evaluation(
        bench,
        agent=agent,
        judge=scorer,
        out=folder,
        modes=modes[mode],  # type: ignore[arg-type]
        concurrency=concurrency,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
    )
    result = evaluation.run()
    report_path = None
    if report:
        from genagent.evals.report import write_report

        report_path = write_report(result.out)
    if as_json:
        payload: dict[str, Any] = result.summary.model_dump(mode="json")
        payload["out"] = str(result.out.resolve())
        payload["ran"] = result.ran
        console.print_json(json.dumps(payload))
        return
    simulated = [
        t.get("name")
        for t in evaluation.config()["tools"]
        if isinstance(t, dict) and t.get("simulator")
    ]
    if simulated:
        console.print(
            "[yellow]SIMULATOR[/]: glyph drawings scored by rules, not real models", highlight=False
        )
    print_summary(result.summary)
    resumed = {m: len(result.results[m]) - n for m, n in result.ran.items()}
    if any(resumed.values()):
        console.print(
            "resumed: " + ", ".join(f"{m} {n} from disk" for m, n in resumed.items() if n),
            highlight=False,
        )
    console.print(f"results: {result.out.resolve()}", highlight=False)
    if (result.out / "scaling.png").exists():
        console.print(f"plot:    {(result.out / 'scaling.png').resolve()}", highlight=False)
    if report_path is not None:
        console.print(f"report:  {report_path.resolve()}", highlight=False)


def print_summary(summary: Any) -> None:
    """Print an :class:`~genagent.evals.EvalSummary` as a table: a column per mode and round.

    Rows are the overall figure, then each category, then the judge's failures; columns stay
    few (the generator alone and one per round), so the table fits a terminal.
    """
    columns: list[tuple[str, Any]] = []
    baseline = summary.modes.get("baseline")
    if baseline is not None:
        columns.append(("generator", baseline.final))
    agent = summary.modes.get("agent")
    if agent is not None:
        columns += [(f"agent r{k}", f) for k, f in enumerate(agent.per_round, start=1)]
    categories: list[str] = []
    for _, figures in columns:
        categories += [name for name in figures.per_category if name not in categories]
    table = Table(title=f"{summary.benchmark} ({summary.tasks} prompts)", caption=summary.rule)
    table.add_column("", no_wrap=True)
    for label, _ in columns:
        table.add_column(label, justify="right")
    table.add_row("overall", *(f"{f.overall:.3f}" for _, f in columns), style="bold")
    for name in categories:
        cells = []
        for _, figures in columns:
            cat = figures.per_category.get(name)
            cells.append(f"{cat.mean:.3f}" if cat is not None else "-")
        table.add_row(name, *cells)
    table.add_row("judge failures", *(str(f.failures) for _, f in columns), style="dim")
    console.print(table)
    console.print(
        "generator: the generator alone on the raw prompt; agent rK: the agent's image after "
        "round K",
        style="dim",
    )
    partial = next((f for _, f in columns if f.partial), None)
    if partial is not None:
        console.print(
            f"[yellow]a slice[/] of {partial.n} of {partial.total} prompts: "
            "not the official figure",
            highlight=False,
        )
    if not summary.complete:
        console.print("[yellow]incomplete[/]: some prompts have no result yet; run again to resume")


def _label(spec: str) -> str:
    """A policy spec for a folder name: a URL's host and port only (no credentials, no query)."""
    from urllib.parse import urlsplit

    if "://" not in spec:
        return spec
    parts = urlsplit(spec)
    host = parts.hostname or "server"
    return f"{host}-{parts.port}" if parts.port else host


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")[:120] or "eval"
