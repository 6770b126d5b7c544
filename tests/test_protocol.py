"""GenAgentProtocol: the system prompt, reply parsing (tolerant but strict), and its messages."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

import pytest
from PIL import Image
from pydantic import BaseModel, Field

from genagent.errors import ConfigurationError, ProtocolError, ToolExecutionError
from genagent.images import ImageRef, MemoryImageStore
from genagent.messages import ImagePart, TextPart
from genagent.policies._base import PolicyOutput
from genagent.protocol import MAX_CALL_CHARS, GenAgentProtocol, ProtocolState
from genagent.sim import scene_tools
from genagent.tasks import Task
from genagent.tools._base import (
    EditArgs,
    EditTool,
    GenerationArgs,
    GenerationTool,
    Tool,
    ToolContext,
    ToolResult,
)
from genagent.trajectory import Action

GEN = "image_generation_tool"
EDIT = "image_editing_tool"


class _SizedArgs(GenerationArgs):
    steps: int = Field(default=20, ge=1, le=100)


class Painter(GenerationTool):
    name: ClassVar[str] = "painter"
    description: ClassVar[str] = "Paint an image from a caption."
    Args: ClassVar[type[BaseModel]] = _SizedArgs

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult()


class Retoucher(EditTool):
    name: ClassVar[str] = "retoucher"
    description: ClassVar[str] = "Retouch the latest image."
    Args: ClassVar[type[BaseModel]] = EditArgs

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult()


@pytest.fixture
def protocol() -> GenAgentProtocol:
    return GenAgentProtocol()


@pytest.fixture(scope="module")
def tools() -> dict[str, Tool]:
    return {t.name: t for t in scene_tools()}


@pytest.fixture
def fresh(tools: dict[str, Tool]) -> ProtocolState:
    """No image yet: only a generation call is allowed."""
    return ProtocolState(tools=tools, num_images=0)


@pytest.fixture
def after_image(tools: dict[str, Tool]) -> ProtocolState:
    """One image exists: edits and answers are allowed."""
    return ProtocolState(tools=tools, num_images=1)


@pytest.fixture(scope="module")
def image_refs() -> list[ImageRef]:
    store = MemoryImageStore()
    return [store.put(Image.new("RGB", (8, 8), colour)) for colour in ("red", "blue")]


def call(name: str = GEN, **arguments: Any) -> str:
    return json.dumps({"name": name, "arguments": arguments or {"caption": "a red apple"}})


def parse_ok(protocol: GenAgentProtocol, reply: str, state: ProtocolState) -> Action:
    return protocol.parse(reply, state)


def parse_error(protocol: GenAgentProtocol, reply: str, state: ProtocolState) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        protocol.parse(reply, state)
    return info.value


def tool_schema_lines(system_prompt: str) -> list[dict[str, Any]]:
    # The prose also mentions "<tools></tools>"; the schema block is the one on its own lines.
    match = re.search(r"<tools>\n(.*?)\n</tools>", system_prompt, re.DOTALL)
    assert match is not None, "no <tools> block in the system prompt"
    return [json.loads(line) for line in match.group(1).splitlines()]


def contains_key(node: Any, key: str) -> bool:
    if isinstance(node, dict):
        return key in node or any(contains_key(v, key) for v in node.values())
    if isinstance(node, list):
        return any(contains_key(v, key) for v in node)
    return False


# --------------------------------------------------------------------------- system prompt


def test_system_prompt_lists_each_tool_as_one_valid_json_schema_line(
    protocol: GenAgentProtocol,
) -> None:
    schemas = tool_schema_lines(protocol.system_prompt(scene_tools()))

    assert [s["type"] for s in schemas] == ["function", "function"]
    assert [s["function"]["name"] for s in schemas] == [GEN, EDIT]


def test_system_prompt_schemas_describe_caption_and_instruction_parameters(
    protocol: GenAgentProtocol,
) -> None:
    gen, edit = (s["function"] for s in tool_schema_lines(protocol.system_prompt(scene_tools())))

    assert gen["description"]
    assert gen["parameters"]["type"] == "object"
    assert gen["parameters"]["properties"]["caption"]["type"] == "string"
    assert gen["parameters"]["required"] == ["caption"]
    assert edit["parameters"]["properties"]["instruction"]["type"] == "string"
    assert edit["parameters"]["required"] == ["instruction"]


def test_system_prompt_schemas_have_no_pydantic_title_keys(protocol: GenAgentProtocol) -> None:
    schemas = tool_schema_lines(protocol.system_prompt([Painter(), Retoucher()]))

    assert not any(contains_key(s, "title") for s in schemas)


def test_system_prompt_schema_lines_equal_the_tool_schemas(protocol: GenAgentProtocol) -> None:
    tools = [Painter(), Retoucher()]

    assert tool_schema_lines(protocol.system_prompt(tools)) == [t.schema() for t in tools]


def test_system_prompt_unescapes_template_braces_but_not_schema_braces(
    protocol: GenAgentProtocol,
) -> None:
    prompt = protocol.system_prompt(scene_tools())

    assert '{"name": <function-name>, "arguments": <args-json-object>}' in prompt
    assert "{{" not in prompt.split("<tools>\n", 1)[0]


def test_custom_system_template_keeps_its_text_and_fills_in_tools() -> None:
    protocol = GenAgentProtocol(system_template="Use {{tools}} wisely:\n<tools>\n{tools}\n</tools>")

    prompt = protocol.system_prompt([Painter()])

    assert prompt.startswith("Use {tools} wisely:\n")
    assert tool_schema_lines(prompt)[0]["function"]["name"] == "painter"


def test_system_template_without_tools_placeholder_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"\{tools\}"):
        GenAgentProtocol(system_template="You are an image agent.")


def test_user_message_fills_the_user_template() -> None:
    protocol = GenAgentProtocol(user_template="Request: {prompt}")

    message = protocol.user_message(Task(prompt="two cats"))

    assert message.role == "user"
    assert message.text == "Request: two cats"


# --------------------------------------------------------------------------- accepted replies


def test_well_formed_tool_call_parses_to_validated_arguments(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    action = parse_ok(protocol, f"<think>plan</think><tool_call>{call()}</tool_call>", fresh)

    assert action.kind == "tool_call"
    assert action.tool_call is not None
    assert action.tool_call.name == GEN
    assert action.tool_call.arguments == {"caption": "a red apple"}
    assert action.thought == "plan"


def test_tool_call_missing_its_closing_tag_is_accepted(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    action = parse_ok(protocol, f"<think>plan</think>\n<tool_call>\n{call()}\n", fresh)

    assert action.tool_call is not None
    assert action.tool_call.arguments == {"caption": "a red apple"}


def test_python_literal_dict_is_accepted(protocol: GenAgentProtocol, fresh: ProtocolState) -> None:
    reply = (
        "<tool_call>{'name': 'image_generation_tool', "
        "'arguments': {'caption': 'a cat', 'hd': True, 'style': None}}</tool_call>"
    )

    action = parse_ok(protocol, reply, fresh)

    assert action.tool_call is not None
    assert action.tool_call.arguments == {"caption": "a cat"}


def test_json_code_fence_inside_tool_call_is_accepted(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    action = parse_ok(protocol, f"<tool_call>\n```json\n{call()}\n```\n</tool_call>", fresh)

    assert action.tool_call is not None
    assert action.tool_call.name == GEN


def test_prose_around_the_json_is_ignored(protocol: GenAgentProtocol, fresh: ProtocolState) -> None:
    reply = (
        "<tool_call>Sure! Calling the tool now: "
        + call(caption="a {curly} cat")
        + " Hope that helps.</tool_call>"
    )

    action = parse_ok(protocol, reply, fresh)

    assert action.tool_call is not None
    assert action.tool_call.arguments == {"caption": "a {curly} cat"}


def test_parameters_key_is_accepted_for_arguments(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    payload = json.dumps({"name": GEN, "parameters": {"caption": "a dog"}})

    action = parse_ok(protocol, f"<tool_call>{payload}</tool_call>", fresh)

    assert action.tool_call is not None
    assert action.tool_call.arguments == {"caption": "a dog"}


def test_arguments_given_as_a_json_encoded_string_are_decoded(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    payload = json.dumps({"name": GEN, "arguments": json.dumps({"caption": "a dog"})})

    action = parse_ok(protocol, f"<tool_call>{payload}</tool_call>", fresh)

    assert action.tool_call is not None
    assert action.tool_call.arguments == {"caption": "a dog"}


def test_upper_case_tags_are_accepted(protocol: GenAgentProtocol, fresh: ProtocolState) -> None:
    action = parse_ok(protocol, f"<THINK>plan</THINK><Tool_Call>{call()}</TOOL_CALL>", fresh)

    assert action.thought == "plan"
    assert action.tool_call is not None


def test_bare_json_naming_a_known_tool_is_taken_as_a_call(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    action = parse_ok(protocol, f"<think>plan</think>\nI will now call: {call()}", fresh)

    assert action.kind == "tool_call"
    assert action.tool_call is not None
    assert action.tool_call.name == GEN


def test_fenced_json_without_tags_naming_a_known_tool_is_taken_as_a_call(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    action = parse_ok(protocol, f"Here you go:\n```json\n{call()}\n```", fresh)

    assert action.tool_call is not None
    assert action.tool_call.arguments == {"caption": "a red apple"}


def test_bare_json_naming_an_unknown_tool_is_not_taken_as_a_call(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    error = parse_error(protocol, call(name="web_search", query="cats"), fresh)

    assert "neither a <tool_call> nor an <answer>" in error.message


def test_bare_json_with_a_non_string_name_is_a_protocol_error(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    # Regression: an unhashable "name" used to raise TypeError inside the parser.
    with pytest.raises(ProtocolError):
        protocol._parse('{"name": ["image_generation_tool"], "arguments": {}}', fresh)


def test_think_and_judge_are_extracted_and_stripped(
    protocol: GenAgentProtocol, after_image: ProtocolState
) -> None:
    reply = (
        "<think>\n  The dog is brown, not black.\n</think>\n"
        "<judge> One mismatch: colour. </judge>\n"
        f"<tool_call>{call(EDIT, instruction='make the dog black')}</tool_call>"
    )

    action = parse_ok(protocol, reply, after_image)

    assert action.thought == "The dog is brown, not black."
    assert action.judgment == "One mismatch: colour."


def test_unclosed_think_ends_at_the_tool_call(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    action = parse_ok(protocol, f"<think>I forgot to close this\n<tool_call>{call()}", fresh)

    assert action.thought == "I forgot to close this"
    assert action.tool_call is not None
    assert action.tool_call.arguments == {"caption": "a red apple"}


def test_tags_mentioned_inside_a_closed_think_are_not_blocks(
    protocol: GenAgentProtocol, after_image: ProtocolState
) -> None:
    reply = (
        "<think>The dog is brown, so no <answer> yet; I will use <tool_call> once more.</think>"
        f"<tool_call>{call(EDIT, instruction='make the dog black')}</tool_call>"
    )

    action = parse_ok(protocol, reply, after_image)

    assert action.kind == "tool_call"
    assert (
        action.thought == "The dog is brown, so no <answer> yet; I will use <tool_call> once more."
    )


def test_tags_mentioned_inside_a_closed_judge_are_not_blocks(
    protocol: GenAgentProtocol, after_image: ProtocolState
) -> None:
    reply = "<judge>Wrong colour; a <tool_call> is needed.</judge><answer>Fine anyway.</answer>"

    action = parse_ok(protocol, reply, after_image)

    assert action.kind == "answer"
    assert action.judgment == "Wrong colour; a <tool_call> is needed."


def test_answer_after_an_image_is_accepted(
    protocol: GenAgentProtocol, after_image: ProtocolState
) -> None:
    action = parse_ok(
        protocol,
        "<think>ok</think><judge>All correct.</judge><answer> Two cats. </answer>",
        after_image,
    )

    assert action.kind == "answer"
    assert action.answer == "Two cats."
    assert action.judgment == "All correct."
    assert action.tool_call is None


def test_arguments_are_validated_and_normalised_by_the_tool(protocol: GenAgentProtocol) -> None:
    state = ProtocolState(tools={"painter": Painter()}, num_images=0)

    action = parse_ok(
        protocol,
        f"<tool_call>{call('painter', caption='  a cat  ', steps='30')}</tool_call>",
        state,
    )

    assert action.tool_call is not None
    assert action.tool_call.arguments == {"caption": "a cat", "steps": 30}


def test_each_parsed_call_gets_a_distinct_id(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    reply = f"<tool_call>{call()}</tool_call>"
    first = parse_ok(protocol, reply, fresh).tool_call
    second = parse_ok(protocol, reply, fresh).tool_call

    assert first is not None and second is not None
    assert first.id != second.id


# --------------------------------------------------------------------------- released v2 format

V2_GENERATE = (
    "<think>The user wants three red apples to the left of a blue cup. I will describe the "
    "scene explicitly so the generator gets the count, colours and layout right.</think>\n"
    "<tool_call>\n"
    '{"name": "image_generation_tool", "arguments": {"caption": "A photo of exactly three red '
    'apples on the left side of a wooden table and one blue ceramic cup on the right side."}}\n'
    "</tool_call>"
)
V2_EDIT = (
    "<think>Only two apples are visible; everything else is right, so an edit keeps it.</think>\n"
    "<judge>The cup is blue and on the right. There are two apples instead of three. "
    "The image does not satisfy the request yet.</judge>\n"
    "<tool_call>\n"
    '{"name": "image_editing_tool", "arguments": {"instruction": "add one more red apple on '
    'the left side"}}\n'
    "</tool_call>"
)
V2_ANSWER = (
    "<think>Every requirement is met now.</think>\n"
    "<judge>Three red apples on the left, one blue cup on the right. The image satisfies the "
    "request.</judge>\n"
    "<answer>Three red apples to the left of a blue cup on a wooden table.</answer>"
)


@pytest.mark.parametrize("cut", [False, True], ids=["complete", "cut_at_stop_sequence"])
def test_released_v2_generation_reply_parses(
    protocol: GenAgentProtocol, fresh: ProtocolState, cut: bool
) -> None:
    reply = V2_GENERATE.removesuffix("</tool_call>") if cut else V2_GENERATE

    action = parse_ok(protocol, reply, fresh)

    assert action.tool_call is not None
    assert action.tool_call.name == GEN
    assert action.tool_call.arguments["caption"].startswith("A photo of exactly three red apples")
    assert action.thought is not None and action.thought.startswith("The user wants")
    assert action.judgment is None


@pytest.mark.parametrize("cut", [False, True], ids=["complete", "cut_at_stop_sequence"])
def test_released_v2_edit_reply_parses(
    protocol: GenAgentProtocol, after_image: ProtocolState, cut: bool
) -> None:
    reply = V2_EDIT.removesuffix("</tool_call>") if cut else V2_EDIT

    action = parse_ok(protocol, reply, after_image)

    assert action.tool_call is not None
    assert action.tool_call.name == EDIT
    assert action.tool_call.arguments == {"instruction": "add one more red apple on the left side"}
    assert action.judgment is not None and "two apples instead of three" in action.judgment


@pytest.mark.parametrize("cut", [False, True], ids=["complete", "cut_at_stop_sequence"])
def test_released_v2_answer_reply_parses(
    protocol: GenAgentProtocol, after_image: ProtocolState, cut: bool
) -> None:
    reply = V2_ANSWER.removesuffix("</answer>") if cut else V2_ANSWER

    action = parse_ok(protocol, reply, after_image)

    assert action.kind == "answer"
    assert action.answer == "Three red apples to the left of a blue cup on a wooden table."
    assert action.judgment is not None and action.judgment.startswith("Three red apples")


# --------------------------------------------------------------------------- rejected replies


def test_unknown_tool_is_rejected_with_the_available_tools(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    error = parse_error(protocol, f"<tool_call>{call('web_search', q='x')}</tool_call>", fresh)

    assert "unknown tool 'web_search'" in error.message
    assert error.hint is not None
    assert GEN in error.hint and EDIT in error.hint


def test_missing_caption_is_rejected_naming_the_field_and_schema(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    payload = json.dumps({"name": GEN, "arguments": {"prompt": "a cat"}})

    error = parse_error(protocol, f"<tool_call>{payload}</tool_call>", fresh)

    assert "invalid arguments for image_generation_tool" in error.message
    assert "caption" in error.message
    assert error.hint is not None and '"caption"' in error.hint
    assert error.reply_excerpt is not None and "a cat" in error.reply_excerpt


def test_empty_caption_is_rejected(protocol: GenAgentProtocol, fresh: ProtocolState) -> None:
    error = parse_error(protocol, f"<tool_call>{call(caption='   ')}</tool_call>", fresh)

    assert "caption" in error.message


def test_arguments_that_are_not_an_object_are_rejected(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    payload = json.dumps({"name": GEN, "arguments": ["a cat"]})

    error = parse_error(protocol, f"<tool_call>{payload}</tool_call>", fresh)

    assert "must be a JSON object" in error.message


def test_arguments_string_that_is_not_json_is_rejected(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    payload = json.dumps({"name": GEN, "arguments": "caption=a cat"})

    error = parse_error(protocol, f"<tool_call>{payload}</tool_call>", fresh)

    assert "not a JSON object" in error.message


def test_tool_call_without_a_name_is_rejected(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    error = parse_error(protocol, '<tool_call>{"arguments": {"caption": "x"}}</tool_call>', fresh)

    assert '"name"' in error.message
    assert error.hint is not None and GEN in error.hint


def test_tool_call_that_is_not_json_is_rejected_with_the_expected_format(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    error = parse_error(protocol, "<tool_call>generate a cat please</tool_call>", fresh)

    assert "not valid JSON" in error.message
    assert error.hint is not None and "<tool_call>" in error.hint


def test_two_tool_calls_in_one_reply_are_rejected(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    reply = f"<tool_call>{call()}</tool_call>\n<tool_call>{call(caption='b')}</tool_call>"

    error = parse_error(protocol, reply, fresh)

    assert "2 tool calls" in error.message
    assert error.hint is not None and "exactly one" in error.hint


def test_tool_call_and_answer_together_are_rejected(
    protocol: GenAgentProtocol, after_image: ProtocolState
) -> None:
    reply = f"<tool_call>{call()}</tool_call><answer>done</answer>"

    error = parse_error(protocol, reply, after_image)

    assert "both a tool call and an answer" in error.message


def test_edit_before_any_image_is_rejected_pointing_to_the_generator(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    reply = f"<tool_call>{call(EDIT, instruction='make it blue')}</tool_call>"

    error = parse_error(protocol, reply, fresh)

    assert "no image exists yet" in error.message
    assert error.hint is not None and GEN in error.hint


def test_edit_before_any_image_hint_names_a_custom_generator(protocol: GenAgentProtocol) -> None:
    state = ProtocolState(tools={"retoucher": Retoucher(), "painter": Painter()}, num_images=0)

    error = parse_error(protocol, f"<tool_call>{call('retoucher', instruction='x')}", state)

    assert error.hint is not None and "painter" in error.hint


def test_answer_before_any_image_is_rejected(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    error = parse_error(protocol, "<think>easy</think><answer>A cat.</answer>", fresh)

    assert "before any image" in error.message
    assert error.hint is not None and GEN in error.hint


@pytest.mark.parametrize("reply", ["", "   \n\t "], ids=["empty", "whitespace"])
def test_empty_reply_is_rejected(
    protocol: GenAgentProtocol, fresh: ProtocolState, reply: str
) -> None:
    error = parse_error(protocol, reply, fresh)

    assert "empty" in error.message
    assert error.hint is not None


def test_reply_with_neither_call_nor_answer_is_rejected_with_the_format(
    protocol: GenAgentProtocol, after_image: ProtocolState
) -> None:
    error = parse_error(protocol, "<think>Looks fine to me.</think> I like it.", after_image)

    assert "neither a <tool_call> nor an <answer>" in error.message
    assert error.hint is not None
    assert "<tool_call>" in error.hint and "<answer>" in error.hint
    assert error.reply_excerpt is not None and "I like it" in error.reply_excerpt


def test_over_long_tool_call_payload_is_rejected_naming_the_limit(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    reply = f"<tool_call>{call(caption='x' * MAX_CALL_CHARS)}</tool_call>"

    error = parse_error(protocol, reply, fresh)

    assert f"{MAX_CALL_CHARS:,}" in error.message
    assert error.hint is not None


def test_reply_excerpt_is_bounded_for_long_replies(
    protocol: GenAgentProtocol, fresh: ProtocolState
) -> None:
    error = parse_error(protocol, "<think>" + "la " * 20_000, fresh)

    assert error.reply_excerpt is not None
    assert len(error.reply_excerpt) < 400


def test_parse_never_leaks_unexpected_exceptions(
    protocol: GenAgentProtocol, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Tool, arguments: dict[str, Any]) -> BaseModel:
        raise KeyError("bug in a tool")

    monkeypatch.setattr(Painter, "parse_args", broken)
    state = ProtocolState(tools={"painter": Painter()}, num_images=0)

    error = parse_error(protocol, f"<tool_call>{call('painter')}</tool_call>", state)

    assert "KeyError" in error.message
    assert isinstance(error.__cause__, KeyError)


# --------------------------------------------------------------------------- reply_suffix


def test_reply_suffix_closes_a_tool_call_cut_by_its_stop_sequence(
    protocol: GenAgentProtocol,
) -> None:
    output = PolicyOutput(text=f"<think>x</think><tool_call>{call()}", stop="</tool_call>")

    assert protocol.reply_suffix(output) == "</tool_call>"


def test_reply_suffix_closes_an_open_tool_call_when_the_stop_is_unknown(
    protocol: GenAgentProtocol,
) -> None:
    output = PolicyOutput(text=f"<think>x</think><tool_call>\n{call()}\n", stop=None)

    assert protocol.reply_suffix(output) == "</tool_call>"


def test_reply_suffix_closes_an_open_answer_when_the_stop_is_unknown(
    protocol: GenAgentProtocol,
) -> None:
    output = PolicyOutput(text="<judge>ok</judge><answer>Two cats.", stop=None)

    assert protocol.reply_suffix(output) == "</answer>"


def test_reply_suffix_is_empty_for_a_complete_reply(protocol: GenAgentProtocol) -> None:
    output = PolicyOutput(text=f"<tool_call>{call()}</tool_call>", stop="<|im_end|>")

    assert protocol.reply_suffix(output) == ""


def test_reply_suffix_is_empty_when_no_block_is_open(protocol: GenAgentProtocol) -> None:
    assert protocol.reply_suffix(PolicyOutput(text="<think>hmm</think>", stop=None)) == ""


def test_reply_plus_suffix_parses_like_the_uncut_reply(
    protocol: GenAgentProtocol, after_image: ProtocolState
) -> None:
    cut = V2_EDIT.removesuffix("</tool_call>")
    completed = cut + protocol.reply_suffix(PolicyOutput(text=cut, stop=None))

    assert completed == V2_EDIT
    a = protocol.parse(completed, after_image).tool_call
    b = protocol.parse(V2_EDIT, after_image).tool_call
    assert a is not None and b is not None
    assert (a.name, a.arguments) == (b.name, b.arguments)


# --------------------------------------------------------------------------- messages


def test_observation_wraps_the_image_in_tool_response(
    protocol: GenAgentProtocol, image_refs: list[ImageRef]
) -> None:
    message = protocol.observation([image_refs[0]])

    assert message.role == "user"
    assert message.content == (
        TextPart(text="<tool_response>"),
        ImagePart(image=image_refs[0]),
        TextPart(text="</tool_response>"),
    )


def test_observation_keeps_several_images_in_order_and_adds_text(
    protocol: GenAgentProtocol, image_refs: list[ImageRef]
) -> None:
    message = protocol.observation(image_refs, "2 candidates")

    assert message.images == image_refs
    assert [type(p) for p in message.content] == [
        TextPart,
        TextPart,
        ImagePart,
        TextPart,
        ImagePart,
        TextPart,
        TextPart,
        TextPart,
    ]
    text = message.text
    assert text.startswith("<tool_response>Candidate 1:Candidate 2:")
    assert "<select>k</select> (1 to 2)" in text
    assert text.endswith("2 candidates</tool_response>")


def test_observation_uses_custom_prefix_and_suffix(image_refs: list[ImageRef]) -> None:
    protocol = GenAgentProtocol(observation_prefix="<obs>", observation_suffix="</obs>")

    message = protocol.observation([image_refs[0]])

    assert message.text == "<obs></obs>"
    assert message.images == [image_refs[0]]


def test_tool_error_comes_back_as_a_tool_response(protocol: GenAgentProtocol) -> None:
    error = ToolExecutionError("the generator timed out", hint="Try a shorter caption.")

    message = protocol.error_message(error, during="tool")

    assert message.role == "user"
    assert message.text == (
        "<tool_response>Error: the generator timed out Try a shorter caption.</tool_response>"
    )


def test_reply_error_asks_for_a_corrected_reply_in_the_format(protocol: GenAgentProtocol) -> None:
    error = ProtocolError("the reply contains 2 tool calls", hint="Call exactly one tool.")

    message = protocol.error_message(error, during="reply")

    assert message.role == "user"
    assert "<tool_response>" not in message.text
    assert "the reply contains 2 tool calls Call exactly one tool." in message.text
    assert "<tool_call>" in message.text and "<answer>" in message.text
    assert not message.images


# --------------------------------------------------------------------------- review fixes


def test_select_keeps_a_candidate_of_several(
    protocol: GenAgentProtocol, tools: dict[str, Tool]
) -> None:
    state = ProtocolState(tools=tools, num_images=4, candidates=4)
    action = protocol.parse("<select>3</select><judge>ok</judge><answer>done</answer>", state)
    assert action.kind == "answer" and action.selected == 3


@pytest.mark.parametrize(
    ("select", "message"),
    [
        ("<select>5</select>", "names no candidate"),
        ("<select>two</select>", "candidate number"),
        ("<select>1</select><select>2</select>", "more than once"),
    ],
)
def test_bad_selections_are_protocol_errors(
    protocol: GenAgentProtocol, tools: dict[str, Tool], select: str, message: str
) -> None:
    state = ProtocolState(tools=tools, num_images=4, candidates=4)
    with pytest.raises(ProtocolError, match=message):
        protocol.parse(f"{select}<answer>done</answer>", state)


def test_a_caption_mentioning_a_tag_is_still_one_tool_call(
    protocol: GenAgentProtocol, after_image: ProtocolState
) -> None:
    reply = (
        f"<tool_call>{call(caption='a shop sign that reads <answer> in red letters')}</tool_call>"
    )
    action = protocol.parse(reply, after_image)
    assert action.tool_call is not None
    assert action.tool_call.arguments["caption"] == "a shop sign that reads <answer> in red letters"


def test_a_call_quoted_inside_a_closed_thought_is_not_executed(
    protocol: GenAgentProtocol, after_image: ProtocolState
) -> None:
    reply = (
        '<think>Earlier I called {"name": "image_generation_tool", "arguments": {"caption": '
        '"a cat"}} and it worked.</think><judge>All correct.</judge>'
    )
    with pytest.raises(ProtocolError, match="neither"):
        protocol.parse(reply, after_image)


def test_user_template_must_keep_the_prompt() -> None:
    with pytest.raises(ConfigurationError, match="prompt"):
        GenAgentProtocol(user_template="Draw something.")


def test_a_closing_tag_kept_by_the_backend_is_not_doubled(protocol: GenAgentProtocol) -> None:
    text = '<tool_call>{"name": "image_generation_tool", "arguments": {"caption": "x"}}</tool_call>'
    assert protocol.reply_suffix(PolicyOutput(text=text, stop="</tool_call>")) == ""
    assert protocol.reply_suffix(PolicyOutput(text="<answer>x</answer>", stop="</answer>")) == ""
    assert protocol.reply_suffix(PolicyOutput(text="<answer>x", stop="</answer>")) == "</answer>"


@pytest.mark.parametrize("number", ["²", "١", "٣"])
def test_non_ascii_digits_in_select_are_protocol_errors(
    protocol: GenAgentProtocol, tools: dict[str, Tool], number: str
) -> None:
    state = ProtocolState(tools=tools, num_images=2, candidates=2)
    with pytest.raises(ProtocolError, match="candidate number"):
        protocol._parse(f"<select>{number}</select><answer>x</answer>", state)
