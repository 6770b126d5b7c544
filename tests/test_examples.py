"""Every script in examples/ runs, and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECTED = {
    "custom_tool.py": [
        "class tool: answered 3 images",
        "setup ran: True",
        "@tool: answered (0, 0, 255)",
    ],
    "evaluate.py": [
        "resumed: 2 prompts read from disk",
        "generator alone:",
        "agent after round 3:",
        "report: ",
    ],
    "custom_reward.py": ["candidate scores", "kept #", "final scene score"],
    "hooks_and_batches.py": ["24 runs", "refused calls"],
    "remote_generator.py": [
        "16 runs",
        "requests served by image_generation_tool",
        "server stopped",
    ],
    "local_generator.py": [
        "tiny random FLUX pipeline",
        "answered: 'three red apples left of a blue cup' seeds=[0]",
        "4 runs, 4 tool calls in",
        "same seed, same image: True",
    ],
}


SERVED = {"vllm_policy.py"}  # need a policy server: run against a local one below


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted([*EXPECTED, *SERVED])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", str(EXAMPLES / name)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for text in EXPECTED[name]:
        assert text in result.stdout


def test_vllm_policy_example_runs_against_an_openai_compatible_server(tmp_path: Path) -> None:
    import json

    from ._servers import Recorded, Reply, ScriptedServer

    call = {"name": "image_generation_tool", "arguments": {"caption": "three red apples"}}

    def reply(request: Recorded) -> Reply:
        turns = sum(1 for m in request.body["messages"] if m["role"] == "assistant")
        text = (
            f"<think>Plan.</think><tool_call>{json.dumps(call)}"
            if turns == 0
            else "<judge>Right.</judge><answer>Three red apples.</answer>"
        )
        return Reply(
            {
                "model": "served",
                "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 9},
                "prompt_token_ids": [1, 2, 3],
            }
        )

    with ScriptedServer() as server:
        server.script("GET", "/v1/models", Reply({"data": [{"id": "served"}]}))
        server.always("POST", "/v1/chat/completions", reply)
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "vllm_policy.py"), "three red apples",
             "--base-url", f"{server.url}/v1", "--out", "run"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        requests = list(server.requests)
    assert result.returncode == 0, result.stderr
    assert "answered after 1 image(s)" in result.stdout and "saved to run" in result.stdout
    assert requests[1].body["return_token_ids"] is True
