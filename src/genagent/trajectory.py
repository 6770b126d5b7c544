"""Trajectories: the complete, replayable record of one agent run.

A :class:`Trajectory` holds the task, every :class:`Turn` (one policy call: the messages added
before it, the reply, its parsed action, token ids and log-probabilities when the policy gives
them, the tool result it caused), every image by reference, the final image, rewards, the
termination reason and timings. ``save(folder)`` writes ``trajectory.json`` plus an ``images/``
folder of content-addressed files; ``load(folder)`` reads it back exactly and checks every image's
hash. ``to_messages()`` rebuilds the chat exactly as the policy saw it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticSerializationError

from genagent.errors import InvalidImageError, TrajectoryError
from genagent.images import DirectoryImageStore, ImageRef, _atomic_write
from genagent.messages import ImagePart, Message
from genagent.rewards._output import RewardOutput
from genagent.tasks import Task

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "TRAJECTORY_FILE",
    "Action",
    "ErrorInfo",
    "RoundRecord",
    "Termination",
    "ToolCall",
    "ToolOutcome",
    "Trajectory",
    "Turn",
    "Usage",
]

TRAJECTORY_FILE = "trajectory.json"
"""Name of the JSON file inside a saved trajectory folder."""

IMAGES_DIR = "images"
SCHEMA_VERSION = 1

_MODEL_CONFIG = ConfigDict(ser_json_inf_nan="constants", validate_assignment=False)


class Termination(str, Enum):
    """Why a run ended."""

    ANSWERED = "answered"
    """The policy gave its answer (it judged an image good enough)."""
    MAX_ROUNDS = "max_rounds"
    """The agent produced ``max_rounds`` images."""
    MAX_TURNS = "max_turns"
    """The agent made ``max_turns`` policy calls."""
    BUDGET = "budget"
    """The time budget was spent."""
    ERROR = "error"
    """The run failed: too many unusable replies, or a run-ending error (see ``error``)."""
    CANCELLED = "cancelled"
    """The caller stopped iterating the run."""


class ErrorInfo(BaseModel):
    """A recorded error (type and message; never a traceback)."""

    model_config = _MODEL_CONFIG

    type: str
    message: str
    hint: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """Summarise ``exc``."""
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        return cls(type=type(exc).__name__, message=message, hint=getattr(exc, "hint", None))


class ToolCall(BaseModel):
    """A tool call the policy made.

    Attributes:
        id: Unique id of the call within the run.
        name: The tool's name.
        arguments: The arguments after validation against the tool's ``Args`` model.
    """

    model_config = _MODEL_CONFIG

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Action(BaseModel):
    """What a reply asks for, once parsed by the protocol.

    Attributes:
        kind: ``"tool_call"`` or ``"answer"``.
        thought: The reply's reasoning (``<think>``), if any.
        judgment: The reply's verdict on the latest image (``<judge>``), if any.
        selected: The candidate the reply keeps (``<select>k</select>``, 1-based), when the last
            tool response showed several.
        tool_call: The call, when ``kind == "tool_call"``.
        answer: The answer text, when ``kind == "answer"``.
    """

    model_config = _MODEL_CONFIG

    kind: Literal["tool_call", "answer"]
    thought: str | None = None
    judgment: str | None = None
    selected: int | None = None
    tool_call: ToolCall | None = None
    answer: str | None = None


class Usage(BaseModel):
    """Token counts of policy calls."""

    model_config = _MODEL_CONFIG

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from a cache (the previous turn's keys and values, or a server's
    prefix cache) instead of being encoded again."""

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
        )

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class ToolOutcome(BaseModel):
    """What one tool call produced.

    Attributes:
        tool: The tool's name.
        call: The call as executed, recorded only when a ``before_tool`` hook replaced the
            policy's (which stays in ``Turn.action``).
        round: The image round this call produced (1-based), or ``None`` if it produced no image.
        images: Indices into ``Trajectory.images`` of every image produced (all candidates).
        selected: Position in ``images`` of the image that continues the run (the one edited
            next, and final if the run stops here).
        selected_by: Who chose it: ``"judge"`` (the agent's judge scored the candidates),
            ``"policy"`` (a ``<select>k</select>`` in the next reply) or ``"default"`` (the
            first candidate).
        seeds: The seed used for each image, when the tool reports them.
        scores: The judge's score for each candidate, when a judge chose among them.
        text: Text the tool returned alongside its images.
        metadata: What the tool reported about the call (size, steps, model, ...).
        latency_s: Wall time of the call, including candidates and judging.
        error: The error shown to the model, if the call failed.
    """

    model_config = _MODEL_CONFIG

    tool: str
    call: ToolCall | None = None
    round: int | None = None
    images: list[int] = Field(default_factory=list)
    selected: int | None = None
    selected_by: Literal["default", "judge", "policy"] | None = None
    seeds: list[int | None] = Field(default_factory=list)
    scores: list[float | None] | None = None
    text: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    latency_s: float = 0.0
    error: ErrorInfo | None = None


