"""``genagent serve``: any tool behind a GenAgent-compatible HTTP endpoint.

One GPU box runs ``genagent serve --tool flux``; every agent, evaluation and training worker
elsewhere uses ``GenAgentServerTool("http://gpu-box:8000")``. The server has:

* ``POST /generate/``: a JSON body ``{"prompt": str | [str, ...], "seed": int | [int, ...],
  "num_images_per_prompt": int, "height": int, "width": int, "num_inference_steps": int,
  "guidance_scale": float, "negative_prompt": str, "image": base64}`` (``image`` for editing
  tools) answered with ``{"images": [base64 PNG, ...], "seeds": [...], "tool": name,
  "elapsed_s": s}``, images in prompt order. Settings the tool can honour (the diffusers
  tools) are applied per request.
* ``GET /health``: ``{"status": "ok" | "loading" | "failed" | "draining", ...}`` (503 unless
  ``ok``).

Requests are validated (422 with the field at fault; 400 for a body that is not JSON; 413 for
one that is too large), queued behind a concurrency limit (429 with ``Retry-After`` when the
queue is full), and bounded in time (504). On shutdown the server stops taking requests (503),
lets those in flight finish for ``grace_s`` seconds, then answers the rest with an explicit
503. Errors are ``{"error": {"type": ..., "message": ...}}``; a refusal the model should see
(``ToolRefused``, ...) keeps its type so that ``GenAgentServerTool`` raises it again.

Needs the ``[serve]`` extra (starlette and uvicorn).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import socket
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from genagent._async import gather_or_cancel
from genagent._version import __version__
from genagent.errors import (
    BudgetExceeded,
    ConfigurationError,
    GenAgentError,
    InvalidImageError,
    ModelVisibleError,
    ToolArgumentError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.images import MemoryImageStore, decode_base64_image
from genagent.tasks import Task
from genagent.tools._base import Tool, ToolContext, ToolResult, coerce_tool_result

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse

__all__ = ["GenerateRequest", "ToolServer", "make_server", "serve"]

logger = logging.getLogger("genagent.server")

_SEED_LIMIT = 2**32
Seed = Annotated[StrictInt, Field(ge=0, lt=_SEED_LIMIT)]


class GenerateRequest(BaseModel):
    """The body of ``POST /generate/``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str | list[str] = Field(description="One caption, or several (a batch).")
    seed: Seed | list[Seed] | None = Field(
        default=None,
        description="One seed in [0, 2**32) (image k gets seed + k), one per image, or none "
        "(random).",
    )
    num_images_per_prompt: int = Field(default=1, ge=1, le=16)
    height: int | None = Field(default=None, ge=16, le=8192)
    width: int | None = Field(default=None, ge=16, le=8192)
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    negative_prompt: str | None = Field(default=None, max_length=10_000)
    image: str | None = Field(default=None, description="The image to edit (base64 or data URI).")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("give at least one prompt")
        for prompt in prompts:
            if not prompt.strip():
                raise ValueError("a prompt is empty")
            if len(prompt) > 20_000:
                raise ValueError("a prompt is over 20,000 characters")
        return [p.strip() for p in prompts]

    @property
    def prompts(self) -> list[str]:
        """The prompts, as a list."""
        return self.prompt if isinstance(self.prompt, list) else [self.prompt]

    def seeds(self) -> list[int]:
        """One seed per image, in order (random when none was given)."""
        total = len(self.prompts) * self.num_images_per_prompt
        if self.seed is None:
            rng = random.SystemRandom()
            return [rng.randrange(_SEED_LIMIT) for _ in range(total)]
        if isinstance(self.seed, int):
            return [(self.seed + i) % _SEED_LIMIT for i in range(total)]
        if len(self.seed) != total:
            raise ValueError(
                f"seed has {len(self.seed)} values for {total} images "
                f"({len(self.prompts)} prompts x {self.num_images_per_prompt})"
            )
        return list(self.seed)

    def settings(self) -> dict[str, Any]:
        """The generation settings to pass to the tool (``ToolContext.settings``)."""
        pairs = {
            "width": self.width,
            "height": self.height,
            "steps": self.num_inference_steps,
            "guidance": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
        }
        return {k: v for k, v in pairs.items() if v is not None}


