"""The agent loop: termination, candidates, error policy, batches, iteration, seeds, config."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from PIL import Image

from genagent import (
    Agent,
    ConfigurationError,
    EditTool,
    FinalStep,
    FunctionPolicy,
    GenerationTool,
    HookError,
    Hooks,
    InvalidImageError,
    Message,
    PolicyError,
    PolicyStep,
    RunContext,
    ScriptedPolicy,
    Task,
    Termination,
    ToolArgumentError,
    ToolContext,
    ToolExecutionError,
    ToolRefused,
    ToolResult,
    ToolStep,
    ToolUnavailable,
    Trajectory,
    reward,
    tool,
)

SIZE = (16, 16)


# --------------------------------------------------------------------------- replies


def call(name: str, **arguments: Any) -> str:
    """A tool call exactly as the released GenAgent v2 weights write it."""
    payload = json.dumps({"name": name, "arguments": arguments})
    return f"<tool_call>\n{payload}\n</tool_call>"


def generate(caption: str, think: str = "I will write a detailed caption.") -> str:
    return f"<think>{think}</think>\n{call('image_generation_tool', caption=caption)}"


def edit(instruction: str, judge: str = "One detail is wrong.") -> str:
    return (
        f"<judge>{judge}</judge>\n<think>A local edit fixes it.</think>\n"
        f"{call('image_editing_tool', instruction=instruction)}"
    )


def regenerate(caption: str, judge: str = "The image is wrong.") -> str:
    return f"<judge>{judge}</judge>\n{generate(caption)}"


def answer(text: str = "The image shows the request.", judge: str = "All correct.") -> str:
    return f"<judge>{judge}</judge>\n<answer>{text}</answer>"


# --------------------------------------------------------------------------- tools


def solid(colour: str) -> Image.Image:
    return Image.new("RGB", SIZE, colour)


def pixel(trajectory: Trajectory) -> Any:
    image = trajectory.final_image
    assert image is not None
    return image.convert("RGB").getpixel((0, 0))


class Paint(GenerationTool):
    """Paints the caption's first word as a solid colour; records every call's context."""

    def __init__(self) -> None:
        self.contexts: list[ToolContext] = []

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        self.contexts.append(ctx)
        colour = args.caption.split()[0]
        return ToolResult(images=[solid(colour) for _ in ctx.seeds], metadata={"colour": colour})


class Recolour(EditTool):
    """Repaints the current image in the instruction's last word; records what it edited."""

    def __init__(self) -> None:
        self.edited: list[Any] = []

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        assert ctx.current_image is not None
        self.edited.append(ctx.current_image)
        return ToolResult(images=[solid(args.instruction.split()[-1])])


class Shades(GenerationTool):
    """Batches candidates: candidate i is grey level 40 * i (so later ones are brighter)."""

    max_images_per_call: ClassVar[int] = 16

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult(images=[Image.new("L", SIZE, 40 * i) for i in range(ctx.num_images)])


class Raising(GenerationTool):
    def __init__(self, error: BaseException, times: int = 1) -> None:
        self.error = error
        self.times = times
        self.calls = 0

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return ToolResult(images=[solid("red")])


@reward
def brightness(prompt: str, image: Image.Image) -> float:
    return float(image.convert("L").getpixel((0, 0))) / 255


def has_image(messages: Sequence[Message]) -> bool:
    return any(m.images for m in messages)


def generate_then_answer(messages: Sequence[Message], *_: Any) -> str:
    """A stateless policy: generate from the request's first word, answer once an image exists."""
    if has_image(messages):
        return answer()
    return generate(messages[1].text)


class Recorder(Hooks):
    def __init__(self) -> None:
        self.trajectory: Trajectory | None = None
        self.ended: list[Termination | None] = []

    async def on_run_start(self, ctx: RunContext) -> None:
        self.trajectory = ctx.trajectory

    async def on_run_end(self, ctx: RunContext, trajectory: Trajectory) -> None:
        self.ended.append(trajectory.termination)


# --------------------------------------------------------------------------- basic runs


def test_run_answered_after_one_image() -> None:
    policy = ScriptedPolicy([generate("red apple"), answer("A red apple.")])
    trajectory = Agent(Paint(), policy=policy).run("a red apple", seed=3)
    assert trajectory.termination is Termination.ANSWERED
    assert trajectory.answer == "A red apple."
    assert trajectory.num_rounds == 1
    assert pixel(trajectory) == (255, 0, 0)
    assert trajectory.error is None


def test_run_metadata_records_policy_tools_and_seed() -> None:
    policy = ScriptedPolicy([generate("red"), answer()], name="my-policy")
    trajectory = Agent(Paint(), policy=policy).run("red", seed=3, metadata={"exp": "a1"})
    metadata = trajectory.metadata
    assert metadata["policy"]["name"] == "my-policy"
    assert [t["name"] for t in metadata["tools"]] == ["image_generation_tool"]
    assert metadata["seed"] == 3
    assert metadata["exp"] == "a1"
    assert metadata["agent"]["max_rounds"] == 3


def test_run_without_seed_records_the_random_seed_it_used() -> None:
    paint = Paint()
    trajectory = Agent(paint, policy=ScriptedPolicy([generate("red"), answer()])).run("red")
    seed = trajectory.metadata["seed"]
    assert isinstance(seed, int)
    assert (
        Agent(paint, policy=ScriptedPolicy([])).derive_seeds(seed, 1, 1) == paint.contexts[0].seeds
    )


def test_run_accepts_a_task_and_shows_its_prompt() -> None:
    policy = ScriptedPolicy([generate("blue"), answer()])
    task = Task(prompt="a blue sky", id="t1", category="color")
    trajectory = Agent(Paint(), policy=policy).run(task)
    assert trajectory.task == task
    assert policy.calls[0][1].text == "a blue sky"


def test_genagent_v2_replies_drive_generation_edit_and_answer() -> None:
    paint, recolour = Paint(), Recolour()
    policy = ScriptedPolicy(
        [
            generate("red cup", think="The user wants a blue cup on a table."),
            edit("make the cup blue", judge="The cup is red, not blue."),
            answer("A blue cup.", judge="The cup is blue now."),
        ]
    )
    trajectory = Agent([paint, recolour], policy=policy).run("a blue cup", seed=0)

    assert trajectory.termination is Termination.ANSWERED
    assert [r.tool for r in trajectory.rounds] == ["image_generation_tool", "image_editing_tool"]
    assert [r.arguments for r in trajectory.rounds] == [
        {"caption": "red cup"},
        {"instruction": "make the cup blue"},
    ]
    # the editor edits the generated image, and its result is final
    assert recolour.edited == [trajectory.images[0]]
    assert pixel(trajectory) == (0, 0, 255)
    actions = [turn.action for turn in trajectory.turns]
    assert all(action is not None for action in actions)
    assert actions[0].thought == "The user wants a blue cup on a table."  # type: ignore[union-attr]
    assert actions[1].judgment == "The cup is red, not blue."  # type: ignore[union-attr]
    assert actions[2].kind == "answer"  # type: ignore[union-attr]
    # every image comes back to the policy as a tool response holding that image
    for turn, image in zip(trajectory.turns[1:], trajectory.images, strict=True):
        (observation,) = turn.messages
        assert observation.text == "<tool_response></tool_response>"
        assert observation.images == [image]


