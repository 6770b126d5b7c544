"""Training data: trajectories to token rows, packing into micro-batches, log-probs, exports.

A :class:`TokenRow` is one training sequence built from the exact token ids each policy call
recorded (token-in/token-out: text is never tokenized again to recover them). Its loss mask is 1
on the tokens the policy generated and 0 on everything else (system prompt, user request, tool
observations, images, template glue), and it carries the recorded log-probabilities, the images
in order, and the rewards. :func:`rows_from_messages` builds the same kind of row from chat
messages (SFT data without recorded ids). :func:`pack` packs rows end to end into
:class:`MicroBatch` es by token budget (``cu_seqlens``); :func:`token_logprobs` runs a packed
micro-batch through a model (the fused varlen attention when the model uses it, transformers'
block-diagonal mask otherwise). :func:`export_trl` / :func:`export_verl` write the rows as JSONL
for TRL's trainers and verl's agent loop; :func:`read_jsonl_rows` reads token exports back.

torch is imported inside the functions that need it: importing this module does not import it.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from genagent.errors import ConfigurationError, InvalidImageError, TrajectoryError
from genagent.images import DirectoryImageStore, ImageRef, ImageStore, _atomic_write
from genagent.messages import ImagePart, Message, TextPart
from genagent.trajectory import Trajectory, Turn

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGES_DIR",
    "MicroBatch",
    "TokenRow",
    "collate",
    "export_trl",
    "export_verl",
    "pack",
    "read_jsonl_rows",
    "rope_position_ids",
    "rows_from_messages",
    "rows_from_trajectory",
    "token_logprobs",
]

logger = logging.getLogger("genagent.training")

IMAGES_DIR = "images"
"""Folder, beside an exported JSONL file, that holds its images (``<sha256>.<ext>``)."""

IGNORE_INDEX = -100  # transformers' "no target" label

_NO_IDS = (
    "this trajectory has no token ids: record it with TransformersPolicy or a vLLM server "
    "returning token ids (OpenAIPolicy(return_token_ids=True)), or train on its text with "
    "rows_from_messages(trajectory.to_messages(), processor)"
)
_VARLEN_ATTENTION = "genagent_varlen"  # genagent.kernels.hf.ATTENTION_NAME (no import needed)


# --------------------------------------------------------------------------- rows


@dataclass
class TokenRow:
    """One training sequence: exact token ids, what to train on, and what it earned.

    Attributes:
        input_ids: The token ids, exactly as the policy saw and generated them.
        loss_mask: 1 on the tokens the policy generated (each turn's output ids, its
            end-of-turn token included), 0 on everything else.
        old_logprobs: Per token, the log-probability the policy recorded when it sampled the
            token (0.0 on context tokens); ``None`` when the policy did not record them.
        images: The images whose placeholder tokens appear in ``input_ids``, in order.
        turn_of_token: Per token, the index of the turn whose output it is (-1 for context).
        turn_rewards: Per-turn rewards (reflection accuracy per verdict, format penalties), by
            turn index; only turns trained in this row.
        reward: The trajectory's reward.
        advantage: The row's advantage, filled by RL (e.g. group-normalised rewards).
        trajectory_id: Id of the trajectory the row comes from.
        group_id: Id of the rollout group (same prompt), for group-relative advantages.
        metadata: Where the row comes from (turns, skipped turns, ...).
        messages: The conversation the ids encode (context and trained replies), for the
            text-based exports; ``None`` when unknown.
    """

    input_ids: list[int]
    loss_mask: list[int]
    old_logprobs: list[float] | None
    images: list[ImageRef]
    turn_of_token: list[int]
    turn_rewards: dict[int, float]
    reward: float | None
    advantage: float | None = None
    trajectory_id: str = ""
    group_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[Message] | None = None

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        lengths = {
            "loss_mask": len(self.loss_mask),
            "turn_of_token": len(self.turn_of_token),
        }
        if self.old_logprobs is not None:
            lengths["old_logprobs"] = len(self.old_logprobs)
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ConfigurationError(
                f"TokenRow {self.trajectory_id!r}: {wrong} do not match the {n} input_ids; "
                "every per-token list must have one entry per token"
            )
        if n and self.loss_mask[0]:
            raise ConfigurationError(
                f"TokenRow {self.trajectory_id!r}: the first token is trained, but nothing "
                "precedes it to predict it from; a row starts with context (the prompt)"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_policy_tokens(self) -> int:
        """Number of trained tokens (the policy's own)."""
        return sum(self.loss_mask)

    @property
    def policy_token_ids(self) -> list[int]:
        """The trained token ids, in order (the concatenated outputs of the row's turns)."""
        return [t for t, m in zip(self.input_ids, self.loss_mask, strict=True) if m]

    @property
    def prompt_length(self) -> int:
        """Number of tokens before the first trained token (the whole row if none is)."""
        return next((i for i, m in enumerate(self.loss_mask) if m), len(self.input_ids))


def rows_from_trajectory(
    trajectory: Trajectory,
    *,
    reward: str | float | None = None,
    turn_rewards: Mapping[int, float] | None = None,
    group_id: str | None = None,
    split_on_breaks: bool = True,
    image_token_id: int | None = None,
) -> list[TokenRow]:
    """Token rows of a trajectory, from the token ids each policy call recorded.

    A row is the last turn's ``prompt_ids + output_ids``: every earlier turn's output ids sit at
    their exact offset in it, because each turn's prompt ids start with the previous turn's
    prompt and output ids (checked here). The loss mask is 1 exactly on those output ids.

    Where the prefix breaks (:meth:`~genagent.trajectory.Trajectory.token_prefix_breaks`: a
    hook changed the history, or a policy encoded the conversation again), a new row starts
    at that turn, so that every output token is trained exactly once, on the context the
    policy actually saw. Interrupted turns (no completed reply) and turns without recorded ids
    are not trained: they end the current row, the next turn with ids starts a new one, and
    they are listed in ``metadata["skipped_turns"]``.

    Args:
        trajectory: The trajectory.
        reward: The trajectory reward of every row: the name of a ``trajectory.rewards``
            entry (its score), or a number.
        turn_rewards: Per-turn rewards by turn index (e.g. ``RLRewardOutput.turn_rewards``);
            each row keeps those of its trained turns.
        group_id: The rollout group of the trajectory.
        split_on_breaks: Start a new row where the token prefix breaks (else raise).
        image_token_id: The image placeholder token id; when given, each row is checked to
            hold one placeholder span per image.

    Returns:
        The rows, in turn order (one, unless the prefix breaks or turns were skipped).

    Raises:
        TrajectoryError: If no turn recorded token ids, the recorded ids are inconsistent
            (log-probs of another length, an empty prompt), the prefix breaks and
            ``split_on_breaks`` is false, or the images do not match their placeholders.
        ConfigurationError: If ``reward`` names no reward of the trajectory.
    """
    usable = [
        t
        for t in trajectory.turns
        if not t.interrupted and t.prompt_ids is not None and t.output_ids is not None
    ]
    if not usable:
        raise TrajectoryError(f"trajectory {trajectory.id}: {_NO_IDS}")
    row_reward = _resolve_reward(trajectory, reward)
    breaks = set(trajectory.token_prefix_breaks())
    chains: list[list[Turn]] = []
    skipped: list[dict[str, Any]] = []
    current: list[Turn] = []
    for turn in trajectory.turns:
        if turn.interrupted or turn.prompt_ids is None or turn.output_ids is None:
            reason = "interrupted" if turn.interrupted else "no token ids"
            skipped.append({"turn": turn.index, "reason": reason})
            if current:
                chains.append(current)
                current = []
            continue
        _check_turn(trajectory, turn)
        if current:
            previous = current[-1]
            assert previous.prompt_ids is not None and previous.output_ids is not None
            expected = [*previous.prompt_ids, *previous.output_ids]
            if turn.index in breaks or turn.prompt_ids[: len(expected)] != expected:
                if not split_on_breaks:
                    raise TrajectoryError(
                        f"trajectory {trajectory.id}: the prompt ids of turn {turn.index} do not "
                        f"start with turn {previous.index}'s prompt and output ids (a hook "
                        "changed the history, or the policy encoded the conversation again); "
                        "pass split_on_breaks=True to train each part on its own context"
                    )
                chains.append(current)
                current = []
        current.append(turn)
    if current:
        chains.append(current)

    rows: list[TokenRow] = []
    for k, chain in enumerate(chains):
        row = _chain_row(trajectory, chain, row_reward, turn_rewards or {}, group_id)
        row.metadata.update(
            {"row": k, "rows": len(chains), "skipped_turns": skipped, "source": "trajectory"}
        )
        if image_token_id is not None:
            spans = _count_spans(row.input_ids, image_token_id)
            if spans != len(row.images):
                raise TrajectoryError(
                    f"trajectory {trajectory.id}: the row ending at turn {chain[-1].index} has "
                    f"{spans} image placeholder spans (token {image_token_id}) but its "
                    f"conversation has {len(row.images)} images; is image_token_id the "
                    "policy's image placeholder?"
                )
        rows.append(row)
    return rows


def _resolve_reward(trajectory: Trajectory, reward: str | float | None) -> float | None:
    if reward is None:
        return None
    if isinstance(reward, str):
        found = trajectory.rewards.get(reward)
        if found is None:
            names = ", ".join(sorted(trajectory.rewards)) or "none"
            raise ConfigurationError(
                f"trajectory {trajectory.id} has no reward named {reward!r} (it has: {names}); "
                "score it first (Agent(rewards=...)) or pass the reward as a number"
            )
        return found.score
    return float(reward)


def _check_turn(trajectory: Trajectory, turn: Turn) -> None:
    assert turn.prompt_ids is not None and turn.output_ids is not None
    if not turn.prompt_ids:
        raise TrajectoryError(
            f"trajectory {trajectory.id}: turn {turn.index} recorded empty prompt ids; a "
            "policy call always has a prompt"
        )
    if turn.logprobs is not None and len(turn.logprobs) != len(turn.output_ids):
        raise TrajectoryError(
            f"trajectory {trajectory.id}: turn {turn.index} recorded {len(turn.logprobs)} "
            f"log-probs for {len(turn.output_ids)} output ids; the policy must give one per token"
        )


def _chain_row(
    trajectory: Trajectory,
    chain: list[Turn],
    reward: float | None,
    turn_rewards: Mapping[int, float],
    group_id: str | None,
) -> TokenRow:
    last = chain[-1]
    assert last.prompt_ids is not None and last.output_ids is not None
    ids = [*last.prompt_ids, *last.output_ids]
    mask = [0] * len(ids)
    turn_of = [-1] * len(ids)
    has_logprobs = all(t.logprobs is not None for t in chain)
    logprobs: list[float] | None = [0.0] * len(ids) if has_logprobs else None
    for turn in chain:
        assert turn.prompt_ids is not None and turn.output_ids is not None
        start, end = len(turn.prompt_ids), len(turn.prompt_ids) + len(turn.output_ids)
        if ids[start:end] != turn.output_ids:  # guaranteed by the prefix check; kept honest
            raise TrajectoryError(
                f"trajectory {trajectory.id}: turn {turn.index}'s output ids are not at offset "
                f"{start} of the row ending at turn {last.index}"
            )
        mask[start:end] = [1] * (end - start)
        turn_of[start:end] = [turn.index] * (end - start)
        if logprobs is not None:
            assert turn.logprobs is not None
            logprobs[start:end] = turn.logprobs
    context = _context_messages(trajectory, last)
    messages = [*context, last.assistant_message]
    trained = {t.index for t in chain}
    return TokenRow(
        input_ids=ids,
        loss_mask=mask,
        old_logprobs=logprobs,
        images=[ref for m in context for ref in m.images],
        turn_of_token=turn_of,
        turn_rewards={i: float(r) for i, r in turn_rewards.items() if i in trained},
        reward=reward,
        trajectory_id=trajectory.id,
        group_id=group_id,
        metadata={"turns": [t.index for t in chain]},
        messages=messages,
    )


def _context_messages(trajectory: Trajectory, last: Turn) -> list[Message]:
    """The conversation the policy received at ``last`` (what its prompt ids encode)."""
    if last.sent_messages is not None:
        return list(last.sent_messages)
    messages: list[Message] = []
    for turn in trajectory.turns:
        if turn.interrupted:
            continue
        messages.extend(turn.messages)
        if turn is last:
            break
        messages.append(turn.assistant_message)
    return messages


def _count_spans(ids: Sequence[int], token: int) -> int:
    spans, inside = 0, False
    for t in ids:
        if t == token and not inside:
            spans += 1
        inside = t == token
    return spans


def rows_from_messages(
    messages: Sequence[Message | Mapping[str, Any]],
    processor: Any,
    *,
    images: Sequence[Any] | ImageStore | None = None,
    reward: float | None = None,
    trajectory_id: str = "",
    group_id: str | None = None,
) -> TokenRow:
    """A token row from chat messages, tokenized with the processor's chat template (SFT).

    For conversations without recorded ids: ``Trajectory.to_messages()`` of a run by a policy
    that gives no token ids, or a dataset. The template is rendered incrementally: the text
    before each assistant reply is the conversation up to it with the generation prompt, so
    each reply starts where a policy would start generating it. The loss mask covers each
    reply's tokens and the end-of-turn token the template puts right after it
    (``<|im_end|>`` for Qwen), not the template's glue around them. Each piece is tokenized on
    its own, as a policy's prompt and output are. The row ends with the last reply's
    end-of-turn token.

    Args:
        messages: The conversation: genagent :class:`~genagent.messages.Message` objects, or
            chat-template dicts (``{"role": ..., "content": str | [{"type": "text", "text":
            ...}, {"type": "image"}, ...]}``, any role the template knows).
        processor: A transformers processor with a chat template (or a tokenizer, for
            conversations without images).
        images: For chat-template dicts, the images of their ``{"type": "image"}`` parts in
            order (PIL images or :class:`~genagent.images.ImageRef` s). For messages whose
            image references are not bound to a store, the store to read them from (e.g.
            ``DirectoryImageStore(folder / "images")``).
        reward: The row's reward.
        trajectory_id: Recorded on the row.
        group_id: Recorded on the row.

    Returns:
        The row; ``turn_of_token`` numbers the assistant replies from 0. Its ``messages`` are
        the conversation as genagent messages (``None`` if a role is not system, user or
        assistant).

    Raises:
        ConfigurationError: If there is no assistant reply, the template does not render the
            conversation as a growing prefix or rewrites a reply, the images do not match the
            image parts, or the conversation has images and the processor no image processor.
    """
    from genagent.images import MemoryImageStore

    tokenizer = getattr(processor, "tokenizer", processor)
    vision = hasattr(processor, "image_processor")
    supplied: list[Any] = []
    if isinstance(images, ImageStore):
        store: ImageStore = images
    else:
        store = MemoryImageStore()
        supplied = list(images or [])
    conversation: list[dict[str, Any]] = []
    refs: list[ImageRef] = []
    typed: list[Message] | None = []
    for message in messages:
        if isinstance(message, Message):
            for ref in message.images:
                if ref.store is None:
                    ref.bind(store)
            refs.extend(message.images)
            conversation.append(_hf_message(message.role, message.content, vision))
            if typed is not None:
                typed.append(message)
            continue
        role = str(message.get("role", ""))
        parts: list[TextPart | ImagePart] = []
        content = message.get("content", "")
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part.get("type") == "text":
                parts.append(TextPart(text=str(part.get("text", ""))))
                continue
            if not supplied:
                raise ConfigurationError(
                    "the messages have more image parts than images were given; pass "
                    "images=[...] with one image per {'type': 'image'} part, in order"
                )
            image = supplied.pop(0)
            ref = image if isinstance(image, ImageRef) else store.put(image)
            refs.append(ref)
            parts.append(ImagePart(image=ref))
        conversation.append(_hf_message(role, parts, vision))
        if typed is not None and role in ("system", "user", "assistant"):
            typed.append(Message.model_validate({"role": role, "content": tuple(parts)}))
        else:
            typed = None
    if supplied:
        raise ConfigurationError(
            f"{len(supplied)} images were given beyond the messages' image parts; pass one "
            "image per {'type': 'image'} part"
        )
    if refs and not vision:
        raise ConfigurationError(
            "the messages have images but the processor has no image processor; pass the "
            "model's processor (AutoProcessor), not its tokenizer"
        )
    roles = [m["role"] for m in conversation]
    if "assistant" not in roles:
        raise ConfigurationError(
            "the messages have no assistant reply to train on; add the replies, or use them "
            "as a prompt"
        )

    def render(upto: int, generation_prompt: bool) -> str:
        text: str = processor.apply_chat_template(
            conversation[:upto], add_generation_prompt=generation_prompt, tokenize=False
        )
        return text

    specials = sorted(
        {str(t) for t in getattr(tokenizer, "all_special_tokens", [])} | {str(tokenizer.eos_token)},
        key=len,
        reverse=True,
    )
    pieces: list[tuple[str, int]] = []  # (text, assistant reply number, -1 for context)
    done = ""
    replies = 0
    assistant_messages: list[int] = []
    for k, role in enumerate(roles):
        if role != "assistant":
            continue
        before = render(k, True)
        through = render(k + 1, False)
        if not before.startswith(done) or not through.startswith(before):
            raise ConfigurationError(
                f"the chat template does not render the conversation as a growing prefix at "
                f"message {k} (it rewrites earlier turns, e.g. drops past reasoning); train on "
                "recorded token ids (rows_from_trajectory) or use a template that keeps history"
            )
        span = through[len(before) :]
        reply = _text_of(conversation[k])
        if not span.startswith(reply):
            raise ConfigurationError(
                f"the chat template does not render assistant message {k} verbatim, so its "
                "tokens cannot be found; use a template that renders replies as they are"
            )
        rest = span[len(reply) :]
        end = next((s for s in specials if s and rest.startswith(s)), "")
        pieces.append((before[len(done) :], -1))
        pieces.append((reply + end, replies))
        assistant_messages.append(k)
        replies += 1
        done = before + reply + end

    ids: list[int] = []
    mask: list[int] = []
    turn_of: list[int] = []
    pending = list(refs)
    image_token = getattr(processor, "image_token", None)
    for text, index in pieces:
        if not text:
            continue
        count = text.count(image_token) if image_token else 0
        if index >= 0 and count:
            raise ConfigurationError(
                f"assistant reply {index} contains the image placeholder {image_token!r}; "
                "replies must be text"
            )
        piece_images, pending = pending[:count], pending[count:]
        piece_ids = _encode(processor, tokenizer, text, piece_images)
        ids.extend(piece_ids)
        mask.extend([1 if index >= 0 else 0] * len(piece_ids))
        turn_of.extend([index] * len(piece_ids))
    if pending:
        raise ConfigurationError(
            f"{len(pending)} images are not in the rendered conversation before its last "
            "reply (the chat template rendered fewer image placeholders, or images follow "
            "the last reply); a row ends with its last reply"
        )
    return TokenRow(
        input_ids=ids,
        loss_mask=mask,
        old_logprobs=None,
        images=refs,
        turn_of_token=turn_of,
        turn_rewards={},
        reward=reward,
        trajectory_id=trajectory_id,
        group_id=group_id,
        metadata={"source": "messages", "assistant_messages": assistant_messages},
        messages=typed,
    )


def _hf_message(role: str, parts: Sequence[TextPart | ImagePart], vision: bool) -> dict[str, Any]:
    """A message in the chat-template format (as TransformersPolicy renders it)."""
    if not vision:
        return {"role": role, "content": "".join(p.text for p in parts if isinstance(p, TextPart))}
    content: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": part.text})
        else:
            content.append({"type": "image"})
    return {"role": role, "content": content}


def _text_of(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


def _encode(processor: Any, tokenizer: Any, text: str, refs: Sequence[ImageRef]) -> list[int]:
    if refs:
        try:
            decoded = [ref.open().convert("RGB") for ref in refs]
        except InvalidImageError as exc:
            raise ConfigurationError(
                f"{exc}; pass images=DirectoryImageStore(...) to read unbound references"
            ) from None
        out = processor(text=[text], images=decoded, add_special_tokens=False)
        return [int(t) for t in out["input_ids"][0]]
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(t) for t in encoded]


# --------------------------------------------------------------------------- packing


@dataclass
class MicroBatch:
    """Rows packed end to end into one sequence (batch size 1), ready for a forward pass.

    Attributes:
        input_ids: ``(1, T)`` token ids of all rows.
        position_ids: ``(1, T)`` positions, restarting at 0 for each row. Qwen2-VL and
            Qwen2.5-VL use 3-D rope positions instead: :func:`rope_position_ids` computes
            them (``token_logprobs`` does so itself).
        loss_mask: ``(1, T)`` float, 1.0 on the rows' trained tokens.
        labels: ``(1, T)`` next-token targets, already shifted: ``labels[t]`` is the token
            that position ``t`` predicts (``input_ids[t + 1]``) where that token is trained,
            else -100 (never across rows). Do not pass them to a model's ``labels=``
            argument, which shifts again.
        cu_seqlens: ``(n_rows + 1,)`` int32 row boundaries.
        max_seqlen: Length of the longest row.
        old_logprobs: ``(1, T)`` float recorded log-probs (0.0 on context), or ``None`` unless
            every row has them.
        advantages: ``(1, T)`` float, each row's advantage on its trained tokens (0.0
            elsewhere), or ``None`` when no row has one.
        row_slices: ``(start, end)`` of each row in the packed sequence.
        rows: The rows, in packed order.
        pixel_values: The processor's pixel values of the rows' images in order (``None``
            without images).
        image_grid_thw: ``(n_images, 3)`` patch grids of those images (Qwen-VL).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    old_logprobs: torch.Tensor | None
    advantages: torch.Tensor | None
    row_slices: list[tuple[int, int]]
    rows: list[TokenRow]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens in the micro-batch."""
        return int(self.input_ids.shape[-1])

    @property
    def num_loss_tokens(self) -> int:
        """Trained tokens in the micro-batch."""
        return int(self.loss_mask.sum().item())

    def to(self, device: str | torch.device) -> MicroBatch:
        """A copy with every tensor on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return MicroBatch(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            loss_mask=self.loss_mask.to(device),
            labels=self.labels.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            max_seqlen=self.max_seqlen,
            old_logprobs=move(self.old_logprobs),
            advantages=move(self.advantages),
            row_slices=list(self.row_slices),
            rows=list(self.rows),
            pixel_values=move(self.pixel_values),
            image_grid_thw=move(self.image_grid_thw),
        )


def pack(
    rows: Sequence[TokenRow],
    max_tokens: int,
    *,
    processor: Any = None,
    shuffle_seed: int | None = None,
    oversize: Literal["error", "alone"] = "error",
) -> list[MicroBatch]:
    """Pack rows into micro-batches of at most ``max_tokens`` tokens (first-fit decreasing).

    Rows are placed longest first into the first micro-batch with room; inside a
    micro-batch they keep their input order. Every row is whole in exactly one micro-batch.

    Args:
        rows: The rows.
        max_tokens: Token budget of a micro-batch.
        processor: The model's processor, to compute the pixel values of the rows' images
            (required when a row has images).
        shuffle_seed: Shuffle the order of the micro-batches with this seed (first-fit
            decreasing otherwise leaves them sorted by the length of their longest row).
        oversize: What to do with a row longer than ``max_tokens``: ``"error"`` raises,
            ``"alone"`` puts it in a micro-batch of its own and logs a warning.

    Returns:
        The micro-batches.

    Raises:
        ConfigurationError: If ``max_tokens`` is not positive, a row is longer than
            ``max_tokens`` (with ``oversize="error"``), or rows have images and no
            processor is given.
    """
    if max_tokens < 1:
        raise ConfigurationError(f"max_tokens must be >= 1, got {max_tokens}")
    if oversize not in ("error", "alone"):
        raise ConfigurationError(f"oversize must be 'error' or 'alone', got {oversize!r}")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i])
        if n > max_tokens:
            if oversize == "error":
                raise ConfigurationError(
                    f"row {i} (trajectory {rows[i].trajectory_id!r}) has {n} tokens, more than "
                    f"max_tokens={max_tokens}; raise max_tokens, lower max_rounds or the image "
                    "resolution, or pass oversize='alone' to give such rows a micro-batch each"
                )
            logger.warning(
                "row %d (trajectory %r) has %d tokens, more than max_tokens=%d: packed alone",
                i,
                rows[i].trajectory_id,
                n,
                max_tokens,
            )
            bins.append([i])
            room.append(0)
            continue
        for b, left in enumerate(room):
            if n <= left:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(bins)
    return [collate([rows[i] for i in sorted(b)], processor=processor) for b in bins]


def collate(rows: Sequence[TokenRow], *, processor: Any = None) -> MicroBatch:
    """One micro-batch of the given rows, packed end to end in the given order.

    Args:
        rows: The rows (at least one).
        processor: The model's processor, for the pixel values of the rows' images.

    Raises:
        ConfigurationError: If ``rows`` is empty, rows have images but no processor is given,
            some rows have advantages and others not, or a row's image placeholders do not
            match its images.
    """
    import torch

    if not rows:
        raise ConfigurationError("collate needs at least one row")
    ids: list[int] = []
    positions: list[int] = []
    mask: list[float] = []
    labels: list[int] = []
    slices: list[tuple[int, int]] = []
    for row in rows:
        start = len(ids)
        n = len(row)
        ids.extend(row.input_ids)
        positions.extend(range(n))
        mask.extend(float(m) for m in row.loss_mask)
        labels.extend(
            row.input_ids[t + 1] if row.loss_mask[t + 1] else IGNORE_INDEX for t in range(n - 1)
        )
        if n:
            labels.append(IGNORE_INDEX)  # the row's last position predicts nothing of its own
        slices.append((start, start + n))
    bounds = [0, *(end for _, end in slices)]
    old = None
    if all(r.old_logprobs is not None for r in rows):
        old = torch.tensor([[v for r in rows for v in (r.old_logprobs or [])]], dtype=torch.float32)
    with_advantage = [r.advantage is not None for r in rows]
    advantages = None
    if all(with_advantage):
        advantages = torch.tensor(
            [[float(r.advantage or 0.0) * m for r in rows for m in r.loss_mask]],
            dtype=torch.float32,
        )
    elif any(with_advantage):
        missing = [r.trajectory_id for r, a in zip(rows, with_advantage, strict=True) if not a]
        raise ConfigurationError(
            f"some rows have an advantage and others not (e.g. {missing[:3]}); compute "
            "advantages for every row (training.advantages) before packing"
        )
    pixel_values, grid = _pixels(rows, processor)
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        loss_mask=torch.tensor([mask], dtype=torch.float32),
        labels=torch.tensor([labels], dtype=torch.long),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_seqlen=max(len(r) for r in rows),
        old_logprobs=old,
        advantages=advantages,
        row_slices=slices,
        rows=list(rows),
        pixel_values=pixel_values,
        image_grid_thw=grid,
    )


def _pixels(rows: Sequence[TokenRow], processor: Any) -> tuple[Any, Any]:
    refs = [ref for row in rows for ref in row.images]
    if not refs:
        return None, None
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ConfigurationError(
            "the rows have images: pass the model's processor (processor=...) so that their "
            "pixel values can be computed"
        )
    try:
        decoded = [ref.open().convert("RGB") for ref in refs]
    except InvalidImageError as exc:
        raise ConfigurationError(
            f"{exc}; rows read back from JSONL find their images in the images/ folder beside it"
        ) from None
    out = image_processor(images=decoded, return_tensors="pt")
    pixel_values, grid = out["pixel_values"], out.get("image_grid_thw")
    token_id = _image_token_id(processor)
    merge = getattr(image_processor, "merge_size", None)
    if grid is not None and token_id is not None and merge:
        per_image = (grid.prod(-1) // (merge * merge)).tolist()
        at = 0
        for row in rows:
            expected = sum(per_image[at : at + len(row.images)])
            at += len(row.images)
            found = sum(1 for t in row.input_ids if t == token_id)
            if found != expected:
                raise ConfigurationError(
                    f"row of trajectory {row.trajectory_id!r} has {found} image tokens but its "
                    f"{len(row.images)} images need {expected} with this processor; use the "
                    "processor (and max_pixels) the policy ran with"
                )
    return pixel_values, grid


def _image_token_id(processor: Any) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is not None:
        return int(token_id)
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if token is None or tokenizer is None:
        return None
    found = tokenizer.convert_tokens_to_ids(token)
    return int(found) if found is not None else None


# --------------------------------------------------------------------------- log-probs


def _bare(model: Any) -> Any:
    """The transformers model inside a peft wrapper (its LoRA layers stay in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_MISSING = object()


def _fsdp_entry(model: Any) -> tuple[Any, Any, Any]:
    """``(module to call, module whose forward runs inside it, model inside the wrappers)``.

    * DDP (``DistributedDataParallel``) is peeled off: its forward is not called (the
      trainers average the gradients themselves), so the first two are ``None``;
    * FSDP1 (``FullyShardedDataParallel``): call the wrapper, which unshards its parameters
      and then calls the wrapped module;
    * FSDP2 (a module given to ``fully_shard``): call the module itself, whose forward hooks
      unshard its parameters.

    Under FSDP the parameters of the root (the embeddings, the head, the vision tower's patch
    embedding, ...) are shards between forward passes; they are whole only inside the root's
    forward, and gradients are reduce-scattered by hooks registered there. So the parts of the
    model are called from inside the root's own call, never around it.
    """
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return None, None, model
    if not dist.is_available():
        return None, None, model
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, FullyShardedDataParallel):
        inner = model.module
        return model, inner, inner
    if isinstance(model, FSDPModule):
        return model, model, model
    return None, None, model


def _check_not_sharded(model: Any) -> None:
    """Refuse a model inside an FSDP root: its parts would see parameter shards."""
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - torch without distributed
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ConfigurationError(
            f"{type(model).__name__} holds sharded (FSDP2) parameters but is not the module "
            "given to fully_shard: pass the FSDP-wrapped model itself (the trainer's "
            "`model`), so that its parameters are gathered around the computation"
        )


def _call_through(caller: Any, target: Any, compute: Any) -> Any:
    """``compute()`` run as ``target``'s forward, inside ``caller(...)`` (FSDP's hooks)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return compute()

    saved = target.__dict__.get("forward", _MISSING)
    target.forward = forward  # an instance attribute: found before the class's forward
    try:
        return caller()
    finally:
        if saved is _MISSING:
            del target.forward
        else:
            target.forward = saved


def _vision_model(model: Any) -> Any | None:
    """The inner model with ``get_rope_index`` (Qwen2-VL / Qwen2.5-VL), if any."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "get_rope_index"):
        return inner
    return None


def rope_position_ids(model: Any, batch: MicroBatch) -> torch.Tensor:
    """3-D rope positions ``(3, 1, T)`` of a packed micro-batch, each row from 0.

    Qwen2-VL and Qwen2.5-VL give image tokens positions along time, height and width; each row
    gets them from the model's own ``get_rope_index``, as it would alone.

    Raises:
        ConfigurationError: If the model has no ``get_rope_index``.
    """
    import torch

    model = _bare(model)
    inner = _vision_model(model)
    if inner is None:
        raise ConfigurationError(
            f"{type(model).__name__} has no get_rope_index; 3-D rope positions are for "
            "Qwen2-VL and Qwen2.5-VL (other models use batch.position_ids)"
        )
    token_id = int(model.config.image_token_id)
    grid = batch.image_grid_thw
    parts = []
    at = 0
    for row, (start, end) in zip(batch.rows, batch.row_slices, strict=True):
        ids = batch.input_ids[:, start:end]
        row_grid = None
        if row.images and grid is not None:
            row_grid = grid[at : at + len(row.images)].to(ids.device)
            at += len(row.images)
        positions, _ = inner.get_rope_index(
            ids, mm_token_type_ids=(ids == token_id).int(), image_grid_thw=row_grid
        )
        parts.append(positions)
    return torch.cat(parts, dim=-1)


def _attention_implementation(model: Any) -> str:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "_attn_implementation", None) or "")


