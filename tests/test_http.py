"""The shared HTTP client of the remote tools, against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import io
import pickle
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from genagent import ConfigurationError, ToolExecutionError, ToolUnavailable
from genagent._http import HTTPClient, HTTPResponseError, retry_after, split_base_url

from ._servers import Reply, ScriptedServer


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


def png(size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buffer, "PNG")
    return buffer.getvalue()


def client(server: ScriptedServer, **kwargs: Any) -> HTTPClient:
    kwargs.setdefault("sleep", Sleeps())
    return HTTPClient(server.url, name="the test API", **kwargs)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize(
    ("headers", "status", "expected"),
    [
        ({"Retry-After": "3"}, 429, 3.0),
        ({"retry-after-ms": "250"}, 429, 0.25),
        ({"x-ratelimit-reset-requests": "1m30s"}, 429, 90.0),
        ({"x-ratelimit-reset-tokens": "250ms"}, 429, 0.25),
        ({"x-ratelimit-reset": "7"}, 429, 7.0),
        ({"x-ratelimit-reset-requests": "1m30s"}, 503, None),  # only for 429
        ({"Retry-After": "soon"}, 429, None),
        ({"Retry-After": "nan"}, 429, None),
        ({"Retry-After": "-4"}, 429, 0.0),
        ({}, 429, None),
    ],
)
def test_retry_after_reads_the_usual_headers(
    headers: dict[str, str], status: int, expected: float | None
) -> None:
    assert retry_after(httpx.Headers(headers), status) == expected


def test_retry_after_reads_an_http_date_and_an_epoch_reset() -> None:
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 15 < retry_after(httpx.Headers({"Retry-After": date})) <= 20  # type: ignore[operator]
    epoch = str(int(time.time()) + 30)
    assert 25 < retry_after(httpx.Headers({"x-ratelimit-reset": epoch})) <= 30  # type: ignore[operator]


def test_a_rate_limit_then_success_waits_as_told(server: ScriptedServer) -> None:
    server.script(
        "GET", "/v1/x",
        Reply({"error": "slow down"}, 429, headers={"x-ratelimit-reset-requests": "2s"}),
        Reply({"ok": True}),
    )  # fmt: skip
    sleeps = Sleeps()
    assert run(client(server, sleep=sleeps).json("GET", "/v1/x")) == {"ok": True}
    assert sleeps.calls == [2.0]


def test_a_4xx_is_not_retried_and_carries_status_and_body(server: ScriptedServer) -> None:
    server.script("POST", "/v1/x", Reply({"error": {"code": "bad_size"}}, 400))
    with pytest.raises(HTTPResponseError) as info:
        run(client(server).json("POST", "/v1/x", json={}))
    assert info.value.status == 400 and info.value.data == {"error": {"code": "bad_size"}}
    assert len(server.requests) == 1


def test_credentials_go_only_to_the_api_host(server: ScriptedServer) -> None:
    with ScriptedServer() as cdn:
        cdn.script("GET", "/img.png", Reply(png(), headers={"Content-Type": "image/png"}))
        server.script("GET", "/img.png", Reply(png(), headers={"Content-Type": "image/png"}))
        http = client(server, api_key="k-SECRET-1", auth_header="x-key", auth_scheme="")
        run(http.download(f"{cdn.url}/img.png", max_bytes=10_000))
        run(http.download(f"{server.url}/img.png", max_bytes=10_000))
    assert "x-key" not in {k.lower() for k in cdn.requests[0].headers}
    assert server.requests[0].headers["x-key"] == "k-SECRET-1"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply("<html>login</html>", headers={"Content-Type": "text/html"}), "not an image"),
        (Reply(b"x" * 5000, headers={"Content-Type": "image/png"}), "over the limit"),
        (Reply(png(), headers={"Content-Type": "image/png", "Content-Length": "99999999"}),
         "99,999,999 bytes"),
    ],
)  # fmt: skip
def test_downloads_are_checked_for_type_and_size(
    server: ScriptedServer, reply: Reply, message: str
) -> None:
    server.script("GET", "/out.png", reply)
    with pytest.raises(ToolExecutionError, match=message):
        run(client(server).download(f"{server.url}/out.png", max_bytes=1000))


def test_a_url_that_is_not_http_is_never_fetched() -> None:
    http = HTTPClient("http://127.0.0.1:9", sleep=Sleeps())
    for url in ("file:///etc/passwd", "ftp://example.test/a.png", "javascript:alert(1)"):
        with pytest.raises(ToolExecutionError, match="not http"):
            run(http.download(url, max_bytes=100))


def test_a_hung_server_is_a_typed_error_after_the_retries(server: ScriptedServer) -> None:
    server.script("GET", "/slow", *[Reply({"ok": 1}, delay_s=1.0) for _ in range(2)])
    with pytest.raises(ToolUnavailable, match=r"timed out.*gave up after 2 attempts"):
        run(client(server, timeout_s=0.2, max_retries=1).json("GET", "/slow"))


def test_a_body_that_is_not_json_is_a_model_visible_error(server: ScriptedServer) -> None:
    server.script("GET", "/x", Reply("<html>502 Bad Gateway</html>"))
    with pytest.raises(ToolExecutionError, match="not JSON"):
        run(client(server).json("GET", "/x"))


def test_the_key_is_redacted_from_errors_even_when_the_server_echoes_it(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.script("GET", "/x", *[Reply("bad key sk-ECHO-SECRET-9", 503) for _ in range(2)])
    caplog.set_level("DEBUG")
    with pytest.raises(ToolUnavailable) as info:
        run(client(server, api_key="sk-ECHO-SECRET-9", max_retries=1).json("GET", "/x"))
    assert "sk-ECHO-SECRET-9" not in str(info.value) and "***" in str(info.value)
    assert all("sk-ECHO-SECRET-9" not in r.getMessage() for r in caplog.records)


def test_polling_stops_at_the_timeout_with_a_typed_error() -> None:
    http = HTTPClient("http://127.0.0.1:9", sleep=Sleeps(), name="the job API")
    now = [0.0]

    async def fetch() -> str:
        now[0] += 10
        return "pending"

    with pytest.raises(ToolUnavailable, match="not done after 60 s"):
        run(
            http.poll(
                fetch, lambda s: s == "ready", what="the job", timeout_s=55, clock=lambda: now[0]
            )
        )


def test_urls_with_credentials_or_bad_schemes() -> None:
    base, params, basic = split_base_url("https://bob:p%40ss@host.test:8443/api/?v=2")
    assert base == "https://host.test:8443/api" and params == {"v": "2"}
    assert basic is not None and (basic.username, basic.password) == ("bob", "p@ss")
    with pytest.raises(ConfigurationError) as info:
        split_base_url("ftp://bob:hunter2@host.test/")
    assert "hunter2" not in str(info.value)


def test_a_client_pickles_without_its_connections(server: ScriptedServer) -> None:
    server.always("GET", "/x", lambda r: Reply({"n": 1}))
    http = client(server)
    assert run(http.json("GET", "/x")) == {"n": 1}
    copy = pickle.loads(pickle.dumps(http))
    assert run(copy.json("GET", "/x")) == {"n": 1}


def test_a_submit_is_not_retried_when_the_server_may_have_acted(server: ScriptedServer) -> None:
    server.script("POST", "/jobs", Reply({"id": 1}, delay_s=1.0), Reply({"id": 2}))
    with pytest.raises(ToolUnavailable, match="not retried"):
        run(client(server, timeout_s=0.2).json("POST", "/jobs", json={}, idempotent=False))
    server.script("POST", "/jobs2", Reply("bad gateway", 502), Reply({"id": 3}))
    with pytest.raises(HTTPResponseError, match="502"):
        run(client(server).json("POST", "/jobs2", json={}, idempotent=False, retry_failed=False))
    server.script("POST", "/jobs5", Reply("failed", 500), Reply({"id": 5}))
    assert run(client(server).json("POST", "/jobs5", json={}, idempotent=False)) == {"id": 5}
    server.script("POST", "/jobs6", Reply("gateway timeout", 504), Reply({"id": 6}))
    with pytest.raises(HTTPResponseError, match="504"):
        run(client(server).json("POST", "/jobs6", json={}, idempotent=False))
    server.script(
        "POST", "/jobs3", Reply("busy", 429, headers={"Retry-After": "1"}), Reply({"id": 4})
    )
    assert run(client(server).json("POST", "/jobs3", json={}, idempotent=False)) == {"id": 4}


def test_a_quota_429_is_final(server: ScriptedServer) -> None:
    server.script("POST", "/x", Reply({"error": {"code": "insufficient_quota"}}, 429))
    with pytest.raises(HTTPResponseError, match="429"):
        run(client(server).json("POST", "/x", json={}, fatal_bodies=("insufficient_quota",)))
    assert len(server.requests) == 1


def test_downloads_from_the_api_host_carry_its_query_string(server: ScriptedServer) -> None:
    server.script("GET", "/view", Reply(png(), headers={"Content-Type": "image/png"}))
    http = HTTPClient(f"{server.url}?token=abc", sleep=Sleeps())
    run(http.download(f"{server.url}/view?filename=a.png", max_bytes=10_000))
    assert server.requests[0].query == "filename=a.png&token=abc"


def test_a_redirect_to_another_host_does_not_carry_credentials(server: ScriptedServer) -> None:
    with ScriptedServer() as cdn:
        cdn.script("GET", "/img.png", Reply(png(), headers={"Content-Type": "image/png"}))
        server.script("GET", "/r.png", Reply("", 302, headers={"Location": f"{cdn.url}/img.png"}))
        http = client(
            server,
            api_key="k-SECRET-2",
            auth_header="x-key",
            auth_scheme="",
            headers={"X-Org": "org-SECRET-3"},
        )
        image = run(http.download(f"{server.url}/r.png", max_bytes=10_000))
    assert image == png()
    sent = {k.lower(): v for k, v in cdn.requests[0].headers.items()}
    assert "x-key" not in sent and "x-org" not in sent
    assert server.requests[0].headers["x-key"] == "k-SECRET-2"


def test_plain_http_to_the_api_host_gets_no_credentials(server: ScriptedServer) -> None:
    # the API is https; a returned http:// URL on the same host must not receive the key
    host = server.url.removeprefix("http://")
    server.script("GET", "/img.png", Reply(png(), headers={"Content-Type": "image/png"}))
    http = HTTPClient(
        f"https://{host}?token=q-SECRET-4",
        api_key="k-SECRET-5",
        sleep=Sleeps(),
    )
    run(http.download(f"http://{host}/img.png", max_bytes=10_000))
    request = server.requests[0]
    assert "authorization" not in {k.lower() for k in request.headers}
    assert "q-SECRET-4" not in request.query


def test_a_key_echoed_where_the_excerpt_is_cut_is_still_redacted(server: ScriptedServer) -> None:
    key = "sk-CUT-" + "S" * 40
    for pad in range(180, 205, 3):  # the key straddles the excerpt's cut at some of these
        server.script("GET", f"/x{pad}", Reply("e" * pad + key + " tail", 400))
        with pytest.raises(HTTPResponseError) as info:
            run(client(server, api_key=key).json("GET", f"/x{pad}"))
        text = str(info.value)
        assert "SSSSSSSS" not in text, text  # not even a prefix of the key's secret part


def test_a_base_query_token_never_reaches_the_httpx_log(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.script("GET", "/x", Reply({"ok": 1}))
    caplog.set_level("DEBUG")
    http = HTTPClient(f"{server.url}?token=q-SECRET-6", sleep=Sleeps())
    assert run(http.json("GET", "/x")) == {"ok": 1}
    assert server.requests[0].query == "token=q-SECRET-6"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
    assert any("/x" in line for line in lines)  # httpx did log the request
    assert all("q-SECRET-6" not in line for line in lines)


def test_a_download_that_drips_is_stopped_by_the_overall_deadline(server: ScriptedServer) -> None:
    noise = io.BytesIO()
    Image.frombytes("RGB", (32, 32), random.Random(0).randbytes(3072)).save(noise, "PNG")
    assert len(noise.getvalue()) > 64 * 20  # over a second of dripping
    server.script(
        "GET",
        "/drip.png",
        Reply(noise.getvalue(), headers={"Content-Type": "image/png"}, drip_s=0.05),
    )
    http = client(server, download_timeout_s=0.3, timeout_s=5)
    started = time.perf_counter()
    with pytest.raises(ToolExecutionError, match="took over"):
        run(http.download(f"{server.url}/drip.png", max_bytes=100_000))
    assert time.perf_counter() - started < 3


def test_repeated_event_loops_do_not_pile_up_connections(server: ScriptedServer) -> None:
    server.always("GET", "/x", lambda r: Reply({"ok": 1}))
    http = client(server)
    for _ in range(20):  # asyncio.run per call, as Tool.__call__ and Agent.run do
        assert run(http.json("GET", "/x")) == {"ok": 1}
    assert len(http._loops) <= 1  # entries of ended loops are dropped on the next call
    assert run(_closed_after(http)) == 0


async def _closed_after(http: HTTPClient) -> int:
    await http.json("GET", "/x")
    await http.aclose()
    return len(http._loops)