def test_replies_cut_at_stop_sequences_are_closed_in_the_conversation() -> None:
    policy = ScriptedPolicy([generate("red"), answer("Done.")])
    trajectory = Agent(Paint(), policy=policy).run("red", seed=0)
    first = trajectory.turns[0]
    assert not first.reply.rstrip().endswith("</tool_call>")  # cut like a real server
    assert first.assistant_message.text.endswith("</tool_call>")
    assert policy.calls[1][2].text == first.assistant_message.text


def test_sim_scene_tools_run_generation_and_edit() -> None:
    from genagent.sim import SceneTool, scene_tools

    tools = scene_tools(size=64, error_scale=0.0)
    policy = ScriptedPolicy(
        [generate("one red apple"), edit("make the apple blue"), answer("A blue apple.")]
    )
    trajectory = Agent(tools, policy=policy).run("a blue apple", seed=0)
    assert trajectory.termination is Termination.ANSWERED
    assert trajectory.num_rounds == 2
    assert trajectory.final_image_ref == trajectory.images[1] != trajectory.images[0]
    assert isinstance(tools[0], SceneTool)


def test_default_agent_runs_the_offline_simulator_end_to_end() -> None:
    trajectory = Agent().run("two red apples", seed=0)
    assert trajectory.termination in (Termination.ANSWERED, Termination.MAX_ROUNDS)
    assert trajectory.num_rounds >= 1
    assert trajectory.final_image is not None
    assert trajectory.metadata["policy"]["name"] == "heuristic"
    assert {t["name"] for t in trajectory.metadata["tools"]} == {
        "image_generation_tool",
        "image_editing_tool",
    }


# --------------------------------------------------------------------------- limits


def test_max_rounds_stops_after_n_images() -> None:
    policy = ScriptedPolicy([generate("red")] + [regenerate(c) for c in ("green", "blue")])
    trajectory = Agent(Paint(), policy=policy, max_rounds=2).run("x", seed=0)
    assert trajectory.termination is Termination.MAX_ROUNDS
    assert trajectory.num_rounds == 2
    assert len(trajectory.turns) == 2
    assert pixel(trajectory) == (0, 128, 0)  # the last image is final


def test_max_turns_bounds_policy_calls() -> None:
    policy = ScriptedPolicy([generate("red")], cycle=True)
    trajectory = Agent(Paint(), policy=policy, max_rounds=10, max_turns=3).run("x", seed=0)
    assert trajectory.termination is Termination.MAX_TURNS
    assert len(policy.calls) == 3
    assert len(trajectory.turns) == 3


def test_max_turns_defaults_to_twice_max_rounds_plus_two() -> None:
    assert Agent(Paint(), policy=ScriptedPolicy([]), max_rounds=4).max_turns == 10


def test_time_budget_with_a_slow_tool_ends_with_budget() -> None:
    class SlowTool(GenerationTool):
        async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
            await asyncio.sleep(30)
            return ToolResult(images=[solid("red")])

    policy = ScriptedPolicy([generate("red"), answer()])
    agent = Agent(SlowTool(), policy=policy, time_budget_s=0.2)
    trajectory = agent.run("x", seed=0)  # returned, not raised
    assert trajectory.termination is Termination.BUDGET
    assert trajectory.images == []
    assert trajectory.wall_s < 10


def test_time_budget_with_a_slow_policy_ends_with_budget() -> None:
    async def slow(messages: Sequence[Message], *_: Any) -> str:
        await asyncio.sleep(30)
        return generate("red")

    agent = Agent(Paint(), policy=FunctionPolicy(slow), time_budget_s=0.2)
    trajectory = agent.run("x", seed=0)
    assert trajectory.termination is Termination.BUDGET
    assert len(trajectory.turns) == 1 and trajectory.turns[0].interrupted
    assert trajectory.to_messages() == []  # no reply was ever made
    assert trajectory.wall_s < 10


