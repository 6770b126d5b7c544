"""Lifecycle hooks: order, replacements, chaining, errors and progress."""

from __future__ import annotations

import json
from typing import Any

import pytest
from PIL import Image

from genagent import (
    Agent,
    GenAgentError,
    GenerationTool,
    HookError,
    Hooks,
    Message,
    PolicyOutput,
    RunContext,
    RunError,
    ScriptedPolicy,
    Termination,
    ToolCall,
    ToolContext,
    ToolProgress,
    ToolRefused,
    ToolResult,
    ToolUnavailable,
    Trajectory,
    Turn,
)


def generate(caption: str) -> str:
    payload = json.dumps({"name": "image_generation_tool", "arguments": {"caption": caption}})
    return f"<think>I will draw it.</think>\n<tool_call>\n{payload}\n</tool_call>"


def answer() -> str:
    return "<judge>It matches.</judge>\n<answer>Done.</answer>"


def solid(colour: str) -> Image.Image:
    return Image.new("RGB", (16, 16), colour)


class Paint(GenerationTool):
    def __init__(self) -> None:
        self.captions: list[str] = []

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        self.captions.append(args.caption)
        return ToolResult(images=[solid(args.caption.split()[0])])


def run(hooks: Any, replies: list[str] | None = None, tool: Any = None, **kwargs: Any) -> Any:
    policy = ScriptedPolicy(replies if replies is not None else [generate("red"), answer()])
    agent = Agent(tool or Paint(), policy=policy, hooks=hooks, **kwargs)
    return agent.run("a red square", seed=0), policy


class Recording(Hooks):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.errors: list[GenAgentError] = []

    async def on_run_start(self, ctx: RunContext) -> None:
        self.events.append("on_run_start")

    async def before_policy(self, ctx: RunContext, messages: list[Message]) -> None:
        self.events.append("before_policy")

    async def after_policy(self, ctx: RunContext, output: PolicyOutput) -> None:
        self.events.append("after_policy")

    async def before_tool(self, ctx: RunContext, call: ToolCall) -> None:
        self.events.append("before_tool")

    async def after_tool(self, ctx: RunContext, call: ToolCall, result: ToolResult) -> None:
        self.events.append("after_tool")

    async def on_turn_end(self, ctx: RunContext, turn: Turn) -> None:
        self.events.append("on_turn_end")

    async def on_run_end(self, ctx: RunContext, trajectory: Trajectory) -> None:
        self.events.append(f"on_run_end:{trajectory.termination.value}")  # type: ignore[union-attr]

    async def on_error(self, ctx: RunContext, error: GenAgentError) -> None:
        self.events.append("on_error")
        self.errors.append(error)


# --------------------------------------------------------------------------- order


def test_hooks_see_every_step_in_order() -> None:
    recording = Recording()
    run(recording)
    assert recording.events == [
        "on_run_start",
        "before_policy",
        "after_policy",
        "before_tool",
        "after_tool",
        "on_turn_end",
        "before_policy",
        "after_policy",
        "on_turn_end",
        "on_run_end:answered",
    ]


def test_on_turn_end_sees_the_completed_turn() -> None:
    seen: list[tuple[int, int, bool]] = []

    class Turns(Hooks):
        async def on_turn_end(self, ctx: RunContext, turn: Turn) -> None:
            seen.append((turn.index, ctx.completed_rounds, turn.tool_result is not None))

    run(Turns())
    assert seen == [(0, 1, True), (1, 1, False)]


def test_hooks_share_per_run_state() -> None:
    class Counter(Hooks):
        async def before_policy(self, ctx: RunContext, messages: list[Message]) -> None:
            ctx.state["calls"] = ctx.state.get("calls", 0) + 1

        async def on_run_end(self, ctx: RunContext, trajectory: Trajectory) -> None:
            trajectory.metadata["policy_calls"] = ctx.state["calls"]

    trajectory, _ = run(Counter())
    assert trajectory.metadata["policy_calls"] == 2


# --------------------------------------------------------------------------- replacements


class InjectReminder(Hooks):
    async def before_policy(self, ctx: RunContext, messages: list[Message]) -> list[Message]:
        return [*messages, Message.user("Reminder: be concise.")]


def test_before_policy_replacement_is_what_the_policy_receives() -> None:
    trajectory, policy = run(InjectReminder())
    for sent in policy.calls:
        assert sent[-1].text == "Reminder: be concise."
    assert trajectory.turns[0].sent_messages == policy.calls[0]
    assert trajectory.turns[1].sent_messages == policy.calls[1]


def test_before_policy_replacement_leaves_the_canonical_conversation() -> None:
    trajectory, policy = run(InjectReminder())
    canonical = trajectory.to_messages()
    assert all("Reminder" not in m.text for m in canonical)
    # the second call saw the canonical history plus only its own injected message
    assert policy.calls[1][:-1] == canonical[: len(policy.calls[1]) - 1]


