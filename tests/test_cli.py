"""The ``genagent`` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from genagent import Trajectory


def genagent(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "genagent", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_prints_single_shot_and_per_round_accuracy(tmp_path: Path) -> None:
    result = genagent("demo", "--tasks", "24", "--rounds", "2", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "SIMULATOR" in result.stdout
    for label in ("single-shot", "best of 2", "agent, round 1", "agent, round 2", "95% CI"):
        assert label in result.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["per_round"]) == 2
    assert len(list((tmp_path / "out" / "trajectories").iterdir())) == 24


def test_demo_json_output_is_machine_readable(tmp_path: Path) -> None:
    result = genagent("demo", "--tasks", "8", "--no-save", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tasks"] == 8 and summary["simulator"] is True
    assert not (tmp_path / "genagent-demo").exists()


def test_run_saves_a_trajectory_that_loads(tmp_path: Path) -> None:
    result = genagent(
        "run", "two red apples and a blue cup", "--seed", "3", "--out", "t", "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    trajectory = Trajectory.load(tmp_path / "t")
    assert trajectory.id == info["id"]
    assert Path(info["final_image"]).exists()


def test_run_prints_the_turns_verbatim(tmp_path: Path) -> None:
    result = genagent("run", "a cat", "--seed", "1", "--out", "t", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "image_generation_tool" in result.stdout
    assert "[ok]" in result.stdout  # model text is not swallowed as rich markup


def test_run_passes_tool_arguments_to_the_factory(tmp_path: Path) -> None:
    result = genagent(
        "run", "a cat", "--tool-arg", "size=64", "--seed", "1", "--out", "t", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert Trajectory.load(tmp_path / "t").images[0].width == 64


def test_unknown_tool_is_a_one_line_error_without_traceback(tmp_path: Path) -> None:
    result = genagent("run", "a cat", "--tool", "nope", cwd=tmp_path)
    assert result.returncode == 1
    assert "unknown tool 'nope'" in result.stderr and "scene" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", ["size", "=3"])
def test_malformed_tool_arg_is_rejected(tmp_path: Path, bad: str) -> None:
    result = genagent("run", "a cat", "--tool-arg", bad, cwd=tmp_path)
    assert result.returncode == 2
    assert "KEY=VALUE" in result.stderr


def test_list_and_version(tmp_path: Path) -> None:
    listed = genagent("list", cwd=tmp_path)
    assert listed.returncode == 0 and "heuristic" in listed.stdout and "scene" in listed.stdout
    version = genagent("version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("genagent ")


def test_error_text_is_printed_verbatim_not_as_markup(tmp_path: Path) -> None:
    result = genagent("run", "a cat", "--tool", "[/red]", cwd=tmp_path)
    assert result.returncode == 1
    assert "unknown tool '[/red]'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("size=10", "between 32 and 2048"),
        ("size=abc", "between 32 and 2048"),
        ("bogus=1", "does not take"),
    ],
)
def test_bad_tool_arguments_are_one_line_errors(tmp_path: Path, arg: str, message: str) -> None:
    result = genagent("run", "a cat", "--tool-arg", arg, cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_run_with_candidates_and_a_judge(tmp_path: Path) -> None:
    result = genagent(
        "run",
        "two red apples",
        "--candidates",
        "3",
        "--judge",
        "scene",
        "--seed",
        "2",
        "--out",
        "t",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    trajectory = Trajectory.load(tmp_path / "t")
    first = trajectory.turns[0].tool_result
    assert first is not None and len(first.images) == 3 and first.selected_by == "judge"


def test_empty_prompt_and_an_out_that_is_a_file_are_rejected_up_front(tmp_path: Path) -> None:
    empty = genagent("run", "", cwd=tmp_path)
    assert empty.returncode == 1 and "prompt is empty" in empty.stderr
    (tmp_path / "taken").write_text("x")
    demo = genagent("demo", "--tasks", "200", "--out", "taken", cwd=tmp_path)
    assert demo.returncode == 2 and "not a folder" in demo.stderr


def test_run_labels_the_simulator(tmp_path: Path) -> None:
    text = genagent("run", "a cat", "--seed", "1", "--out", "t", cwd=tmp_path)
    assert text.returncode == 0 and "SIMULATOR" in text.stdout
    data = genagent("run", "a cat", "--seed", "1", "--out", "u", "--json", cwd=tmp_path)
    assert json.loads(data.stdout)["simulator"] is True


def test_run_takes_a_server_url_as_the_policy(tmp_path: Path) -> None:
    from ._servers import Recorded, Reply, ScriptedServer

    call = {"name": "image_generation_tool", "arguments": {"caption": "a red cup"}}

    def reply(request: Recorded) -> Reply:
        done = any(m["role"] == "assistant" for m in request.body["messages"])
        text = (
            "<judge>ok</judge><answer>a red cup</answer>"
            if done
            else (f"<tool_call>{json.dumps(call)}")
        )
        return Reply({"choices": [{"message": {"content": text}, "finish_reason": "stop"}]})

    with ScriptedServer() as server:
        server.script("GET", "/v1/models", Reply({"data": [{"id": "served"}]}))
        server.always("POST", "/v1/chat/completions", reply)
        result = genagent(
            "run", "a red cup", "--policy", f"{server.url}/v1", "--out", "t", "--json",
            cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["termination"] == "answered"
    assert Trajectory.load(tmp_path / "t").metadata["policy"]["model"] == "served"


def test_run_drives_a_local_flux_folder_with_tool_args(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from genagent.testing import tiny_diffusers_pipeline

    from ._servers import Recorded, Reply, ScriptedServer

    folder = tiny_diffusers_pipeline("flux", tmp_path / "flux")
    call = {"name": "image_generation_tool", "arguments": {"caption": "a red cup"}}

    def reply(request: Recorded) -> Reply:
        done = any(m["role"] == "assistant" for m in request.body["messages"])
        text = (
            "<judge>ok</judge><answer>a red cup</answer>"
            if done
            else (f"<tool_call>{json.dumps(call)}")
        )
        return Reply({"choices": [{"message": {"content": text}, "finish_reason": "stop"}]})

    with ScriptedServer() as server:
        server.script("GET", "/v1/models", Reply({"data": [{"id": "served"}]}))
        server.always("POST", "/v1/chat/completions", reply)
        result = genagent(
            "run", "a red cup", "--tool", "flux", "--tool-arg", f"model={json.dumps(str(folder))}",
            "--tool-arg", "width=32", "--tool-arg", "height=32", "--tool-arg", "steps=2",
            "--tool-arg", "max_sequence_length=32", "--tool-arg", 'device="cpu"',
            "--policy", f"{server.url}/v1", "--out", "t", "--json", "--seed", "3",
            cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trajectory = Trajectory.load(tmp_path / "t")
    assert trajectory.termination.value == "answered"
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.metadata["pipeline"] == "FluxPipeline"
    assert trajectory.final_image is not None and trajectory.final_image.size == (32, 32)
    assert trajectory.metadata["tools"][0]["family"] == "flux-dev"
