"""OpenAIImagesTool / OpenAIImageEditTool against real HTTP servers on 127.0.0.1.

The API server speaks the OpenAI Images wire format (``POST /v1/images/generations`` with a
JSON body, ``POST /v1/images/edits`` with ``multipart/form-data``); a second server on another
port plays the CDN that serves image URLs, so that the API key can be seen not to reach it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from genagent import (
    Agent,
    ConfigurationError,
    MemoryImageStore,
    ScriptedPolicy,
    Task,
    Termination,
    ToolUnavailable,
)
from genagent.errors import ToolArgumentError, ToolExecutionError, ToolRefused
from genagent.tools import EditArgs, GenerationArgs, ToolContext
from genagent.tools.http.openai_images import OpenAIImageEditTool, OpenAIImagesTool

from ._servers import Recorded, Reply, ScriptedServer

KEY = "sk-test-SECRET-123"
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
ANSWER = "<judge>It matches.</judge><answer>Done.</answer>"


def generation_call(caption: str) -> str:
    arguments = {"name": "image_generation_tool", "arguments": {"caption": caption}}
    return f"<think>Draw it.</think><tool_call>{json.dumps(arguments)}</tool_call>"


def edit_call(instruction: str) -> str:
    arguments = {"name": "image_editing_tool", "arguments": {"instruction": instruction}}
    return f"<judge>Almost.</judge><tool_call>{json.dumps(arguments)}</tool_call>"


class Sleeps:
    """A recorded, instant sleep: retries are tested without waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def png(colour: str = "red", size: tuple[int, int] = (16, 16), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def images_body(*images: bytes, revised: str | None = None) -> dict[str, Any]:
    data: list[dict[str, Any]] = [{"b64_json": b64(image)} for image in images]
    if revised is not None:
        for item in data:
            item["revised_prompt"] = revised
    return {"created": 1_700_000_000, "data": data}


def multipart(request: Recorded) -> dict[str, Any]:
    """The form of a ``multipart/form-data`` request: fields as text, files as (name, bytes)."""
    content_type = request.headers["Content-Type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + request.body
    )
    form: dict[str, Any] = {}
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        filename = part.get_filename()
        form[name] = (filename, part.get_content_type(), payload) if filename else payload.decode()
    return form


# One API server and one CDN per module, cleared before each test: stopping a ScriptedServer
# waits out its serve_forever poll (0.5 s), which would otherwise double this module's time.
@pytest.fixture(scope="module")
def _api_server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


@pytest.fixture(scope="module")
def _cdn_server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


def _cleared(server: ScriptedServer) -> ScriptedServer:
    with server._lock:
        server.routes.clear()
        server.fallback.clear()
        server.patterns.clear()
        server.requests.clear()
    return server


@pytest.fixture
def server(_api_server: ScriptedServer) -> ScriptedServer:
    return _cleared(_api_server)


@pytest.fixture
def cdn(_cdn_server: ScriptedServer) -> ScriptedServer:
    return _cleared(_cdn_server)


def tool_for(server: ScriptedServer, **kwargs: Any) -> OpenAIImagesTool:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("sleep", Sleeps())
    return OpenAIImagesTool(f"{server.url}/v1", **kwargs)


def editor_for(server: ScriptedServer, **kwargs: Any) -> OpenAIImageEditTool:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("sleep", Sleeps())
    return OpenAIImageEditTool(f"{server.url}/v1", **kwargs)


def run_once(
    tool: OpenAIImagesTool, caption: str = "a red cube", *, calls: int = 1, **agent: Any
) -> Any:
    """One agent run whose policy calls the tool ``calls`` times, then answers."""
    policy = ScriptedPolicy([generation_call(caption)] * calls + [ANSWER])
    return Agent(tool=tool, policy=policy, **agent).run(caption, seed=0)


def call(tool: Any, text: str, **ctx: Any) -> Any:
    args = (
        EditArgs(instruction=text)
        if isinstance(tool, OpenAIImageEditTool)
        else GenerationArgs(caption=text)
    )
    context = ToolContext(run_id="r", task=Task(prompt=text), round=1, **ctx)
    return asyncio.run(tool.acall(args, context))


# --------------------------------------------------------------------------- generation


def test_an_agent_runs_with_gpt_image_1_and_base64_images(server: ScriptedServer) -> None:
    body = images_body(png("blue"))
    body.update(quality="medium", output_format="png", usage={"total_tokens": 10})
    server.script("POST", GENERATIONS, Reply(body))
    tool = tool_for(server, size="1024x1024", quality="medium", background="opaque")
    trajectory = run_once(tool)
    assert trajectory.termination is Termination.ANSWERED
    assert trajectory.final_image is not None and trajectory.final_image.size == (16, 16)
    (request,) = server.requests
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.body == {
        "model": "gpt-image-1",
        "prompt": "a red cube",
        "n": 1,
        "size": "1024x1024",
        "quality": "medium",
        "background": "opaque",
    }  # gpt-image-1 takes no response_format: it always answers in base64
    result = trajectory.turns[0].tool_result
    assert result is not None and result.seeds == [None]  # the API has no seed
    assert result.metadata["model"] == "gpt-image-1"
    assert result.metadata["size"] == "1024x1024" and result.metadata["quality"] == "medium"
    assert result.metadata["usage"] == {"total_tokens": 10}
    assert result.metadata["created"] == 1_700_000_000


def test_dall_e_3_sends_one_request_per_candidate_and_records_the_revised_prompt(
    server: ScriptedServer,
) -> None:
    server.always(
        "POST", GENERATIONS, lambda r: Reply(images_body(png(), revised="A vivid red cube."))
    )
    tool = tool_for(server, model="dall-e-3", quality="hd", style="natural")
    assert tool.max_images_per_call == 1
    trajectory = run_once(tool, candidates=2)
    assert len(trajectory.images) == 2
    assert [r.body["n"] for r in server.requests] == [1, 1]
    assert server.requests[0].body["response_format"] == "b64_json"
    assert server.requests[0].body["style"] == "natural"
    result = trajectory.turns[0].tool_result
    assert result is not None and result.seeds == [None, None]
    calls = result.metadata["calls"]
    assert [c["revised_prompt"] for c in calls] == ["A vivid red cube."] * 2


def test_candidates_go_in_one_request_with_n(server: ScriptedServer) -> None:
    server.script("POST", GENERATIONS, Reply(images_body(png("red"), png("green"), png("blue"))))
    trajectory = run_once(tool_for(server, model="dall-e-2", size="256x256"), candidates=3)
    assert len(trajectory.images) == 3 and len(server.requests) == 1
    assert server.requests[0].body["n"] == 3 and server.requests[0].body["size"] == "256x256"


def test_url_responses_are_downloaded_without_the_api_key(
    server: ScriptedServer, cdn: ScriptedServer
) -> None:
    image = png("green")
    cdn.route("GET", r"/images/[a-z0-9]+\.png", lambda r: Reply(image, headers=_PNG))
    url = f"{cdn.url}/images/abc1.png"
    server.script("POST", GENERATIONS, Reply({"created": 1, "data": [{"url": url}]}))
    trajectory = run_once(tool_for(server, model="dall-e-2", response_format="url"))
    assert trajectory.images[0].nbytes == len(image)
    assert server.requests[0].body["response_format"] == "url"
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    (download,) = cdn.requests
    assert download.path == "/images/abc1.png"
    assert "Authorization" not in download.headers  # the key goes to the API's host only
    assert KEY not in json.dumps(download.headers)


def test_the_size_comes_from_the_call_settings(server: ScriptedServer) -> None:
    server.always("POST", GENERATIONS, lambda r: Reply(images_body(png())))
    tool = tool_for(server, model="dall-e-3", size="1024x1024")
    call(tool, "a cat", settings={"width": 1792, "height": 1024})
    assert server.requests[0].body["size"] == "1792x1024"
    with pytest.raises(ConfigurationError, match=r"cannot make 512x512 images.*1792x1024"):
        call(tool, "a cat", settings={"width": 512, "height": 512})
    with pytest.raises(ConfigurationError, match="both a width and a height"):
        call(tool, "a cat", settings={"width": 1024})
    assert len(server.requests) == 1


def test_a_compatible_server_gets_its_own_model_and_any_size(server: ScriptedServer) -> None:
    server.script("POST", GENERATIONS, Reply(images_body(png())))
    tool = OpenAIImagesTool(
        f"{server.url}/v1", model="flux-dev", size="768x512", sleep=Sleeps()
    )  # no key: a local server may need none
    result = call(tool, "a cat")
    assert len(result.images) == 1
    body = server.requests[0].body
    assert (body["model"], body["size"], body["response_format"]) == (
        "flux-dev",
        "768x512",
        "b64_json",
    )
    assert "Authorization" not in server.requests[0].headers


def test_the_key_comes_from_openai_api_key(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.script("POST", GENERATIONS, Reply(images_body(png())))
    call(OpenAIImagesTool(f"{server.url}/v1", sleep=Sleeps()), "a cat")
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"


def test_openai_without_a_key_is_unavailable_at_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ToolUnavailable, match="set OPENAI_API_KEY or pass api_key"):
        OpenAIImagesTool().setup()
    OpenAIImagesTool(api_key=KEY).setup()


# --------------------------------------------------------------------------- edits


def test_an_agent_generates_then_edits_through_multipart(server: ScriptedServer) -> None:
    generated, edited = png("red"), png("blue")
    forms: list[dict[str, Any]] = []

    def edit(request: Recorded) -> Reply:
        forms.append(multipart(request))
        return Reply(images_body(edited))

    server.script("POST", GENERATIONS, Reply(images_body(generated)))
    server.always("POST", EDITS, edit)
    tools = [tool_for(server), editor_for(server, input_fidelity="high", size="1024x1024")]
    policy = ScriptedPolicy([generation_call("a red cube"), edit_call("make it blue"), ANSWER])
    trajectory = Agent(tools=tools, policy=policy).run("a blue cube", seed=0)
    assert trajectory.termination is Termination.ANSWERED
    assert len(trajectory.images) == 2 and trajectory.final_image_index == 1
    assert trajectory.images[1].nbytes == len(edited)
    (form,) = forms
    assert form["image"] == ("image.png", "image/png", generated)  # the current image, as is
    assert {k: v for k, v in form.items() if k != "image"} == {
        "model": "gpt-image-1",
        "prompt": "make it blue",
        "n": "1",
        "size": "1024x1024",
        "input_fidelity": "high",
    }
    assert server.requests[1].headers["Authorization"] == f"Bearer {KEY}"
    result = trajectory.turns[1].tool_result
    assert result is not None and result.seeds == [None]


def test_dall_e_2_edits_get_a_png_and_base64_answers(server: ScriptedServer) -> None:
    forms: list[dict[str, Any]] = []

    def edit(request: Recorded) -> Reply:
        forms.append(multipart(request))
        return Reply(images_body(png("blue")))

    server.always("POST", EDITS, edit)
    current = MemoryImageStore().put(png("red", fmt="JPEG"))
    result = call(editor_for(server, model="dall-e-2"), "make it blue", current_image=current)
    assert len(result.images) == 1
    filename, kind, data = forms[0]["image"]
    assert (filename, kind) == ("image.png", "image/png")  # dall-e-2 edits PNGs only
    assert Image.open(io.BytesIO(data)).format == "PNG"
    assert forms[0]["response_format"] == "b64_json" and forms[0]["model"] == "dall-e-2"


def test_a_retried_edit_sends_the_whole_form_again(server: ScriptedServer) -> None:
    forms: list[dict[str, Any]] = []

    def edit(request: Recorded) -> Reply:
        forms.append(multipart(request))
        if len(forms) == 1:
            return Reply({"error": {"message": "overloaded", "type": "server_error"}}, 503)
        return Reply(images_body(png("blue")))

    server.always("POST", EDITS, edit)
    image = png("red")
    current = MemoryImageStore().put(image)
    result = call(editor_for(server), "make it blue", current_image=current)
    assert len(result.images) == 1
    assert forms[0] == forms[1] and forms[1]["image"][2] == image


def test_an_edit_without_an_image_is_refused_without_a_request(server: ScriptedServer) -> None:
    with pytest.raises(ToolRefused, match="no image to edit"):
        call(editor_for(server), "make it blue")
    assert server.requests == []


# --------------------------------------------------------------------------- retries


def test_429_with_retry_after_then_success_waits_what_the_server_asked(
    server: ScriptedServer,
) -> None:
    server.script(
        "POST", GENERATIONS,
        Reply({"error": {"message": "Rate limit reached", "type": "requests"}}, 429,
              headers={"Retry-After": "7"}),
        Reply(images_body(png())),
    )  # fmt: skip
    sleeps = Sleeps()
    trajectory = run_once(tool_for(server, sleep=sleeps))
    assert trajectory.termination is Termination.ANSWERED and len(trajectory.images) == 1
    assert sleeps.calls == [7.0] and len(server.requests) == 2


def test_500_then_success_backs_off_once(server: ScriptedServer) -> None:
    server.script(
        "POST", GENERATIONS,
        Reply({"error": {"message": "The server had an error", "type": "server_error"}}, 500),
        Reply(images_body(png())),
    )  # fmt: skip
    sleeps = Sleeps()
    trajectory = run_once(tool_for(server, sleep=sleeps, backoff_s=1.0))
    assert len(trajectory.images) == 1
    assert len(sleeps.calls) == 1 and 0.5 <= sleeps.calls[0] <= 1.0


def test_a_hung_server_is_unavailable_after_the_retries(server: ScriptedServer) -> None:
    server.script("POST", GENERATIONS, *[Reply(images_body(png()), delay_s=1.0)] * 2)
    tool = tool_for(server, timeout_s=0.3, max_retries=1)
    with pytest.raises(ToolUnavailable, match=r"timed out.*not retried") as info:
        run_once(tool)  # the image may still be generated (and billed): not asked for twice
    assert info.value.trajectory is not None and len(server.requests) == 1


# --------------------------------------------------------------------------- bad answers

TRUNCATED = b64(png())[:41]  # cut mid-stream: not even valid base64 padding
_NOISE = io.BytesIO()
Image.effect_noise((32, 32), 50).convert("RGB").save(_NOISE, format="PNG")
CUT_PNG = b64(_NOISE.getvalue()[: len(_NOISE.getvalue()) // 2])  # a PNG cut mid-pixels


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply("<html>502 Bad Gateway</html>", 200), "is not JSON"),
        (Reply({"created": 1}), "no 'data' list"),
        (Reply({"created": 1, "data": []}), "empty 'data' list"),
        (Reply({"data": [{"b64_json": TRUNCATED}]}), "cannot be decoded"),
        (Reply({"data": [{"b64_json": CUT_PNG}]}), "not usable"),
        (Reply({"data": [{"revised_prompt": "x"}]}), "neither 'b64_json' nor 'url'"),
        (Reply({"data": ["aGVsbG8="]}), "not an object"),
    ],
    ids=["html", "no-data", "empty-data", "bad-base64", "cut-png", "no-image", "not-object"],
)
def test_malformed_answers_are_execution_errors_the_model_sees(
    server: ScriptedServer, reply: Reply, message: str
) -> None:
    server.script("POST", GENERATIONS, reply, Reply(images_body(png())))
    trajectory = run_once(tool_for(server), calls=2)
    assert trajectory.termination is Termination.ANSWERED
    failed = trajectory.turns[0]
    assert failed.error is not None and failed.error.type == "ToolExecutionError"
    assert message in failed.error.message
    assert "Try the call again." in trajectory.turns[1].messages[0].text
    assert len(trajectory.images) == 1 and len(server.requests) == 2  # the retry got one


