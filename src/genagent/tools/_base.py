"""The tool contract: ``Tool``, ``GenerationTool``, ``EditTool``, and the ``@tool`` decorator.

A tool is a class with a ``name``, a ``description`` and an ``Args`` pydantic model (its JSON
schema is what the policy sees), implementing ``__call__(args, ctx)`` or ``async acall(args,
ctx)``. Heavy set-up (loading weights, opening clients) goes in ``setup()``, which runs once,
lazily, before the first call. Mistakes in a definition raise :class:`ToolDefinitionError` when
the class is defined, not when the agent first calls it.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast, get_type_hints, overload

from pydantic import BaseModel, ConfigDict, Field, create_model

from genagent._async import run_sync
from genagent.errors import BudgetExceeded, ToolDefinitionError
from genagent.images import ImageRef
from genagent.tasks import Task

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "EditArgs",
    "EditTool",
    "GenerationArgs",
    "GenerationTool",
    "Tool",
    "ToolContext",
    "ToolProgress",
    "ToolResult",
    "tool",
]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

DEFAULT_GENERATION_TOOL_NAME = "image_generation_tool"
DEFAULT_EDIT_TOOL_NAME = "image_editing_tool"


@dataclass
class ToolResult:
    """What a tool call returns.

    Attributes:
        images: Generated images, as PIL images, encoded bytes, or ``ImageRef`` objects of
            images the run already has. PIL images are stored as PNG with their text metadata.
        text: Text to show the policy beside the images (optional).
        seeds: The seed behind each image, if known (recorded on the trajectory).
        metadata: Anything worth recording about the call (model, size, steps, timings).
    """

    images: list[PILImage.Image | bytes | ImageRef] = field(default_factory=list)
    text: str | None = None
    seeds: list[int | None] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolProgress:
    """Progress of a long tool call (a diffusion step, a polling attempt).

    Attributes:
        tool: The tool's name.
        step: Steps done.
        total: Steps in all, if known.
        info: Extra detail (the candidate, the phase).
    """

    tool: str
    step: int
    total: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolContext:
    """Everything a tool call may need besides its arguments.

    Attributes:
        run_id: The run's trajectory id.
        task: The user's request and its metadata.
        round: The image round this call produces (1-based).
        num_images: How many images to produce (``candidates``); tools that cannot batch are
            called once per image with one seed each.
        seeds: One seed per image to produce.
        seed_policy: How the agent derived the seeds (``"per_round"``, ``"fixed"``,
            ``"random"``), for tools to record; ``None`` outside an agent.
        images: Images produced so far in the run.
        current_image: The image that an edit applies to (the latest selected image).
        deadline: Clock time by which the run's budget is spent, if it has one.
        clock: The clock ``deadline`` is measured on.
        state: Free-form per-run storage shared by the run's tools and hooks
            (``RunContext.state``).
        progress_callback: Where :meth:`report_progress` sends progress (the agent routes it
            to ``Hooks.on_tool_progress``); tools call ``report_progress``, not this.
        settings: Generation settings the caller asks for on this call (``width``, ``height``,
            ``steps``, ``guidance``, ``negative_prompt``): tools that can honour them do (the
            diffusers tools, the remote adapters), others ignore them. ``genagent serve``
            fills them from each request; an agent leaves them empty.
    """

    run_id: str
    task: Task
    round: int
    num_images: int = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    seed_policy: str | None = None
    images: Sequence[ImageRef] = ()
    current_image: ImageRef | None = None
    deadline: float | None = None
    clock: Callable[[], float] = time.monotonic
    state: dict[str, Any] = field(default_factory=dict)
    progress_callback: Callable[[ToolProgress], None] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user's request."""
        return self.task.prompt

    @property
    def seed(self) -> int:
        """The seed of the first (or only) image."""
        return self.seeds[0]

    def remaining_s(self) -> float | None:
        """Seconds left in the run's budget, or ``None`` if it has none."""
        return None if self.deadline is None else self.deadline - self.clock()

    def check_budget(self) -> None:
        """Raise :class:`BudgetExceeded` if the run's time budget is spent.

        Long tools call this between steps (the diffusers step callback does) so that a spent
        budget interrupts the work instead of waiting for it.
        """
        remaining = self.remaining_s()
        if remaining is not None and remaining <= 0:
            raise BudgetExceeded(f"time budget spent during round {self.round}")

    def report_progress(self, step: int, total: int | None = None, **info: Any) -> None:
        """Report progress to the run's hooks (``Hooks.on_tool_progress``) and progress bars."""
        if self.progress_callback is not None:
            self.progress_callback(
                ToolProgress(tool=str(info.pop("tool", "")), step=step, total=total, info=info)
            )


