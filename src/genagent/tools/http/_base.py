"""``RemoteTool``: what every remote generator adapter shares.

An adapter subclasses ``RemoteTool`` together with ``GenerationTool`` or ``EditTool`` and
implements ``acall`` with the helpers here: ``self.http`` (an ``HTTPClient``: retries,
timeouts, rate limits, requests in flight, polling), ``image_from_base64`` and
``image_from_url`` (checked images: size caps, a decompression-bomb guard, typed errors), and
``waiting(ctx)`` (progress and budget checks while an asynchronous job runs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import httpx

from genagent._http import HTTPClient, HTTPResponseError
from genagent.errors import InvalidImageError, ToolExecutionError
from genagent.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_base64_image,
    inspect_image,
)
from genagent.tools._base import Tool, ToolContext

__all__ = ["HTTPResponseError", "RemoteTool"]


class RemoteTool(Tool, abstract=True):
    """Base of the remote adapters: subclass it with ``GenerationTool`` or ``EditTool``.

    ``class MyAPITool(RemoteTool, GenerationTool)`` gets the shared plumbing; a shared base of a
    generation and an editing adapter passes ``abstract=True``.

    Args:
        base_url: The API's base URL (each adapter has a default where the API has one).
        api_key: The API key; default: the adapter's usual environment variables. Never
            logged, shown in errors or recorded.
        timeout_s: Read timeout of one HTTP request.
        connect_timeout_s: Connect timeout.
        max_retries: Retries of a request after a dropped connection, a timeout, 408, 425, 429
            (honouring ``Retry-After`` and rate-limit headers) or a 5xx.
        backoff_s: Base of the exponential backoff between retries (full jitter).
        max_backoff_s: Longest single wait between retries.
        max_in_flight: Most requests in flight to this endpoint at once.
        poll_interval_s: First wait between status polls of an asynchronous job (it grows to
            ``max_poll_interval_s``).
        max_poll_interval_s: Longest wait between polls.
        poll_timeout_s: Give up on a job after this long.
        max_image_bytes: Largest image accepted (encoded bytes).
        max_image_pixels: Largest image accepted (pixels; guards against decompression bombs).
        headers: Extra HTTP headers.
        transport: An ``httpx`` transport (tests, proxies).
        sleep: The sleep between retries and polls (injectable for tests).
        clock: The clock of ``poll_timeout_s`` (injectable for tests).
    """

    default_base_url: ClassVar[str | None] = None
    api_key_env: ClassVar[tuple[str, ...]] = ()
    auth_header: ClassVar[str] = "Authorization"
    auth_scheme: ClassVar[str] = "Bearer"
    service: ClassVar[str] = "the service"

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        max_in_flight: int = 16,
        poll_interval_s: float = 0.5,
        max_poll_interval_s: float = 5.0,
        poll_timeout_s: float = 600.0,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from genagent.errors import ConfigurationError

        url = base_url or self.default_base_url
        if not url:
            raise ConfigurationError(
                f"{type(self).__name__} needs base_url=..., the address of the server"
            )
        self.http = HTTPClient(
            url,
            api_key=api_key,
            api_key_env=self.api_key_env,
            auth_header=self.auth_header,
            auth_scheme=self.auth_scheme,
            headers=headers,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            max_in_flight=max_in_flight,
            transport=transport,
            sleep=sleep,
            name=self.service,
        )
        self.poll_interval_s = poll_interval_s
        self.max_poll_interval_s = max_poll_interval_s
        self.poll_timeout_s = poll_timeout_s
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.clock = clock

    # ------------------------------------------------------------------ images

    def image_from_base64(self, text: Any, *, what: str = "image") -> bytes:
        """A checked image from base64 text or a ``data:`` URI.

        Raises:
            ToolExecutionError: For text that is not base64, truncated data, or not an image
                within the limits.
        """
        if not isinstance(text, str) or not text.strip():
            raise ToolExecutionError(
                f"{self.service} returned no {what} data", hint="Try the call again."
            )
        if len(text) > self.max_image_bytes * 4 // 3 + 16:
            raise ToolExecutionError(
                f"{self.service} returned {what} data over the limit of "
                f"{self.max_image_bytes:,} bytes (raise max_image_bytes if this is intended)"
            )
        try:
            data = decode_base64_image(text)
        except InvalidImageError as exc:
            raise ToolExecutionError(
                f"{self.service} returned {what} data that cannot be decoded: {exc}",
                hint="Try the call again.",
            ) from None
        return self.checked(data, what=what)

    async def image_from_url(self, url: Any, *, what: str = "image") -> bytes:
        """A checked image downloaded from a URL the API returned (``data:`` URIs decoded).

        Raises:
            ToolExecutionError: For a URL that is not http(s), a body that is not an image, or
                an image over the limits.
            ToolUnavailable: If the URL cannot be fetched after retries.
        """
        if not isinstance(url, str) or not url:
            raise ToolExecutionError(
                f"{self.service} returned no {what} URL", hint="Try the call again."
            )
        if url.startswith("data:"):
            return self.image_from_base64(url, what=what)
        data = await self.http.download(url, max_bytes=self.max_image_bytes)
        return await asyncio.to_thread(self.checked, data, what=what)

    def checked(self, data: bytes, *, what: str = "image") -> bytes:
        """``data`` if it is a complete image within the limits (decoded to be sure).

        Raises:
            ToolExecutionError: Otherwise, saying why.
        """
        try:
            inspect_image(
                data, max_image_pixels=self.max_image_pixels, max_image_bytes=self.max_image_bytes
            )
        except InvalidImageError as exc:
            raise ToolExecutionError(
                f"{self.service} returned {what} data that is not usable: {exc}",
                hint="Try the call again.",
            ) from None
        return data

    # ------------------------------------------------------------------ jobs

    def waiting(self, ctx: ToolContext | None, what: str) -> Callable[[int, float], None]:
        """The ``on_wait`` of :meth:`HTTPClient.poll`.

        It reports progress to the run's hooks and stops the job when the budget is spent.
        """

        def on_wait(polls: int, waited_s: float) -> None:
            if ctx is None:
                return
            ctx.check_budget()
            ctx.report_progress(polls, None, tool=self.name, phase=what, waited_s=waited_s)

        return on_wait

    async def poll(
        self,
        fetch: Callable[[], Awaitable[Any]],
        done: Callable[[Any], bool],
        *,
        ctx: ToolContext | None,
        what: str,
    ) -> Any:
        """Poll an asynchronous job with this tool's intervals and timeout."""
        return await self.http.poll(
            fetch,
            done,
            what=what,
            interval_s=self.poll_interval_s,
            max_interval_s=self.max_poll_interval_s,
            timeout_s=self.poll_timeout_s,
            on_wait=self.waiting(ctx, what),
            clock=self.clock,
        )

    # ------------------------------------------------------------------ records

    def describe(self) -> dict[str, Any]:
        """Settings for trajectory metadata (never the API key)."""
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "service": self.service,
            **self.http.describe(),
        }

    async def aclose(self) -> None:
        """Close this tool's HTTP connections of the running event loop."""
        await self.http.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.http.base_url!r})"
