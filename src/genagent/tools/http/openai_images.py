"""``OpenAIImagesTool`` and ``OpenAIImageEditTool``: the OpenAI Images API.

They speak the API's own wire format: ``POST /images/generations`` (a JSON body) and
``POST /images/edits`` (``multipart/form-data`` with the image file), answered with
``{"created": ..., "data": [{"b64_json": ...} | {"url": ...}, ...]}``. They work with OpenAI
(``dall-e-2``, ``dall-e-3``, ``gpt-image-1`` and its siblings) and with servers and gateways
that copy the API: pass their ``base_url`` and model name.

The API has no seed: the same caption gives a different image every call, and the seeds
recorded on the trajectory are ``None``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from genagent._async import gather_or_cancel
from genagent._http import excerpt
from genagent.errors import (
    ConfigurationError,
    GenAgentError,
    ToolArgumentError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tools._base import EditTool, GenerationTool, ToolContext, ToolResult
from genagent.tools.http._base import HTTPResponseError, RemoteTool

__all__ = ["OpenAIImageEditTool", "OpenAIImagesTool"]

_SIZE = re.compile(r"^[1-9]\d{0,4}x[1-9]\d{0,4}$")
# dall-e: content_policy_violation; gpt-image-1: moderation_blocked; Azure OpenAI: content_filter
_REFUSAL_CODES = frozenset({"content_policy_violation", "moderation_blocked", "content_filter"})
_AZURE_REFUSAL_CODES = frozenset({"ResponsibleAIPolicyViolation", "contentFilter"})
_GPT_IMAGE_OPTIONS = ("background", "output_format", "output_compression", "moderation")
_OPTION_VALUES = {
    "style": ("vivid", "natural"),
    "background": ("transparent", "opaque", "auto"),
    "output_format": ("png", "jpeg", "webp"),
    "moderation": ("auto", "low"),
}


@dataclass(frozen=True)
class _Model:
    """What one model accepts (``None``: not checked here; the server decides)."""

    family: Literal["dall-e-2", "dall-e-3", "gpt-image", "other"]
    sizes: tuple[str, ...] | None
    qualities: tuple[str, ...] | None
    max_n: int
    max_prompt: int | None
    can_edit: bool
    edit_formats: tuple[str, ...]


_GPT_IMAGE_1 = _Model(
    "gpt-image",
    sizes=("auto", "1024x1024", "1536x1024", "1024x1536"),
    qualities=("auto", "low", "medium", "high"),
    max_n=10,
    max_prompt=32000,
    can_edit=True,
    edit_formats=("png", "jpeg", "webp"),
)
_MODELS: dict[str, _Model] = {
    "dall-e-2": _Model(
        "dall-e-2",
        sizes=("256x256", "512x512", "1024x1024"),
        qualities=("standard",),
        max_n=10,
        max_prompt=1000,
        can_edit=True,
        edit_formats=("png",),
    ),
    "dall-e-3": _Model(
        "dall-e-3",
        sizes=("1024x1024", "1792x1024", "1024x1792"),
        qualities=("standard", "hd"),
        max_n=1,
        max_prompt=4000,
        can_edit=False,
        edit_formats=(),
    ),
    "gpt-image-1": _GPT_IMAGE_1,
    "gpt-image-1-mini": _GPT_IMAGE_1,
}


def _model(name: str) -> _Model:
    known = _MODELS.get(name)
    if known is not None:
        return known
    if name.startswith("gpt-image"):  # a newer GPT image model: its options, its own sizes
        return _Model("gpt-image", None, None, 10, None, True, ("png", "jpeg", "webp"))
    return _Model("other", None, None, 10, None, True, ("png", "jpeg", "webp"))


def _choice(name: str, value: str | None, allowed: Sequence[str] | None, model: str) -> None:
    if value is not None and allowed is not None and value not in allowed:
        raise ConfigurationError(
            f"{name}={value!r} is not accepted by {model}; pick one of {', '.join(allowed)}"
        )


class _OpenAIImages(RemoteTool, abstract=True):
    # a Tool itself, so that [OpenAIImagesTool(), OpenAIImageEditTool()] type-checks as tools
    service: ClassVar[str] = "the OpenAI Images API"
    default_base_url: ClassVar[str | None] = "https://api.openai.com/v1"
    api_key_env: ClassVar[tuple[str, ...]] = ("OPENAI_API_KEY",)
    max_images_per_call: ClassVar[int] = 10
    _what: ClassVar[str] = "caption"

    def __init__(
        self,
        base_url: str | None = None,
        *,
        model: str = "gpt-image-1",
        size: str | None = None,
        quality: str | None = None,
        style: Literal["vivid", "natural"] | None = None,
        background: Literal["transparent", "opaque", "auto"] | None = None,
        output_format: Literal["png", "jpeg", "webp"] | None = None,
        output_compression: int | None = None,
        moderation: Literal["auto", "low"] | None = None,
        response_format: Literal["b64_json", "url"] | None = None,
        user: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **http: Any,
    ) -> None:
        super().__init__(base_url, **http)
        if not isinstance(model, str) or not model.strip():
            raise ConfigurationError("model must be a model name, such as 'gpt-image-1'")
        self.model = model.strip()
        spec = self.spec = _model(self.model)
        if size is not None and not (size == "auto" or _SIZE.match(size)):
            raise ConfigurationError(f"size must be 'WIDTHxHEIGHT' or 'auto', got {size!r}")
        _choice("size", size, spec.sizes, self.model)
        _choice("quality", quality, spec.qualities, self.model)
        options: dict[str, Any] = {
            "style": style,
            "background": background,
            "output_format": output_format,
            "output_compression": output_compression,
            "moderation": moderation,
        }
        for key, values in _OPTION_VALUES.items():
            _choice(key, options[key], values, self.model)
        if spec.family != "other":
            allowed = {"dall-e-3": ("style",), "gpt-image": _GPT_IMAGE_OPTIONS}.get(spec.family, ())
            for key, value in options.items():
                if value is not None and key not in allowed:
                    takers = "dall-e-3" if key == "style" else "the gpt-image models"
                    raise ConfigurationError(
                        f"{key}= is an option of {takers}, not of {self.model}; leave it unset"
                    )
        if output_compression is not None and not 0 <= output_compression <= 100:
            raise ConfigurationError(
                f"output_compression is a percentage (0-100), got {output_compression}"
            )
        if spec.family == "gpt-image":
            if response_format is not None:
                raise ConfigurationError(
                    f"{self.model} always answers with base64 images and takes no "
                    "response_format; leave it unset"
                )
        elif response_format is None:
            response_format = "b64_json"  # no second request, and no URL that expires
        if response_format not in (None, "b64_json", "url"):
            raise ConfigurationError(
                f"response_format must be 'b64_json' or 'url', got {response_format!r}"
            )
        self.size = size
        self.quality = quality
        self.response_format = response_format
        self.user = user
        self.options = {k: v for k, v in options.items() if v is not None}
        self.extra_body = dict(extra_body or {})
        # dall-e-3 makes one image per request: the agent then sends one request per candidate
        vars(self)["max_images_per_call"] = spec.max_n

    # ------------------------------------------------------------------ contract

    def setup(self) -> None:
        """Check that OpenAI itself gets an API key (other servers may need none).

        Raises:
            ToolUnavailable: If the base URL is OpenAI's and no key is configured.
        """
        host = urlsplit(self.http.base_url).hostname or ""
        if not self.http.has_key and (host == "openai.com" or host.endswith(".openai.com")):
            raise ToolUnavailable(
                f"{type(self).__name__} needs an OpenAI API key: set OPENAI_API_KEY or pass "
                "api_key=..."
            )

    def describe(self) -> dict[str, Any]:
        """Settings for trajectory metadata (never the API key)."""
        return {
            **super().describe(),
            "model": self.model,
            "size": self.size,
            "quality": self.quality,
            "response_format": self.response_format,
            "options": dict(self.options),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.http.base_url!r})"

    # ------------------------------------------------------------------ requests

    def _size(self, settings: Mapping[str, Any]) -> str | None:
        """The call's size: ``ctx.settings`` width and height, else the tool's ``size``."""
        width, height = settings.get("width"), settings.get("height")
        if width is None and height is None:
            return self.size
        if not (isinstance(width, int) and isinstance(height, int)) or width < 1 or height < 1:
            raise ConfigurationError(
                f"{self.model} needs both a width and a height (positive integers) to choose a "
                f"size, got width={width!r}, height={height!r}"
            )
        size = f"{width}x{height}"
        if self.spec.sizes is not None and size not in self.spec.sizes:
            fixed = [s for s in self.spec.sizes if s != "auto"]
            raise ConfigurationError(
                f"{self.model} cannot make {width}x{height} images; ask for one of "
                f"{', '.join(fixed)}"
            )
        return size

    def _fields(self, prompt: str, n: int, size: str | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": self.model, "prompt": prompt, "n": n}
        if size is not None:
            fields["size"] = size
        if self.quality is not None:
            fields["quality"] = self.quality
        if self.response_format is not None:
            fields["response_format"] = self.response_format
        fields.update(self.options)
        if self.user is not None:
            fields["user"] = self.user
        fields.update(self.extra_body)
        return fields

    async def _run(
        self, prompt: str, ctx: ToolContext, image: tuple[str, bytes, str] | None
    ) -> ToolResult:
        limit = self.spec.max_prompt
        if limit is not None and len(prompt) > limit:
            raise ToolArgumentError(
                f"the {self._what} is {len(prompt):,} characters; {self.model} accepts at most "
                f"{limit:,}",
                hint=f"Write a shorter {self._what}.",
            )
        size = self._size(ctx.settings)
        total = max(1, ctx.num_images)
        counts = [min(self.spec.max_n, total - i) for i in range(0, total, self.spec.max_n)]
        start = time.perf_counter()
        parts = await gather_or_cancel([self._post(prompt, n, size, image) for n in counts])
        images = [data for part in parts for data in part[0]]
        revised = [text for part in parts for text in part[1]]
        body = parts[0][2]
        reported = body.get("size")  # gpt-image models report the size of an "auto" request
        metadata: dict[str, Any] = {
            "model": self.model,
            "server": self.http.base_url,
            "size": reported if size in (None, "auto") and isinstance(reported, str) else size,
            "request_s": round(time.perf_counter() - start, 4),
        }
        for key in ("quality", "style", "background", "output_format"):
            value = body.get(key)  # gpt-image models report what they used
            if not isinstance(value, str):
                value = self.quality if key == "quality" else self.options.get(key)
            if value is not None:
                metadata[key] = value
        if any(text is not None for text in revised):
            metadata["revised_prompt"] = next(t for t in revised if t is not None)
            if len(revised) > 1:
                metadata["revised_prompts"] = revised
        usage = [part[2].get("usage") for part in parts if isinstance(part[2].get("usage"), dict)]
        if usage:
            metadata["usage"] = usage[0] if len(usage) == 1 else usage
        if isinstance(body.get("created"), int):
            metadata["created"] = body["created"]
        return ToolResult(images=list(images), seeds=[None] * len(images), metadata=metadata)

    async def _post(
        self, prompt: str, n: int, size: str | None, image: tuple[str, bytes, str] | None
    ) -> tuple[list[bytes], list[str | None], dict[str, Any]]:
        """One request of ``n`` images: (images, revised prompts, the response body)."""
        fields = self._fields(prompt, n, size)
        try:
            if image is None:
                data = await self.http.json(
                    "POST", "/images/generations", json=fields, idempotent=False
                )
            else:
                form = {k: _form_value(v) for k, v in fields.items() if v is not None}
                data = await self.http.json(
                    "POST", "/images/edits", data=form, files={"image": image}, idempotent=False
                )
        except HTTPResponseError as exc:
            raise self._error(exc) from None
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list) or not items:
            shown = "an empty 'data' list" if isinstance(items, list) else "no 'data' list"
            raise ToolExecutionError(
                f"{self.service} answered with {shown}, so no image came back",
                hint="Try the call again.",
            )
        if len(items) > n:
            items = items[:n]
        images = await gather_or_cancel(
            [self._image(item, i + 1, len(items)) for i, item in enumerate(items)]
        )
        revised = [
            item.get("revised_prompt")
            if isinstance(item, dict) and isinstance(item.get("revised_prompt"), str)
            else None
            for item in items
        ]
        return list(images), revised, data

    async def _image(self, item: Any, number: int, count: int) -> bytes:
        what = "generated image" if count == 1 else f"generated image #{number}"
        if not isinstance(item, dict):
            raise ToolExecutionError(
                f"{self.service} returned {what} as {type(item).__name__}, not an object",
                hint="Try the call again.",
            )
        if item.get("b64_json") is not None:
            return await asyncio.to_thread(self.image_from_base64, item["b64_json"], what=what)
        if item.get("url") is not None:
            return await self.image_from_url(item["url"], what=what)
        raise ToolExecutionError(
            f"{self.service} returned {what} with neither 'b64_json' nor 'url'",
            hint="Try the call again.",
        )

    def _error(self, exc: HTTPResponseError) -> GenAgentError:
        """The typed error of a response the API refused (``exc`` itself when none fits)."""
        body: dict[str, Any] = exc.data if isinstance(exc.data, dict) else {}
        nested = body.get("error")
        error: dict[str, Any] = nested if isinstance(nested, dict) else body
        code = str(error.get("code") or "")
        inner = error.get("inner_error") or error.get("innererror")
        inner_code = str(inner.get("code") or "") if isinstance(inner, dict) else ""
        raw = error.get("message")
        message = self.http.redact(excerpt(raw if isinstance(raw, str) and raw else exc.text, 300))
        if exc.status != 400:
            return exc
        if code in _REFUSAL_CODES or inner_code in _AZURE_REFUSAL_CODES:
            details = error.get("moderation_details")
            categories = details.get("categories") if isinstance(details, dict) else None
            why = (
                f" (flagged: {', '.join(str(c) for c in categories)})"
                if isinstance(categories, list) and categories
                else ""
            )
            return ToolRefused(
                f"{self.service} refused the request{why}: {message}",
                hint=f"Rephrase the {self._what} to avoid what its safety system blocks.",
            )
        param = str(error.get("param") or "")
        if param == "prompt" or code == "string_above_max_length":
            return ToolArgumentError(
                f"{self.service} rejected the {self._what}: {message}",
                hint=f"Write a different, shorter {self._what}.",
            )
        if param in ("image", "image[]", "mask") or code.startswith("invalid_image"):
            return ToolExecutionError(
                f"{self.service} rejected the image to edit: {message}",
                hint="Generate a new image first, then edit that one.",
            )
        return ToolUnavailable(
            f"{self.service} rejected the request (HTTP 400{f', {code}' if code else ''}"
            f"{f', param {param}' if param else ''}): {message}. Check the tool's settings "
            f"(model={self.model!r}, size, quality, ...) against what the model accepts"
        )


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class OpenAIImagesTool(_OpenAIImages, GenerationTool):
    """Generate with the OpenAI Images API (``POST /images/generations``) or a copy of it.

    Candidates go in one request (``n``) up to the model's limit: ``dall-e-3`` makes one image
    per request, so the agent sends one request per candidate. ``gpt-image`` models always answer
    with base64 images; ``dall-e`` models are asked for base64 too (``response_format=
    "b64_json"``) unless ``response_format="url"``, whose URLs are then downloaded (the API key
    is never sent to another host). The ``revised_prompt`` of ``dall-e-3`` is recorded in the
    call's metadata. A moderation refusal (``content_policy_violation``, ``moderation_blocked``)
    reaches the model as a ``ToolRefused`` it can answer with a new caption.

    The API has no seed: images are not reproducible, and the recorded seeds are ``None``.

    Args:
        base_url: The API (default ``https://api.openai.com/v1``; any server copying the API).
        model: ``"gpt-image-1"`` (default), ``"gpt-image-1-mini"``, ``"dall-e-3"``,
            ``"dall-e-2"``, or the model name of a compatible server (not checked here).
        size: ``"WIDTHxHEIGHT"`` or ``"auto"``, checked against the model's sizes (dall-e-2:
            256x256, 512x512, 1024x1024; dall-e-3: 1024x1024, 1792x1024, 1024x1792;
            gpt-image-1: auto, 1024x1024, 1536x1024, 1024x1536). ``width`` and ``height`` in
            ``ToolContext.settings`` (``genagent serve``) override it per call.
        quality: dall-e-3: ``"standard"`` or ``"hd"``; gpt-image-1: ``"auto"``, ``"low"``,
            ``"medium"`` or ``"high"``.
        style: dall-e-3 only: ``"vivid"`` or ``"natural"``.
        background: gpt-image only: ``"transparent"``, ``"opaque"`` or ``"auto"``.
        output_format: gpt-image only: ``"png"``, ``"jpeg"`` or ``"webp"``.
        output_compression: gpt-image only, jpeg/webp: 0-100.
        moderation: gpt-image only: ``"auto"`` or ``"low"``.
        response_format: dall-e and compatible servers: ``"b64_json"`` (default) or ``"url"``.
        user: An end-user id sent as ``user`` (OpenAI's abuse monitoring).
        extra_body: Further fields merged into every request.
        **http: :class:`~genagent.tools.http.RemoteTool` settings (``api_key``, ``timeout_s``,
            ``max_retries``, ``max_in_flight``, ``max_image_bytes``, ``transport``, ...). The
            key defaults to ``OPENAI_API_KEY`` and is sent only to the API's host.

    Raises:
        ConfigurationError: For a size, quality or option the model does not accept.

    Example:
        ```py
        from genagent import Agent
        from genagent.tools.http.openai_images import OpenAIImagesTool

        tool = OpenAIImagesTool(model="gpt-image-1", size="1024x1024", quality="medium")
        agent = Agent(tool=tool, policy=my_policy)
        ```
    """

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Ask the API for ``ctx.num_images`` images of ``args.caption``."""
        return await self._run(args.caption, ctx, None)


class OpenAIImageEditTool(_OpenAIImages, EditTool):
    """Edit the current image with the OpenAI Images API (``POST /images/edits``).

    The image goes as a ``multipart/form-data`` file with the instruction as ``prompt``.
    ``gpt-image-1`` (default) edits any image by instruction; ``dall-e-2`` needs a square PNG
    with transparent areas to paint (images in other formats are converted to PNG);
    ``dall-e-3`` cannot edit. Results, refusals and seeds (``None``) are as for
    :class:`OpenAIImagesTool`, whose arguments it takes, plus:

    Args:
        base_url: The API (default ``https://api.openai.com/v1``).
        input_fidelity: gpt-image-1 only: ``"high"`` keeps faces and details of the input
            closer; ``"low"`` (the API's default) is cheaper.
        **kwargs: The arguments of :class:`OpenAIImagesTool`.

    Raises:
        ConfigurationError: For ``dall-e-3``, or an option the model does not accept.
    """

    _what: ClassVar[str] = "instruction"

    def __init__(
        self,
        base_url: str | None = None,
        *,
        input_fidelity: Literal["high", "low"] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, **kwargs)
        if not self.spec.can_edit:
            raise ConfigurationError(
                f"{self.model} cannot edit images; use model='gpt-image-1' (or 'dall-e-2')"
            )
        if input_fidelity is not None:
            if self.spec.family not in ("gpt-image", "other"):
                raise ConfigurationError(
                    f"input_fidelity= is an option of the gpt-image models, not of {self.model}"
                )
            if input_fidelity not in ("high", "low"):
                raise ConfigurationError(
                    f"input_fidelity must be 'high' or 'low', got {input_fidelity!r}"
                )
            self.options["input_fidelity"] = input_fidelity

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Ask the API to edit ``ctx.current_image`` by ``args.instruction``."""
        ref = ctx.current_image
        if ref is None:
            raise ToolRefused("there is no image to edit yet", hint="Generate an image first.")
        if ref.format in self.spec.edit_formats:
            data = await asyncio.to_thread(ref.read_bytes)
            image = (f"image.{'jpg' if ref.format == 'jpeg' else ref.format}", data, ref.mime_type)
        else:
            from genagent.images import encode_png

            data = await asyncio.to_thread(lambda: encode_png(ref.open()))
            image = ("image.png", data, "image/png")
        return await self._run(args.instruction, ctx, image)