class _ArgsBase(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class GenerationArgs(_ArgsBase):
    """Arguments of a generation tool, as the policy writes them."""

    caption: str = Field(
        min_length=1,
        description=(
            "A detailed description of the image to generate: every object with its count, "
            "colour, size and position, and the scene, style and lighting."
        ),
    )


class EditArgs(_ArgsBase):
    """Arguments of an editing tool, as the policy writes them."""

    instruction: str = Field(
        min_length=1,
        description=(
            "A precise instruction for changing the current image, e.g. 'make the cup blue' or "
            "'add one more apple on the left'."
        ),
    )


class Tool:
    """Base class of every tool.

    Subclasses set the class attributes ``name``, ``description`` and ``Args``, and implement
    ``__call__(args, ctx)`` (sync; run in a worker thread) or ``async acall(args, ctx)``.
    Intermediate base classes pass ``abstract=True``: ``class MyBase(Tool, abstract=True)``.

    Attributes:
        name: The name the policy calls the tool by.
        description: What the tool does, as the policy reads it.
        Args: Pydantic model of the arguments; its JSON schema is shown to the policy.
        requires_image: Whether the tool needs a current image (editing tools).
        max_images_per_call: How many candidates one call can produce (batching). With
            ``candidates=N`` above this, the agent calls the tool several times.
        max_concurrency: Most calls of one tool instance in flight at once, across every run
            sharing it (``None``: no limit). Set it to 1 for a model that is not safe to call
            from several threads (a diffusers pipeline keeps scheduler state).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Args: ClassVar[type[BaseModel]]
    requires_image: ClassVar[bool] = False
    max_images_per_call: ClassVar[int] = 1
    max_concurrency: ClassVar[int | None] = None
    _abstract: ClassVar[bool] = True

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._abstract = abstract
        if not abstract:
            _check_tool_class(cls)

    # ------------------------------------------------------------------ contract

    def setup(self) -> None:
        """Load weights, open clients: runs once, lazily, before the first call."""

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Run the tool synchronously. Override this or :meth:`acall`."""
        if type(self).acall is Tool.acall:  # neither is overridden
            raise ToolDefinitionError(
                f"{type(self).__name__} implements neither __call__ nor acall"
            )
        return run_sync(self.acall(args, ctx))

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Run the tool asynchronously. Override this or :meth:`__call__`."""
        return await asyncio.to_thread(self.__call__, args, ctx)

    # ------------------------------------------------------------------ helpers

    async def invoke(self, args: Any, ctx: ToolContext) -> Any:
        """Call the tool as the agent does: within ``max_concurrency``, sync tools in a thread.

        A sync tool's slot is released by its worker thread when the call really ends, so a
        call abandoned by a spent budget or a cancelled run still holds it until then.
        """
        slots = self._slots()
        if slots is not None:
            # a threading semaphore polled from the loop: usable from any event loop, and
            # nothing is held while waiting
            while not slots.acquire(blocking=False):  # noqa: ASYNC110 (no cross-loop Event)
                await asyncio.sleep(0.002)
        if type(self).acall is Tool.acall:  # a sync tool
            return await asyncio.to_thread(self._call_holding, args, ctx, slots)
        try:
            return await self.acall(args, ctx)
        finally:
            if slots is not None:
                slots.release()

    def _call_holding(
        self, args: Any, ctx: ToolContext, slots: threading.BoundedSemaphore | None
    ) -> ToolResult:
        try:
            return self.__call__(args, ctx)
        finally:
            if slots is not None:
                slots.release()

    def _slots(self) -> threading.BoundedSemaphore | None:
        if self.max_concurrency is None:
            return None
        slots = self.__dict__.get("_genagent_slots")
        if slots is None:
            slots = self.__dict__.setdefault(
                "_genagent_slots", threading.BoundedSemaphore(self.max_concurrency)
            )
        return slots  # type: ignore[no-any-return]

    def __getstate__(self) -> dict[str, Any]:
        # locks are per process; setup runs again after unpickling
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_genagent_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    async def ensure_setup(self) -> None:
        """Run :meth:`setup` once (thread- and task-safe)."""
        if self.__dict__.get("_genagent_ready"):
            return
        lock = self.__dict__.setdefault("_genagent_setup_lock", threading.Lock())
        await asyncio.to_thread(self._setup_once, lock)

    def _setup_once(self, lock: threading.Lock) -> None:
        with lock:
            if not self.__dict__.get("_genagent_ready"):
                self.setup()
                self.__dict__["_genagent_ready"] = True

    def parse_args(self, arguments: dict[str, Any]) -> BaseModel:
        """Validate raw arguments against :attr:`Args` (raises pydantic ``ValidationError``)."""
        return self.Args.model_validate(arguments)

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """The tool's function schema, in the OpenAI / Qwen ``{"type": "function", ...}`` form."""
        parameters = _clean_schema(cls.Args.model_json_schema())
        # the Args class docstring is for Python readers; the policy reads `description` above
        parameters.pop("description", None)
        return {
            "type": "function",
            "function": {
                "name": cls.name,
                "description": cls.description,
                "parameters": parameters,
            },
        }

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary of the tool for trajectory metadata (override to add settings)."""
        return {"name": self.name, "class": f"{type(self).__module__}.{type(self).__qualname__}"}

    async def aclose(self) -> None:
        """Release what the tool holds on the running event loop (HTTP connections, ...).

        The agent's synchronous entry points (``Agent.run``, ``Agent.run_batch``) call this
        before their event loop ends; the tool stays usable and opens new resources on its next
        call. The default does nothing.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class GenerationTool(Tool, abstract=True):
    """Base of text-to-image tools: the policy writes a ``caption``.

    Size, steps and guidance are tool configuration, not model-facing arguments. The default
    name matches the released GenAgent weights.
    """

    name: ClassVar[str] = DEFAULT_GENERATION_TOOL_NAME
    description: ClassVar[str] = (
        "Generate an image from a detailed caption. Returns the generated image."
    )
    Args: ClassVar[type[BaseModel]] = GenerationArgs


class EditTool(Tool, abstract=True):
    """Base of image editing tools: the policy writes an ``instruction`` for the current image.

    ``ctx.current_image`` is the image to edit (``ctx.current_image.open()`` decodes it).
    """

    name: ClassVar[str] = DEFAULT_EDIT_TOOL_NAME
    description: ClassVar[str] = (
        "Edit the most recent image according to an instruction. Returns the edited image."
    )
    Args: ClassVar[type[BaseModel]] = EditArgs
    requires_image: ClassVar[bool] = True


def _check_tool_class(cls: type[Tool]) -> None:
    where = f"tool class {cls.__qualname__}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ToolDefinitionError(
            f"{where}: `name` must be a string of letters, digits, '_', '.' or '-' (at most 64, "
            f"starting with a letter or '_'), got {name!r}. Set e.g. `name = \"my_tool\"`."
        )
    description = getattr(cls, "description", None)
    if not isinstance(description, str) or not description.strip():
        raise ToolDefinitionError(
            f"{where}: `description` must be a non-empty string; the policy reads it to decide "
            "when to call the tool."
        )
    args = getattr(cls, "Args", None)
    if not (isinstance(args, type) and issubclass(args, BaseModel)):
        raise ToolDefinitionError(
            f"{where}: `Args` must be a pydantic BaseModel subclass describing the arguments, "
            f"got {args!r}. Define `class Args(BaseModel): caption: str`."
        )
    try:
        args.model_json_schema()
    except Exception as exc:  # pydantic raises several types for unsupported field types
        raise ToolDefinitionError(
            f"{where}: the JSON schema of `Args` cannot be generated ({exc}); use JSON-compatible "
            "field types (str, int, float, bool, lists, enums, nested models)."
        ) from exc
    if issubclass(cls, GenerationTool) and "caption" not in args.model_fields:
        raise ToolDefinitionError(
            f"{where}: a GenerationTool's `Args` must have a `caption: str` field (subclass "
            "GenerationArgs to add more)."
        )
    if issubclass(cls, EditTool) and "instruction" not in args.model_fields:
        raise ToolDefinitionError(
            f"{where}: an EditTool's `Args` must have an `instruction: str` field (subclass "
            "EditArgs to add more)."
        )
    if cls.__call__ is not Tool.__call__ and inspect.iscoroutinefunction(cls.__call__):
        raise ToolDefinitionError(
            f"{where}: `__call__` is async; name an async implementation `acall` instead "
            "(`__call__` is the sync one, run in a worker thread)."
        )
    if cls.acall is not Tool.acall and not inspect.iscoroutinefunction(cls.acall):
        raise ToolDefinitionError(
            f"{where}: `acall` must be `async def`; name a sync implementation `__call__`."
        )
    if cls.__call__ is Tool.__call__ and cls.acall is Tool.acall:
        raise ToolDefinitionError(
            f"{where}: implement `def __call__(self, args, ctx) -> ToolResult` or "
            "`async def acall(self, args, ctx) -> ToolResult`."
        )
    if not isinstance(cls.max_images_per_call, int) or cls.max_images_per_call < 1:
        raise ToolDefinitionError(f"{where}: `max_images_per_call` must be a positive int.")
    if cls.max_concurrency is not None and (
        not isinstance(cls.max_concurrency, int) or cls.max_concurrency < 1
    ):
        raise ToolDefinitionError(f"{where}: `max_concurrency` must be None or a positive int.")
    if inspect.iscoroutinefunction(cls.setup):
        raise ToolDefinitionError(
            f"{where}: `setup` must be a plain (not async) method; it runs once in a worker "
            "thread before the first call."
        )


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop pydantic's ``title`` keys: the policy needs names, types and descriptions."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: clean(v) for k, v in node.items() if not (k == "title" and isinstance(v, str))
            }
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    return cast("dict[str, Any]", clean(schema))


