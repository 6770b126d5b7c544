"""Evaluate an agent on your own prompts, resume it, and write the HTML report.

Offline: the simulator draws the images and ``SceneJudge`` scores them exactly. For a real
benchmark and real models, swap in ``load_benchmark("geneval++", download=True)``, a diffusers
or remote tool, a VLM policy and a VLM judge such as ``ChecklistJudge(OpenAIPolicy(...))``.

    python examples/evaluate.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from genagent import Agent
from genagent.evals import Evaluation, load_prompts
from genagent.evals.report import write_report
from genagent.sim import HeuristicPolicy, SceneJudge, scene_tools

PROMPTS = """\
# one prompt per line; a .jsonl file can also carry ids, categories and GenEval metadata
a photo of three red apples
a photo of a blue cup left of a green bowl
a photo of two yellow cats and one black dog
a photo of a larger bench above a smaller spoon
"""


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="genagent-eval-"))
    (folder / "prompts.txt").write_text(PROMPTS)
    benchmark = load_prompts(folder / "prompts.txt")
    agent = Agent(tools=scene_tools(), policy=HeuristicPolicy(seed=0), max_rounds=3)

    # run two prompts, as if the evaluation had been stopped half-way ...
    Evaluation(
        benchmark.subset(benchmark.tasks[:2]),
        agent=agent,
        judge=SceneJudge(),
        out=folder / "eval",
        progress=False,
    ).run()
    # ... then the whole file into the same folder: the two done prompts are not run again
    result = Evaluation(
        benchmark, agent=agent, judge=SceneJudge(), out=folder / "eval", progress=False
    ).run()
    print(f"resumed: {len(benchmark.tasks) - result.ran['agent']} prompts read from disk")

    baseline = result.summary.modes["baseline"].final.overall
    print(f"generator alone: {baseline:.2f}")
    for k, figures in enumerate(result.summary.modes["agent"].per_round, start=1):
        print(f"agent after round {k}: {figures.overall:.2f}")
    for run in result.results["agent"]:
        print(f"  {run.score:.0f}  {run.termination:<10} {run.task.prompt}")
    index = write_report(result.out, progress=False)
    print(f"report: {index}")


if __name__ == "__main__":
    main()
