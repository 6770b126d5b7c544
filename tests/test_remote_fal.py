"""FalTool / FalEditTool against real HTTP servers on 127.0.0.1 speaking fal's queue API.

One server plays queue.fal.run (submit, status polls, response, cancel); a second plays fal's
CDN the image URLs point to. Sleeps and the poll clock are fakes, so retries and polling cost
no real time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from genagent import Agent, Hooks, ScriptedPolicy, Termination
from genagent.errors import (
    ConfigurationError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tasks import Task
from genagent.tools import ToolContext, ToolResult
from genagent.tools.http.fal import FalEditTool, FalTool

from ._servers import Recorded, Reply, ScriptedServer

KEY = "fal-SECRET-123:abc"
MODEL = "fal-ai/flux/dev"
SUBMIT = f"/{MODEL}"
APP = "/fal-ai/flux"  # status and results drop the model's subpath


def generation_call(caption: str) -> str:
    arguments = {"name": "image_generation_tool", "arguments": {"caption": caption}}
    return f"<think>Draw it.</think><tool_call>{json.dumps(arguments)}</tool_call>"


def edit_call(instruction: str) -> str:
    arguments = {"name": "image_editing_tool", "arguments": {"instruction": instruction}}
    return f"<judge>Almost.</judge><tool_call>{json.dumps(arguments)}</tool_call>"


ANSWER = "<judge>It matches.</judge><answer>Done.</answer>"


def png(width: int = 16, height: int = 16, color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(side: int = 64) -> bytes:
    rng = random.Random(0)
    pixels = bytes(rng.randrange(256) for _ in range(side**2 * 3))
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Sleeps:
    """A recorded, instant sleep that advances a fake clock (the poll timeout's)."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.now = 1000.0

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ScriptedServer, ScriptedServer]]:
    # shared by the module's tests (each server takes ~0.5 s to shut down), reset per test
    with ScriptedServer() as api, ScriptedServer() as cdn:
        yield api, cdn


def fresh(server: ScriptedServer) -> ScriptedServer:
    with server._lock:
        server.routes.clear()
        server.fallback.clear()
        server.patterns.clear()
        server.requests.clear()
    return server


@pytest.fixture
def api(servers: tuple[ScriptedServer, ScriptedServer]) -> ScriptedServer:
    return fresh(servers[0])


@pytest.fixture
def cdn(servers: tuple[ScriptedServer, ScriptedServer]) -> ScriptedServer:
    return fresh(servers[1])


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def fal(api: ScriptedServer, sleeps: Sleeps, cls: type[Any] = FalTool, **kwargs: Any) -> Any:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("max_retries", 2)
    return cls(base_url=api.url, sleep=sleeps, clock=sleeps.clock, **kwargs)


def urls(api: ScriptedServer, request_id: str, app: str = APP) -> dict[str, str]:
    base = f"{api.url}{app}/requests/{request_id}"
    return {
        "request_id": request_id,
        "status_url": f"{base}/status",
        "response_url": base,
        "cancel_url": f"{base}/cancel",
    }


def queued(api: ScriptedServer, request_id: str = "req-1", path: str = SUBMIT) -> None:
    app = "/".join(path.split("/")[:3])
    api.script("POST", path, Reply(urls(api, request_id, app)))


def status_path(request_id: str = "req-1", app: str = APP) -> str:
    return f"{app}/requests/{request_id}/status"


def statuses(api: ScriptedServer, *states: str, request_id: str = "req-1", app: str = APP) -> None:
    replies = []
    for i, state in enumerate(states):
        body: dict[str, Any] = {"status": state}
        if state == "IN_QUEUE":
            body["queue_position"] = len(states) - i
        replies.append(Reply(body, 202 if state != "COMPLETED" else 200))
    api.script("GET", status_path(request_id, app), *replies)


def output(
    api: ScriptedServer,
    cdn: ScriptedServer,
    images: list[bytes],
    *,
    seed: int = 42,
    nsfw: list[bool] | None = None,
    request_id: str = "req-1",
    app: str = APP,
) -> None:
    entries = []
    for i, image in enumerate(images):
        name = f"/files/{request_id}-{i}.png"
        cdn.script("GET", name, Reply(image, headers={"Content-Type": "image/png"}))
        entries.append({"url": f"{cdn.url}{name}", "content_type": "image/png", "width": 16})
    body = {
        "images": entries,
        "seed": seed,
        "has_nsfw_concepts": nsfw if nsfw is not None else [False] * len(images),
        "timings": {"inference": 0.25},
        "prompt": "ignored",
    }
    api.script("GET", f"{app}/requests/{request_id}", Reply(body))


