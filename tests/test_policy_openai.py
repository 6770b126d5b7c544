"""OpenAIPolicy against a real HTTP server on 127.0.0.1 speaking the chat-completions format."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from genagent import Agent, Message, PolicyError, SamplingParams, Termination
from genagent.images import MemoryImageStore
from genagent.policies import OpenAIPolicy
from genagent.sim import SceneTool

from ._servers import Recorded, Reply, ScriptedServer

CHAT = "/v1/chat/completions"


def completion(
    text: str = "<answer>ok</answer>",
    *,
    logprobs: list[float] | None = None,
    token_ids: list[int] | None = None,
    prompt_ids: list[int] | None = None,
    finish: str = "stop",
    stop_reason: Any = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
        "stop_reason": stop_reason,
    }
    if logprobs is not None:
        choice["logprobs"] = {
            "content": [{"token": str(i), "logprob": lp} for i, lp in enumerate(logprobs)]
        }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "genagent-7b",
        "choices": [choice],
        "usage": {
            "prompt_tokens": 40,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 32},
        },
    }
    if prompt_ids is not None:
        body["prompt_token_ids"] = prompt_ids
    return body


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


class Sleeps:
    """A recorded, instant sleep: retries are tested without waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def policy_for(server: ScriptedServer, **kwargs: Any) -> OpenAIPolicy:
    kwargs.setdefault("model", "genagent-7b")
    kwargs.setdefault("sleep", Sleeps())
    return OpenAIPolicy(f"{server.url}/v1", **kwargs)


def generate(policy: OpenAIPolicy, messages: list[Message] | None = None, **kw: Any) -> Any:
    return asyncio.run(
        policy.generate(messages or [Message.user("a cat")], stop=["</tool_call>"], **kw)
    )


def image_ref(width: int, height: int) -> Any:
    return MemoryImageStore().put(Image.new("RGB", (width, height), "red"))


# --------------------------------------------------------------------------- requests


def test_a_completion_becomes_a_policy_output_with_logprobs_and_token_ids(
    server: ScriptedServer,
) -> None:
    server.script(
        "POST", CHAT,
        Reply(completion("<tool_call>{}", logprobs=[-0.1, -0.2], token_ids=[5, 6],
                         prompt_ids=[1, 2, 3], stop_reason="</tool_call>")),
    )  # fmt: skip
    out = generate(policy_for(server, return_token_ids=True))
    assert out.text == "<tool_call>{}" and out.stop == "</tool_call>"
    assert out.logprobs == [-0.1, -0.2] and out.output_ids == [5, 6] and out.prompt_ids == [1, 2, 3]
    assert out.usage.prompt_tokens == 40 and out.usage.cached_tokens == 32
    assert out.model == "genagent-7b" and out.finish_reason == "stop"
    body = server.requests[0].body
    assert body["model"] == "genagent-7b" and body["stop"] == ["</tool_call>"]
    assert body["logprobs"] is True and body["return_token_ids"] is True
    assert body["max_tokens"] == SamplingParams().max_new_tokens


def test_without_logprobs_the_output_has_none(server: ScriptedServer) -> None:
    server.script("POST", CHAT, Reply(completion("hi")))
    out = generate(policy_for(server, logprobs=False))
    assert out.logprobs is None and out.output_ids is None
    assert "logprobs" not in server.requests[0].body


