"""The offline simulator: caption parsing, the error model, edits, the judge, the heuristic policy
and the demo."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
from PIL import Image

from genagent import Agent, RewardContext, Task, ToolArgumentError
from genagent.sim import (
    CATEGORIES,
    RECORD_KEY,
    HeuristicPolicy,
    SceneEditTool,
    SceneJudge,
    SceneSpec,
    SceneTool,
    check_scene,
    parse_caption,
    parse_edit,
    read_record,
    sample_tasks,
    scene_tools,
    write_caption,
)
from genagent.sim.demo import run_demo, wilson_interval


def canonical(spec: SceneSpec) -> set[tuple[object, ...]]:
    """Order-free meaning of a scene: relations are normalised to (class, relation, class)."""
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    out: set[tuple[object, ...]] = set()
    for obj in spec.objects:
        out.add((obj.cls, obj.count, obj.color, obj.size, obj.region))
        if obj.relation is not None:
            relation, j = obj.relation
            other = spec.objects[j].cls
            first = min((obj.cls, relation, other), (other, opposite[relation], obj.cls))
            out.add(("relation", *first))
    return out


def open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


TASKS = sample_tasks(160, seed=7)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.id)
def test_prompt_parses_to_the_task_metadata(task: Task) -> None:
    expected = SceneSpec.from_include(task.metadata["include"])
    assert canonical(parse_caption(task.prompt)) == canonical(expected)


@pytest.mark.parametrize("task", TASKS[:48], ids=lambda t: t.id)
def test_explicit_caption_keeps_the_meaning_and_is_explicit(task: Task) -> None:
    spec = parse_caption(task.prompt)
    caption = write_caption(spec)
    parsed = parse_caption(caption)
    assert canonical(parsed) == canonical(spec)
    for i, obj in enumerate(parsed.objects):
        assert parsed.level("count", i) >= 1
        if obj.color:
            assert parsed.level("color", i) >= 1
        if obj.region:
            assert parsed.level("region", i) >= 1


def test_orange_is_a_colour_before_a_noun_and_a_fruit_otherwise() -> None:
    spec = parse_caption("an orange cup and two oranges. The cup is orange.")
    assert canonical(spec) == {("cup", 1, "orange", None, None), ("orange", 2, None, None, None)}


def test_restated_objects_are_not_counted_twice() -> None:
    spec = parse_caption(
        "Exactly three red apples on the left side of the image. The apples are red. "
        "There are exactly three apples in total."
    )
    assert canonical(spec) == {("apple", 3, "red", None, "left")}
    assert spec.level("count", 0) == 2


def test_geneval_style_relation_and_region_phrases() -> None:
    assert canonical(parse_caption("a photo of a wine glass above a kite")) == {
        ("wine glass", 1, None, None, None),
        ("kite", 1, None, None, None),
        ("relation", "kite", "below", "wine glass"),
    }
    spec = parse_caption("A photo of two baseball gloves on the above and three cows on the below")
    assert [(o.cls, o.count, o.region) for o in spec.objects] == [
        ("baseball glove", 2, "top"),
        ("cow", 3, "bottom"),
    ]


# --------------------------------------------------------------------------- generator


def test_scene_tool_is_deterministic_per_caption_and_seed() -> None:
    tool = SceneTool()
    caption = "three red apples and a blue cup"
    assert tool.generate(caption, 5) == tool.generate(caption, 5)
    assert len({tool.generate(caption, s) for s in range(8)}) > 1


def test_images_embed_what_was_drawn() -> None:
    image = open_png(SceneTool(error_scale=0).generate("two blue cups on the left", 1))
    record = read_record(image)
    assert record is not None and RECORD_KEY in image.info
    assert [(o.cls, o.color) for o in record.objects] == [("cup", "blue"), ("cup", "blue")]
    assert all(o.center[0] < record.width / 2 for o in record.objects)


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_a_perfect_generator_satisfies_every_task(category: str) -> None:
    tool, judge = SceneTool(error_scale=0), SceneJudge()
    for task in sample_tasks(12, seed=3, categories=[category]):
        image = open_png(tool.generate(task.prompt, 0))
        assert judge.score(task.prompt, image, RewardContext(task=task)).score == 1.0


def _failure_rate(captions_and_tasks: list[tuple[str, Task]], seeds: int) -> float:
    tool, judge = SceneTool(), SceneJudge()
    failures = total = 0
    for caption, task in captions_and_tasks:
        for seed in range(seeds):
            image = open_png(tool.generate(caption, seed))
            failures += judge.score(task.prompt, image, RewardContext(task=task)).score != 1.0
            total += 1
    return failures / total


def test_explicit_captions_make_fewer_mistakes_than_raw_prompts() -> None:
    tasks = sample_tasks(40, seed=11)
    raw = _failure_rate([(t.prompt, t) for t in tasks], seeds=6)
    explicit = _failure_rate([(write_caption(parse_caption(t.prompt)), t) for t in tasks], seeds=6)
    assert explicit < raw - 0.1


def test_complex_scenes_fail_more_often_than_simple_ones() -> None:
    simple = sample_tasks(30, seed=2, categories=["counting"])
    complex_ = sample_tasks(30, seed=2, categories=["color_attr"])
    assert _failure_rate([(t.prompt, t) for t in complex_], 6) > _failure_rate(
        [(t.prompt, t) for t in simple], 6
    )


def test_larger_counts_fail_more_often() -> None:
    def rate(count: int) -> float:
        words = ["", "one", "two", "three", "four", "five", "six", "seven"]
        task = Task(prompt=f"a photo of {words[count]} clocks")
        return _failure_rate([(task.prompt, task)], seeds=200)

    assert rate(7) > rate(2) + 0.1


def test_error_scale_zero_and_invalid_settings() -> None:
    with pytest.raises(ValueError, match="error_scale"):
        SceneTool(error_scale=-1)
    with pytest.raises(ValueError, match="size"):
        SceneTool(size=8)


# --------------------------------------------------------------------------- edits


def _record(caption: str) -> object:
    record = read_record(open_png(SceneTool(error_scale=0).generate(caption, 0)))
    assert record is not None
    return record


@pytest.mark.parametrize(
    ("caption", "instruction", "prompt"),
    [
        ("a red cup", "make the cup blue", "a blue cup"),
        ("two apples", "add one more apple", "three apples"),
        ("three apples", "remove one apple", "two apples"),
        ("a cup and a dog", "remove the dog", "a cup"),
        ("a cup on the left", "move the cup to the right side of the image", "a cup on the right"),
        ("a dog left of a cat", "move the dog to the right of the cat", "a dog right of a cat"),
        (
            "a small bench on the top and a small spoon on the bottom",
            "make the bench much larger",
            "a large bench on the top and a small spoon on the bottom",
        ),
    ],
)
def test_each_edit_kind_takes_effect(caption: str, instruction: str, prompt: str) -> None:
    edited = SceneEditTool(error_scale=0).edit(_record(caption), instruction, 0)  # type: ignore[arg-type]
    results = check_scene(parse_caption(prompt), edited.objects, edited.width, edited.height)
    assert all(r.passed for r in results), [(r.constraint, r.observed) for r in results]


def test_a_failed_edit_leaves_the_image_unchanged_and_says_so() -> None:
    record = _record("a red cup")
    tool = SceneEditTool(error_scale=100)  # every edit fails
    edited = tool.edit(record, "make the cup blue", 0)  # type: ignore[arg-type]
    assert edited.objects == record.objects  # type: ignore[attr-defined]
    assert edited.mistakes == ["recolor edit had no effect"]


@pytest.mark.parametrize("instruction", ["do something nice", "make the cup", "move the cup"])
def test_unsupported_edits_are_model_visible_errors(instruction: str) -> None:
    with pytest.raises(ToolArgumentError) as info:
        parse_edit(instruction)
    assert info.value.hint  # says what instructions are understood


# --------------------------------------------------------------------------- judge


def test_judge_scores_per_constraint_and_reports_failures() -> None:
    task = Task(
        prompt="a photo of two red apples and a blue cup",
        metadata={
            "include": [
                {"class": "apple", "count": 2, "color": "red"},
                {"class": "cup", "count": 1, "color": "blue"},
            ]
        },
    )
    image = open_png(SceneTool(error_scale=0).generate("two red apples and a green cup", 0))
    out = SceneJudge().score(task.prompt, image, RewardContext(task=task))
    assert out.score == 0.0
    assert out.components["cup#1.color"] == 0.0 and out.components["apple#0.count"] == 1.0
    assert any("cup is blue" in f for f in out.info["failed"])
    assert SceneJudge(mode="fraction").score(
        task.prompt, image, RewardContext(task=task)
    ).score == pytest.approx(5 / 6)


def test_judge_fails_visibly_on_images_it_cannot_read() -> None:
    out = SceneJudge().score("a cat", Image.new("RGB", (8, 8)))
    assert out.score is None and "not a simulator image" in out.info["error"]


def test_judge_uses_geneval_metadata_files() -> None:
    line = {
        "tag": "position",
        "include": [
            {"class": "teddy bear", "count": 1},
            {"class": "dog", "count": 1, "position": ["right of", 0]},
        ],
        "prompt": "a photo of a dog right of a teddy bear",
    }
    task = Task(prompt=line["prompt"], metadata=line)  # type: ignore[arg-type]
    right = open_png(SceneTool(error_scale=0).generate("a dog to the right of a teddy bear", 0))
    wrong = open_png(SceneTool(error_scale=0).generate("a dog to the left of a teddy bear", 0))
    judge = SceneJudge()
    assert judge.score(task.prompt, right, RewardContext(task=task)).score == 1.0
    assert judge.score(task.prompt, wrong, RewardContext(task=task)).score == 0.0


# --------------------------------------------------------------------------- policy


def test_policy_answers_after_one_round_with_a_perfect_generator() -> None:
    agent = Agent(tools=scene_tools(error_scale=0), policy=HeuristicPolicy(miss_rate=0))
    trajectory = agent.run("a photo of three clocks on the left and a cat on the right", seed=0)
    assert trajectory.termination == "answered"
    assert trajectory.num_rounds == 1
    first = trajectory.turns[0].action
    assert first is not None and first.tool_call is not None
    assert "exactly three clocks" in first.tool_call.arguments["caption"]


def test_policy_edits_a_single_problem_and_regenerates_several() -> None:
    agent = Agent(policy=HeuristicPolicy(miss_rate=0), max_rounds=4)
    kinds = Counter()
    for task in sample_tasks(60, seed=5):
        trajectory = agent.run(task, seed=1)
        for turn in trajectory.turns[1:]:
            if turn.action is not None and turn.action.tool_call is not None:
                kinds[turn.action.tool_call.name] += 1
    assert kinds["image_editing_tool"] > 0 and kinds["image_generation_tool"] > 0


def test_policy_regenerates_when_only_a_generator_is_offered() -> None:
    agent = Agent(tools=[SceneTool()], policy=HeuristicPolicy(miss_rate=0), max_rounds=3)
    for task in sample_tasks(30, seed=8):
        trajectory = agent.run(task, seed=2)
        names = {
            t.action.tool_call.name for t in trajectory.turns if t.action and t.action.tool_call
        }
        assert names == {"image_generation_tool"}


def test_policy_replies_always_parse() -> None:
    trajectories = Agent(max_rounds=4).run_batch(sample_tasks(80, seed=9), seeds=list(range(80)))
    for trajectory in trajectories:
        assert trajectory.error is None
        assert all(turn.action is not None for turn in trajectory.turns)


def test_policy_judgments_match_the_judge_when_it_misses_nothing() -> None:
    judge = SceneJudge()
    agent = Agent(policy=HeuristicPolicy(miss_rate=0), rewards={"judge": judge})
    for trajectory in agent.run_batch(sample_tasks(40, seed=4), seeds=list(range(40))):
        if trajectory.termination == "answered":
            assert trajectory.rewards["judge"].score == 1.0


# --------------------------------------------------------------------------- tasks and demo


def test_sample_tasks_is_deterministic_and_covers_the_categories() -> None:
    a, b = sample_tasks(16, seed=1), sample_tasks(16, seed=1)
    assert a == b
    assert {t.category for t in a} == set(CATEGORIES)
    assert all(t.metadata["include"] for t in a)
    with pytest.raises(ValueError, match="unknown categories"):
        sample_tasks(2, categories=["nope"])


def test_wilson_interval_brackets_the_proportion() -> None:
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_demo_agent_beats_single_shot_by_twenty_points_on_200_tasks(tmp_path: object) -> None:
    report = run_demo(200, rounds=3, seed=0, progress=False)
    assert report.per_round[-1].value >= report.single_shot.value + 0.20
    assert report.improvement_ci[0] > 0.1
    # the scaling curve rises with rounds
    values = [a.value for a in report.per_round]
    assert values == sorted(values)


def test_demo_writes_loadable_trajectories_and_a_summary(tmp_path: object) -> None:
    from pathlib import Path

    from genagent import Trajectory

    out = Path(str(tmp_path))
    report = run_demo(12, rounds=2, seed=1, out=out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["simulator"] is True and summary["tasks"] == 12
    folders = sorted((out / "trajectories").iterdir())
    assert len(folders) == 12
    loaded = Trajectory.load(folders[0])
    assert loaded == report.trajectories[0]
    assert loaded.rewards["scene_judge"].score in (0.0, 1.0)