class Turn(BaseModel):
    """One policy call and what followed from it.

    Attributes:
        index: Position in the run (0-based).
        messages: Messages added to the conversation just before this call (the system prompt
            and user request for the first turn; the tool response or error message after).
        sent_messages: The full message list actually sent, recorded only when a hook replaced it.
        reply: The policy's text exactly as generated.
        interrupted: The policy call did not complete (the time budget ran out, the run was
            cancelled, or the policy failed): there is no reply, and ``to_messages()`` leaves
            the turn out.
        reply_suffix: Text the protocol appended to close a reply cut at a stop sequence (e.g.
            ``"</tool_call>"``); the conversation continues with ``reply + reply_suffix``.
        action: The parsed action, or ``None`` if the reply could not be used.
        error: The error shown to the model after this turn (protocol or tool), if any.
        tool_result: The outcome of the tool call this turn made, if any.
        prompt_ids: Exact prompt token ids, when the policy reports them.
        output_ids: Exact generated token ids, when the policy reports them.
        logprobs: Log-probability of each generated token, when reported.
        finish_reason: Why generation stopped (``"stop"``, ``"length"``), when reported.
        usage: Token counts.
        policy_latency_s: Wall time of the policy call.
        started_at: Unix time at which the turn started.
    """

    model_config = _MODEL_CONFIG

    index: int
    messages: list[Message] = Field(default_factory=list)
    sent_messages: list[Message] | None = None
    reply: str = ""
    interrupted: bool = False
    reply_suffix: str = ""
    action: Action | None = None
    error: ErrorInfo | None = None
    tool_result: ToolOutcome | None = None
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    policy_latency_s: float = 0.0
    started_at: float = Field(default_factory=time.time)

    @property
    def assistant_message(self) -> Message:
        """The assistant message this turn added to the conversation."""
        return Message.assistant(self.reply + self.reply_suffix)


@dataclass(frozen=True)
class RoundRecord:
    """One image round of a trajectory (derived from its turns).

    Attributes:
        round: 1-based round number.
        turn_index: The turn whose tool call produced it.
        tool: The tool's name.
        arguments: The call's arguments (caption, instruction, ...).
        image: The image that continued the run.
        candidates: Every image the call produced.
        scores: Judge scores per candidate, if a judge chose.
    """

    round: int
    turn_index: int
    tool: str
    arguments: dict[str, Any]
    image: ImageRef
    candidates: tuple[ImageRef, ...]
    scores: tuple[float | None, ...] | None


