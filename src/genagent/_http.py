"""The HTTP plumbing shared by the remote tools and policies (private).

``HTTPClient`` wraps an ``httpx.AsyncClient`` (one per event loop) with what every remote API
needs: connect and read timeouts; retries with exponential backoff and full jitter (tenacity) on
dropped connections, timeouts, 408/425/429 and 5xx, honouring ``Retry-After`` and the vendors'
rate-limit headers; a bounded number of requests in flight; a polling helper for asynchronous
APIs; safe image downloads; and an injectable transport. API keys are sent as headers, never put
in URLs, and are redacted from every error message and log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import random
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx
import tenacity

from genagent.errors import ConfigurationError, ToolExecutionError, ToolUnavailable

__all__ = [
    "HTTPClient",
    "HTTPResponseError",
    "excerpt",
    "retry_after",
    "split_base_url",
]

logger = logging.getLogger("genagent.http")

T = TypeVar("T")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
_SECRETS: weakref.WeakSet[HTTPClient] = weakref.WeakSet()


class _RedactingFilter(logging.Filter):
    """Takes every live client's secrets out of httpx's own log lines (it logs full URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        clients = list(_SECRETS)
        if clients:
            message = record.getMessage()
            redacted = message
            for client in clients:
                redacted = client.redact(redacted)
            if redacted != message:
                record.msg, record.args = redacted, ()
        return True


_log_filter_installed = False


def _install_log_filter() -> None:
    global _log_filter_installed
    if not _log_filter_installed:
        _log_filter_installed = True
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).addFilter(_RedactingFilter())


RETRY_STATUS = frozenset({408, 425, 429})
_SHARD = 8  # requests in flight per connection pool (see _Loop)
NOT_RETRIED_5XX = frozenset({501, 505})  # not implemented / HTTP version: retrying cannot help
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


