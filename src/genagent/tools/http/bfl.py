"""``BFLTool`` and ``BFLEditTool``: FLUX models on the Black Forest Labs API (api.bfl.ai).

The API is asynchronous: ``POST {base}/v1/{model}`` with the ``x-key`` header answers
``{"id", "polling_url"}``; ``GET polling_url`` answers ``{"status": ...}`` until the status is
``Ready`` (``result.sample`` is a signed image URL, valid for about ten minutes, fetched
without the key), a moderation verdict (``Request Moderated``, ``Content Moderated``), an
``Error`` / ``Failed``, or ``Task not found``. One task makes one image.

Where the key goes: to the ``base_url`` host, and to a polling URL on that host or on a
``*.bfl.ai`` / ``*.bfl.ml`` host over https (the global endpoint answers with regional polling
URLs such as ``https://api.eu.bfl.ai/...``). A polling URL on any other host is not contacted;
the task is polled on ``{base}/v1/get_result?id=...`` instead. Image URLs are always fetched
without the key.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

from genagent.errors import (
    ConfigurationError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tools._base import EditTool, GenerationTool, ToolContext, ToolResult
from genagent.tools.http._base import HTTPResponseError, RemoteTool

__all__ = ["BFLEditTool", "BFLTool"]

logger = logging.getLogger("genagent.tools.bfl")

_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PENDING = frozenset({"pending", "queued", "processing", "running", "in progress", "started"})
_MODERATED = frozenset({"request moderated", "content moderated"})
_FAILED = frozenset({"error", "failed", "failure"})


@dataclass(frozen=True)
class _Spec:
    """What a known model takes: its size as width/height or as an aspect ratio; steps."""

    ratio: bool = False
    steps: bool = False


# Known models; an unknown model gets every configured setting (width/height, steps, guidance).
_MODELS: dict[str, _Spec] = {
    "flux-pro-1.1": _Spec(),
    "flux-pro-1.1-ultra": _Spec(ratio=True),
    "flux-pro": _Spec(steps=True),
    "flux-dev": _Spec(steps=True),
    "flux-kontext-pro": _Spec(ratio=True),
    "flux-kontext-max": _Spec(ratio=True),
    "flux-2-pro": _Spec(),
    "flux-2-max": _Spec(),
    "flux-2-flex": _Spec(steps=True),
    "flux-2-klein-4b": _Spec(),
    "flux-2-klein-9b": _Spec(),
}


def _norm(status: Any) -> str:
    return " ".join(str(status).replace("_", " ").split()).lower()


def _aspect_ratio(width: int, height: int) -> str:
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
    return value


def _moderation_reasons(data: Mapping[str, Any]) -> list[str]:
    """The reasons a moderated task names (``details: {"Moderation Reasons": [...]}``)."""
    reasons: list[str] = []
    details = data.get("details")
    if isinstance(details, Mapping):
        for value in details.values():
            items = value if isinstance(value, list) else [value]
            reasons.extend(str(item) for item in items if isinstance(item, (str, int, float)))
    return reasons[:5]


class _BFL(RemoteTool, abstract=True):
    service: ClassVar[str] = "the BFL API"
    default_base_url: ClassVar[str | None] = "https://api.bfl.ai"
    api_key_env: ClassVar[tuple[str, ...]] = ("BFL_API_KEY",)
    auth_header: ClassVar[str] = "x-key"
    auth_scheme: ClassVar[str] = ""
    max_images_per_call: ClassVar[int] = 1
    default_model: ClassVar[str] = "flux-pro-1.1"
    key_domains: ClassVar[tuple[str, ...]] = ("bfl.ai", "bfl.ml")
    """Polling URLs on these domains (or subdomains) get the key, over https."""

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        width: int | None = None,
        height: int | None = None,
        aspect_ratio: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        safety_tolerance: int = 2,
        output_format: str = "png",
        prompt_upsampling: bool = False,
        extra_body: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        **http: Any,
    ) -> None:
        super().__init__(base_url, api_key=api_key, **http)
        self.model = model or self.default_model
        if not _MODEL_RE.match(self.model):
            raise ConfigurationError(
                f"model must be a BFL endpoint name such as 'flux-pro-1.1', got {self.model!r}"
            )
        spec = _MODELS.get(self.model)
        if spec is not None and not spec.steps and (steps is not None or guidance is not None):
            takes = sorted(m for m, s in _MODELS.items() if s.steps)
            raise ConfigurationError(
                f"{self.model} takes no steps or guidance; models that do: {', '.join(takes)} "
                "(or send them anyway with extra_body=...)"
            )
        if not (isinstance(safety_tolerance, int) and 0 <= safety_tolerance <= 6):
            raise ConfigurationError(
                f"safety_tolerance must be an int from 0 (strictest) to 6, got {safety_tolerance!r}"
            )
        if output_format not in ("png", "jpeg"):
            raise ConfigurationError(
                f"output_format must be 'png' or 'jpeg', got {output_format!r}"
            )
        self.settings: dict[str, Any] = {
            k: v
            for k, v in {
                "width": _positive_int("width", width),
                "height": _positive_int("height", height),
                "aspect_ratio": aspect_ratio,
                "steps": _positive_int("steps", steps),
                "guidance": guidance,
            }.items()
            if v is not None
        }
        self.safety_tolerance = safety_tolerance
        self.output_format = output_format
        self.prompt_upsampling = prompt_upsampling
        self.extra_body = dict(extra_body or {})
        self.clock = clock
        # the key for polling URLs on other BFL hosts (HTTPClient sends it to base_url's host)
        self._key = (
            api_key
            if api_key is not None
            else next((os.environ[v] for v in self.api_key_env if os.environ.get(v)), None)
        )

    # ------------------------------------------------------------------ request

    def _body(
        self, prompt: str, ctx: ToolContext, image: bytes | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The request body and the settings it carries (for the record)."""
        spec = _MODELS.get(self.model, _Spec())
        settings = {**self.settings, **{k: v for k, v in ctx.settings.items() if v is not None}}
        body: dict[str, Any] = {
            "prompt": prompt,
            "seed": ctx.seeds[0],
            "safety_tolerance": self.safety_tolerance,
            "output_format": self.output_format,
        }
        if self.prompt_upsampling:
            body["prompt_upsampling"] = True
        used: dict[str, Any] = {}
        ignored: list[str] = []
        width, height = settings.get("width"), settings.get("height")
        if spec.ratio or "aspect_ratio" in settings:
            ratio = settings.get("aspect_ratio")
            if ratio is None and isinstance(width, int) and isinstance(height, int):
                ratio = _aspect_ratio(width, height)
            if ratio is not None:
                body["aspect_ratio"] = used["aspect_ratio"] = str(ratio)
        else:
            for key, value in (("width", width), ("height", height)):
                if value is not None:
                    body[key] = used[key] = value
        for key in ("steps", "guidance"):
            if settings.get(key) is None:
                continue
            if self.model in _MODELS and not spec.steps:
                ignored.append(key)  # asked for by a caller (genagent serve); not taken
            else:
                body[key] = used[key] = settings[key]
        if settings.get("negative_prompt"):
            ignored.append("negative_prompt")
        if image is not None:
            body["input_image"] = base64.b64encode(image).decode()
        body.update(self.extra_body)
        if ignored:
            used["ignored_settings"] = ignored
        return body, used

    async def _generate(self, prompt: str, ctx: ToolContext, image: bytes | None) -> ToolResult:
        if not self.http.has_key:
            raise ToolUnavailable(
                f"{self.service} needs an API key: set BFL_API_KEY or pass api_key=..."
            )
        body, used = self._body(prompt, ctx, image)
        start = time.perf_counter()
        try:
            task = await self.http.json("POST", f"/v1/{self.model}", json=body, idempotent=False)
        except HTTPResponseError as exc:
            raise self._submit_error(exc) from None
        if not isinstance(task, Mapping) or not isinstance(task.get("id"), str) or not task["id"]:
            raise ToolExecutionError(
                f"{self.service} answered the request without a task id",
                hint="Try the call again.",
            )
        task_id = str(task["id"])
        poll_url = self._poll_url(task_id, task.get("polling_url"))
        headers = self._poll_headers(poll_url)
        logger.debug("%s: task %s submitted (%s)", self.service, task_id, self.model)
        polls = 0
        last: dict[str, Any] = {}

        async def fetch() -> Any:
            nonlocal polls
            polls += 1
            try:
                data = await self.http.json("GET", poll_url, headers=headers)
            except HTTPResponseError as exc:
                if exc.status == 404:
                    raise ToolUnavailable(
                        f"{self.service}: task {task_id} was not found (it expired, or was "
                        "polled on the wrong region); try the call again"
                    ) from None
                raise
            if isinstance(data, Mapping):
                last.update(data)
            return data

        def done(data: Any) -> bool:
            return not (isinstance(data, Mapping) and _norm(data.get("status")) in _PENDING)

        def on_wait(polls_done: int, waited_s: float) -> None:
            ctx.check_budget()
            progress = last.get("progress")
            ctx.report_progress(
                polls_done,
                None,
                tool=self.name,
                phase=f"{self.model} task",
                waited_s=waited_s,
                status=str(last.get("status")),
                progress=progress if isinstance(progress, (int, float)) else None,
            )

        data = await self.http.poll(
            fetch,
            done,
            what=f"{self.model} task {task_id}",
            interval_s=self.poll_interval_s,
            max_interval_s=self.max_poll_interval_s,
            timeout_s=self.poll_timeout_s,
            on_wait=on_wait,
            clock=self.clock,
        )
        result = self._result(data, task_id)
        url = result.get("sample")
        image_bytes = await self.image_from_url(url, what="image")
        seed = result.get("seed")
        if not (isinstance(seed, int) and not isinstance(seed, bool)):
            seed = ctx.seeds[0]
        metadata: dict[str, Any] = {
            "model": self.model,
            "task_id": task_id,
            "seed": seed,
            "safety_tolerance": self.safety_tolerance,
            "output_format": self.output_format,
            **used,
            "polls": polls,
            "request_s": round(time.perf_counter() - start, 4),
        }
        for key in ("cost", "input_mp", "output_mp"):
            if isinstance(task.get(key), (int, float)) and not isinstance(task.get(key), bool):
                metadata[key] = task[key]
        return ToolResult(images=[image_bytes], seeds=[seed], metadata=metadata)

    def _result(self, data: Any, task_id: str) -> Mapping[str, Any]:
        """The ``result`` of a finished task, or the error its status calls for."""
        if not isinstance(data, Mapping) or "status" not in data:
            raise ToolExecutionError(
                f"{self.service} answered a poll of task {task_id} without a status",
                hint="Try the call again.",
            )
        status = _norm(data["status"])
        if status == "ready":
            result = data.get("result")
            if isinstance(result, str):
                result = {"sample": result}
            if not isinstance(result, Mapping) or not isinstance(result.get("sample"), str):
                raise ToolExecutionError(
                    f"{self.service} reported task {task_id} ready without an image URL",
                    hint="Try the call again.",
                )
            return result
        if status in _MODERATED:
            reasons = _moderation_reasons(data)
            which = "request" if status.startswith("request") else "generated image"
            because = f" ({self.http.redact(', '.join(reasons))})" if reasons else ""
            raise ToolRefused(
                f"BFL's moderation blocked the {which}{because}",
                hint="Rewrite the request without the flagged content.",
            )
        if status in _FAILED:
            detail = data.get("details") or data.get("error") or data.get("result")
            shown = self.http.redact(str(detail))[:300] if detail else "no details"
            raise ToolExecutionError(
                f"{self.service} failed to generate the image: {shown}",
                hint="Try the call again.",
            )
        if status == "task not found":
            raise ToolUnavailable(
                f"{self.service}: task {task_id} was not found (it expired, or was polled on "
                "the wrong region); try the call again"
            )
        raise ToolExecutionError(
            f"{self.service} answered with an unknown task status "
            f"{self.http.redact(str(data['status']))[:60]!r}",
            hint="Try the call again.",
        )

    def _submit_error(self, exc: HTTPResponseError) -> Exception:
        """A model-visible error for a submission the API rejected, where one fits."""
        text = exc.text.lower()
        if "moderat" in text:
            return ToolRefused(
                "BFL's moderation blocked the request",
                hint="Rewrite the request without the flagged content.",
            )
        if exc.status == 402:
            return ToolUnavailable(
                f"{exc.message}. The BFL account is out of credits: add credits at "
                "https://dashboard.bfl.ai"
            )
        return exc

    # ------------------------------------------------------------------ hosts

    def _trusted(self, url: str) -> bool:
        """Whether ``url`` may receive the key: base_url's host, or a BFL host over https."""
        parts = urlsplit(url)
        base = urlsplit(self.http.base_url)
        if parts.netloc == base.netloc and parts.scheme == base.scheme:
            return True
        host = (parts.hostname or "").lower()
        return parts.scheme in ("https", base.scheme) and any(
            host == domain or host.endswith("." + domain) for domain in self.key_domains
        )

    def _poll_url(self, task_id: str, polling_url: Any) -> str:
        if isinstance(polling_url, str) and self._trusted(polling_url):
            return polling_url
        if isinstance(polling_url, str) and polling_url:
            logger.warning(
                "%s returned a polling URL on an unexpected host (%s); polling %s instead",
                self.service,
                urlsplit(polling_url).netloc[:80],
                self.http.base_url,
            )
        return self.http.url(f"/v1/get_result?id={quote(task_id, safe='')}")

    def _poll_headers(self, url: str) -> dict[str, str]:
        # HTTPClient adds the key for base_url's own host; another BFL host needs it here
        if self._key and urlsplit(url).netloc != urlsplit(self.http.base_url).netloc:
            return {self.auth_header: self._key}
        return {}

    # ------------------------------------------------------------------ records

    def describe(self) -> dict[str, Any]:
        """Settings for trajectory metadata (never the API key)."""
        return {
            **super().describe(),
            "model": self.model,
            "settings": {
                **self.settings,
                "safety_tolerance": self.safety_tolerance,
                "output_format": self.output_format,
            },
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.http.base_url!r})"