def test_sampling_settings_are_sent(server: ScriptedServer) -> None:
    server.script("POST", CHAT, Reply(completion()))
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=3, max_new_tokens=64)
    generate(policy_for(server), sampling=sampling)
    body = server.requests[0].body
    assert (body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (0.7, 0.9, 20, 3)
    assert body["max_tokens"] == 64


def test_the_model_is_discovered_once_from_v1_models(server: ScriptedServer) -> None:
    server.script("GET", "/v1/models", Reply({"object": "list", "data": [{"id": "served-model"}]}))
    server.always("POST", CHAT, lambda r: Reply(completion()))
    policy = OpenAIPolicy(server.url, sleep=Sleeps())  # a bare host gets /v1
    generate(policy)
    generate(policy)
    assert policy.model == "served-model"
    assert [r.path for r in server.requests] == ["/v1/models", CHAT, CHAT]
    assert server.requests[1].body["model"] == "served-model"


def test_images_go_as_data_uris_downscaled_to_the_maximum_side(server: ScriptedServer) -> None:
    server.script("POST", CHAT, Reply(completion()))
    message = Message.user("<tool_response>", image_ref(400, 200), "</tool_response>")
    generate(policy_for(server, max_image_side=100), [Message.user("x"), message])
    content = server.requests[0].body["messages"][1]["content"]
    assert [part["type"] for part in content] == ["text", "image_url", "text"]
    uri = content[1]["image_url"]["url"]
    assert uri.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.size == (100, 50)


def test_the_api_key_comes_from_the_environment_and_never_leaks(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    server.script("POST", CHAT, Reply({"error": {"message": "bad key"}}, 401))
    policy = policy_for(server, api_key_env="MY_KEY")
    with pytest.raises(PolicyError) as info:
        generate(policy)
    assert server.requests[0].headers["Authorization"] == "Bearer sk-secret-123"
    assert "MY_KEY" in str(info.value)
    for text in (str(info.value), repr(policy), json.dumps(policy.describe())):
        assert "sk-secret-123" not in text


# --------------------------------------------------------------------------- failures


def test_429_then_200_honours_retry_after(server: ScriptedServer) -> None:
    server.script(
        "POST", CHAT,
        Reply({"error": "slow down"}, 429, headers={"Retry-After": "2"}),
        Reply(completion("fine")),
    )  # fmt: skip
    sleeps = Sleeps()
    out = generate(policy_for(server, sleep=sleeps))
    assert out.text == "fine" and sleeps.calls == [2.0]


def test_500_then_200_backs_off_and_succeeds(server: ScriptedServer) -> None:
    server.script("POST", CHAT, Reply("upstream broke", 500), Reply(completion("fine")))
    sleeps = Sleeps()
    assert generate(policy_for(server, sleep=sleeps, backoff_s=1.0)).text == "fine"
    assert len(sleeps.calls) == 1 and 0.5 <= sleeps.calls[0] <= 1.0


def test_a_timeout_is_retried(server: ScriptedServer) -> None:
    server.script("POST", CHAT, Reply(completion("late"), delay_s=1.5), Reply(completion("fine")))
    assert generate(policy_for(server, timeout_s=0.3)).text == "fine"


def test_a_spent_retry_budget_is_a_typed_error_with_status_and_excerpt(
    server: ScriptedServer,
) -> None:
    server.script("POST", CHAT, *[Reply("the GPU fell over", 503) for _ in range(3)])
    with pytest.raises(PolicyError) as info:
        generate(policy_for(server, max_retries=2))
    message = str(info.value)
    assert "HTTP 503" in message and "the GPU fell over" in message
    assert "gave up after 3 attempts" in message
    assert len(server.requests) == 3


def test_repeated_timeouts_give_a_typed_error(server: ScriptedServer) -> None:
    server.script("POST", CHAT, *[Reply(completion(), delay_s=1.0) for _ in range(2)])
    with pytest.raises(PolicyError, match="timed out after 2 attempts"):
        generate(policy_for(server, timeout_s=0.2, max_retries=1))


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply("<html>proxy error</html>"), "is not JSON"),
        (Reply({"choices": []}), "malformed response.*no choices"),
        (Reply({"choices": [{"message": {"content": 42}}]}), "content is not text"),
        (Reply({"choices": [{"message": {"content": "x"}, "logprobs": {"content": [{}]}}]}),
         "logprob per token"),
    ],
)  # fmt: skip
def test_malformed_bodies_are_typed_errors(
    server: ScriptedServer, reply: Reply, message: str
) -> None:
    server.script("POST", CHAT, reply)
    with pytest.raises(PolicyError, match=message):
        generate(policy_for(server))


def test_too_many_images_says_how_to_raise_the_servers_limit(server: ScriptedServer) -> None:
    vllm_error = {
        "object": "error",
        "message": "At most 1 image(s) may be provided in one request.",
        "code": 400,
    }
    server.script("POST", CHAT, Reply(vllm_error, 400))
    with pytest.raises(PolicyError, match="--limit-mm-per-prompt"):
        generate(policy_for(server))
    assert len(server.requests) == 1  # not retried


def test_an_unreachable_server_is_a_typed_error() -> None:
    policy = OpenAIPolicy("http://127.0.0.1:9/v1", model="m", max_retries=1, sleep=Sleeps())
    with pytest.raises(PolicyError, match="cannot reach"):
        generate(policy)


# --------------------------------------------------------------------------- agent


def test_an_agent_runs_against_the_server(server: ScriptedServer) -> None:
    call = {"name": "image_generation_tool", "arguments": {"caption": "two red apples"}}

    def reply(request: Recorded) -> Reply:
        turns = sum(1 for m in request.body["messages"] if m["role"] == "assistant")
        text = (
            f"<think>Plan.</think><tool_call>{json.dumps(call)}"
            if turns == 0
            else ("<judge>Right.</judge><answer>Two red apples.</answer>")
        )
        return Reply(completion(text, logprobs=[-0.5]))

    server.always("POST", CHAT, reply)
    trajectory = Agent(tool=SceneTool(size=64), policy=policy_for(server)).run("two red apples")
    assert trajectory.termination is Termination.ANSWERED
    second = server.requests[1].body["messages"]
    assert second[2] == {
        "role": "assistant",
        "content": f"<think>Plan.</think><tool_call>{json.dumps(call)}</tool_call>",
    }  # the stop-cut reply, closed by the protocol
    assert second[3]["content"][1]["type"] == "image_url"
    assert trajectory.turns[0].logprobs == [-0.5]


# --------------------------------------------------------------------------- hostile servers