def test_time_budget_spent_between_turns_keeps_the_images_made() -> None:
    now = [0.0]

    class ClockTool(GenerationTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            now[0] += 100.0  # a long generation, on the injected clock
            return ToolResult(images=[solid("red")])

    policy = ScriptedPolicy([generate("red"), answer()])
    agent = Agent(ClockTool(), policy=policy, time_budget_s=50, clock=lambda: now[0])
    trajectory = agent.run("x", seed=0)
    assert trajectory.termination is Termination.BUDGET
    assert len(policy.calls) == 1
    assert pixel(trajectory) == (255, 0, 0)


def test_tool_checking_a_spent_budget_ends_with_budget() -> None:
    now = [0.0]

    class Checking(GenerationTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            now[0] += 100.0
            ctx.check_budget()  # raises BudgetExceeded
            return ToolResult(images=[solid("red")])

    policy = ScriptedPolicy([generate("red"), answer()])
    trajectory = Agent(Checking(), policy=policy, time_budget_s=50, clock=lambda: now[0]).run("x")
    assert trajectory.termination is Termination.BUDGET
    assert trajectory.images == []


# --------------------------------------------------------------------------- candidates


def test_candidates_with_judge_continue_with_the_best_image() -> None:
    policy = ScriptedPolicy([generate("grey"), answer()])
    agent = Agent(Shades(), policy=policy, candidates=4, judge=brightness)
    trajectory = agent.run("x", seed=0)
    record = trajectory.turns[0].tool_result
    assert record is not None
    assert record.scores == pytest.approx([0.0, 40 / 255, 80 / 255, 120 / 255])
    assert record.selected == 3
    assert len(record.images) == 4
    assert trajectory.final_image_ref == trajectory.images[record.images[3]]


def test_candidates_with_judge_show_only_the_selected_image_to_the_policy() -> None:
    policy = ScriptedPolicy([generate("grey"), answer()])
    trajectory = Agent(Shades(), policy=policy, candidates=4, judge=brightness).run("x", seed=0)
    (observation,) = trajectory.turns[1].messages
    assert observation.images == [trajectory.final_image_ref]
    assert policy.calls[1][-1].images == [trajectory.final_image_ref]


def test_candidates_judge_prefers_scored_over_failed_candidates() -> None:
    @reward
    def only_odd(prompt: str, image: Image.Image) -> float | None:
        level = image.convert("L").getpixel((0, 0))
        return None if level in (0, 80) else 1.0 - level / 255

    policy = ScriptedPolicy([generate("grey"), answer()])
    trajectory = Agent(Shades(), policy=policy, candidates=3, judge=only_odd).run("x", seed=0)
    record = trajectory.turns[0].tool_result
    assert record is not None
    assert record.scores == [None, pytest.approx(1 - 40 / 255), None]
    assert record.selected == 1


def test_candidates_without_judge_show_every_image_to_the_policy() -> None:
    policy = ScriptedPolicy([generate("grey"), answer()])
    trajectory = Agent(Shades(), policy=policy, candidates=3).run("x", seed=0)
    record = trajectory.turns[0].tool_result
    assert record is not None
    assert record.scores is None
    assert record.selected == 0
    (observation,) = trajectory.turns[1].messages
    assert observation.images == trajectory.images
    assert len(set(trajectory.images)) == 3


def test_tool_without_batching_is_called_once_per_candidate_with_distinct_seeds() -> None:
    paint = Paint()  # max_images_per_call = 1
    policy = ScriptedPolicy([generate("red"), answer()])
    trajectory = Agent(paint, policy=policy, candidates=3).run("x", seed=5)
    assert [ctx.num_images for ctx in paint.contexts] == [1, 1, 1]
    seeds = [ctx.seed for ctx in paint.contexts]
    assert len(set(seeds)) == 3
    record = trajectory.turns[0].tool_result
    assert record is not None
    assert record.seeds == seeds
    assert len(record.images) == 3


def test_batching_tool_is_called_once_for_all_candidates() -> None:
    class Batch(Paint):
        max_images_per_call: ClassVar[int] = 8

    batch = Batch()
    Agent(batch, policy=ScriptedPolicy([generate("red"), answer()]), candidates=3).run("x")
    assert len(batch.contexts) == 1
    assert batch.contexts[0].num_images == 3
    assert len(set(batch.contexts[0].seeds)) == 3


# --------------------------------------------------------------------------- model-visible errors


def test_protocol_error_is_shown_to_the_model_and_recorded() -> None:
    policy = ScriptedPolicy(["I will draw a red apple.", generate("red"), answer()])
    trajectory = Agent(Paint(), policy=policy).run("x", seed=0)
    assert trajectory.termination is Termination.ANSWERED
    first = trajectory.turns[0]
    assert first.action is None
    assert first.error is not None and first.error.type == "ProtocolError"
    (notice,) = trajectory.turns[1].messages
    assert first.error.message in notice.text
    assert policy.calls[1][-1] == notice
    assert "neither a <tool_call> nor an <answer>" in notice.text


def test_protocol_errors_beyond_max_retries_end_the_run_with_error() -> None:
    policy = ScriptedPolicy(["no tags here"], cycle=True)
    trajectory = Agent(Paint(), policy=policy, max_retries=2).run("x", seed=0)  # not raised
    assert trajectory.termination is Termination.ERROR
    assert len(trajectory.turns) == 3  # the first try and two retries
    assert all(turn.error is not None for turn in trajectory.turns)
    assert trajectory.error is not None
    assert trajectory.error.type == "TooManyRetries"
    assert "neither a <tool_call> nor an <answer>" in trajectory.error.message


def test_max_retries_counts_consecutive_errors_only() -> None:
    policy = ScriptedPolicy(["bad", generate("red"), "bad", answer()])
    trajectory = Agent(Paint(), policy=policy, max_retries=1).run("x", seed=0)
    assert trajectory.termination is Termination.ANSWERED
    assert [turn.error is not None for turn in trajectory.turns] == [True, False, True, False]


def test_max_retries_zero_ends_at_the_first_unusable_reply() -> None:
    policy = ScriptedPolicy(["bad", generate("red")])
    trajectory = Agent(Paint(), policy=policy, max_retries=0).run("x", seed=0)
    assert trajectory.termination is Termination.ERROR
    assert len(trajectory.turns) == 1


@pytest.mark.parametrize(
    "error",
    [
        ToolRefused("the safety filter blocked the caption", hint="Rephrase it."),
        ToolArgumentError("caption too long"),
        ToolExecutionError("the server returned a black image"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_tool_model_visible_errors_become_tool_responses(error: Exception) -> None:
    tool = Raising(error)
    policy = ScriptedPolicy([generate("red"), generate("red again"), answer()])
    trajectory = Agent(tool, policy=policy).run("x", seed=0)
    assert trajectory.termination is Termination.ANSWERED
    failed = trajectory.turns[0]
    assert failed.tool_result is not None and failed.tool_result.error is not None
    assert failed.tool_result.error.type == type(error).__name__
    assert failed.error == failed.tool_result.error
    (response,) = trajectory.turns[1].messages
    assert response.text.startswith("<tool_response>Error: ")
    assert str(error) in response.text
    assert trajectory.num_rounds == 1


def test_tool_error_hint_is_shown_to_the_model() -> None:
    tool = Raising(ToolRefused("blocked", hint="Rephrase the caption."))
    policy = ScriptedPolicy([generate("red"), generate("red"), answer()])
    trajectory = Agent(tool, policy=policy).run("x", seed=0)
    assert trajectory.turns[1].messages[0].text == (
        "<tool_response>Error: blocked Rephrase the caption.</tool_response>"
    )


def test_tool_errors_count_towards_max_retries() -> None:
    tool = Raising(ToolRefused("blocked"), times=100)
    policy = ScriptedPolicy([generate("red")], cycle=True)
    trajectory = Agent(tool, policy=policy, max_retries=1).run("x", seed=0)
    assert trajectory.termination is Termination.ERROR
    assert tool.calls == 2


def test_tool_returning_undecodable_bytes_is_a_model_visible_error() -> None:
    class Garbage(GenerationTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult(images=[b"\x89PNG\r\n\x1a\n but truncated"])

    policy = ScriptedPolicy([generate("red"), answer()], cycle=True)
    trajectory = Agent(Garbage(), policy=policy, max_retries=1).run("x", seed=0)
    first = trajectory.turns[0]
    assert first.error is not None and first.error.type == "ToolExecutionError"
    assert "unreadable image" in trajectory.turns[1].messages[0].text
    assert trajectory.images == []


def test_tool_raising_invalid_image_error_is_a_model_visible_error() -> None:
    tool = Raising(InvalidImageError("invalid base64 image data"))
    policy = ScriptedPolicy([generate("red"), generate("red"), answer()])
    trajectory = Agent(tool, policy=policy).run("x", seed=0)
    assert trajectory.termination is Termination.ANSWERED
    assert "invalid base64 image data" in trajectory.turns[1].messages[0].text


def test_tool_returning_nothing_is_a_model_visible_error() -> None:
    class Empty(GenerationTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult()

    policy = ScriptedPolicy([generate("red")], cycle=True)
    trajectory = Agent(Empty(), policy=policy, max_retries=0).run("x", seed=0)
    assert trajectory.turns[0].error is not None
    assert "neither an image nor text" in trajectory.turns[0].error.message


def test_tool_returning_text_only_is_shown_without_a_round() -> None:
    class Caption(GenerationTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult(text="the server is warming up")

    policy = ScriptedPolicy([generate("red")], cycle=True)
    trajectory = Agent(Caption(), policy=policy, max_turns=2).run("x", seed=0)
    assert trajectory.termination is Termination.MAX_TURNS
    assert trajectory.num_rounds == 0
    assert trajectory.turns[1].messages[0].text == (
        "<tool_response>the server is warming up</tool_response>"
    )


# --------------------------------------------------------------------------- run-ending errors


def test_tool_raising_an_unexpected_exception_raises_tool_unavailable() -> None:
    tool = Raising(RuntimeError("CUDA out of memory"))
    policy = ScriptedPolicy([generate("red"), answer()])
    with pytest.raises(ToolUnavailable, match="CUDA out of memory") as info:
        Agent(tool, policy=policy).run("x", seed=0)
    trajectory = info.value.trajectory
    assert trajectory is not None
    assert trajectory.termination is Termination.ERROR
    assert trajectory.error is not None and trajectory.error.type == "ToolUnavailable"
    assert len(trajectory.turns) == 1
    assert trajectory.turns[0].action is not None
    assert isinstance(info.value.__cause__, RuntimeError)


def test_tool_unavailable_keeps_the_turns_before_the_failure() -> None:
    tool = Raising(RuntimeError("boom"), times=0)

    class FailSecond(GenerationTool):
        name = "second"

        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            raise ConnectionError("server down")

    policy = ScriptedPolicy(
        [generate("red"), f"<judge>bad</judge>{call('second', caption='x')}", answer()]
    )
    with pytest.raises(ToolUnavailable) as info:
        Agent([tool, FailSecond()], policy=policy).run("x", seed=0)
    trajectory = info.value.trajectory
    assert trajectory is not None
    assert len(trajectory.turns) == 2
    assert trajectory.num_rounds == 1
    assert trajectory.final_image is not None


@pytest.mark.parametrize("budget", [None, 60.0], ids=["no_budget", "budget_left"])
def test_tool_raising_its_own_timeout_is_not_a_spent_budget(budget: float | None) -> None:
    tool = Raising(TimeoutError("the generation server did not answer in 60 s"))
    policy = ScriptedPolicy([generate("red"), answer()])
    with pytest.raises(ToolUnavailable, match="did not answer") as info:
        Agent(tool, policy=policy, time_budget_s=budget).run("x", seed=0)
    assert info.value.trajectory is not None
    assert info.value.trajectory.termination is Termination.ERROR


def test_tool_whose_setup_fails_raises_tool_unavailable() -> None:
    class NoWeights(GenerationTool):
        def setup(self) -> None:
            raise FileNotFoundError("weights.safetensors")

        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            raise AssertionError("never called")

    with pytest.raises(ToolUnavailable, match=r"failed to set up.*weights\.safetensors") as info:
        Agent(NoWeights(), policy=ScriptedPolicy([generate("red")])).run("x", seed=0)
    assert info.value.trajectory is not None
    assert info.value.trajectory.termination is Termination.ERROR


def test_tool_setup_runs_once_across_calls() -> None:
    class Counted(Paint):
        setups = 0

        def setup(self) -> None:
            type(self).setups += 1

    policy = ScriptedPolicy([generate("red"), regenerate("blue"), answer()])
    Agent(Counted(), policy=policy, candidates=2).run("x", seed=0)
    assert Counted.setups == 1


def test_tool_returning_a_non_image_raises_tool_unavailable() -> None:
    class Wrong(GenerationTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult(images=[{"url": "http://example.invalid/x.png"}])  # type: ignore[list-item]

    with pytest.raises(ToolUnavailable, match="PIL images, encoded bytes or ImageRefs"):
        Agent(Wrong(), policy=ScriptedPolicy([generate("red")])).run("x", seed=0)


def test_policy_raising_becomes_policy_error_with_trajectory() -> None:
    def broken(messages: Sequence[Message], *_: Any) -> str:
        if has_image(messages):
            raise ConnectionError("502 Bad Gateway")
        return generate("red")

    with pytest.raises(PolicyError, match="502 Bad Gateway") as info:
        Agent(Paint(), policy=FunctionPolicy(broken)).run("x", seed=0)
    trajectory = info.value.trajectory
    assert trajectory is not None
    assert trajectory.termination is Termination.ERROR
    assert trajectory.error is not None and trajectory.error.type == "PolicyError"
    assert trajectory.num_rounds == 1
    assert isinstance(info.value.__cause__, ConnectionError)


@pytest.mark.parametrize("budget", [None, 60.0], ids=["no_budget", "budget_left"])
def test_policy_raising_its_own_timeout_is_not_a_spent_budget(budget: float | None) -> None:
    async def timing_out(messages: Sequence[Message], *_: Any) -> str:
        raise TimeoutError("read timeout")

    with pytest.raises(PolicyError, match="read timeout") as info:
        Agent(Paint(), policy=FunctionPolicy(timing_out), time_budget_s=budget).run("x")
    assert info.value.trajectory is not None
    assert info.value.trajectory.termination is Termination.ERROR


def test_policy_returning_a_wrong_type_raises_policy_error() -> None:
    class Bad:
        name = "bad"

        async def generate(self, messages: Any, *, stop: Any = (), sampling: Any = None) -> Any:
            return "a bare string"

    with pytest.raises(PolicyError, match="not a PolicyOutput"):
        Agent(Paint(), policy=Bad()).run("x", seed=0)  # type: ignore[arg-type]


def test_exhausted_scripted_policy_raises_policy_error() -> None:
    with pytest.raises(PolicyError, match="ran out of replies") as info:
        Agent(Paint(), policy=ScriptedPolicy([generate("red")])).run("x", seed=0)
    assert info.value.trajectory is not None
    turns = info.value.trajectory.turns
    assert len(turns) == 2 and turns[1].interrupted and not turns[0].interrupted
    assert len(info.value.trajectory.to_messages()) == 3  # system, user, the one reply


# --------------------------------------------------------------------------- run_batch


def test_run_batch_returns_results_in_input_order() -> None:
    class Staggered(GenerationTool):
        async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
            colour = args.caption.split()[0]
            await asyncio.sleep({"red": 0.03, "green": 0.0, "blue": 0.015}[colour])
            return ToolResult(images=[solid(colour)])

    agent = Agent(Staggered(), policy=FunctionPolicy(generate_then_answer))
    prompts = ["red", "green", "blue"]
    trajectories = agent.run_batch(prompts, concurrency=3)
    assert [t.prompt for t in trajectories] == prompts
    assert [pixel(t) for t in trajectories] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]


def test_run_batch_keeps_at_most_concurrency_runs_in_flight() -> None:
    state = {"now": 0, "peak": 0}

    class Counting(GenerationTool):
        async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            await asyncio.sleep(0.02)
            state["now"] -= 1
            return ToolResult(images=[solid("red")])

    agent = Agent(Counting(), policy=FunctionPolicy(generate_then_answer))
    trajectories = agent.run_batch([f"red {i}" for i in range(7)], concurrency=2)
    assert all(t.termination is Termination.ANSWERED for t in trajectories)
    assert state["peak"] == 2


def test_run_batch_uses_per_prompt_seeds() -> None:
    paint = Paint()
    agent = Agent(paint, policy=FunctionPolicy(generate_then_answer), seed=99)
    trajectories = agent.run_batch(["red", "blue", "green"], seeds=[1, None, 3], concurrency=1)
    assert [t.metadata["seed"] for t in trajectories] == [1, 99, 3]
    assert [ctx.seeds for ctx in paint.contexts] == [
        agent.derive_seeds(s, 1, 1) for s in (1, 99, 3)
    ]


def test_run_batch_records_a_failing_run_instead_of_raising() -> None:
    class Fragile(Paint):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            if args.caption.startswith("boom"):
                raise RuntimeError("worker crashed")
            return super().__call__(args, ctx)

    agent = Agent(Fragile(), policy=FunctionPolicy(generate_then_answer))
    trajectories = agent.run_batch(["red", "boom", "blue"])
    assert [t.termination for t in trajectories] == [
        Termination.ANSWERED,
        Termination.ERROR,
        Termination.ANSWERED,
    ]
    error = trajectories[1].error
    assert error is not None and error.type == "ToolUnavailable"
    assert "worker crashed" in error.message


def test_run_batch_raise_errors_raises_the_run_error() -> None:
    agent = Agent(
        Raising(RuntimeError("worker crashed")), policy=FunctionPolicy(generate_then_answer)
    )
    with pytest.raises(ToolUnavailable, match="worker crashed"):
        agent.run_batch(["red", "blue"], raise_errors=True)


def test_run_batch_rejects_seeds_of_the_wrong_length() -> None:
    agent = Agent(Paint(), policy=FunctionPolicy(generate_then_answer))
    with pytest.raises(ConfigurationError, match="2 seeds for 3 prompts"):
        agent.run_batch(["a", "b", "c"], seeds=[1, 2])


def test_run_batch_rejects_zero_concurrency() -> None:
    agent = Agent(Paint(), policy=FunctionPolicy(generate_then_answer))
    with pytest.raises(ConfigurationError, match="concurrency"):
        agent.run_batch(["a"], concurrency=0)


def test_run_batch_of_nothing_is_empty() -> None:
    assert Agent(Paint(), policy=FunctionPolicy(generate_then_answer)).run_batch([]) == []


# --------------------------------------------------------------------------- iter / arun


async def test_iter_yields_policy_tool_and_final_steps_in_order() -> None:
    policy = ScriptedPolicy([generate("red"), answer()])
    agent = Agent(Paint(), policy=policy)
    steps = [step async for step in agent.iter("x", seed=0)]
    assert [type(s) for s in steps] == [PolicyStep, ToolStep, PolicyStep, FinalStep]
    first, tool_step, _, final = steps
    assert isinstance(first, PolicyStep) and first.turn.index == 0
    assert first.output.text == first.turn.reply
    assert isinstance(tool_step, ToolStep)
    assert tool_step.call.name == "image_generation_tool"
    assert tool_step.call.arguments == {"caption": "red"}
    assert len(tool_step.images) == 1
    assert isinstance(final, FinalStep)
    assert final.trajectory.termination is Termination.ANSWERED
    assert final.trajectory.images == list(tool_step.images)


async def test_breaking_out_of_iter_early_cancels_the_run() -> None:
    recorder = Recorder()
    policy = ScriptedPolicy([generate("red"), regenerate("blue"), answer()])
    agent = Agent(Paint(), policy=policy, hooks=recorder)
    async with contextlib.aclosing(agent.iter("x", seed=0)) as steps:
        async for step in steps:
            if isinstance(step, ToolStep):
                break
    trajectory = recorder.trajectory
    assert trajectory is not None
    assert trajectory.termination is Termination.CANCELLED
    assert recorder.ended == [Termination.CANCELLED]
    assert len(policy.calls) == 1
    assert trajectory.num_rounds == 1


async def test_arun_returns_the_trajectory() -> None:
    policy = ScriptedPolicy([generate("red"), answer()])
    trajectory = await Agent(Paint(), policy=policy).arun("x", seed=0)
    assert trajectory.termination is Termination.ANSWERED


async def test_run_works_inside_a_running_event_loop() -> None:
    policy = ScriptedPolicy([generate("red"), answer()])
    trajectory = Agent(Paint(), policy=policy).run("x", seed=0)
    assert trajectory.termination is Termination.ANSWERED
    assert pixel(trajectory) == (255, 0, 0)


async def test_concurrent_aruns_share_one_agent() -> None:
    agent = Agent(Paint(), policy=FunctionPolicy(generate_then_answer))
    results = await asyncio.gather(*(agent.arun(c, seed=0) for c in ("red", "blue", "green")))
    assert [pixel(t) for t in results] == [(255, 0, 0), (0, 0, 255), (0, 128, 0)]


# --------------------------------------------------------------------------- rewards and seeds


def test_rewards_are_computed_on_the_final_image() -> None:
    policy = ScriptedPolicy([generate("black"), regenerate("white"), answer()])

    @reward
    def failing(prompt: str, image: Image.Image) -> float:
        raise ValueError("judge unavailable")

    agent = Agent(Paint(), policy=policy, rewards=[brightness, failing])
    trajectory = agent.run("x", seed=0)
    assert set(trajectory.rewards) == {"brightness", "failing"}
    assert trajectory.rewards["brightness"].score == pytest.approx(1.0)  # the white image
    assert trajectory.rewards["failing"].score is None
    assert trajectory.rewards["failing"].info["error"]["type"] == "ValueError"


def test_rewards_mapping_names_them() -> None:
    policy = ScriptedPolicy([generate("white"), answer()])
    agent = Agent(Paint(), policy=policy, rewards={"bright": brightness})
    assert set(agent.run("x", seed=0).rewards) == {"bright"}


def test_rewards_of_a_run_without_image_are_failures() -> None:
    policy = ScriptedPolicy(["bad"], cycle=True)
    trajectory = Agent(Paint(), policy=policy, max_retries=0, rewards=[brightness]).run("x")
    assert trajectory.rewards["brightness"].score is None


def _seeds_per_round(seed_policy: Any, base: int) -> list[list[int]]:
    class Batch(Paint):
        max_images_per_call: ClassVar[int] = 8

    batch = Batch()
    policy = ScriptedPolicy([generate("red"), regenerate("blue"), answer()])
    agent = Agent(batch, policy=policy, candidates=2, seed_policy=seed_policy)
    trajectory = agent.run("x", seed=base)
    recorded = [t.tool_result.seeds for t in trajectory.turns if t.tool_result is not None]
    assert recorded == [ctx.seeds for ctx in batch.contexts]
    return [list(ctx.seeds) for ctx in batch.contexts]


def test_fixed_seed_policy_uses_the_base_seed_every_round() -> None:
    assert _seeds_per_round("fixed", 7) == [[7, 8], [7, 8]]


def test_per_round_seed_policy_derives_new_reproducible_seeds_each_round() -> None:
    seeds = _seeds_per_round("per_round", 7)
    assert seeds[0] != seeds[1]
    assert len(set(seeds[0])) == 2
    assert seeds == _seeds_per_round("per_round", 7)
    assert seeds != _seeds_per_round("per_round", 8)
    agent = Agent(Paint(), policy=ScriptedPolicy([]))
    assert seeds == [agent.derive_seeds(7, 1, 2), agent.derive_seeds(7, 2, 2)]


def test_random_seed_policy_gives_valid_distinct_seeds() -> None:
    seeds = Agent(Paint(), policy=ScriptedPolicy([]), seed_policy="random").derive_seeds(0, 1, 4)
    assert len(set(seeds)) == 4
    assert all(0 <= s < 2**31 for s in seeds)


# --------------------------------------------------------------------------- configuration


class OnlyEdit(EditTool):
    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult()


class Other(GenerationTool):
    name = "other"

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult()


class NotAPolicy:
    name = "nope"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"candidates": 0}, "candidates must be an int >= 1"),
        ({"candidates": 2.5}, "candidates must be an int >= 1"),
        ({"max_rounds": 0}, "max_rounds must be an int >= 1"),
        ({"max_rounds": "3"}, "max_rounds must be an int >= 1"),
        ({"max_turns": 0}, "max_turns must be an int >= 1"),
        ({"time_budget_s": 0}, "time_budget_s must be a positive number"),
        ({"time_budget_s": float("nan")}, "time_budget_s must be a positive number"),
        ({"max_retries": -1}, "max_retries must be an int >= 0"),
        ({"seed": "x"}, "a seed must be an int or None"),
        ({"hooks": [object()]}, "hooks must be Hooks instances"),
        ({"seed_policy": "sometimes"}, "seed_policy must be"),
        ({"show_candidates": "best"}, "show_candidates must be"),
        ({"judge": lambda prompt, image: 1.0}, "judge must be a Reward"),
        ({"tool": [Paint(), Paint()]}, "two tools are named 'image_generation_tool'"),
        ({"tool": Paint}, r"pass a tool instance, not the class: Paint\(\)"),
        ({"tool": OnlyEdit()}, "add a generation tool"),
        ({"tool": "paint"}, "is not a Tool"),
        ({"tool": []}, "at least one tool"),
        ({"tool": Paint(), "tools": [Other()]}, "either tool= or tools="),
        ({"policy": NotAPolicy()}, "is not a policy"),
        ({"rewards": [brightness, brightness]}, "two rewards are named 'brightness'"),
        ({"rewards": {"x": 1.0}}, "reward 'x' is not a Reward"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_agent_rejects_invalid_configuration(kwargs: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"tool": Paint(), "policy": ScriptedPolicy([]), **kwargs}
    if "tools" in kwargs and "tool" not in kwargs:
        settings.pop("tool")
    with pytest.raises(ConfigurationError, match=message):
        Agent(**settings)


def test_agent_with_a_custom_tool_defaults_to_the_genagent_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from genagent.policies._resolve import DEFAULT_POLICY_MODEL

    monkeypatch.delenv("GENAGENT_POLICY", raising=False)
    agent = Agent(Paint())  # lazy: nothing is loaded until the first call
    assert agent.policy.describe()["model"] == DEFAULT_POLICY_MODEL


def test_genagent_policy_selects_the_default_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from genagent.policies import OpenAIPolicy

    monkeypatch.setenv("GENAGENT_POLICY", "http://127.0.0.1:9/v1")
    agent = Agent(Paint())
    assert (
        isinstance(agent.policy, OpenAIPolicy) and agent.policy.base_url == "http://127.0.0.1:9/v1"
    )
    monkeypatch.setenv("GENAGENT_POLICY", "heuristic")
    assert Agent(Paint()).policy.name == "heuristic"


def test_a_policy_can_be_given_as_a_spec_string() -> None:
    from genagent.policies import OpenAIPolicy

    agent = Agent(Paint(), policy="http://127.0.0.1:9/v1")
    assert isinstance(agent.policy, OpenAIPolicy) and agent.policy.base_url.endswith(":9/v1")
    assert Agent(Paint(), policy="heuristic").policy.name == "heuristic"
    with pytest.raises(ConfigurationError, match="unknown policy 'nope'"):
        Agent(Paint(), policy="nope")


def test_agent_accepts_tools_keyword_for_several_tools() -> None:
    agent = Agent(tools=[Paint(), Recolour()], policy=ScriptedPolicy([]))
    assert list(agent.tools) == ["image_generation_tool", "image_editing_tool"]


# --------------------------------------------------------------------------- additions


class Extra(GenerationTool):
    """Returns one more image than it was asked for, without reporting seeds."""

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult(images=[solid("red") for _ in range(len(ctx.seeds) + 1)])


def test_images_beyond_the_given_seeds_are_recorded_with_no_seed() -> None:
    agent = Agent(tool=Extra(), policy=ScriptedPolicy([generate("red"), answer()]), seed=3)
    trajectory = agent.run("red")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and len(outcome.images) == 2
    assert outcome.seeds[0] == agent.derive_seeds(3, 1, 1)[0]
    assert outcome.seeds[1] is None


class SwapToEdit(Hooks):
    async def before_tool(self, ctx: RunContext, call: Any) -> Any:
        return call.model_copy(
            update={"name": "image_editing_tool", "arguments": {"instruction": "x"}}
        )


def test_a_hook_swapping_in_an_edit_before_any_image_is_a_model_visible_error() -> None:
    recolour = Recolour()
    agent = Agent(
        tools=[Paint(), recolour],
        policy=ScriptedPolicy([generate("red")] * 3),
        hooks=SwapToEdit(),
        max_retries=1,
    )
    trajectory = agent.run("red")
    assert recolour.edited == []  # the edit tool never ran without an image
    assert trajectory.turns[0].error is not None
    assert "no image exists yet" in trajectory.turns[0].error.message
    assert trajectory.termination == Termination.ERROR


def test_tools_returning_pil_images_are_stored_as_png_off_the_event_loop() -> None:
    # PIL images are encoded in a worker thread; the result is the same PNG as encode_png gives
    from genagent.images import encode_png

    agent = Agent(tool=Paint(), policy=ScriptedPolicy([generate("blue"), answer()]))
    trajectory = agent.run("blue")
    ref = trajectory.final_image_ref
    assert ref is not None and ref.format == "png"
    assert ref.read_bytes() == encode_png(solid("blue"))


def test_a_budget_spent_before_a_tool_call_leaves_no_coroutine_unawaited() -> None:
    import gc
    import warnings

    now = [0.0]

    class SlowSetup(Paint):
        def setup(self) -> None:
            now[0] += 100.0  # loading the weights spends the whole budget

    policy = ScriptedPolicy([generate("red"), answer()])
    agent = Agent(SlowSetup(), policy=policy, time_budget_s=50, clock=lambda: now[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trajectory = agent.run("x")
        gc.collect()
    assert trajectory.termination is Termination.BUDGET
    assert not [w for w in caught if "never awaited" in str(w.message)]


# --------------------------------------------------------------------------- review fixes


def test_without_a_judge_the_policy_keeps_the_candidate_it_selects() -> None:
    # Shades: candidate i is grey 40*i; the policy keeps candidate 3 (grey 80)
    policy = ScriptedPolicy(
        [generate("x"), "<select>3</select><judge>ok</judge><answer>x</answer>"]
    )
    trajectory = Agent(Shades(), policy=policy, candidates=4).run("x")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None
    assert outcome.selected == 2 and outcome.selected_by == "policy"
    assert trajectory.final_image_index == outcome.images[2]
    assert trajectory.final_image.getpixel((0, 0)) == 80
    assert trajectory.image_after_round(1) == trajectory.images[outcome.images[2]]


def test_without_a_judge_or_a_selection_candidate_one_continues() -> None:
    policy = ScriptedPolicy([generate("x"), answer()])
    trajectory = Agent(Shades(), policy=policy, candidates=3).run("x")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.selected == 0 and outcome.selected_by == "default"
    shown = trajectory.turns[1].messages[0]
    assert len(shown.images) == 3 and "Candidate 3:" in shown.text


def test_the_simulator_policy_is_as_good_with_candidates_as_without() -> None:
    from genagent.sim import HeuristicPolicy, SceneJudge, sample_tasks

    tasks = sample_tasks(40, seed=3)
    judge = SceneJudge()

    def accuracy(**kwargs: Any) -> float:
        agent = Agent(policy=HeuristicPolicy(miss_rate=0), rewards={"j": judge}, **kwargs)
        runs = agent.run_batch(tasks, seeds=list(range(40)))
        return sum(t.rewards["j"].score or 0.0 for t in runs) / len(runs)

    assert accuracy(candidates=4) >= accuracy(candidates=1) - 0.05


@pytest.mark.parametrize(
    "result",
    [
        ToolResult(images=None),  # type: ignore[arg-type]
        ToolResult(images=[solid("red")], text=123),  # type: ignore[arg-type]
        ToolResult(images=[solid("red")], seeds=5),  # type: ignore[arg-type]
        ToolResult(images=[solid("red")], metadata=None),  # type: ignore[arg-type]
    ],
    ids=["images", "text", "seeds", "metadata"],
)
def test_a_malformed_tool_result_raises_tool_unavailable(result: ToolResult) -> None:
    @tool
    def broken(caption: str) -> ToolResult:
        """Return a malformed result."""
        return result

    with pytest.raises(ToolUnavailable, match="malformed ToolResult") as info:
        Agent(broken, policy=ScriptedPolicy([generate("x"), answer()])).run("x")
    assert info.value.trajectory is not None


@pytest.mark.parametrize(
    ("method", "returned"),
    [("before_policy", "not messages"), ("before_tool", {"name": "x"}), ("after_tool", [1])],
)
def test_a_hook_returning_the_wrong_type_raises_hook_error(method: str, returned: Any) -> None:
    class Wrong(Hooks):
        pass

    async def hook(self: Hooks, *args: Any) -> Any:
        return returned

    setattr(Wrong, method, hook)
    with pytest.raises(HookError, match=f"{method} returned"):
        Agent(Paint(), policy=ScriptedPolicy([generate("red"), answer()]), hooks=Wrong()).run("x")


def test_an_unexpected_exception_ends_only_its_own_run_in_a_batch() -> None:
    class Flaky(Hooks):
        async def on_turn_end(self, ctx: RunContext, turn: Any) -> None:
            if ctx.task.prompt == "green":
                raise HookError("deliberate")  # a RunError
            if ctx.task.prompt == "yellow":
                raise GenAgentErrorSubclass("a usage error escaping from a hook")

    agent = Agent(Paint(), policy=FunctionPolicy(generate_then_answer), hooks=Flaky(), max_rounds=1)
    runs = agent.run_batch(["red", "green", "yellow", "blue"], concurrency=4)
    assert [r.termination for r in runs] == [
        Termination.MAX_ROUNDS,
        Termination.ERROR,
        Termination.ERROR,
        Termination.MAX_ROUNDS,
    ]
    assert runs[2].error is not None and "a usage error escaping" in runs[2].error.message


class GenAgentErrorSubclass(ConfigurationError):
    pass


def test_a_nan_judge_score_never_wins() -> None:
    @reward
    def nan_for_the_first(prompt: str, image: Image.Image) -> float:
        level = image.convert("L").getpixel((0, 0))
        return float("nan") if level == 0 else level / 255

    policy = ScriptedPolicy([generate("x"), answer()])
    trajectory = Agent(Shades(), policy=policy, candidates=4, judge=nan_for_the_first).run("x")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None
    assert outcome.scores is not None and outcome.scores[0] is None
    assert outcome.selected == 3 and outcome.selected_by == "judge"


def test_judging_is_bounded_by_the_time_budget() -> None:
    @reward
    async def slow_judge(prompt: str, image: Image.Image) -> float:
        await asyncio.sleep(5)
        return 1.0

    agent = Agent(
        Shades(),
        policy=ScriptedPolicy([generate("x"), answer()]),
        candidates=2,
        judge=slow_judge,
        time_budget_s=0.3,
    )
    trajectory = agent.run("x")
    assert trajectory.termination is Termination.BUDGET
    assert trajectory.wall_s < 3
    assert trajectory.turns[0].tool_result is not None
    assert trajectory.turns[0].tool_result.selected == 0


def test_wall_time_includes_the_final_rewards() -> None:
    @reward
    async def slow_reward(prompt: str, image: Image.Image) -> float:
        await asyncio.sleep(0.2)
        return 1.0

    trajectory = Agent(
        Paint(), policy=ScriptedPolicy([generate("red"), answer()]), rewards=[slow_reward]
    ).run("x")
    assert trajectory.wall_s >= 0.2


class Serial(GenerationTool):
    """At most one call at a time; records the peak number of calls in flight."""

    max_concurrency = 1

    def __init__(self, seconds: float) -> None:
        import threading

        self.seconds = seconds
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        import time

        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1
        return ToolResult(images=[solid("red")])


def test_a_tool_never_runs_more_calls_at_once_than_its_max_concurrency() -> None:
    serial = Serial(0.01)
    agent = Agent(serial, policy=FunctionPolicy(generate_then_answer), candidates=3)
    agent.run_batch(["red"] * 4, concurrency=4)
    assert serial.peak == 1


def test_metadata_cannot_overwrite_what_genagent_records() -> None:
    agent = Agent(Paint(), policy=FunctionPolicy(generate_then_answer))
    with pytest.raises(ConfigurationError, match="seed"):
        agent.run("red", seed=7, metadata={"seed": 99})
    trajectory = agent.run("red", seed=7, metadata={"experiment": "a"})
    assert trajectory.metadata["seed"] == 7 and trajectory.metadata["experiment"] == "a"


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_a_configuration_error(prompt: str) -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        Agent().run(prompt)


def test_run_batch_accepts_seeds_from_any_iterable() -> None:
    agent = Agent(Paint(), policy=FunctionPolicy(generate_then_answer))
    runs = agent.run_batch(["red", "blue"], seeds=iter([1, 2]))
    assert [r.metadata["seed"] for r in runs] == [1, 2]


async def test_cancelling_the_task_still_calls_on_run_end() -> None:
    recorder = Recorder()

    async def slow(messages: Sequence[Message], *_: Any) -> str:
        await asyncio.sleep(30)
        return generate("red")

    agent = Agent(Paint(), policy=FunctionPolicy(slow), hooks=recorder)
    task = asyncio.ensure_future(agent.arun("x"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recorder.ended == [Termination.CANCELLED]
    assert recorder.trajectory is not None and recorder.trajectory.turns[0].interrupted


# --------------------------------------------------------------------------- second review


def test_max_concurrency_holds_when_a_sync_call_is_abandoned_by_the_budget() -> None:
    slow = Serial(0.3)
    policy = FunctionPolicy(generate_then_answer)
    cut = Agent(slow, policy=policy, time_budget_s=0.05)
    patient = Agent(slow, policy=policy)

    async def both() -> list[Trajectory]:
        first = asyncio.ensure_future(cut.arun("red"))
        await asyncio.sleep(0.1)  # the first run has given up; its call still runs
        return [await first, await patient.arun("red")]

    runs = asyncio.run(both())
    assert runs[0].termination is Termination.BUDGET
    assert runs[1].termination is Termination.ANSWERED
    assert slow.peak == 1


def test_on_run_end_raising_budget_exceeded_is_called_once() -> None:
    from genagent import BudgetExceeded

    ends: list[Any] = []

    class StopAtEnd(Hooks):
        async def on_run_end(self, ctx: RunContext, trajectory: Trajectory) -> None:
            ends.append(trajectory.termination)
            raise BudgetExceeded("late")

    with pytest.raises(BudgetExceeded) as info:
        Agent(Paint(), policy=FunctionPolicy(generate_then_answer), hooks=StopAtEnd()).run("red")
    assert ends == [Termination.ANSWERED]
    assert info.value.trajectory is not None
    assert info.value.trajectory.termination is Termination.ERROR


def test_a_failing_before_policy_hook_leaves_no_empty_reply() -> None:
    class Fails(Hooks):
        async def before_policy(self, ctx: RunContext, messages: list[Message]) -> None:
            if ctx.turn == 1:
                raise RuntimeError("hook bug")

    with pytest.raises(HookError) as info:
        Agent(Paint(), policy=FunctionPolicy(generate_then_answer), hooks=Fails()).run("red")
    trajectory = info.value.trajectory
    assert trajectory is not None and trajectory.turns[-1].interrupted
    assert all(m.text for m in trajectory.to_messages() if m.role == "assistant")


def test_on_turn_end_sees_a_turn_cut_by_the_budget() -> None:
    seen: list[int] = []

    class Seen(Hooks):
        async def on_turn_end(self, ctx: RunContext, turn: Any) -> None:
            seen.append(turn.index)

    async def slow(messages: Sequence[Message], *_: Any) -> str:
        await asyncio.sleep(5)
        return generate("red")

    Agent(Paint(), policy=FunctionPolicy(slow), hooks=Seen(), time_budget_s=0.1).run("x")
    assert seen == [0]


def test_a_judge_choice_shown_to_the_policy_is_named_in_the_observation() -> None:
    policy = ScriptedPolicy([generate("x"), answer()])
    agent = Agent(Shades(), policy=policy, candidates=3, judge=brightness, show_candidates="all")
    trajectory = agent.run("x")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.selected == 2 and outcome.selected_by == "judge"
    assert "Candidate 3 is kept" in trajectory.turns[1].messages[0].text


class Limited(Shades):
    max_concurrency = 2  # after a run, a lock and a semaphore live on the instance


def test_tools_pickle_after_a_run() -> None:
    import pickle

    tool_ = Limited()
    Agent(tool_, policy=FunctionPolicy(generate_then_answer)).run("red")
    clone = pickle.loads(pickle.dumps(tool_))
    assert isinstance(clone, Limited)
    trajectory = Agent(clone, policy=FunctionPolicy(generate_then_answer)).run("blue")
    assert trajectory.termination is Termination.ANSWERED


def test_tool_metadata_is_recorded_as_json_and_round_trips(tmp_path: Any) -> None:
    class Odd:
        def __repr__(self) -> str:
            return "<odd dtype>"

    class Meta(GenerationTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult(images=[solid("red")], metadata={"size": (512, 512), "dtype": Odd()})

    trajectory = Agent(Meta(), policy=FunctionPolicy(generate_then_answer)).run("red")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None
    assert outcome.metadata == {"size": [512, 512], "dtype": "<odd dtype>"}
    assert Trajectory.load(trajectory.save(tmp_path / "t")) == trajectory


def test_run_batch_refuses_a_single_prompt() -> None:
    with pytest.raises(ConfigurationError, match="list of prompts"):
        Agent().run_batch("a cat")  # type: ignore[arg-type]


def test_run_batch_records_metadata_on_every_run() -> None:
    runs = Agent(Paint(), policy=FunctionPolicy(generate_then_answer)).run_batch(
        ["red", "blue"], metadata={"experiment": "e1"}
    )
    assert [r.metadata["experiment"] for r in runs] == ["e1", "e1"]


def test_an_edit_may_return_the_current_image_unchanged() -> None:
    class NoOp(EditTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            assert ctx.current_image is not None
            return ToolResult(images=[ctx.current_image])

    policy = ScriptedPolicy([generate("red"), edit("nothing"), answer()])
    trajectory = Agent(tools=[Paint(), NoOp()], policy=policy).run("red")
    assert trajectory.termination is Termination.ANSWERED
    assert trajectory.images[0] == trajectory.images[1]  # same content, stored once


def test_token_ids_and_logprobs_are_recorded_and_round_trip(tmp_path: Any) -> None:
    from genagent import PolicyOutput, Usage

    def with_ids(messages: Sequence[Message], *_: Any) -> PolicyOutput:
        turn = sum(1 for m in messages if m.role == "assistant")
        text = generate("red") if turn == 0 else answer()
        return PolicyOutput(
            text=text.replace("</tool_call>", ""),
            stop="</tool_call>" if turn == 0 else None,
            finish_reason="stop",
            prompt_ids=list(range(10 + turn)),
            output_ids=[100 + turn, 200 + turn],
            logprobs=[-0.5, -0.25],
            usage=Usage(prompt_tokens=10 + turn, completion_tokens=2),
        )

    trajectory = Agent(Paint(), policy=FunctionPolicy(with_ids)).run("red")
    first, second = trajectory.turns
    assert first.prompt_ids == list(range(10)) and first.output_ids == [100, 200]
    assert first.logprobs == [-0.5, -0.25] and first.finish_reason == "stop"
    assert first.reply_suffix == "</tool_call>"
    assert second.prompt_ids == list(range(11))
    assert trajectory.usage.prompt_tokens == 21 and trajectory.usage.completion_tokens == 4
    assert Trajectory.load(trajectory.save(tmp_path / "t")) == trajectory