def run_failing(tool: Any, caption: str) -> tuple[Any, list[str]]:
    """Run an agent whose one tool call fails; return the trajectory and what the model saw."""
    seen: list[str] = []

    def look(messages: Sequence[Any]) -> str:
        seen.append(str(messages[-1].text))
        return ANSWER  # answering without an image ends the run (max_retries=1)

    policy = ScriptedPolicy([generation_call(caption), look])
    return Agent(tool=tool, policy=policy, max_retries=1).run(caption), seen


def call(
    tool: Any, text: str = "a red cube", seeds: tuple[int, ...] = (5,), **kw: Any
) -> ToolResult:
    field = "instruction" if tool.requires_image else "caption"
    ctx = ToolContext(
        run_id="r", task=Task(prompt=text), round=1, seeds=list(seeds), num_images=len(seeds), **kw
    )
    result: ToolResult = asyncio.run(tool.acall(tool.parse_args({field: text}), ctx))
    return result


def cancels(api: ScriptedServer, request_id: str = "req-1") -> list[Recorded]:
    return [
        r for r in api.requests if r.method == "PUT" and r.path.endswith(f"{request_id}/cancel")
    ]


def status_polls(api: ScriptedServer, request_id: str = "req-1") -> list[Recorded]:
    return [r for r in api.requests if r.path == status_path(request_id)]


# --------------------------------------------------------------------------- the agent


