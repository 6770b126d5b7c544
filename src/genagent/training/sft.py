"""Supervised fine-tuning: :class:`SFTTrainer`.

The loss is the negative log-likelihood of the assistant's tokens only (the rows' ``loss_mask``),
on multi-turn conversations with images, from saved trajectories or from chat conversations in
JSONL. It is normalised per token over each optimizer step: the summed NLL of every trained
token of the step's micro-batches (all accumulation micro-batches, all processes), divided by
their number. Long and short conversations therefore weigh by their number of trained tokens,
and the result does not depend on how rows are split into micro-batches.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genagent.errors import ConfigurationError, TrajectoryError
from genagent.training._common import StepResult, Trainer, iter_groups
from genagent.training.config import SFTConfig, SFTFilter

__all__ = [
    "SFTResult",
    "SFTTrainer",
    "find_trajectories",
    "keep_trajectory",
    "load_messages_jsonl",
    "sft_rows",
]

logger = logging.getLogger("genagent.training")


@dataclass
class SFTResult:
    """What :meth:`SFTTrainer.train` did.

    Attributes:
        steps: Optimizer steps done in all (counting steps before a resume).
        final_dir: The saved model (or adapter) and processor.
        losses: The loss of each step run by this call, by step number.
        rows: Rows trained on.
    """

    steps: int
    final_dir: Path
    losses: dict[int, float] = field(default_factory=dict)
    rows: int = 0


class SFTTrainer(Trainer):
    """Supervised fine-tuning with an assistant-only loss (LoRA or full).

    Args:
        config: The configuration (:class:`~genagent.training.config.SFTConfig`).
        rows: Token rows to train on instead of the configuration's data sources.
        resume_from: A checkpoint folder or ``"latest"`` (default: ``config.resume_from``).

    Example:
        ```py
        from genagent.training.config import SFTConfig
        from genagent.training.sft import SFTTrainer

        config = SFTConfig.from_file("sft.toml")
        SFTTrainer(config).train()
        ```
    """

    config: SFTConfig

    def __init__(
        self,
        config: SFTConfig,
        *,
        rows: Sequence[Any] | None = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(config, resume_from=resume_from)
        self._rows: list[Any] | None = list(rows) if rows is not None else None

    @property
    def rows(self) -> list[Any]:
        """The token rows trained on (read from the data sources on first use)."""
        if self._rows is None:
            self._rows = sft_rows(self.config, self.processor)
        return self._rows

    # ------------------------------------------------------------------ loss

    def loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL of the micro-batch's trained tokens, and their number."""
        from genagent.training.data import token_logprobs

        logprobs = token_logprobs(self.runtime.bare_model(model), batch)
        mask = batch.loss_mask.to(logprobs.device)
        selected = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
        return -selected.float().sum(), mask.sum()

    def micro_batches(self, epoch: int, rows: Sequence[Any] | None = None) -> list[Any]:
        """This process's packed micro-batches of an epoch (shuffled with ``seed + epoch``)."""
        from genagent.training.data import pack

        batches = pack(
            list(self.rows if rows is None else rows),
            self.config.max_tokens,
            processor=self.processor,
            shuffle_seed=self.config.seed + epoch,
        )
        world, rank = self.runtime.num_processes, self.runtime.process_index
        return list(batches[rank::world])

    def _groups(self, epoch: int) -> list[list[Any]]:
        return list(
            iter_groups(
                self.micro_batches(epoch),
                self.config.grad_accum,
                drop_last=self.runtime.num_processes > 1,  # every process steps together
            )
        )

    # ------------------------------------------------------------------ training

    def train(self) -> SFTResult:
        """Train for ``max_steps`` (or ``epochs``), saving checkpoints and the final model.

        Returns:
            The steps done, the losses, and where the final model is.

        Raises:
            ConfigurationError: If there is nothing to train on.
        """
        config = self.config
        rows = self.rows
        if not rows:
            raise ConfigurationError(
                "no rows to train on: set `trajectories` or `messages_jsonl` (and check "
                "`filter`, which may have dropped everything)"
            )
        first = self._groups(0)
        if not first:
            raise ConfigurationError(
                f"{len(rows)} rows make no full optimizer step on "
                f"{self.runtime.num_processes} processes with grad_accum={config.grad_accum}; "
                "lower grad_accum or max_tokens, or add data"
            )
        total = config.max_steps or config.epochs * len(first)
        self.setup_optimizer(total)
        result = SFTResult(steps=self.state.step, final_dir=self.output_dir / "final")
        result.rows = len(rows)
        logger.info(
            "SFT: %d rows, %d steps of %d micro-batches, %d process(es)",
            len(rows),
            total,
            config.grad_accum,
            self.runtime.num_processes,
        )
        groups_by_epoch = {0: first}
        try:
            while self.state.step < total:
                if config.max_steps is None and self.state.epoch >= config.epochs:
                    break
                epoch = self.state.epoch
                groups = groups_by_epoch.pop(epoch, None) or self._groups(epoch)
                for group in groups[self.state.batch_in_epoch :]:
                    if self.state.step >= total:
                        break
                    started = time.perf_counter()
                    step = self.train_step(group)
                    result.losses[self.state.step] = step.loss
                    self.log_step(step, started)
                    self.maybe_save()
                else:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
            result.steps = self.state.step
            result.final_dir = self.save_final()
        finally:
            self.close()
        return result

    @torch.no_grad()
    def evaluate(self, rows: Sequence[Any] | None = None) -> StepResult:
        """Mean NLL per trained token on ``rows`` (default: the training rows), no update."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            batches = self.micro_batches(0, rows)
            total_loss = torch.zeros((), device=self.runtime.device)
            total_tokens = 0
            for batch in batches:
                with self.runtime.autocast():
                    summed, _ = self.loss(model, batch)
                total_loss += summed.float()
                total_tokens += self.count_tokens(batch)
            loss = float(self.runtime.sum(total_loss).item())
            tokens = int(self.runtime.sum(torch.tensor(float(total_tokens))).item())
        finally:
            model.train(was_training)
        return StepResult(loss=loss / max(tokens, 1), tokens=tokens)


# --------------------------------------------------------------------------- data sources


def find_trajectories(patterns: Sequence[str]) -> list[Path]:
    """Trajectory folders matching glob patterns, in a stable order.

    A match that is ``trajectory.json`` stands for its folder; a folder without one is
    searched recursively.

    Raises:
        ConfigurationError: If a pattern matches nothing.
    """
    found: dict[Path, None] = {}
    for pattern in patterns:
        # absolute patterns too, which Path.glob does not take
        expanded = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(expanded, recursive=True))  # noqa: PTH207
        hits = 0
        for match in matches:
            path = Path(match)
            if path.name == "trajectory.json" and path.is_file():
                found[path.parent] = None
                hits += 1
            elif (path / "trajectory.json").is_file():
                found[path] = None
                hits += 1
            elif path.is_dir():
                for file in sorted(path.rglob("trajectory.json")):
                    found[file.parent] = None
                    hits += 1
        if hits == 0:
            raise ConfigurationError(
                f"`trajectories` pattern {pattern!r} matches no saved trajectory (a folder "
                "with trajectory.json); check the path (relative paths are relative to the "
                "configuration file)"
            )
    return list(found)


def _reward_of(trajectory: Any, name: str | None) -> float | None:
    rewards = trajectory.rewards
    if name is None:
        if not rewards:
            return None
        if len(rewards) > 1:
            raise ConfigurationError(
                f"trajectory {trajectory.id} has several rewards ({', '.join(sorted(rewards))}); "
                "set filter.reward to the one to compare with filter.min_reward"
            )
        name = next(iter(rewards))
    output = rewards.get(name)
    return None if output is None else output.score


def keep_trajectory(trajectory: Any, spec: SFTFilter) -> bool:
    """Whether a trajectory passes the filter (reward threshold, termination)."""
    if spec.termination is not None:
        termination = trajectory.termination
        value = getattr(termination, "value", termination)
        if value not in spec.termination:
            return False
    if spec.min_reward is not None:
        reward = _reward_of(trajectory, spec.reward)
        if reward is None or reward < spec.min_reward:
            return False
    return True


def _has_token_ids(trajectory: Any) -> bool:
    turns = [t for t in trajectory.turns if not t.interrupted]
    return bool(turns) and all(t.prompt_ids is not None and t.output_ids for t in turns)


def load_messages_jsonl(
    path: str | os.PathLike[str],
) -> list[tuple[list[dict[str, Any]], list[Any]]]:
    """Read conversations from a JSONL file: ``(chat-template messages, PIL images)`` pairs.

    Each line is ``{"messages": [...]}`` with OpenAI-style messages: ``content`` is a string
    or a list of parts, ``{"type": "text", "text": ...}`` or an image as
    ``{"type": "image_url", "image_url": {"url": PATH}}`` / ``{"type": "image", "image": PATH}``
    (paths relative to the JSONL file; ``file://`` URLs and ``data:`` URLs work too).

    Raises:
        ConfigurationError: If a line is not such an object, or an image cannot be read
            (naming the file and line).
    """
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {file}: {exc.strerror or exc}") from None
    out: list[tuple[list[dict[str, Any]], list[Any]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{file}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ConfigurationError(f"{where}: not JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise ConfigurationError(f'{where}: expected {{"messages": [...]}}')
        messages: list[dict[str, Any]] = []
        images: list[Any] = []
        for message in record["messages"]:
            if not isinstance(message, dict) or "role" not in message:
                raise ConfigurationError(f"{where}: a message needs a role and content")
            content = message.get("content", "")
            if isinstance(content, str):
                messages.append({"role": message["role"], "content": content})
                continue
            parts: list[dict[str, Any]] = []
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                elif kind in ("image", "image_url"):
                    source = part.get("image") if kind == "image" else part.get("image_url")
                    if isinstance(source, dict):
                        source = source.get("url")
                    images.append(_open_image(str(source), file.parent, where))
                    parts.append({"type": "image"})
                else:
                    raise ConfigurationError(f"{where}: unknown content part type {kind!r}")
            messages.append({"role": message["role"], "content": parts})
        out.append((messages, images))
    return out


def _open_image(source: str, base: Path, where: str) -> Any:
    import base64
    import io

    from PIL import Image

    try:
        if source.startswith("data:"):
            data = base64.b64decode(source.split(",", 1)[1])
            image = Image.open(io.BytesIO(data))
        else:
            path = Path(source.removeprefix("file://"))
            image = Image.open(path if path.is_absolute() else base / path)
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{where}: cannot read the image {source[:80]!r}: {exc}") from None


def sft_rows(config: SFTConfig, processor: Any) -> list[Any]:
    """The token rows of the configuration's data sources, filtered.

    Saved trajectories use their recorded token ids when they have them (and
    ``use_token_ids``), else their messages through the processor's chat template; JSONL
    conversations always use the chat template. Only assistant tokens are trained.

    Raises:
        ConfigurationError: If a source cannot be read.
    """
    from genagent.training.data import rows_from_messages, rows_from_trajectory
    from genagent.trajectory import Trajectory

    rows: list[Any] = []
    kept = dropped = 0
    for folder in find_trajectories(config.trajectories) if config.trajectories else []:
        try:
            trajectory = Trajectory.load(folder)
        except TrajectoryError as exc:
            raise ConfigurationError(f"cannot read the trajectory in {folder}: {exc}") from None
        if not keep_trajectory(trajectory, config.filter):
            dropped += 1
            continue
        kept += 1
        if config.use_token_ids and _has_token_ids(trajectory):
            rows.extend(rows_from_trajectory(trajectory, split_on_breaks=config.split_on_breaks))
        else:
            row = rows_from_messages(trajectory.to_messages(), processor)
            row.trajectory_id = trajectory.id
            rows.append(row)
    if config.trajectories:
        logger.info("trajectories: %d kept, %d filtered out", kept, dropped)
    for path in config.messages_jsonl:
        for messages, images in load_messages_jsonl(path):
            rows.append(rows_from_messages(messages, processor, images=images))
    return rows