@dataclass
class _Outcome:
    images: list[str] = dc_field(default_factory=list)
    seeds: list[int | None] = dc_field(default_factory=list)
    text: list[str] = dc_field(default_factory=list)


class _Reject(Exception):
    def __init__(
        self, status: int, kind: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


class ToolServer:
    """Serves one tool over HTTP (see the module docstring for the protocol).

    Args:
        tool: The tool to serve: a generation tool, or an editing tool (requests then carry
            ``image``).
        max_concurrency: Requests run at once; the rest wait in the queue. The diffusers tools
            also batch the requests that run together.
        max_queue: Requests allowed to wait; beyond that, 429 with ``Retry-After``.
        request_timeout_s: Longest a request may take, queue included (then 504).
        grace_s: On shutdown, how long requests in flight may take to finish.
        max_images: Most images one request may ask for.
        max_body_bytes: Largest request body accepted (images to edit are in it).
        api_key: When set, ``/generate/`` requires ``Authorization: Bearer <api_key>`` (401
            otherwise); ``/health`` stays open. ``GenAgentServerTool`` sends it from
            ``GENAGENT_SERVER_API_KEY``.
    """

    def __init__(
        self,
        tool: Tool,
        *,
        max_concurrency: int = 4,
        max_queue: int = 64,
        request_timeout_s: float = 600.0,
        grace_s: float = 30.0,
        max_images: int = 32,
        max_body_bytes: int = 64 * 1024 * 1024,
        api_key: str | None = None,
    ) -> None:
        if not isinstance(tool, Tool):
            raise ConfigurationError(f"serve takes one tool instance, got {type(tool).__name__}")
        if max_concurrency < 1 or max_queue < 0 or request_timeout_s <= 0 or grace_s < 0:
            raise ConfigurationError(
                "max_concurrency must be >= 1, max_queue >= 0, request_timeout_s > 0 and "
                "grace_s >= 0"
            )
        self.tool = tool
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.grace_s = grace_s
        self.max_images = max_images
        self.max_body_bytes = max_body_bytes
        self._api_key = api_key or None
        self.status = "loading"
        self.load_error: str | None = None
        self.in_flight = 0
        self.queued = 0
        self.served = 0
        self.abandoned = 0  # requests whose client disconnected before the answer
        self._slots: asyncio.Semaphore | None = None
        self._draining: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None  # the grace period is over
        self._loader: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ app

    def app(self) -> Starlette:
        """The ASGI application (starlette)."""
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app: Starlette) -> Any:
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._draining = asyncio.Event()
            self._stopped = asyncio.Event()
            self._loader = asyncio.create_task(self._load())
            try:
                yield
            finally:
                self._loader.cancel()

        return Starlette(
            routes=[
                Route("/generate/", self._generate, methods=["POST"]),
                Route("/generate", self._generate, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
            ],
            lifespan=lifespan,
        )

    def begin_shutdown(self) -> None:
        """Stop taking requests; those in flight get ``grace_s`` seconds, then a 503.

        Call it from the server's event loop (``serve`` does, on SIGINT / SIGTERM).
        """
        if self._draining is None or self._draining.is_set():
            return
        self.status = "draining"
        self._draining.set()
        logger.info(
            "shutting down: %d in flight, %d queued; waiting up to %.0f s",
            self.in_flight,
            self.queued,
            self.grace_s,
        )
        loop = asyncio.get_running_loop()
        stopped = self._stopped
        assert stopped is not None
        loop.call_later(self.grace_s, stopped.set)

    async def _load(self) -> None:
        start = time.perf_counter()
        try:
            await self.tool.ensure_setup()
        except Exception as exc:
            self.status = "failed"
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("the tool failed to load: %s", self.load_error)
            return
        self.status = "ok" if self.status == "loading" else self.status
        logger.info("%s ready in %.1f s", self.tool.name, time.perf_counter() - start)

    # ------------------------------------------------------------------ endpoints

    async def _health(self, request: Request) -> JSONResponse:
        from starlette.responses import JSONResponse

        body: dict[str, Any] = {
            "status": self.status,
            "tool": self.tool.name,
            "kind": "edit" if self.tool.requires_image else "generate",
            "in_flight": self.in_flight,
            "queued": self.queued,
            "served": self.served,
            "abandoned": self.abandoned,
            "max_concurrency": self.max_concurrency,
            "genagent": __version__,
        }
        if self.load_error:
            body["error"] = self.load_error
        return JSONResponse(body, status_code=200 if self.status == "ok" else 503)

    async def _generate(self, request: Request) -> JSONResponse:
        from starlette.responses import JSONResponse

        start = time.perf_counter()
        request_id = uuid.uuid4().hex[:12]
        try:
            body = await self._parse(request)
            outcome = await self._unless_client_leaves(
                request, self._admit_and_run(body, request_id), request_id
            )
        except _Reject as reject:
            headers = (
                {"Retry-After": f"{reject.retry_after:.0f}"}
                if reject.retry_after is not None
                else None
            )
            if reject.status >= 500:
                logger.warning("request %s: %s %s", request_id, reject.status, reject.message)
            return JSONResponse(
                {"error": {"type": reject.kind, "message": reject.message}},
                status_code=reject.status,
                headers=headers,
            )
        self.served += 1
        reply: dict[str, Any] = {
            "images": outcome.images,
            "seeds": outcome.seeds,
            "tool": self.tool.name,
            "elapsed_s": round(time.perf_counter() - start, 4),
        }
        if outcome.text:
            reply["text"] = "\n".join(outcome.text)
        return JSONResponse(reply)

    async def _unless_client_leaves(
        self, request: Request, work: Awaitable[_Outcome], request_id: str
    ) -> _Outcome:
        """Run ``work``; when the client disconnects first, cancel it (nobody will read it)."""
        work_task = asyncio.ensure_future(work)
        gone_task = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work_task, gone_task}, return_when=FIRST_COMPLETED)
        finally:
            if not work_task.done() and not gone_task.done():  # we were cancelled
                work_task.cancel()
            gone_task.cancel()
        if work_task not in done:
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
            self.abandoned += 1
            logger.info("request %s: the client disconnected; its work was cancelled", request_id)
            raise _Reject(499, "ClientClosedRequest", "the client disconnected")
        return work_task.result()

    async def _parse(self, request: Request) -> GenerateRequest:
        if self._api_key is not None:
            import hmac

            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self._api_key}".encode()):
                raise _Reject(
                    401, "Unauthorized", "send Authorization: Bearer <the server's API key>"
                )
        if self._draining is not None and self._draining.is_set():
            raise _Reject(503, "ShuttingDown", "the server is shutting down", retry_after=5)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _Reject(413, "PayloadTooLarge", f"the body is over {self.max_body_bytes:,} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # a chunked body has no content-length to check
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _Reject(
                    413, "PayloadTooLarge", f"the body is over {self.max_body_bytes:,} bytes"
                )
            chunks.append(chunk)
        try:
            import json

            data = json.loads(b"".join(chunks))
        except ValueError:
            raise _Reject(400, "InvalidJSON", "the body is not JSON") from None
        except RecursionError:
            raise _Reject(400, "InvalidJSON", "the body's JSON is nested too deeply") from None
        try:
            body = GenerateRequest.model_validate(data)
            body.seeds()  # checks the seed count
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
            )
            raise _Reject(422, "ValidationError", details) from None
        except ValueError as exc:
            raise _Reject(422, "ValidationError", f"seed: {exc}") from None
        total = len(body.prompts) * body.num_images_per_prompt
        if total > self.max_images:
            raise _Reject(
                422,
                "ValidationError",
                f"{total} images asked for; this server allows {self.max_images}",
            )
        if self.tool.requires_image and body.image is None:
            raise _Reject(422, "ValidationError", f"{self.tool.name} edits an image: send `image`")
        if not self.tool.requires_image and body.image is not None:
            raise _Reject(
                422, "ValidationError", f"{self.tool.name} generates; it takes no `image`"
            )
        return body

    async def _admit_and_run(self, body: GenerateRequest, request_id: str) -> _Outcome:
        if self.status == "loading":
            raise _Reject(503, "Loading", "the tool is still loading", retry_after=5)
        if self.status == "failed":
            raise _Reject(503, "ToolUnavailable", f"the tool failed to load: {self.load_error}")
        if self.queued >= self.max_queue and self._slots is not None and self._slots.locked():
            raise _Reject(
                429, "Busy", f"{self.queued} requests are waiting; try again", retry_after=1
            )
        assert self._slots is not None and self._draining is not None and self._stopped is not None
        deadline = time.monotonic() + self.request_timeout_s
        self.queued += 1
        try:
            acquired, _ = await self._first(
                self._slots.acquire(), self._draining.wait(), deadline, undo=self._slots.release
            )
        finally:
            self.queued -= 1
        if acquired != 0:
            if acquired == 1:
                raise _Reject(503, "ShuttingDown", "the server is shutting down", retry_after=5)
            raise _Reject(504, "Timeout", f"waited {self.request_timeout_s:.0f} s in the queue")
        self.in_flight += 1
        try:
            outcome, result = await self._first(
                self._run(body, request_id), self._stopped.wait(), deadline
            )
        finally:
            self.in_flight -= 1
            self._slots.release()
        if outcome == 1:
            raise _Reject(
                503,
                "ShuttingDown",
                f"the server shut down before the request finished ({self.grace_s:.0f} s grace)",
            )
        if outcome == 2:
            raise _Reject(504, "Timeout", f"the request took over {self.request_timeout_s:.0f} s")
        assert isinstance(result, _Outcome)
        return result

    @staticmethod
    async def _first(
        work: Any, stop: Any, deadline: float, undo: Callable[[], None] | None = None
    ) -> tuple[int, Any]:
        """Race ``work`` against ``stop`` and the deadline; the loser is cancelled.

        Returns ``(0, result)`` when ``work`` finished first, ``(1, None)`` when ``stop`` fired
        first, and ``(2, None)`` at the deadline.
        """
        work_task = asyncio.ensure_future(work)
        stop_task = asyncio.ensure_future(stop)
        try:
            done, _ = await asyncio.wait(
                {work_task, stop_task},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except BaseException:  # cancelled (the client left): the work goes too
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
            finished = not work_task.cancelled() and work_task.exception() is None
            if undo is not None and finished:
                undo()  # it got what it asked for (a queue slot) that nobody will use
            raise
        finally:
            stop_task.cancel()
        if work_task not in done:
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
            if work_task.cancelled():
                return (1 if stop_task in done else 2), None
            # it finished while being cancelled: keep its outcome (a held slot stays held)
        return 0, work_task.result()

    async def _run(self, body: GenerateRequest, request_id: str) -> _Outcome:
        seeds = body.seeds()
        store = MemoryImageStore()
        current = None
        if body.image is not None:
            try:
                current = await asyncio.to_thread(store.put, decode_base64_image(body.image))
            except InvalidImageError as exc:
                raise _Reject(422, "ValidationError", f"image: {exc}") from None
        per_prompt = body.num_images_per_prompt
        field = "instruction" if self.tool.requires_image else "caption"
        outcome = _Outcome()
        for index, prompt in enumerate(body.prompts):
            prompt_seeds = seeds[index * per_prompt : (index + 1) * per_prompt]
            try:
                args = self.tool.parse_args({field: prompt})
            except ValidationError as exc:
                raise _Reject(422, "ValidationError", f"prompt {index}: {exc}") from None
            step = max(1, self.tool.max_images_per_call)
            chunks = [prompt_seeds[i : i + step] for i in range(0, len(prompt_seeds), step)]
            results = await gather_or_cancel(
                [self._call(args, prompt, chunk, body, current, request_id) for chunk in chunks]
            )
            for chunk, result in zip(chunks, results, strict=True):
                refs = await asyncio.to_thread(_store_all, store, result)
                if len(refs) > len(chunk) or not refs:
                    raise _Reject(
                        500,
                        "ToolError",
                        f"{self.tool.name} returned {len(refs)} images for {len(chunk)} asked",
                    )
                outcome.images += [base64.b64encode(ref.read_bytes()).decode() for ref in refs]
                # the seeds the tool reports (None where it does not know); the asked ones when
                # it reports none, as the agent records them
                if result.seeds is not None and len(result.seeds) == len(refs):
                    outcome.seeds += list(result.seeds)
                else:
                    outcome.seeds += list(chunk[: len(refs)])
                if result.text:
                    outcome.text.append(result.text)
                if len(refs) < len(chunk):
                    outcome.text.append(
                        f"{self.tool.name} made {len(refs)} of the {len(chunk)} images asked for."
                    )
        return outcome

    async def _call(
        self,
        args: Any,
        prompt: str,
        seeds: list[int],
        body: GenerateRequest,
        current: Any,
        request_id: str,
    ) -> ToolResult:
        ctx = ToolContext(
            run_id=request_id,
            task=Task(prompt=prompt),
            round=1,
            num_images=len(seeds),
            seeds=seeds,
            images=(current,) if current is not None else (),
            current_image=current,
            deadline=time.monotonic() + self.request_timeout_s,
            settings=body.settings(),
        )
        try:
            return coerce_tool_result(await self.tool.invoke(args, ctx))
        except ModelVisibleError as exc:
            raise _Reject(422, _visible_kind(exc), exc.for_model()) from None
        except BudgetExceeded:
            raise _Reject(
                504, "Timeout", f"the request took over {self.request_timeout_s:.0f} s"
            ) from None
        except ConfigurationError as exc:
            raise _Reject(422, "ValidationError", str(exc)) from None
        except ToolUnavailable as exc:
            raise _Reject(503, "ToolUnavailable", exc.message) from None
        except GenAgentError as exc:
            raise _Reject(500, type(exc).__name__, str(exc)) from None
        except Exception as exc:
            logger.exception("request %s: the tool raised", request_id)
            raise _Reject(500, "ToolError", f"{type(exc).__name__}: {exc}") from None


async def _disconnected(request: Request) -> None:
    """Return when the client has disconnected (the body has been read already)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _visible_kind(exc: ModelVisibleError) -> str:
    """The protocol's name for an error the model sees: the nearest kind clients know."""
    for kind in (ToolRefused, ToolArgumentError, ToolExecutionError):
        if isinstance(exc, kind):
            return kind.__name__
    return ToolExecutionError.__name__


def _store_all(store: MemoryImageStore, result: ToolResult) -> list[Any]:
    return [store.put(image) for image in result.images]


def serve(
    tool: Tool,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    sock: socket.socket | None = None,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Serve ``tool`` until SIGINT / SIGTERM, then shut down gracefully.

    Args:
        tool: The tool.
        host: The interface to listen on (``"0.0.0.0"`` for every interface).
        port: The port.
        sock: A bound socket to serve on instead of ``host`` / ``port``.
        log_level: uvicorn's log level.
        **options: :class:`ToolServer` settings (``max_concurrency``, ``max_queue``,
            ``request_timeout_s``, ``grace_s``, ...).
    """
    server = make_server(tool, host=host, port=port, log_level=log_level, **options)
    server.run(sockets=[sock] if sock is not None else None)


def make_server(
    tool: Tool,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **options: Any,
) -> Any:
    """A ``uvicorn.Server`` for ``tool`` whose SIGINT / SIGTERM drain it first (``server.run()``).

    ``server.tool_server`` is the :class:`ToolServer`; ``server.handle_exit(signal.SIGTERM,
    None)`` starts a graceful shutdown from code.

    Raises:
        ConfigurationError: If the ``[serve]`` extra is not installed.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise ConfigurationError(
            "genagent serve needs starlette and uvicorn: `pip install 'genagent[serve]'`"
        ) from exc
    tool_server = ToolServer(tool, **options)
    config = uvicorn.Config(
        tool_server.app(),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(tool_server.grace_s) + 5,
        lifespan="on",
    )

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = getattr(self, "_loop", None)
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(tool_server.begin_shutdown)
            super().handle_exit(sig, frame)

        async def serve(self, sockets: Sequence[socket.socket] | None = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets=list(sockets) if sockets else None)

    server = _Server(config)
    server.tool_server = tool_server  # type: ignore[attr-defined]
    return server
