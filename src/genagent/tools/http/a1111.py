"""``A1111Tool`` and ``A1111EditTool``: the AUTOMATIC1111 (or Forge) Stable Diffusion web UI API.

The web UI serves its API when started with ``--api`` (or ``--nowebui``):
``POST /sdapi/v1/txt2img`` and ``POST /sdapi/v1/img2img`` take a JSON body (``prompt``,
``negative_prompt``, ``seed``, ``steps``, ``cfg_scale``, ``width``, ``height``,
``batch_size``, ``sampler_name``, ...) and answer with base64 PNGs and an ``info`` JSON string
that holds the seed of every image. With ``--api-auth user:password`` the API wants HTTP basic
auth: ``api_auth=("user", "password")`` or ``http://user:password@host:7860``.

Candidates go in one request (``batch_size``) from the first seed; the web UI seeds the batch
``seed, seed + 1, ...`` and the tool records the seeds it reports.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

from genagent._http import excerpt
from genagent.errors import (
    ConfigurationError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tools._base import EditTool, GenerationTool, ToolContext, ToolResult
from genagent.tools.http._base import HTTPResponseError, RemoteTool

__all__ = ["A1111EditTool", "A1111Tool"]

logger = logging.getLogger("genagent.tools.a1111")

_SETTINGS = ("width", "height", "steps", "guidance", "negative_prompt")
_RESERVED = frozenset(
    {"prompt", "seed", "batch_size", "n_iter", "init_images", "send_images", "do_not_save_grid"}
)


class _A1111(RemoteTool, abstract=True):
    service: ClassVar[str] = "the AUTOMATIC1111 web UI"
    default_base_url: ClassVar[str | None] = "http://127.0.0.1:7860"
    api_key_env: ClassVar[tuple[str, ...]] = ()
    max_images_per_call: ClassVar[int] = 8
    endpoint: ClassVar[str]

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_auth: tuple[str, str] | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        sampler_name: str | None = None,
        scheduler: str | None = None,
        checkpoint: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        check_blank: bool = True,
        interrupt_on_cancel: bool = False,
        timeout_s: float = 600.0,
        **http: Any,
    ) -> None:
        url = base_url or self.default_base_url or ""
        if api_auth is not None:
            url = _with_basic_auth(url, api_auth)
        super().__init__(url, timeout_s=timeout_s, **http)
        self.settings: dict[str, Any] = {
            k: v
            for k, v in {
                "width": width,
                "height": height,
                "steps": steps,
                "guidance": guidance,
                "negative_prompt": negative_prompt,
            }.items()
            if v is not None
        }
        _check_settings(self.settings)
        self.sampler_name = sampler_name
        self.scheduler = scheduler
        self.checkpoint = checkpoint
        self.extra_body = dict(extra_body or {})
        reserved = sorted(_RESERVED & set(self.extra_body))
        if reserved:
            raise ConfigurationError(
                f"extra_body may not set {', '.join(reserved)}: the tool sets them on every call"
            )
        self.check_blank = check_blank
        self.interrupt_on_cancel = interrupt_on_cancel

    # ------------------------------------------------------------------ calls

    def _body(self, prompt: str, ctx: ToolContext, settings: Mapping[str, Any]) -> dict[str, Any]:
        count = max(1, ctx.num_images)
        body: dict[str, Any] = {
            "prompt": prompt,
            "seed": ctx.seeds[0] if ctx.seeds else -1,
            "batch_size": count,
            "n_iter": 1,
            # a grid of the batch would come first among the images
            "do_not_save_grid": True,
            "send_images": True,
            "save_images": False,
        }
        for ours, theirs in (
            ("width", "width"),
            ("height", "height"),
            ("steps", "steps"),
            ("guidance", "cfg_scale"),
            ("negative_prompt", "negative_prompt"),
        ):
            if settings.get(ours) is not None:
                body[theirs] = settings[ours]
        if self.sampler_name is not None:
            body["sampler_name"] = self.sampler_name
        if self.scheduler is not None:
            body["scheduler"] = self.scheduler
        if self.checkpoint is not None:
            body["override_settings"] = {
                **dict(self.extra_body.get("override_settings") or {}),
                "sd_model_checkpoint": self.checkpoint,
            }
            body["override_settings_restore_afterwards"] = True
        body.update({k: v for k, v in self.extra_body.items() if k not in body})
        return body

    async def _run(self, body: dict[str, Any], ctx: ToolContext) -> ToolResult:
        count = int(body["batch_size"])
        start = time.perf_counter()
        try:
            data = await self.http.json("POST", self.endpoint, json=body, idempotent=False)
        except HTTPResponseError as exc:
            raise self._error(exc) from None
        except (asyncio.CancelledError, KeyboardInterrupt):
            if self.interrupt_on_cancel:
                await self._interrupt()
            raise
        images, info = self._images(data, count)

        def decode() -> tuple[list[bytes], list[bool]]:
            # decoding a batch of large PNGs takes a while: off the event loop
            images_ = [
                self.image_from_base64(item, what=f"image #{i + 1}")
                for i, item in enumerate(images)
            ]
            return images_, [self.check_blank and _is_black(d) for d in images_]

        decoded, blank = await asyncio.to_thread(decode)
        seeds = _seeds(info, int(body["seed"]), count)
        kept = [i for i, black in enumerate(blank) if not black]
        if not kept:
            noun = "image" if count == 1 else f"all {count} images"
            raise ToolRefused(
                f"{self.service} returned {noun} all black: a safety filter (an NSFW-censor "
                "extension) blocked it, or the VAE overflowed (start the web UI with "
                "--no-half-vae)",
                hint="Describe the image differently (safety filters react to some wordings), "
                "or try again.",
            )
        text = None
        if len(kept) < len(decoded):
            dropped = len(decoded) - len(kept)
            text = (
                f"{dropped} of {len(decoded)} candidates were dropped: all-black images (a "
                "safety filter, or a VAE overflow)"
            )
        metadata: dict[str, Any] = {
            "server": self.http.base_url,
            "endpoint": self.endpoint,
            "request_s": round(time.perf_counter() - start, 4),
            **{k: v for k, v in body.items() if k in _RECORDED},
        }
        for key in ("sd_model_name", "sd_model_hash", "sampler_name", "version"):
            if isinstance(info.get(key), (str, int, float)):
                metadata[f"server_{key}" if key == "version" else key] = info[key]
        if text is not None:
            metadata["blocked"] = ["black" if b else None for b in blank]
        return ToolResult(
            images=[decoded[i] for i in kept],
            text=text,
            seeds=[seeds[i] for i in kept],
            metadata=metadata,
        )

    def _images(self, data: Any, count: int) -> tuple[list[Any], dict[str, Any]]:
        """The ``count`` images of the batch (no grid, no script extras) and the parsed info."""
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise ToolExecutionError(
                f"{self.service} answered {self.endpoint} without an 'images' list: "
                f"{excerpt(self.http.redact(repr(data)))}",
                hint="Try the call again.",
            )
        info = _info(data.get("info"))
        first = info.get("index_of_first_image")
        if isinstance(first, int) and not isinstance(first, bool) and 0 < first < len(images):
            images = images[first:]
        elif len(images) == count + 1 and count > 1:
            images = images[1:]  # a grid the server added although asked not to
        if len(images) < count:
            raise ToolExecutionError(
                f"{self.service} answered with {len(images)} images for {count} asked",
                hint="Try the call again.",
            )
        return images[:count], info  # extras after the batch come from scripts (ControlNet)

    def _error(self, exc: HTTPResponseError) -> Exception:
        # redacted again (the client redacts error data too): a shown body never holds the key
        detail = self.http.redact(_detail(exc.data)) or excerpt(exc.text, 300)
        if exc.status == 401:
            return ToolUnavailable(
                f"{self.service} rejected the credentials (HTTP 401): pass "
                "api_auth=('user', 'password') matching its --api-auth, or user:password@ in "
                "base_url"
            )
        if exc.status == 404:
            if detail and "not found" in detail.lower() and detail.lower() != "not found":
                return ToolUnavailable(
                    f"{self.service}: {detail} (HTTP 404); check sampler_name, scheduler and "
                    "checkpoint against its /sdapi/v1/samplers, /sdapi/v1/schedulers and "
                    "/sdapi/v1/sd-models"
                )
            return ToolUnavailable(
                f"{self.service} has no API at {self.http.base_url}{self.endpoint} (HTTP 404): "
                "start it with --api (or --nowebui), and check base_url"
            )
        if exc.status == 422:
            return ToolUnavailable(
                f"{self.service} rejected the request's fields (HTTP 422): {detail}. Fix the "
                "tool's settings or extra_body"
            )
        return exc

    async def _interrupt(self) -> None:
        """Stop the generation that a cancelled call leaves running (``/sdapi/v1/interrupt``)."""
        try:
            await asyncio.wait_for(
                self.http.request("POST", "/sdapi/v1/interrupt", timeout_s=5.0), timeout=10.0
            )
        except Exception as exc:  # logged, never raised
            logger.warning(
                "could not interrupt %s: %s",
                self.service,
                self.http.redact(f"{type(exc).__name__}: {exc}"),
            )

    def describe(self) -> dict[str, Any]:
        """Settings for trajectory metadata (never the password)."""
        return {
            **super().describe(),
            "settings": dict(self.settings),
            "sampler_name": self.sampler_name,
            "scheduler": self.scheduler,
            "checkpoint": self.checkpoint,
        }


class A1111Tool(_A1111, GenerationTool):
    """Generate with the AUTOMATIC1111 or Forge web UI (``/sdapi/v1/txt2img``).

    Candidates (``ctx.num_images``, up to 8) go in one request as ``batch_size`` from the first
    seed; the seeds the web UI reports (``seed, seed + 1, ...``) are recorded. All-black images
    (an NSFW-censor extension, a VAE overflow) are dropped and reported to the model; if every
    image is black the model sees ``ToolRefused``.

    Args:
        base_url: The web UI (default ``http://127.0.0.1:7860``); ``user:password@`` in it is
            basic auth.
        api_auth: ``(user, password)`` of the web UI's ``--api-auth``.
        width: Image width (default: the web UI's, 512).
        height: Image height.
        steps: Sampling steps.
        guidance: CFG scale (``cfg_scale``).
        negative_prompt: A negative prompt.
        sampler_name: The sampler (``"DPM++ 2M"``, ``"Euler a"``; see ``/sdapi/v1/samplers``).
        scheduler: The schedule type (``"Karras"``; web UI 1.9 and later).
        checkpoint: A checkpoint to use for these calls (``override_settings``), restored
            afterwards.
        extra_body: Further fields merged into every request (``{"clip_skip": 2}``,
            ``alwayson_scripts``, hires fix).
        check_blank: Drop all-black images and tell the model why.
        interrupt_on_cancel: When a call is abandoned (a spent budget, a cancelled run), ask
            the web UI to stop (``POST /sdapi/v1/interrupt``). It interrupts whatever the web
            UI is running, so enable it only when this tool is its only client.
        timeout_s: Read timeout of one request (default 600: the request lasts the whole
            generation, queue included).
        **http: :class:`~genagent.tools.http.RemoteTool` settings (``max_retries``,
            ``max_in_flight``, ``max_image_bytes``, ``transport``, ...).

    Raises:
        ConfigurationError: For a malformed URL, or a setting that is not a positive number.

    Example:
        ```py
        from genagent import Agent
        from genagent.tools import A1111Tool

        tool = A1111Tool("http://gpu-box:7860", api_auth=("me", "password"), steps=25,
                         sampler_name="DPM++ 2M", scheduler="Karras")
        agent = Agent(tool=tool, policy=my_policy, candidates=4)
        ```
    """

    endpoint: ClassVar[str] = "/sdapi/v1/txt2img"

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Generate ``ctx.num_images`` images of ``args.caption`` in one batch."""
        settings = _merged(self.settings, ctx.settings)
        return await self._run(self._body(args.caption, ctx, settings), ctx)


class A1111EditTool(_A1111, EditTool):
    """Edit the current image with the web UI's img2img (``/sdapi/v1/img2img``).

    The current image goes in ``init_images`` and the instruction as the prompt, at the
    current image's size (rounded to a multiple of 8) unless width and height are given.
    img2img redraws the image guided by the prompt, so an instruction works best as a
    description of the result; ``denoising_strength`` sets how much changes. Takes the
    arguments of :class:`A1111Tool`, and:

    Args:
        denoising_strength: How much of the image is redrawn, 0 to 1 (default 0.75, the web
            UI's).
        **kwargs: The arguments of :class:`A1111Tool`.
    """

    endpoint: ClassVar[str] = "/sdapi/v1/img2img"

    def __init__(
        self, base_url: str | None = None, *, denoising_strength: float = 0.75, **kwargs: Any
    ) -> None:
        if not (
            isinstance(denoising_strength, (int, float))
            and not isinstance(denoising_strength, bool)
            and 0.0 <= denoising_strength <= 1.0
        ):
            raise ConfigurationError(
                f"denoising_strength must be a number from 0 to 1, got {denoising_strength!r}"
            )
        super().__init__(base_url, **kwargs)
        self.denoising_strength = float(denoising_strength)

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Redraw ``ctx.current_image`` guided by ``args.instruction``."""
        if ctx.current_image is None:
            raise ToolRefused("there is no image to edit yet", hint="Generate an image first.")
        ref = ctx.current_image
        data = await asyncio.to_thread(ref.read_bytes)
        settings = _merged(self.settings, ctx.settings)
        if settings.get("width") is None and settings.get("height") is None:
            settings["width"] = _multiple_of_8(ref.width)
            settings["height"] = _multiple_of_8(ref.height)
        body = self._body(args.instruction, ctx, settings)
        body["init_images"] = [base64.b64encode(data).decode("ascii")]
        body.setdefault("denoising_strength", self.denoising_strength)
        return await self._run(body, ctx)

    def describe(self) -> dict[str, Any]:
        """Settings for trajectory metadata."""
        return {**super().describe(), "denoising_strength": self.denoising_strength}


# --------------------------------------------------------------------------- helpers

_RECORDED = frozenset(
    {
        "seed",
        "batch_size",
        "width",
        "height",
        "steps",
        "cfg_scale",
        "sampler_name",
        "scheduler",
        "denoising_strength",
    }
)


def _with_basic_auth(url: str, auth: tuple[str, str]) -> str:
    if not (isinstance(auth, tuple) and len(auth) == 2 and all(isinstance(a, str) for a in auth)):
        raise ConfigurationError("api_auth must be a (user, password) tuple of strings")
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ConfigurationError(
            "base_url is not a valid URL; pass e.g. 'http://127.0.0.1:7860'"
        ) from None
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            "pass the credentials once: either api_auth=... or user:password@ in base_url"
        )
    if not host:
        raise ConfigurationError("base_url must be an http(s) URL such as 'http://127.0.0.1:7860'")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    user, password = (quote(a, safe="") for a in auth)
    return urlunsplit((parts.scheme, f"{user}:{password}@{netloc}", parts.path, parts.query, ""))


def _check_settings(settings: Mapping[str, Any]) -> None:
    for name in ("width", "height", "steps"):
        value = settings.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
    guidance = settings.get("guidance")
    if guidance is not None and (
        not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or guidance < 0
    ):
        raise ConfigurationError(f"guidance must be a number >= 0, got {guidance!r}")


def _merged(settings: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {**settings, **{k: v for k, v in overrides.items() if k in _SETTINGS}}


def _multiple_of_8(size: int) -> int:
    return max(8, round(size / 8) * 8)


def _info(text: Any) -> dict[str, Any]:
    """The ``info`` of a response: a JSON string (a dict in some forks); ``{}`` if unreadable."""
    if isinstance(text, dict):
        return text
    if isinstance(text, str):
        try:
            value = json.loads(text)
        except ValueError:
            return {}
        if isinstance(value, dict):
            return value
    return {}


def _seeds(info: Mapping[str, Any], seed: int, count: int) -> list[int | None]:
    """The seed of each image: ``all_seeds`` of the info, else the web UI's ``seed + i``."""
    reported = info.get("all_seeds")
    if (
        isinstance(reported, list)
        and len(reported) >= count
        and all(isinstance(s, int) and not isinstance(s, bool) for s in reported[:count])
    ):
        return list(reported[:count])
    if seed < 0:
        return [None] * count  # a random seed the server did not report
    return [seed + i for i in range(count)]


def _detail(data: Any) -> str:
    """The message of a web UI error body.

    FastAPI's ``{"detail": [{"loc", "msg"}]}`` for a 422, or the web UI's ``{"error",
    "detail", "errors"}``.
    """
    if not isinstance(data, dict):
        return ""
    detail = data.get("detail")
    if isinstance(detail, list):
        parts = []
        for item in detail[:5]:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
        return excerpt("; ".join(parts), 300)
    texts = [data.get(k) for k in ("detail", "errors", "error")]
    return excerpt(" - ".join(t for t in texts if isinstance(t, str) and t.strip()), 300)


def _is_black(data: bytes) -> bool:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        extrema: Any = image.convert("RGB").getextrema()
    return all(high == 0 for _, high in extrema)
