"""``FalTool`` and ``FalEditTool``: image models on fal.ai's queue API (queue.fal.run).

The queue is asynchronous: ``POST {base}/{model_id}`` with ``Authorization: Key <FAL_KEY>``
answers ``{"request_id", "status_url", "response_url", "cancel_url"}``; ``GET status_url``
answers ``IN_QUEUE`` (with ``queue_position``), ``IN_PROGRESS`` and finally ``COMPLETED``;
``GET response_url`` then answers the model's output (``{"images": [{"url", ...}], "seed",
"has_nsfw_concepts"}``). A call that is abandoned before the job completes (a spent budget, a
cancelled run, a poll timeout) sends ``PUT cancel_url``, so that fal does not run (and bill)
work nobody waits for.

Where the key goes: to the ``base_url`` host only. Queue URLs the API returns on another host
are replaced by the documented paths on ``base_url``; image URLs (fal's CDN) are fetched
without the key.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

from genagent._async import gather_or_cancel
from genagent.errors import (
    ConfigurationError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tools._base import EditTool, GenerationTool, ToolContext, ToolResult
from genagent.tools.http._base import HTTPResponseError, RemoteTool

__all__ = ["FalEditTool", "FalTool"]

logger = logging.getLogger("genagent.tools.fal")

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_MODEL_RE = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT})+$")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_PENDING = frozenset({"in queue", "in progress", "queued", "pending", "running", "processing"})
_CANCELLED = frozenset({"canceled", "cancelled", "cancellation requested"})
_FAILED = frozenset({"failed", "error"})
_PRESETS = frozenset(
    {"square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"}
)
# error types of fal's structured errors that a new call may avoid (shown to the model)
_RETRYABLE_TYPES = frozenset(
    {
        "no_media_generated",
        "generation_timeout",
        "image_load_error",
        "file_download_error",
        "downstream_service_error",
        "downstream_service_unavailable",
        "internal_server_error",
    }
)
_IMAGE_TYPES = frozenset({"image_too_large", "image_too_small", "file_too_large"})


def _norm(status: Any) -> str:
    return " ".join(str(status).replace("_", " ").split()).lower()


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
    return value


def _details(data: Any) -> list[dict[str, Any]]:
    """The error objects of fal (``{"detail": [{"loc", "msg", "type"}]}``, or a string detail)."""
    if not isinstance(data, Mapping):
        return []
    detail = data.get("detail")
    items = detail if isinstance(detail, list) else [detail] if detail is not None else []
    found: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, Mapping):
            kind = item.get("type") or item.get("error") or data.get("error_type")
            found.append({"type": str(kind or ""), "msg": str(item.get("msg") or item)})
        elif isinstance(item, str):
            found.append({"type": str(data.get("error_type") or ""), "msg": item})
    return found


class _Fal(RemoteTool, abstract=True):
    service: ClassVar[str] = "fal.ai"
    default_base_url: ClassVar[str | None] = "https://queue.fal.run"
    api_key_env: ClassVar[tuple[str, ...]] = ("FAL_KEY",)
    auth_header: ClassVar[str] = "Authorization"
    auth_scheme: ClassVar[str] = "Key"
    max_images_per_call: ClassVar[int] = 4
    default_model: ClassVar[str] = "fal-ai/flux/dev"

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        width: int | None = None,
        height: int | None = None,
        image_size: str | None = None,
        aspect_ratio: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        enable_safety_checker: bool | None = None,
        safety_tolerance: int | None = None,
        output_format: str | None = "png",
        extra_body: Mapping[str, Any] | None = None,
        cancel_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        **http: Any,
    ) -> None:
        super().__init__(base_url, api_key=api_key, **http)
        self.model = model or self.default_model
        if not _MODEL_RE.match(self.model):
            raise ConfigurationError(
                f"model must be a fal model id such as 'fal-ai/flux/dev', got {self.model!r}"
            )
        if image_size is not None and image_size not in _PRESETS:
            raise ConfigurationError(
                f"image_size must be one of {sorted(_PRESETS)} (or pass width= and height=), "
                f"got {image_size!r}"
            )
        if image_size is not None and (width is not None or height is not None):
            raise ConfigurationError("pass either image_size or width and height, not both")
        if safety_tolerance is not None and not (
            isinstance(safety_tolerance, int) and 1 <= safety_tolerance <= 6
        ):
            raise ConfigurationError(
                f"safety_tolerance must be an int from 1 (strictest) to 6, got {safety_tolerance!r}"
            )
        if output_format not in (None, "png", "jpeg", "webp"):
            raise ConfigurationError(
                f"output_format must be 'png', 'jpeg', 'webp' or None, got {output_format!r}"
            )
        if cancel_timeout_s <= 0:
            raise ConfigurationError(f"cancel_timeout_s must be positive, got {cancel_timeout_s}")
        self.settings: dict[str, Any] = {
            k: v
            for k, v in {
                "width": _positive_int("width", width),
                "height": _positive_int("height", height),
                "image_size": image_size,
                "aspect_ratio": aspect_ratio,
                "steps": _positive_int("steps", steps),
                "guidance": guidance,
                "negative_prompt": negative_prompt,
            }.items()
            if v is not None
        }
        self.enable_safety_checker = enable_safety_checker
        self.safety_tolerance = safety_tolerance
        self.output_format = output_format
        self.extra_body = dict(extra_body or {})
        self.cancel_timeout_s = cancel_timeout_s
        self.clock = clock

    # ------------------------------------------------------------------ request

    def _body(
        self, prompt: str, ctx: ToolContext, image_url: str | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The request body and the settings it carries (for the record)."""
        settings = {**self.settings, **{k: v for k, v in ctx.settings.items() if v is not None}}
        body: dict[str, Any] = {
            "prompt": prompt,
            "seed": ctx.seeds[0],
            "num_images": ctx.num_images,
        }
        used: dict[str, Any] = {}
        width, height = settings.get("width"), settings.get("height")
        if isinstance(width, int) and isinstance(height, int):
            body["image_size"] = used["image_size"] = {"width": width, "height": height}
        elif settings.get("image_size") is not None:
            body["image_size"] = used["image_size"] = settings["image_size"]
        for ours, theirs in (
            ("aspect_ratio", "aspect_ratio"),
            ("steps", "num_inference_steps"),
            ("guidance", "guidance_scale"),
        ):
            if settings.get(ours) is not None:
                body[theirs] = used[ours] = settings[ours]
        if settings.get("negative_prompt"):
            body["negative_prompt"] = settings["negative_prompt"]
        if self.enable_safety_checker is not None:
            body["enable_safety_checker"] = self.enable_safety_checker
        if self.safety_tolerance is not None:
            body["safety_tolerance"] = str(self.safety_tolerance)  # fal's enum is "1".."6"
        if self.output_format is not None:
            body["output_format"] = self.output_format
        if image_url is not None:
            body["image_url"] = image_url
        body.update(self.extra_body)
        return body, used

    async def _generate(self, prompt: str, ctx: ToolContext, image_url: str | None) -> ToolResult:
        if not self.http.has_key:
            raise ToolUnavailable(
                f"{self.service} needs an API key: set FAL_KEY or pass api_key=..."
            )
        body, used = self._body(prompt, ctx, image_url)
        start = time.perf_counter()
        try:
            queued = await self.http.json("POST", f"/{self.model}", json=body, idempotent=False)
        except HTTPResponseError as exc:
            raise self._error(exc, "the request") from None
        request_id = queued.get("request_id") if isinstance(queued, Mapping) else None
        if not isinstance(request_id, str) or not _REQUEST_ID_RE.match(request_id):
            raise ToolExecutionError(
                f"{self.service} answered the request without a usable request_id",
                hint="Try the call again.",
            )
        urls = self._queue_urls(queued, request_id)
        logger.debug("%s: request %s queued (%s)", self.service, request_id, self.model)
        polls = 0
        last: dict[str, Any] = {}
        completed = False
        try:

            async def fetch() -> Any:
                nonlocal polls
                polls += 1
                try:
                    data = await self.http.json("GET", urls["status"])
                except HTTPResponseError as exc:
                    raise self._error(exc, f"request {request_id}") from None
                if isinstance(data, Mapping):
                    last.clear()
                    last.update(data)
                return data

            def done(data: Any) -> bool:
                return not (isinstance(data, Mapping) and _norm(data.get("status")) in _PENDING)

            def on_wait(polls_done: int, waited_s: float) -> None:
                ctx.check_budget()
                position = last.get("queue_position")
                ctx.report_progress(
                    polls_done,
                    None,
                    tool=self.name,
                    phase=f"{self.model} request",
                    waited_s=waited_s,
                    status=str(last.get("status")),
                    queue_position=position if isinstance(position, int) else None,
                )

            status = await self.http.poll(
                fetch,
                done,
                what=f"{self.model} request {request_id}",
                interval_s=self.poll_interval_s,
                max_interval_s=self.max_poll_interval_s,
                timeout_s=self.poll_timeout_s,
                on_wait=on_wait,
                clock=self.clock,
            )
            completed = True  # finished one way or another: nothing to cancel
            self._check_status(status, request_id)
            try:
                output = await self.http.json("GET", urls["response"])
            except HTTPResponseError as exc:
                raise self._error(exc, f"request {request_id}") from None
        except BaseException:
            if not completed:
                await self._cancel(urls["cancel"], request_id)
            raise
        images, seeds, blocked, returned = await self._images(output, ctx, request_id)
        metadata: dict[str, Any] = {
            "model": self.model,
            "request_id": request_id,
            "seed": seeds[0] if seeds else None,
            "num_images": ctx.num_images,
            "returned": returned,
            **used,
            "polls": polls,
            "request_s": round(time.perf_counter() - start, 4),
        }
        if blocked:
            metadata["nsfw_blocked"] = blocked
        timings = output.get("timings") if isinstance(output, Mapping) else None
        if isinstance(timings, Mapping):
            metadata["timings"] = {
                str(k): v
                for k, v in timings.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        text = f"fal's safety checker withheld {blocked} of {returned} images." if blocked else None
        return ToolResult(images=list(images), text=text, seeds=seeds, metadata=metadata)

    def _check_status(self, status: Any, request_id: str) -> None:
        """Nothing for a completed job; the error a failed, cancelled or odd one calls for."""
        if not isinstance(status, Mapping) or "status" not in status:
            raise ToolExecutionError(
                f"{self.service} answered a status poll of request {request_id} without a status",
                hint="Try the call again.",
            )
        state = _norm(status["status"])
        error = status.get("error")
        if state == "completed" and not error:
            return
        if state == "completed" or state in _FAILED:
            kind = str(status.get("error_type") or "")
            message = self.http.redact(str(error or "no details"))[:300]
            if kind == "content_policy_violation" or "content policy" in message.lower():
                raise ToolRefused(
                    f"fal's content policy blocked the request: {message}",
                    hint="Rewrite the request without the flagged content.",
                )
            raise ToolExecutionError(
                f"{self.service} failed request {request_id}: {message}",
                hint="Try the call again.",
            )
        if state in _CANCELLED:
            raise ToolUnavailable(
                f"{self.service}: request {request_id} was cancelled on the fal side; "
                "try the call again"
            )
        raise ToolExecutionError(
            f"{self.service} answered with an unknown request status "
            f"{self.http.redact(str(status['status']))[:60]!r}",
            hint="Try the call again.",
        )

    async def _images(
        self, output: Any, ctx: ToolContext, request_id: str
    ) -> tuple[list[bytes], list[int | None], int, int]:
        """The images the safety checker passed, their seeds, how many it blocked, of how many."""
        if not isinstance(output, Mapping):
            raise ToolExecutionError(
                f"{self.service} answered request {request_id} with no output object",
                hint="Try the call again.",
            )
        items = output.get("images")
        if items is None and isinstance(output.get("image"), Mapping):
            items = [output["image"]]
        if not isinstance(items, list) or not items:
            raise ToolExecutionError(
                f"{self.service} answered request {request_id} without images",
                hint="Try the call again.",
            )
        items = items[: ctx.num_images]
        flags = output.get("has_nsfw_concepts")
        flags = flags if isinstance(flags, list) else []
        seed = output.get("seed")
        if not (isinstance(seed, int) and not isinstance(seed, bool)):
            seed = ctx.seeds[0]
        # fal reports one seed per request: it is the first image's; the others are not known
        kept = [
            (i, item) for i, item in enumerate(items) if not (i < len(flags) and flags[i] is True)
        ]
        blocked = len(items) - len(kept)
        if not kept:
            raise ToolRefused(
                f"fal's safety checker flagged {'the image' if blocked == 1 else 'all images'} "
                "as not safe for work",
                hint="Rewrite the request without content a safety filter may flag.",
            )
        for _, item in kept:
            if not isinstance(item, Mapping):
                raise ToolExecutionError(
                    f"{self.service} answered request {request_id} with an image entry that is "
                    "not an object",
                    hint="Try the call again.",
                )
        images = await gather_or_cancel(
            [self.image_from_url(item.get("url"), what="image") for _, item in kept]
        )
        seeds: list[int | None] = [seed if i == 0 else None for i, _ in kept]
        return list(images), seeds, blocked, len(items)

    def _error(self, exc: HTTPResponseError, what: str) -> Exception:
        """A model-visible error for a rejection, where one fits; else ``exc`` itself."""
        details = _details(exc.data)
        kinds = {d["type"] for d in details}
        # exc.data is the body as parsed, not redacted (exc.text is)
        message = self.http.redact("; ".join(d["msg"] for d in details))[:300] or exc.text[:300]
        if "content_policy_violation" in kinds or "content policy" in message.lower():
            return ToolRefused(
                f"fal's content policy blocked {what}: {message}",
                hint="Rewrite the request without the flagged content.",
            )
        if kinds & _IMAGE_TYPES:
            return ToolExecutionError(f"{self.service} rejected the image: {message}")
        if kinds & _RETRYABLE_TYPES:
            return ToolExecutionError(
                f"{self.service} failed {what}: {message}", hint="Try the call again."
            )
        return exc

    async def _cancel(self, url: str, request_id: str) -> None:
        """Ask fal to drop an abandoned job (best effort, bounded by ``cancel_timeout_s``)."""
        try:
            await asyncio.wait_for(
                self.http.request(
                    "PUT",
                    url,
                    retry_statuses=frozenset(),
                    ok_statuses=frozenset({400, 404, 409}),  # already started, done, or gone
                ),
                timeout=self.cancel_timeout_s,
            )
            logger.info("%s: cancelled request %s", self.service, request_id)
        except Exception as exc:  # the call is being abandoned anyway; say so and move on
            logger.warning(
                "%s: could not cancel request %s: %s",
                self.service,
                request_id,
                self.http.redact(str(exc)) or type(exc).__name__,
            )

    # ------------------------------------------------------------------ hosts

    def _queue_urls(self, queued: Mapping[str, Any], request_id: str) -> dict[str, str]:
        """The status, response and cancel URLs: the API's when on base_url's host."""
        base = urlsplit(self.http.base_url)
        app = "/".join(self.model.split("/")[:2])  # a subpath (flux/dev) is not part of it
        documented = {
            "status": f"/{app}/requests/{request_id}/status",
            "response": f"/{app}/requests/{request_id}",
            "cancel": f"/{app}/requests/{request_id}/cancel",
        }
        urls: dict[str, str] = {}
        for key, path in documented.items():
            given = queued.get(f"{key}_url")
            parts = urlsplit(given) if isinstance(given, str) else None
            if parts is not None and (parts.scheme, parts.netloc) == (base.scheme, base.netloc):
                urls[key] = str(given)
            else:
                if isinstance(given, str) and given:
                    logger.warning(
                        "%s returned a %s URL on an unexpected host (%s); using %s",
                        self.service,
                        key,
                        (parts.netloc if parts else "")[:80],
                        self.http.base_url,
                    )
                urls[key] = self.http.url(path)
        return urls

    # ------------------------------------------------------------------ records

    def describe(self) -> dict[str, Any]:
        """Settings for trajectory metadata (never the API key)."""
        settings = {k: v for k, v in self.settings.items() if k != "negative_prompt"}
        for key in ("enable_safety_checker", "safety_tolerance", "output_format"):
            if getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        return {**super().describe(), "model": self.model, "settings": settings}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.http.base_url!r})"


