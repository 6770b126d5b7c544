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
from genagent.sim._vocab import CLASSES, plural
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
    policy = HeuristicPolicy(miss_rate=0, false_alarm_rate=0)
    agent = Agent(tools=scene_tools(error_scale=0), policy=policy)
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


# --------------------------------------------------------------------------- review fixes


def _banana_image() -> Image.Image:
    return open_png(SceneTool(error_scale=0).generate("a banana", 0))


@pytest.mark.parametrize(
    ("include", "message"),
    [
        ([{"class": "banana", "count": "abc"}], "count"),
        ({"class": "banana", "count": 1}, "list"),
        ("banana", "list"),
        ([], "empty"),
        (["banana"], "entry"),
        ([{"count": 1}], "class"),
        ([{"class": "unicorn"}], "class"),
        ([{"class": "bananas"}], "class"),
        ([{"class": "banana", "count": 2.9}], "count"),
        ([{"class": "banana", "count": True}], "count"),
        ([{"class": "banana", "count": 0}], "count"),
        ([{"class": "banana", "count": -2}], "count"),
        ([{"class": "banana", "count": None}], "count"),
        ([{"class": "banana", "color": "teal"}], "color"),
        ([{"class": "banana", "color": 3}], "color"),
        ([{"class": "banana", "size": "enormous"}], "size"),
        ([{"class": "banana", "region": "middle"}], "region"),
        ([{"class": "banana"}, {"class": "cup", "position": ["near", 0]}], "position"),
        ([{"class": "banana"}, {"class": "cup", "position": ["left of", 5]}], "position"),
        ([{"class": "banana"}, {"class": "cup", "position": ["left of", True]}], "position"),
        ([{"class": "banana"}, {"class": "cup", "position": ["left of", 1]}], "position"),
        ([{"class": "banana"}, {"class": "cup", "position": "left of 0"}], "position"),
        ([{"class": "banana", "colour": "red"}], "colour"),
    ],
)
def test_malformed_include_is_rejected_and_never_scored_from_the_prompt(
    include: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SceneSpec.from_include(include)  # type: ignore[arg-type]
    task = Task(prompt="a photo of a banana", metadata={"include": include})
    out = SceneJudge().score(task.prompt, _banana_image(), RewardContext(task=task))
    assert out.score is None
    assert "include" in out.info["error"] and message in out.info["error"]


@pytest.mark.parametrize("include", [None, 0, {}, ""])
def test_include_of_any_value_is_used_even_when_falsy(include: object) -> None:
    task = Task(prompt="a photo of a banana", metadata={"include": include})
    out = SceneJudge().score(task.prompt, _banana_image(), RewardContext(task=task))
    assert out.score is None and "include" in out.info["error"]


def test_only_tasks_without_include_parse_the_prompt() -> None:
    task = Task(prompt="a photo of a banana", metadata={"tag": "single_object"})
    assert SceneJudge().score(task.prompt, _banana_image(), RewardContext(task=task)).score == 1.0
    aliases = [
        {"class": "banana", "count": 1, "size": "larger", "region": "above", "color": "yellow"}
    ]
    spec = SceneSpec.from_include(aliases)
    assert (spec.objects[0].size, spec.objects[0].region) == ("large", "top")


@pytest.mark.parametrize(
    ("instruction", "kind", "color", "source", "size", "count"),
    [
        ("make the small cup blue", "recolor", "blue", None, "small", None),
        ("make the large red apples green", "recolor", "green", "red", "large", None),
        ("make the cup next to the red apple blue", "recolor", "blue", None, None, None),
        ("make the cup orange", "recolor", "orange", None, None, None),
        ("make the small bench much larger", "resize", None, None, "large", None),
        ("make the benches much smaller", "resize", None, None, "small", None),
        ("remove 2 apples", "remove", None, None, None, 2),
        ("remove two red apples", "remove", None, "red", None, 2),
        ("remove the apples", "remove", None, None, None, None),
        ("add 3 apples", "add", "red", None, None, 3),
        ("add 12 more red apples on the left", "add", "red", None, None, 12),
        ("add three more apples", "add", None, None, None, 3),
    ],
)
def test_edit_parser_reads_targets_selectors_and_counts(
    instruction: str,
    kind: str,
    color: str | None,
    source: str | None,
    size: str | None,
    count: int | None,
) -> None:
    op = parse_edit(instruction)
    assert op.kind == kind
    if kind == "recolor":  # size words before the object select, they are not a target
        assert (op.color, op.source_color, op.source_size) == (color, source, size)
    elif kind == "resize":
        assert op.size == size
        assert op.source_size == ("small" if "small bench" in instruction else None)
    else:
        assert op.count == count
        if kind == "add" and "red" in instruction:
            assert op.color == "red"


def _manual_record(objects: list[tuple[str, str, float]]) -> object:
    from genagent.sim import DrawnObject, SceneRecord

    drawn = [
        DrawnObject(cls, color, (10 + 40 * i, 40, 10 + 40 * i + side, 40 + side))
        for i, (cls, color, side) in enumerate(objects)
    ]
    return SceneRecord(width=256, height=256, objects=drawn)


def test_edits_apply_digit_counts_and_size_selectors() -> None:
    editor = SceneEditTool(error_scale=0)
    five = _manual_record([("apple", "red", 20)] * 5)
    assert len(editor.edit(five, "remove 2 apples", 0).objects) == 3  # type: ignore[arg-type]
    assert len(editor.edit(five, "add 3 apples", 0).objects) == 8  # type: ignore[arg-type]
    cups = _manual_record([("cup", "red", 50), ("cup", "red", 14)])
    edited = editor.edit(cups, "make the small cup blue", 0)  # type: ignore[arg-type]
    assert [o.color for o in edited.objects] == ["red", "blue"]
    edited = editor.edit(cups, "make the large red cups green", 0)  # type: ignore[arg-type]
    assert [o.color for o in edited.objects] == ["green", "red"]


@pytest.mark.parametrize("instruction", ["remove 0 apples", "add 500 apples", "add 21 apples"])
def test_edits_with_impossible_counts_are_model_visible_errors(instruction: str) -> None:
    with pytest.raises(ToolArgumentError) as info:
        parse_edit(instruction)
    assert info.value.hint


@pytest.mark.parametrize("n", range(1, 21))
def test_the_policys_add_and_remove_instructions_parse_with_their_counts(n: int) -> None:
    from genagent.sim import DrawnObject
    from genagent.sim.policy import edit_instruction

    want = SceneSpec.from_include([{"class": "apple", "count": 20}])
    drawn = [DrawnObject("apple", "red", (0, 0, 5, 5))] * (20 - n)
    failure = next(r for r in check_scene(want, drawn, 256, 256) if not r.passed)
    op = parse_edit(edit_instruction(want, failure, drawn))
    assert (op.kind, op.count) == ("add", n)
    want = SceneSpec.from_include([{"class": "apple", "count": 1}])
    drawn = [DrawnObject("apple", "red", (0, 0, 5, 5))] * (1 + n)
    failure = next(r for r in check_scene(want, drawn, 256, 256) if not r.passed)
    op = parse_edit(edit_instruction(want, failure, drawn))
    assert (op.kind, op.count) == ("remove", n)


def test_a_100k_character_caption_is_handled_in_well_under_a_second() -> None:
    import time

    tool = SceneTool()
    for caption in ("red apples, " * 9000, "apple " * 16667, "an apple and the apple " * 4400):
        caption = caption[:100_000]
        start = time.perf_counter()
        with pytest.raises(ToolArgumentError) as info:
            tool.generate(caption, 0)
        assert time.perf_counter() - start < 2.0
        assert info.value.hint
        start = time.perf_counter()
        parse_caption(caption)
        assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        (", ".join(f"two {plural(c)}" for c in CLASSES[:25]), "25 object groups"),
        ("a photo of 21 apples", "count"),
        ("a photo of an apple. " + "Really. " * 600, "characters"),
    ],
)
def test_scene_tool_rejects_oversized_scenes_visibly(caption: str, message: str) -> None:
    assert len(parse_caption(", ".join(f"two {plural(c)}" for c in CLASSES[:24])).objects) == 24
    SceneTool().generate(", ".join(f"two {plural(c)}" for c in CLASSES[:24]), 0)  # at the cap
    with pytest.raises(ToolArgumentError, match=message) as info:
        SceneTool().generate(caption, 0)
    assert info.value.hint
    SceneTool().generate("a photo of 20 apples", 0)  # the largest count is fine


