"""Test doubles: ``ScriptedPolicy`` replays fixed replies, ``FunctionPolicy`` calls a function."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from genagent.errors import PolicyError
from genagent.messages import Message
from genagent.policies._base import PolicyOutput, SamplingParams

__all__ = ["FunctionPolicy", "ScriptedPolicy"]

Reply = str | Callable[[Sequence[Message]], str]
ReplyFunction = Callable[..., "str | PolicyOutput | Awaitable[str | PolicyOutput]"]


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """Cut ``text`` before the earliest stop sequence, as OpenAI-compatible servers do.

    Returns:
        The cut text and the stop sequence that matched (``None`` if none did).
    """
    best: tuple[int, str] | None = None
    for s in stop:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return text, None
    return text[: best[0]], best[1]


class ScriptedPolicy:
    """A policy that replays a script: the test double of the SDK.

    The k-th policy call of a conversation (counted by the assistant messages it has) gets the
    k-th reply, so one ScriptedPolicy can serve many concurrent runs, each following the script.

    Replies are strings or functions of the conversation. Like a real server, it cuts each reply
    at the first stop sequence the agent asks for (disable with ``apply_stop=False``), so scripts
    can be written with closing tags and still exercise the stop-sequence path.

    Args:
        replies: The replies, in order.
        name: Recorded as the policy's name.
        cycle: Start again from the first reply when a conversation outgrows the script.
        apply_stop: Cut replies at stop sequences.

    Attributes:
        calls: The message lists of every call, in order (for assertions).

    Example:
        ```python
        from genagent import ScriptedPolicy
        policy = ScriptedPolicy([
            '<think>Plan.</think><tool_call>{"name": "image_generation_tool", '
            '"arguments": {"caption": "a red apple"}}</tool_call>',
            "<judge>The apple is red.</judge><answer>Done.</answer>",
        ])
        ```
    """

    def __init__(
        self,
        replies: Iterable[Reply],
        *,
        name: str = "scripted",
        cycle: bool = False,
        apply_stop: bool = True,
    ) -> None:
        self.replies: list[Reply] = list(replies)
        self.name = name
        self.cycle = cycle
        self.apply_stop = apply_stop
        self.calls: list[list[Message]] = []
        self._lock = threading.Lock()

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] = (),
        sampling: SamplingParams | None = None,
    ) -> PolicyOutput:
        """Return the next scripted reply."""
        start = time.perf_counter()
        # The k-th reply of every conversation is replies[k]: concurrent runs sharing the
        # policy each follow the script from its start.
        position = sum(1 for m in messages if m.role == "assistant")
        if position >= len(self.replies):
            if not (self.cycle and self.replies):
                raise PolicyError(
                    f"ScriptedPolicy ran out of replies: turn {position + 1} of the conversation "
                    f"asked for a reply and the script has {len(self.replies)}; give it more "
                    "replies, a function reply, or cycle=True"
                )
            position %= len(self.replies)
        reply = self.replies[position]
        with self._lock:
            self.calls.append(list(messages))
        text = reply(messages) if callable(reply) else reply
        matched: str | None = None
        if self.apply_stop:
            text, matched = apply_stop(text, stop)
        return PolicyOutput(
            text=text,
            stop=matched,
            finish_reason="stop",
            latency_s=time.perf_counter() - start,
            model=self.name,
        )

    def describe(self) -> dict[str, Any]:
        """Metadata for trajectories."""
        return {"name": self.name, "class": "genagent.ScriptedPolicy", "replies": len(self.replies)}


class FunctionPolicy:
    """A policy backed by a function ``fn(messages, stop, sampling) -> str | PolicyOutput``.

    The function may be async. Useful for tests and for wrapping an in-house model client.

    Args:
        fn: The function.
        name: Recorded as the policy's name.
        apply_stop: Cut string replies at stop sequences.
    """

    def __init__(self, fn: ReplyFunction, *, name: str = "function", apply_stop: bool = True):
        self.fn = fn
        self.name = name
        self.apply_stop = apply_stop

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] = (),
        sampling: SamplingParams | None = None,
    ) -> PolicyOutput:
        """Call the function and wrap its result."""
        start = time.perf_counter()
        result = self.fn(messages, stop, sampling)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, PolicyOutput):
            return result
        if not isinstance(result, str):
            raise PolicyError(
                f"FunctionPolicy function returned {type(result).__name__}; return a str or a "
                "PolicyOutput"
            )
        matched: str | None = None
        if self.apply_stop:
            result, matched = apply_stop(result, stop)
        return PolicyOutput(
            text=result,
            stop=matched,
            finish_reason="stop",
            latency_s=time.perf_counter() - start,
            model=self.name,
        )
