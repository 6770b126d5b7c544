"""ReplicateTool / ReplicateEditTool against real HTTP servers on 127.0.0.1.

``api`` speaks Replicate's predictions API (sync mode, polling, cancel, files); ``cdn`` serves
the output images from another host, as replicate.delivery does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from genagent import (
    Agent,
    ConfigurationError,
    Hooks,
    ScriptedPolicy,
    Task,
    Termination,
    ToolUnavailable,
)
from genagent.tools._base import GenerationArgs, ToolContext, ToolProgress
from genagent.tools.http.replicate import ReplicateEditTool, ReplicateTool

from ._servers import Recorded, Reply, ScriptedServer

TOKEN = "r8_SECRET123"
FLUX = "/v1/models/black-forest-labs/flux-dev/predictions"
KONTEXT = "/v1/models/black-forest-labs/flux-kontext-pro/predictions"
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
NSFW = "NSFW content detected. Try running it again, or try a different prompt."


def generation_call(caption: str) -> str:
    arguments = {"name": "image_generation_tool", "arguments": {"caption": caption}}
    return f"<think>Draw it.</think><tool_call>{json.dumps(arguments)}</tool_call>"


def edit_call(instruction: str) -> str:
    arguments = {"name": "image_editing_tool", "arguments": {"instruction": instruction}}
    return f"<judge>Almost.</judge><tool_call>{json.dumps(arguments)}</tool_call>"


ANSWER = "<judge>It matches.</judge><answer>Done.</answer>"


def png(width: int = 40, height: int = 24, color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


class Sleeps:
    """A recorded, instant sleep that also moves a fake clock forward."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.now = 1000.0

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def api() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


@pytest.fixture
def cdn() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


def serve_image(cdn: ScriptedServer, name: str, data: bytes | None = None) -> str:
    payload = data if data is not None else png()
    cdn.always(
        "GET", f"/out/{name}", lambda r: Reply(payload, headers={"Content-Type": "image/png"})
    )
    return f"{cdn.url}/out/{name}"


def prediction(
    api: ScriptedServer,
    status: str,
    *,
    ident: str = "p1",
    output: Any = None,
    error: Any = None,
    logs: str = "",
) -> dict[str, Any]:
    return {
        "id": ident,
        "model": "black-forest-labs/flux-dev",
        "status": status,
        "input": {},
        "output": output,
        "error": error,
        "logs": logs,
        "metrics": {"predict_time": 1.5} if status == "succeeded" else {},
        "urls": {
            "get": f"{api.url}/v1/predictions/{ident}",
            "cancel": f"{api.url}/v1/predictions/{ident}/cancel",
            "stream": "https://stream.replicate.com/v1/files/abc",
        },
    }


def tool_for(api: ScriptedServer, cls: type[Any] = ReplicateTool, **kwargs: Any) -> Any:
    sleeps = kwargs.pop("sleep", None) or Sleeps()
    kwargs.setdefault("api_key", TOKEN)
    kwargs.setdefault("clock", sleeps.clock)
    return cls(base_url=f"{api.url}/v1", sleep=sleeps, **kwargs)


def context(seeds: list[int] | None = None, **kwargs: Any) -> ToolContext:
    seeds = seeds or [5]
    return ToolContext(
        run_id="run", task=Task(prompt="a cat"), round=1, num_images=len(seeds), seeds=seeds,
        **kwargs,
    )  # fmt: skip


def call(tool: Any, caption: str = "a cat", ctx: ToolContext | None = None) -> Any:
    return asyncio.run(tool.acall(GenerationArgs(caption=caption), ctx or context()))


def recover(api: ScriptedServer, cdn: ScriptedServer) -> tuple[str, str, str]:
    """After a failed call the model calls again and that prediction succeeds."""
    url = serve_image(cdn, "ok.png", png(24, 24, "green"))
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", ident="ok", output=[url]), 201))
    return generation_call("a red fox"), generation_call("a red fox, painted"), ANSWER


def run_agent(tool: Any, *replies: str, **kwargs: Any) -> Any:
    policy = ScriptedPolicy(list(replies) or [generation_call("a red fox"), ANSWER])
    trajectory = Agent(tool=tool, policy=policy, **kwargs).run("a red fox", seed=7)
    return trajectory, policy