def test_an_image_over_max_image_bytes_is_an_execution_error(server: ScriptedServer) -> None:
    server.script("POST", GENERATIONS, Reply(images_body(png(size=(64, 64)))))
    with pytest.raises(ToolExecutionError, match="over the limit of 100 bytes"):
        call(tool_for(server, max_image_bytes=100), "a cat")


def test_a_url_whose_content_length_is_over_the_limit_is_not_read(
    server: ScriptedServer, cdn: ScriptedServer
) -> None:
    big = png(size=(64, 64))
    cdn.route("GET", r"/big\.png", lambda r: Reply(big, headers=_PNG))
    server.script("POST", GENERATIONS, Reply({"data": [{"url": f"{cdn.url}/big.png"}]}))
    tool = tool_for(server, model="dall-e-2", response_format="url", max_image_bytes=100)
    with pytest.raises(ToolExecutionError, match=f"{len(big):,} bytes, over the limit of 100"):
        call(tool, "a cat")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "//x/y.png"])
def test_an_image_url_that_is_not_http_is_never_fetched(
    server: ScriptedServer, cdn: ScriptedServer, url: str
) -> None:
    server.script("POST", GENERATIONS, Reply({"data": [{"url": url}]}), Reply(images_body(png())))
    trajectory = run_once(tool_for(server, model="dall-e-2", response_format="url"), calls=2)
    failed = trajectory.turns[0]
    assert failed.error is not None and failed.error.type == "ToolExecutionError"
    assert "not http(s)" in failed.error.message
    assert len(trajectory.images) == 1 and cdn.requests == []