@pytest.mark.parametrize(
    "retry_after", ["Mon, 99 Foo 2026 25:61:00 GMT", "soon", "nan", "inf", "-5"]
)
def test_an_unparseable_retry_after_falls_back_to_backoff(
    server: ScriptedServer, retry_after: str
) -> None:
    server.script(
        "POST", CHAT,
        Reply({"error": "slow down"}, 429, headers={"Retry-After": retry_after}),
        Reply(completion("fine")),
    )  # fmt: skip
    sleeps = Sleeps()
    assert generate(policy_for(server, sleep=sleeps, backoff_s=1.0)).text == "fine"
    assert len(sleeps.calls) == 1 and 0.0 <= sleeps.calls[0] <= 1.0


def test_a_retry_after_date_is_a_wait_in_seconds(server: ScriptedServer) -> None:
    import email.utils
    import time

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.script(
        "POST", CHAT,
        Reply({"error": "slow down"}, 429, headers={"Retry-After": when}),
        Reply(completion("fine")),
    )  # fmt: skip
    sleeps = Sleeps()
    generate(policy_for(server, sleep=sleeps))
    assert 25 <= sleeps.calls[0] <= 31


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": "40", "completion_tokens": -3},
    {"prompt_tokens": 10**40, "completion_tokens": True,
     "prompt_tokens_details": {"cached_tokens": 1.5}},
    {"prompt_tokens": None, "completion_tokens": [], "prompt_tokens_details": "x"},
])  # fmt: skip
def test_hostile_usage_counts_read_as_zero_not_a_crash(
    server: ScriptedServer, usage: dict[str, Any]
) -> None:
    body = completion("fine")
    body["usage"] = usage
    server.script("POST", CHAT, Reply(body))
    out = generate(policy_for(server))
    assert out.text == "fine"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.cached_tokens) == (
        0, 0, 0,
    )  # fmt: skip


def test_credentials_in_the_url_are_basic_auth_and_never_shown(server: ScriptedServer) -> None:
    server.script("POST", CHAT, Reply("nope", 404))
    host = server.url.removeprefix("http://")
    policy = OpenAIPolicy(f"http://alice:s3cr%40t@{host}/v1", model="m", sleep=Sleeps())
    with pytest.raises(PolicyError) as info:
        generate(policy)
    sent = server.requests[0].headers["Authorization"]
    assert sent == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    for text in (str(info.value), repr(policy), json.dumps(policy.describe())):
        assert "s3cr" not in text and "alice" not in text


def test_the_query_string_of_the_base_url_is_sent_with_every_request(
    server: ScriptedServer,
) -> None:
    server.script("GET", "/v1/models", Reply({"data": [{"id": "m"}]}))
    server.script("POST", CHAT, Reply(completion()))
    policy = OpenAIPolicy(f"{server.url}/v1?api-version=2024-10-21", sleep=Sleeps())
    generate(policy)
    assert [(r.path, r.query) for r in server.requests] == [
        ("/v1/models", "api-version=2024-10-21"),
        (CHAT, "api-version=2024-10-21"),
    ]
    assert policy.base_url == f"{server.url}/v1"


@pytest.mark.parametrize("status", [502, 520, 529])
def test_every_transient_5xx_is_retried(server: ScriptedServer, status: int) -> None:
    server.script("POST", CHAT, Reply("overloaded", status), Reply(completion("fine")))
    assert generate(policy_for(server)).text == "fine"


@pytest.mark.parametrize("status", [501, 505, 404, 422])
def test_errors_that_retrying_cannot_fix_are_not_retried(
    server: ScriptedServer, status: int
) -> None:
    server.script("POST", CHAT, Reply("no", status))
    with pytest.raises(PolicyError, match=f"HTTP {status}"):
        generate(policy_for(server))
    assert len(server.requests) == 1


def test_a_bad_base_url_is_a_configuration_error_that_hides_credentials() -> None:
    from genagent import ConfigurationError

    with pytest.raises(ConfigurationError, match="http\\(s\\) URL") as info:
        OpenAIPolicy("ftp://bob:hunter2@example.test/v1")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError, match="not a valid URL"):
        OpenAIPolicy("http://127.0.0.1:99999999/v1")


def test_the_image_cache_stays_within_its_byte_budget(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import genagent.policies.openai as module

    server.always("POST", CHAT, lambda r: Reply(completion()))
    policy = policy_for(server, max_image_side=None)
    noise = Image.effect_noise((64, 64), 40).convert("RGB")
    refs = []
    for i in range(6):
        image = noise.copy()
        image.putpixel((0, 0), (i, i, i))
        refs.append(MemoryImageStore().put(image))
    size = len(policy._data_uri(refs[0]))  # each within a few bytes of the others
    monkeypatch.setattr(module, "_IMAGE_CACHE_BYTES", int(size * 3.5))
    policy = policy_for(server, max_image_side=None)
    for ref in refs:
        generate(policy, [Message.user("look", ref)])
    assert policy._images_bytes <= size * 3.5 and len(policy._images) == 3
    sent = server.requests[-1].body["messages"][0]["content"][1]["image_url"]["url"]
    assert sent == refs[-1].to_data_uri()