def test_before_policy_returning_none_records_no_sent_messages() -> None:
    trajectory, _ = run(Recording())
    assert all(turn.sent_messages is None for turn in trajectory.turns)


class Recaption(Hooks):
    def __init__(self, suffix: str, prefix: str = "") -> None:
        self.suffix = suffix
        self.prefix = prefix
        self.seen: list[str] = []

    async def before_tool(self, ctx: RunContext, call: ToolCall) -> ToolCall:
        caption = call.arguments["caption"]
        self.seen.append(caption)
        return call.model_copy(
            update={"arguments": {"caption": f"{self.prefix}{caption}{self.suffix}"}}
        )


def test_before_tool_replacement_changes_the_executed_call() -> None:
    paint = Paint()
    trajectory, _ = run(Recaption(suffix="", prefix="blue "), tool=paint)
    assert paint.captions == ["blue red"]
    image = trajectory.final_image
    assert image is not None and image.getpixel((0, 0)) == (0, 0, 255)


def test_before_tool_replacement_is_recorded_beside_the_policys_call() -> None:
    trajectory, _ = run(Recaption(suffix="", prefix="blue "), tool=Paint())
    turn = trajectory.turns[0]
    assert turn.action is not None and turn.action.tool_call is not None
    assert turn.action.tool_call.arguments == {"caption": "red"}  # what the policy wrote
    assert turn.tool_result is not None and turn.tool_result.call is not None
    assert turn.tool_result.call.arguments == {"caption": "blue red"}  # what ran


def test_before_tool_replacement_is_revalidated_against_the_tool() -> None:
    class Invalid(Hooks):
        async def before_tool(self, ctx: RunContext, call: ToolCall) -> ToolCall:
            return call.model_copy(update={"arguments": {}})

    paint = Paint()
    trajectory, _ = run(Invalid(), replies=[generate("red")], tool=paint, max_retries=0)
    assert paint.captions == []
    assert trajectory.termination is Termination.ERROR
    assert "invalid arguments for image_generation_tool" in trajectory.turns[0].error.message


def test_after_tool_replacement_changes_the_stored_images() -> None:
    class Watermark(Hooks):
        async def after_tool(
            self, ctx: RunContext, call: ToolCall, result: ToolResult
        ) -> ToolResult:
            return ToolResult(images=[solid("green")], text="watermarked")

    trajectory, policy = run(Watermark())
    assert len(trajectory.images) == 1
    image = trajectory.final_image
    assert image is not None and image.getpixel((0, 0)) == (0, 128, 0)
    assert trajectory.turns[0].tool_result.text == "watermarked"
    assert policy.calls[1][-1].images == trajectory.images


def test_a_list_of_hooks_chains_before_tool_replacements_in_order() -> None:
    first, second = Recaption(suffix=" one"), Recaption(suffix=" two")
    paint = Paint()
    run([first, second], tool=paint)
    assert first.seen == ["red"]
    assert second.seen == ["red one"]
    assert paint.captions == ["red one two"]


def test_a_list_of_hooks_chains_before_policy_replacements_in_order() -> None:
    class Append(Hooks):
        def __init__(self, text: str) -> None:
            self.text = text

        async def before_policy(self, ctx: RunContext, messages: list[Message]) -> list[Message]:
            return [*messages, Message.user(self.text)]

    class Observe(Hooks):
        def __init__(self) -> None:
            self.last: list[str] = []

        async def before_policy(self, ctx: RunContext, messages: list[Message]) -> None:
            self.last.append(messages[-1].text)

    observe = Observe()
    trajectory, policy = run([Append("A"), observe, Append("B")])
    assert observe.last == ["A", "A"]  # the middle hook sees the first one's replacement
    assert [m.text for m in policy.calls[0][-2:]] == ["A", "B"]
    assert trajectory.turns[0].sent_messages == policy.calls[0]


def test_a_list_of_hooks_chains_after_tool_replacements_in_order() -> None:
    class Tag(Hooks):
        def __init__(self, tag: str) -> None:
            self.tag = tag

        async def after_tool(
            self, ctx: RunContext, call: ToolCall, result: ToolResult
        ) -> ToolResult:
            return ToolResult(images=result.images, text=(result.text or "") + self.tag)

    trajectory, _ = run([Tag("a"), Tag("b")])
    assert trajectory.turns[0].tool_result.text == "ab"


# --------------------------------------------------------------------------- errors


HOOK_METHODS = ["on_run_start", "before_policy", "after_policy", "before_tool", "after_tool"]
HOOK_METHODS += ["on_turn_end", "on_run_end"]