class HTTPResponseError(ToolUnavailable):
    """A response with an error status that retrying did not (or could not) fix.

    Adapters catch it to turn vendor-specific failures into model-visible errors (a moderation
    refusal becomes ``ToolRefused``).

    Attributes:
        status: The HTTP status.
        text: The body (redacted), for matching.
        data: The body parsed as JSON, when it is.
    """

    def __init__(self, message: str, *, status: int, text: str, data: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.text = text
        self.data = data


class _Retryable(Exception):
    def __init__(
        self, message: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


@dataclass
class _Loop:
    """The clients of one event loop.

    Several small connection pools rather than one large one: httpcore 1.0's pool does work
    quadratic in its connections for every request (encode/httpcore#1035), which costs
    milliseconds per request at 32 in flight; shards of 8 connections keep it negligible.
    """

    clients: list[httpx.AsyncClient]
    busy: list[int]
    slots: asyncio.Semaphore

    @contextlib.contextmanager
    def client(self) -> Iterator[httpx.AsyncClient]:
        """The least busy client, held for one request."""
        index = min(range(len(self.clients)), key=self.busy.__getitem__)
        self.busy[index] += 1
        try:
            yield self.clients[index]
        finally:
            self.busy[index] -= 1


class HTTPClient:
    """One remote endpoint, with its credentials, retries, timeouts and requests in flight.

    Args:
        base_url: The endpoint (``https://api.example.com/v1``). A query string is sent with
            every request; ``user:password@`` becomes basic auth and is never shown.
        api_key: The API key (default: the first set variable of ``api_key_env``).
        api_key_env: Environment variables to read the key from, in order.
        auth_header: The header that carries the key.
        auth_scheme: Its prefix (``"Bearer"``, ``"Key"``; ``""`` for the bare key).
        headers: Extra headers for every request.
        timeout_s: Read timeout of one request.
        connect_timeout_s: Connect timeout.
        max_retries: Retries after the first attempt for retryable failures.
        backoff_s: Base of the exponential backoff (full jitter).
        max_backoff_s: Longest single wait, ``Retry-After`` included.
        max_in_flight: Most requests in flight at once (per event loop).
        download_timeout_s: Longest one image download may take in all (the read timeout
            applies per chunk, so a server dripping bytes would otherwise hold it for hours).
        transport: An ``httpx`` transport (tests, proxies).
        sleep: The sleep between retries and polls (injectable for tests).
        name: Names the endpoint in errors and logs.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: Sequence[str] = (),
        auth_header: str = "Authorization",
        auth_scheme: str = "Bearer",
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        max_in_flight: int = 16,
        download_timeout_s: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        name: str = "the server",
    ) -> None:
        import os

        self.base_url, self.params, self._basic = split_base_url(base_url)
        env_key = next((os.environ[v] for v in api_key_env if os.environ.get(v)), None)
        self._api_key = api_key if api_key is not None else env_key
        self.api_key_env = tuple(api_key_env)
        self.auth_header = auth_header
        self.auth_scheme = auth_scheme
        self.headers = dict(headers or {})
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ConfigurationError("timeouts must be positive numbers of seconds")
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {max_retries}")
        if max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_in_flight = max_in_flight
        self.transport = transport
        self.sleep = sleep
        self.name = name
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        if download_timeout_s <= 0:
            raise ConfigurationError("download_timeout_s must be a positive number of seconds")
        self.download_timeout_s = download_timeout_s
        parts = urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.netloc)
        _SECRETS.add(self)
        _install_log_filter()

    # ------------------------------------------------------------------ public

    @property
    def has_key(self) -> bool:
        """Whether an API key is configured."""
        return bool(self._api_key)

    def url(self, path: str) -> str:
        """An absolute URL for ``path`` (absolute URLs are returned as they are)."""
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def redact(self, text: str) -> str:
        """``text`` with the secrets replaced by ``***``.

        The secrets are the API key, the basic-auth password and the base URL's query values
        (which may be tokens).
        """
        secrets = [self._api_key, self._basic.password if self._basic else None]
        secrets += list(self.params.values())
        for secret in secrets:
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def is_own(self, url: str | httpx.URL) -> bool:
        """Whether ``url`` is on the API's own origin (scheme, host and port).

        Only such URLs get the credentials and the base URL's query.
        """
        parts = urlsplit(str(url))
        return (parts.scheme, parts.netloc) == self._origin

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Mapping[str, Any] | None = None,
        files: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        retry_statuses: frozenset[int] | None = None,
        ok_statuses: frozenset[int] = frozenset(),
        fatal_bodies: Sequence[str] = (),
        idempotent: bool = True,
        retry_failed: bool = True,
    ) -> httpx.Response:
        """Send a request with retries; return the response of a 2xx (or ``ok_statuses``).

        Args:
            method: The HTTP method.
            path: A path under the base URL, or an absolute URL.
            json: A JSON body.
            data: Form fields.
            files: Multipart files.
            params: Query parameters (added to the base URL's).
            headers: Extra headers.
            timeout_s: A read timeout for this request only.
            retry_statuses: The 4xx statuses to retry (default 408, 425, 429); 5xx are retried
                except 501 and 505.
            ok_statuses: Error statuses to return instead of raising.
            fatal_bodies: Texts that make a retryable status final when the body contains them
                (e.g. ``"insufficient_quota"`` in a 429: waiting cannot help).
            idempotent: ``False`` for a request that starts a job (a submit, a synchronous
                generation): it is not retried after a read timeout, a dropped connection or a
                504, after which the server may still be running it; retrying could run (and
                bill) it twice.
            retry_failed: With ``idempotent=False``, whether a 5xx (the server says the request
                failed) is retried; ``False`` retries only 429 and 503, for APIs where a failed
                submit may still have created the job.

        Raises:
            HTTPResponseError: For an error status after retries (status, body, parsed JSON).
            ToolUnavailable: If the endpoint cannot be reached or keeps timing out.
        """
        url = self.url(path)
        shown = self.redact(url.split("?", 1)[0])
        retryable = RETRY_STATUS if retry_statuses is None else retry_statuses
        attempts = self.max_retries + 1
        read_timeout = (
            httpx.Timeout(timeout_s, connect=self.timeout.connect)
            if timeout_s is not None
            else self.timeout
        )

        async def once() -> httpx.Response:
            state = self._state()
            try:
                async with state.slots:
                    with state.client() as http:
                        response = await self._send(
                            http,
                            method,
                            url,
                            params=params,
                            headers=headers,
                            timeout=read_timeout,
                            json=json,
                            data=data,
                            files=files,
                        )
            except httpx.TimeoutException as exc:
                message = f"{method} {shown} timed out ({type(exc).__name__})"
                if not idempotent and not isinstance(
                    exc, (httpx.ConnectTimeout, httpx.PoolTimeout)
                ):
                    raise ToolUnavailable(
                        f"{self.name}: {message}; not retried, since the server may have "
                        "started the job (raise timeout_s)"
                    ) from None
                raise _Retryable(message) from None
            except httpx.TransportError as exc:
                message = f"cannot reach {shown}: {type(exc).__name__}: {self.redact(str(exc))}"
                if not idempotent and not isinstance(exc, httpx.ConnectError):
                    raise ToolUnavailable(
                        f"{self.name}: {message}; not retried, since the server may have "
                        "started the job"
                    ) from None
                raise _Retryable(message) from None
            status = response.status_code
            if status < 400 or status in ok_statuses:
                return response
            fatal = any(text in response.text for text in fatal_bodies)
            retry = status in retryable or (500 <= status < 600 and status not in NOT_RETRIED_5XX)
            if not idempotent and (
                status == 504  # a gateway timeout: the job may be running behind it
                or (not retry_failed and 500 <= status < 600 and status != 503)
            ):
                retry = False
            if retry and not fatal:
                raise _Retryable(
                    f"HTTP {status} from {shown}: {excerpt(self.redact(response.text))}",
                    retry_after(response.headers, status),
                    status,
                )
            raise self._status_error(response, shown)

        try:
            async for attempt in tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(attempts),
                wait=self._wait,
                retry=tenacity.retry_if_exception_type(_Retryable),
                sleep=self.sleep,
                before_sleep=self._log_retry,
                reraise=True,
            ):
                with attempt:
                    return await once()
        except _Retryable as exc:
            advice = (
                "the rate limit did not clear: lower the concurrency (max_in_flight, run_batch "
                "concurrency) or raise max_retries"
                if exc.status == 429
                else "check that the server is up, or raise max_retries / timeout_s"
            )
            raise ToolUnavailable(
                f"{self.name}: {exc} (gave up after {attempts} attempts); {advice}"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(
        self,
        http: httpx.AsyncClient,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        timeout: httpx.Timeout,
        stream: bool = False,
        **body: Any,
    ) -> httpx.Response:
        """Send one request, following redirects by hand.

        Each hop gets the credentials, the base query and the caller's headers only if it is on
        the API's own origin: httpx would carry custom auth headers to any host a redirect names.
        """
        current = httpx.URL(url)
        first = current
        for hop in range(_MAX_REDIRECTS + 1):
            if current.scheme not in ("http", "https"):
                raise ToolExecutionError(
                    f"{self.name} redirected to a URL that is not http(s)",
                    hint="Try the call again.",
                )
            own = self.is_own(current)
            query = {**(self.params if own else {}), **((params or {}) if current == first else {})}
            target = current.copy_merge_params(query) if query else current
            same = current.scheme == first.scheme and current.netloc == first.netloc
            request = http.build_request(
                method,
                target,
                headers=self._headers(str(current), headers if same else None),
                timeout=timeout,
                **body,
            )
            response = await http.send(request, stream=stream)
            location = response.headers.get("location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            await response.aclose()
            if hop == _MAX_REDIRECTS:
                break
            current = current.join(location)
            if response.status_code == 303 or (
                response.status_code in (301, 302) and method == "POST"
            ):
                method, body = "GET", {}
        raise ToolExecutionError(
            f"{self.name}: more than {_MAX_REDIRECTS} redirects from "
            f"{self.redact(str(first.copy_with(query=None)))}",
            hint="Try the call again.",
        )

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """:meth:`request` and parse the body as JSON.

        Raises:
            ToolExecutionError: If the body is not JSON (a proxy's error page, a truncated body).
        """
        response = await self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ToolExecutionError(
                f"{self.name} answered {method} {self.redact(self.url(path).split('?')[0])} "
                f"with a body that is not JSON: {excerpt(self.redact(response.text))}",
                hint="Try the call again.",
            ) from None

    async def download(
        self,
        url: str,
        *,
        max_bytes: int,
        allowed_types: Sequence[str] = ("image/", "application/octet-stream"),
    ) -> bytes:
        """Fetch a URL the API returned, within ``max_bytes`` (streamed, checked as it arrives).

        Only ``http(s)`` URLs are fetched; the API key goes only to the API's own host, never to
        another host (a CDN, a signed storage URL). Retries as :meth:`request`.

        Raises:
            ToolExecutionError: For a URL that is not http(s), a body over ``max_bytes``, or a
                content type that is not an image.
            ToolUnavailable: If the URL cannot be fetched after retries.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ToolExecutionError(
                f"{self.name} returned an image URL that is not http(s): {self.redact(url)[:80]!r}",
                hint="Try the call again.",
            )
        shown = self.redact(f"{parts.scheme}://{parts.netloc}{parts.path}")
        attempts = self.max_retries + 1

        async def once() -> bytes:
            state = self._state()
            try:
                async with state.slots:
                    with state.client() as http:
                        return await asyncio.wait_for(
                            self._read_image(http, url, shown, max_bytes, allowed_types),
                            self.download_timeout_s,
                        )
            except asyncio.TimeoutError:
                raise ToolExecutionError(
                    f"fetching {shown} took over {self.download_timeout_s:.0f} s "
                    "(raise download_timeout_s if the images are that slow to arrive)",
                    hint="Try the call again.",
                ) from None
            except httpx.TimeoutException as exc:
                raise _Retryable(f"GET {shown} timed out ({type(exc).__name__})") from None
            except httpx.TransportError as exc:
                raise _Retryable(
                    f"cannot fetch {shown}: {type(exc).__name__}: {self.redact(str(exc))}"
                ) from None

        try:
            async for attempt in tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(attempts),
                wait=self._wait,
                retry=tenacity.retry_if_exception_type(_Retryable),
                sleep=self.sleep,
                before_sleep=self._log_retry,
                reraise=True,
            ):
                with attempt:
                    return await once()
        except _Retryable as exc:
            raise ToolUnavailable(
                f"{self.name}: {exc} (gave up after {attempts} attempts)"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_image(
        self,
        http: httpx.AsyncClient,
        url: str,
        shown: str,
        max_bytes: int,
        allowed_types: Sequence[str],
    ) -> bytes:
        response = await self._send(
            http, "GET", url, params=None, headers=None, timeout=self.timeout, stream=True
        )
        async with contextlib.aclosing(_Closing(response)):
            status = response.status_code
            if status >= 400:
                body = excerpt(self.redact((await response.aread()).decode(errors="replace")))
                if status in RETRY_STATUS or (status >= 500 and status not in NOT_RETRIED_5XX):
                    raise _Retryable(
                        f"HTTP {status} fetching {shown}: {body}",
                        retry_after(response.headers, status),
                        status,
                    )
                raise ToolExecutionError(
                    f"fetching the image {shown} failed with HTTP {status}: {body}",
                    hint="Try the call again.",
                )
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind and not any(kind.startswith(t) for t in allowed_types):
                raise ToolExecutionError(
                    f"{shown} is {kind!r}, not an image",
                    hint="Try the call again.",
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ToolExecutionError(
                    f"the image at {shown} is {int(declared):,} bytes, over the limit of "
                    f"{max_bytes:,} (raise max_image_bytes if this is intended)"
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ToolExecutionError(
                        f"the image at {shown} is over the limit of {max_bytes:,} bytes "
                        "(raise max_image_bytes if this is intended)"
                    )
                chunks.append(chunk)
            return b"".join(chunks)

    async def poll(
        self,
        fetch: Callable[[], Awaitable[T]],
        done: Callable[[T], bool],
        *,
        what: str,
        interval_s: float = 0.5,
        max_interval_s: float = 5.0,
        timeout_s: float = 600.0,
        on_wait: Callable[[int, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> T:
        """Call ``fetch`` until ``done(result)``; the wait grows 1.5x per poll up to a ceiling.

        Args:
            fetch: One status request.
            done: Whether a status is final (ready, failed, moderated, ...).
            what: Names the job in a timeout error.
            interval_s: The first wait.
            max_interval_s: The longest wait.
            timeout_s: Give up after this long.
            on_wait: Called before each wait with (poll number, seconds waited so far): the
                tools report progress and check the run's budget there.
            clock: The clock of ``timeout_s``.

        Raises:
            ToolUnavailable: If the job is not done within ``timeout_s``.
        """
        start = clock()
        wait = interval_s
        polls = 0
        while True:
            result = await fetch()
            polls += 1
            if done(result):
                return result
            waited = clock() - start
            if waited >= timeout_s:
                raise ToolUnavailable(
                    f"{self.name}: {what} was not done after {waited:.0f} s ({polls} polls); "
                    "raise poll_timeout_s or check the service's status"
                )
            if on_wait is not None:
                on_wait(polls, waited)
            await self.sleep(min(wait, max(0.0, timeout_s - waited)))
            wait = min(max_interval_s, wait * 1.5)

    def describe(self) -> dict[str, Any]:
        """The endpoint for trajectory metadata (no credentials)."""
        return {"base_url": self.base_url}

    async def aclose(self) -> None:
        """Close the client of the running event loop."""
        loop = asyncio.get_running_loop()
        state = self._loops.pop(loop, None)
        if state is not None:
            for client in state.clients:
                await client.aclose()

    def __getstate__(self) -> dict[str, Any]:
        # clients and locks belong to this process; they are made again on first use
        return {k: v for k, v in self.__dict__.items() if k not in ("_loops", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loops = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ internals

    def _state(self) -> _Loop:
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._loops.get(loop)
            if state is None:
                # a loop that ended without aclose() (asyncio.run per call) keeps its entry
                # alive: the semaphore refers to the loop. Drop those; their sockets close
                # with the clients.
                for old in [other for other in self._loops if other.is_closed()]:
                    for client in self._loops.pop(old).clients:
                        close_orphaned(client)
                shards = -(-self.max_in_flight // _SHARD)
                clients = [
                    httpx.AsyncClient(
                        timeout=self.timeout,
                        transport=self.transport,
                        follow_redirects=False,  # _send follows them, hop by hop
                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=_SHARD),
                    )
                    for _ in range(shards)
                ]
                state = _Loop(clients, [0] * shards, asyncio.Semaphore(self.max_in_flight))
                self._loops[loop] = state
        return state

    def _headers(self, url: str, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.is_own(url):  # credentials go to the API's own origin only
            for key, value in self.headers.items():
                headers.setdefault(key, value)
            if self._api_key:
                value = f"{self.auth_scheme} {self._api_key}" if self.auth_scheme else self._api_key
                headers.setdefault(self.auth_header, value)
            elif self._basic is not None:
                headers.setdefault("Authorization", self._basic.header)
        return headers

    def _status_error(self, response: httpx.Response, shown: str) -> HTTPResponseError:
        status = response.status_code
        text = self.redact(response.text)
        try:
            data = self._redact_data(response.json())
        except ValueError:
            data = None
        message = f"HTTP {status} from {shown}: {excerpt(text)}"
        if status in (401, 403):
            where = (
                f"set {' or '.join(self.api_key_env)} or pass api_key=..."
                if self.api_key_env
                else "pass api_key=... (or user:password@ in the URL)"
            )
            message += f". The server rejected the credentials: {where}"
        return HTTPResponseError(f"{self.name}: {message}", status=status, text=text, data=data)

    def _redact_data(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self._redact_data(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redact_data(v) for v in value]
        return value

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        hinted = getattr(exc, "retry_after", None)
        if hinted is not None:
            return float(min(max(0.0, hinted), self.max_backoff_s))
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (state.attempt_number - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning(
            "%s: %s; retrying in %.2f s (attempt %d/%d)",
            self.name,
            exc,
            wait,
            state.attempt_number,
            self.max_retries + 1,
        )


def close_orphaned(client: httpx.AsyncClient) -> None:
    """Close the sockets of a client whose event loop has ended (no await is possible).

    ``asyncio.run`` per call leaves such clients behind when nobody called ``aclose``; their
    sockets would otherwise stay open until the garbage collector finds them.
    """
    pool = getattr(client._transport, "_pool", None)  # httpx.AsyncHTTPTransport's httpcore pool
    for connection in list(getattr(pool, "_connections", [])):
        stream = getattr(getattr(connection, "_connection", None), "_network_stream", None)
        info = getattr(stream, "get_extra_info", None)
        sock = info("socket") if info is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


class _Closing:
    """``aclose`` for a streamed response, for ``contextlib.aclosing``."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    async def aclose(self) -> None:
        await self.response.aclose()


@dataclass(frozen=True)
class _BasicAuth:
    username: str
    password: str

    @property
    def header(self) -> str:
        import base64

        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


def split_base_url(url: str) -> tuple[str, dict[str, str], _BasicAuth | None]:
    """``(base URL without credentials, query or trailing slash; query; basic auth)``.

    Raises:
        ConfigurationError: If ``url`` is not an http(s) URL (credentials are not shown).
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ConfigurationError("not a valid URL; pass e.g. 'http://localhost:8000'") from None
    if parts.scheme not in ("http", "https") or not host:
        shown = f"{parts.scheme}://{host or ''}{parts.path}" if parts.scheme else "(not a URL)"
        raise ConfigurationError(
            f"the URL must be an http(s) URL such as 'http://localhost:8000', got {shown!r}"
        )
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    basic = None
    if parts.username is not None or parts.password is not None:
        basic = _BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}", params, basic


def retry_after(headers: httpx.Headers, status: int = 429) -> float | None:
    """Seconds to wait before retrying, or ``None`` when no header gives a usable value.

    Read from ``Retry-After`` (seconds or an HTTP date), ``retry-after-ms``, or (on 429) the
    vendors' rate-limit reset headers (``x-ratelimit-reset-requests``, ``x-ratelimit-reset``).
    """
    candidates: list[float] = []
    value = headers.get("retry-after")
    if value is not None:
        try:
            try:
                candidates.append(float(value))
            except ValueError:
                candidates.append(
                    email.utils.parsedate_to_datetime(value).timestamp() - time.time()
                )
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            candidates.append(float(ms) / 1000)
    if not candidates and status == 429:
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            duration = _duration(headers.get(name))
            if duration is not None:
                candidates.append(duration)
        reset = headers.get("x-ratelimit-reset")
        if reset is not None:
            try:
                number = float(reset)
                candidates.append(number - time.time() if number > 1e9 else number)
            except ValueError:
                pass
    finite = [c for c in candidates if math.isfinite(c)]
    return max(0.0, max(finite)) if finite else None


def _duration(text: str | None) -> float | None:
    """``"1m30s"``, ``"250ms"``, ``"6m0s"`` (OpenAI's rate-limit reset format) in seconds."""
    if not text:
        return None
    total, matched = 0.0, 0
    for number, unit in _DURATION.findall(text):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        matched += len(number) + len(unit)
    return total if matched == len(text.strip()) else None


def excerpt(text: str, limit: int = 200) -> str:
    """The first ``limit`` characters of ``text``, whitespace collapsed."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