class BFLTool(_BFL, GenerationTool):
    """Generate with a FLUX model on the Black Forest Labs API (``https://api.bfl.ai``).

    Each call submits one task (one image, with the call's seed) and polls it until it is
    ready; the agent runs several candidates as parallel calls. A moderation verdict reaches
    the model as ``ToolRefused``; a failed task as ``ToolExecutionError``; a missing key, an
    exhausted account, a task that never finishes or an API that stays down as
    ``ToolUnavailable``.

    Args:
        model: The endpoint: ``"flux-pro-1.1"`` (default), ``"flux-dev"``, ``"flux-pro"``,
            ``"flux-pro-1.1-ultra"``, ``"flux-2-pro"``, ``"flux-kontext-pro"``, ...
        base_url: The API (default ``https://api.bfl.ai``; ``https://api.eu.bfl.ai`` or
            ``https://api.us.bfl.ai`` for a region).
        api_key: The key (default: ``BFL_API_KEY``); sent as ``x-key`` to BFL hosts only.
        width: Image width (a multiple of 32; models that take an aspect ratio get
            ``width:height`` reduced).
        height: Image height.
        aspect_ratio: ``"16:9"`` and the like, for the models that take one.
        steps: Sampling steps (``flux-dev``, ``flux-pro``, ``flux-2-flex`` only).
        guidance: Guidance (the same models).
        safety_tolerance: 0 (strictest) to 6 (most permissive); at most 2 with input images.
        output_format: ``"png"`` (default) or ``"jpeg"``.
        prompt_upsampling: Let BFL rewrite the prompt (off: the agent writes it).
        extra_body: Further fields merged into every request.
        clock: The clock of ``poll_timeout_s`` (injectable for tests).
        **http: :class:`~genagent.tools.http.RemoteTool` settings (``timeout_s``,
            ``max_retries``, ``poll_interval_s``, ``poll_timeout_s``, ``max_image_bytes``, ...).

    Example:
        ```py
        from genagent import Agent
        from genagent.tools.http.bfl import BFLTool

        agent = Agent(tool=BFLTool("flux-pro-1.1", width=1024, height=768), policy=my_policy)
        ```
    """

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Generate one image of ``args.caption`` with the call's first seed."""
        return await self._generate(args.caption, ctx, None)


class BFLEditTool(_BFL, EditTool):
    """Edit the current image with FLUX Kontext on the Black Forest Labs API.

    The current image goes as base64 in ``input_image``; the output keeps its aspect ratio
    unless ``aspect_ratio`` (or ``width`` and ``height``) is set. Takes the arguments of
    :class:`BFLTool`; the default model is ``"flux-kontext-pro"`` (``"flux-kontext-max"``,
    ``"flux-2-pro"`` also edit).
    """

    default_model: ClassVar[str] = "flux-kontext-pro"

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Edit ``ctx.current_image`` by ``args.instruction``."""
        if ctx.current_image is None:
            raise ToolRefused("there is no image to edit yet", hint="Generate an image first.")
        image = await asyncio.to_thread(ctx.current_image.read_bytes)
        return await self._generate(args.instruction, ctx, image)
