"""Rewards: Reward, @reward, CompositeReward, PairwiseReward and the simulator judge."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from PIL import Image

from genagent import (
    CompositeReward,
    ConfigurationError,
    PairwiseOutput,
    PairwiseReward,
    Reward,
    RewardContext,
    RewardOutput,
    Task,
    reward,
)
from genagent.rewards import coerce_reward_output
from genagent.sim import SceneJudge, SceneTool

PROMPT = "two red apples and one blue cup"


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (16, 16), "white")


def _constant(name: str, value: Any) -> Reward:
    def fn(prompt: str, image: Image.Image) -> Any:
        return value

    return reward(name=name)(fn)


def _failing(name: str) -> Reward:
    def fn(prompt: str, image: Image.Image) -> float:
        raise RuntimeError("judge server down")

    return reward(name=name)(fn)


# --------------------------------------------------------------------------- Reward subclasses


class SyncBrightness(Reward):
    def score(
        self, prompt: str, image: Image.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        level = image.convert("L").getpixel((0, 0)) / 255
        return RewardOutput(score=level, info={"prompt": prompt})


class AsyncBrightness(Reward):
    async def ascore(
        self, prompt: str, image: Image.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        await asyncio.sleep(0)
        return RewardOutput(score=image.convert("L").getpixel((0, 0)) / 255)


def test_reward_implementing_only_score_works_through_score(image: Image.Image) -> None:
    assert SyncBrightness().score("p", image).score == pytest.approx(1.0)


async def test_reward_implementing_only_score_works_through_ascore(image: Image.Image) -> None:
    output = await SyncBrightness().ascore("p", Image.new("RGB", (16, 16), "black"))
    assert output.score == pytest.approx(0.0)
    assert output.info == {"prompt": "p"}


def test_reward_implementing_only_ascore_works_through_score(image: Image.Image) -> None:
    assert AsyncBrightness().score("p", image).score == pytest.approx(1.0)


async def test_reward_implementing_only_ascore_works_through_ascore(image: Image.Image) -> None:
    assert (await AsyncBrightness().ascore("p", image)).score == pytest.approx(1.0)


async def test_reward_sync_score_works_from_inside_a_running_loop(image: Image.Image) -> None:
    # a notebook calls .score() while an event loop is running
    assert AsyncBrightness().score("p", image).score == pytest.approx(1.0)


def test_reward_class_implementing_neither_fails_at_definition() -> None:
    with pytest.raises(ConfigurationError, match=r"implement `def score.*async def ascore"):

        class Empty(Reward):
            pass


def test_abstract_reward_base_may_implement_neither() -> None:
    class Base(Reward, abstract=True):
        pass

    class Concrete(Base):
        def score(self, prompt: str, image: Image.Image, ctx: Any = None) -> RewardOutput:
            return RewardOutput(score=0.5)

    assert Concrete().score("p", Image.new("RGB", (4, 4))).score == 0.5


def test_reward_subclass_name_defaults_to_snake_case_class_name() -> None:
    class ClipScoreJudge(Reward):
        def score(self, prompt: str, image: Image.Image, ctx: Any = None) -> float:
            return 1.0

    class Named(Reward):
        name = "custom"

        def score(self, prompt: str, image: Image.Image, ctx: Any = None) -> float:
            return 1.0

    assert ClipScoreJudge.name == "clip_score_judge"
    assert Named.name == "custom"


@pytest.mark.parametrize(
    ("returned", "expected"),
    [(0.25, 0.25), (1, 1.0), (True, 1.0), (None, None), (RewardOutput(score=0.5), 0.5)],
    ids=["float", "int", "bool", "none", "output"],
)
async def test_reward_returns_are_coerced_to_reward_output(
    image: Image.Image, returned: Any, expected: float | None
) -> None:
    class Returns(Reward):
        def score(self, prompt: str, image: Image.Image, ctx: Any = None) -> Any:
            return returned

    output = await Returns().ascore("p", image)
    assert isinstance(output, RewardOutput)
    assert output.score == expected
    assert output.failed is (expected is None)


def test_async_reward_returning_a_float_gives_reward_output_from_score(
    image: Image.Image,
) -> None:
    class AsyncFloat(Reward):
        async def ascore(self, prompt: str, image: Image.Image, ctx: Any = None) -> Any:
            return 0.75

    output = AsyncFloat().score("p", image)
    assert isinstance(output, RewardOutput)
    assert output.score == 0.75


@pytest.mark.parametrize("returned", ["0.5", [0.5], {"score": 0.5}])
async def test_reward_returning_anything_else_raises_configuration_error(
    image: Image.Image, returned: Any
) -> None:
    class Returns(Reward):
        def score(self, prompt: str, image: Image.Image, ctx: Any = None) -> Any:
            return returned

    with pytest.raises(ConfigurationError, match="return a float, None or a RewardOutput"):
        await Returns().ascore("p", image)


async def test_safe_ascore_records_an_exception_as_a_failed_score(image: Image.Image) -> None:
    output = await _failing("flaky").safe_ascore("p", image)
    assert output.score is None
    assert output.failed
    assert output.info["error"] == {"type": "RuntimeError", "message": "judge server down"}


async def test_safe_ascore_passes_a_successful_score_through(image: Image.Image) -> None:
    output = await _constant("fine", 0.4).safe_ascore("p", image)
    assert output == RewardOutput(score=0.4)


# --------------------------------------------------------------------------- @reward


def test_reward_decorator_with_prompt_and_image(image: Image.Image) -> None:
    @reward
    def prompt_length(prompt: str, image: Image.Image) -> float:
        return len(prompt) / 10

    assert isinstance(prompt_length, Reward)
    assert prompt_length.name == "prompt_length"
    assert prompt_length.score("hello", image).score == pytest.approx(0.5)


async def test_reward_decorator_passes_the_context(image: Image.Image) -> None:
    @reward
    def matches_category(prompt: str, image: Image.Image, ctx: RewardContext | None) -> float:
        assert ctx is not None and ctx.task is not None
        return 1.0 if ctx.task.category == "counting" else 0.0

    ctx = RewardContext(task=Task(prompt="three cats", category="counting"))
    assert (await matches_category.ascore("three cats", image, ctx)).score == 1.0


async def test_reward_decorator_supports_async_functions(image: Image.Image) -> None:
    @reward
    async def later(prompt: str, image: Image.Image) -> RewardOutput:
        await asyncio.sleep(0)
        return RewardOutput(score=0.3, components={"a": 0.3})

    assert (await later.ascore("p", image)).components == {"a": 0.3}
    assert later.score("p", image).score == 0.3


def test_reward_decorator_custom_name(image: Image.Image) -> None:
    @reward(name="aesthetics")
    def fn(prompt: str, image: Image.Image) -> float:
        return 0.9

    assert fn.name == "aesthetics"
    assert fn.score("p", image).score == 0.9


@pytest.mark.parametrize("arity", [1, 4])
def test_reward_decorator_rejects_other_signatures(arity: int) -> None:
    def one(prompt: str) -> float:
        return 0.0

    def four(prompt: str, image: Any, ctx: Any, extra: Any) -> float:
        return 0.0

    with pytest.raises(ConfigurationError, match=r"\(prompt, image\) or \(prompt, image, ctx\)"):
        reward(one if arity == 1 else four)


# --------------------------------------------------------------------------- CompositeReward


async def test_composite_is_a_weighted_sum_with_components(image: Image.Image) -> None:
    composite = CompositeReward({"a": (_constant("a", 1.0), 0.75), "b": (_constant("b", 0.2), 2)})
    output = await composite.ascore("p", image)
    assert output.score == pytest.approx(0.75 * 1.0 + 2 * 0.2)
    assert output.components == {"a": 1.0, "b": 0.2}


def test_composite_from_a_sequence_is_named_by_member_names(image: Image.Image) -> None:
    composite = CompositeReward([_constant("a", 0.5), (_constant("b", 1.0), 3.0)])
    output = composite.score("p", image)
    assert output.components == {"a": 0.5, "b": 1.0}
    assert output.score == pytest.approx(0.5 + 3.0)


async def test_composite_normalize_gives_the_weighted_mean(image: Image.Image) -> None:
    composite = CompositeReward(
        {"a": (_constant("a", 1.0), 3.0), "b": (_constant("b", 0.0), 1.0)}, normalize=True
    )
    assert (await composite.ascore("p", image)).score == pytest.approx(0.75)


async def test_composite_on_missing_fail_gives_none_with_components(image: Image.Image) -> None:
    composite = CompositeReward({"a": _constant("a", 1.0), "b": _failing("b")})
    output = await composite.ascore("p", image)
    assert output.score is None
    assert output.components == {"a": 1.0, "b": None}
    assert output.info["failed"] == ["b"]
    assert output.info["b"]["error"]["type"] == "RuntimeError"


async def test_composite_member_returning_none_counts_as_missing(image: Image.Image) -> None:
    composite = CompositeReward({"a": _constant("a", 1.0), "b": _constant("b", None)})
    assert (await composite.ascore("p", image)).score is None


async def test_composite_on_missing_skip_rescales_over_present_members(
    image: Image.Image,
) -> None:
    composite = CompositeReward(
        {"a": (_constant("a", 0.5), 1.0), "b": (_failing("b"), 1.0)}, on_missing="skip"
    )
    output = await composite.ascore("p", image)
    # the missing member's weight is spread over the present ones: 0.5 * (2 / 1)
    assert output.score == pytest.approx(1.0)
    assert output.components == {"a": 0.5, "b": None}


async def test_composite_on_missing_skip_with_normalize_is_mean_of_present(
    image: Image.Image,
) -> None:
    composite = CompositeReward(
        {"a": (_constant("a", 0.2), 1.0), "b": (_constant("b", 0.8), 3.0), "c": _failing("c")},
        on_missing="skip",
        normalize=True,
    )
    assert (await composite.ascore("p", image)).score == pytest.approx((0.2 + 3 * 0.8) / 4)


async def test_composite_on_missing_skip_with_every_member_failing_is_none(
    image: Image.Image,
) -> None:
    composite = CompositeReward([_failing("a"), _failing("b")], on_missing="skip")
    assert (await composite.ascore("p", image)).score is None


def test_composite_rejects_duplicate_member_names() -> None:
    with pytest.raises(ConfigurationError, match="two composite members are named 'same'"):
        CompositeReward([_constant("same", 1.0), _constant("same", 0.0)])


@pytest.mark.parametrize(
    ("members", "kwargs", "message"),
    [
        ({}, {}, "at least one reward"),
        ({"x": "not a reward"}, {}, "is not a Reward"),
        ({"x": _constant("x", 1.0)}, {"on_missing": "ignore"}, "on_missing must be"),
    ],
    ids=["empty", "not_a_reward", "on_missing"],
)
def test_composite_rejects_invalid_configuration(
    members: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CompositeReward(members, **kwargs)


async def test_composite_scores_members_concurrently(image: Image.Image) -> None:
    started: list[str] = []
    release = asyncio.Event()

    def waiter(name: str) -> Reward:
        async def fn(prompt: str, image: Image.Image) -> float:
            started.append(name)
            if len(started) == 2:
                release.set()
            await asyncio.wait_for(release.wait(), timeout=5)
            return 1.0

        return reward(name=name)(fn)

    output = await CompositeReward([waiter("a"), waiter("b")]).ascore("p", image)
    assert output.score == 2.0


# --------------------------------------------------------------------------- PairwiseReward


class SyncPreferBrighter(PairwiseReward):
    def compare(
        self, prompt: str, a: Image.Image, b: Image.Image, ctx: RewardContext | None = None
    ) -> Any:
        return 1.0 if a.convert("L").getpixel((0, 0)) > b.convert("L").getpixel((0, 0)) else 0.0


class AsyncPreferBrighter(PairwiseReward):
    async def acompare(
        self, prompt: str, a: Image.Image, b: Image.Image, ctx: RewardContext | None = None
    ) -> Any:
        return PairwiseOutput(
            prob_a_better=0.9 if a.convert("L").getpixel((0, 0)) > 128 else 0.1,
            info={"judge": "async"},
        )


WHITE, BLACK = Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black")


async def test_pairwise_reward_implementing_compare_works_through_acompare() -> None:
    output = await SyncPreferBrighter().acompare("p", WHITE, BLACK)
    assert output == PairwiseOutput(prob_a_better=1.0)
    assert (await SyncPreferBrighter().acompare("p", BLACK, WHITE)).prob_a_better == 0.0


def test_pairwise_reward_implementing_acompare_works_through_compare() -> None:
    output = AsyncPreferBrighter().compare("p", WHITE, BLACK)
    assert output.prob_a_better == 0.9
    assert output.info == {"judge": "async"}


def test_pairwise_reward_async_float_is_coerced_from_compare() -> None:
    class AsyncFloat(PairwiseReward):
        async def acompare(self, prompt: str, a: Any, b: Any, ctx: Any = None) -> Any:
            return 0.6

    assert AsyncFloat().compare("p", WHITE, BLACK) == PairwiseOutput(prob_a_better=0.6)


async def test_pairwise_reward_none_is_a_failed_comparison() -> None:
    class Undecided(PairwiseReward):
        def compare(self, prompt: str, a: Any, b: Any, ctx: Any = None) -> Any:
            return None

    assert (await Undecided().acompare("p", WHITE, BLACK)).prob_a_better is None


def test_pairwise_reward_implementing_neither_fails_at_definition() -> None:
    with pytest.raises(ConfigurationError, match="implement `compare"):

        class Empty(PairwiseReward):
            pass


def test_pairwise_reward_name_defaults_to_snake_case() -> None:
    assert SyncPreferBrighter.name == "sync_prefer_brighter"


# --------------------------------------------------------------------------- simulator judge


def _scene(caption: str, seed: int = 0) -> Image.Image:
    data = SceneTool(size=64, error_scale=0.0).generate(caption, seed)
    return Image.open(io.BytesIO(data))


def test_scene_judge_scores_a_matching_simulator_image_one() -> None:
    output = SceneJudge().score(PROMPT, _scene(PROMPT))
    assert output.score == 1.0
    assert output.components
    assert set(output.components.values()) == {1.0}
    assert output.info["failed"] == []


def test_scene_judge_is_strict_and_records_failing_constraints() -> None:
    output = SceneJudge().score("three red apples and one blue cup", _scene(PROMPT))
    assert output.score == 0.0
    failed = [key for key, value in output.components.items() if value == 0.0]
    assert failed and all(key.startswith("apple") and key.endswith("count") for key in failed)
    assert any(value == 1.0 for value in output.components.values())
    assert len(output.info["failed"]) == len(failed)


def test_scene_judge_fraction_mode_gives_share_of_constraints_met() -> None:
    output = SceneJudge(mode="fraction").score("three red apples and one blue cup", _scene(PROMPT))
    values = list(output.components.values())
    assert 0.0 < output.score < 1.0  # type: ignore[operator]
    assert output.score == pytest.approx(sum(values) / len(values))


def test_scene_judge_uses_task_metadata_from_the_context() -> None:
    task = Task(
        prompt="a photo of some fruit",
        metadata={"include": [{"class": "apple", "count": 2, "color": "red"}]},
    )
    output = SceneJudge().score(task.prompt, _scene("two red apples"), RewardContext(task=task))
    assert output.score == 1.0


def test_scene_judge_gives_none_for_a_non_simulator_image() -> None:
    output = SceneJudge().score(PROMPT, Image.new("RGB", (16, 16), "red"))
    assert output.score is None
    assert output.failed
    assert "error" in output.info


def test_scene_judge_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        SceneJudge(mode="lenient")  # type: ignore[arg-type]


async def test_safe_ascore_surfaces_a_reward_returning_the_wrong_type(image: Image.Image) -> None:
    # a wrong return type is a bug in the reward, not a judge failure to record and move past
    class Returns(Reward):
        def score(self, prompt: str, image: Image.Image, ctx: Any = None) -> Any:
            return "0.5"

    with pytest.raises(ConfigurationError, match="return a float"):
        await Returns().safe_ascore("p", image)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_become_recorded_failures(value: float) -> None:
    assert coerce_reward_output(value).score is None
    out = coerce_reward_output(RewardOutput(score=value, info={"judge": "x"}))
    assert out.score is None and out.info["judge"] == "x" and "score" in out.info["error"]


def test_sync_async_mix_ups_in_rewards_fail_at_definition() -> None:
    with pytest.raises(ConfigurationError, match="score is async"):

        class AsyncScore(Reward):
            async def score(self, prompt: str, image: Any, ctx: Any = None) -> Any:  # type: ignore[override]
                return 1.0

    with pytest.raises(ConfigurationError, match="ascore must be `async def`"):

        class SyncAscore(Reward):
            def ascore(self, prompt: str, image: Any, ctx: Any = None) -> Any:  # type: ignore[override]
                return 1.0
