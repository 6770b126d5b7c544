"""``genagent eval`` and ``genagent.evals.Evaluation`` end to end, offline (the simulator).

The simulator draws the prompts and ``SceneJudge`` scores them exactly, so the figures are
real measurements of the simulated agent. The benchmark files are read from ../shared (tests
only; they are never copied into the package).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from genagent import (
    Agent,
    ConfigurationError,
    GenerationTool,
    Reward,
    RunError,
    ToolContext,
    ToolResult,
    reward,
)
from genagent.evals import Evaluation, load_benchmark, load_prompts, load_results
from genagent.sim import HeuristicPolicy, SceneJudge, scene_tools

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
GENEVAL_PP = SHARED / "geneval_pp" / "Geneval++.jsonl"
needs_files = pytest.mark.skipif(not GENEVAL_PP.exists(), reason="no ../shared/benchmarks here")


def genagent(*args: str, cwd: Path, **popen: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GENAGENT_BENCHMARKS_DIR": str(SHARED)}
    return subprocess.run(
        [sys.executable, "-m", "genagent", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def sim_agent(rounds: int = 3) -> Agent:
    return Agent(tools=scene_tools(), policy=HeuristicPolicy(seed=0), max_rounds=rounds)


def prompts(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- the CLI


@needs_files
def test_geneval_pp_runs_all_280_prompts_offline_with_baseline_and_rounds(tmp_path: Path) -> None:
    result = genagent(
        "eval", "geneval++", "--tool", "sim", "--policy", "heuristic", "--judge", "scene",
        "--out", "ev", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tasks"] == 280 and summary["complete"] is True
    baseline = summary["modes"]["baseline"]["final"]
    per_round = [r["overall"] for r in summary["modes"]["agent"]["per_round"]]
    assert len(per_round) == 3
    # the official rule: mean of the 7 tag accuracies
    tags = baseline["per_category"]
    assert len(tags) == 7
    assert baseline["overall"] == pytest.approx(sum(t["mean"] for t in tags.values()) / 7)
    # the simulated agent improves on the generator alone, and more rounds do not hurt
    assert per_round[-1] > baseline["overall"] + 0.1
    assert per_round == sorted(per_round)
    out = tmp_path / "ev"
    assert len(list((out / "results" / "agent").glob("*.json"))) == 280
    assert len(list((out / "results" / "baseline").glob("*.json"))) == 280
    assert len(list((out / "trajectories").iterdir())) == 280
    with Image.open(out / "scaling.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    first = json.loads((out / "results" / "agent" / "0001.json").read_text())
    assert first["task"]["metadata"]["include"] and first["rounds"][0]["info"]["judge"]


@needs_files
def test_a_killed_evaluation_resumes_to_exactly_the_uninterrupted_result(tmp_path: Path) -> None:
    args = [
        "eval", "geneval++", "--tool", "sim", "--policy", "heuristic", "--judge", "scene",
        "--concurrency", "2", "--json",
    ]  # fmt: skip
    env = {**os.environ, "GENAGENT_BENCHMARKS_DIR": str(SHARED)}
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "genagent", *args, "--out", str(killed)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    agent_results = killed / "results" / "agent"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if agent_results.is_dir() and len(list(agent_results.glob("*.json"))) >= 20:
            process.send_signal(signal.SIGKILL)  # no chance to clean up
            break
        time.sleep(0.005)
    process.wait(30)
    assert process.returncode == -signal.SIGKILL, "the evaluation finished before it was killed"
    before = len(list(agent_results.glob("*.json")))
    assert 20 <= before < 280
    assert not (killed / "summary.json").exists()

    resumed = genagent(*args, "--out", "killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["complete"] is True and summary["tasks"] == 280
    assert summary["ran"]["agent"] == 280 - before and summary["ran"]["baseline"] == 0
    files = sorted(p.name for p in agent_results.glob("*.json"))
    assert len(files) == 280 == len(set(files))
    assert not [p for p in agent_results.iterdir() if not p.name.endswith(".json")]  # no temp

    whole = genagent(*args, "--out", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    reference = json.loads(whole.stdout)
    # the same seeds draw the same images: resuming changes nothing in the figures
    assert summary["modes"] == reference["modes"]


def test_eval_errors_are_clear(tmp_path: Path) -> None:
    missing = genagent("eval", "geneval++", "--path", "nowhere.jsonl", cwd=tmp_path)
    assert missing.returncode == 1 and "nowhere.jsonl" in missing.stderr
    file = prompts(tmp_path, "a photo of a cat")
    bad_mode = genagent("eval", str(file), "--mode", "sideways", cwd=tmp_path)
    assert bad_mode.returncode == 2 and "--mode" in bad_mode.stderr
    bad_category = genagent("eval", str(file), "--category", "nope", cwd=tmp_path)
    assert bad_category.returncode == 2 and "nope" in bad_category.stderr


# --------------------------------------------------------------------------- the API


def test_a_custom_prompt_file_is_evaluated_and_summarised(tmp_path: Path) -> None:
    file = prompts(tmp_path, "a photo of two red apples", "a photo of a blue cup left of a cat")
    result = Evaluation(
        load_prompts(file),
        agent=sim_agent(),
        judge=SceneJudge(),
        out=tmp_path / "ev",
        progress=False,
    ).run()
    agent = result.results["agent"]
    assert [r.task.prompt for r in agent] == [
        "a photo of two red apples",
        "a photo of a blue cup left of a cat",
    ]
    assert all(len(r.rounds) == 3 and r.trajectory for r in agent)
    assert all(r.image and (tmp_path / "ev" / r.image).exists() for r in result.results["baseline"])
    # the per-round figures are what the results say
    for k in range(3):
        expected = sum((r.rounds[k].score or 0.0) for r in agent) / 2
        assert result.summary.modes["agent"].per_round[k].overall == pytest.approx(expected)
    assert load_results(tmp_path / "ev", "agent")[0].task.prompt == agent[0].task.prompt


def test_resuming_with_other_settings_is_refused_and_overwrite_starts_again(tmp_path: Path) -> None:
    bench = load_prompts(prompts(tmp_path, "a photo of a cat"))
    Evaluation(
        bench, agent=sim_agent(), judge=SceneJudge(), out=tmp_path / "ev", progress=False
    ).run()
    with pytest.raises(ConfigurationError, match=r"other settings.*agent"):
        Evaluation(bench, agent=sim_agent(rounds=2), judge=SceneJudge(), out=tmp_path / "ev").run()
    again = Evaluation(
        bench, agent=sim_agent(rounds=2), judge=SceneJudge(), out=tmp_path / "ev",
        overwrite=True, progress=False,
    ).run()  # fmt: skip
    assert again.ran == {"baseline": 1, "agent": 1}
    assert len(again.results["agent"][0].rounds) == 2


def test_an_unreadable_result_is_run_again_and_the_rest_are_kept(tmp_path: Path) -> None:
    bench = load_prompts(
        prompts(tmp_path, "a photo of a cat", "a photo of a dog", "a photo of a cow")
    )
    first = Evaluation(
        bench, agent=sim_agent(), judge=SceneJudge(), out=tmp_path / "ev", progress=False
    ).run()
    broken = tmp_path / "ev" / "results" / "agent" / f"{first.results['agent'][1].task.id}.json"
    broken.write_text('{"task": ')
    second = Evaluation(
        bench, agent=sim_agent(), judge=SceneJudge(), out=tmp_path / "ev", progress=False
    ).run()
    assert second.ran == {"baseline": 0, "agent": 1}
    assert second.summary.modes == first.summary.modes


class Flaky(Reward):
    """Fails on every image of prompts that mention a dog (an unparseable judge reply)."""

    def score(self, prompt: str, image: Any, ctx: Any = None) -> Any:
        if "dog" in prompt:
            raise ValueError("the judge said something unparseable")
        return 1.0


def test_judge_failures_are_recorded_and_count_as_zero(tmp_path: Path) -> None:
    bench = load_prompts(prompts(tmp_path, "a photo of a cat", "a photo of a dog"))
    result = Evaluation(
        bench, agent=sim_agent(rounds=1), judge=Flaky(), out=tmp_path / "ev", progress=False
    ).run()
    dog = result.results["agent"][1]
    assert dog.score is None and "unparseable" in json.dumps(dog.rounds[0].info)
    final = result.summary.modes["agent"].final
    assert final.failures == 1 and final.overall == pytest.approx(0.5)
    assert result.summary.modes["baseline"].judge_failures == 1


class Broken(GenerationTool):
    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        raise RuntimeError("CUDA out of memory")


def test_a_failing_generator_scores_zero_with_its_reason_and_the_evaluation_goes_on(
    tmp_path: Path,
) -> None:
    bench = load_prompts(prompts(tmp_path, "a photo of a cat"))
    agent = Agent(tool=Broken(), policy=HeuristicPolicy(), max_rounds=2)
    result = Evaluation(
        bench, agent=agent, judge=SceneJudge(), out=tmp_path / "ev", progress=False
    ).run()
    base, run = result.results["baseline"][0], result.results["agent"][0]
    assert base.score == 0.0 and base.error is not None and "out of memory" in base.error["message"]
    assert run.score == 0.0 and run.num_rounds == 0
    assert result.summary.complete


def test_an_evaluation_needs_a_judge_and_modes(tmp_path: Path) -> None:
    bench = load_prompts(prompts(tmp_path, "a photo of a cat"))
    with pytest.raises(ConfigurationError, match="judge"):
        Evaluation(bench, agent=sim_agent(), judge="scene", out=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="modes"):
        Evaluation(bench, agent=sim_agent(), judge=SceneJudge(), out=tmp_path, modes=("x",))  # type: ignore[arg-type]


@needs_files
def test_geneval_prompts_give_a_mean_of_task_means(tmp_path: Path) -> None:
    bench = load_benchmark("geneval", SHARED / "geneval" / "evaluation_metadata.jsonl", limit=None)
    subset = bench.subset([t for t in bench.tasks if t.category in ("counting", "position")][:40])
    result = Evaluation(
        subset, agent=sim_agent(rounds=2), judge=SceneJudge(), out=tmp_path / "ev",
        modes=("baseline",), progress=False,
    ).run()  # fmt: skip
    final = result.summary.modes["baseline"].final
    means = [c.mean for c in final.per_category.values()]
    assert final.overall == pytest.approx(sum(means) / len(means))
    assert "agent" not in result.summary.modes


def test_eval_with_a_vlm_judge_on_a_loopback_openai_server(tmp_path: Path) -> None:
    from ._servers import Recorded, Reply, ScriptedServer

    def judge(request: Recorded) -> Reply:
        text = "".join(
            p["text"] for p in request.body["messages"][0]["content"] if p["type"] == "text"
        )
        statements = [line for line in text.splitlines() if line[:2].strip().rstrip(".").isdigit()]
        answer = "yes" if "cat" in text else "no"  # the cat prompt passes, the cow fails
        items = [
            {"id": k, "answer": answer, "reason": "seen"} for k in range(1, len(statements) + 1)
        ] or [{"id": 1, "answer": answer, "reason": "seen"}]
        message = {"role": "assistant", "content": json.dumps({"items": items})}
        body = {
            "id": "c1",
            "object": "chat.completion",
            "model": "judge-vlm",
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        }
        return Reply(body)

    file = prompts(tmp_path, "a photo of a cat", "a photo of a cow")
    with ScriptedServer() as server:
        server.always("POST", "/v1/chat/completions", judge)
        result = genagent(
            "eval", str(file), "--tool", "sim", "--policy", "heuristic", "--rounds", "1",
            "--judge", "checklist", "--judge-arg", f"policy={server.url}/v1",
            "--judge-arg", "model=judge-vlm", "--out", "ev", "--json", cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["modes"]["agent"]["final"]["overall"] == pytest.approx(0.5)
    assert summary["config"]["judge"]["judge_version"] == "checklist-v1"
    cat = json.loads((tmp_path / "ev" / "results" / "agent" / "0001.json").read_text())
    info = cat["rounds"][0]["info"]
    assert info["judge_model"] == "judge-vlm" and "cat" in info["prompt"] and info["raw"]
    assert len(server.requests) == 4  # two prompts, baseline and agent, one image each


def test_a_vlm_judge_without_a_model_says_how_to_give_one(tmp_path: Path) -> None:
    file = prompts(tmp_path, "a photo of a cat")
    env_free = genagent("eval", str(file), "--judge", "checklist", cwd=tmp_path)
    assert env_free.returncode == 1
    assert "--judge-arg policy=" in env_free.stderr


# --------------------------------------------------------------------------- review fixes


class Down(GenerationTool):
    """A generator whose server is down until ``up`` is set."""

    up = False

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        if not Down.up:
            from genagent import ToolUnavailable

            raise ToolUnavailable("the generator server refused the connection")
        return ToolResult(images=[Image.new("RGB", (16, 16), "red")])


@reward
def always_one(prompt: str, image: Any) -> float:
    return 1.0


def test_failures_outside_the_model_are_run_again_on_resume_and_fail_fast(tmp_path: Path) -> None:
    bench = load_prompts(prompts(tmp_path, *(f"a photo of {n} cats" for n in range(12))))
    Down.up = False
    agent = Agent(tool=Down(), policy=HeuristicPolicy(), max_rounds=1)
    with pytest.raises(RunError, match=r"4 prompts in a row failed.*refused the connection"):
        Evaluation(
            bench, agent=agent, judge=always_one, out=tmp_path / "ev", fail_fast=4,
            concurrency=1, progress=False,
        ).run()  # fmt: skip
    kept = list((tmp_path / "ev" / "results" / "baseline").glob("*.json"))
    assert len(kept) == 4 and all(json.loads(p.read_text())["retry"] for p in kept)
    Down.up = True  # the server is back: the same command finishes, failures run again
    result = Evaluation(
        bench, agent=agent, judge=always_one, out=tmp_path / "ev", progress=False
    ).run()
    assert result.ran == {"baseline": 12, "agent": 12}
    assert result.summary.modes["baseline"].final.overall == 1.0
    assert not any(r.retry for r in result.results["agent"])


def test_a_slice_then_the_whole_benchmark_equals_the_whole_benchmark(tmp_path: Path) -> None:
    lines = [f"a photo of {n} red apples" for n in range(1, 9)]
    bench = load_prompts(prompts(tmp_path, *lines))
    tail = bench.subset(bench.tasks[4:])
    Evaluation(
        tail, agent=sim_agent(), judge=SceneJudge(), out=tmp_path / "a", progress=False
    ).run()
    grown = Evaluation(
        bench, agent=sim_agent(), judge=SceneJudge(), out=tmp_path / "a", progress=False
    ).run()
    whole = Evaluation(
        bench, agent=sim_agent(), judge=SceneJudge(), out=tmp_path / "b", progress=False
    ).run()
    assert grown.ran == {"baseline": 4, "agent": 4}
    assert [r.rounds for r in grown.results["agent"]] == [r.rounds for r in whole.results["agent"]]
    assert grown.summary.modes == whole.summary.modes


@reward
def too_big(prompt: str, image: Any) -> float:
    return 1.5


def test_a_score_out_of_range_is_a_recorded_failure_not_a_crash_at_the_end(
    tmp_path: Path,
) -> None:
    bench = load_benchmark("geneval++", GENEVAL_PP, limit=2) if GENEVAL_PP.exists() else None
    if bench is None:
        pytest.skip("no ../shared/benchmarks here")
    result = Evaluation(
        bench, agent=sim_agent(rounds=1), judge=too_big, out=tmp_path / "ev", progress=False
    ).run()
    first = result.results["agent"][0]
    assert first.score is None and first.rounds[0].info["error"]["type"] == "ScoreOutOfRange"
    assert result.summary.modes["agent"].final.failures == 2


def test_ids_that_collide_once_made_safe_still_get_their_own_files(tmp_path: Path) -> None:
    from genagent.evals.runner import _file_names
    from genagent.tasks import Task

    ids = ["a b", "a_b-c8687a08aa5d", ".hidden", "../x", "con", "A", "a"]
    names = _file_names([Task(prompt="p", id=i) for i in ids])
    assert len({n.lower() for n in names.values()}) == len(ids)
    assert not any(n.startswith(".") or "/" in n for n in names.values())
    assert names["con"].lower() != "con"


def test_two_evaluations_cannot_write_one_folder(tmp_path: Path) -> None:
    from genagent.evals.runner import _exclusive

    (tmp_path / "ev").mkdir()
    with _exclusive(tmp_path / "ev"):
        bench = load_prompts(prompts(tmp_path, "a photo of a cat"))
        with pytest.raises(ConfigurationError, match="another evaluation"):
            Evaluation(bench, agent=sim_agent(), judge=SceneJudge(), out=tmp_path / "ev").run()


def test_judge_failures_count_images_not_rounds(tmp_path: Path) -> None:
    bench = load_prompts(prompts(tmp_path, "a photo of a dog"))
    result = Evaluation(
        bench, agent=sim_agent(rounds=3), judge=Flaky(), out=tmp_path / "ev", progress=False
    ).run()
    run = result.results["agent"][0]
    distinct = {r.image_sha256 for r in run.rounds}
    assert result.summary.modes["agent"].judge_failures == len(distinct)