def test_an_agent_generates_four_candidates_through_the_queue(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    queued(api)
    statuses(api, "IN_QUEUE", "IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    colours = ["red", "green", "blue", "white"]
    output(api, cdn, [png(20, 12, c) for c in colours], seed=42)
    tool = fal(api, sleeps, width=1024, height=768, steps=28, guidance=3.5)
    progress: list[Any] = []

    class Watch(Hooks):
        def on_tool_progress(self, ctx: Any, event: Any) -> None:
            progress.append(event)

    agent = Agent(
        tool=tool,
        policy=ScriptedPolicy([generation_call("a red cube"), ANSWER]),
        candidates=4,
        hooks=[Watch()],
    )
    trajectory = agent.run("a red cube", seed=3)
    assert trajectory.termination is Termination.ANSWERED
    assert len(trajectory.images) == 4 and (
        trajectory.images[0].width,
        trajectory.images[0].height,
    ) == (20, 12)
    submit = api.requests[0]
    assert submit.method == "POST" and submit.path == SUBMIT
    body = submit.body
    assert body["prompt"] == "a red cube" and body["num_images"] == 4
    assert body["image_size"] == {"width": 1024, "height": 768}
    assert (body["num_inference_steps"], body["guidance_scale"]) == (28, 3.5)
    assert body["output_format"] == "png" and "image_url" not in body
    assert "enable_safety_checker" not in body  # fal's default (on)
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None
    assert outcome.seeds == [42, None, None, None]  # fal reports one seed per request
    assert outcome.metadata["request_id"] == "req-1" and outcome.metadata["polls"] == 4
    assert outcome.metadata["timings"] == {"inference": 0.25}
    assert len(api.requests) == 1 + 4 + 1 and cancels(api) == []
    assert sleeps.calls == [0.5, 0.75, 1.125]
    positions = [p.info.get("queue_position") for p in progress]
    assert positions[:2] == [4, 3] and progress[0].info["status"] == "IN_QUEUE"
    # the key goes to the queue host; the CDN's image URLs are fetched without it
    assert all(r.headers.get("Authorization") == f"Key {KEY}" for r in api.requests)
    assert len(cdn.requests) == 4
    assert all("authorization" not in {k.lower() for k in r.headers} for r in cdn.requests)


def test_the_edit_tool_sends_the_current_image_as_a_data_uri(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    first, edited = png(16, 16, "red"), png(16, 16, "blue")
    queued(api)
    statuses(api, "COMPLETED")
    output(api, cdn, [first])
    kontext = "fal-ai/flux-pro/kontext"
    queued(api, "req-2", f"/{kontext}")
    statuses(api, "IN_PROGRESS", "COMPLETED", request_id="req-2", app="/fal-ai/flux-pro")
    output(api, cdn, [edited], seed=9, request_id="req-2", app="/fal-ai/flux-pro")
    tools = [fal(api, sleeps), fal(api, sleeps, FalEditTool)]
    policy = ScriptedPolicy([generation_call("a red cube"), edit_call("make it blue"), ANSWER])
    trajectory = Agent(tools=tools, policy=policy).run("a blue cube", seed=1)
    assert trajectory.termination is Termination.ANSWERED
    assert len(trajectory.images) == 2
    edit = next(r for r in api.requests if r.path == f"/{kontext}")
    assert edit.body["prompt"] == "make it blue" and edit.body["num_images"] == 1
    prefix = "data:image/png;base64,"
    assert edit.body["image_url"].startswith(prefix)
    data = base64.b64decode(edit.body["image_url"][len(prefix) :])
    assert data == trajectory.images[0].read_bytes()
    assert "image_size" not in edit.body  # the edit keeps the input's size
    assert trajectory.images[1].read_bytes() == edited


def test_the_edit_tool_refuses_without_an_image(api: ScriptedServer, sleeps: Sleeps) -> None:
    with pytest.raises(ToolRefused, match="no image"):
        call(fal(api, sleeps, FalEditTool), "make it blue")
    assert api.requests == []


def test_settings_and_presets_become_fal_fields(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    queued(api)
    statuses(api, "COMPLETED")
    output(api, cdn, [png()])
    tool = fal(
        api,
        sleeps,
        image_size="square_hd",
        enable_safety_checker=False,
        safety_tolerance=5,
        output_format=None,
        extra_body={"acceleration": "high"},
    )
    result = call(tool, seeds=(77,), settings={"negative_prompt": "blur"})
    body = api.requests[0].body
    assert body["image_size"] == "square_hd" and body["seed"] == 77
    assert body["enable_safety_checker"] is False and body["safety_tolerance"] == "5"
    assert "output_format" not in body and body["acceleration"] == "high"
    assert body["negative_prompt"] == "blur"
    assert result.seeds == [42]


def test_bad_settings_are_refused_up_front(api: ScriptedServer) -> None:
    with pytest.raises(ConfigurationError, match="image_size"):
        FalTool(base_url=api.url, api_key=KEY, image_size="huge")
    with pytest.raises(ConfigurationError, match="not both"):
        FalTool(base_url=api.url, api_key=KEY, image_size="square", width=512, height=512)
    with pytest.raises(ConfigurationError, match="model"):
        FalTool("flux", base_url=api.url, api_key=KEY)
    with pytest.raises(ConfigurationError, match="model"):
        FalTool("fal-ai/../admin", base_url=api.url, api_key=KEY)


def test_a_missing_key_is_a_clear_unavailable_error(
    api: ScriptedServer, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    with pytest.raises(ToolUnavailable, match="FAL_KEY"):
        call(FalTool(base_url=api.url, sleep=sleeps))
    assert api.requests == []


def test_the_key_is_read_from_the_environment(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAL_KEY", KEY)
    queued(api)
    statuses(api, "COMPLETED")
    output(api, cdn, [png()])
    call(FalTool(base_url=api.url, sleep=sleeps, clock=sleeps.clock))
    assert all(r.headers.get("Authorization") == f"Key {KEY}" for r in api.requests)


# --------------------------------------------------------------------------- retries


def test_429_with_retry_after_is_waited_out_then_succeeds(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    api.script("POST", SUBMIT, Reply({"detail": "rate limited"}, 429, {"Retry-After": "7"}))
    queued(api)
    statuses(api, "COMPLETED")
    output(api, cdn, [png()])
    result = call(fal(api, sleeps))
    assert len(result.images) == 1
    assert sleeps.calls[0] == 7.0
    assert [r.method for r in api.requests] == ["POST", "POST", "GET", "GET"]


def test_500_then_success(api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps) -> None:
    api.script("POST", SUBMIT, Reply({"detail": "Internal Server Error"}, 500))
    queued(api)
    api.script("GET", status_path(), Reply({"detail": "oops"}, 503))
    statuses(api, "COMPLETED")
    output(api, cdn, [png()])
    result = call(fal(api, sleeps))
    assert len(result.images) == 1 and len(status_polls(api)) == 2
    assert cancels(api) == []


def test_a_hung_submit_times_out_and_is_not_sent_twice(api: ScriptedServer, sleeps: Sleeps) -> None:
    api.always("POST", SUBMIT, lambda r: Reply(urls(api, "late"), delay_s=0.4))
    with pytest.raises(ToolUnavailable, match=r"timed out.*not retried"):
        call(fal(api, sleeps, timeout_s=0.15, max_retries=1))
    assert len(api.requests) == 1


# ------------------------------------------------------------------ failures the model sees


@pytest.mark.parametrize(
    "reply",
    [
        Reply("<html>502 Bad Gateway</html>", 200),
        Reply({"status": "IN_QUEUE"}),
        Reply({"request_id": "../../admin"}),
    ],
    ids=["not-json", "no-request-id", "unsafe-request-id"],
)
def test_a_malformed_submission_answer_is_shown_to_the_model(
    api: ScriptedServer, sleeps: Sleeps, reply: Reply
) -> None:
    api.script("POST", SUBMIT, reply)
    trajectory, seen = run_failing(fal(api, sleeps), "a cube")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.error is not None
    assert outcome.error.type == "ToolExecutionError"
    assert outcome.error.message in seen[0]  # the model was shown the error
    assert trajectory.images == []
    assert len(api.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"seed": 1},  # no images
        {"images": []},
        {"images": ["not-an-object"]},
        {"images": [{"content_type": "image/png"}]},  # no url
        {"images": [{"url": "file:///etc/passwd"}]},
    ],
    ids=["no-images", "empty", "not-object", "no-url", "not-http"],
)
def test_a_malformed_output_is_a_tool_execution_error(
    api: ScriptedServer, sleeps: Sleeps, body: dict[str, Any]
) -> None:
    queued(api)
    statuses(api, "COMPLETED")
    api.script("GET", f"{APP}/requests/req-1", Reply(body))
    with pytest.raises(ToolExecutionError):
        call(fal(api, sleeps))


def test_a_failed_job_is_a_tool_execution_error_with_its_message(
    api: ScriptedServer, sleeps: Sleeps
) -> None:
    queued(api)
    api.script(
        "GET",
        status_path(),
        Reply({"status": "COMPLETED", "error": "CUDA out of memory", "error_type": "runner_error"}),
    )
    with pytest.raises(ToolExecutionError, match="CUDA out of memory"):
        call(fal(api, sleeps))
    assert cancels(api) == []  # it finished; there is nothing to cancel


def test_an_error_response_with_a_structured_detail_is_shown_to_the_model(
    api: ScriptedServer, sleeps: Sleeps
) -> None:
    queued(api)
    statuses(api, "COMPLETED")
    detail = {"loc": ["body"], "msg": "No image was generated", "type": "no_media_generated"}
    api.script("GET", f"{APP}/requests/req-1", Reply({"detail": [detail]}, 422))
    with pytest.raises(ToolExecutionError, match="No image was generated"):
        call(fal(api, sleeps))


def test_a_content_policy_rejection_is_a_refusal_the_model_sees(
    api: ScriptedServer, sleeps: Sleeps
) -> None:
    queued(api)
    statuses(api, "IN_PROGRESS", "COMPLETED")
    detail = {"loc": ["body", "prompt"], "msg": "flagged", "type": "content_policy_violation"}
    api.script("GET", f"{APP}/requests/req-1", Reply({"detail": [detail]}, 422))
    trajectory, seen = run_failing(fal(api, sleeps), "something forbidden")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.error is not None
    assert outcome.error.type == "ToolRefused" and "content policy" in outcome.error.message
    assert "content policy" in seen[0]
    assert cancels(api) == []


def test_images_the_safety_checker_flags_are_dropped_and_reported(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    queued(api)
    statuses(api, "COMPLETED")
    black = png(16, 16, "black")
    output(api, cdn, [png(color="red"), black, png(color="blue")], nsfw=[False, True, False])
    result = call(fal(api, sleeps), seeds=(1, 2, 3))
    assert len(result.images) == 2 and black not in result.images
    assert result.seeds == [42, None]
    assert result.text is not None and "withheld 1 of 3" in result.text
    assert result.metadata["nsfw_blocked"] == 1 and result.metadata["returned"] == 3
    assert len(cdn.requests) == 2  # a flagged image is not even downloaded


def test_all_images_flagged_is_a_refusal_the_model_sees(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    queued(api)
    statuses(api, "COMPLETED")
    output(api, cdn, [png(color="black")], nsfw=[True])
    trajectory, seen = run_failing(fal(api, sleeps), "something explicit")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.error is not None
    assert outcome.error.type == "ToolRefused" and "safety checker" in outcome.error.message
    assert "safety checker" in seen[0] and trajectory.images == []
    assert cdn.requests == []  # a flagged image is not downloaded


def test_an_oversized_image_is_a_tool_execution_error(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    big = noise_png(64)
    assert len(big) > 4000
    queued(api)
    statuses(api, "COMPLETED")
    output(api, cdn, [big])
    with pytest.raises(ToolExecutionError, match="over the limit"):
        call(fal(api, sleeps, max_image_bytes=4000))


# ---------------------------------------------------------------- failures that end the run


def test_a_job_that_never_finishes_times_out_and_is_cancelled(
    api: ScriptedServer, sleeps: Sleeps
) -> None:
    queued(api)
    api.always("GET", status_path(), lambda r: Reply({"status": "IN_QUEUE", "queue_position": 9}))
    api.script("PUT", f"{APP}/requests/req-1/cancel", Reply({"status": "CANCELLATION_REQUESTED"}))
    with pytest.raises(ToolUnavailable, match="not done after 20 s"):
        call(fal(api, sleeps, poll_timeout_s=20.0))
    assert sum(sleeps.calls) == pytest.approx(20.0)
    (cancel,) = cancels(api)
    assert cancel.headers.get("Authorization") == f"Key {KEY}"


def test_a_spent_budget_cancels_the_job(api: ScriptedServer, sleeps: Sleeps) -> None:
    queued(api)
    api.always("GET", status_path(), lambda r: Reply({"status": "IN_PROGRESS"}))
    api.script("PUT", f"{APP}/requests/req-1/cancel", Reply({"status": "ALREADY_COMPLETED"}, 400))
    agent = Agent(
        tool=fal(api, sleeps),
        policy=ScriptedPolicy([generation_call("a cube"), ANSWER]),
        time_budget_s=5.0,
        clock=sleeps.clock,  # the tool's fake sleeps spend the run's budget
    )
    trajectory = agent.run("a cube")
    assert trajectory.termination is Termination.BUDGET
    assert trajectory.images == []
    assert len(cancels(api)) == 1
    assert 2 <= len(status_polls(api)) < 10
    assert api.requests[-1].method == "PUT"  # nothing polled after the cancellation


def test_a_cancelled_call_cancels_the_job(api: ScriptedServer) -> None:
    queued(api)
    api.always("GET", status_path(), lambda r: Reply({"status": "IN_QUEUE", "queue_position": 1}))
    api.script("PUT", f"{APP}/requests/req-1/cancel", Reply({"status": "CANCELLATION_REQUESTED"}))

    async def scenario() -> None:
        polling = asyncio.Event()

        async def sleep_until_cancelled(seconds: float) -> None:
            polling.set()  # the job is queued and being polled: cancel it while it waits
            await asyncio.Event().wait()

        tool = FalTool(base_url=api.url, api_key=KEY, sleep=sleep_until_cancelled)
        ctx = ToolContext(run_id="r", task=Task(prompt="a cube"), round=1)
        job = asyncio.ensure_future(tool.acall(tool.parse_args({"caption": "a cube"}), ctx))
        await polling.wait()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job

    asyncio.run(scenario())
    assert len(cancels(api)) == 1


def test_a_failing_cancellation_is_logged_not_raised(
    api: ScriptedServer, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    queued(api)
    api.always("GET", status_path(), lambda r: Reply({"status": "IN_QUEUE"}))
    api.always("PUT", f"{APP}/requests/req-1/cancel", lambda r: Reply({"detail": "no"}, 403))
    with pytest.raises(ToolUnavailable, match="not done"):
        call(fal(api, sleeps, poll_timeout_s=3.0))
    assert any("could not cancel" in r.getMessage() for r in caplog.records)


def test_a_job_cancelled_elsewhere_is_unavailable(api: ScriptedServer, sleeps: Sleeps) -> None:
    queued(api)
    statuses(api, "IN_QUEUE", "CANCELLED")
    with pytest.raises(ToolUnavailable, match="cancelled"):
        call(fal(api, sleeps))


def test_a_rejected_key_says_where_to_set_it(api: ScriptedServer, sleeps: Sleeps) -> None:
    api.script("POST", SUBMIT, Reply({"detail": "Unauthorized"}, 401))
    with pytest.raises(ToolUnavailable, match="FAL_KEY"):
        call(fal(api, sleeps))


def test_an_invalid_request_is_unavailable_not_retried_by_the_model(
    api: ScriptedServer, sleeps: Sleeps
) -> None:
    detail = {"loc": ["body", "num_inference_steps"], "msg": "must be <= 50", "type": "less_than"}
    api.script("POST", SUBMIT, Reply({"detail": [detail]}, 422))
    with pytest.raises(ToolUnavailable, match="must be <= 50"):
        call(fal(api, sleeps, steps=500))


# --------------------------------------------------------------------------- where the key goes


def test_queue_urls_on_another_host_are_not_contacted(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    with ScriptedServer() as elsewhere:
        api.script("POST", SUBMIT, Reply(urls(elsewhere, "req-1")))  # wrong host
        statuses(api, "COMPLETED")
        output(api, cdn, [png()])
        call(fal(api, sleeps))
        assert elsewhere.requests == []
    assert [r.path for r in api.requests] == [SUBMIT, status_path(), f"{APP}/requests/req-1"]


def test_missing_queue_urls_fall_back_to_the_documented_paths(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    api.script("POST", SUBMIT, Reply({"request_id": "req-1"}))
    statuses(api, "IN_PROGRESS", "COMPLETED")
    output(api, cdn, [png()])
    assert len(call(fal(api, sleeps)).images) == 1


def test_the_key_never_appears_in_logs_errors_or_saved_trajectories(
    api: ScriptedServer,
    cdn: ScriptedServer,
    sleeps: Sleeps,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # a retry (logged) whose body echoes the key, a success, and a failure echoing it
    api.script("POST", SUBMIT, Reply({"detail": f"slow down {KEY}"}, 429, {"Retry-After": "1"}))
    queued(api)
    statuses(api, "IN_QUEUE", "COMPLETED")
    output(api, cdn, [png()])
    queued(api, "req-2")
    api.script("GET", status_path("req-2"), Reply({"status": "COMPLETED", "error": f"bad {KEY}"}))
    tool = fal(api, sleeps)
    policy = ScriptedPolicy([generation_call("a cube"), generation_call("a cube"), ANSWER])
    trajectory = Agent(tool=tool, policy=policy).run("a cube")
    assert len(trajectory.images) == 1
    failed = trajectory.turns[1].tool_result
    assert failed is not None and failed.error is not None and "***" in failed.error.message
    errors: list[str] = []
    api.script("POST", SUBMIT, Reply({"detail": f"bad key {KEY}"}, 401))
    with pytest.raises(ToolUnavailable) as caught:
        call(tool)
    errors.append(str(caught.value))
    detail = {"loc": ["body"], "msg": f"flagged {KEY}", "type": "content_policy_violation"}
    api.script("POST", SUBMIT, Reply({"detail": [detail]}, 422))
    with pytest.raises(ToolRefused) as refused:
        call(tool)
    errors.append(str(refused.value))
    api.always("POST", SUBMIT, lambda r: Reply(f"oops {KEY}", 200))
    with pytest.raises(ToolExecutionError) as visible:
        call(tool)
    errors.append(str(visible.value))
    # a poll timeout whose cancellation fails with the key in the body (logged)
    api.always("POST", SUBMIT, lambda r: Reply(urls(api, "req-3")))
    api.always("GET", status_path("req-3"), lambda r: Reply({"status": "IN_QUEUE"}))
    api.always("PUT", f"{APP}/requests/req-3/cancel", lambda r: Reply(f"no {KEY}", 403))
    with pytest.raises(ToolUnavailable) as timed_out:
        call(fal(api, sleeps, poll_timeout_s=2.0))
    errors.append(str(timed_out.value))
    errors.append(repr(tool))
    errors.append(json.dumps(tool.describe()))
    folder = trajectory.save(tmp_path / "run")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    assert any("could not cancel" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert KEY not in record.getMessage()
    for text in errors:
        assert KEY not in text
    assert all(KEY not in json.dumps(r.headers) for r in cdn.requests)