# --------------------------------------------------------------------------- API errors

DALL_E_REFUSAL = {
    "error": {
        "code": "content_policy_violation",
        "message": "Your request was rejected as a result of our safety system. Your prompt "
        "may contain text that is not allowed by our safety system.",
        "param": None,
        "type": "invalid_request_error",
    }
}
GPT_IMAGE_REFUSAL = {
    "error": {
        "message": "Your request was rejected by the safety system. safety_violations=[violence].",
        "type": "image_generation_user_error",
        "param": None,
        "code": "moderation_blocked",
        "moderation_details": {"moderation_stage": "input", "categories": ["violence"]},
    }
}


@pytest.mark.parametrize("body", [DALL_E_REFUSAL, GPT_IMAGE_REFUSAL], ids=["dall-e", "gpt-image"])
def test_a_moderation_refusal_is_a_refusal_the_model_sees(
    server: ScriptedServer, body: dict[str, Any]
) -> None:
    server.script("POST", GENERATIONS, Reply(body, 400), Reply(images_body(png())))
    policy = ScriptedPolicy([generation_call("a battle"), generation_call("a chess game"), ANSWER])
    trajectory = Agent(tool=tool_for(server), policy=policy).run("a battle", seed=0)
    assert trajectory.termination is Termination.ANSWERED and len(trajectory.images) == 1
    refused = trajectory.turns[0]
    assert refused.error is not None and refused.error.type == "ToolRefused"
    assert "safety system" in refused.error.message
    shown = trajectory.turns[1].messages[0].text
    assert "refused the request" in shown and "Rephrase the caption" in shown
    if body is GPT_IMAGE_REFUSAL:
        assert "flagged: violence" in shown
    assert [r.body["prompt"] for r in server.requests] == ["a battle", "a chess game"]


