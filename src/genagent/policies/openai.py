"""``OpenAIPolicy``: any OpenAI-compatible chat-completions server as the policy.

vLLM, SGLang, OpenAI and others speak ``POST /v1/chat/completions``. Images go as ``data:``
URIs (downscaled to a maximum side), and the reply comes back with log-probabilities, and with
token ids where the server offers them (vLLM: ``return_token_ids``). Transient failures (429 with
``Retry-After``, 5xx, timeouts, dropped connections) are retried with exponential backoff and
jitter; everything else becomes a :class:`~genagent.errors.PolicyError` with the status and a
short excerpt of the body. API keys never appear in errors, logs or metadata.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import httpx

from genagent._http import close_orphaned, excerpt, retry_after, split_base_url
from genagent.errors import ConfigurationError, PolicyError
from genagent.images import ImageRef, encode_png, to_data_uri
from genagent.messages import Message, TextPart
from genagent.policies._base import PolicyOutput, SamplingParams
from genagent.trajectory import Usage

__all__ = ["OpenAIPolicy"]

logger = logging.getLogger("genagent.policies.openai")

_RETRY_STATUS = frozenset({408, 409, 425, 429})
_NOT_RETRIED_5XX = frozenset({501, 505})  # not implemented / HTTP version: retrying cannot help
_IMAGE_CACHE_BYTES = 256 * 1024 * 1024
_TOO_MANY_IMAGES = re.compile(r"at most \d+ image|limit_mm_per_prompt|too many images", re.I)


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIPolicy:
    """A policy served by an OpenAI-compatible server.

    Args:
        base_url: The server, e.g. ``"http://localhost:8000/v1"`` (``/v1`` is added to a bare
            host) or ``"https://api.openai.com/v1"``. A query string (e.g. Azure's
            ``?api-version=...``) is sent with every request; credentials in the URL
            (``https://user:pass@host/v1``) are sent as HTTP basic auth and never shown.
        model: The model name; discovered from ``GET /v1/models`` when omitted (the first one).
        api_key: The API key; default: the ``api_key_env`` environment variable, else none.
        api_key_env: Where to read the key from.
        max_image_side: Images larger than this (in pixels, either side) are downscaled before
            sending; ``None`` sends them as they are.
        timeout_s: Read timeout of one request.
        connect_timeout_s: Connect timeout.
        max_retries: Retries after the first attempt for retryable failures.
        backoff_s: Base of the exponential backoff (doubled each retry, with full jitter).
        max_backoff_s: Longest single wait, ``Retry-After`` included.
        logprobs: Ask for per-token log-probabilities.
        return_token_ids: Ask for prompt and output token ids (a vLLM extension).
        max_concurrency: Most requests in flight at once from this policy.
        extra_body: Extra fields merged into every request (e.g. ``{"top_k": 20}``).
        headers: Extra HTTP headers.
        transport: An ``httpx`` transport (tests, proxies).
        name: Recorded as the policy's name (default: the model name).
        sleep: The sleep used between retries (injectable for tests).
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000/v1",
        model: str | None = None,
        *,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_image_side: int | None = 1536,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        logprobs: bool = True,
        return_token_ids: bool = False,
        max_concurrency: int = 64,
        extra_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        name: str | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.base_url, self._params, self._auth = _split_base_url(base_url)
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.api_key_env = api_key_env
        if max_image_side is not None and max_image_side < 16:
            raise ConfigurationError(f"max_image_side must be >= 16, got {max_image_side}")
        self.max_image_side = max_image_side
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ConfigurationError("timeouts must be positive")
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        if max_retries < 0 or max_concurrency < 1:
            raise ConfigurationError("max_retries must be >= 0 and max_concurrency >= 1")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.logprobs = logprobs
        self.return_token_ids = return_token_ids
        self.max_concurrency = max_concurrency
        self.extra_body = dict(extra_body or {})
        self.headers = dict(headers or {})
        self.transport = transport
        self._name = name
        self._sleep = sleep
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, asyncio.Semaphore]
        ] = weakref.WeakKeyDictionary()
        self._clients_lock = threading.Lock()
        self._images: OrderedDict[tuple[str, int | None], str] = OrderedDict()
        self._images_bytes = 0

    @property
    def name(self) -> str:
        """The policy's name: as given, else the model name."""
        return self._name or self.model or "openai"

    # ------------------------------------------------------------------ Policy

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] = (),
        sampling: SamplingParams | None = None,
    ) -> PolicyOutput:
        """Ask the server for the next reply."""
        sampling = sampling or SamplingParams()
        model = self.model or await self._discover_model()
        body: dict[str, Any] = {
            "model": model,
            "messages": [self._message(m) for m in messages],
            "max_tokens": sampling.max_new_tokens,
        }
        if stop:
            body["stop"] = list(stop)
        for key, value in (
            ("temperature", sampling.temperature),
            ("top_p", sampling.top_p),
            ("top_k", sampling.top_k),
            ("seed", sampling.seed),
            ("repetition_penalty", sampling.repetition_penalty),
        ):
            if value is not None:
                body[key] = value
        if self.logprobs:
            body["logprobs"] = True
        if self.return_token_ids:
            body["return_token_ids"] = True
        body.update(self.extra_body)
        body.update(sampling.extra)
        start = time.perf_counter()
        data = await self._post_json("/chat/completions", body)
        output = _parse_completion(data, stop, f"{self.base_url}/chat/completions")
        output.latency_s = time.perf_counter() - start
        return output

    def describe(self) -> dict[str, Any]:
        """Metadata for trajectories (never the API key)."""
        return {
            "name": self.name,
            "class": "genagent.policies.OpenAIPolicy",
            "base_url": self.base_url,
            "model": self.model,
            "max_image_side": self.max_image_side,
        }

    async def aclose(self) -> None:
        """Close the HTTP client of the running event loop."""
        loop = asyncio.get_running_loop()
        entry = self._clients.pop(loop, None)
        if entry is not None:
            await entry[0].aclose()

    def __repr__(self) -> str:
        return f"OpenAIPolicy(base_url={self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ requests

    async def _discover_model(self) -> str:
        data = await self._request_json("GET", "/models", None)
        try:
            models = [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError):
            raise PolicyError(
                f"{self.base_url}/models returned no model list; pass model=... explicitly"
            ) from None
        if not models:
            raise PolicyError(f"{self.base_url}/models lists no models; pass model=...")
        if len(models) > 1:
            logger.info("the server serves %d models; using %r", len(models), models[0])
        self.model = models[0]
        return self.model

    async def _post_json(self, path: str, body: dict[str, Any]) -> Any:
        return await self._request_json("POST", path, body)

    async def _request_json(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        url = f"{self.base_url}{path}"
        client, semaphore = self._client()
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                async with semaphore:
                    response = await client.request(
                        method, url, json=body, params=self._params or None
                    )
                return self._decode(response, url)
            except _Retryable as exc:
                if attempt == attempts:
                    raise PolicyError(f"{exc} (gave up after {attempts} attempts)") from None
                wait = self._backoff(attempt, exc.retry_after)
                logger.warning(
                    "%s; retrying in %.2f s (attempt %d/%d)", exc, wait, attempt, attempts
                )
                await self._sleep(wait)
            except httpx.TimeoutException:
                if attempt == attempts:
                    raise PolicyError(
                        f"{method} {url} timed out after {attempts} attempts (read timeout "
                        f"{self.timeout.read} s); raise timeout_s or check the server"
                    ) from None
                await self._sleep(self._backoff(attempt, None))
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise PolicyError(
                        f"cannot reach {url} after {attempts} attempts: {type(exc).__name__}: {exc}"
                    ) from None
                await self._sleep(self._backoff(attempt, None))
        raise AssertionError("unreachable")  # pragma: no cover

    def _decode(self, response: httpx.Response, url: str) -> Any:
        status = response.status_code
        body = excerpt(response.text)
        if status in _RETRY_STATUS or (500 <= status < 600 and status not in _NOT_RETRIED_5XX):
            raise _Retryable(
                f"HTTP {status} from {url}: {body}", retry_after(response.headers, status)
            )
        if status >= 400:
            if status == 400 and _TOO_MANY_IMAGES.search(response.text):
                raise PolicyError(
                    f"HTTP 400 from {url}: the server refuses this many images in one prompt "
                    f"({body}). Raise its per-prompt image limit, e.g. start vLLM with "
                    "--limit-mm-per-prompt '{\"image\": 16}' (older vLLM: "
                    "--limit-mm-per-prompt image=16), or lower Agent(max_rounds=...)."
                )
            if status in (401, 403):
                raise PolicyError(
                    f"HTTP {status} from {url}: the server rejected the credentials; set "
                    f"{self.api_key_env} or pass api_key=... ({body})"
                )
            raise PolicyError(f"HTTP {status} from {url}: {body}")
        try:
            return response.json()
        except ValueError:
            raise PolicyError(
                f"HTTP {status} from {url} is not JSON; the body starts: {body}"
            ) from None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_backoff_s)
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            entry = self._clients.get(loop)
            if entry is None:
                # loops that ended without aclose(): their entries keep them alive (the
                # semaphore refers to its loop), so drop them and close their sockets
                for old in [other for other in self._clients if other.is_closed()]:
                    close_orphaned(self._clients.pop(old)[0])
                headers = {"Content-Type": "application/json", **self.headers}
                if self._api_key:
                    headers["Authorization"] = f"Bearer {self._api_key}"
                client = httpx.AsyncClient(
                    timeout=self.timeout,
                    headers=headers,
                    transport=self.transport,
                    auth=self._auth,
                )
                entry = (client, asyncio.Semaphore(self.max_concurrency))
                self._clients[loop] = entry
        return entry

    # ------------------------------------------------------------------ messages

    def _message(self, message: Message) -> dict[str, Any]:
        if message.role != "user" or not message.images:
            return {"role": message.role, "content": message.text}
        content: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            else:
                content.append(
                    {"type": "image_url", "image_url": {"url": self._data_uri(part.image)}}
                )
        return {"role": "user", "content": content}

    def _data_uri(self, ref: ImageRef) -> str:
        key = (ref.sha256, self.max_image_side)
        cached = self._images.get(key)
        if cached is not None:
            self._images.move_to_end(key)
            return cached
        side = self.max_image_side
        if side is None or max(ref.width, ref.height) <= side:
            uri = ref.to_data_uri()
        else:
            from PIL import Image

            image = ref.open()
            scale = side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            uri = to_data_uri(encode_png(image), "image/png")
        if len(uri) <= _IMAGE_CACHE_BYTES // 2:  # an image over half the budget is sent uncached
            self._images[key] = uri
            self._images_bytes += len(uri)
            while self._images_bytes > _IMAGE_CACHE_BYTES:
                _, dropped = self._images.popitem(last=False)
                self._images_bytes -= len(dropped)
        return uri