@pytest.mark.parametrize("method", HOOK_METHODS)
def test_hook_raising_a_plain_exception_ends_the_run_with_hook_error(method: str) -> None:
    class Broken(Hooks):
        pass

    async def broken(self: Hooks, *args: Any) -> None:
        raise KeyError("oops")

    setattr(Broken, method, broken)
    with pytest.raises(HookError, match="KeyError") as info:
        run(Broken())
    assert isinstance(info.value, RunError)
    assert isinstance(info.value.__cause__, KeyError)
    trajectory = info.value.trajectory
    assert trajectory is not None
    assert trajectory.error is not None and trajectory.error.type == "HookError"
    # the run raised, so it ended in error (even when only on_run_end failed)
    assert trajectory.termination is Termination.ERROR


def test_a_failing_on_run_end_hook_is_called_once() -> None:
    calls = []

    class Broken(Hooks):
        async def on_run_end(self, ctx: RunContext, trajectory: Trajectory) -> None:
            calls.append(trajectory.termination)
            raise KeyError("oops")

    with pytest.raises(HookError):
        run(Broken())
    assert calls == [Termination.ANSWERED]


def test_hook_raising_tool_refused_in_before_tool_shows_a_refusal() -> None:
    class Moderation(Hooks):
        async def before_tool(self, ctx: RunContext, call: ToolCall) -> None:
            if "gore" in call.arguments["caption"]:
                raise ToolRefused("the caption was blocked by moderation", hint="Rephrase it.")

    paint = Paint()
    trajectory, policy = run(
        Moderation(), replies=[generate("gore scene"), generate("red"), answer()], tool=paint
    )
    assert trajectory.termination is Termination.ANSWERED
    assert paint.captions == ["red"]
    refused = trajectory.turns[0]
    assert refused.error is not None and refused.error.type == "ToolRefused"
    assert refused.tool_result is not None and refused.tool_result.error == refused.error
    assert policy.calls[1][-1].text == (
        "<tool_response>Error: the caption was blocked by moderation Rephrase it.</tool_response>"
    )


def test_model_visible_error_from_a_non_tool_hook_is_a_hook_error() -> None:
    class Misplaced(Hooks):
        async def before_policy(self, ctx: RunContext, messages: list[Message]) -> None:
            raise ToolRefused("not a tool hook")

    with pytest.raises(HookError, match="not a tool hook") as info:
        run(Misplaced())
    assert info.value.trajectory is not None


def test_on_error_sees_model_visible_errors() -> None:
    class Refusing(GenerationTool):
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            self.calls += 1
            if self.calls == 1:
                raise ToolRefused("blocked")
            return ToolResult(images=[solid("red")])

    recording = Recording()
    run(
        recording,
        replies=["no tags", generate("red"), generate("red"), answer()],
        tool=Refusing(),
    )
    assert [type(e).__name__ for e in recording.errors] == ["ProtocolError", "ToolRefused"]
    assert recording.events.count("on_error") == 2


def test_on_error_sees_the_error_that_ends_the_run() -> None:
    class Crashing(GenerationTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            raise RuntimeError("segfault")

    recording = Recording()
    with pytest.raises(ToolUnavailable):
        run(recording, tool=Crashing())
    assert [type(e).__name__ for e in recording.errors] == ["ToolUnavailable"]
    assert recording.events[-1] == "on_run_end:error"


# --------------------------------------------------------------------------- progress


class Progressing(GenerationTool):
    """Reports three diffusion steps."""

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        for step in range(1, 4):
            ctx.report_progress(step, 3)
        return ToolResult(images=[solid("red")])


class ProgressRecorder(Hooks):
    def __init__(self) -> None:
        self.progress: list[ToolProgress] = []

    def on_tool_progress(self, ctx: RunContext, progress: ToolProgress) -> None:
        self.progress.append(progress)


def test_on_tool_progress_receives_progress_reported_by_a_tool() -> None:
    recorder = ProgressRecorder()
    run(recorder, tool=Progressing())
    assert [(p.tool, p.step, p.total) for p in recorder.progress] == [
        ("image_generation_tool", 1, 3),
        ("image_generation_tool", 2, 3),
        ("image_generation_tool", 3, 3),
    ]


async def test_on_tool_progress_receives_progress_from_an_async_tool() -> None:
    class AsyncProgressing(GenerationTool):
        async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
            ctx.report_progress(1, None, phase="queued")
            return ToolResult(images=[solid("red")])

    recorder = ProgressRecorder()
    run(recorder, tool=AsyncProgressing())
    (progress,) = recorder.progress
    assert (progress.step, progress.total, progress.info) == (1, None, {"phase": "queued"})


def test_on_tool_progress_raising_ends_the_run_with_hook_error() -> None:
    class Broken(Hooks):
        def on_tool_progress(self, ctx: RunContext, progress: ToolProgress) -> None:
            raise ValueError("bad progress bar")

    with pytest.raises(HookError, match="bad progress bar") as info:
        run(Broken(), tool=Progressing())
    assert info.value.trajectory is not None
