"""The tool contract: definition-time checks, schemas, ``@tool`` and lazy set-up."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from enum import Enum
from typing import Any

import pytest
from PIL import Image
from pydantic import BaseModel, Field

from genagent import (
    EditTool,
    GenerationTool,
    Task,
    Tool,
    ToolContext,
    ToolDefinitionError,
    ToolResult,
    tool,
)
from genagent.tools import EditArgs, GenerationArgs


def _ctx(**kwargs: Any) -> ToolContext:
    return ToolContext(run_id="run", task=Task(prompt="a red square"), round=1, **kwargs)


def _png(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- definition errors


def test_tool_without_name_fails_at_class_definition() -> None:
    with pytest.raises(ToolDefinitionError, match=r"`name` must be .*Set e\.g\."):

        class Nameless(Tool):
            description = "Does things."
            Args = GenerationArgs

            def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
                return ToolResult()


def _make_tool_class(**namespace: Any) -> type[Tool]:
    def call(self: Tool, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult()

    return type("Made", (Tool,), {"Args": GenerationArgs, "__call__": call, **namespace})


@pytest.mark.parametrize("bad_name", ["my tool", "", "1tool", "x" * 65, "naïve", 3])
def test_tool_with_invalid_name_fails_at_class_definition(bad_name: Any) -> None:
    with pytest.raises(ToolDefinitionError, match="`name` must be"):
        _make_tool_class(name=bad_name, description="Does things.")


def test_tool_with_valid_name_characters_is_accepted() -> None:
    made = _make_tool_class(name="_my.tool-v2", description="Does things.")
    assert made().name == "_my.tool-v2"


def test_tool_without_description_fails_at_class_definition() -> None:
    with pytest.raises(ToolDefinitionError, match="`description` must be a non-empty string"):
        _make_tool_class(name="undescribed")


@pytest.mark.parametrize("description", ["", "   ", 42])
def test_tool_with_empty_description_fails_at_class_definition(description: Any) -> None:
    with pytest.raises(ToolDefinitionError, match="`description` must be a non-empty string"):
        _make_tool_class(name="undescribed", description=description)


def test_tool_whose_args_is_not_a_basemodel_fails_with_a_fix() -> None:
    with pytest.raises(
        ToolDefinitionError, match=r"`Args` must be a pydantic BaseModel.*class Args"
    ):

        class DictArgs(Tool):
            name = "dict_args"
            description = "Does things."
            Args = dict  # type: ignore[assignment]

            def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
                return ToolResult()


def test_generation_tool_without_caption_argument_fails() -> None:
    class PromptArgs(BaseModel):
        prompt: str

    with pytest.raises(ToolDefinitionError, match=r"`caption: str` field.*GenerationArgs"):

        class Generator(GenerationTool):
            Args = PromptArgs

            def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
                return ToolResult()


def test_edit_tool_without_instruction_argument_fails() -> None:
    with pytest.raises(ToolDefinitionError, match=r"`instruction: str` field.*EditArgs"):

        class Editor(EditTool):
            Args = GenerationArgs

            def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
                return ToolResult()


def test_tool_implementing_neither_call_nor_acall_fails() -> None:
    with pytest.raises(ToolDefinitionError, match=r"implement `def __call__.*async def acall"):

        class Lazy(GenerationTool):
            pass


def test_abstract_tool_base_skips_the_checks_and_subclasses_are_checked() -> None:
    class Base(Tool, abstract=True):
        pass  # no name, no description, no Args, no __call__

    class Concrete(Base):
        name = "concrete"
        description = "A concrete tool."
        Args = GenerationArgs

        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult(text="ok")

    assert Concrete().name == "concrete"
    with pytest.raises(ToolDefinitionError):

        class Incomplete(Base):
            name = "incomplete"


def test_generation_tool_subclass_gets_the_genagent_default_name_and_args() -> None:
    class Generator(GenerationTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult()

    class Editor(EditTool):
        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult()

    assert Generator.name == "image_generation_tool"
    assert Editor.name == "image_editing_tool"
    assert Editor.requires_image and not Generator.requires_image
    assert Generator().parse_args({"caption": "  a cat  "}).model_dump() == {"caption": "a cat"}


# --------------------------------------------------------------------------- schema


class Style(str, Enum):
    PHOTO = "photo"
    SKETCH = "sketch"


class Detail(BaseModel):
    level: int = Field(ge=1, le=5, description="How detailed.")


class StyledArgs(GenerationArgs):
    style: Style = Style.PHOTO
    detail: Detail | None = None


class StyledGenerator(GenerationTool):
    name = "styled_generator"
    description = "Generate an image in a style."
    Args = StyledArgs

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult()


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_schema_is_the_openai_function_form() -> None:
    schema = StyledGenerator.schema()
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "styled_generator"
    assert function["description"] == "Generate an image in a style."
    parameters = function["parameters"]
    assert parameters["type"] == "object"
    assert parameters["required"] == ["caption"]
    assert set(parameters["properties"]) == {"caption", "style", "detail"}
    assert "description" in parameters["properties"]["caption"]
    json.dumps(schema)  # JSON-able, as it is embedded in the system prompt


def test_schema_has_no_title_keys_even_in_nested_definitions() -> None:
    schema = StyledGenerator.schema()
    assert "$defs" in schema["function"]["parameters"]  # the nested models are really there
    assert "title" not in _keys(schema)


def test_schema_keeps_an_argument_that_is_named_title() -> None:
    class PosterArgs(GenerationArgs):
        title: str = Field(description="The poster's title.")

    class Poster(GenerationTool):
        name = "poster"
        Args = PosterArgs

        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult()

    properties = Poster.schema()["function"]["parameters"]["properties"]
    assert properties["title"] == {"description": "The poster's title.", "type": "string"}


# --------------------------------------------------------------------------- @tool


def test_tool_decorator_builds_args_description_and_argument_docs() -> None:
    @tool(name="painter")
    def paint(caption: str, width: int = 16, sharp: bool = False) -> Image.Image:
        """Paint a solid colour image.

        The colour is the first word of the caption.

        Args:
            caption: What to paint; its first word is the colour.
            width: Side of the image
                in pixels.
            sharp: Unused flag.
        """
        return Image.new("RGB", (width, width), caption.split()[0])

    function = paint.schema()["function"]
    assert function["name"] == "painter"
    assert function["description"] == "Paint a solid colour image."
    properties = function["parameters"]["properties"]
    assert properties["caption"] == {
        "description": "What to paint; its first word is the colour.",
        "type": "string",
    }
    assert properties["width"]["type"] == "integer"
    assert properties["width"]["default"] == 16
    assert properties["width"]["description"] == "Side of the image in pixels."
    assert properties["sharp"]["type"] == "boolean"
    assert function["parameters"]["required"] == ["caption"]


def test_tool_decorator_infers_generation_kind_and_default_name_from_caption() -> None:
    @tool
    def paint(caption: str) -> Image.Image:
        """Paint."""
        return Image.new("RGB", (16, 16))

    assert isinstance(paint, GenerationTool)
    assert paint.name == "image_generation_tool"
    assert not paint.requires_image


def test_tool_decorator_infers_edit_kind_from_instruction() -> None:
    @tool
    def retouch(instruction: str, ctx: ToolContext) -> Image.Image:
        """Retouch the current image."""
        assert ctx.current_image is not None
        return ctx.current_image.open()

    assert isinstance(retouch, EditTool)
    assert retouch.name == "image_editing_tool"
    assert retouch.requires_image


def test_tool_decorator_uses_function_name_for_other_tools() -> None:
    @tool
    def upscale(factor: int) -> str:
        """Upscale."""
        return f"x{factor}"

    assert not isinstance(upscale, (GenerationTool, EditTool))
    assert upscale.name == "upscale"


def test_tool_decorator_description_argument_overrides_docstring() -> None:
    @tool(description="Custom words.")
    def paint(caption: str) -> Image.Image:
        return Image.new("RGB", (16, 16))

    assert paint.description == "Custom words."


async def test_tool_decorator_passes_validated_arguments_and_context() -> None:
    seen: dict[str, Any] = {}

    @tool
    def paint(caption: str, size: int, ctx: ToolContext) -> Image.Image:
        """Paint."""
        seen.update(caption=caption, size=size, seed=ctx.seed, prompt=ctx.prompt)
        return Image.new("RGB", (size, size), "blue")

    args = paint.parse_args({"caption": "blue sky", "size": "16", "unknown": 1})
    result = await paint.acall(args, _ctx(seeds=[42]))
    assert seen == {"caption": "blue sky", "size": 16, "seed": 42, "prompt": "a red square"}
    assert len(result.images) == 1


async def test_tool_decorator_supports_async_functions() -> None:
    @tool
    async def paint(caption: str, ctx: ToolContext) -> Image.Image:
        """Paint asynchronously."""
        await asyncio.sleep(0)
        return Image.new("RGB", (16, 16), caption)

    result = await paint.acall(paint.parse_args({"caption": "green"}), _ctx())
    assert isinstance(result, ToolResult)
    assert result.images[0].getpixel((0, 0)) == (0, 128, 0)  # type: ignore[union-attr]


def test_sync_tool_decorator_is_callable_synchronously() -> None:
    @tool
    def paint(caption: str) -> Image.Image:
        """Paint."""
        return Image.new("RGB", (16, 16), caption)

    result = paint(paint.parse_args({"caption": "red"}), _ctx())
    assert result.images[0].getpixel((0, 0)) == (255, 0, 0)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("returned", "images", "text"),
    [
        (Image.new("RGB", (16, 16)), 1, None),
        (_png(), 1, None),
        ([_png("red"), Image.new("RGB", (16, 16))], 2, None),
        ("just text", 0, "just text"),
        (None, 0, None),
        (ToolResult(images=[_png()], text="hi", metadata={"k": 1}), 1, "hi"),
    ],
    ids=["pil", "bytes", "list", "str", "none", "tool_result"],
)
async def test_tool_decorator_coerces_return_values(returned: Any, images: int, text: str) -> None:
    @tool
    def produce(caption: str) -> Any:
        """Produce something."""
        return returned

    result = await produce.acall(produce.parse_args({"caption": "x"}), _ctx())
    assert isinstance(result, ToolResult)
    assert len(result.images) == images
    assert result.text == text
    if isinstance(returned, ToolResult):
        assert result is returned


def test_tool_decorator_rejects_argument_without_type_hint() -> None:
    with pytest.raises(ToolDefinitionError, match=r"'size' needs a type hint \(e\.g\. `size: str`"):

        @tool
        def paint(caption: str, size) -> Image.Image:  # type: ignore[no-untyped-def]
            """Paint."""
            return Image.new("RGB", (16, 16))


def test_tool_decorator_rejects_function_without_docstring() -> None:
    with pytest.raises(ToolDefinitionError, match=r"add a docstring.*description="):

        @tool
        def paint(caption: str) -> Image.Image:
            return Image.new("RGB", (16, 16))


@pytest.mark.parametrize("variadic", ["args", "kwargs"])
def test_tool_decorator_rejects_variadic_arguments(variadic: str) -> None:
    def star_args(caption: str, *args: str) -> None:
        """Paint."""

    def star_kwargs(caption: str, **kwargs: str) -> None:
        """Paint."""

    fn = star_args if variadic == "args" else star_kwargs
    with pytest.raises(ToolDefinitionError, match=r"\*args and \*\*kwargs"):
        tool(fn)


def test_tool_decorator_explicit_kind_must_fit_the_arguments() -> None:
    with pytest.raises(ToolDefinitionError, match="instruction"):

        @tool(kind="edit")
        def paint(caption: str) -> Image.Image:
            """Paint."""
            return Image.new("RGB", (16, 16))


# --------------------------------------------------------------------------- set-up


class SlowSetupTool(GenerationTool):
    def __init__(self) -> None:
        self.setups = 0
        self.lock = threading.Lock()

    def setup(self) -> None:
        with self.lock:
            self.setups += 1
        time.sleep(0.02)  # long enough for every concurrent caller to arrive

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult()


async def test_ensure_setup_runs_setup_exactly_once_under_concurrency() -> None:
    instance = SlowSetupTool()
    await asyncio.gather(*(instance.ensure_setup() for _ in range(20)))
    await instance.ensure_setup()
    assert instance.setups == 1


async def test_ensure_setup_is_per_instance() -> None:
    first, second = SlowSetupTool(), SlowSetupTool()
    await asyncio.gather(first.ensure_setup(), second.ensure_setup())
    assert (first.setups, second.setups) == (1, 1)


async def test_ensure_setup_retries_after_a_failed_setup() -> None:
    class Flaky(GenerationTool):
        def __init__(self) -> None:
            self.attempts = 0

        def setup(self) -> None:
            self.attempts += 1
            if self.attempts == 1:
                raise OSError("weights not downloaded yet")

        def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
            return ToolResult()

    flaky = Flaky()
    with pytest.raises(OSError):
        await flaky.ensure_setup()
    await flaky.ensure_setup()
    await flaky.ensure_setup()
    assert flaky.attempts == 2


def test_tool_context_report_progress_reaches_the_callback() -> None:
    events: list[Any] = []
    ctx = _ctx(progress_callback=events.append)
    ctx.report_progress(3, 10, phase="denoise")
    assert len(events) == 1
    assert (events[0].step, events[0].total, events[0].info) == (3, 10, {"phase": "denoise"})


def test_edit_args_require_a_non_empty_instruction() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EditArgs.model_validate({"instruction": "   "})


def test_schema_parameters_carry_no_python_docstring() -> None:
    # the Args model's docstring is for Python readers, not part of what the policy sees
    from genagent.tools import GenerationArgs

    class Documented(GenerationArgs):
        """Internal notes about the arguments."""

    class Tool_(GenerationTool):
        Args = Documented

        def __call__(self, args: Any, ctx: Any) -> Any:
            return None

    assert "description" not in Tool_.schema()["function"]["parameters"]


# --------------------------------------------------------------------------- review fixes


def test_tool_decorator_rejects_arguments_that_cannot_be_a_schema() -> None:
    with pytest.raises(ToolDefinitionError, match="cannot become a JSON schema"):

        @tool
        def painter(caption: str, palette: Image.Image) -> Image.Image:
            """Paint with a palette image."""
            return palette

    with pytest.raises(ToolDefinitionError, match="cannot become a JSON schema"):

        @tool
        def hidden(caption: str, _secret: int = 1) -> Image.Image:
            """Paint."""
            return Image.new("RGB", (8, 8))


def test_an_async_setup_is_rejected_when_the_class_is_defined() -> None:
    with pytest.raises(ToolDefinitionError, match="`setup` must be a plain"):

        class AsyncSetup(GenerationTool):
            async def setup(self) -> None:  # type: ignore[override]
                pass

            def __call__(self, args: Any, ctx: Any) -> Any:
                return None


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_max_concurrency_must_be_a_positive_int(value: Any) -> None:
    with pytest.raises(ToolDefinitionError, match="max_concurrency"):

        class Limited(GenerationTool):
            max_concurrency = value

            def __call__(self, args: Any, ctx: Any) -> Any:
                return None


def test_an_async_dunder_call_is_rejected_when_the_class_is_defined() -> None:
    with pytest.raises(ToolDefinitionError, match="name an async implementation `acall`"):

        class Wrong(GenerationTool):
            async def __call__(self, args: Any, ctx: Any) -> Any:  # type: ignore[override]
                return None


def test_a_sync_acall_is_rejected_when_the_class_is_defined() -> None:
    with pytest.raises(ToolDefinitionError, match="`acall` must be `async def`"):

        class Wrong(GenerationTool):
            def acall(self, args: Any, ctx: Any) -> Any:  # type: ignore[override]
                return None
