"""A1111Tool / A1111EditTool against a real HTTP server on 127.0.0.1 speaking the web UI's API."""

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
    ScriptedPolicy,
    Task,
    Termination,
    ToolUnavailable,
)
from genagent.tools._base import EditArgs, GenerationArgs, ToolContext
from genagent.tools.http.a1111 import A1111EditTool, A1111Tool

from ._servers import Recorded, Reply, ScriptedServer

TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"
PASSWORD = "pass-SECRET"


def generation_call(caption: str) -> str:
    arguments = {"name": "image_generation_tool", "arguments": {"caption": caption}}
    return f"<think>Draw it.</think><tool_call>{json.dumps(arguments)}</tool_call>"


def edit_call(instruction: str) -> str:
    arguments = {"name": "image_editing_tool", "arguments": {"instruction": instruction}}
    return f"<judge>Almost.</judge><tool_call>{json.dumps(arguments)}</tool_call>"


ANSWER = "<judge>It matches.</judge><answer>Done.</answer>"


def png(width: int = 32, height: int = 24, color: str | tuple[int, int, int] = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(side: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((side, side), 60).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def answer(
    images: list[bytes], seed: int = 7, *, first: int = 0, info: Any = None
) -> dict[str, Any]:
    """A txt2img / img2img response as the web UI sends it."""
    count = len(images) - first
    if info is None:
        info = json.dumps(
            {
                "prompt": "x",
                "seed": seed,
                "all_seeds": [seed + i for i in range(count)],
                "subseed": 1,
                "all_subseeds": [1] * count,
                "sd_model_name": "sd_xl_base_1.0",
                "sd_model_hash": "31e35c80fc",
                "sampler_name": "DPM++ 2M",
                "index_of_first_image": first,
                "version": "v1.10.1",
            }
        )
    return {"images": [b64(i) for i in images], "parameters": {}, "info": info}


def by_seed(colors: list[str] | None = None) -> Any:
    """A handler answering a batch from the request: one image per ``batch_size``."""

    def handle(request: Recorded) -> Reply:
        body = request.body
        n = body["batch_size"]
        palette = colors or ["red", "green", "blue", "yellow", "white", "purple", "orange", "cyan"]
        return Reply(answer([png(color=palette[i]) for i in range(n)], body["seed"]))

    return handle


class Sleeps:
    """A recorded, instant sleep."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


def tool_for(server: ScriptedServer, cls: type[Any] = A1111Tool, **kwargs: Any) -> Any:
    kwargs.setdefault("sleep", Sleeps())
    return cls(server.url, **kwargs)


def context(seeds: list[int] | None = None, **kwargs: Any) -> ToolContext:
    seeds = seeds or [5]
    return ToolContext(
        run_id="run", task=Task(prompt="a cat"), round=1, num_images=len(seeds), seeds=seeds,
        **kwargs,
    )  # fmt: skip


def call(tool: Any, ctx: ToolContext | None = None) -> Any:
    return asyncio.run(tool.acall(GenerationArgs(caption="a cat"), ctx or context()))


def recover(server: ScriptedServer) -> tuple[str, str, str]:
    """After a failed call the model calls again and that one succeeds."""
    server.script("POST", TXT2IMG, Reply(answer([png(color="green")])))
    return generation_call("a red fox"), generation_call("a red fox, painted"), ANSWER


def run_agent(tool: Any, *replies: str, **kwargs: Any) -> Any:
    policy = ScriptedPolicy(list(replies) or [generation_call("a red fox"), ANSWER])
    trajectory = Agent(tool=tool, policy=policy, **kwargs).run("a red fox", seed=7)
    return trajectory, policy


# --------------------------------------------------------------------------- the agent


def test_an_agent_runs_txt2img(server: ScriptedServer) -> None:
    server.always("POST", TXT2IMG, by_seed())
    tool = tool_for(
        server, width=32, height=24, steps=20, guidance=6.5, negative_prompt="blurry",
        sampler_name="DPM++ 2M", scheduler="Karras",
    )  # fmt: skip
    trajectory, _ = run_agent(tool)
    assert trajectory.termination is Termination.ANSWERED
    assert trajectory.final_image.size == (32, 24)
    (request,) = server.requests
    body = request.body
    assert body["prompt"] == "a red fox" and isinstance(body["seed"], int)
    assert (body["batch_size"], body["n_iter"], body["do_not_save_grid"]) == (1, 1, True)
    assert (body["width"], body["height"], body["steps"], body["cfg_scale"]) == (32, 24, 20, 6.5)
    assert body["negative_prompt"] == "blurry"
    assert (body["sampler_name"], body["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "Authorization" not in request.headers  # no --api-auth, no credentials
    outcome = trajectory.turns[0].tool_result
    assert outcome.seeds == [body["seed"]]
    assert outcome.metadata["sd_model_name"] == "sd_xl_base_1.0"
    assert outcome.metadata["server_version"] == "v1.10.1"
    assert outcome.metadata["endpoint"] == TXT2IMG


def test_candidates_are_one_batch_and_the_reported_seeds_are_recorded(
    server: ScriptedServer,
) -> None:
    server.always("POST", TXT2IMG, by_seed())
    trajectory, _ = run_agent(tool_for(server), candidates=3)
    (request,) = server.requests
    seed = request.body["seed"]
    assert request.body["batch_size"] == 3
    outcome = trajectory.turns[0].tool_result
    assert outcome.seeds == [seed, seed + 1, seed + 2]
    assert len({trajectory.images[i].sha256 for i in outcome.images}) == 3


@pytest.mark.parametrize("with_info", [True, False])
def test_a_leading_grid_is_dropped(server: ScriptedServer, with_info: bool) -> None:
    grid = png(64, 48, "black")
    images = [grid, png(color="red"), png(color="blue")]
    info = None if with_info else "not json"
    server.script("POST", TXT2IMG, Reply(answer(images, 5, first=1, info=info)))
    result = call(tool_for(server), context([5, 6]))
    assert len(result.images) == 2
    assert [Image.open(io.BytesIO(i)).getpixel((0, 0)) for i in result.images] == [
        (255, 0, 0), (0, 0, 255),
    ]  # fmt: skip
    assert result.seeds == [5, 6]  # reported, or the web UI's seed + i without info


def test_extra_images_after_the_batch_are_ignored(server: ScriptedServer) -> None:
    # ControlNet and other scripts append their detect maps after the batch
    body = answer([png(color="red"), png(64, 64, "white")], 5)
    body["info"] = json.dumps({"all_seeds": [5], "index_of_first_image": 0})
    server.script("POST", TXT2IMG, Reply(body))
    result = call(tool_for(server))
    assert len(result.images) == 1 and result.seeds == [5]


def test_a_checkpoint_goes_in_override_settings(server: ScriptedServer) -> None:
    server.always("POST", TXT2IMG, by_seed())
    call(tool_for(server, checkpoint="sd_xl_base_1.0.safetensors", extra_body={"clip_skip": 2}))
    body = server.requests[0].body
    assert body["override_settings"] == {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}
    assert body["override_settings_restore_afterwards"] is True and body["clip_skip"] == 2


def test_bad_settings_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="steps must be a positive int"):
        A1111Tool(steps=0)
    with pytest.raises(ConfigurationError, match="extra_body may not set batch_size"):
        A1111Tool(extra_body={"batch_size": 4})
    with pytest.raises(ConfigurationError, match="once"):
        A1111Tool("http://u:p@127.0.0.1:7860", api_auth=("u", "p"))
    with pytest.raises(ConfigurationError, match="denoising_strength"):
        A1111EditTool(denoising_strength=1.5)


# --------------------------------------------------------------------------- editing


def test_the_edit_tool_runs_img2img_on_the_current_image(server: ScriptedServer) -> None:
    server.script("POST", TXT2IMG, Reply(answer([png(44, 30, "red")])))
    server.script("POST", IMG2IMG, Reply(answer([png(48, 32, "blue")])))
    tools = [tool_for(server), tool_for(server, A1111EditTool, denoising_strength=0.6)]
    policy = ScriptedPolicy([generation_call("a red cube"), edit_call("a blue cube"), ANSWER])
    trajectory = Agent(tools=tools, policy=policy).run("a blue cube", seed=1)
    assert trajectory.termination is Termination.ANSWERED
    assert len(trajectory.images) == 2 and trajectory.final_image_index == 1
    body = server.requests[1].body
    assert server.requests[1].path == IMG2IMG
    assert body["prompt"] == "a blue cube" and body["denoising_strength"] == 0.6
    assert base64.b64decode(body["init_images"][0]) == png(44, 30, "red")
    assert (body["width"], body["height"]) == (48, 32)  # the current image's, to a multiple of 8
    assert trajectory.turns[1].tool_result.metadata["denoising_strength"] == 0.6


def test_editing_without_an_image_is_refused(server: ScriptedServer) -> None:
    from genagent import ToolRefused

    with pytest.raises(ToolRefused, match="no image to edit"):
        asyncio.run(tool_for(server, A1111EditTool).acall(EditArgs(instruction="x"), context()))
    assert server.requests == []


# --------------------------------------------------------------------------- transient failures


def test_429_honours_retry_after(server: ScriptedServer) -> None:
    server.script(
        "POST", TXT2IMG,
        Reply({"detail": "busy"}, 429, headers={"Retry-After": "4"}),
        Reply(answer([png()])),
    )  # fmt: skip
    sleeps = Sleeps()
    result = call(tool_for(server, sleep=sleeps))
    assert len(result.images) == 1 and sleeps.calls == [4.0]


def test_500_then_success_backs_off(server: ScriptedServer) -> None:
    oom = {"error": "OutOfMemoryError", "detail": "", "body": "", "errors": "CUDA out of memory"}
    server.script("POST", TXT2IMG, Reply(oom, 500), Reply(answer([png()])))
    sleeps = Sleeps()
    result = call(tool_for(server, sleep=sleeps, backoff_s=1.0))
    assert len(result.images) == 1
    assert len(sleeps.calls) == 1 and 0.5 <= sleeps.calls[0] <= 1.0


def test_a_500_that_persists_ends_the_run_with_the_servers_error(server: ScriptedServer) -> None:
    oom = {"error": "OutOfMemoryError", "detail": "", "body": "", "errors": "CUDA out of memory"}
    server.script("POST", TXT2IMG, *[Reply(oom, 500) for _ in range(3)])
    with pytest.raises(ToolUnavailable, match=r"HTTP 500.*CUDA out of memory.*after 3 attempts"):
        run_agent(tool_for(server, max_retries=2))


def test_a_hung_connection_times_out_into_tool_unavailable(server: ScriptedServer) -> None:
    # the web UI may still be generating: a second request would queue a duplicate
    server.script("POST", TXT2IMG, *[Reply(answer([png()]), delay_s=0.4) for _ in range(2)])
    with pytest.raises(ToolUnavailable, match=r"timed out.*not retried"):
        call(tool_for(server, timeout_s=0.2, max_retries=1))
    assert len(server.requests) == 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply("<html>Bad Gateway</html>"), "not JSON"),
        (Reply({"detail": "nothing"}), "without an 'images' list"),
        (Reply({"images": ["iVBORw0KGgoAAAANSUhEUgAAA"]}), "cannot be decoded"),
        (Reply({"images": [b64(noise_png())[:202]]}), "cannot be decoded"),
        (Reply({"images": [b64(noise_png()[:3000])]}), "not usable"),
        (Reply({"images": []}), "0 images for 1 asked"),
    ],
    ids=["not-json", "no-images", "bad-padding", "truncated-base64", "truncated-png", "empty"],
)
def test_malformed_answers_are_execution_errors_the_model_sees(
    server: ScriptedServer, reply: Reply, message: str
) -> None:
    server.script("POST", TXT2IMG, reply)
    trajectory, policy = run_agent(tool_for(server), *recover(server))
    error = trajectory.turns[0].error
    assert error is not None and error.type == "ToolExecutionError", error
    assert message in error.message
    assert message in policy.calls[1][-1].text  # the model was told
    assert trajectory.termination is Termination.ANSWERED and len(trajectory.images) == 1


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            Reply({"detail": [{"loc": ["body", "width"], "msg": "value is not a valid integer",
                               "type": "type_error.integer"}]}, 422),
            "width: value is not a valid integer. Fix the tool's settings or extra_body",
        ),
        (Reply({"detail": "Not Found"}, 404), "start it with --api"),
        (
            Reply({"error": "HTTPException", "detail": "Sampler not found", "body": "",
                   "errors": ""}, 404),
            "Sampler not found.*check sampler_name",
        ),
        (Reply({"detail": "Incorrect username or password"}, 401), "api_auth=\\('user'"),
    ],
    ids=["422", "no-api", "sampler", "auth"],
)  # fmt: skip
def test_error_answers_say_what_to_fix(server: ScriptedServer, reply: Reply, message: str) -> None:
    server.script("POST", TXT2IMG, reply)
    with pytest.raises(ToolUnavailable, match=message):
        call(tool_for(server))
    assert len(server.requests) == 1  # not retried


def test_an_all_black_image_is_a_refusal_the_model_sees(server: ScriptedServer) -> None:
    # the web UI has no moderation of its own; an NSFW-censor extension blacks images out
    server.script("POST", TXT2IMG, Reply(answer([png(color="black")])))
    trajectory, policy = run_agent(tool_for(server), *recover(server))
    error = trajectory.turns[0].error
    assert error is not None and error.type == "ToolRefused"
    assert "all black" in error.message and "--no-half-vae" in error.message
    assert "all black" in policy.calls[1][-1].text
    # without the check the black image is an image like any other
    server.script("POST", TXT2IMG, Reply(answer([png(color="black")])))
    assert len(call(tool_for(server, check_blank=False)).images) == 1


def test_black_images_in_a_batch_are_dropped_and_reported(server: ScriptedServer) -> None:
    server.always("POST", TXT2IMG, by_seed(["red", "black", "blue"]))
    trajectory, _ = run_agent(tool_for(server), candidates=3)
    outcome = trajectory.turns[0].tool_result
    seed = server.requests[0].body["seed"]
    assert len(outcome.images) == 2 and outcome.seeds == [seed, seed + 2]
    assert outcome.text.startswith("1 of 3 candidates were dropped: all-black images")


def test_an_oversized_image_is_an_execution_error(server: ScriptedServer) -> None:
    server.script("POST", TXT2IMG, Reply(answer([noise_png()])))
    trajectory, _ = run_agent(tool_for(server, max_image_bytes=4000), *recover(server))
    error = trajectory.turns[0].error
    assert error.type == "ToolExecutionError" and "over the limit of 4,000" in error.message


def test_a_cancelled_call_can_interrupt_the_web_ui(server: ScriptedServer) -> None:
    server.script("POST", TXT2IMG, Reply(answer([png()]), delay_s=0.4))
    server.script("POST", "/sdapi/v1/interrupt", Reply({}))
    tool = tool_for(server, interrupt_on_cancel=True)

    async def main() -> None:
        task = asyncio.ensure_future(tool.acall(GenerationArgs(caption="a cat"), context()))
        while not server.requests:  # noqa: ASYNC110 (the server records from its own thread)
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [r.path for r in server.requests] == [TXT2IMG, "/sdapi/v1/interrupt"]


# --------------------------------------------------------------------------- secrets


def read_everything(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["api_auth", "url"])
def test_the_password_is_basic_auth_and_never_leaks(
    server: ScriptedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.DEBUG)
    host = server.url.removeprefix("http://")
    tool = (
        A1111Tool(server.url, api_auth=("alice", PASSWORD), sleep=Sleeps())
        if how == "api_auth"
        else A1111Tool(f"http://alice:{PASSWORD}@{host}", sleep=Sleeps())
    )
    # a server echoing the password in its errors must not get it into a message either
    server.script(
        "POST", TXT2IMG,
        Reply({"detail": f"busy for {PASSWORD}"}, 503, headers={"Retry-After": "1"}),
        Reply({"images": ["!!!"], "info": PASSWORD}),
        Reply(answer([png()])),
    )  # fmt: skip
    trajectory, _ = run_agent(tool, generation_call("a fox"), generation_call("a fox"), ANSWER)
    assert trajectory.termination is Termination.ANSWERED and len(trajectory.images) == 1
    trajectory.save(tmp_path / "run")
    server.script("POST", TXT2IMG, Reply({"detail": f"no {PASSWORD}"}, 401))
    with pytest.raises(ToolUnavailable) as info:
        call(tool)
    server.script(
        "POST", TXT2IMG, Reply({"detail": [{"loc": ["body", PASSWORD], "msg": PASSWORD}]}, 422)
    )
    with pytest.raises(ToolUnavailable) as info422:
        call(tool)
    expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert all(r.headers["Authorization"] == expected for r in server.requests)
    texts = [
        read_everything(tmp_path / "run"),
        caplog.text,
        *(r.getMessage() for r in caplog.records),
        str(info.value),
        str(info422.value),
        repr(tool),
        json.dumps(tool.describe()),
    ]
    for text in texts:
        assert PASSWORD not in text and "alice" not in text
    assert "retrying" in caplog.text


def test_the_password_is_not_sent_to_another_host(server: ScriptedServer) -> None:
    # a proxy in front of the web UI answering with a redirect elsewhere: the credentials
    # belong to the configured host only
    with ScriptedServer() as other:
        other.always("POST", TXT2IMG, by_seed())
        server.script(
            "POST", TXT2IMG, Reply(b"", 307, headers={"Location": f"{other.url}{TXT2IMG}"})
        )
        call(tool_for(server, api_auth=("alice", PASSWORD)))
        assert "Authorization" in server.requests[0].headers
        assert "Authorization" not in other.requests[0].headers
