"""The text protocol between the agent and its policy.

:class:`GenAgentProtocol` speaks the format of the released GenAgent weights: a system prompt
with Qwen-style ``<tools>`` JSON schemas generated from the agent's tools; replies made of
``<think>``, ``<judge>``, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and
``<answer>``; images returned as a user message ``<tool_response>`` image ``</tool_response>``.

Parsing is tolerant where real models are sloppy (a closing tag cut by a stop sequence, a
Python-literal dict, a code fence, prose around the JSON, ``"parameters"`` for ``"arguments"``)
and strict where it matters (unknown tool, invalid arguments, two calls in one reply, an edit or
an answer before any image). Anything unusable raises :class:`~genagent.errors.ProtocolError`,
which the agent shows to the policy; nothing else escapes ``parse``.

Protocols are objects: subclass :class:`ReplyProtocol` to plug in another format.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from genagent.errors import ConfigurationError, ModelVisibleError, ProtocolError
from genagent.images import ImageRef
from genagent.messages import Message
from genagent.policies._base import PolicyOutput
from genagent.tasks import Task
from genagent.tools._base import Tool
from genagent.trajectory import Action, ToolCall

__all__ = [
    "DEFAULT_SYSTEM_TEMPLATE",
    "GenAgentProtocol",
    "ProtocolState",
    "ReplyProtocol",
]

logger = logging.getLogger("genagent.protocol")

MAX_CALL_CHARS = 100_000
"""Tool-call payloads longer than this are rejected before any parsing (hostile input guard)."""

DEFAULT_SYSTEM_TEMPLATE = """\
You are GenAgent, a multimodal assistant that creates images by calling image tools. You cannot \
draw by yourself: you write detailed captions or edit instructions for the tools, look at every \
image they return, judge it against the user's request, and improve it until it is right.

In every reply:
1. Reason step by step inside <think> </think>.
2. After an image has been returned, judge it inside <judge> </judge>: check every object, \
count, colour, position and attribute the user asked for, and say exactly what is wrong.
3. Then do exactly one of:
   - call one tool inside <tool_call> </tool_call> to generate a new image or edit the latest one;
   - if the latest image fully satisfies the request, finish with <answer> </answer> describing \
the final image.

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ProtocolState:
    """What the parser needs to know about the run.

    Attributes:
        tools: The agent's tools by name.
        num_images: Images produced so far (an edit or an answer needs at least one).
        candidates: Candidate images the last tool response showed (``<select>`` ranges over
            them).
    """

    tools: Mapping[str, Tool]
    num_images: int = 0
    candidates: int = 1


class ReplyProtocol(ABC):
    """Base class of reply protocols: how tools are presented and replies are read.

    Attributes:
        name: Recorded in trajectory metadata.
        stop: Stop sequences sent with every policy call.
    """

    name: str = "protocol"
    stop: tuple[str, ...] = ()

    @abstractmethod
    def system_prompt(self, tools: Sequence[Tool]) -> str:
        """The system prompt presenting ``tools``."""

    def user_message(self, task: Task) -> Message:
        """The first user message of a run."""
        return Message.user(task.prompt)

    @abstractmethod
    def parse(self, reply: str, state: ProtocolState) -> Action:
        """Turn a reply into an :class:`Action`.

        Raises:
            ProtocolError: If the reply is unusable; never any other exception.
        """

    def reply_suffix(self, output: PolicyOutput) -> str:
        """Text that completes a reply cut at a stop sequence (default: nothing)."""
        return ""

    @abstractmethod
    def observation(
        self, images: Sequence[ImageRef], text: str | None = None, *, kept: int = 0
    ) -> Message:
        """The message that returns a tool's images to the policy.

        ``kept`` is the candidate (0-based) the run continues with unless the policy selects
        another.
        """

    @abstractmethod
    def error_message(self, error: ModelVisibleError, *, during: str) -> Message:
        """The message that tells the policy what went wrong (``during`` is "reply" or "tool")."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for trajectory metadata."""
        return {"name": self.name, "stop": list(self.stop)}