# --------------------------------------------------------------------------- @tool

ToolKind = Literal["generation", "edit", "other"]


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None, kind: ToolKind | None = None
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    kind: ToolKind | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a tool from a typed function (sync or async).

    The arguments model is built from the signature's type hints; the description is the
    docstring's summary, and each argument's description comes from its Google-style ``Args:``
    section. A parameter named ``ctx`` (or annotated ``ToolContext``) receives the context.
    The function returns a :class:`ToolResult`, a PIL image, encoded bytes, or a list of images.

    Args:
        fn: The function (when used as ``@tool`` without parentheses).
        name: The tool's name (default: the function's name; for ``kind="generation"`` /
            ``"edit"`` the GenAgent default names).
        description: Overrides the docstring summary.
        kind: ``"generation"`` (needs a ``caption`` argument), ``"edit"`` (needs
            ``instruction``; receives the current image through ``ctx``) or ``"other"``.
            Inferred from the argument names when omitted.

    Returns:
        A :class:`Tool` instance.

    Raises:
        ToolDefinitionError: If an argument lacks a type hint, the docstring is missing, or the
            arguments do not fit the kind.

    Example:
        ```python
        from PIL import Image
        from genagent import tool

        @tool
        def solid_colour(caption: str) -> Image.Image:
            \"\"\"Paint the whole image in the colour named first in the caption.\"\"\"
            return Image.new("RGB", (64, 64), caption.split()[0])
        ```
    """

    def build(func: Callable[..., Any]) -> Tool:
        return _tool_from_function(func, name=name, description=description, kind=kind)

    return build(fn) if fn is not None else build


def _tool_from_function(
    func: Callable[..., Any], *, name: str | None, description: str | None, kind: ToolKind | None
) -> Tool:
    where = f"@tool function {getattr(func, '__qualname__', func)!r}"
    if not callable(func):
        raise ToolDefinitionError(f"{where}: @tool decorates a function")
    doc = inspect.getdoc(func) or ""
    summary, arg_docs = _parse_docstring(doc)
    if description is None:
        if not summary:
            raise ToolDefinitionError(
                f"{where}: add a docstring; its first paragraph is the description the policy "
                "reads (or pass description=...)."
            )
        description = summary
    try:
        hints = get_type_hints(func)
    except Exception as exc:
        raise ToolDefinitionError(f"{where}: cannot resolve type hints ({exc})") from exc
    signature = inspect.signature(func)
    fields: dict[str, Any] = {}
    ctx_param: str | None = None
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolDefinitionError(f"{where}: *args and **kwargs cannot be tool arguments")
        annotation = hints.get(param.name, inspect.Parameter.empty)
        if param.name == "ctx" or annotation is ToolContext:
            ctx_param = param.name
            continue
        if annotation is inspect.Parameter.empty:
            raise ToolDefinitionError(
                f"{where}: argument {param.name!r} needs a type hint (e.g. `{param.name}: str`); "
                "the hints become the JSON schema the policy sees."
            )
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (
            annotation,
            Field(default, description=arg_docs.get(param.name)),
        )
    if kind is None:
        kind = (
            "generation" if "caption" in fields else "edit" if "instruction" in fields else "other"
        )
    base: type[Tool] = {"generation": GenerationTool, "edit": EditTool, "other": Tool}[kind]
    default_names = {"generation": DEFAULT_GENERATION_TOOL_NAME, "edit": DEFAULT_EDIT_TOOL_NAME}
    tool_name: str = name or default_names.get(kind) or str(getattr(func, "__name__", "tool"))
    try:
        args_model = create_model(f"{_camel(tool_name)}Args", __base__=_ArgsBase, **fields)
        args_model.model_json_schema()
    except Exception as exc:  # pydantic raises several types for unusable fields
        raise ToolDefinitionError(
            f"{where}: its arguments cannot become a JSON schema ({exc}). Use JSON-compatible "
            "type hints (str, int, float, bool, lists, enums) and names that do not start with "
            "'_' or 'model_'."
        ) from exc
    is_async = inspect.iscoroutinefunction(func)

    def call_function(args: BaseModel, ctx: ToolContext) -> Any:
        kwargs = {k: getattr(args, k) for k in fields}
        if ctx_param is not None:
            kwargs[ctx_param] = ctx
        return func(**kwargs)

    namespace: dict[str, Any] = {
        "name": tool_name,
        "description": description,
        "Args": args_model,
        "__doc__": doc,
        "__module__": getattr(func, "__module__", __name__),
    }
    if is_async:

        async def acall(self: Tool, args: BaseModel, ctx: ToolContext) -> ToolResult:
            return coerce_tool_result(await call_function(args, ctx))

        namespace["acall"] = acall
    else:

        def __call__(self: Tool, args: BaseModel, ctx: ToolContext) -> ToolResult:
            return coerce_tool_result(call_function(args, ctx))

        namespace["__call__"] = __call__
    cls = cast("type[Tool]", type(f"{_camel(tool_name)}Tool", (base,), namespace))
    instance = cls()
    instance.__dict__["__wrapped__"] = func
    return instance


def coerce_tool_result(value: Any) -> ToolResult:
    """Turn what a tool function returned into a :class:`ToolResult`."""
    if isinstance(value, ToolResult):
        return value
    if value is None:
        return ToolResult()
    if isinstance(value, str):
        return ToolResult(text=value)
    if isinstance(value, (list, tuple)):
        return ToolResult(images=list(value))
    return ToolResult(images=[value])


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name) if part) or "Tool"


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary paragraph and ``Args:`` descriptions."""
    lines = doc.splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip():
            break
        summary.append(line.strip())
    arg_docs: dict[str, str] = {}
    header = next(
        (
            (i, len(m.group(1)))
            for i, line in enumerate(lines)
            if (m := re.match(r"^(\s*)(?:Args|Arguments|Parameters):\s*$", line))
        ),
        None,
    )
    if header is None:
        return " ".join(summary), arg_docs
    start, header_indent = header
    item_indent: int | None = None
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= header_indent:
            break
        if item_indent is None:
            item_indent = indent
        match = re.match(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if indent == item_indent and match:
            current = match.group(1)
            arg_docs[current] = match.group(2).strip()
        elif current is not None:
            arg_docs[current] = f"{arg_docs[current]} {line.strip()}".strip()
    return " ".join(summary), arg_docs