# --------------------------------------------------------------------------- the agent


def test_an_agent_runs_flux_dev_in_sync_mode(api: ScriptedServer, cdn: ScriptedServer) -> None:
    url = serve_image(cdn, "0.png", png(48, 32))
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", output=[url]), 201))
    trajectory, _ = run_agent(tool_for(api))
    assert trajectory.termination is Termination.ANSWERED
    assert trajectory.final_image is not None and trajectory.final_image.size == (48, 32)
    (request,) = api.requests
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Prefer"] == "wait=60"
    sent = request.body["input"]
    assert sent["prompt"] == "a red fox" and isinstance(sent["seed"], int)
    assert sent["num_outputs"] == 1 and sent["output_format"] == "png"
    assert "version" not in request.body
    outcome = trajectory.turns[0].tool_result
    assert outcome.seeds == [sent["seed"]]
    assert outcome.metadata["model"] == "black-forest-labs/flux-dev"
    assert outcome.metadata["predictions"][0]["id"] == "p1"
    assert outcome.metadata["predictions"][0]["predict_time_s"] == 1.5
    # the image host is another host: it never sees the token
    assert [r.path for r in cdn.requests] == ["/out/0.png"]
    assert "Authorization" not in cdn.requests[0].headers


def test_a_prediction_still_running_after_the_wait_is_polled(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    url = serve_image(cdn, "0.png")
    api.script("POST", FLUX, Reply(prediction(api, "starting"), 201))
    api.script(
        "GET", "/v1/predictions/p1",
        Reply(prediction(api, "processing")),
        Reply(prediction(api, "succeeded", output=url)),  # a bare string output
    )  # fmt: skip
    progress: list[ToolProgress] = []

    class Record(Hooks):
        def on_tool_progress(self, ctx: Any, event: ToolProgress) -> None:
            progress.append(event)

    sleeps = Sleeps()
    policy = ScriptedPolicy([generation_call("a red fox"), ANSWER])
    agent = Agent(tool=tool_for(api, sleep=sleeps), policy=policy, hooks=[Record()])
    trajectory = agent.run("a red fox", seed=7)
    assert trajectory.termination is Termination.ANSWERED
    assert [(r.method, r.path) for r in api.requests] == [
        ("POST", FLUX), ("GET", "/v1/predictions/p1"), ("GET", "/v1/predictions/p1"),
    ]  # fmt: skip
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in api.requests)
    assert sleeps.calls == [0.5]  # the first poll's wait; the second poll found it done
    assert [p.step for p in progress] == [1] and progress[0].tool == "image_generation_tool"