def test_error_model_computes_complexity_once_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from genagent.sim import ErrorModel

    calls = []
    original = ErrorModel.complexity

    def counting(self: ErrorModel, spec: SceneSpec) -> float:
        calls.append(1)
        return original(self, spec)

    monkeypatch.setattr(ErrorModel, "complexity", counting)
    caption = ", ".join(f"two {c} apples" for c in ["red", "blue", "green", "pink"])
    SceneTool().generate(caption + " and a large cup on the left", 0)
    assert len(calls) <= 1


def test_invalid_settings_are_configuration_errors() -> None:
    from genagent.errors import ConfigurationError

    for make in (
        lambda: SceneTool(size=8),
        lambda: SceneTool(size=100.5),  # type: ignore[arg-type]
        lambda: SceneTool(error_scale=-1),
        lambda: SceneTool(error_scale=float("nan")),
        lambda: SceneEditTool(error_scale=-1),
        lambda: HeuristicPolicy(miss_rate=2),
        lambda: HeuristicPolicy(false_alarm_rate=-0.1),
        lambda: HeuristicPolicy(false_alarm_rate="x"),  # type: ignore[arg-type]
        lambda: SceneJudge(mode="lenient"),  # type: ignore[arg-type]
        lambda: sample_tasks(-1),
        lambda: sample_tasks(2, categories=["nope"]),
    ):
        with pytest.raises(ConfigurationError):
            make()