def test_an_edit_refusal_asks_for_a_new_instruction(server: ScriptedServer) -> None:
    server.script("POST", EDITS, Reply(GPT_IMAGE_REFUSAL, 400))
    current = MemoryImageStore().put(png())
    with pytest.raises(ToolRefused) as info:
        call(editor_for(server), "make it gory", current_image=current)
    assert "Rephrase the instruction" in info.value.for_model()


def test_a_rejected_prompt_is_an_argument_error(server: ScriptedServer) -> None:
    error = {
        "error": {
            "code": "string_above_max_length",
            "param": "prompt",
            "message": "'prompt' is too long.",
            "type": "invalid_request_error",
        }
    }
    server.script("POST", GENERATIONS, Reply(error, 400))
    with pytest.raises(ToolArgumentError, match="rejected the caption: 'prompt' is too long"):
        call(tool_for(server), "a cat")


def test_a_caption_over_the_models_limit_is_refused_before_any_request(
    server: ScriptedServer,
) -> None:
    with pytest.raises(ToolArgumentError, match="1,001 characters; dall-e-2 accepts at most 1,000"):
        call(tool_for(server, model="dall-e-2"), "x" * 1001)
    assert server.requests == []


def test_a_rejected_setting_is_unavailable_with_the_servers_message(
    server: ScriptedServer,
) -> None:
    error = {
        "error": {
            "code": "invalid_value",
            "param": "quality",
            "type": "invalid_request_error",
            "message": "Invalid value: 'ultra'. Supported values are: 'low', 'high'.",
        }
    }
    server.script("POST", GENERATIONS, Reply(error, 400))
    tool = tool_for(server, model="my-model", quality="ultra")
    with pytest.raises(ToolUnavailable, match=r"param quality.*Invalid value: 'ultra'.*settings"):
        run_once(tool)
    assert len(server.requests) == 1  # not retried


