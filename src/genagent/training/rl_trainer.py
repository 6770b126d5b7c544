"""The agentic RL trainer: :class:`RLTrainer` (see :mod:`genagent.training.rl`).

Rollouts through the real agent with the model under training, then one optimizer step per
batch of rollout groups, with the shared trainer machinery (LoRA, mixed precision,
accelerate, checkpoints, metrics). Defined apart from :mod:`genagent.training.rl` because it
imports torch; ``from genagent.training.rl import RLTrainer`` works too.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genagent.errors import ConfigurationError
from genagent.tasks import Task
from genagent.training._common import StepResult, Trainer
from genagent.training.rewards import RLReward
from genagent.training.rl import (
    RLConfig,
    RolloutGroup,
    _token_logprobs,
    build_rows,
    config_tasks,
    derive_seed,
    policy_loss,
    rollout_groups,
)

__all__ = ["RLResult", "RLTrainer"]


@dataclass
class RLResult:
    """What :meth:`RLTrainer.train` did.

    Attributes:
        steps: Optimizer steps done in all (counting steps before a resume).
        final_dir: The saved model (or adapter) and processor.
        history: One record per step run by this call (loss, reward mean, groups with
            signal, ...).
    """

    steps: int
    final_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)


class RLTrainer(Trainer):
    """Agentic RL on the model under training: rollouts through the real agent, then updates.

    Each step takes ``tasks_per_step`` tasks, runs :func:`rollout_groups` with an
    :class:`~genagent.Agent` whose policy is a
    :class:`~genagent.policies.TransformersPolicy` wrapping the very model being trained (no
    copy, no server), builds rows with group-normalised advantages (groups without signal are
    dropped) and takes one optimizer step on :func:`policy_loss` with token-level aggregation
    over the whole step (all micro-batches and processes). The policy's key/value caches are
    dropped after every update. Under several processes each one rolls out its own share of
    the tasks.

    Args:
        config: The configuration.
        tools: The agent's tools (default: the simulator's).
        reward: The RL reward (default: ``config.reward.build()``).
        tasks: Training tasks (default: from ``config``).
        policy_kwargs: Extra arguments of the rollout ``TransformersPolicy`` (e.g.
            ``logits_processors``, ``max_batch_size``).
        agent_kwargs: Extra arguments of the rollout ``Agent`` (``protocol``, ``max_retries``,
            ``hooks``, ...); they override the configuration's.
        resume_from: A checkpoint folder, ``"latest"``, or ``None``.
    """

    config: RLConfig

    def __init__(
        self,
        config: RLConfig,
        *,
        tools: Sequence[Any] | None = None,
        reward: RLReward | None = None,
        tasks: Sequence[str | Task] | None = None,
        policy_kwargs: Mapping[str, Any] | None = None,
        agent_kwargs: Mapping[str, Any] | None = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(config, resume_from=resume_from)
        from genagent.agent import Agent
        from genagent.policies._base import SamplingParams
        from genagent.policies.transformers import TransformersPolicy

        self.tasks = [Task.coerce(t) for t in tasks] if tasks is not None else config_tasks(config)
        if not self.tasks:
            raise ConfigurationError(
                "RL needs tasks: set prompts, tasks_jsonl or sim_tasks in the configuration"
            )
        self.reward = reward if reward is not None else config.reward.build()
        self.policy = TransformersPolicy(
            self.runtime.unwrap(self.model),
            self.processor,
            name="policy-under-training",
            model_id=config.model,
            **dict(policy_kwargs or {}),
        )
        if tools is None:
            from genagent.sim import scene_tools

            tools = scene_tools()
        agent_options: dict[str, Any] = {
            "max_rounds": config.max_rounds,
            "sampling": SamplingParams(
                temperature=config.temperature,
                top_p=config.top_p,
                max_new_tokens=config.max_new_tokens,
            ),
            **dict(agent_kwargs or {}),  # protocol=, max_retries=, hooks=, ...
        }
        self.agent = Agent(tools=list(tools), policy=self.policy, **agent_options)
        self._step_metrics: dict[str, float] = {}
        self._ref_model: Any = None
        if config.kl_coef > 0 and config.lora is None:
            self._ref_model = copy.deepcopy(self.runtime.unwrap(self.model)).eval()
            self._ref_model.requires_grad_(False)

    # ------------------------------------------------------------------ loss

    def _logprobs(self, model: Any, batch: Any) -> torch.Tensor:
        from genagent.training.data import token_logprobs

        return _token_logprobs(token_logprobs, model, batch, self.config.temperature)

    def _reference(self, batch: Any) -> torch.Tensor | None:
        import torch

        if self.config.kl_coef <= 0:
            return None
        with torch.no_grad():
            if self._ref_model is not None:
                return self._logprobs(self._ref_model, batch)
            unwrapped = self.runtime.unwrap(self.model)
            with unwrapped.disable_adapter():  # LoRA: the base model is the reference
                return self._logprobs(self.model, batch)

    def loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed clipped policy loss (plus KL) of the micro-batch, and its policy tokens."""
        import torch

        config = self.config
        logp = self._logprobs(model, batch)
        mask = batch.loss_mask.to(logp.device)
        adv = batch.advantages.to(logp.device)
        old = getattr(batch, "old_logprobs", None)
        if config.old_logprobs == "recompute" or old is None:
            with torch.no_grad():
                old = self._logprobs(model, batch)
        old = old.to(logp.device).float()
        old = torch.where(torch.isfinite(old), old, logp.detach().float())
        summed, metrics = policy_loss(
            logp.float(),
            old,
            adv.float(),
            mask.float(),
            clip_low=config.clip_low,
            clip_high=config.clip_high,
            ref_logprobs=self._reference(batch),
            kl_coef=config.kl_coef,
            normalizer=1.0,  # a sum: the base trainer divides by the step's policy tokens
        )
        n = metrics.pop("tokens")
        for key, value in metrics.items():
            self._step_metrics[key] = self._step_metrics.get(key, 0.0) + value * n
        self._step_metrics["_tokens"] = self._step_metrics.get("_tokens", 0.0) + n
        return summed, mask.sum()

    # ------------------------------------------------------------------ training

    def rollouts(self, step: int) -> list[RolloutGroup]:
        """The step's rollout groups (this process's share of the step's tasks)."""
        from genagent._async import run_sync

        config = self.config
        per = config.tasks_per_step
        start = (step * per) % len(self.tasks)
        chosen = [self.tasks[(start + i) % len(self.tasks)] for i in range(per)]
        world, rank = self.runtime.num_processes, self.runtime.process_index
        mine = chosen[rank::world] or chosen[:1]
        model = self.runtime.unwrap(self.model)
        was_training = model.training
        model.eval()
        try:
            return run_sync(
                rollout_groups(
                    self.agent,
                    mine,
                    reward=self.reward,
                    config=config.resample,
                    seed=derive_seed(config.seed, step, rank),
                    concurrency=config.concurrency,
                )
            )
        finally:
            model.train(was_training)

    def train(self) -> RLResult:
        """Run ``max_steps`` RL steps (``epochs`` passes over the tasks when unset)."""
        from genagent.training.data import pack

        config = self.config
        per_epoch = max(1, math.ceil(len(self.tasks) / config.tasks_per_step))
        total = config.max_steps or per_epoch * config.epochs
        self.setup_optimizer(total)
        history: list[dict[str, float]] = []
        while self.state.step < total:
            started = time.perf_counter()
            groups = self.rollouts(self.state.step)
            rows = build_rows(
                groups,
                std_normalize=config.std_normalize,
                min_std=config.min_std,
            )
            totals = [t for g in groups for t in g.totals]
            info = {
                "reward_mean": sum(totals) / len(totals) if totals else 0.0,
                "groups": float(len(groups)),
                "groups_with_signal": float(
                    sum(g.advantages(min_std=config.min_std).has_signal for g in groups)
                ),
                "rows": float(len(rows)),
                "rollout_s": round(time.perf_counter() - started, 4),
            }
            self._step_metrics = {}
            # decided over all processes: a rank without rows still joins the step's
            # collectives (with no micro-batches), or the others would wait for it forever
            local_rows = torch.tensor(float(len(rows)), device=self.runtime.device)
            if float(self.runtime.sum(local_rows).item()) > 0:
                batches = pack(rows, config.max_tokens, processor=self.processor) if rows else []
                result = self.train_step(batches)
            else:  # no group had signal anywhere: nothing to learn from; the step still counts
                self.state.step += 1
                result = StepResult(loss=0.0, tokens=0)
            self.policy.close()  # drop key/value caches computed with the old weights
            n = self._step_metrics.pop("_tokens", 0.0)
            result.extra.update({k: v / max(n, 1.0) for k, v in self._step_metrics.items()})
            result.extra.update(info)
            self.log_step(result, started)
            history.append({"step": float(self.state.step), "loss": result.loss, **result.extra})
            self.maybe_save()
        final = self.save_final()
        self.close()
        return RLResult(steps=self.state.step, final_dir=final, history=history)