def test_policy_raises_false_alarms_on_constraints_that_hold() -> None:
    assert HeuristicPolicy().false_alarm_rate == 0.03
    assert HeuristicPolicy().describe()["false_alarm_rate"] == 0.03
    prompt = "a photo of three clocks on the left and a cat on the right"
    honest = HeuristicPolicy(miss_rate=0, false_alarm_rate=0)
    alarmed = HeuristicPolicy(miss_rate=0, false_alarm_rate=1)
    tools = scene_tools(error_scale=0)
    assert Agent(tools=tools, policy=honest).run(prompt, seed=0).num_rounds == 1
    trajectory = Agent(tools=tools, policy=alarmed, max_rounds=3).run(prompt, seed=0)
    assert trajectory.termination == "max_rounds" and trajectory.num_rounds == 3
    first = trajectory.turns[1].action
    assert first is not None and first.judgment is not None and "[ok]" not in first.judgment


def test_false_alarm_rate_is_about_right_and_deterministic() -> None:
    agent = Agent(
        tools=scene_tools(error_scale=0),
        policy=HeuristicPolicy(miss_rate=0, false_alarm_rate=0.2, seed=3),
        max_rounds=2,
    )
    tasks = sample_tasks(120, seed=6)
    runs = agent.run_batch(tasks, seeds=list(range(120)))
    again = agent.run_batch(tasks, seeds=list(range(120)))
    marks = Counter()
    for trajectory in runs:
        judgment = trajectory.turns[1].action.judgment  # type: ignore[union-attr]
        marks["ok"] += judgment.count("[ok]")
        marks["wrong"] += judgment.count("[wrong]")
    rate = marks["wrong"] / (marks["ok"] + marks["wrong"])
    assert 0.14 < rate < 0.26
    assert [t.turns[1].reply for t in runs] == [t.turns[1].reply for t in again]


def test_policy_sees_only_the_drawn_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    import genagent.sim.policy as policy_module

    class Visible:
        def __init__(self, record: object) -> None:
            self.objects = record.objects  # type: ignore[attr-defined]
            self.width = record.width  # type: ignore[attr-defined]
            self.height = record.height  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"the policy read record.{name}")

    real = policy_module.read_record
    monkeypatch.setattr(
        policy_module, "read_record", lambda image: (r := real(image)) and Visible(r)
    )
    agent = Agent(policy=HeuristicPolicy(false_alarm_rate=0.3), max_rounds=4)
    for trajectory in agent.run_batch(sample_tasks(24, seed=2), seeds=list(range(24))):
        assert trajectory.error is None


def test_demo_reports_a_compute_matched_best_of_n_baseline() -> None:
    one = run_demo(24, rounds=1, seed=3, progress=False)
    assert one.best_of_n.correct == one.single_shot.correct
    three = run_demo(24, rounds=3, seed=3, progress=False)
    assert three.best_of_n.correct >= three.single_shot.correct
    assert three.to_dict()["best_of_n"]["correct"] == three.best_of_n.correct
    assert three.best_of_n.total == 24


def test_policy_keeps_the_best_of_several_candidates_with_select() -> None:
    judge = SceneJudge()
    agent = Agent(policy=HeuristicPolicy(miss_rate=0, false_alarm_rate=0), candidates=4)
    selected = 0
    for task in sample_tasks(24, seed=6):
        trajectory = agent.run(task, seed=3)
        outcome = trajectory.turns[0].tool_result
        assert outcome is not None and len(outcome.images) == 4
        if outcome.selected_by == "policy":
            selected += 1
            assert trajectory.turns[1].reply.startswith(f"<select>{outcome.selected + 1}</select>")
            scores = [
                judge.score(
                    task.prompt, trajectory.images[i].open(), RewardContext(task=task)
                ).score
                for i in outcome.images
            ]
            # the kept candidate passes whenever any candidate does
            assert scores[outcome.selected] == max(s or 0.0 for s in scores)
    assert selected == 24