class Trajectory(BaseModel):
    """The record of one agent run. See the module docstring.

    Attributes:
        id: Unique id of the run.
        task: The request (prompt and scoring metadata).
        turns: Every policy call, in order.
        images: Every image produced, in order, by reference.
        final_image_index: Index into ``images`` of the final image, if any.
        answer: The policy's final answer text, if it answered.
        termination: Why the run ended (``None`` while it runs).
        error: The error that ended the run, if any.
        rewards: Rewards of the final image, by name.
        metadata: Policy, tools, protocol, seeds, agent settings, versions.
        started_at: Unix time at which the run started.
        wall_s: Wall time of the run.
        policy_s: Time spent in policy calls.
        tool_s: Time spent in tool calls.
        usage: Token counts over all turns.
    """

    model_config = _MODEL_CONFIG

    schema_version: Literal[1] = 1
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    task: Task
    turns: list[Turn] = Field(default_factory=list)
    images: list[ImageRef] = Field(default_factory=list)
    final_image_index: int | None = None
    answer: str | None = None
    termination: Termination | None = None
    error: ErrorInfo | None = None
    rewards: dict[str, RewardOutput] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    started_at: float = Field(default_factory=time.time)
    wall_s: float = 0.0
    policy_s: float = 0.0
    tool_s: float = 0.0
    usage: Usage = Field(default_factory=Usage)

    @model_validator(mode="after")
    def _indices_in_range(self) -> Trajectory:
        """Every image index points at an image (a hand-edited or corrupt file fails to load)."""
        n = len(self.images)
        if self.final_image_index is not None and not 0 <= self.final_image_index < n:
            raise ValueError(f"final_image_index {self.final_image_index} is not an image index")
        for turn in self.turns:
            outcome = turn.tool_result
            if outcome is None:
                continue
            if any(not 0 <= i < n for i in outcome.images):
                raise ValueError(f"turn {turn.index} names an image that does not exist")
            if outcome.selected is not None and not 0 <= outcome.selected < len(outcome.images):
                raise ValueError(
                    f"turn {turn.index} selects candidate {outcome.selected} of "
                    f"{len(outcome.images)}"
                )
        return self

    # ----------------------------------------------------------------- views

    @property
    def prompt(self) -> str:
        """The user's request."""
        return self.task.prompt

    @property
    def final_image_ref(self) -> ImageRef | None:
        """Reference to the final image, if the run produced one."""
        if self.final_image_index is None:
            return None
        return self.images[self.final_image_index]

    @property
    def final_image(self) -> PILImage.Image | None:
        """The final image, decoded with PIL (``None`` if the run produced none)."""
        ref = self.final_image_ref
        return ref.open() if ref is not None else None

    @property
    def rounds(self) -> list[RoundRecord]:
        """The image rounds, in order."""
        records: list[RoundRecord] = []
        for turn in self.turns:
            outcome = turn.tool_result
            if outcome is None or outcome.round is None or outcome.selected is None:
                continue
            candidates = tuple(self.images[i] for i in outcome.images)
            # the call as executed: a before_tool hook's replacement, else the policy's
            call = outcome.call or (turn.action.tool_call if turn.action is not None else None)
            records.append(
                RoundRecord(
                    round=outcome.round,
                    turn_index=turn.index,
                    tool=outcome.tool,
                    arguments=dict(call.arguments) if call is not None else {},
                    image=candidates[outcome.selected],
                    candidates=candidates,
                    scores=tuple(outcome.scores) if outcome.scores is not None else None,
                )
            )
        return records

    @property
    def num_rounds(self) -> int:
        """Number of image rounds."""
        return len(self.rounds)

    def image_after_round(self, k: int) -> ImageRef | None:
        """The image the run would have ended with had it been stopped after round ``k``.

        That is the selected image of the latest round ``<= k``; the final image if the run
        ended earlier; ``None`` if no image exists by then. This is what test-time scaling
        curves are computed from.
        """
        if k < 1:
            raise ValueError(f"rounds are numbered from 1, got {k}")
        latest: ImageRef | None = None
        for record in self.rounds:
            if record.round > k:
                break
            latest = record.image
        return latest

    def token_prefix_breaks(self) -> list[int]:
        """Turns whose prompt ids do not continue the previous turn's ids exactly.

        Token-in/token-out: a turn's prompt ids must begin with the previous turn's prompt ids
        followed by its output ids (what follows is the new observation). Turns without ids on
        either side are not checked. An empty list means training can use the ids as they are.
        """
        breaks: list[int] = []
        previous: Turn | None = None
        for turn in self.turns:
            if turn.interrupted or turn.prompt_ids is None:
                previous = None
                continue
            if previous is not None and previous.output_ids is not None:
                expected = [*(previous.prompt_ids or []), *previous.output_ids]
                if turn.prompt_ids[: len(expected)] != expected:
                    breaks.append(turn.index)
            previous = turn
        return breaks

    def to_messages(self) -> list[Message]:
        """The canonical conversation: system, user, assistant, tool responses, ...

        Replies are included with the protocol's closing suffix. The conversation ends with the
        last reply: an observation or error notice that no policy call followed is not part of
        it, nor is an interrupted turn. Where a ``before_policy`` hook replaced what was sent,
        ``Turn.sent_messages`` holds what the policy actually received.
        """
        messages: list[Message] = []
        for turn in self.turns:
            if turn.interrupted:
                continue
            messages.extend(turn.messages)
            messages.append(turn.assistant_message)
        return messages

    # ----------------------------------------------------------------- persistence

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``trajectory.json`` and ``images/`` into ``folder`` (created if missing).

        The JSON is written atomically, after the images, so a crash never leaves a trajectory
        that names missing images.

        Returns:
            The folder.

        Raises:
            TrajectoryError: If an image cannot be read from its store, or a file cannot be
                written (naming it).
        """
        root = Path(folder)
        store = DirectoryImageStore(root / IMAGES_DIR)
        try:  # serialise first: nothing is written for a trajectory that cannot be saved
            payload = self.model_dump_json(indent=1).encode("utf-8")
        except PydanticSerializationError as exc:
            raise TrajectoryError(
                f"cannot be serialised to JSON ({exc}); keep metadata JSON-compatible",
                path=root / TRAJECTORY_FILE,
            ) from None
        target = root
        try:
            for ref in _all_refs(self):
                target = store.path_of(ref)
                if ref in store:
                    continue
                try:
                    data = ref.read_bytes()
                except InvalidImageError as exc:
                    raise TrajectoryError(str(exc), path=target) from None
                _atomic_write(target, data)
            target = root / TRAJECTORY_FILE
            _atomic_write(target, payload)
        except OSError as exc:
            raise TrajectoryError(f"cannot write: {exc.strerror or exc}", path=target) from None
        return root

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, verify_images: bool = True) -> Trajectory:
        """Read a trajectory saved with :meth:`save`.

        Args:
            folder: The folder (or its ``trajectory.json``).
            verify_images: Check that every image file exists and matches its SHA-256.

        Raises:
            TrajectoryError: Naming the file at fault, if the JSON is missing, truncated, not a
                trajectory, of an unknown schema version, or an image is missing or corrupt.
        """
        root = Path(folder)
        if root.name == TRAJECTORY_FILE and root.is_file():
            root = root.parent
        path = root / TRAJECTORY_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise TrajectoryError(
                "no such file; is this a folder written by Trajectory.save?", path=path
            ) from None
        except OSError as exc:
            raise TrajectoryError(f"cannot read: {exc.strerror}", path=path) from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, ...
            raise TrajectoryError(
                f"not valid JSON (truncated or corrupt?): {exc}", path=path
            ) from None
        if not isinstance(data, dict):
            raise TrajectoryError("not a trajectory: the JSON is not an object", path=path)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TrajectoryError(
                f"unsupported schema_version {version!r} (this genagent reads "
                f"{SCHEMA_VERSION}); upgrade genagent to read it",
                path=path,
            )
        try:
            trajectory = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise TrajectoryError(
                f"does not match the trajectory schema ({exc.error_count()} errors; first at "
                f"{where or '<root>'}: {first['msg']})",
                path=path,
            ) from None
        store = DirectoryImageStore(root / IMAGES_DIR)
        for ref in _all_refs(trajectory):
            ref.bind(store)
            if verify_images:
                _verify_image(store, ref)
        return trajectory


def _all_refs(trajectory: Trajectory) -> list[ImageRef]:
    refs: list[ImageRef] = list(trajectory.images)
    for turn in trajectory.turns:
        for message in (*turn.messages, *(turn.sent_messages or ())):
            refs.extend(p.image for p in message.content if isinstance(p, ImagePart))
    return refs


def _verify_image(store: DirectoryImageStore, ref: ImageRef) -> None:
    import hashlib

    path = store.path_of(ref)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TrajectoryError("image file is missing", path=path) from None
    except OSError as exc:
        raise TrajectoryError(f"cannot read image file: {exc.strerror}", path=path) from None
    if len(data) != ref.nbytes or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise TrajectoryError(
            f"image file is corrupt ({len(data)} bytes, expected {ref.nbytes} with sha256 "
            f"{ref.sha256[:12]}...)",
            path=path,
        )
