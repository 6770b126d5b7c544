"""VLM judges and reflection accuracy: scripted replies, a real OpenAI-compatible server on
127.0.0.1, GenEval++ metadata, best-of-N in the agent, and simulator runs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from genagent import (
    Agent,
    ConfigurationError,
    FunctionPolicy,
    GenerationTool,
    Message,
    PairwiseReward,
    ScriptedPolicy,
    Task,
    ToolContext,
    ToolResult,
    reward,
)
from genagent.policies import OpenAIPolicy
from genagent.rewards import (
    ChecklistJudge,
    PairwiseJudge,
    PointwiseJudge,
    ReflectionAccuracy,
    RewardContext,
    RewardOutput,
    VLMJudge,
    WiseJudge,
    build_checklist,
    read_judgment,
)
from genagent.sim import HeuristicPolicy, SceneJudge, sample_tasks, scene_tools

from ._servers import Recorded, Reply, ScriptedServer

CHAT = "/v1/chat/completions"
GENEVAL_PP = Path("/work/shared/benchmarks/geneval_pp/Geneval++.jsonl")
GENEVAL = Path("/work/shared/benchmarks/geneval/evaluation_metadata.jsonl")

APPLE = Task(
    prompt="two red apples",
    metadata={"include": [{"class": "apple", "count": 2, "color": "red"}]},
)
WISE_TASK = Task(
    prompt="Traditional food of the Mid-Autumn Festival",
    metadata={"explanation": "This refers to mooncakes, round pastries."},
)


def solid(colour: str, size: tuple[int, int] = (24, 24)) -> Image.Image:
    return Image.new("RGB", size, colour)


def score(judge: Any, image: Image.Image | None = None, task: Task = APPLE) -> RewardOutput:
    image = image if image is not None else solid("red")
    ctx = RewardContext(task=task)
    output: RewardOutput = asyncio.run(judge.ascore(task.prompt, image, ctx))
    return output


def items_json(*answers: str) -> str:
    return json.dumps(
        {
            "items": [
                {"id": k, "answer": a, "reason": f"reason {k}"} for k, a in enumerate(answers, 1)
            ]
        }
    )


def is_red(ref_image: Any) -> bool:
    r, g, b = ref_image.open().convert("RGB").getpixel((0, 0))
    return bool(r > 200 and g < 60 and b < 60)


def vlm(answer: Callable[[list[Any], str], str]) -> FunctionPolicy:
    """A stand-in VLM: a function of the images it is shown and the instruction."""

    def fn(messages: Sequence[Message], stop: Any, sampling: Any) -> str:
        first = messages[0]
        return answer(first.images, first.text)

    return FunctionPolicy(fn, name="fake-vlm")


# --------------------------------------------------------------------------- checklist


def test_checklist_judge_is_strict_and_records_a_reason_per_item() -> None:
    judge = ChecklistJudge(ScriptedPolicy([items_json("yes", "no")]))
    output = score(judge)
    assert output.score == 0.0
    assert output.components == {"apple#0.count": 1.0, "apple#0.color": 0.0}
    assert [i["reason"] for i in output.info["items"]] == ["reason 1", "reason 2"]
    assert output.info["failed"] == ["apple#0.color"]
    assert output.info["items"][1]["statement"] == "All the apples are red."


def test_checklist_judge_scores_one_when_every_item_passes() -> None:
    assert score(ChecklistJudge(ScriptedPolicy([items_json("yes", "YES")]))).score == 1.0


def test_checklist_fraction_mode_gives_the_share_of_items_passed() -> None:
    judge = ChecklistJudge(ScriptedPolicy([items_json("yes", "no")]), mode="fraction")
    assert score(judge).score == 0.5


def test_every_score_records_the_judge_model_version_prompt_and_raw_reply() -> None:
    reply = items_json("yes", "yes")
    judge = ChecklistJudge(ScriptedPolicy([reply], name="my-judge"))
    info = score(judge).info
    assert info["judge"] == "ChecklistJudge"
    assert info["judge_model"] == "my-judge"
    assert info["judge_version"] == "checklist-v1"
    assert info["prompt_sha256"] == hashlib.sha256(info["prompt"].encode()).hexdigest()
    assert "two red apples" in info["prompt"] and "exactly two apples" in info["prompt"]
    assert info["raw"] == reply
    assert info["judge_policy"]["name"] == "my-judge"


def test_the_image_is_sent_as_an_image_part_with_greedy_sampling() -> None:
    seen: list[Any] = []

    def fn(messages: Sequence[Message], stop: Any, sampling: Any) -> str:
        seen.append((messages, sampling))
        return items_json("yes", "yes")

    score(ChecklistJudge(FunctionPolicy(fn)), solid("red"))
    ((messages, sampling),) = seen
    (message,) = messages
    assert message.role == "user" and len(message.images) == 1
    assert is_red(message.images[0])
    assert sampling.temperature == 0.0


@pytest.mark.parametrize(
    "reply",
    [
        "<think>Two apples, but are they red? {'maybe': 1}</think>\n" + items_json("yes", "no"),
        "Here is my answer:\n```json\n" + items_json("yes", "no") + "\n```\nHope this helps.",
        "Sure! " + items_json("yes", "no") + " Let me know.",
        "{'items': [{'id': 1, 'answer': 'Yes', 'reason': 'two'}, "
        "{'id': 2, 'answer': 'No', 'reason': 'green'}]}",
        '{"1": "yes", "2": "no"}',
        '[{"answer": true}, {"answer": false}]',
        "1. yes - there are two apples\n2. No: they are green",
        "Okay, I think.\n</think>\n1: YES (two)\n2: no (green)",
    ],
    ids=["think", "fence", "prose", "python-literal", "keyed", "list", "lines", "qwen3-think"],
)
def test_checklist_replies_are_parsed_tolerantly(reply: str) -> None:
    output = score(ChecklistJudge(ScriptedPolicy([reply]), retries=0))
    assert output.components == {"apple#0.count": 1.0, "apple#0.color": 0.0}, output.info


def test_an_unreadable_reply_is_a_recorded_failure_with_the_raw_text() -> None:
    reply = "The apples look great!"
    output = score(ChecklistJudge(ScriptedPolicy([reply]), retries=0))
    assert output.score is None and output.failed
    assert output.info["error"]["type"] == "unparseable_reply"
    assert output.info["error"]["attempts"] == 1
    assert output.info["raw"] == reply
    assert output.info["judge_version"] == "checklist-v1"


def test_a_reply_missing_an_item_is_a_failure() -> None:
    output = score(ChecklistJudge(ScriptedPolicy([items_json("yes")]), retries=0))
    assert output.score is None
    assert "2 statements" in output.info["error"]["message"]


def test_an_unreadable_reply_is_re_asked_with_the_format_then_scored() -> None:
    policy = ScriptedPolicy(["I think they are fine.", items_json("yes", "yes")])
    output = score(ChecklistJudge(policy, retries=1))
    assert output.score == 1.0
    assert output.info["raw_attempts"] == ["I think they are fine.", items_json("yes", "yes")]
    retry = policy.calls[1]
    assert [m.role for m in retry] == ["user", "assistant", "user"]
    assert retry[1].text == "I think they are fine."
    assert "could not be read" in retry[2].text and '"items"' in retry[2].text


def test_retries_are_bounded() -> None:
    policy = ScriptedPolicy(["nope"], cycle=True)
    output = score(ChecklistJudge(policy, retries=2))
    assert output.score is None
    assert len(policy.calls) == 3 and output.info["error"]["attempts"] == 3
    assert output.info["raw_attempts"] == ["nope"] * 3


def test_a_policy_error_is_a_recorded_failure_not_a_crash() -> None:
    output = score(ChecklistJudge(ScriptedPolicy([])))
    assert output.score is None
    assert output.info["error"]["type"] == "PolicyError"
    assert "ran out of replies" in output.info["error"]["message"]


def test_without_metadata_the_checklist_asks_about_the_whole_prompt() -> None:
    task = Task(prompt="a cat wearing a hat")
    output = score(ChecklistJudge(ScriptedPolicy([items_json("yes")])), task=task)
    assert output.score == 1.0 and list(output.components) == ["prompt"]
    assert '"a cat wearing a hat"' in output.info["items"][0]["statement"]


def test_malformed_metadata_is_a_recorded_failure() -> None:
    task = Task(prompt="x", metadata={"include": [{"class": "dog", "position": ["left of", 3]}]})
    policy = ScriptedPolicy([items_json("yes")])
    output = score(ChecklistJudge(policy), task=task)
    assert output.score is None and output.info["error"]["type"] == "invalid_task"
    assert "position" in output.info["error"]["message"]
    assert policy.calls == []  # nothing was asked


def test_explicit_checklist_metadata_is_used_as_given() -> None:
    task = Task(prompt="x", metadata={"checklist": ["The sky is purple.", "There is a moon."]})
    output = score(ChecklistJudge(ScriptedPolicy([items_json("no", "yes")])), task=task)
    assert output.components == {"item1": 0.0, "item2": 1.0}


def geneval_pp_lines() -> list[dict[str, Any]]:
    if not GENEVAL_PP.exists():
        pytest.skip(f"{GENEVAL_PP} is not available")
    return [json.loads(line) for line in GENEVAL_PP.read_text().splitlines() if line.strip()]


def test_every_geneval_pp_line_gives_a_checklist_with_an_item_per_constraint() -> None:
    for line in geneval_pp_lines():
        items = build_checklist(line["prompt"], line)
        expected = sum(
            1 + sum(k in entry for k in ("color", "region", "size", "position"))
            for entry in line["include"]
        )
        assert len(items) == expected, line  # exact counts make each exclude redundant
        assert len({i.key for i in items}) == len(items)


def test_geneval_pp_checklists_read_as_plain_statements() -> None:
    by_tag: dict[str, dict[str, Any]] = {}
    for line in geneval_pp_lines():
        by_tag.setdefault(line["tag"], line)
    spatial = build_checklist("", by_tag["spatial_count_attr"])
    assert [i.key for i in spatial] == [
        "clock#0.count",
        "clock#0.region",
        "cat#1.count",
        "cat#1.region",
    ]
    assert [i.statement for i in spatial] == [
        "The image contains exactly three clocks.",
        "The clocks are on the left side of the image.",
        "The image contains exactly one cat.",
        "The cat is on the right side of the image.",
    ]
    size = build_checklist("", by_tag["size_spatial_attr"])
    assert "The bench is larger than the spoon." in [i.statement for i in size]
    assert "The bench is in the upper half of the image." in [i.statement for i in size]
    colours = build_checklist("", by_tag["color_count_attr"])
    assert "All the boats are white." in [i.statement for i in colours]


def test_geneval_counts_can_be_read_as_minimums_with_exclude_caps() -> None:
    meta = {
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
    }
    assert [i.statement for i in build_checklist("", meta)] == [
        "The image contains exactly two clocks."
    ]
    assert [i.statement for i in build_checklist("", meta, counts="at_least")] == [
        "The image contains at least two clocks.",
        "The image contains fewer than three clocks.",
    ]
    position = {"include": [{"class": "teddy bear"}, {"class": "dog", "position": ["right of", 0]}]}
    assert (
        build_checklist("", position)[-1].statement == "The dog is to the right of the teddy bear."
    )


def test_every_geneval_line_gives_a_checklist() -> None:
    if not GENEVAL.exists():
        pytest.skip(f"{GENEVAL} is not available")
    for line in GENEVAL.read_text().splitlines():
        meta = json.loads(line)
        assert build_checklist(meta["prompt"], meta, counts="at_least")


# --------------------------------------------------------------------------- WISE


def test_wise_judge_computes_the_wiscore_and_uses_the_explanation() -> None:
    judge = WiseJudge(ScriptedPolicy(["Consistency: 2\nRealism: 1\nAesthetic Quality: 0"]))
    output = score(judge, task=WISE_TASK)
    assert output.score == pytest.approx((0.7 * 2 + 0.2 * 1 + 0.1 * 0) / 2)
    assert output.components == {"consistency": 2.0, "realism": 1.0, "aesthetic_quality": 0.0}
    assert "mooncakes" in output.info["prompt"] and output.info["judge_version"] == "wise-v1"


@pytest.mark.parametrize(
    "reply",
    [
        "**Consistency**: 1\n**Realism:** 2\n**Aesthetic Quality**: 2",
        "<think>Consistency: 0 at first glance...</think>Consistency (0-2): 1\nRealism: 2\n"
        "Aesthetic quality: 2",
        '```json\n{"Consistency": 1, "Realism": 2, "Aesthetic Quality": 2}\n```',
    ],
)
def test_wise_replies_are_parsed_tolerantly(reply: str) -> None:
    output = score(WiseJudge(ScriptedPolicy([reply]), retries=0), task=WISE_TASK)
    assert output.components == {"consistency": 1.0, "realism": 2.0, "aesthetic_quality": 2.0}


def test_wise_scores_outside_zero_to_two_are_failures() -> None:
    reply = "Consistency: 3\nRealism: 1\nAesthetic Quality: 1"
    output = score(WiseJudge(ScriptedPolicy([reply]), retries=0), task=WISE_TASK)
    assert output.score is None and "0, 1 or 2" in output.info["error"]["message"]


def test_wise_verified_mode_is_binary() -> None:
    judge = WiseJudge(
        ScriptedPolicy(['{"reason": "Mooncakes are shown.", "score": 1}']), mode="verified"
    )
    output = score(judge, task=WISE_TASK)
    assert output.score == 1.0 and output.components == {"verified": 1.0}
    assert output.info["reason"] == "Mooncakes are shown."
    assert output.info["judge_version"] == "wise-verified-v1"
    assert judge.describe()["judge_version"] == "wise-verified-v1"
    line = score(WiseJudge(ScriptedPolicy(["Reason: literal.\nScore: 0"]), mode="verified"))
    assert line.score == 0.0


def test_wise_without_an_explanation_still_asks() -> None:
    output = score(WiseJudge(ScriptedPolicy(["Consistency: 2\nRealism: 2\nAesthetic Quality: 2"])))
    assert output.score == 1.0 and "Explanation:" not in output.info["prompt"]


# --------------------------------------------------------------------------- pointwise


def test_pointwise_judge_normalises_the_rating() -> None:
    judge = PointwiseJudge(
        ScriptedPolicy(['{"reason": "Close.", "score": 7}']), "How well does it follow the prompt?"
    )
    output = score(judge)
    assert output.score == pytest.approx(0.7)
    assert output.components == {"rating": 7.0} and output.info["reason"] == "Close."
    assert "How well does it follow the prompt?" in output.info["prompt"]
    assert output.info["judge_version"] == "pointwise-v1"


def test_pointwise_judge_reads_a_score_line_on_its_own_scale() -> None:
    judge = PointwiseJudge(ScriptedPolicy(["Score: 4/5"]), "Aesthetics?", scale=(1, 5))
    assert score(judge).score == pytest.approx(0.75)


def test_pointwise_ratings_outside_the_scale_are_failures() -> None:
    judge = PointwiseJudge(ScriptedPolicy(['{"score": 11}']), "Quality?", retries=0)
    output = score(judge)
    assert output.score is None and "from 0 to 10" in output.info["error"]["message"]


# --------------------------------------------------------------------------- pairwise


def biased_vlm() -> FunctionPolicy:
    """Always prefers whatever is shown first: pure position bias."""
    return vlm(lambda images, text: '{"reason": "The first one.", "better": "1"}')


def red_vlm() -> FunctionPolicy:
    """Prefers the red image, wherever it is shown."""

    def answer(images: list[Any], text: str) -> str:
        first, second = (is_red(i) for i in images)
        better = "tie" if first == second else ("1" if first else "2")
        return json.dumps({"reason": "Red wins.", "better": better})

    return vlm(answer)


def compare(judge: PairwiseJudge, a: Image.Image, b: Image.Image) -> Any:
    return asyncio.run(judge.acompare("a red square", a, b))


def test_pairwise_swap_cancels_position_bias() -> None:
    output = compare(PairwiseJudge(biased_vlm()), solid("red"), solid("blue"))
    assert output.prob_a_better == 0.5
    assert output.info["position_consistent"] is False
    assert [o["first"] for o in output.info["orders"]] == ["a", "b"]
    assert [o["prob_a_better"] for o in output.info["orders"]] == [1.0, 0.0]


def test_without_swap_position_bias_shows() -> None:
    output = compare(PairwiseJudge(biased_vlm(), swap=False), solid("red"), solid("blue"))
    assert output.prob_a_better == 1.0 and len(output.info["raw"]) == 1


def test_pairwise_judge_finds_the_better_image_in_either_position() -> None:
    judge = PairwiseJudge(red_vlm())
    assert compare(judge, solid("red"), solid("blue")).prob_a_better == 1.0
    assert compare(judge, solid("blue"), solid("red")).prob_a_better == 0.0
    assert compare(judge, solid("blue"), solid("green")).prob_a_better == 0.5  # a tie
    output = compare(judge, solid("red"), solid("blue"))
    assert output.info["position_consistent"] is True
    assert output.info["judge_version"] == "pairwise-v1" and len(output.info["raw"]) == 2


def test_pairwise_judge_sends_both_images_in_one_message() -> None:
    policy = ScriptedPolicy(['{"better": "2"}'])
    compare(PairwiseJudge(policy, swap=False), solid("red"), solid("blue"))
    (messages,) = policy.calls
    assert [is_red(i) for i in messages[0].images] == [True, False]
    assert messages[0].text.startswith("Image 1:")


def test_a_pairwise_order_that_cannot_be_read_fails_the_comparison() -> None:
    replies = iter(['{"better": "1"}', "hmm"])
    policy = vlm(lambda images, text: next(replies))
    output = compare(PairwiseJudge(policy, retries=0), solid("red"), solid("blue"))
    assert output.prob_a_better is None
    assert output.info["error"]["type"] == "unparseable_reply"
    assert output.info["raw"] == ['{"better": "1"}', "hmm"]


# --------------------------------------------------------------------------- contract


def test_judges_are_rewards_and_safe_to_call_concurrently() -> None:
    judge = ChecklistJudge(
        vlm(lambda images, text: items_json("yes", "yes" if is_red(images[0]) else "no"))
    )
    assert isinstance(judge, VLMJudge)
    colours = ["red", "blue"] * 20

    async def many() -> list[RewardOutput]:
        ctx = RewardContext(task=APPLE)
        return list(
            await asyncio.gather(*(judge.ascore(APPLE.prompt, solid(c), ctx) for c in colours))
        )

    outputs = asyncio.run(many())
    assert [o.score for o in outputs] == [1.0 if c == "red" else 0.0 for c in colours]
    assert judge.score(APPLE.prompt, solid("red"), RewardContext(task=APPLE)).score == 1.0


def test_describe_names_the_judge_model_and_version_without_secrets() -> None:
    policy = OpenAIPolicy("http://127.0.0.1:9/v1", model="gpt-4.1", api_key="sk-secret-42")
    info = ChecklistJudge(policy, mode="fraction").describe()
    assert info["judge_version"] == "checklist-v1" and info["mode"] == "fraction"
    assert info["judge_policy"]["model"] == "gpt-4.1"
    assert info["sampling"]["temperature"] == 0.0
    assert "sk-secret" not in json.dumps(info)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ChecklistJudge(ScriptedPolicy([]), mode="loose"),  # type: ignore[arg-type]
        lambda: ChecklistJudge(ScriptedPolicy([]), retries=-1),
        lambda: ChecklistJudge("gpt-4.1"),  # type: ignore[arg-type]
        lambda: WiseJudge(ScriptedPolicy([]), mode="v2"),  # type: ignore[arg-type]
        lambda: PointwiseJudge(ScriptedPolicy([]), ""),
        lambda: PointwiseJudge(ScriptedPolicy([]), "ok?", scale=(5, 5)),
        lambda: PairwiseJudge(ScriptedPolicy([]), criterion=" "),
        lambda: ReflectionAccuracy("scene"),  # type: ignore[arg-type]
        lambda: ReflectionAccuracy(SceneJudge(), margin=-0.1),
        lambda: ReflectionAccuracy(SceneJudge(), pairwise=SceneJudge()),  # type: ignore[arg-type]
    ],
)
def test_bad_settings_are_configuration_errors(make: Callable[[], Any]) -> None:
    with pytest.raises(ConfigurationError):
        make()


def test_a_judge_class_without_build_query_fails_when_defined() -> None:
    with pytest.raises(ConfigurationError, match="build_query"):

        class Incomplete(VLMJudge):
            version = "incomplete-v1"


# --------------------------------------------------------------------------- OpenAI server


def completion(text: str, model: str = "judge-vlm-2025") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 900, "completion_tokens": 40},
    }


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


def sent_images(request: Recorded) -> list[bytes]:
    (message,) = [m for m in request.body["messages"] if m["role"] == "user"][:1]
    uris = [p["image_url"]["url"] for p in message["content"] if p["type"] == "image_url"]
    assert all(u.startswith("data:image/png;base64,") for u in uris)
    return [base64.b64decode(u.split(",", 1)[1]) for u in uris]


def sent_text(request: Recorded) -> str:
    message = request.body["messages"][0]
    return "".join(p["text"] for p in message["content"] if p["type"] == "text")


SERVER_CASES = {
    "checklist": (lambda p: ChecklistJudge(p), items_json("yes", "no"), 0.0, 1),
    "wise": (lambda p: WiseJudge(p), "Consistency: 1\nRealism: 2\nAesthetic Quality: 1", 0.6, 1),
    "wise-verified": (lambda p: WiseJudge(p, mode="verified"), '{"score": 1}', 1.0, 1),
    "pointwise": (lambda p: PointwiseJudge(p, "Fidelity?"), '{"score": 5}', 0.5, 1),
    "pairwise": (lambda p: PairwiseJudge(p), '{"better": "1"}', 0.5, 2),
}


@pytest.mark.parametrize("case", sorted(SERVER_CASES))
def test_every_judge_works_against_an_openai_compatible_server(
    server: ScriptedServer, case: str
) -> None:
    make, reply, expected, images_per_request = SERVER_CASES[case]
    server.always("POST", CHAT, lambda request: Reply(completion(reply)))
    policy = OpenAIPolicy(f"{server.url}/v1", model="judge-vlm", api_key="sk-secret-42")
    judge = make(policy)
    red = solid("red")
    if isinstance(judge, PairwiseJudge):
        output = asyncio.run(judge.acompare(APPLE.prompt, red, solid("blue")))
        assert output.prob_a_better == expected
        assert len(server.requests) == 2
    else:
        output = score(judge, red, task=WISE_TASK if case.startswith("wise") else APPLE)
        assert output.score == pytest.approx(expected)
        assert len(server.requests) == 1
    info = output.info
    firsts = []
    for request in server.requests:
        assert request.body["model"] == "judge-vlm" and request.body["temperature"] == 0.0
        images = sent_images(request)
        assert len(images) == images_per_request
        firsts.append(Image.open(io.BytesIO(images[0])).convert("RGB").getpixel((0, 0)))
        assert info["prompt"] in sent_text(request)
    assert (255, 0, 0) in firsts  # the red image went first (in one order, for pairwise)
    assert info["judge_model"] == "judge-vlm-2025"  # the model the server says answered
    assert info["judge_version"] == judge.describe()["judge_version"]
    assert info["raw"] == (reply if images_per_request == 1 else [reply, reply])
    assert info["usage"]["prompt_tokens"] == 900 * len(server.requests)
    assert "sk-secret" not in json.dumps(info) and "sk-secret" not in json.dumps(judge.describe())
    assert server.requests[0].headers["Authorization"] == "Bearer sk-secret-42"


def test_an_unreadable_server_reply_is_re_asked_over_http(server: ScriptedServer) -> None:
    server.script(
        "POST",
        CHAT,
        Reply(completion("Looks good to me.")),
        Reply(completion(items_json("yes", "yes"))),
    )
    judge = ChecklistJudge(OpenAIPolicy(f"{server.url}/v1", model="judge-vlm"))
    output = score(judge)
    assert output.score == 1.0 and len(server.requests) == 2
    retry = server.requests[1].body["messages"]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == "Looks good to me."


def test_a_server_error_is_a_recorded_failure(server: ScriptedServer) -> None:
    server.always("POST", CHAT, lambda request: Reply({"error": "bad request"}, status=400))
    judge = ChecklistJudge(OpenAIPolicy(f"{server.url}/v1", model="judge-vlm", max_retries=0))
    output = score(judge)
    assert output.score is None and output.info["error"]["type"] == "PolicyError"
    assert "400" in output.info["error"]["message"]


# --------------------------------------------------------------------------- in the agent


class TwoColours(GenerationTool):
    """Candidate 0 is blue, candidate 1 red."""

    max_images_per_call: ClassVar[int] = 4

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult(images=[solid(("blue", "red")[i % 2]) for i in range(ctx.num_images)])


def call(caption: str) -> str:
    payload = json.dumps({"name": "image_generation_tool", "arguments": {"caption": caption}})
    return f"<think>Plan.</think>\n<tool_call>\n{payload}\n</tool_call>"


def test_a_checklist_judge_picks_the_best_of_n_candidates_in_the_agent() -> None:
    red_judge = ChecklistJudge(
        vlm(lambda images, text: items_json("yes", "yes" if is_red(images[0]) else "no"))
    )
    policy = ScriptedPolicy([call("two red apples"), "<judge>Fine.</judge><answer>Done.</answer>"])
    agent = Agent(TwoColours(), policy=policy, candidates=2, judge=red_judge, rewards=[red_judge])
    trajectory = agent.run(APPLE, seed=0)
    (record,) = trajectory.rounds
    assert record.scores == (0.0, 1.0)
    assert record.image == record.candidates[1]
    final = trajectory.rewards["checklist_judge"]
    assert final.score == 1.0 and final.info["judge_version"] == "checklist-v1"
    # the recorded provenance survives the trajectory's JSON round trip
    loaded = type(trajectory).model_validate_json(trajectory.model_dump_json())
    assert loaded.rewards["checklist_judge"].info["prompt"] == final.info["prompt"]


# --------------------------------------------------------------------------- reflection


@pytest.mark.parametrize(
    "judgment,expected",
    [
        ("[ok] there is a cat. The image satisfies the request.", (True, None)),
        (
            "[wrong] the cat is red: blue. The image does not satisfy the request yet.",
            (False, None),
        ),
        ("Better than before, but it still does not match the prompt.", (False, "better")),
        ("The edit did not help; no improvement.", (None, "same")),
        (
            "This is worse than the previous image: a new error. Needs another edit.",
            (False, "worse"),
        ),
        ("All requirements are met; no further changes are needed.", (True, None)),
        ("The apple is now red, so the image now satisfies the request.", (True, "better")),
        ("A cat on a mat.", (None, None)),
        (None, (None, None)),
    ],
)
def test_judgments_are_read_by_documented_keyword_rules(
    judgment: str | None, expected: tuple[Any, Any]
) -> None:
    assert read_judgment(judgment) == expected


def redness(image: Image.Image) -> float:
    return 1.0 if image.convert("RGB").getpixel((0, 0)) == (255, 0, 0) else 0.0


@reward
def red_reference(prompt: str, image: Image.Image) -> float:
    return redness(image)


class Paint(GenerationTool):
    """Paints the colour named first in the caption."""

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult(images=[solid(args.caption.split()[0])])


def regenerate(judgment: str, colour: str) -> str:
    return f"<judge>{judgment}</judge>\n{call(colour + ' square')}"


def run_script(*replies: str) -> Any:
    return Agent(Paint(), policy=ScriptedPolicy(list(replies)), max_rounds=3).run(
        "a red square", seed=0
    )


def right_run() -> Any:
    return run_script(
        call("blue square"),
        regenerate("The square is blue. The image does not satisfy the request yet.", "red"),
        "<judge>Better: the square is now red. The image satisfies the request.</judge>"
        "<answer>A red square.</answer>",
    )


def test_verdicts_that_are_always_right_score_one() -> None:
    output = ReflectionAccuracy(red_reference).score_trajectory(right_run())
    assert output.score == 1.0
    assert output.components == {"round1.done": 1.0, "round2.done": 1.0, "round2.better": 1.0}
    assert output.info["mismatches"] == [] and output.info["compared"] == 3


def test_wrong_verdicts_are_listed_as_mismatches() -> None:
    trajectory = run_script(
        call("blue square"),
        "<judge>The image satisfies the request.</judge><answer>Done.</answer>",
    )
    output = ReflectionAccuracy(red_reference).score_trajectory(trajectory)
    assert output.score == 0.0
    assert output.info["mismatches"] == [
        {"round": 1, "verdict": "done", "policy": True, "reference": False}
    ]


def test_an_action_without_an_explicit_verdict_counts_as_one() -> None:
    trajectory = run_script(
        call("blue square"),
        regenerate("The square is blue.", "red"),
        "<judge>A red square.</judge><answer>A red square.</answer>",
    )
    verdicts = ReflectionAccuracy.policy_verdicts(trajectory)
    assert [(v.done, v.done_from) for v in verdicts] == [(False, "tool_call"), (True, "answer")]
    assert ReflectionAccuracy(red_reference).score_trajectory(trajectory).score == 1.0


def test_a_worse_verdict_is_checked_against_the_reference() -> None:
    trajectory = run_script(
        call("red square"),
        regenerate("Hmm, I will try again.", "blue"),
        "<judge>This one is better. The image does not satisfy the request yet.</judge>"
        "<answer>Gave up.</answer>",
    )
    output = ReflectionAccuracy(red_reference).score_trajectory(trajectory)
    assert output.components["round2.better"] == 0.0
    assert {
        "round": 2,
        "verdict": "better",
        "policy": "better",
        "reference": "worse",
    } in output.info["mismatches"]


class RedWins(PairwiseReward):
    def __init__(self) -> None:
        self.calls = 0

    def compare(self, prompt: str, a: Any, b: Any, ctx: Any = None) -> Any:
        self.calls += 1
        return 0.5 + 0.5 * (redness(a) - redness(b))


def test_a_pairwise_reference_decides_better_or_worse() -> None:
    pairwise = RedWins()
    output = ReflectionAccuracy(red_reference, pairwise=pairwise).score_trajectory(right_run())
    assert output.score == 1.0 and pairwise.calls == 1
    assert output.info["verdicts"][1]["prob_better"] == 1.0
    assert output.info["verdicts"][1]["change_ref"] == "better"


class Constant(PairwiseReward):
    def __init__(self, prob: float) -> None:
        self.prob = prob

    def compare(self, prompt: str, a: Any, b: Any, ctx: Any = None) -> Any:
        return self.prob


@pytest.mark.parametrize(
    "prob,margin,expected",
    [(0.75, 0.25, "better"), (0.75, 0.3, "same"), (0.6, 0.1, "better"), (0.5, 0.0, "same"),
     (0.4, 0.1, "worse"), (0.25, 0.0, "worse")],
)  # fmt: skip
def test_the_pairwise_margin_bounds_are_inclusive(
    prob: float, margin: float, expected: str
) -> None:
    reflection = ReflectionAccuracy(red_reference, pairwise=Constant(prob), margin=margin)
    output = reflection.score_trajectory(right_run())
    assert output.info["verdicts"][1]["change_ref"] == expected


def test_a_pairwise_judge_can_be_the_reference() -> None:
    reflection = ReflectionAccuracy(red_reference, pairwise=PairwiseJudge(red_vlm()), margin=0.1)
    assert reflection.score_trajectory(right_run()).components["round2.better"] == 1.0


def test_reference_scores_are_cached_by_image() -> None:
    calls: list[int] = []

    @reward
    def counted(prompt: str, image: Image.Image) -> float:
        calls.append(1)
        return red_reference.score(prompt, image).score or 0.0

    reflection = ReflectionAccuracy(counted)
    trajectory = right_run()
    first = reflection.score_trajectory(trajectory)
    second = reflection.score_trajectory(trajectory)
    assert first.score == second.score == 1.0
    assert len(calls) == 2  # two images, scored once each


def test_a_failing_reference_leaves_the_verdict_out_and_says_why() -> None:
    @reward
    def broken(prompt: str, image: Image.Image) -> None:
        return None

    output = ReflectionAccuracy(broken).score_trajectory(right_run())
    assert output.score is None and "no verdict to compare" in output.info["error"]
    assert {f["round"] for f in output.info["reference_failures"]} == {1, 2}


def test_as_a_reward_it_needs_the_trajectory() -> None:
    reflection = ReflectionAccuracy(red_reference)
    output = asyncio.run(reflection.ascore("x", solid("red")))
    assert output.score is None and "needs the trajectory" in output.info["error"]
    trajectory = right_run()
    ctx = RewardContext(task=trajectory.task, trajectory=trajectory)
    assert asyncio.run(reflection.ascore("x", solid("red"), ctx)).score == 1.0


def sim_runs(policy: HeuristicPolicy, n: int = 40) -> list[Any]:
    agent = Agent(tools=scene_tools(), policy=policy, max_rounds=3)
    return agent.run_batch(sample_tasks(n, seed=0), seeds=range(n))


def test_the_simulator_policy_has_imperfect_reflection_accuracy() -> None:
    reflection = ReflectionAccuracy(SceneJudge())
    outputs = [reflection.score_trajectory(t) for t in sim_runs(HeuristicPolicy(seed=0))]
    scored = [o for o in outputs if o.score is not None]
    matched = sum(o.info["matched"] for o in scored)
    compared = sum(o.info["compared"] for o in scored)
    assert compared >= 40
    assert 0.0 < matched / compared < 1.0
    assert any(o.score < 1.0 for o in scored if o.score is not None)
    # the HeuristicPolicy's judgments end with an explicit verdict, read from the text
    verdicts = [v for o in scored for v in o.info["verdicts"] if v["done"] is not None]
    assert all(v["done_from"] == "judgment" for v in verdicts)


def test_a_simulator_policy_that_perceives_perfectly_scores_one() -> None:
    reflection = ReflectionAccuracy(SceneJudge())
    perfect = HeuristicPolicy(seed=0, miss_rate=0.0, false_alarm_rate=0.0)
    outputs = [reflection.score_trajectory(t) for t in sim_runs(perfect)]
    assert all(o.score == 1.0 for o in outputs)


def test_reflection_accuracy_is_an_agent_reward() -> None:
    agent = Agent(
        tools=scene_tools(),
        policy=HeuristicPolicy(seed=0),
        max_rounds=3,
        rewards=[ReflectionAccuracy(SceneJudge())],
    )
    trajectory = agent.run(sample_tasks(1, seed=2)[0], seed=0)
    output = trajectory.rewards["reflection_accuracy"]
    assert output.score is not None and output.info["compared"] >= 1