# --------------------------------------------------------------------------- parsing


def _parse_completion(data: Any, stop: Sequence[str], url: str) -> PolicyOutput:
    """A chat-completions response as a :class:`PolicyOutput` (typed errors for bad shapes)."""

    def bad(reason: str) -> PolicyError:
        return PolicyError(
            f"malformed response from {url}: {reason}; body: {excerpt(json.dumps(data))}"
        )

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise bad("no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise bad("the choice has no message")
    text = message.get("content")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise bad("the message content is not text")
    stop_reason = choice.get("stop_reason")
    matched = stop_reason if isinstance(stop_reason, str) and stop_reason in stop else None
    logprobs = None
    content = (
        (choice.get("logprobs") or {}).get("content")
        if isinstance(choice.get("logprobs"), dict)
        else None
    )
    if isinstance(content, list):
        try:
            logprobs = [float(item["logprob"]) for item in content]
        except (KeyError, TypeError, ValueError):
            raise bad("logprobs without a logprob per token") from None
    output_ids = _ints(choice.get("token_ids") or choice.get("output_token_ids"))
    prompt_ids = _ints(data.get("prompt_token_ids") or choice.get("prompt_token_ids"))
    usage_data: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
    details = usage_data.get("prompt_tokens_details")
    usage = Usage(
        prompt_tokens=_count(usage_data.get("prompt_tokens")),
        completion_tokens=_count(usage_data.get("completion_tokens")),
        cached_tokens=_count(details.get("cached_tokens")) if isinstance(details, dict) else 0,
    )
    return PolicyOutput(
        text=text,
        stop=matched,
        finish_reason=choice.get("finish_reason")
        if isinstance(choice.get("finish_reason"), str)
        else None,
        prompt_ids=prompt_ids,
        output_ids=output_ids,
        logprobs=logprobs,
        usage=usage,
        model=data.get("model") if isinstance(data.get("model"), str) else None,
    )


def _ints(value: Any) -> list[int] | None:
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    return None


def _count(value: Any) -> int:
    """A token count from a server's ``usage``: a non-negative int, else 0 (never raises)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value < 2**63:
        return value
    return 0


def _split_base_url(url: str) -> tuple[str, dict[str, str], httpx.BasicAuth | None]:
    """The shared URL split, with credentials as ``httpx`` basic auth."""
    base, params, basic = split_base_url(url)
    if base.count("/") == 2:  # a bare host: the OpenAI routes live under /v1
        base += "/v1"
    auth = httpx.BasicAuth(basic.username, basic.password) if basic is not None else None
    return base, params, auth