# --------------------------------------------------------------------------- GenAgent

_TAGS = ("think", "judge", "select", "tool_call", "answer")
_TAG_RE = re.compile(r"<(/?)(think|judge|select|tool_call|answer)\s*>", re.IGNORECASE)
_FENCE_RE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n?|\n?```\s*$")
_FENCED_BLOCK_RE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_TEMPLATE_RE = re.compile(r"\{\{|\}\}|\{tools\}")
_ARGUMENT_KEYS = ("arguments", "parameters", "args", "input")


@dataclass
class _Blocks:
    think: list[str]
    judge: list[str]
    select: list[str]
    tool_call: list[str]
    answer: list[str]
    outside: str  # the reply without the contents of closed think / judge blocks


class GenAgentProtocol(ReplyProtocol):
    """The GenAgent v1 / v2 reply format (see the module docstring).

    Args:
        system_template: The system prompt; ``{tools}`` is replaced by one JSON schema per line.
        user_template: The first user message; ``{prompt}`` is replaced by the request.
        observation_prefix: Text before the returned image(s).
        observation_suffix: Text after the returned image(s).
        stop: Stop sequences (default: the closing tool-call and answer tags).
    """

    name = "genagent"

    def __init__(
        self,
        *,
        system_template: str = DEFAULT_SYSTEM_TEMPLATE,
        user_template: str = "{prompt}",
        observation_prefix: str = "<tool_response>",
        observation_suffix: str = "</tool_response>",
        stop: Sequence[str] = ("</tool_call>", "</answer>"),
    ) -> None:
        if "{tools}" not in system_template:
            raise ConfigurationError("system_template must contain the {tools} placeholder")
        if "{prompt}" not in user_template:
            raise ConfigurationError(
                "user_template must contain the {prompt} placeholder, or the request is lost"
            )
        self.system_template = system_template
        self.user_template = user_template
        self.observation_prefix = observation_prefix
        self.observation_suffix = observation_suffix
        self.stop = tuple(stop)

    # ------------------------------------------------------------------ rendering

    def system_prompt(self, tools: Sequence[Tool]) -> str:
        """The system prompt with one ``{"type": "function", ...}`` schema per tool."""
        lines = "\n".join(json.dumps(t.schema(), ensure_ascii=False) for t in tools)
        # One pass, like str.format: ``{{`` / ``}}`` in the template are unescaped, while the
        # schemas (which contain ``}}`` themselves) are inserted verbatim.
        return _TEMPLATE_RE.sub(
            lambda m: lines if m.group() == "{tools}" else m.group()[0], self.system_template
        )

    def user_message(self, task: Task) -> Message:
        """The user's request."""
        return Message.user(self.user_template.replace("{prompt}", task.prompt))

    def observation(
        self, images: Sequence[ImageRef], text: str | None = None, *, kept: int = 0
    ) -> Message:
        """``<tool_response>`` image [text] ``</tool_response>`` as a user message.

        Several images (candidates shown to the policy) are labelled ``Candidate 1:``, ... and
        followed by a note saying which one is kept (``kept``, 0-based: the judge's choice or
        the first) and that ``<select>k</select>`` keeps candidate ``k`` instead.
        """
        parts: list[str | ImageRef] = [self.observation_prefix]
        if len(images) > 1:
            for k, image in enumerate(images, 1):
                parts.extend((f"Candidate {k}:", image))
            parts.append(
                f"Candidate {kept + 1} is kept. Write <select>k</select> (1 to {len(images)}) "
                "to keep candidate k instead, and judge the candidate you keep."
            )
        else:
            parts.extend(images)
        if text:
            parts.append(text)
        parts.append(self.observation_suffix)
        return Message.user(*parts)

    def error_message(self, error: ModelVisibleError, *, during: str) -> Message:
        """Tool errors come back as a tool response; format errors as a correction request."""
        if during == "tool":
            return Message.user(
                f"{self.observation_prefix}Error: {error.for_model()}{self.observation_suffix}"
            )
        return Message.user(
            f"Your previous reply could not be used: {error.for_model()}\n"
            "Reply again in the required format: <think>...</think>, then either one "
            "<tool_call>...</tool_call>, or, once an image fully satisfies the request, "
            "<judge>...</judge><answer>...</answer>."
        )

    def reply_suffix(self, output: PolicyOutput) -> str:
        """Close a ``<tool_call>`` or ``<answer>`` block left open by a stop sequence.

        Nothing is added when the reply already ends with its closing tag (backends that keep
        the stop string in the text).
        """
        last_open = None
        for match in _TAG_RE.finditer(output.text):
            closing, tag = match.group(1), match.group(2).lower()
            if tag in ("tool_call", "answer"):
                last_open = None if closing else tag
        if last_open is None:
            return ""
        if output.stop in self.stop and output.stop == f"</{last_open}>":
            return output.stop
        return f"</{last_open}>"

    # ------------------------------------------------------------------ parsing

    def parse(self, reply: str, state: ProtocolState) -> Action:
        """Parse a reply into an action (see the module docstring for the rules).

        Raises:
            ProtocolError: If the reply is unusable.
        """
        try:
            return self._parse(reply, state)
        except ProtocolError:
            raise
        except Exception as exc:  # defence in depth: a policy must never crash a run
            logger.error("unexpected %s while parsing a reply", type(exc).__name__, exc_info=True)
            raise ProtocolError(
                f"the reply could not be parsed ({type(exc).__name__})",
                reply_excerpt=_excerpt(reply),
            ) from exc

    def _parse(self, reply: str, state: ProtocolState) -> Action:
        if not isinstance(reply, str) or not reply.strip():
            raise ProtocolError(
                "the reply is empty", hint="Write <think>...</think> and then a tool call."
            )
        blocks = _split_blocks(reply)
        thought = _first(blocks.think)
        judgment = _first(blocks.judge)
        selected = _parse_select(blocks.select, state)
        if len(blocks.tool_call) > 1:
            raise ProtocolError(
                f"the reply contains {len(blocks.tool_call)} tool calls",
                hint="Call exactly one tool per reply and wait for its result.",
                reply_excerpt=_excerpt(reply),
            )
        if blocks.tool_call and blocks.answer:
            raise ProtocolError(
                "the reply contains both a tool call and an answer",
                hint="Either call a tool, or answer once the latest image is right; not both.",
                reply_excerpt=_excerpt(reply),
            )
        if blocks.answer:
            if state.num_images == 0:
                raise ProtocolError(
                    "the reply answers before any image was generated",
                    hint=f"Call {_generation_hint(state)} first, then judge the image.",
                    reply_excerpt=_excerpt(reply),
                )
            return Action(
                kind="answer",
                thought=thought,
                judgment=judgment,
                selected=selected,
                answer=blocks.answer[0].strip(),
            )
        payload: str | None
        if blocks.tool_call:
            payload = blocks.tool_call[0]
        else:
            payload = _untagged_call(blocks.outside, state)
            if payload is None:
                raise ProtocolError(
                    "the reply has neither a <tool_call> nor an <answer>",
                    hint='Call a tool with <tool_call>{"name": ..., "arguments": {...}}'
                    "</tool_call>, or finish with <answer>...</answer>.",
                    reply_excerpt=_excerpt(reply),
                )
        call = self._parse_call(payload, state)
        return Action(
            kind="tool_call", thought=thought, judgment=judgment, selected=selected, tool_call=call
        )

    def _parse_call(self, payload: str, state: ProtocolState) -> ToolCall:
        obj = _load_object(payload)
        if not isinstance(obj, dict):
            raise ProtocolError(
                "the tool call is not a JSON object",
                hint='Write <tool_call>{"name": "<tool name>", "arguments": {...}}</tool_call>.',
                reply_excerpt=_excerpt(payload),
            )
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(
                'the tool call has no "name"',
                hint=f"Available tools: {_tool_list(state)}.",
                reply_excerpt=_excerpt(payload),
            )
        tool = state.tools.get(name)
        if tool is None:
            raise ProtocolError(
                f"unknown tool {name[:80]!r}",
                hint=f"Available tools: {_tool_list(state)}.",
                reply_excerpt=_excerpt(payload),
            )
        raw_args: Any = {}
        for key in _ARGUMENT_KEYS:
            if key in obj:
                raw_args = obj[key]
                break
        if isinstance(raw_args, str):
            try:
                raw_args = json.loads(raw_args) if raw_args.strip() else {}
            except (ValueError, RecursionError):
                raise ProtocolError(
                    f'the "arguments" of {name} are a string that is not a JSON object',
                    hint='Write "arguments" as an object, e.g. {"caption": "..."}.',
                    reply_excerpt=_excerpt(payload),
                ) from None
        if not isinstance(raw_args, dict) or not all(isinstance(k, str) for k in raw_args):
            raise ProtocolError(
                f'the "arguments" of {name} must be a JSON object with string keys',
                reply_excerpt=_excerpt(payload),
            )
        if tool.requires_image and state.num_images == 0:
            raise ProtocolError(
                f"{name} edits the latest image, but no image exists yet",
                hint=f"Call {_generation_hint(state)} first.",
            )
        try:
            args = tool.parse_args(raw_args)
        except ValidationError as exc:
            schema = json.dumps(tool.schema()["function"]["parameters"])
            raise ProtocolError(
                f"invalid arguments for {name}: {_summarize_validation(exc)}",
                hint=f"The arguments must match: {schema}",
                reply_excerpt=_excerpt(payload),
            ) from None
        return ToolCall(name=name, arguments=args.model_dump(mode="json"))


# --------------------------------------------------------------------------- helpers


def _split_blocks(reply: str) -> _Blocks:
    """Collect the contents of every known block.

    A closed block runs to its own closing tag, whatever it mentions on the way: tags inside a
    thought ("no <answer> yet") or inside a caption ("a sign reading <answer>") are text. A block
    whose closing tag is missing (cut by a stop sequence, or forgotten) ends at the next opening
    tag or at the end of the reply. Stray closing tags are ignored.
    """
    out: dict[str, list[str]] = {t: [] for t in _TAGS}
    matches = list(_TAG_RE.finditer(reply))
    count = len(matches)
    # For each match, the index of the next closing tag of each kind after it (one reverse
    # pass, so that replies full of tags stay linear).
    next_close: dict[str, list[int | None]] = {}
    for tag in _TAGS:
        ahead: list[int | None] = [None] * count
        nearest: int | None = None
        for j in range(count - 1, -1, -1):
            ahead[j] = nearest
            if matches[j].group(1) and matches[j].group(2).lower() == tag:
                nearest = j
        next_close[tag] = ahead
    outside: list[str] = []
    position = 0
    i = 0
    while i < count:
        match = matches[i]
        if match.group(1):
            i += 1
            continue
        tag = match.group(2).lower()
        closing = next_close[tag][i]
        if closing is not None:
            out[tag].append(reply[match.end() : matches[closing].start()])
            if tag in ("think", "judge"):
                outside.append(reply[position : match.start()])
                position = matches[closing].end()
            i = closing + 1
            continue
        end, following = len(reply), count
        for j in range(i + 1, count):
            if not matches[j].group(1):
                end, following = matches[j].start(), j
                break
        out[tag].append(reply[match.end() : end])
        i = following
    outside.append(reply[position:])
    return _Blocks(
        think=out["think"],
        judge=out["judge"],
        select=out["select"],
        tool_call=out["tool_call"],
        answer=out["answer"],
        outside="".join(outside),
    )


def _parse_select(blocks: list[str], state: ProtocolState) -> int | None:
    """The candidate a ``<select>k</select>`` keeps (1-based), checked against what was shown."""
    if not blocks:
        return None
    if len(blocks) > 1:
        raise ProtocolError(
            "the reply selects more than once", hint="Write one <select>k</select>."
        )
    text = blocks[0].strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        raise ProtocolError(
            f"<select> must hold a candidate number, got {text[:40]!r}",
            hint="Write e.g. <select>2</select>.",
        )
    k = int(text)
    shown = max(1, state.candidates)
    if not 1 <= k <= shown:
        raise ProtocolError(
            f"<select>{k}</select> names no candidate: the last tool response showed {shown}",
            hint=f"Choose a number from 1 to {shown}.",
        )
    return k


def _first(items: list[str]) -> str | None:
    for item in items:
        if item.strip():
            return item.strip()
    return None


def _strip_fence(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        match = _FENCED_BLOCK_RE.search(text)
        if match:
            return match.group(1).strip()
    return _FENCE_RE.sub("", text).strip()


def _load_object(payload: str) -> Any:
    """Parse JSON, then a Python literal, then the first balanced ``{...}`` inside prose."""
    if len(payload) > MAX_CALL_CHARS:
        raise ProtocolError(
            f"the tool call is {len(payload):,} characters long (limit {MAX_CALL_CHARS:,})",
            hint="Keep tool arguments short.",
        )
    text = _strip_fence(payload)
    candidates = [text]
    candidates.extend(c for c in _balanced_objects(text) if c != text)
    for candidate in candidates:
        for loader in (_json_loads, _literal_loads):
            value = loader(candidate)
            if value is not _FAIL:
                return value
    raise ProtocolError(
        "the tool call is not valid JSON",
        hint='Write <tool_call>{"name": "<tool name>", "arguments": {...}}</tool_call> with '
        "double-quoted keys and strings.",
        reply_excerpt=_excerpt(payload),
    )


_FAIL = object()


def _json_loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _FAIL


def _literal_loads(text: str) -> Any:
    if not text.lstrip().startswith("{"):
        return _FAIL
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _FAIL


def _balanced_objects(text: str, limit: int = 8) -> list[str]:
    """Up to ``limit`` balanced ``{...}`` substrings, scanning strings correctly."""
    found: list[str] = []
    start = text.find("{")
    tries = 0
    while start != -1 and tries < limit:
        tries += 1
        depth = 0
        quote: str | None = None
        escaped = False
        for k in range(start, len(text)):
            ch = text[k]
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start : k + 1])
                    break
        start = text.find("{", start + 1)
    return found


def _untagged_call(reply: str, state: ProtocolState) -> str | None:
    """A tool call written without tags: a fenced or bare JSON object naming a known tool."""
    candidates = [m.group(1) for m in _FENCED_BLOCK_RE.finditer(reply)]
    candidates.extend(_balanced_objects(reply))
    for candidate in candidates:
        if len(candidate) > MAX_CALL_CHARS:
            continue
        for loader in (_json_loads, _literal_loads):
            value = loader(candidate.strip())
            if isinstance(value, dict) and _is_known_name(value.get("name"), state):
                return candidate
    return None


def _is_known_name(name: Any, state: ProtocolState) -> bool:
    # ``name`` may be any JSON value (a list, an object): only a string can name a tool.
    return isinstance(name, str) and name in state.tools


def _summarize_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "arguments"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def _tool_list(state: ProtocolState) -> str:
    return ", ".join(sorted(state.tools)) or "none"


def _generation_hint(state: ProtocolState) -> str:
    for name, tool in state.tools.items():
        if not tool.requires_image:
            return name
    return "a generation tool"


def _excerpt(text: str, limit: int = 300) -> str:
    text = text if isinstance(text, str) else repr(text)
    return text if len(text) <= limit else text[:limit] + "..."