# --------------------------------------------------------------------------- secrets


def test_the_api_key_never_reaches_logs_errors_or_saved_trajectories(
    server: ScriptedServer,
    cdn: ScriptedServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    image = png("green")
    cdn.route("GET", r"/img\.png", lambda r: Reply(image, headers=_PNG))
    server.script(
        "POST", GENERATIONS,
        Reply(f"rate limited for key {KEY}", 429, headers={"Retry-After": "1"}),
        Reply({"data": [{"url": f"{cdn.url}/img.png", "revised_prompt": "a cube"}]}),
    )  # fmt: skip
    tool = tool_for(server, model="dall-e-3", response_format="url")
    trajectory = run_once(tool)
    assert trajectory.termination is Termination.ANSWERED
    assert any("retrying" in r.getMessage() for r in caplog.records)  # the 429 was logged
    folder = trajectory.save(tmp_path / "run")

    # an error whose body echoes the key, as some servers do
    echoed = {"error": {"message": f"Incorrect API key provided: {KEY}", "code": "invalid_api_key"}}
    server.script("POST", GENERATIONS, Reply(echoed, 401))
    with pytest.raises(ToolUnavailable) as info:
        run_once(tool)
    assert "OPENAI_API_KEY" in str(info.value) and "***" in str(info.value)

    server.script(
        "POST", GENERATIONS,
        Reply({"error": {"code": "content_policy_violation", "message": f"no {KEY}"}}, 400),
        Reply(images_body(png())),
    )  # fmt: skip
    refused = run_once(tool, calls=2)
    assert refused.turns[0].error is not None and "***" in refused.turns[0].error.message
    refused.save(tmp_path / "refused")

    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert "Authorization" not in cdn.requests[0].headers
    texts = [str(info.value), repr(info.value.message), repr(tool), json.dumps(tool.describe())]
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]
    texts += [json.dumps(refused.turns[0].error.model_dump())]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert folder.exists() and len(files) >= 4
    for text in texts:
        assert KEY not in text
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "dall-e-3", "size": "256x256"}, "size='256x256'.*1024x1024, 1792x1024"),
        ({"model": "gpt-image-1", "size": "1792x1024"}, "pick one of auto, 1024x1024"),
        ({"model": "dall-e-2", "quality": "hd"}, "quality='hd' is not accepted by dall-e-2"),
        ({"model": "gpt-image-1", "style": "vivid"}, "style= is an option of dall-e-3"),
        ({"model": "dall-e-3", "background": "transparent"}, "option of the gpt-image models"),
        ({"model": "gpt-image-1", "response_format": "url"}, "always answers with base64"),
        ({"size": "big"}, "'WIDTHxHEIGHT' or 'auto'"),
        ({"output_compression": 150}, "0-100"),
        ({"model": "dall-e-3", "style": "bold"}, "style='bold'.*pick one of vivid, natural"),
        ({"model": " "}, "model must be a model name"),
    ],
)
def test_settings_the_model_does_not_accept_are_configuration_errors(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        OpenAIImagesTool(api_key=KEY, **kwargs)


def test_dall_e_3_cannot_edit() -> None:
    with pytest.raises(ConfigurationError, match="dall-e-3 cannot edit"):
        OpenAIImageEditTool(api_key=KEY, model="dall-e-3")
    with pytest.raises(ConfigurationError, match="input_fidelity"):
        OpenAIImageEditTool(api_key=KEY, model="dall-e-2", input_fidelity="high")


def test_describe_and_repr_show_the_settings_not_the_key() -> None:
    tool = OpenAIImagesTool(api_key=KEY, model="dall-e-3", size="1792x1024", style="vivid")
    described = tool.describe()
    assert described["model"] == "dall-e-3" and described["size"] == "1792x1024"
    assert described["base_url"] == "https://api.openai.com/v1"
    assert described["options"] == {"style": "vivid"}
    assert "dall-e-3" in repr(tool) and KEY not in repr(tool) + json.dumps(described)


_PNG = {"Content-Type": "image/png"}
