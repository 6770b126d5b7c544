"""BFLTool / BFLEditTool against real HTTP servers on 127.0.0.1 speaking the BFL API.

One server plays api.bfl.ai (submit, then ``get_result`` polls); a second plays the signed
delivery host the ``result.sample`` URLs point to. Sleeps and the poll clock are fakes, so
retries and polling cost no real time.
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

from genagent import Agent, ScriptedPolicy, Termination
from genagent.errors import (
    ConfigurationError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tasks import Task
from genagent.tools import ToolContext, ToolResult
from genagent.tools.http.bfl import BFLEditTool, BFLTool

from ._servers import Recorded, Reply, ScriptedServer

KEY = "bfl-SECRET-123"
SUBMIT = "/v1/flux-pro-1.1"
RESULT = "/v1/get_result"


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
    image = Image.frombytes(
        "RGB", (side, side), bytes(rng.randrange(256) for _ in range(side**2 * 3))
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
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


def bfl(api: ScriptedServer, sleeps: Sleeps, cls: type[Any] = BFLTool, **kwargs: Any) -> Any:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("max_retries", 2)
    return cls(base_url=api.url, sleep=sleeps, clock=sleeps.clock, **kwargs)


def submitted(api: ScriptedServer, task_id: str = "task-1", path: str = SUBMIT) -> None:
    api.script(
        "POST",
        path,
        Reply({"id": task_id, "polling_url": f"{api.url}{RESULT}?id={task_id}", "cost": 4.0}),
    )


def ready(cdn: ScriptedServer, name: str = "a.png", image: bytes | None = None) -> Reply:
    cdn.script(
        "GET", f"/samples/{name}", Reply(image or png(), headers={"Content-Type": "image/png"})
    )
    url = f"{cdn.url}/samples/{name}?se=2030&sig=signed"
    return Reply({"id": "task-1", "status": "Ready", "result": {"sample": url}})


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


def polls(api: ScriptedServer) -> list[Recorded]:
    return [r for r in api.requests if r.method == "GET" and r.path == RESULT]


# --------------------------------------------------------------------------- the agent


def test_an_agent_generates_through_pending_polls(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    submitted(api)
    api.script(
        "GET",
        RESULT,
        Reply({"id": "task-1", "status": "Pending", "progress": None}),
        Reply({"id": "task-1", "status": "Pending", "progress": 0.5}),
        ready(cdn, image=png(24, 16, "blue")),
    )
    tool = bfl(api, sleeps, width=1024, height=768)
    agent = Agent(tool=tool, policy=ScriptedPolicy([generation_call("a blue cube"), ANSWER]))
    trajectory = agent.run("a blue cube", seed=3)
    assert trajectory.termination is Termination.ANSWERED
    assert trajectory.final_image is not None and trajectory.final_image.size == (24, 16)
    body = api.requests[0].body
    assert api.requests[0].path == SUBMIT
    assert body["prompt"] == "a blue cube" and (body["width"], body["height"]) == (1024, 768)
    assert body["safety_tolerance"] == 2 and body["output_format"] == "png"
    assert "steps" not in body and "guidance" not in body and "input_image" not in body
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.seeds == [body["seed"]]
    assert outcome.metadata["task_id"] == "task-1" and outcome.metadata["model"] == "flux-pro-1.1"
    assert outcome.metadata["polls"] == 3 and outcome.metadata["cost"] == 4.0
    assert sleeps.calls == [0.5, 0.75]  # the poll interval grows 1.5x
    assert len(polls(api)) == 3 and all(r.query == "id=task-1" for r in polls(api))
    # the key goes to the API host; the signed image URL is fetched without it
    assert all(r.headers.get("x-key") == KEY for r in api.requests)
    assert cdn.requests and all("x-key" not in r.headers for r in cdn.requests)
    assert all("authorization" not in {k.lower() for k in r.headers} for r in cdn.requests)
    assert KEY not in trajectory.model_dump_json()


def test_the_edit_tool_sends_the_current_image_to_kontext(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    first, edited = png(16, 16, "red"), png(16, 16, "blue")
    submitted(api)
    submitted(api, "task-2", "/v1/flux-kontext-pro")
    api.script(
        "GET",
        RESULT,
        ready(cdn, "first.png", first),
        Reply({"status": "Pending"}),
        ready(cdn, "edited.png", edited),
    )
    tools = [bfl(api, sleeps), bfl(api, sleeps, BFLEditTool)]
    policy = ScriptedPolicy([generation_call("a red cube"), edit_call("make it blue"), ANSWER])
    trajectory = Agent(tools=tools, policy=policy).run("a blue cube", seed=1)
    assert trajectory.termination is Termination.ANSWERED
    assert len(trajectory.images) == 2
    edit = next(r for r in api.requests if r.path == "/v1/flux-kontext-pro")
    assert edit.body["prompt"] == "make it blue"
    assert base64.b64decode(edit.body["input_image"]) == trajectory.images[0].read_bytes()
    assert "aspect_ratio" not in edit.body and "width" not in edit.body  # keeps the input's
    assert trajectory.images[1].read_bytes() == edited


def test_the_edit_tool_refuses_without_an_image(api: ScriptedServer, sleeps: Sleeps) -> None:
    with pytest.raises(ToolRefused, match="no image"):
        call(bfl(api, sleeps, BFLEditTool), "make it blue")
    assert api.requests == []


# --------------------------------------------------------------------------- request bodies


def test_models_get_the_settings_they_take(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    submitted(api, path="/v1/flux-dev")
    submitted(api, path="/v1/flux-pro-1.1-ultra")
    api.script("GET", RESULT, ready(cdn, "1.png"), ready(cdn, "2.png"))
    dev = bfl(api, sleeps, model="flux-dev", steps=28, guidance=3.5, extra_body={"raw": 1})
    call(dev, seeds=(11,))
    ultra = bfl(api, sleeps, model="flux-pro-1.1-ultra", width=1920, height=1080)
    result = call(ultra, settings={"steps": 10})  # genagent serve may ask; ultra takes none
    dev_body, ultra_body = api.requests[0].body, api.requests[2].body
    assert (dev_body["steps"], dev_body["guidance"], dev_body["seed"]) == (28, 3.5, 11)
    assert dev_body["raw"] == 1
    assert ultra_body["aspect_ratio"] == "16:9" and "width" not in ultra_body
    assert "steps" not in ultra_body and result.metadata["ignored_settings"] == ["steps"]


def test_settings_a_known_model_does_not_take_are_refused_up_front(api: ScriptedServer) -> None:
    with pytest.raises(ConfigurationError, match="takes no steps"):
        BFLTool(base_url=api.url, api_key=KEY, steps=28)
    with pytest.raises(ConfigurationError, match="safety_tolerance"):
        BFLTool(base_url=api.url, api_key=KEY, safety_tolerance=9)
    with pytest.raises(ConfigurationError, match="model"):
        BFLTool("../flux", base_url=api.url, api_key=KEY)


def test_a_missing_key_is_a_clear_unavailable_error(
    api: ScriptedServer, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BFL_API_KEY", raising=False)
    tool = BFLTool(base_url=api.url, sleep=sleeps)
    with pytest.raises(ToolUnavailable, match="BFL_API_KEY"):
        call(tool)
    assert api.requests == []


def test_the_key_is_read_from_the_environment(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BFL_API_KEY", KEY)
    submitted(api)
    api.script("GET", RESULT, ready(cdn))
    call(BFLTool(base_url=api.url, sleep=sleeps, clock=sleeps.clock))
    assert all(r.headers.get("x-key") == KEY for r in api.requests)


# --------------------------------------------------------------------------- retries


def test_429_with_retry_after_is_waited_out_then_succeeds(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    api.script(
        "POST",
        SUBMIT,
        Reply({"detail": "Too many active tasks"}, 429, headers={"Retry-After": "3"}),
    )
    submitted(api)
    api.script("GET", RESULT, ready(cdn))
    result = call(bfl(api, sleeps))
    assert len(result.images) == 1
    assert sleeps.calls[0] == 3.0
    assert [r.method for r in api.requests] == ["POST", "POST", "GET"]


def test_500_then_success(api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps) -> None:
    api.script("POST", SUBMIT, Reply({"detail": "Internal Server Error"}, 500))
    submitted(api)
    api.script("GET", RESULT, Reply({"detail": "bad gateway"}, 502), ready(cdn))
    result = call(bfl(api, sleeps))
    assert len(result.images) == 1
    assert len(polls(api)) == 2 and len(sleeps.calls) == 2


def test_a_hung_submit_times_out_and_is_not_sent_twice(api: ScriptedServer, sleeps: Sleeps) -> None:
    # the task may have been created (and billed): a second submit could create another
    api.always("POST", SUBMIT, lambda r: Reply({"id": "late"}, delay_s=0.4))
    tool = bfl(api, sleeps, timeout_s=0.15, max_retries=1)
    with pytest.raises(ToolUnavailable, match=r"timed out.*not retried"):
        call(tool)
    assert len(api.requests) == 1


def test_a_hung_image_download_times_out(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    submitted(api)
    api.script("GET", RESULT, Reply({"status": "Ready", "result": {"sample": f"{cdn.url}/s"}}))
    cdn.always("GET", "/s", lambda r: Reply(png(), delay_s=0.4))
    with pytest.raises(ToolUnavailable, match="timed out"):
        call(bfl(api, sleeps, timeout_s=0.15, max_retries=0))


# ------------------------------------------------------------------ failures the model sees


@pytest.mark.parametrize(
    "reply",
    [
        Reply("<html>502 Bad Gateway</html>", 200),
        Reply({"detail": "accepted"}),
        Reply([1, 2, 3]),
    ],
    ids=["not-json", "no-id", "not-an-object"],
)
def test_a_malformed_submission_answer_is_shown_to_the_model(
    api: ScriptedServer, sleeps: Sleeps, reply: Reply
) -> None:
    api.script("POST", SUBMIT, reply)
    trajectory, seen = run_failing(bfl(api, sleeps), "a cube")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.error is not None
    assert outcome.error.type == "ToolExecutionError"
    assert outcome.error.message in seen[0]  # the model was shown the error
    assert trajectory.images == [] and len(api.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply({"id": "task-1"}),  # no status
        Reply({"status": "Ready", "result": {}}),  # no sample
        Reply({"status": "Ready", "result": {"sample": "ftp://x/y.png"}}),
        Reply({"status": "Teleported"}),
        Reply({"status": "Error", "details": {"message": "GPU fell over"}}),
        Reply({"status": "Failed"}),
    ],
    ids=["no-status", "no-sample", "not-http", "unknown-status", "error", "failed"],
)
def test_a_bad_or_failed_task_is_a_tool_execution_error(
    api: ScriptedServer, sleeps: Sleeps, reply: Reply
) -> None:
    submitted(api)
    api.script("GET", RESULT, reply)
    with pytest.raises(ToolExecutionError):
        call(bfl(api, sleeps))


def test_an_error_status_carries_its_details(api: ScriptedServer, sleeps: Sleeps) -> None:
    submitted(api)
    api.script("GET", RESULT, Reply({"status": "Error", "details": {"message": "GPU fell over"}}))
    with pytest.raises(ToolExecutionError, match="GPU fell over"):
        call(bfl(api, sleeps))


@pytest.mark.parametrize("status", ["Content Moderated", "Request Moderated"])
def test_a_moderated_task_is_a_refusal_the_model_sees(
    api: ScriptedServer, sleeps: Sleeps, status: str
) -> None:
    submitted(api)
    moderated = {
        "id": "task-1",
        "status": status,
        "details": {"Moderation Reasons": ["Derivative Works"]},
    }
    api.script("GET", RESULT, Reply({"status": "Pending"}), Reply(moderated))
    trajectory, seen = run_failing(bfl(api, sleeps), "a famous mouse")
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.error is not None
    assert outcome.error.type == "ToolRefused"
    assert "Derivative Works" in outcome.error.message and "Derivative Works" in seen[0]
    assert trajectory.images == []


def test_a_moderated_submission_is_a_refusal(api: ScriptedServer, sleeps: Sleeps) -> None:
    api.script("POST", SUBMIT, Reply({"detail": "Request Moderated: prompt flagged"}, 400))
    with pytest.raises(ToolRefused, match="moderation"):
        call(bfl(api, sleeps))


def test_an_oversized_image_is_a_tool_execution_error(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    big = noise_png(64)
    assert len(big) > 4000
    submitted(api)
    api.script("GET", RESULT, ready(cdn, "big.png", big))
    with pytest.raises(ToolExecutionError, match="over the limit"):
        call(bfl(api, sleeps, max_image_bytes=4000))


def test_an_image_url_that_is_not_an_image_is_a_tool_execution_error(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    submitted(api)
    cdn.script("GET", "/page", Reply("<html>login</html>", headers={"Content-Type": "text/html"}))
    api.script("GET", RESULT, Reply({"status": "Ready", "result": {"sample": f"{cdn.url}/page"}}))
    with pytest.raises(ToolExecutionError, match="not an image"):
        call(bfl(api, sleeps))


# ---------------------------------------------------------------- failures that end the run


def test_a_task_that_never_finishes_times_out(api: ScriptedServer, sleeps: Sleeps) -> None:
    submitted(api)
    api.always("GET", RESULT, lambda r: Reply({"status": "Pending"}))
    tool = bfl(api, sleeps, poll_timeout_s=30.0, max_poll_interval_s=4.0)
    with pytest.raises(ToolUnavailable, match="not done after 30 s") as caught:
        call(tool)
    assert "poll_timeout_s" in str(caught.value)
    assert sum(sleeps.calls) == pytest.approx(30.0)
    assert max(sleeps.calls) == 4.0


def test_task_not_found_is_unavailable(api: ScriptedServer, sleeps: Sleeps) -> None:
    submitted(api)
    api.script("GET", RESULT, Reply({"id": "task-1", "status": "Task not found"}))
    with pytest.raises(ToolUnavailable, match="not found"):
        call(bfl(api, sleeps))


def test_an_exhausted_account_says_to_add_credits(api: ScriptedServer, sleeps: Sleeps) -> None:
    api.script("POST", SUBMIT, Reply({"detail": "Insufficient credits"}, 402))
    with pytest.raises(ToolUnavailable, match="add credits"):
        call(bfl(api, sleeps))


def test_a_rejected_key_says_where_to_set_it(api: ScriptedServer, sleeps: Sleeps) -> None:
    api.script("POST", SUBMIT, Reply({"detail": "Not authenticated"}, 403))
    with pytest.raises(ToolUnavailable, match="BFL_API_KEY"):
        call(bfl(api, sleeps))


def test_a_spent_budget_stops_the_polling(api: ScriptedServer, sleeps: Sleeps) -> None:
    submitted(api)
    api.always("GET", RESULT, lambda r: Reply({"status": "Pending"}))
    tool = bfl(api, sleeps)
    agent = Agent(
        tool=tool,
        policy=ScriptedPolicy([generation_call("a cube"), ANSWER]),
        time_budget_s=5.0,
        clock=sleeps.clock,  # the tool's fake sleeps spend the run's budget
    )
    trajectory = agent.run("a cube")
    assert trajectory.termination is Termination.BUDGET
    assert trajectory.images == []
    assert sum(sleeps.calls) < 10.0  # stopped soon after the budget ran out
    count = len(polls(api))
    assert 2 <= count < 10


# --------------------------------------------------------------------------- where the key goes


def test_a_polling_url_on_another_host_is_not_contacted(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    with ScriptedServer() as elsewhere:
        api.script(
            "POST",
            SUBMIT,
            Reply({"id": "task-9", "polling_url": f"{elsewhere.url}/poll?id=task-9"}),
        )
        api.script("GET", RESULT, ready(cdn))
        call(bfl(api, sleeps))
        assert elsewhere.requests == []
    (poll,) = polls(api)
    assert poll.query == "id=task-9" and poll.headers.get("x-key") == KEY


def test_a_polling_url_on_a_trusted_domain_is_polled_with_the_key(
    api: ScriptedServer, cdn: ScriptedServer, sleeps: Sleeps
) -> None:
    class LocalBFL(BFLTool):
        key_domains = ("127.0.0.1",)  # stands in for *.bfl.ai: another port, same "domain"

    with ScriptedServer() as region:
        api.script("POST", SUBMIT, Reply({"id": "t", "polling_url": f"{region.url}/v1/r?id=t"}))
        region.script("GET", "/v1/r", Reply({"status": "Pending"}), ready(cdn))
        call(bfl(api, sleeps, LocalBFL))
        assert [r.headers.get("x-key") for r in region.requests] == [KEY, KEY]
    assert len(api.requests) == 1 and all("x-key" not in r.headers for r in cdn.requests)


def test_the_key_goes_to_bfl_regional_hosts_over_https_only() -> None:
    tool = BFLTool(api_key=KEY)  # https://api.bfl.ai
    assert tool._poll_url("t", "https://api.eu.bfl.ai/v1/get_result?id=t").startswith(
        "https://api.eu.bfl.ai/"
    )
    assert tool._poll_headers("https://api.eu.bfl.ai/v1/get_result?id=t") == {"x-key": KEY}
    assert tool._poll_headers("https://api.bfl.ai/v1/get_result?id=t") == {}  # HTTPClient adds it
    for foreign in (
        "http://api.eu.bfl.ai/v1/get_result?id=t",
        "https://bfl.ai.example.com/v1/get_result?id=t",
        "https://example.com/v1/get_result?id=t",
        "https://notbfl.ai/v1/get_result?id=t",
    ):
        assert tool._poll_url("t", foreign) == "https://api.bfl.ai/v1/get_result?id=t"


def test_the_key_never_appears_in_logs_errors_or_saved_trajectories(
    api: ScriptedServer,
    cdn: ScriptedServer,
    sleeps: Sleeps,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # a run with a retry (logged), an echoed key in an error body, and a success
    api.script("POST", SUBMIT, Reply({"detail": f"slow down {KEY}"}, 429, {"Retry-After": "1"}))
    submitted(api)
    api.script(
        "GET",
        RESULT,
        Reply({"status": "Pending"}),
        ready(cdn),
        Reply({"status": "Error", "details": KEY}),
    )
    submitted(api)
    tool = bfl(api, sleeps)
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
    api.always("POST", SUBMIT, lambda r: Reply(f"oops {KEY}", 200))
    with pytest.raises(ToolExecutionError) as visible:
        call(tool)
    errors.append(str(visible.value))
    errors.append(repr(tool))
    errors.append(json.dumps(tool.describe()))
    folder = trajectory.save(tmp_path / "run")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    assert caplog.records
    for record in caplog.records:
        assert KEY not in record.getMessage()
    for text in errors:
        assert KEY not in text
    assert any(r.headers.get("x-key") == KEY for r in api.requests)
    assert all(KEY not in json.dumps(r.headers) for r in cdn.requests)
