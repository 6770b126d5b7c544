"""``GenAgentServerTool``: a generator behind the GenAgent ``POST /generate/`` protocol.

The GenAgent authors served their generator as a bare ``POST /generate/`` endpoint: a JSON body
with the prompts, size, steps, guidance and seed, answered with base64 PNGs. ``genagent serve``
speaks the same protocol, so ``genagent serve --tool flux`` on a GPU box and
``GenAgentServerTool("http://gpu-box:8000")`` everywhere else share one generator.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

from genagent.errors import (
    ModelVisibleError,
    ToolArgumentError,
    ToolExecutionError,
    ToolRefused,
)
from genagent.tools._base import EditTool, GenerationTool, ToolContext, ToolResult
from genagent.tools.http._base import HTTPResponseError, RemoteTool

__all__ = ["GenAgentServerEditTool", "GenAgentServerTool"]

_VISIBLE: dict[str, type[ModelVisibleError]] = {
    "ToolRefused": ToolRefused,
    "ToolArgumentError": ToolArgumentError,
    "ToolExecutionError": ToolExecutionError,
}


class _GenAgentServer(RemoteTool, abstract=True):
    service: ClassVar[str] = "the GenAgent server"
    default_base_url: ClassVar[str | None] = "http://127.0.0.1:8000"
    api_key_env: ClassVar[tuple[str, ...]] = ("GENAGENT_SERVER_API_KEY",)
    max_images_per_call: ClassVar[int] = 8

    def __init__(
        self,
        base_url: str | None = None,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        path: str = "/generate/",
        extra_body: Mapping[str, Any] | None = None,
        **http: Any,
    ) -> None:
        # a busy server holds a request for up to its request timeout (600 s by default), so
        # wait longer than that rather than give up on an image that is being made
        http.setdefault("timeout_s", 630.0)
        super().__init__(base_url, **http)
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
        self.path = path
        self.extra_body = dict(extra_body or {})

    async def _request(self, prompt: str, ctx: ToolContext, image: bytes | None) -> ToolResult:
        settings = {**self.settings, **ctx.settings}
        body: dict[str, Any] = {
            "prompt": [prompt],
            "num_images_per_prompt": ctx.num_images,
            "seed": list(ctx.seeds[: ctx.num_images]),
        }
        for ours, theirs in (
            ("width", "width"),
            ("height", "height"),
            ("steps", "num_inference_steps"),
            ("guidance", "guidance_scale"),
            ("negative_prompt", "negative_prompt"),
        ):
            if settings.get(ours) is not None:
                body[theirs] = settings[ours]
        if image is not None:
            import base64

            body["image"] = base64.b64encode(image).decode()
        body.update(self.extra_body)
        start = time.perf_counter()
        try:
            data = await self.http.json("POST", self.path, json=body, idempotent=False)
        except HTTPResponseError as exc:
            error = exc.data.get("error") if isinstance(exc.data, dict) else None
            if isinstance(error, dict) and error.get("type") in _VISIBLE:
                visible = _VISIBLE[str(error["type"])]
                raise visible(str(error.get("message") or exc.text)) from None
            raise
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list) or not 1 <= len(images) <= ctx.num_images:
            got = len(images) if isinstance(images, list) else "no"
            raise ToolExecutionError(
                f"{self.service} answered with {got} images for {ctx.num_images} asked",
                hint="Try the call again.",
            )
        decoded = [self.image_from_base64(item) for item in images]
        seeds = data.get("seeds")
        if not (isinstance(seeds, list) and len(seeds) == len(decoded)):
            seeds = list(ctx.seeds[: len(decoded)])
        text = data.get("text")
        return ToolResult(
            images=list(decoded),
            text=text if isinstance(text, str) and text.strip() else None,
            seeds=[s if isinstance(s, int) and not isinstance(s, bool) else None for s in seeds],
            metadata={
                "server": self.http.base_url,
                "served_by": data.get("tool") if isinstance(data.get("tool"), str) else None,
                "request_s": round(time.perf_counter() - start, 4),
                **{k: v for k, v in settings.items() if k != "negative_prompt"},
            },
        )

    async def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` (status, tool, queue)."""
        response = await self.http.request("GET", "/health", ok_statuses=frozenset({503}))
        data: dict[str, Any] = response.json()
        return data

    def describe(self) -> dict[str, Any]:
        """Settings for trajectory metadata."""
        return {**super().describe(), "settings": dict(self.settings)}


class GenAgentServerTool(_GenAgentServer, GenerationTool):
    """Generate with a server speaking the GenAgent ``POST /generate/`` protocol.

    ``genagent serve`` is such a server; so are the GenAgent authors' generator servers.
    Candidates (``ctx.num_images``) go in one request, each with its seed. Refusals the server
    reports (``ToolRefused``) reach the model as refusals.

    Args:
        base_url: The server (default ``http://127.0.0.1:8000``).
        width: Image width sent with every request (default: the server's).
        height: Image height.
        steps: ``num_inference_steps``.
        guidance: ``guidance_scale``.
        negative_prompt: A negative prompt, for servers whose model uses one.
        path: The endpoint path.
        extra_body: Further fields merged into every request.
        **http: :class:`~genagent.tools.http.RemoteTool` settings (``api_key``, ``timeout_s``,
            ``max_retries``, ``max_in_flight``, ``transport``, ...). ``timeout_s`` defaults to
            630 s here, beyond ``genagent serve``'s 600 s request timeout: a request waits in
            the server's queue rather than being abandoned and sent again.

    A server that makes fewer images than asked (one of a batch failed) still answers; its
    ``text`` says so and reaches the model.

    Example:
        ```py
        from genagent import Agent
        from genagent.tools import GenAgentServerTool

        agent = Agent(tool=GenAgentServerTool("http://gpu-box:8000"), policy=my_policy)
        ```
    """

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Ask the server for ``ctx.num_images`` images of ``args.caption``."""
        return await self._request(args.caption, ctx, None)


class GenAgentServerEditTool(_GenAgentServer, EditTool):
    """Edit with a server speaking the GenAgent protocol (``genagent serve`` of an edit tool).

    The current image goes as base64 in the request's ``image`` field. Takes the arguments of
    :class:`GenAgentServerTool`.
    """

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Ask the server to edit ``ctx.current_image`` by ``args.instruction``."""
        if ctx.current_image is None:
            raise ToolRefused("there is no image to edit yet", hint="Generate an image first.")
        import asyncio

        image = await asyncio.to_thread(ctx.current_image.read_bytes)
        return await self._request(args.instruction, ctx, image)