class FalTool(_Fal, GenerationTool):
    """Generate with an image model on fal.ai's queue (``https://queue.fal.run``).

    One call asks for up to four images (``num_images``) with the call's first seed; fal
    reports one seed per request, recorded for the first image (the others' are ``None``).
    Images fal's safety checker flags (it returns them black, with ``has_nsfw_concepts``) are
    dropped and the model is told how many; when all are flagged the model sees a
    ``ToolRefused``. A job abandoned before it completes is cancelled (``PUT cancel_url``).

    Args:
        model: The fal model id (default ``"fal-ai/flux/dev"``; ``"fal-ai/flux/schnell"``,
            ``"fal-ai/flux-pro/v1.1"``, ...).
        base_url: The queue (default ``https://queue.fal.run``).
        api_key: The key (default: ``FAL_KEY``); sent as ``Authorization: Key ...`` to the
            queue host only.
        width: Image width (sent as ``image_size: {"width", "height"}``).
        height: Image height.
        image_size: A fal preset instead (``"square_hd"``, ``"landscape_4_3"``, ...).
        aspect_ratio: ``"16:9"`` and the like, for models that take one.
        steps: ``num_inference_steps``.
        guidance: ``guidance_scale``.
        negative_prompt: For models that take one.
        enable_safety_checker: Send fal's safety checker switch (default: the model's, on).
        safety_tolerance: 1 (strictest) to 6, for models that take one.
        output_format: ``"png"`` (default), ``"jpeg"``, ``"webp"``, or ``None`` for the
            model's default.
        extra_body: Further fields merged into every request.
        cancel_timeout_s: Longest wait for the cancellation of an abandoned job.
        clock: The clock of ``poll_timeout_s`` (injectable for tests).
        **http: :class:`~genagent.tools.http.RemoteTool` settings (``timeout_s``,
            ``max_retries``, ``poll_interval_s``, ``poll_timeout_s``, ``max_image_bytes``, ...).

    Example:
        ```py
        from genagent import Agent
        from genagent.tools.http.fal import FalTool

        agent = Agent(tool=FalTool("fal-ai/flux/dev", steps=28), candidates=4, policy=my_policy)
        ```
    """

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Ask fal for ``ctx.num_images`` images of ``args.caption``."""
        return await self._generate(args.caption, ctx, None)


class FalEditTool(_Fal, EditTool):
    """Edit the current image with an image-to-image model on fal.ai (FLUX Kontext by default).

    The current image goes as a ``data:`` URI in ``image_url``. Takes the arguments of
    :class:`FalTool`; the default model is ``"fal-ai/flux-pro/kontext"``.
    """

    default_model: ClassVar[str] = "fal-ai/flux-pro/kontext"

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Edit ``ctx.current_image`` by ``args.instruction``."""
        ref = ctx.current_image
        if ref is None:
            raise ToolRefused("there is no image to edit yet", hint="Generate an image first.")
        data = await asyncio.to_thread(ref.read_bytes)
        uri = f"data:{ref.mime_type};base64,{base64.b64encode(data).decode()}"
        return await self._generate(args.instruction, ctx, uri)