def token_logprobs(
    model: Any, batch: MicroBatch, *, temperature: float = 1.0, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Per-token log-probabilities of a packed micro-batch under ``model``.

    ``out[0, t] = log p(input_ids[t] | the row's tokens before t)``, aligned with
    ``input_ids`` (and ``loss_mask``, ``old_logprobs``); 0.0 at each row's first token. Every
    row is computed as if it ran alone:

    * with the fused varlen attention (``attn_implementation="genagent_varlen"``, see
      :func:`genagent.kernels.hf.enable_fused_attention`) or flash attention, the row
      boundaries go to the kernel as ``cu_seq_lens_q/k`` and ``max_length_q/k``, and no mask
      is built;
    * with any other attention (``sdpa``, ``eager``), the positions restart at 0 for each
      row and transformers builds its block-diagonal causal mask for packed sequences.

    For Qwen2-VL / Qwen2.5-VL the image features are computed first (with the vision
    tower's own attention) and the language model gets the 3-D rope positions of
    :func:`rope_position_ids`. Gradients flow when called outside ``torch.no_grad()``.

    Args:
        model: A transformers causal LM or Qwen-VL model, or a peft model around one (its
            base model is called, LoRA layers included), or such a model as distributed
            training wrapped it: DDP is peeled off (its forward is not called: average the
            gradients yourself, as the trainers do); under FSDP (``FullyShardedDataParallel``
            or ``fully_shard``) pass the wrapped root itself: the parts are then called from
            inside its forward, where its parameters are whole and its gradient hooks run.
        batch: The micro-batch (moved to the model's device here).
        temperature: Divide the logits by it first, as sampling at that temperature did
            (recorded log-probs are of the tempered distribution).
        chunk_tokens: Positions whose vocabulary log-softmax is computed at once (bounds the
            float32 copy of the logits).

    Returns:
        ``(1, T)`` float32 log-probabilities.

    Raises:
        ConfigurationError: If the micro-batch has images and the model is not a Qwen-VL
            model, its image tokens do not match the image features, ``temperature`` is
            not positive, or ``model`` is a part of an FSDP2 model rather than its root.
    """
    if not temperature > 0:
        raise ConfigurationError(f"temperature must be > 0, got {temperature}")
    caller, target, inner = _fsdp_entry(model)
    bare = _bare(inner)

    def compute() -> torch.Tensor:
        return _parts_logprobs(bare, batch, temperature, chunk_tokens)

    if caller is None:
        _check_not_sharded(bare)
        return compute()
    out: torch.Tensor = _call_through(caller, target, compute)
    return out


def _parts_logprobs(
    model: Any, batch: MicroBatch, temperature: float, chunk_tokens: int
) -> torch.Tensor:
    """:func:`token_logprobs` on the bare model: its parts called one by one."""
    import torch

    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    implementation = _attention_implementation(model)
    varlen = implementation == _VARLEN_ATTENTION or "flash" in implementation
    vision = _vision_model(model) is not None
    inputs: dict[str, Any] = {"use_cache": False}
    if vision:
        rope = rope_position_ids(model, batch).to(device)
        # a text-position row first tells transformers where packed rows restart (its mask);
        # the varlen kernels get the boundaries as cu_seq_lens instead
        text = batch.position_ids.to(device).unsqueeze(0)
        inputs["position_ids"] = rope if varlen else torch.cat([text, rope], dim=0)
        inputs["inputs_embeds"] = _embed_with_images(model, ids, batch, device)
    else:
        if batch.pixel_values is not None:
            raise ConfigurationError(
                f"the micro-batch has images but {type(model).__name__} is not a Qwen2-VL / "
                "Qwen2.5-VL model; pack text-only rows for it"
            )
        inputs["input_ids"] = ids
        inputs["position_ids"] = batch.position_ids.to(device)
    if varlen:
        cu = batch.cu_seqlens.to(device=device, dtype=torch.int32)
        inputs.update(
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
        )
        if not vision:
            # restarting positions would make transformers build a (T, T) packed mask; the
            # kernel reads the boundaries from cu_seq_lens, so hand it no mask at all
            layer_types = getattr(model.config.get_text_config(), "layer_types", None)
            inputs["attention_mask"] = {t: None for t in (layer_types or ["full_attention"])}
    hidden, head = _hidden_and_head(model, inputs)
    length = ids.shape[1]
    next_logprobs = []
    for start in range(0, length - 1, chunk_tokens):
        end = min(start + chunk_tokens, length - 1)
        logits = head(hidden[0, start:end]).float()
        if temperature != 1.0:
            logits = logits / temperature
        targets = ids[0, start + 1 : end + 1]
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        next_logprobs.append(picked - torch.logsumexp(logits, dim=-1))
    out = torch.zeros(length, dtype=torch.float32, device=device)
    if next_logprobs:
        shifted = torch.cat(next_logprobs)
        starts = torch.zeros(length, dtype=torch.bool, device=device)
        starts[batch.cu_seqlens[:-1].long().to(device)] = True
        out = torch.cat([out[:1], shifted]).masked_fill(starts, 0.0)
    return out.unsqueeze(0)


def _embed_with_images(model: Any, ids: Any, batch: MicroBatch, device: Any) -> Any:
    """Token embeddings with the image features in place of the image tokens.

    Computed apart from the language model's forward so that the packing arguments
    (``cu_seq_lens``) never reach the vision tower, which has its own.
    """
    import torch

    embeds = model.get_input_embeddings()(ids)
    if batch.pixel_values is None:
        return embeds
    features = model.get_image_features(
        batch.pixel_values.to(device),
        image_grid_thw=batch.image_grid_thw.to(device)
        if batch.image_grid_thw is not None
        else None,
    )
    pooled = getattr(features, "pooler_output", features)
    if isinstance(pooled, (list, tuple)):
        pooled = torch.cat(list(pooled), dim=0)
    token_id = int(model.config.image_token_id)
    mask = (ids == token_id).unsqueeze(-1)
    if int(mask.sum()) * embeds.shape[-1] != pooled.numel():
        raise ConfigurationError(
            f"the micro-batch has {int(mask.sum())} image tokens but its images give "
            f"{pooled.shape[0]} features; pack with the processor the policy ran with"
        )
    return embeds.masked_scatter(mask.expand_as(embeds), pooled.to(embeds.dtype))


def _hidden_and_head(model: Any, inputs: dict[str, Any]) -> tuple[Any, Any]:
    """Final hidden states and the head that maps them to logits.

    Models whose forward is ``lm_head(self.model(...)[0])`` give their hidden states, so that
    the logits are computed chunk by chunk; others give their logits and an identity head.
    """
    backbone = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    scaled = any(
        getattr(config, a, None)
        for a in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    if backbone is not None and head is not None and not scaled:
        hidden = backbone(**inputs)[0]
        return hidden, head
    logits = model(**inputs).logits
    return logits, lambda x: x


# --------------------------------------------------------------------------- exports


def _image_entries(refs: Sequence[ImageRef], store: DirectoryImageStore) -> list[dict[str, Any]]:
    entries = []
    for ref in refs:
        if ref not in store:
            try:
                store.put(ref)
            except InvalidImageError as exc:
                raise ConfigurationError(f"cannot export image {ref.sha256[:12]}: {exc}") from None
        entries.append(
            {
                "path": f"{IMAGES_DIR}/{ref.filename}",
                "sha256": ref.sha256,
                "format": ref.format,
                "width": ref.width,
                "height": ref.height,
                "nbytes": ref.nbytes,
            }
        )
    return entries


def _genagent_fields(
    row: TokenRow, images: list[dict[str, Any]], *, tokens: bool = True
) -> dict[str, Any]:
    """Everything a :class:`TokenRow` holds beyond the target format's own fields.

    Text records (``tokens=False``) leave out what only token records need: the per-token
    lists and the conversation, which the record holds itself.
    """
    fields: dict[str, Any] = {
        "trajectory_id": row.trajectory_id,
        "group_id": row.group_id,
        "reward": row.reward,
        "advantage": row.advantage,
        "turn_rewards": [{"turn": t, "reward": r} for t, r in sorted(row.turn_rewards.items())],
        "images": images,
        # free-form: JSON text, so that tables (datasets / Arrow) get one column type
        "metadata": json.dumps(row.metadata, sort_keys=True),
    }
    if tokens:
        fields["old_logprobs"] = row.old_logprobs
        fields["turn_of_token"] = row.turn_of_token
        fields["messages"] = (
            json.dumps([m.model_dump(mode="json") for m in row.messages])
            if row.messages is not None
            else None
        )
    return fields


def _trl_message(message: Message) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": part.text})
        else:
            content.append({"type": "image"})
    return {"role": message.role, "content": content}


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    lines = [json.dumps(r, ensure_ascii=False, allow_nan=False) for r in records]
    data = ("\n".join(lines) + "\n" if lines else "").encode("utf-8")
    try:
        _atomic_write(path, data)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def export_trl(
    rows: Sequence[TokenRow],
    path: str | os.PathLike[str],
    *,
    kind: Literal["sft", "tokens", "grpo"] = "sft",
) -> Path:
    """Write rows as JSONL for TRL's trainers; images go to ``images/`` beside the file.

    * ``"sft"``: conversational language modeling, for ``SFTTrainer`` (VLMs included):
      ``{"messages": [...], "images": ["images/<sha256>.png", ...]}``, each message's
      content a list of ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` parts
      (the images in order). TRL renders the messages with the chat template again; with
      ``assistant_only_loss=True`` it trains every assistant message of the record.
    * ``"tokens"``: pre-tokenized rows, for ``SFTTrainer`` on text-only models:
      ``{"input_ids": [...], "assistant_masks": [...]}`` (TRL skips its own tokenization for
      a dataset with ``input_ids`` and trains where ``assistant_masks`` is 1): the exact ids
      and loss mask. TRL feeds no pixel values with pre-tokenized rows, so rows with images
      are refused.
    * ``"grpo"``: prompt-only conversational records for ``GRPOTrainer``:
      ``{"prompt": [...messages before the first reply], "images": [...]}`` plus the
      ``reward`` / ``trajectory_id`` / ``group_id`` columns (TRL passes extra columns to
      reward functions).

    Every record also has a ``genagent`` column with the rest of the row (ids, reward,
    advantage, per-turn rewards, image hashes, metadata; for ``"tokens"`` also the recorded
    log-probs, the turn of each token and the conversation), which TRL ignores; ``"tokens"``
    files read back with :func:`read_jsonl_rows`. The file is written atomically.

    Args:
        rows: The rows.
        path: The JSONL file to write.
        kind: The record type.

    Returns:
        The path written.

    Raises:
        ConfigurationError: If a row lacks what the kind needs (messages for ``"sft"`` /
            ``"grpo"``; no images for ``"tokens"``), or an image cannot be read.
    """
    target = Path(path)
    store = DirectoryImageStore(target.parent / IMAGES_DIR)
    records: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        images = _image_entries(row.images, store)
        extra = _genagent_fields(row, images, tokens=kind == "tokens")
        paths = [e["path"] for e in images]
        if kind == "tokens":
            if row.images:
                raise ConfigurationError(
                    f"row {i} (trajectory {row.trajectory_id!r}) has images: TRL takes "
                    "pre-tokenized rows for text-only models only; export it with kind='sft' "
                    "(or export_verl, which keeps exact ids with images)"
                )
            records.append(
                {"input_ids": row.input_ids, "assistant_masks": row.loss_mask, "genagent": extra}
            )
            continue
        if row.messages is None:
            raise ConfigurationError(
                f"row {i} (trajectory {row.trajectory_id!r}) has no messages; kind={kind!r} "
                "writes conversations (rows from rows_from_trajectory / rows_from_messages "
                "have them)"
            )
        if kind == "sft":
            records.append(
                {
                    "messages": [_trl_message(m) for m in row.messages],
                    "images": paths,
                    "genagent": extra,
                }
            )
        elif kind == "grpo":
            first = next(
                (k for k, m in enumerate(row.messages) if m.role == "assistant"),
                len(row.messages),
            )
            prompt = row.messages[:first]
            n_images = sum(len(m.images) for m in prompt)
            records.append(
                {
                    "prompt": [_trl_message(m) for m in prompt],
                    "images": paths[:n_images],
                    "reward": row.reward,
                    "trajectory_id": row.trajectory_id,
                    "group_id": row.group_id,
                    "genagent": extra,
                }
            )
        else:
            raise ConfigurationError(f"kind must be 'sft', 'tokens' or 'grpo', got {kind!r}")
    return _write_jsonl(target, records)


def export_verl(rows: Sequence[TokenRow], path: str | os.PathLike[str]) -> Path:
    """Write rows as JSONL in the shape of verl's agent-loop output; images beside the file.

    One record per row, with the fields of verl's ``AgentLoopOutput``:
    ``prompt_ids`` (the tokens before the first policy token), ``response_ids`` (the rest:
    the policy's tokens and the tool observations between them), ``response_mask`` (1 on the
    policy's tokens, 0 on observations), ``response_logprobs`` (recorded log-probs, 0.0 on
    observations; ``null`` when not recorded), ``multi_modal_data`` (``{"image": [paths]}``),
    ``reward_score``, ``num_turns`` (chat messages: user, assistant, tool) and
    ``extra_fields`` (the rest of the row: trajectory and group ids, advantage, per-turn
    rewards, image hashes, metadata). Read back with :func:`read_jsonl_rows`. The file is
    written atomically.

    Args:
        rows: The rows.
        path: The JSONL file to write.

    Returns:
        The path written.

    Raises:
        ConfigurationError: If an image cannot be read.
    """
    target = Path(path)
    store = DirectoryImageStore(target.parent / IMAGES_DIR)
    records = []
    for row in rows:
        images = _image_entries(row.images, store)
        cut = row.prompt_length
        extra = _genagent_fields(row, images)
        extra.pop("old_logprobs")  # in response_logprobs (the prompt part is all 0.0)
        records.append(
            {
                "prompt_ids": row.input_ids[:cut],
                "response_ids": row.input_ids[cut:],
                "response_mask": row.loss_mask[cut:],
                "response_logprobs": (
                    row.old_logprobs[cut:] if row.old_logprobs is not None else None
                ),
                "multi_modal_data": {"image": [e["path"] for e in images]},
                "reward_score": row.reward,
                "num_turns": len(row.messages) if row.messages is not None else 0,
                "extra_fields": extra,
            }
        )
    return _write_jsonl(target, records)


def read_jsonl_rows(path: str | os.PathLike[str]) -> list[TokenRow]:
    """Read rows written by :func:`export_verl` or ``export_trl(kind="tokens")``.

    Images are bound to the ``images/`` folder beside the file.

    Raises:
        TrajectoryError: If the file cannot be read, a line is not JSON, or a record holds
            no token ids (``"sft"`` / ``"grpo"`` records are text: rebuild rows from their
            messages with :func:`rows_from_messages`).
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise TrajectoryError(f"cannot read: {exc.strerror or exc}", path=source) from None
    store = DirectoryImageStore(source.parent / IMAGES_DIR)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise TrajectoryError(f"line {number} is not JSON: {exc}", path=source) from None
        try:
            rows.append(_row_from_record(record, store))
        except (KeyError, TypeError, ValueError) as exc:
            raise TrajectoryError(
                f"line {number} is not a token row ({type(exc).__name__}: {exc}); token rows "
                "come from export_verl or export_trl(kind='tokens'); for 'sft' / 'grpo' records "
                "use rows_from_messages on their messages",
                path=source,
            ) from None
    return rows


def _row_from_record(record: dict[str, Any], store: DirectoryImageStore) -> TokenRow:
    if "response_ids" in record:
        extra = record["extra_fields"]
        prompt, response = list(record["prompt_ids"]), list(record["response_ids"])
        ids = prompt + response
        mask = [0] * len(prompt) + list(record["response_mask"])
        response_logprobs = record.get("response_logprobs")
        old = (
            [0.0] * len(prompt) + [float(v) for v in response_logprobs]
            if response_logprobs is not None
            else None
        )
        reward = record.get("reward_score")
    elif "input_ids" in record:
        extra = record["genagent"]
        ids = list(record["input_ids"])
        mask = list(record["assistant_masks"])
        old = extra.get("old_logprobs")
        reward = extra.get("reward")
    else:
        raise KeyError("neither response_ids nor input_ids")
    images = [
        ImageRef(
            sha256=e["sha256"],
            format=e["format"],
            width=e["width"],
            height=e["height"],
            nbytes=e["nbytes"],
        ).bind(store)
        for e in extra.get("images") or []
    ]
    messages_text = extra.get("messages")
    messages = (
        [Message.model_validate(m) for m in json.loads(messages_text)]
        if messages_text is not None
        else None
    )
    if messages is not None:
        for message in messages:
            for part in message.content:
                if isinstance(part, ImagePart):
                    part.image.bind(store)
    advantage = extra.get("advantage")
    return TokenRow(
        input_ids=[int(t) for t in ids],
        loss_mask=[int(m) for m in mask],
        old_logprobs=[float(v) for v in old] if old is not None else None,
        images=images,
        turn_of_token=[int(t) for t in extra["turn_of_token"]],
        turn_rewards={int(e["turn"]): float(e["reward"]) for e in extra.get("turn_rewards") or []},
        reward=float(reward) if reward is not None else None,
        advantage=float(advantage) if advantage is not None else None,
        trajectory_id=str(extra.get("trajectory_id") or ""),
        group_id=extra.get("group_id"),
        metadata=json.loads(extra.get("metadata") or "{}"),
        messages=messages,
    )
