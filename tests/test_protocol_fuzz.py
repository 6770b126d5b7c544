"""Property-based tests: nothing a policy writes makes the reply parser raise anything but
ProtocolError.

``GenAgentProtocol.parse`` wraps the real parser in a catch-all that converts any unexpected
exception into a ProtocolError (a safety net, so a parser bug never crashes a run). Testing
``parse`` would therefore pass even if the parser itself were crashing with TypeError or
RecursionError on some inputs. These properties call ``protocol._parse`` directly so that such
bugs surface here instead of being hidden by the net.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from genagent.errors import ProtocolError
from genagent.protocol import GenAgentProtocol, ProtocolState
from genagent.sim import scene_tools
from genagent.trajectory import Action

PROTOCOL = GenAgentProtocol()
TOOLS = {t.name: t for t in scene_tools()}
STATES = [
    ProtocolState(tools=TOOLS, num_images=0),
    ProtocolState(tools=TOOLS, num_images=1),
    # several candidates shown: <select>k</select> is meaningful
    ProtocolState(tools=TOOLS, num_images=4, candidates=4),
]
TOOL_NAMES = [*TOOLS, "web_search", "", "IMAGE_GENERATION_TOOL"]

states = st.sampled_from(STATES)


def parse_or_protocol_error(reply: str, state: ProtocolState) -> Action | None:
    """Run the inner parser: an Action or a ProtocolError are the only acceptable outcomes."""
    try:
        action = PROTOCOL._parse(reply, state)
    except ProtocolError as exc:
        assert exc.message  # an error the policy can read
        return None
    assert isinstance(action, Action)
    if action.kind == "tool_call":
        assert action.tool_call is not None
        tool = TOOLS[action.tool_call.name]
        assert state.num_images > 0 or not tool.requires_image
        json.dumps(action.tool_call.arguments)  # arguments are JSON-able
    else:
        assert action.answer is not None
        assert state.num_images > 0
    if action.selected is not None:
        assert 1 <= action.selected <= max(1, state.candidates)
    return action


# --------------------------------------------------------------------------- strategies

FRAGMENTS = [
    "<select>",
    "</select>",
    "2",
    "²",
    "-1",
    "<think>",
    "</think>",
    "<judge>",
    "</judge>",
    "<tool_call>",
    "</tool_call>",
    "<TOOL_CALL>",
    "<tool_call >",
    "<answer>",
    "</answer>",
    "<tools>",
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    '"',
    "'",
    "\\",
    ":",
    ",",
    "\n",
    " ",
    "```",
    "```json\n",
    "\n```",
    '"name"',
    '"arguments"',
    '"parameters"',
    "'name'",
    "'arguments'",
    '"caption"',
    '"instruction"',
    '"image_generation_tool"',
    '"image_editing_tool"',
    "'image_generation_tool'",
    "image_editing_tool",
    '"a red apple"',
    "True",
    "False",
    "None",
    "null",
    "NaN",
    "Infinity",
    "-",
    "1e999",
    "0x1F",
    "1j",
    "b'x'",
    "{1, 2}",
    "(1,)",
    "\\u0000",
    "\\ud800",
    "\x00",
    "1" * 5000,
    "[" * 10_000,
    "{" * 5_000,
    "(" * 1_000,
    "-" * 5_000,
    '{"a":' * 3_000,
    '{"name": "image_generation_tool", "arguments": {"caption": "a cat"}}',
    "{'name': 'image_editing_tool', 'arguments': {'instruction': 'make it blue'}}",
    '{"name": ["image_generation_tool"]}',
    '{"name": {"x": 1}, "arguments": {}}',
    '{"name": "image_generation_tool", "arguments": "{\\"caption\\": 1}"}',
]

fragment_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=12
).map("".join)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4),
    ),
    max_leaves=20,
)
argument_keys = st.sampled_from(["arguments", "parameters", "args", "input", "argument"])


@st.composite
def near_valid_calls(draw: st.DrawFn) -> str:
    """A tool call that is almost right: real or random names, arbitrary argument values."""
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        obj["name"] = draw(
            st.one_of(st.sampled_from(TOOL_NAMES), st.text(max_size=20), json_values)
        )
    if draw(st.booleans()):
        arguments = draw(
            st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {},
                    optional={"caption": json_values, "instruction": json_values},
                ),
                st.dictionaries(st.sampled_from(["caption", "instruction", "x"]), json_scalars),
            )
        )
        if draw(st.booleans()):
            arguments = json.dumps(arguments)
        obj[draw(argument_keys)] = arguments
    payload = json.dumps(obj) if draw(st.booleans()) else repr(obj)
    wrapper = draw(
        st.sampled_from(
            [
                "<tool_call>{}</tool_call>",
                "<tool_call>\n{}\n",
                "<think>t</think><tool_call>```json\n{}\n```</tool_call>",
                "<judge>j</judge>Calling {} now",
                "```\n{}\n```",
                "{}",
                "<tool_call>{}</tool_call><answer>done</answer>",
                "<tool_call>{}</tool_call><tool_call>{}</tool_call>",
            ]
        )
    )
    return wrapper.replace("{}", payload)


# --------------------------------------------------------------------------- properties


@settings(max_examples=300)
@given(reply=st.text(), state=states)
@example(reply="", state=STATES[0])
@example(reply='{"name": ["image_generation_tool"]}', state=STATES[0])
def test_arbitrary_text_parses_or_raises_protocol_error(reply: str, state: ProtocolState) -> None:
    parse_or_protocol_error(reply, state)


@settings(max_examples=300)
@given(reply=fragment_text, state=states)
@example(reply="<tool_call>" + "[" * 10_000, state=STATES[0])
@example(reply="[" * 10_000, state=STATES[1])
@example(reply="<tool_call>{'a': " + "-" * 5_000 + "1}", state=STATES[0])
@example(reply='<tool_call>{"a": ' + "1" * 5000 + "}", state=STATES[0])
@example(reply="{'name': 'image_generation_tool', 'x': " + "1" * 5000 + "}", state=STATES[0])
@example(reply='```\n{"name": {"x": 1}}\n```', state=STATES[1])
def test_protocol_fragments_parse_or_raise_protocol_error(reply: str, state: ProtocolState) -> None:
    parse_or_protocol_error(reply, state)


@settings(max_examples=300)
@given(reply=near_valid_calls(), state=states)
def test_near_valid_calls_parse_or_raise_protocol_error(reply: str, state: ProtocolState) -> None:
    parse_or_protocol_error(reply, state)


@settings(max_examples=300)
@given(
    selection=st.one_of(st.text(max_size=6), st.integers(-5, 10).map(str)),
    rest=st.sampled_from(["<answer>ok</answer>", '<tool_call>{"name": "x"}', "", "<judge>j"]),
    state=states,
)
@example(selection="²", rest="<answer>ok</answer>", state=STATES[2])
def test_any_selection_parses_or_raises_protocol_error(
    selection: str, rest: str, state: ProtocolState
) -> None:
    parse_or_protocol_error(f"<select>{selection}</select>{rest}", state)


@settings(max_examples=150)
@given(
    caption=st.text(min_size=1).filter(lambda s: s.strip() != ""),
    extra=st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    state=states,
)
def test_any_non_blank_caption_is_accepted_up_to_surrounding_whitespace(
    caption: str, extra: dict[str, Any], state: ProtocolState
) -> None:
    arguments = {**extra, "caption": caption}
    reply = "<tool_call>" + json.dumps({"name": "image_generation_tool", "arguments": arguments})

    action = parse_or_protocol_error(reply, state)

    assert action is not None and action.tool_call is not None
    assert list(action.tool_call.arguments) == ["caption"]  # unknown keys are dropped
    # pydantic strips Unicode White_Space, a subset of what str.strip removes.
    assert action.tool_call.arguments["caption"].strip() == caption.strip()


@pytest.mark.parametrize("state", STATES, ids=["no_image", "one_image", "four_candidates"])
def test_public_parse_raises_only_protocol_error_on_hostile_input(state: ProtocolState) -> None:
    for reply in ["[" * 100_000, "<tool_call>" + "{" * 100_000, "<think>" * 10_000]:
        with pytest.raises(ProtocolError):
            PROTOCOL.parse(reply, state)
