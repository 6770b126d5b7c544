"""The agentic RL trainer: :class:`RLTrainer` (see :mod:`genagent.training.rl`).

Rollouts through the real agent with the model under training (in process, or served by a
vLLM server that is sent the trained LoRA adapter after every ``sync_every`` updates), then
one optimizer step per batch of rollout groups, with the shared trainer machinery (LoRA,
mixed precision, accelerate, checkpoints, metrics). Defined apart from
:mod:`genagent.training.rl` because it imports torch; ``from genagent.training.rl import
RLTrainer`` works too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genagent.errors import ConfigurationError
from genagent.tasks import Task
from genagent.training._common import StepResult, Trainer
from genagent.training.distributed import VLLMSyncError, sync_lora_to_vllm
from genagent.training.rewards import RLReward
from genagent.training.rl import (
    RLConfig,
    RolloutGroup,
    _check_rollout,
    _token_logprobs,
    build_rows,
    config_tasks,
    derive_seed,
    policy_loss,
    rollout_groups,
)

__all__ = ["RLResult", "RLTrainer"]

logger = logging.getLogger("genagent.training")

ROLLOUT_ADAPTERS = "rollout-adapters"
"""Default folder, under ``output_dir``, of the adapters saved for the rollout server."""

_ADAPTER_PATTERN = re.compile(r"^step-(\d+)$")
_NO_TOKEN_IDS = (
    "the rollout policy recorded no token ids for any reply: RL trains on the exact tokens "
    "that were sampled, so the server must return them. Use a vLLM version with "
    "`return_token_ids` (0.10.2 or later) and a policy that asks for them "
    "(OpenAIPolicy(return_token_ids=True), which rollout.backend = 'vllm' builds), or "
    "rollout.backend = 'local'"
)


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
    :class:`~genagent.Agent`, builds rows with group-normalised advantages (groups without
    signal are dropped) and takes one optimizer step on :func:`policy_loss` with token-level
    aggregation over the whole step (all micro-batches and processes). Under several processes
    each one rolls out its own share of the tasks.

    Who serves the rollouts (``config.rollout``):

    * ``backend="local"`` (default): a :class:`~genagent.policies.TransformersPolicy` wrapping
      the very model being trained (no copy, no server); its key/value caches are dropped
      after every update. Under FSDP2 every process gathers the whole parameters once before
      its rollouts and reshards them after
      (:meth:`~genagent.training._common.Runtime.full_parameters`), so that the processes,
      which generate different numbers of tokens, run their forward passes without
      collectives: the whole model is in every process's memory during rollouts (as in verl;
      not so with vLLM rollouts, whose weights live in the server). FSDP1 is refused.
    * ``backend="vllm"``: an :class:`~genagent.policies.OpenAIPolicy` asking the vLLM server
      at ``rollout.base_url`` for the adapter ``rollout.adapter_name``, with token ids and
      log-probabilities. Before the first rollouts (also after a resume) and after every
      ``rollout.sync_every`` optimizer steps (and the last), every process takes part in
      saving the LoRA adapter to ``rollout.adapter_dir/step-N``, the main process asks the
      server to load it in place (:func:`~genagent.training.distributed.sync_lora_to_vllm`),
      and every process waits for that before the next rollouts. A refused sync raises
      :class:`~genagent.training.distributed.VLLMSyncError`; after an update, only once a
      checkpoint of the step is written, so nothing is lost (fix the server and resume with
      ``resume_from="latest"``).

    Args:
        config: The configuration.
        tools: The agent's tools (default: the simulator's).
        reward: The RL reward (default: ``config.reward.build()``).
        tasks: Training tasks (default: from ``config``).
        policy_kwargs: Extra arguments of the rollout policy genagent builds
            (``TransformersPolicy``: ``logits_processors``, ``max_batch_size``, ...;
            ``OpenAIPolicy``: ``extra_body``, ``max_retries``, ...).
        agent_kwargs: Extra arguments of the rollout ``Agent`` (``protocol``, ``max_retries``,
            ``hooks``, ...); they override the configuration's.
        rollout_policy: A policy of your own for the rollouts (it must record token ids).
            The trained weights are synced to ``rollout.base_url`` only when
            ``rollout.backend`` is ``"vllm"``.
        resume_from: A checkpoint folder, ``"latest"``, or ``None``.

    Raises:
        ConfigurationError: For rollout settings that cannot work (``backend="vllm"``
            without ``base_url`` or without LoRA, an unset API key variable, local rollouts
            through a ``TransformersPolicy`` under FSDP1, ...).
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
        rollout_policy: Any = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        rollout = config.rollout
        _check_rollout(rollout, config.lora)  # before loading anything
        if rollout_policy is not None and policy_kwargs:
            raise ConfigurationError(
                "policy_kwargs configure the rollout policy genagent builds; with "
                "rollout_policy=... configure your policy yourself"
            )
        api_key = None
        if rollout.backend == "vllm" and rollout.api_key_env:
            api_key = os.environ.get(rollout.api_key_env)
            if not api_key:
                raise ConfigurationError(
                    f"rollout.api_key_env names the environment variable "
                    f"{rollout.api_key_env!r}, which is not set: export the vLLM server's "
                    "API key there, or unset rollout.api_key_env"
                )
        if rollout.backend == "local" and rollout.base_url:
            logger.warning(
                "rollout.base_url is set but rollout.backend is 'local': the rollouts use the "
                "model in process; set rollout.backend = 'vllm' to use the server"
            )
        super().__init__(config, resume_from=resume_from)
        from genagent.agent import Agent
        from genagent.policies._base import SamplingParams

        self.tasks = [Task.coerce(t) for t in tasks] if tasks is not None else config_tasks(config)
        if not self.tasks:
            raise ConfigurationError(
                "RL needs tasks: set prompts, tasks_jsonl or sim_tasks in the configuration"
            )
        self.reward = reward if reward is not None else config.reward.build()
        self._api_key = api_key  # never logged, saved or put in metrics
        self._syncs = rollout.backend == "vllm"
        self._owns_policy = rollout_policy is None
        self.adapter_dir = Path(rollout.adapter_dir or self.output_dir / ROLLOUT_ADAPTERS)
        self.policy: Any
        if rollout_policy is not None:
            self.policy = rollout_policy
        elif rollout.backend == "vllm":
            from genagent.policies.openai import OpenAIPolicy

            assert rollout.base_url is not None  # _check_rollout
            options: dict[str, Any] = {
                "model": rollout.adapter_name,
                "api_key": api_key,
                "timeout_s": rollout.timeout_s,
                "logprobs": True,
                "return_token_ids": True,
                # the server must see the very image the trajectory (and so the training row)
                # holds: a downscaled copy would expand to other image tokens
                "max_image_side": None,
                "max_concurrency": config.concurrency,
                "name": "policy-under-training",
            }
            options.update(policy_kwargs or {})
            self.policy = OpenAIPolicy(rollout.base_url, **options)
        else:
            from genagent.policies.transformers import TransformersPolicy

            self.policy = TransformersPolicy(
                self.runtime.unwrap(self.model),
                self.processor,
                name="policy-under-training",
                model_id=config.model,
                **dict(policy_kwargs or {}),
            )
        self._local_rollouts = rollout.backend == "local"
        if self._local_rollouts and self.runtime.is_fsdp and not self.runtime.is_fsdp2:
            from genagent.policies.transformers import TransformersPolicy

            if isinstance(self.policy, TransformersPolicy):
                raise ConfigurationError(
                    "RLTrainer with local rollouts (rollout.backend = 'local') does not run "
                    "under FSDP1 (fsdp_version: 1): every process generates its own number of "
                    "forward passes through the sharded model, each a collective, and FSDP1 "
                    "cannot run them with the full parameters gathered, so the processes would "
                    "hang. Use FSDP2 (fsdp_version: 2), rollouts served by vLLM "
                    "(rollout.backend = 'vllm'), or DDP"
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

        async def run() -> list[RolloutGroup]:
            try:
                return await rollout_groups(
                    self.agent,
                    mine,
                    reward=self.reward,
                    config=config.resample,
                    seed=derive_seed(config.seed, step, rank),
                    concurrency=config.concurrency,
                )
            finally:
                # the HTTP client of the policy genagent built belongs to this step's loop
                aclose = getattr(self.policy, "aclose", None) if self._owns_policy else None
                if callable(aclose):
                    await aclose()

        # local rollouts generate through the model under training: under FSDP2 its whole
        # parameters are gathered once around them, as each process runs its own number of
        # forward passes (each would otherwise gather the shards with the others: a hang)
        gathered = (
            self.runtime.full_parameters(self.model)
            if self._local_rollouts
            else contextlib.nullcontext()
        )
        try:
            with gathered:
                groups = run_sync(run())
        finally:
            model.train(was_training)
        _require_token_ids(groups)
        return groups

    # ------------------------------------------------------------------ rollout server

    def sync_rollout_weights(self) -> Path:
        """Save the adapter and have the vLLM server load it; every process must call it.

        Every process takes part in the save (under FSDP the state dict is gathered), the main
        process writes ``adapter_dir/step-N`` and calls
        :func:`~genagent.training.distributed.sync_lora_to_vllm`, and every process learns the
        outcome (which also waits for the main process), so none starts rollouts before the
        server serves the new weights.

        Returns:
            The adapter folder the server now serves.

        Raises:
            VLLMSyncError: On every process, if the server refused or could not be reached.
        """
        rollout = self.config.rollout
        assert rollout.base_url is not None  # _check_rollout
        folder = self._save_rollout_adapter()
        error: Exception | None = None
        if self.runtime.is_main_process:
            try:
                sync_lora_to_vllm(
                    folder,
                    rollout.base_url,
                    rollout.adapter_name,
                    api_key=self._api_key,
                    timeout_s=rollout.timeout_s,
                )
            except (VLLMSyncError, ConfigurationError) as exc:
                error = exc
        failed = torch.tensor(float(error is not None), device=self.runtime.device)
        if float(self.runtime.sum(failed).item()) > 0:
            if isinstance(error, VLLMSyncError):
                raise error
            reason = str(error) if error is not None else "see the main process's error"
            raise VLLMSyncError(f"the main process could not sync the adapter: {reason}")
        return folder

    def _save_rollout_adapter(self) -> Path:
        """Write the LoRA adapter to ``adapter_dir/step-N`` (atomically); keep the newest."""
        runtime = self.runtime
        final = self.adapter_dir / f"step-{self.state.step:06d}"
        state_dict = runtime.state_dict(self.model)  # every process takes part under FSDP
        runtime.wait()
        if runtime.is_main_process:
            tmp = final.parent / f".tmp-{final.name}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            kwargs: dict[str, Any] = {"safe_serialization": True}
            if state_dict is not None:
                kwargs["state_dict"] = state_dict
            runtime.unwrap(self.model).save_pretrained(tmp, **kwargs)
            if final.exists():  # the same step of an earlier run
                shutil.rmtree(final)
            tmp.rename(final)
            saved = sorted(
                (int(m.group(1)), p)
                for p in self.adapter_dir.iterdir()
                if (m := _ADAPTER_PATTERN.match(p.name)) and p.is_dir()
            )
            for _, old in saved[: -self.config.rollout.keep_adapters]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        runtime.wait()
        return final

    def _timed_sync(self) -> float:
        started = time.perf_counter()
        folder = self.sync_rollout_weights()
        elapsed = time.perf_counter() - started
        logger.info(
            "the rollout server serves the adapter of step %d (%s), synced in %.2f s",
            self.state.step,
            folder,
            elapsed,
        )
        return round(elapsed, 4)

    # ------------------------------------------------------------------ training

    def train(self) -> RLResult:
        """Run ``max_steps`` RL steps (``epochs`` passes over the tasks when unset)."""
        from genagent.policies.transformers import TransformersPolicy
        from genagent.training.data import pack

        config = self.config
        per_epoch = max(1, math.ceil(len(self.tasks) / config.tasks_per_step))
        total = config.max_steps or per_epoch * config.epochs
        self.setup_optimizer(total)
        history: list[dict[str, float]] = []
        if self._syncs and self.state.step < total:
            # the server must serve exactly these weights (the start, or the resumed step's)
            self._timed_sync()
        while self.state.step < total:
            started = time.perf_counter()
            groups = self.rollouts(self.state.step)
            rows = build_rows(
                groups,
                std_normalize=config.std_normalize,
                min_std=config.min_std,
            )
            totals = [t for g in groups for t in g.totals]
            outputs = [r for g in groups for r in g.rewards]
            info = {
                "reward_mean": sum(totals) / len(totals) if totals else 0.0,
                # the unweighted parts, to see which one moves
                **{
                    f"reward_{part}": (
                        sum(getattr(r, part) for r in outputs) / len(outputs) if outputs else 0.0
                    )
                    for part in ("final", "reflection", "format")
                },
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
            if isinstance(self.policy, TransformersPolicy):
                self.policy.close()  # drop key/value caches computed with the old weights
            n = self._step_metrics.pop("_tokens", 0.0)
            result.extra.update({k: v / max(n, 1.0) for k, v in self._step_metrics.items()})
            result.extra.update(info)
            sync_error: VLLMSyncError | None = None
            if self._syncs and (
                self.state.step % config.rollout.sync_every == 0 or self.state.step == total
            ):
                try:
                    result.extra["sync_s"] = self._timed_sync()
                except VLLMSyncError as exc:
                    sync_error = exc
            self.log_step(result, started)
            history.append({"step": float(self.state.step), "loss": result.loss, **result.extra})
            if sync_error is not None:
                # keep the update: a checkpoint to resume from once the server is fixed
                checkpoint = self.save_checkpoint()
                self.close()
                raise VLLMSyncError(
                    f"{sync_error}. The update of step {self.state.step} is saved in "
                    f"{checkpoint}; fix the server and resume with resume_from='latest'"
                ) from sync_error
            self.maybe_save()
        final = self.save_final()
        self.close()
        return RLResult(steps=self.state.step, final_dir=final, history=history)


def _require_token_ids(groups: Sequence[RolloutGroup]) -> None:
    """Refuse rollouts whose policy recorded no token ids at all (they give no training row).

    Rows need the exact ids; a single run without them (a failed call) only loses its rows,
    but a policy that never records them would make every step silently train on nothing.
    """
    turns = [
        turn
        for group in groups
        for trajectory in group.trajectories
        for turn in trajectory.turns
        if not turn.interrupted
    ]
    if turns and all(t.prompt_ids is None or t.output_ids is None for t in turns):
        raise ConfigurationError(_NO_TOKEN_IDS)
