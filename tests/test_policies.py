"""The policy test doubles shipped with the package."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from genagent import Agent, FunctionPolicy, Message, PolicyError, ScriptedPolicy, Termination
from genagent.sim import SceneTool

GEN = (
    '<think>Draw.</think><tool_call>{"name": "image_generation_tool", "arguments": '
    '{"caption": "a red cup"}}</tool_call>'
)
ANSWER = "<judge>Right.</judge><answer>A red cup.</answer>"


async def test_scripted_policy_cuts_replies_at_stop_sequences() -> None:
    out = await ScriptedPolicy([GEN]).generate([Message.user("x")], stop=["</tool_call>"])
    assert out.text.endswith("}}") and out.stop == "</tool_call>"


def test_one_scripted_policy_serves_concurrent_runs_each_from_the_start() -> None:
    policy = ScriptedPolicy([GEN, ANSWER])
    runs = Agent(SceneTool(), policy=policy).run_batch(["a red cup"] * 8, concurrency=8)
    assert [r.termination for r in runs] == [Termination.ANSWERED] * 8
    assert len(policy.calls) == 16


def test_scripted_policy_says_when_a_conversation_outgrows_the_script() -> None:
    with pytest.raises(PolicyError, match="turn 2 of the conversation"):
        Agent(SceneTool(), policy=ScriptedPolicy([GEN])).run("a red cup")


def test_cycle_repeats_the_script() -> None:
    trajectory = Agent(SceneTool(), policy=ScriptedPolicy([GEN], cycle=True), max_rounds=3).run(
        "a red cup"
    )
    assert trajectory.termination is Termination.MAX_ROUNDS and trajectory.num_rounds == 3


async def test_function_policy_accepts_sync_and_async_functions() -> None:
    async def later(messages: Any, stop: Any, sampling: Any) -> str:
        await asyncio.sleep(0)
        return ANSWER

    assert (await FunctionPolicy(lambda *a: "hi").generate([])).text == "hi"
    assert (await FunctionPolicy(later).generate([])).text.endswith("</answer>")


async def test_function_policy_rejects_other_return_types() -> None:
    with pytest.raises(PolicyError, match="return a str or a PolicyOutput"):
        await FunctionPolicy(lambda *a: 42).generate([])
