"""``ReplicateTool`` and ``ReplicateEditTool``: models hosted on Replicate's predictions API.

A call creates a prediction (``POST /v1/models/{owner}/{name}/predictions`` for an official
model, ``POST /v1/predictions`` with a ``version`` for any other) in sync mode (``Prefer:
wait=N``): a fast model answers in that one request. A prediction still ``starting`` or
``processing`` when the wait ends is polled until it is ``succeeded``, ``failed``, ``canceled``
or ``aborted``; a call abandoned meanwhile (a spent budget, a cancelled run, a poll timeout)
cancels its prediction so that it stops costing money. Outputs are image URLs on Replicate's
delivery host, fetched without the API token.

Models name their inputs differently. The tools know the FLUX models of Black Forest Labs
(``flux-dev``, ``flux-schnell``, ``flux-kontext-*``); for any other model they send the common
names (``prompt``, ``seed``, ``width``, ``height``, ``num_inference_steps``, ...), which
``inputs=`` renames and ``input_extra=`` completes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeGuard, TypeVar

from genagent._async import gather_or_cancel
from genagent._http import excerpt
from genagent.errors import (
    ConfigurationError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tools._base import EditTool, GenerationTool, ToolContext, ToolResult
from genagent.tools.http._base import HTTPResponseError, RemoteTool

__all__ = ["ReplicateEditTool", "ReplicateTool"]

logger = logging.getLogger("genagent.tools.replicate")

T = TypeVar("T")

_FINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_MODEL = re.compile(
    r"^(?P<owner>[a-z0-9][a-z0-9_.-]*)/(?P<name>[a-z0-9][a-z0-9_.-]*)"
    r"(?::(?P<version>[0-9a-f]{16,128}))?$",
    re.I,
)
_NSFW_LOG = re.compile(r"nsfw", re.I)  # what the safety checkers print when they drop images
_SECRET_INPUT = re.compile(r"token|key|secret|password|credential", re.I)
DEFAULT_REFUSAL_PATTERN = (
    r"nsfw|safety (?:checker|filter|system)|flagged as sensitive|sensitive content"
    r"|content (?:policy|moderation|filter)|moderat(?:ed|ion)|\(E005\)"
)
"""Errors of a failed prediction that mean a safety filter blocked it (case-insensitive)."""

_SETTINGS = ("width", "height", "steps", "guidance", "negative_prompt")
_FLUX_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")


@dataclass(frozen=True)
class _Model:
    """How one Replicate model names its inputs.

    ``inputs`` maps our names (``prompt``, ``seed``, ``width``, ``height``, ``steps``,
    ``guidance``, ``negative_prompt``, ``image``, ``num_outputs``, ``aspect_ratio``) to the
    model's, ``None`` where it has no such input.
    """

    inputs: Mapping[str, str | None]
    aspect_ratios: tuple[str, ...] = ()  # width/height go as the nearest of these
    max_outputs: int = 1  # images one prediction can return (num_outputs)
    defaults: Mapping[str, Any] = field(default_factory=dict)


_GENERIC = _Model(
    inputs={
        "prompt": "prompt",
        "seed": "seed",
        "width": "width",
        "height": "height",
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "negative_prompt": "negative_prompt",
        "image": "image",
        "num_outputs": None,
        "aspect_ratio": None,
    }
)
_FLUX_INPUTS: dict[str, str | None] = {
    "prompt": "prompt",
    "seed": "seed",
    "width": None,
    "height": None,
    "steps": "num_inference_steps",
    "guidance": "guidance",
    "negative_prompt": None,
    "image": "image",
    "num_outputs": "num_outputs",
    "aspect_ratio": "aspect_ratio",
}
_KONTEXT_INPUTS: dict[str, str | None] = {
    **_FLUX_INPUTS,
    "steps": None,
    "guidance": None,
    "image": "input_image",
    "num_outputs": None,
}
_MODELS: dict[str, _Model] = {
    "black-forest-labs/flux-dev": _Model(_FLUX_INPUTS, _FLUX_RATIOS, 4, {"output_format": "png"}),
    "black-forest-labs/flux-schnell": _Model(
        {**_FLUX_INPUTS, "guidance": None}, _FLUX_RATIOS, 4, {"output_format": "png"}
    ),
    "black-forest-labs/flux-kontext-pro": _Model(
        _KONTEXT_INPUTS, ("match_input_image", *_FLUX_RATIOS), 1, {"output_format": "png"}
    ),
    "black-forest-labs/flux-kontext-max": _Model(
        _KONTEXT_INPUTS, ("match_input_image", *_FLUX_RATIOS), 1, {"output_format": "png"}
    ),
    "black-forest-labs/flux-kontext-dev": _Model(
        {**_KONTEXT_INPUTS, "steps": "num_inference_steps", "guidance": "guidance"},
        ("match_input_image", *_FLUX_RATIOS),
        1,
        {"output_format": "png"},
    ),
}


@dataclass
class _Outcome:
    """One finished prediction: its images (in order) and what to record about it."""

    images: list[bytes]
    seeds: list[int | None]
    asked: int
    withheld_by_filter: bool
    record: dict[str, Any]


class _Replicate(RemoteTool, abstract=True):
    service: ClassVar[str] = "Replicate"
    default_base_url: ClassVar[str | None] = "https://api.replicate.com/v1"
    api_key_env: ClassVar[tuple[str, ...]] = ("REPLICATE_API_TOKEN",)
    default_model: ClassVar[str]

    def __init__(
        self,
        model: str | None = None,
        *,
        version: str | None = None,
        base_url: str | None = None,
        width: int | None = None,
        height: int | None = None,
        aspect_ratio: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        output_format: str | None = None,
        inputs: Mapping[str, str | None] | None = None,
        input_extra: Mapping[str, Any] | None = None,
        max_outputs: int | None = None,
        aspect_ratios: Sequence[str] | None = None,
        wait_s: int | None = 60,
        cancel_after: str | None = None,
        refusal_pattern: str | re.Pattern[str] = DEFAULT_REFUSAL_PATTERN,
        upload_over_bytes: int | None = 1_000_000,
        **http: Any,
    ) -> None:
        super().__init__(base_url, **http)
        model = model or self.default_model
        match = _MODEL.match(model.strip())
        if match is None:
            raise ConfigurationError(
                f"model must be 'owner/name' or 'owner/name:version' as on replicate.com, got "
                f"{model!r}"
            )
        self.model = f"{match['owner']}/{match['name']}"
        self.version = version or match["version"]
        if self.version is not None and not re.fullmatch(r"[0-9a-fA-F]{16,128}", self.version):
            raise ConfigurationError(
                f"version must be the hexadecimal id of a model version, got {self.version!r}"
            )
        known = _MODELS.get(self.model.lower(), _GENERIC)
        unknown_names = sorted(set(inputs or {}) - set(_GENERIC.inputs))
        if unknown_names:
            raise ConfigurationError(
                f"inputs= renames {unknown_names}, which are not settings; rename any of "
                f"{sorted(_GENERIC.inputs)}"
            )
        self.inputs: dict[str, str | None] = {**known.inputs, **dict(inputs or {})}
        self.aspect_ratios = tuple(
            aspect_ratios if aspect_ratios is not None else known.aspect_ratios
        )
        self.max_outputs = max_outputs if max_outputs is not None else known.max_outputs
        if not isinstance(self.max_outputs, int) or self.max_outputs < 1:
            raise ConfigurationError(f"max_outputs must be a positive int, got {max_outputs!r}")
        if self.max_outputs > 1 and not self.inputs.get("num_outputs"):
            raise ConfigurationError(
                "max_outputs > 1 needs the model's input for the number of images: pass "
                "inputs={'num_outputs': '<its name>'}"
            )
        if isinstance(self, EditTool) and not self.inputs.get("image"):
            raise ConfigurationError(
                f"an editing tool sends the image to edit: name {self.model}'s image input with "
                "inputs={'image': '<its name>'}"
            )
        if wait_s is not None and not (isinstance(wait_s, int) and 1 <= wait_s <= 60):
            raise ConfigurationError(
                f"wait_s must be a whole number of seconds from 1 to 60 (Replicate's limit) or "
                f"None for no sync mode, got {wait_s!r}"
            )
        self.wait_s = wait_s
        self.cancel_after = cancel_after
        self.refusal = (
            re.compile(refusal_pattern, re.I)
            if isinstance(refusal_pattern, str)
            else refusal_pattern
        )
        self.upload_over_bytes = upload_over_bytes
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
        self._check_settings(self.settings, aspect_ratio)
        self.aspect_ratio = aspect_ratio
        self.input_extra: dict[str, Any] = {**known.defaults, **dict(input_extra or {})}
        if output_format is not None:
            self.input_extra["output_format"] = output_format
        owned = {self.inputs.get(k) for k in ("prompt", "seed", "image", "num_outputs")}
        reserved = sorted(
            str(name) for name in owned if name is not None and name in self.input_extra
        )
        if reserved:
            raise ConfigurationError(
                f"input_extra may not set {', '.join(reserved)}: the tool sets them on every call"
            )

    # ------------------------------------------------------------------ inputs

    def _check_settings(self, settings: Mapping[str, Any], aspect_ratio: str | None) -> None:
        by_ratio = bool(self.aspect_ratios) and bool(self.inputs.get("aspect_ratio"))
        for name in ("width", "height"):
            value = settings.get(name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 8
            ):
                raise ConfigurationError(f"{name} must be an int of pixels >= 8, got {value!r}")
        for name in settings:
            if name in ("width", "height") and by_ratio:
                continue
            if self.inputs.get(name) is None:
                raise ConfigurationError(
                    f"{self.model} takes no {name}; remove it, or name the model's input with "
                    f"inputs={{{name!r}: '<its name>'}}"
                )
        if by_ratio and ("width" in settings) != ("height" in settings):
            raise ConfigurationError(
                f"{self.model} takes an aspect ratio, not a size: give both width and height "
                "(sent as the nearest ratio), or aspect_ratio=..."
            )
        if aspect_ratio is not None:
            if "width" in settings or "height" in settings:
                raise ConfigurationError("pass either aspect_ratio or width and height, not both")
            if not self.inputs.get("aspect_ratio"):
                raise ConfigurationError(
                    f"{self.model} takes no aspect ratio; pass width and height instead"
                )
            if self.aspect_ratios and aspect_ratio not in self.aspect_ratios:
                raise ConfigurationError(
                    f"aspect_ratio must be one of {list(self.aspect_ratios)}, got {aspect_ratio!r}"
                )

    def _input(self, prompt: str, settings: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The model's input for ``prompt`` (without seed and image) and the settings ignored."""
        names = self.inputs
        body: dict[str, Any] = {}
        ignored: list[str] = []
        prompt_name = names.get("prompt") or "prompt"
        body[prompt_name] = prompt
        by_ratio = bool(self.aspect_ratios) and bool(names.get("aspect_ratio"))
        width, height = settings.get("width"), settings.get("height")
        if by_ratio and _positive(width) and _positive(height):  # a size asked for this call
            body[str(names["aspect_ratio"])] = _nearest_ratio(width, height, self.aspect_ratios)
        elif self.aspect_ratio is not None and names.get("aspect_ratio"):
            body[str(names["aspect_ratio"])] = self.aspect_ratio
        for name in _SETTINGS:
            value = settings.get(name)
            if value is None:
                continue
            if name in ("width", "height") and by_ratio:
                if not (_positive(width) and _positive(height)):
                    ignored.append(name)
                continue
            theirs = names.get(name)
            if theirs is None:
                ignored.append(name)
            else:
                body[theirs] = value
        body.update(self.input_extra)
        return body, ignored

    async def _image_input(self, image: bytes, mime: str) -> tuple[str, str | None]:
        """The image as the model's input: a data URI, or an uploaded file's URL (and its id)."""
        if self.upload_over_bytes is None or len(image) <= self.upload_over_bytes:
            import base64

            return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}", None
        try:
            data = await self.http.json(
                "POST",
                "files",
                files={"content": ("image" + _suffix(mime), image, mime)},
            )
        except HTTPResponseError as exc:
            raise ToolUnavailable(
                f"Replicate refused the upload of the image to edit: {exc}; raise "
                "upload_over_bytes to send it inline instead"
            ) from None
        urls = data.get("urls") if isinstance(data, dict) else None
        url = urls.get("get") if isinstance(urls, dict) else None
        file_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ToolExecutionError(
                f"Replicate answered the upload of the image with no file URL: "
                f"{excerpt(self.http.redact(str(data)))}",
                hint="Try the call again.",
            )
        return url, file_id if isinstance(file_id, str) and _SAFE_ID.match(file_id) else None

    # ------------------------------------------------------------------ calls

    async def _run(
        self, prompt: str, ctx: ToolContext, image: tuple[bytes, str] | None
    ) -> ToolResult:
        if not self.http.has_key:
            raise ToolUnavailable(
                "Replicate needs an API token: set REPLICATE_API_TOKEN or pass api_key=... "
                "(create one at https://replicate.com/account/api-tokens)"
            )
        start = time.perf_counter()
        settings = {**self.settings, **{k: v for k, v in ctx.settings.items() if k in _SETTINGS}}
        base, ignored = self._input(prompt, settings)
        count = max(1, ctx.num_images)
        seeds: list[int | None] = [
            ctx.seeds[i] if i < len(ctx.seeds) else None for i in range(count)
        ]
        per = self.max_outputs
        groups = [seeds[i : i + per] for i in range(0, count, per)]
        upload: str | None = None
        image_value: str | None = None
        if image is not None:
            image_value, upload = await self._image_input(*image)
        try:
            outcomes = await gather_or_cancel(
                [self._prediction(base, group, image_value, ctx) for group in groups]
            )
        finally:
            if upload is not None:
                await self._best_effort("DELETE", f"files/{upload}", "delete the uploaded image")
        return self._result(outcomes, base, ignored, start)

    async def _prediction(
        self,
        base: Mapping[str, Any],
        seeds: list[int | None],
        image: str | None,
        ctx: ToolContext,
    ) -> _Outcome:
        names = self.inputs
        body_input = dict(base)
        if seeds[0] is not None and names.get("seed"):
            body_input[str(names["seed"])] = seeds[0]
        if self.max_outputs > 1:
            body_input[str(names["num_outputs"])] = len(seeds)
        if image is not None:
            body_input[str(names["image"])] = image
        body: dict[str, Any] = {"input": body_input}
        if self.version is not None:
            path = "predictions"
            body["version"] = self.version
        else:
            path = f"models/{self.model}/predictions"
        headers: dict[str, str] = {}
        timeout_s: float | None = None
        if self.wait_s is not None:
            headers["Prefer"] = f"wait={self.wait_s}"
            read = self.http.timeout.read
            timeout_s = (read or 0.0) + self.wait_s
        if self.cancel_after is not None:
            headers["Cancel-After"] = self.cancel_after
        try:
            # not retried after a read timeout or a 5xx but 503: the prediction may exist
            prediction = await self.http.json(
                "POST",
                path,
                json=body,
                headers=headers,
                timeout_s=timeout_s,
                idempotent=False,
                retry_failed=False,
            )
        except HTTPResponseError as exc:
            raise self._create_error(exc) from None
        prediction = self._checked(prediction, "creating a prediction")
        if prediction["status"] not in _FINAL:
            prediction = await self._wait(prediction, ctx)
        return await self._outcome(prediction, seeds)

    async def _wait(self, prediction: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        """Poll a running prediction; cancel it if the call is abandoned before it ends."""
        ident = _ident(prediction)
        get_path = self._own_url(prediction, "get") or f"predictions/{ident}"
        what = f"prediction {ident}"

        async def fetch() -> dict[str, Any]:
            return self._checked(await self.http.json("GET", get_path), f"polling {what}")

        try:
            result: dict[str, Any] = await self.poll(
                fetch, lambda p: p["status"] in _FINAL, ctx=ctx, what=what
            )
        except BaseException as exc:
            cancel_path = self._own_url(prediction, "cancel") or f"predictions/{ident}/cancel"
            logger.info(
                "cancelling Replicate %s: the call was abandoned (%s)", what, type(exc).__name__
            )
            await self._best_effort("POST", cancel_path, f"cancel {what}")
            raise
        return result

    async def _outcome(self, prediction: dict[str, Any], seeds: list[int | None]) -> _Outcome:
        status = prediction["status"]
        ident = prediction.get("id") if isinstance(prediction.get("id"), str) else "?"
        error = prediction.get("error")
        error_text = self.http.redact(
            error if isinstance(error, str) else "" if error is None else str(error)
        )
        logs = prediction.get("logs") if isinstance(prediction.get("logs"), str) else ""
        if status == "failed":
            if error_text and self.refusal.search(error_text):
                raise ToolRefused(
                    f"Replicate's safety filter blocked the image: {excerpt(error_text, 300)}",
                    hint="Describe the image differently (safety filters react to some "
                    "wordings), or try again.",
                )
            raise ToolExecutionError(
                f"the Replicate prediction {ident} of {self.model} failed: "
                f"{excerpt(error_text, 300) or 'no error message'}",
                hint="Try the call again.",
            )
        if status in ("canceled", "aborted"):
            raise ToolUnavailable(
                f"the Replicate prediction {ident} of {self.model} was {status} before it "
                "finished (a deadline set with cancel_after, or someone cancelled it on "
                "replicate.com)"
            )
        output = prediction.get("output")
        urls: list[Any] = output if isinstance(output, list) else [output] if output else []
        asked = len(seeds)
        filtered = bool(_NSFW_LOG.search(logs)) if logs else False
        if not urls:
            if filtered:
                raise ToolRefused(
                    f"Replicate's safety filter withheld every image of prediction {ident}",
                    hint="Describe the image differently (safety filters react to some "
                    "wordings), or try again.",
                )
            raise ToolExecutionError(
                f"the Replicate prediction {ident} of {self.model} succeeded without an image "
                f"(output: {excerpt(repr(output), 120)})",
                hint="Try the call again.",
            )
        urls = urls[:asked]
        images = await gather_or_cancel(
            [self.image_from_url(u, what=f"image #{i + 1}") for i, u in enumerate(urls)]
        )
        if len(images) == asked:
            # one seed drives the whole batch: only the first image is that seed's alone
            got_seeds: list[int | None] = [seeds[0]] + [None] * (asked - 1)
        else:
            got_seeds = [None] * len(images)  # which ones were withheld is not reported
        metrics = prediction.get("metrics")
        predict_time = metrics.get("predict_time") if isinstance(metrics, dict) else None
        record = {
            "id": ident,
            "seed": seeds[0],
            "images": len(images),
            "predict_time_s": predict_time if isinstance(predict_time, (int, float)) else None,
        }
        return _Outcome(images, got_seeds, asked, filtered, record)

    def _result(
        self,
        outcomes: list[_Outcome],
        base: Mapping[str, Any],
        ignored: list[str],
        start: float,
    ) -> ToolResult:
        images = [img for o in outcomes for img in o.images]
        asked = sum(o.asked for o in outcomes)
        text = None
        if len(images) < asked:
            missing = asked - len(images)
            why = (
                "withheld by Replicate's safety filter"
                if any(o.withheld_by_filter for o in outcomes)
                else "not returned by the model"
            )
            text = f"{missing} of {asked} candidates were {why}."
        metadata: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "predictions": [o.record for o in outcomes],
            # what was sent besides the prompt, seeds and image; never an input that looks
            # like a credential (some models take a Hugging Face token)
            "input": {
                k: v
                for k, v in base.items()
                if k != (self.inputs.get("prompt") or "prompt") and not _SECRET_INPUT.search(k)
            },
            "request_s": round(time.perf_counter() - start, 4),
        }
        if ignored:
            metadata["ignored_settings"] = sorted(set(ignored))
        return ToolResult(
            images=list(images),
            text=text,
            seeds=[s for o in outcomes for s in o.seeds],
            metadata=metadata,
        )

    # ------------------------------------------------------------------ helpers

    def _checked(self, data: Any, doing: str) -> dict[str, Any]:
        status = data.get("status") if isinstance(data, dict) else None
        if not isinstance(status, str):
            raise ToolExecutionError(
                f"Replicate answered {doing} with no prediction status: "
                f"{excerpt(self.http.redact(repr(data)))}",
                hint="Try the call again.",
            )
        if status not in _FINAL and not isinstance(data.get("id"), str):
            raise ToolExecutionError(
                f"Replicate answered {doing} with a running prediction without an id",
                hint="Try the call again.",
            )
        result: dict[str, Any] = data
        return result

    def _own_url(self, prediction: Mapping[str, Any], kind: str) -> str | None:
        """``urls[kind]`` when it is on the API's own host and path (else built from the id)."""
        urls = prediction.get("urls")
        url = urls.get(kind) if isinstance(urls, dict) else None
        if isinstance(url, str) and url.startswith(self.http.base_url + "/"):
            return url
        return None

    def _create_error(self, exc: HTTPResponseError) -> Exception:
        # redacted again (the client redacts error data too): a shown body never holds the key
        detail = self.http.redact(_problem(exc.data)) or excerpt(exc.text, 300)
        if self.refusal.search(detail):
            return ToolRefused(
                f"Replicate refused the request: {detail}",
                hint="Describe the image differently, or try again.",
            )
        if exc.status == 404:
            return ToolUnavailable(
                f"Replicate has no model {self.model!r}"
                + (f" version {self.version!r}" if self.version else "")
                + f" (HTTP 404: {detail}); check model= ('owner/name' of an official model, "
                "or 'owner/name:version')"
            )
        if exc.status == 422:
            return ToolUnavailable(
                f"Replicate rejected the input for {self.model} (HTTP 422): {detail}. Fix the "
                "tool's settings, inputs= or input_extra= to match the model's input schema "
                "(its API tab on replicate.com)"
            )
        if exc.status == 402:
            return ToolUnavailable(
                f"Replicate refused to run {self.model} (HTTP 402: {detail}); check the "
                "account's billing"
            )
        return exc

    async def _best_effort(self, method: str, path: str, what: str) -> None:
        """A request that must not fail the call (cancel, clean-up): bounded, errors logged."""
        try:
            await asyncio.wait_for(self.http.request(method, path, timeout_s=10.0), timeout=15.0)
        except Exception as exc:  # logged, never raised
            logger.warning(
                "could not %s on Replicate: %s",
                what,
                self.http.redact(f"{type(exc).__name__}: {exc}"),
            )

    def describe(self) -> dict[str, Any]:
        """Settings for trajectory metadata (never the token)."""
        return {
            **super().describe(),
            "model": self.model,
            "version": self.version,
            "settings": dict(self.settings),
            "aspect_ratio": self.aspect_ratio,
            "max_outputs": self.max_outputs,
            "wait_s": self.wait_s,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"


class ReplicateTool(_Replicate, GenerationTool):
    """Generate with a text-to-image model on Replicate.

    Candidates (``ctx.num_images``) go in one prediction as ``num_outputs`` with the first seed
    where the model takes it (``flux-dev`` and ``flux-schnell``, up to 4 images), otherwise as
    one prediction per seed, concurrently. A failed prediction whose error is a safety filter's
    (``NSFW content detected``, ``flagged as sensitive``) reaches the model as ``ToolRefused``;
    images a filter withholds from a batch are reported beside the others.

    Args:
        model: ``owner/name`` of an official model (default
            ``black-forest-labs/flux-dev``), or ``owner/name:version`` of any model.
        version: The model version id, for models that are not official.
        base_url: The API (default ``https://api.replicate.com/v1``).
        width: Image width; with ``height``, sent as the nearest aspect ratio to models that
            take one (FLUX).
        height: Image height.
        aspect_ratio: An aspect ratio the model takes (``"16:9"``), instead of a size.
        steps: Denoising steps (``num_inference_steps``).
        guidance: Guidance (``guidance`` for FLUX, ``guidance_scale`` otherwise).
        negative_prompt: A negative prompt, for models that take one.
        output_format: ``"png"`` (default for FLUX), ``"webp"`` or ``"jpg"``.
        inputs: Renames inputs for the model: ours (``prompt``, ``seed``, ``width``,
            ``height``, ``steps``, ``guidance``, ``negative_prompt``, ``image``,
            ``num_outputs``, ``aspect_ratio``) to its own, ``None`` for none.
        input_extra: Further inputs sent on every call (``{"go_fast": False}``).
        max_outputs: Images one prediction may return (default: 4 for FLUX dev/schnell, else
            1).
        aspect_ratios: The ratios the model takes, when it takes a ratio and not a size.
        wait_s: Seconds a create request waits for the result (sync mode, 1-60); ``None``
            polls from the start.
        cancel_after: A deadline after which Replicate cancels the prediction itself
            (``"5m"``; the ``Cancel-After`` header).
        refusal_pattern: A regular expression matching the errors of a safety filter.
        upload_over_bytes: An image to edit larger than this is uploaded (``POST /v1/files``)
            instead of sent as a data URI, and deleted after the call; ``None``: always inline.
        **http: :class:`~genagent.tools.http.RemoteTool` settings (``api_key``, ``timeout_s``,
            ``max_retries``, ``poll_timeout_s``, ``max_image_bytes``, ``transport``, ``sleep``,
            ``clock``, ...).

    Raises:
        ConfigurationError: For a malformed model name, or a setting the model does not take.

    Example:
        ```py
        from genagent import Agent
        from genagent.tools import ReplicateTool

        # REPLICATE_API_TOKEN is read from the environment
        tool = ReplicateTool("black-forest-labs/flux-dev", width=1344, height=768)
        agent = Agent(tool=tool, policy=my_policy, candidates=2)
        ```
    """

    default_model: ClassVar[str] = "black-forest-labs/flux-dev"
    max_images_per_call: ClassVar[int] = 4

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Create predictions for ``ctx.num_images`` images of ``args.caption``."""
        return await self._run(args.caption, ctx, None)


class ReplicateEditTool(_Replicate, EditTool):
    """Edit the current image with an image-editing model on Replicate.

    The default is ``black-forest-labs/flux-kontext-pro``: the instruction goes as ``prompt``
    and the current image as ``input_image`` (a data URI; an image over ``upload_over_bytes``
    is uploaded first). The output keeps the input's aspect ratio unless ``aspect_ratio`` is
    given. Takes the arguments of :class:`ReplicateTool`.

    Example:
        ```py
        from genagent import Agent
        from genagent.tools import ReplicateEditTool, ReplicateTool

        agent = Agent(tools=[ReplicateTool(), ReplicateEditTool()], policy=my_policy)
        ```
    """

    default_model: ClassVar[str] = "black-forest-labs/flux-kontext-pro"
    max_images_per_call: ClassVar[int] = 4

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Edit ``ctx.current_image`` by ``args.instruction``."""
        if ctx.current_image is None:
            raise ToolRefused("there is no image to edit yet", hint="Generate an image first.")
        ref = ctx.current_image
        data = await asyncio.to_thread(ref.read_bytes)
        return await self._run(args.instruction, ctx, (data, ref.mime_type))


# --------------------------------------------------------------------------- helpers


def _positive(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _nearest_ratio(width: float, height: float, ratios: Sequence[str]) -> str:
    """The ratio of ``ratios`` (``"16:9"``) closest to ``width / height`` (on a log scale)."""
    target = math.log(width / height)
    best, distance = ratios[0], math.inf
    for ratio in ratios:
        a, sep, b = ratio.partition(":")
        try:
            value = math.log(float(a) / float(b)) if sep else math.nan
        except (ValueError, ZeroDivisionError):
            continue
        if math.isfinite(value) and abs(value - target) < distance:
            best, distance = ratio, abs(value - target)
    return best


def _ident(prediction: Mapping[str, Any]) -> str:
    ident = prediction.get("id")
    if not isinstance(ident, str) or not _SAFE_ID.match(ident):
        raise ToolExecutionError(
            f"Replicate answered with a prediction id that cannot be polled: {str(ident)[:40]!r}",
            hint="Try the call again.",
        )
    return ident


def _problem(data: Any) -> str:
    """The text of a Replicate error body (``{"title", "detail", ...}``)."""
    if not isinstance(data, dict):
        return ""
    parts = [data.get("title"), data.get("detail")]
    text = " - ".join(str(p).strip() for p in parts if isinstance(p, str) and p.strip())
    return excerpt(text, 300)


def _suffix(mime: str) -> str:
    return {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}.get(mime, "")
