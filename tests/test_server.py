"""``genagent serve`` end to end against ``GenAgentServerTool``, on 127.0.0.1.

Each test starts the real server (starlette + uvicorn) in a thread on a free port and talks to
it over HTTP: with the adapter, or with raw requests for the protocol's failure modes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from genagent import (
    Agent,
    EditTool,
    GenerationTool,
    ScriptedPolicy,
    Termination,
    ToolContext,
    ToolRefused,
    ToolResult,
    ToolUnavailable,
)
from genagent.errors import ProtocolError
from genagent.server import make_server
from genagent.sim import SceneTool
from genagent.tasks import Task
from genagent.tools import GenAgentServerEditTool, GenAgentServerTool

ANSWER = "<judge>It matches.</judge><answer>Done.</answer>"


def call(caption: str, name: str = "image_generation_tool") -> str:
    key = "instruction" if name == "image_editing_tool" else "caption"
    body = json.dumps({"name": name, "arguments": {key: caption}})
    return f"<think>Go.</think><tool_call>{body}</tool_call>"


class Painter(GenerationTool):
    """Paints a flat colour per seed after a delay; records the settings it was asked for."""

    max_images_per_call = 4

    def __init__(self, delay_s: float = 0.0, setup_s: float = 0.0, fail_setup: bool = False):
        self.delay_s = delay_s
        self.setup_s = setup_s
        self.fail_setup = fail_setup
        self.settings_seen: list[dict[str, Any]] = []

    def setup(self) -> None:
        time.sleep(self.setup_s)
        if self.fail_setup:
            raise RuntimeError("CUDA driver too old")

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        await asyncio.sleep(self.delay_s)
        self.settings_seen.append(dict(ctx.settings))
        if "forbidden" in args.caption:
            raise ToolRefused("the safety filter blocked the caption", hint="Rephrase it.")
        if "explode" in args.caption:
            raise ValueError("boom")
        size = (ctx.settings.get("width", 16), ctx.settings.get("height", 16))
        images = [Image.new("RGB", size, (seed % 256, 0, 0)) for seed in ctx.seeds]
        return ToolResult(images=images, seeds=list(ctx.seeds))


class Inverter(EditTool):
    """Inverts the current image."""

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        from PIL import ImageOps

        assert ctx.current_image is not None
        return ToolResult(images=[ImageOps.invert(ctx.current_image.open().convert("RGB"))])


class Sleeps:
    def __init__(self, real_s: float = 0.0) -> None:
        self.calls: list[float] = []
        self.real_s = real_s

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(self.real_s)


@contextmanager
def running(tool: Any, *, ready: bool = True, **options: Any) -> Iterator[tuple[Any, str]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = make_server(tool, log_level="warning", **options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{url}/health", timeout=1).json()["status"]
            if status != "loading" or not ready:
                break
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.02)
    try:
        yield server, url
    finally:
        server.should_exit = True
        thread.join(30)


def png(color: str = "red", size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- end to end


def test_an_agent_uses_a_served_simulator_through_the_adapter() -> None:
    with running(SceneTool(size=96)) as (_server, url):
        tool = GenAgentServerTool(url, sleep=Sleeps())
        policy = ScriptedPolicy([call("three red apples left of a blue cup"), ANSWER])
        trajectory = Agent(tool=tool, policy=policy).run("three red apples", seed=5)
        health = asyncio.run(tool.health())
    assert trajectory.termination is Termination.ANSWERED
    image = trajectory.final_image
    assert image is not None and image.size == (96, 96)
    # the simulator's record survived the trip: the image is the scene it drew
    assert "genagent.scene" in image.info or any("scene" in k for k in image.info)
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and outcome.metadata["served_by"] == "image_generation_tool"
    assert health["status"] == "ok" and health["served"] == 1


def test_agent_runs_close_their_connections_when_their_event_loop_ends() -> None:
    with running(SceneTool(size=32)) as (_server, url):
        tool = GenAgentServerTool(url, sleep=Sleeps())
        agent = Agent(tool=tool, policy=ScriptedPolicy([call("a red cube"), ANSWER] * 4))
        for seed in range(3):
            assert agent.run("a red cube", seed=seed).termination is Termination.ANSWERED
            assert len(tool.http._loops) == 0  # nothing left open on the finished loop
        agent.run_batch(["a red cube"], concurrency=1)
        assert len(tool.http._loops) == 0


def test_candidates_settings_and_seeds_travel_in_one_request() -> None:
    painter = Painter()
    with running(painter) as (_server, url):
        tool = GenAgentServerTool(url, width=24, height=20, steps=3, guidance=2.0, sleep=Sleeps())
        policy = ScriptedPolicy([call("a red square"), ANSWER])
        trajectory = Agent(tool=tool, policy=policy, candidates=3).run("a red square", seed=1)
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and len(outcome.images) == 3
    assert painter.settings_seen == [{"width": 24, "height": 20, "steps": 3, "guidance": 2.0}]
    for index, seed in zip(outcome.images, outcome.seeds, strict=True):
        image = trajectory.images[index].open()
        assert image.size == (24, 20) and image.getpixel((0, 0)) == (seed % 256, 0, 0)


def test_an_edit_tool_is_served_and_used_by_the_edit_adapter() -> None:
    with running(Inverter()) as (_server, url):
        editor = GenAgentServerEditTool(url, sleep=Sleeps())
        policy = ScriptedPolicy(
            [call("a red square"), call("invert it", "image_editing_tool"), ANSWER]
        )
        with running(Painter()) as (_, gen_url):
            generator = GenAgentServerTool(gen_url, sleep=Sleeps())
            trajectory = Agent(tools=[generator, editor], policy=policy).run("x", seed=3)
    first, second = (ref.open().getpixel((0, 0)) for ref in trajectory.images)
    assert second == tuple(255 - c for c in first)  # type: ignore[union-attr]


def test_a_refusal_on_the_server_is_a_refusal_the_model_sees() -> None:
    with running(Painter()) as (_server, url):
        tool = GenAgentServerTool(url, sleep=Sleeps())
        policy = ScriptedPolicy([call("a forbidden thing"), call("a cat"), ANSWER])
        trajectory = Agent(tool=tool, policy=policy).run("a cat", seed=0)
    error = trajectory.turns[0].tool_result.error  # type: ignore[union-attr]
    assert error is not None and error.type == "ToolRefused"
    assert "safety filter" in error.message and "Rephrase" in (error.message + (error.hint or ""))
    assert trajectory.termination is Termination.ANSWERED and trajectory.num_rounds == 1


def test_a_tool_that_fails_on_the_server_ends_the_run_with_the_reason() -> None:
    with running(Painter()) as (_server, url):
        tool = GenAgentServerTool(url, sleep=Sleeps(), max_retries=1)
        policy = ScriptedPolicy([call("explode now"), ANSWER])
        with pytest.raises(ToolUnavailable, match=r"HTTP 500.*ValueError: boom"):
            Agent(tool=tool, policy=policy).run("x")


def test_an_api_key_is_required_when_the_server_has_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with running(Painter(), api_key="srv-SECRET-42") as (_server, url):
        anonymous = GenAgentServerTool(url, sleep=Sleeps())
        with pytest.raises(ToolUnavailable, match="401") as info:
            Agent(tool=anonymous, policy=ScriptedPolicy([call("a cat"), ANSWER])).run("x")
        assert "GENAGENT_SERVER_API_KEY" in str(info.value)
        monkeypatch.setenv("GENAGENT_SERVER_API_KEY", "srv-SECRET-42")
        keyed = GenAgentServerTool(url, sleep=Sleeps())
        trajectory = Agent(tool=keyed, policy=ScriptedPolicy([call("a cat"), ANSWER])).run("x")
        assert trajectory.termination is Termination.ANSWERED
        assert "srv-SECRET-42" not in json.dumps(trajectory.metadata)
        assert "srv-SECRET-42" not in repr(keyed)


# --------------------------------------------------------------------------- protocol


def test_bad_requests_get_clear_4xx_errors() -> None:
    with running(Painter(), max_images=4, max_body_bytes=10_000) as (_server, url):
        post = lambda body, **kw: httpx.post(f"{url}/generate/", timeout=10, **kw)  # noqa: E731
        cases = [
            (post(None, content=b"{not json"), 400, "InvalidJSON"),
            (post(None, json={"prompt": []}), 422, "at least one prompt"),
            (post(None, json={"prompt": "a", "sed": 1}), 422, "sed"),
            (post(None, json={"prompt": "a", "width": 5}), 422, "width"),
            (post(None, json={"prompt": ["a", "b"], "num_images_per_prompt": 3}), 422, "allows 4"),
            (post(None, json={"prompt": "a", "seed": [1, 2]}), 422, "2 values for 1 images"),
            (post(None, json={"prompt": "a", "image": "AAAA"}), 422, "takes no `image`"),
            (post(None, content=b"x" * 20_000), 413, "PayloadTooLarge"),
            # a chunked body has no content-length; the cap is counted as it arrives
            (post(None, content=iter([b"x" * 4000] * 5)), 413, "PayloadTooLarge"),
            (post(None, content=b"[" * 5000 + b"]" * 5000), 400, "nested too deeply"),
            (post(None, json={"prompt": "a", "seed": True}), 422, "seed"),
            (post(None, json={"prompt": "a", "seed": -1}), 422, "seed"),
            (post(None, json={"prompt": "a", "seed": 2**32}), 422, "seed"),
            (post(None, json={"prompt": "a", "seed": [False]}), 422, "seed"),
            (post(None, json={"prompt": "a", "seed": "7"}), 422, "seed"),
        ]
    for response, status, text in cases:
        assert response.status_code == status, response.text
        assert text in response.text
        assert set(response.json()["error"]) == {"type", "message"}


class Partial(GenerationTool):
    """Makes one image per call whatever was asked, with unknown seeds and a note."""

    max_images_per_call = 4

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult(
            images=[Image.new("RGB", (16, 16), "blue")],
            seeds=[None],
            text="the second image hit the safety filter",
        )


def test_fewer_images_than_asked_come_back_with_the_servers_note() -> None:
    with running(Partial()) as (_server, url):
        raw = httpx.post(f"{url}/generate/", json={"prompt": "a", "num_images_per_prompt": 2})
        tool = GenAgentServerTool(url, sleep=Sleeps())
        policy = ScriptedPolicy([call("a blue square"), ANSWER])
        trajectory = Agent(tool=tool, policy=policy, candidates=2).run("a blue square")
    assert raw.status_code == 200, raw.text
    data = raw.json()
    assert len(data["images"]) == 1 and data["seeds"] == [None]
    assert "safety filter" in data["text"] and "1 of the 2 images" in data["text"]
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and len(outcome.images) == 1
    assert outcome.text is not None and "safety filter" in outcome.text


class Refuses(GenerationTool):
    """Raises a subclass of a model-visible error, as a custom tool might."""

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        if "nsfw" in args.caption:
            raise NSFWRefusal("the caption asks for explicit content")
        raise ProtocolError("a custom tool misused a model-visible error")


class NSFWRefusal(ToolRefused):
    pass


def test_model_visible_errors_travel_as_the_nearest_kind_the_client_knows() -> None:
    with running(Refuses()) as (_server, url):
        refused = httpx.post(f"{url}/generate/", json={"prompt": "nsfw"}).json()
        other = httpx.post(f"{url}/generate/", json={"prompt": "x"}).json()
        tool = GenAgentServerTool(url, sleep=Sleeps())
        with pytest.raises(ToolRefused, match="explicit content"):
            asyncio.run(_call(tool))
    assert refused["error"]["type"] == "ToolRefused"
    assert other["error"]["type"] == "ToolExecutionError"


async def _call(tool: GenAgentServerTool) -> ToolResult:
    ctx = ToolContext(run_id="t", task=Task(prompt="nsfw"), round=1, num_images=1, seeds=[1])
    return await tool.invoke(tool.parse_args({"caption": "nsfw"}), ctx)


class Slow(GenerationTool):
    """One image per call after a delay; counts calls cancelled half-way; chunk seed 0 fails."""

    max_images_per_call = 1

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.cancelled = 0
        self.finished = 0

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        if ctx.seeds[0] == 0:
            raise ValueError("this chunk fails at once")
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return ToolResult(images=[Image.new("RGB", (16, 16), "green")])


def test_a_client_that_disconnects_has_its_work_cancelled() -> None:
    slow = Slow(delay_s=3.0)
    with running(slow) as (_server, url):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/generate/", json={"prompt": "a", "seed": 5}, timeout=0.3)
        _wait_for(lambda: slow.cancelled == 1, timeout_s=2)
        health = httpx.get(f"{url}/health").json()
    assert health["in_flight"] == 0 and health["abandoned"] == 1 and slow.finished == 0


def test_one_failing_chunk_cancels_its_siblings() -> None:
    slow = Slow(delay_s=3.0)
    with running(slow) as (_server, url):
        started = time.perf_counter()
        reply = httpx.post(
            f"{url}/generate/",
            json={"prompt": "a", "seed": [0, 1, 2], "num_images_per_prompt": 3},
            timeout=10,
        )
        elapsed = time.perf_counter() - started
    assert reply.status_code == 500 and "fails at once" in reply.text
    assert elapsed < 2.5 and slow.cancelled == 2 and slow.finished == 0


def test_an_edit_server_needs_a_readable_image() -> None:
    with running(Inverter()) as (_server, url):
        missing = httpx.post(f"{url}/generate/", json={"prompt": "invert"})
        broken = httpx.post(f"{url}/generate/", json={"prompt": "invert", "image": "!!!"})
        good = httpx.post(
            f"{url}/generate/",
            json={"prompt": "invert", "image": base64.b64encode(png("red")).decode()},
        )
    assert missing.status_code == 422 and "send `image`" in missing.text
    assert broken.status_code == 422 and "image" in broken.text
    data = good.json()
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert image.getpixel((0, 0)) == (0, 255, 255)


def test_a_full_queue_answers_429_with_retry_after() -> None:
    with running(Painter(delay_s=0.6), max_concurrency=1, max_queue=1) as (_server, url):
        results: list[httpx.Response] = []

        def send(i: int) -> None:
            results.append(httpx.post(f"{url}/generate/", json={"prompt": f"p{i}"}, timeout=10))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        for thread in threads:
            thread.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 429]
    busy = next(r for r in results if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1"


def test_a_loading_tool_answers_503_and_the_adapter_waits_for_it() -> None:
    with running(Painter(setup_s=0.8), ready=False) as (_server, url):
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        tool = GenAgentServerTool(url, sleep=Sleeps(real_s=0.2), max_retries=10)
        trajectory = Agent(tool=tool, policy=ScriptedPolicy([call("a cat"), ANSWER])).run("x")
    assert trajectory.termination is Termination.ANSWERED


def test_a_tool_that_cannot_load_is_reported_by_health_and_requests() -> None:
    with running(Painter(fail_setup=True)) as (_server, url):
        health = httpx.get(f"{url}/health").json()
        response = httpx.post(f"{url}/generate/", json={"prompt": "a cat"})
    assert health["status"] == "failed" and "CUDA driver too old" in health["error"]
    assert response.status_code == 503 and "CUDA driver too old" in response.text


# --------------------------------------------------------------------------- shutdown


def test_shutdown_lets_requests_in_flight_finish_and_refuses_new_ones() -> None:
    with running(Painter(delay_s=0.5), grace_s=10) as (server, url):
        results: dict[str, httpx.Response] = {}

        def send(name: str) -> None:
            results[name] = httpx.post(f"{url}/generate/", json={"prompt": name}, timeout=20)

        first = threading.Thread(target=send, args=("in-flight",))
        first.start()
        _wait_for(lambda: server.tool_server.in_flight == 1)
        server.handle_exit(signal.SIGTERM, None)
        _wait_for(lambda: server.tool_server.status == "draining")
        first.join()
    assert results["in-flight"].status_code == 200
    assert len(results["in-flight"].json()["images"]) == 1


def test_shutdown_fails_what_outlives_the_grace_period_explicitly() -> None:
    with running(Painter(delay_s=30), grace_s=0.3, max_concurrency=1) as (server, url):
        results: dict[str, httpx.Response] = {}

        def send(name: str) -> None:
            results[name] = httpx.post(f"{url}/generate/", json={"prompt": name}, timeout=20)

        threads = [threading.Thread(target=send, args=(n,)) for n in ("running", "queued")]
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        _wait_for(lambda: server.tool_server.queued == 1)
        start = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        for thread in threads:
            thread.join()
        took = time.monotonic() - start
    assert took < 10  # not the 30 s the tool wanted
    for name in ("running", "queued"):
        response = results[name]
        assert response.status_code == 503, (name, response.text)
        assert response.json()["error"]["type"] == "ShuttingDown"
    assert "before the request finished" in results["running"].text


def _wait_for(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --------------------------------------------------------------------------- the command


def test_genagent_serve_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "genagent", "serve", "--tool", "scene-generate", "--port",
         str(port), "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, process.stderr
            time.sleep(0.1)
        tool = GenAgentServerTool(url, sleep=Sleeps())
        trajectory = Agent(tool=tool, policy="heuristic").run("two blue cats", seed=2)
        assert trajectory.num_rounds >= 1
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal for the process manager
    assert process.returncode in (0, -signal.SIGTERM), err
    assert "serving image_generation_tool" in err
    assert "Finished server process" in err


def test_serve_refuses_a_registry_name_that_makes_several_tools() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "genagent", "serve", "--tool", "scene"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "serve one per process" in result.stderr


def test_the_server_key_never_shows_in_logs_errors_or_saved_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    secret = "srv-SECRET-LEAK-7"
    caplog.set_level("DEBUG")
    with running(Painter(), api_key=secret) as (_server, url):
        monkeypatch.setenv("GENAGENT_SERVER_API_KEY", secret)
        tool = GenAgentServerTool(url, sleep=Sleeps(), max_retries=1)
        policy = ScriptedPolicy([call("a cat"), call("explode now"), ANSWER])
        with pytest.raises(ToolUnavailable) as info:
            Agent(tool=tool, policy=policy).run("a cat", seed=1)
    trajectory = info.value.trajectory
    assert trajectory is not None and trajectory.num_rounds == 1
    folder = trajectory.save(tmp_path / "run")
    texts = [str(info.value), repr(tool), json.dumps(tool.describe())]
    texts += [r.getMessage() for r in caplog.records]
    texts += [p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file()]
    assert all(secret not in text for text in texts)