def test_without_sync_mode_the_prediction_is_polled_from_the_start(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    url = serve_image(cdn, "0.png")
    api.script("POST", FLUX, Reply(prediction(api, "starting"), 201))
    api.script("GET", "/v1/predictions/p1", Reply(prediction(api, "succeeded", output=[url])))
    result = call(tool_for(api, wait_s=None))
    assert len(result.images) == 1
    assert "Prefer" not in api.requests[0].headers


def test_candidates_are_num_outputs_of_one_prediction_with_the_first_seed(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    urls = [
        serve_image(cdn, f"{i}.png", png(32, 32, c)) for i, c in enumerate(["red", "green", "blue"])
    ]
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", output=urls), 201))
    trajectory, _ = run_agent(tool_for(api), candidates=3)
    (request,) = api.requests
    assert request.body["input"]["num_outputs"] == 3
    outcome = trajectory.turns[0].tool_result
    assert (
        len(outcome.images) == 3 and len({trajectory.images[i].sha256 for i in outcome.images}) == 3
    )
    # one seed drives the batch: only the first image is that seed's own
    assert outcome.seeds == [request.body["input"]["seed"], None, None]


def test_a_model_without_num_outputs_runs_one_prediction_per_seed(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    urls = {
        5: serve_image(cdn, "a.png", png(32, 32, "red")),
        6: serve_image(cdn, "b.png", png(32, 32, "blue")),
    }

    def create(request: Recorded) -> Reply:
        seed = request.body["input"]["seed"]
        return Reply(prediction(api, "succeeded", ident=f"p{seed}", output=urls[seed]), 201)

    api.always("POST", "/v1/predictions", create)
    tool = tool_for(api, model=f"acme/painter:{VERSION}", steps=20, negative_prompt="blur")
    result = call(tool, ctx=context([5, 6]))
    assert sorted(r.body["input"]["seed"] for r in api.requests) == [5, 6]
    for request in api.requests:
        assert request.body["version"] == VERSION
        assert request.body["input"]["num_inference_steps"] == 20
        assert request.body["input"]["negative_prompt"] == "blur"
        assert "num_outputs" not in request.body["input"]
    assert result.seeds == [5, 6] and len(result.images) == 2
    assert [p["id"] for p in result.metadata["predictions"]] == ["p5", "p6"]


def test_a_size_goes_to_flux_as_the_nearest_aspect_ratio(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    url = serve_image(cdn, "0.png")
    api.always("POST", FLUX, lambda r: Reply(prediction(api, "succeeded", output=[url]), 201))
    call(tool_for(api, width=1344, height=768, steps=30, guidance=3.5))
    sent = api.requests[0].body["input"]
    assert sent["aspect_ratio"] == "16:9" and "width" not in sent and "height" not in sent
    assert (sent["num_inference_steps"], sent["guidance"]) == (30, 3.5)
    # settings a caller passes per call (genagent serve) override; unknown ones are recorded
    result = call(
        tool_for(api), ctx=context(settings={"width": 768, "height": 1024, "negative_prompt": "x"})
    )
    assert api.requests[1].body["input"]["aspect_ratio"] == "3:4"
    assert result.metadata["ignored_settings"] == ["negative_prompt"]
    assert result.metadata["input"]["aspect_ratio"] == "3:4"


def test_settings_a_model_does_not_take_are_configuration_errors(api: ScriptedServer) -> None:
    with pytest.raises(ConfigurationError, match="flux-schnell takes no guidance"):
        tool_for(api, model="black-forest-labs/flux-schnell", guidance=3.0)
    with pytest.raises(ConfigurationError, match="give both width and height"):
        tool_for(api, width=512)
    with pytest.raises(ConfigurationError, match="input_extra may not set seed"):
        tool_for(api, input_extra={"seed": 1})
    with pytest.raises(ConfigurationError, match="owner/name"):
        tool_for(api, model="flux")
    with pytest.raises(ConfigurationError, match="wait_s"):
        tool_for(api, wait_s=120)
    with pytest.raises(ConfigurationError, match="aspect_ratio must be one of"):
        tool_for(api, aspect_ratio="7:3")
    with pytest.raises(ConfigurationError, match="either aspect_ratio or width and height"):
        tool_for(api, aspect_ratio="1:1", width=512, height=512)
    with pytest.raises(ConfigurationError, match="name acme/editor's image input"):
        tool_for(api, ReplicateEditTool, model="acme/editor", inputs={"image": None})
    with pytest.raises(ConfigurationError, match="max_outputs > 1 needs"):
        tool_for(api, model="acme/painter", max_outputs=4)


# --------------------------------------------------------------------------- editing


def test_the_edit_tool_sends_the_current_image_as_a_data_uri(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    first = serve_image(cdn, "gen.png", png(40, 24, "red"))
    edited = serve_image(cdn, "edit.png", png(40, 24, "blue"))
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", output=[first]), 201))
    api.script("POST", KONTEXT, Reply(prediction(api, "succeeded", ident="e1", output=edited), 201))
    tools = [tool_for(api), tool_for(api, ReplicateEditTool)]
    policy = ScriptedPolicy([generation_call("a red cube"), edit_call("make it blue"), ANSWER])
    trajectory = Agent(tools=tools, policy=policy).run("a blue cube", seed=1)
    assert trajectory.termination is Termination.ANSWERED
    assert len(trajectory.images) == 2 and trajectory.final_image_index == 1
    sent = api.requests[1].body["input"]
    assert sent["prompt"] == "make it blue" and sent["output_format"] == "png"
    assert "num_outputs" not in sent and "aspect_ratio" not in sent  # kontext matches the input
    assert sent["input_image"].startswith("data:image/png;base64,")
    assert base64.b64decode(sent["input_image"].split(",", 1)[1]) == png(40, 24, "red")
    assert trajectory.final_image.getpixel((0, 0)) == (0, 0, 255)


def test_a_large_image_to_edit_is_uploaded_then_deleted(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    edited = serve_image(cdn, "edit.png")
    file_url = f"{api.url}/v1/files/f1"
    api.script("POST", "/v1/files", Reply({"id": "f1", "urls": {"get": file_url}}, 201))
    api.script("POST", KONTEXT, Reply(prediction(api, "succeeded", output=edited), 201))
    api.script("DELETE", "/v1/files/f1", Reply(b"", 204))
    tool = tool_for(api, ReplicateEditTool, upload_over_bytes=10)
    from genagent.images import MemoryImageStore

    current = MemoryImageStore().put(png())
    result = asyncio.run(
        tool.acall(tool.Args(instruction="make it blue"), context(current_image=current))
    )
    assert len(result.images) == 1
    assert [(r.method, r.path) for r in api.requests] == [
        ("POST", "/v1/files"), ("POST", KONTEXT), ("DELETE", "/v1/files/f1"),
    ]  # fmt: skip
    upload = api.requests[0]
    assert upload.headers["Content-Type"].startswith("multipart/form-data")
    assert png() in upload.body  # the multipart body, raw
    assert api.requests[1].body["input"]["input_image"] == file_url


def test_editing_without_an_image_is_refused(api: ScriptedServer) -> None:
    from genagent import ToolRefused

    tool = tool_for(api, ReplicateEditTool)
    with pytest.raises(ToolRefused, match="no image to edit"):
        asyncio.run(tool.acall(tool.Args(instruction="x"), context()))
    assert api.requests == []


# --------------------------------------------------------------------------- transient failures


def test_429_honours_retry_after(api: ScriptedServer, cdn: ScriptedServer) -> None:
    url = serve_image(cdn, "0.png")
    throttled = {
        "title": "Request was throttled.",
        "detail": "Expected available in 3 seconds.",
        "status": 429,
    }
    api.script(
        "POST", FLUX,
        Reply(throttled, 429, headers={"Retry-After": "3"}),
        Reply(prediction(api, "succeeded", output=[url]), 201),
    )  # fmt: skip
    sleeps = Sleeps()
    result = call(tool_for(api, sleep=sleeps))
    assert len(result.images) == 1 and sleeps.calls == [3.0]
    assert len(api.requests) == 2


def test_503_on_create_and_500_on_a_poll_are_retried(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    url = serve_image(cdn, "0.png")
    api.script(
        "POST", FLUX,
        Reply("upstream broke", 503),
        Reply(prediction(api, "starting"), 201),
    )  # fmt: skip
    api.script(
        "GET", "/v1/predictions/p1",
        Reply("upstream broke", 500),
        Reply(prediction(api, "succeeded", output=[url])),
    )  # fmt: skip
    sleeps = Sleeps()
    result = call(tool_for(api, sleep=sleeps, backoff_s=1.0))
    assert len(result.images) == 1
    assert len(sleeps.calls) == 2 and all(0.5 <= s <= 1.0 for s in sleeps.calls)
    assert [r.method for r in api.requests] == ["POST", "POST", "GET", "GET"]


def test_a_500_on_create_is_not_retried(api: ScriptedServer) -> None:
    # the prediction may have been created: retrying could run (and bill) it twice
    api.script("POST", FLUX, Reply({"detail": "internal error"}, 500))
    with pytest.raises(ToolUnavailable, match="HTTP 500"):
        call(tool_for(api))
    assert len(api.requests) == 1


def test_a_hung_create_is_not_retried(api: ScriptedServer) -> None:
    api.script("POST", FLUX, Reply(prediction(api, "starting"), 201, delay_s=0.4))
    with pytest.raises(ToolUnavailable, match=r"timed out.*not retried.*raise timeout_s"):
        call(tool_for(api, wait_s=None, timeout_s=0.2))
    assert len(api.requests) == 1


def test_a_hung_poll_times_out_after_retries_and_cancels(api: ScriptedServer) -> None:
    api.script("POST", FLUX, Reply(prediction(api, "starting"), 201))
    api.script(
        "GET",
        "/v1/predictions/p1",
        *[Reply(prediction(api, "processing"), delay_s=0.3) for _ in range(2)],
    )
    api.script("POST", "/v1/predictions/p1/cancel", Reply(prediction(api, "canceled")))
    with pytest.raises(ToolUnavailable, match=r"timed out.*gave up after 2 attempts"):
        call(tool_for(api, wait_s=None, timeout_s=0.15, max_retries=1))
    assert [r.method for r in api.requests] == ["POST", "GET", "GET", "POST"]
    assert api.requests[-1].path == "/v1/predictions/p1/cancel"


def test_a_hung_image_download_times_out_too(api: ScriptedServer, cdn: ScriptedServer) -> None:
    cdn.script("GET", "/out/slow.png", *[Reply(png(), delay_s=0.4) for _ in range(2)])
    api.script(
        "POST", FLUX, Reply(prediction(api, "succeeded", output=[f"{cdn.url}/out/slow.png"]), 201)
    )
    with pytest.raises(ToolUnavailable, match="timed out"):
        call(tool_for(api, wait_s=None, timeout_s=0.2, max_retries=1))


# --------------------------------------------------------------------------- model-visible failures


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not json", "not JSON"),
        ("no status", "no prediction status"),
        ("no output", "succeeded without an image"),
        ("truncated", "not usable"),
        ("ftp", "not http"),
        ("html", "not an image"),
    ],
)
def test_malformed_answers_are_execution_errors_the_model_sees(
    api: ScriptedServer, cdn: ScriptedServer, case: str, message: str
) -> None:
    whole = png(64, 64)
    cdn.always(
        "GET",
        "/out/cut.png",
        lambda r: Reply(whole[: len(whole) // 2], headers={"Content-Type": "image/png"}),
    )
    cdn.always(
        "GET",
        "/out/page",
        lambda r: Reply("<html>login</html>", headers={"Content-Type": "text/html"}),
    )
    reply = {
        "not json": Reply("<html>502 Bad Gateway</html>", 201),
        "no status": Reply({"detail": "something"}, 201),
        "no output": Reply(prediction(api, "succeeded", output=None), 201),
        "truncated": Reply(prediction(api, "succeeded", output=[f"{cdn.url}/out/cut.png"]), 201),
        "ftp": Reply(prediction(api, "succeeded", output=["ftp://files.example/x.png"]), 201),
        "html": Reply(prediction(api, "succeeded", output=[f"{cdn.url}/out/page"]), 201),
    }[case]
    api.script("POST", FLUX, reply)
    trajectory, policy = run_agent(tool_for(api), *recover(api, cdn))
    error = trajectory.turns[0].error
    assert error is not None and error.type == "ToolExecutionError", error
    assert message in error.message
    assert message in policy.calls[1][-1].text  # the model was told
    assert trajectory.termination is Termination.ANSWERED


def test_an_nsfw_failure_is_a_refusal_the_model_sees(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    api.script("POST", FLUX, Reply(prediction(api, "failed", error=NSFW), 201))
    trajectory, policy = run_agent(tool_for(api), *recover(api, cdn))
    assert trajectory.termination is Termination.ANSWERED and len(trajectory.images) == 1
    error = trajectory.turns[0].error
    assert error is not None and error.type == "ToolRefused"
    assert (
        "NSFW content detected" in error.message and "Describe the image differently" in error.hint
    )
    assert "safety filter" in policy.calls[1][-1].text


def test_a_refusal_after_polling_is_a_refusal_too(api: ScriptedServer, cdn: ScriptedServer) -> None:
    api.script("POST", FLUX, Reply(prediction(api, "processing"), 201))
    api.script(
        "GET", "/v1/predictions/p1",
        Reply(prediction(api, "failed", error="Prediction failed: flagged as sensitive (E005)")),
    )  # fmt: skip
    trajectory, _ = run_agent(tool_for(api), *recover(api, cdn))
    assert trajectory.turns[0].error.type == "ToolRefused"
    assert not any(r.path.endswith("/cancel") for r in api.requests)  # finished: no cancel


def test_images_withheld_from_a_batch_are_reported(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    url = serve_image(cdn, "0.png")
    logs = "Using seed: 7\nNSFW content detected in image 1\n"
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", output=[url], logs=logs), 201))
    trajectory, _ = run_agent(tool_for(api), candidates=2)
    outcome = trajectory.turns[0].tool_result
    assert len(outcome.images) == 1 and outcome.seeds == [None]
    assert outcome.text == "1 of 2 candidates were withheld by Replicate's safety filter."


def test_a_batch_entirely_withheld_is_a_refusal(api: ScriptedServer, cdn: ScriptedServer) -> None:
    logs = "NSFW content detected in image 0\n"
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", output=[], logs=logs), 201))
    trajectory, _ = run_agent(tool_for(api), *recover(api, cdn))
    assert trajectory.turns[0].error.type == "ToolRefused"


def test_another_failure_is_an_execution_error_and_a_cancelled_one_ends_the_run(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    api.script("POST", FLUX, Reply(prediction(api, "failed", error="CUDA out of memory"), 201))
    trajectory, _ = run_agent(tool_for(api), *recover(api, cdn))
    error = trajectory.turns[0].error
    assert (
        error.type == "ToolExecutionError"
        and "p1" in error.message
        and "CUDA out of memory" in error.message
    )
    api.script("POST", FLUX, Reply(prediction(api, "aborted"), 201))
    with pytest.raises(ToolUnavailable, match="was aborted before it finished"):
        run_agent(tool_for(api))


def test_an_oversized_image_is_an_execution_error(api: ScriptedServer, cdn: ScriptedServer) -> None:
    noise = Image.effect_noise((128, 128), 60).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    url = serve_image(cdn, "big.png", buffer.getvalue())
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", output=[url]), 201))
    trajectory, _ = run_agent(tool_for(api, max_image_bytes=4000), *recover(api, cdn))
    error = trajectory.turns[0].error
    assert error.type == "ToolExecutionError" and "over the limit of 4,000" in error.message


def test_create_errors_say_what_to_fix(api: ScriptedServer) -> None:
    api.script(
        "POST",
        "/v1/models/acme/nothing/predictions",
        Reply({"title": "Not found", "detail": "Model not found", "status": 404}, 404),
    )
    with pytest.raises(ToolUnavailable, match=r"no model 'acme/nothing'.*check model="):
        call(tool_for(api, model="acme/nothing"))
    invalid = {
        "title": "Input validation failed",
        "detail": "- input.num_outputs: Must be less than or equal to 4",
        "status": 422,
    }
    api.script("POST", FLUX, Reply(invalid, 422))
    with pytest.raises(ToolUnavailable, match=r"num_outputs: Must be less.*input_extra"):
        call(tool_for(api))


# --------------------------------------------------------------------------- abandoned predictions


def test_a_prediction_that_never_finishes_times_out_and_is_cancelled(api: ScriptedServer) -> None:
    api.script("POST", FLUX, Reply(prediction(api, "starting"), 201))
    api.always("GET", "/v1/predictions/p1", lambda r: Reply(prediction(api, "processing")))
    api.script("POST", "/v1/predictions/p1/cancel", Reply(prediction(api, "canceled")))
    sleeps = Sleeps()
    tool = tool_for(api, sleep=sleeps, poll_timeout_s=30.0)
    with pytest.raises(ToolUnavailable, match=r"prediction p1 was not done after 3\d s"):
        call(tool)
    assert 30 <= sum(sleeps.calls) <= 35  # fake time: instant
    assert (
        api.requests[-1].method == "POST" and api.requests[-1].path == "/v1/predictions/p1/cancel"
    )
    assert api.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}"


def test_a_spent_budget_cancels_the_prediction(api: ScriptedServer) -> None:
    api.script("POST", FLUX, Reply(prediction(api, "starting"), 201))
    api.always("GET", "/v1/predictions/p1", lambda r: Reply(prediction(api, "processing")))
    api.script("POST", "/v1/predictions/p1/cancel", Reply(prediction(api, "canceled")))
    sleeps = Sleeps()
    policy = ScriptedPolicy([generation_call("a red fox"), ANSWER])
    agent = Agent(
        tool=tool_for(api, sleep=sleeps), policy=policy, time_budget_s=20, clock=sleeps.clock
    )
    trajectory = agent.run("a red fox", seed=7)
    assert trajectory.termination is Termination.BUDGET
    assert [r.path for r in api.requests if r.method == "POST"][-1] == "/v1/predictions/p1/cancel"


def test_a_cancelled_call_cancels_its_prediction(api: ScriptedServer) -> None:
    api.script("POST", FLUX, Reply(prediction(api, "starting"), 201))
    api.always("GET", "/v1/predictions/p1", lambda r: Reply(prediction(api, "processing")))
    api.script("POST", "/v1/predictions/p1/cancel", Reply(prediction(api, "canceled")))
    tool = ReplicateTool(
        base_url=f"{api.url}/v1", api_key=TOKEN, poll_interval_s=0.01, max_poll_interval_s=0.01
    )

    async def main() -> None:
        task = asyncio.ensure_future(tool.acall(GenerationArgs(caption="a cat"), context()))
        while not any(r.method == "GET" for r in api.requests):  # noqa: ASYNC110 (another thread)
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert api.requests[-1].path == "/v1/predictions/p1/cancel"


def test_urls_on_another_host_are_not_followed_with_the_token(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    url = serve_image(cdn, "0.png")
    running = prediction(api, "starting")
    running["urls"] = {
        "get": f"{cdn.url}/v1/predictions/p1",
        "cancel": f"{cdn.url}/v1/predictions/p1/cancel",
    }
    api.script("POST", FLUX, Reply(running, 201))
    api.script("GET", "/v1/predictions/p1", Reply(prediction(api, "succeeded", output=[url])))
    call(tool_for(api))
    assert [r.path for r in cdn.requests] == ["/out/0.png"]  # polled on the API host, by id


# --------------------------------------------------------------------------- secrets


def read_everything(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_the_token_never_leaks(
    api: ScriptedServer, cdn: ScriptedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = serve_image(cdn, "0.png")
    # a server echoing the token back in an error must not get it into a message either
    api.script(
        "POST", FLUX,
        Reply({"detail": f"slow down, {TOKEN}"}, 429, headers={"Retry-After": "1"}),
        Reply(prediction(api, "starting"), 201),
    )  # fmt: skip
    api.script(
        "GET", "/v1/predictions/p1", Reply(prediction(api, "failed", error=f"bad token {TOKEN}"))
    )
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", output=[url]), 201))
    trajectory, _ = run_agent(
        tool_for(api), generation_call("a fox"), generation_call("a fox"), ANSWER
    )
    assert trajectory.termination is Termination.ANSWERED and len(trajectory.images) == 1
    trajectory.save(tmp_path / "run")
    api.script(
        "POST", FLUX, Reply({"title": "Unauthenticated", "detail": f"invalid token {TOKEN}"}, 401)
    )
    tool = tool_for(api)
    with pytest.raises(ToolUnavailable) as info:
        call(tool)
    assert "REPLICATE_API_TOKEN" in str(info.value)
    texts = [
        read_everything(tmp_path / "run"),
        caplog.text,
        *(r.getMessage() for r in caplog.records),
        str(info.value),
        repr(tool),
        json.dumps(tool.describe()),
        json.dumps(trajectory.turns[0].error.model_dump()),
    ]
    for text in texts:
        assert TOKEN not in text
    assert "retrying" in caplog.text  # the 429 was logged, redacted
    # sent to the API host on every request, never to the image host
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in api.requests)
    assert all("Authorization" not in r.headers for r in cdn.requests)


def test_the_token_comes_from_the_environment(
    api: ScriptedServer, cdn: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = serve_image(cdn, "0.png")
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", output=[url]), 201))
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    call(ReplicateTool(base_url=f"{api.url}/v1", sleep=Sleeps()))
    assert api.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    with pytest.raises(ToolUnavailable, match="set REPLICATE_API_TOKEN"):
        call(ReplicateTool(base_url=f"{api.url}/v1", sleep=Sleeps()))
    assert len(api.requests) == 1  # nothing sent without a token


def test_a_credential_in_input_extra_is_not_recorded(
    api: ScriptedServer, cdn: ScriptedServer
) -> None:
    url = serve_image(cdn, "0.png")
    api.script("POST", FLUX, Reply(prediction(api, "succeeded", output=[url]), 201))
    result = call(tool_for(api, input_extra={"hf_api_token": "hf_SECRET", "go_fast": False}))
    assert api.requests[0].body["input"]["hf_api_token"] == "hf_SECRET"
    assert result.metadata["input"] == {"output_format": "png", "go_fast": False}
