"""Agentic RL: group rollouts through the real agent loop, the clipped policy loss, one update.

One RL step (see ``docs/training.md``, "Agentic RL"):

1. :func:`rollout_groups` runs ``G`` trajectories per task through :class:`~genagent.Agent`
   with the policy under training (a :class:`~genagent.policies.TransformersPolicy` wrapping
   the very model object being optimised) and any tool; scores them with
   :class:`~genagent.training.rewards.RLReward`; resamples groups without signal and branches
   new continuations from intermediate turns (:mod:`genagent.training.resample`).
2. :func:`rl_step` turns the trajectories into token rows (the exact recorded ids), gives each
   row its group-normalised advantage, packs the rows, recomputes the log-probabilities with
   gradients, and takes one optimizer step on :func:`policy_loss`.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import inspect
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from genagent.errors import ConfigurationError, RunError
from genagent.tasks import Task
from genagent.training.advantages import GroupAdvantages, broadcast_advantages, group_advantages
from genagent.training.config import LoRAConfig, TrainConfig, _relative
from genagent.training.resample import (
    ResampleConfig,
    branch_run,
    branch_start,
    choose_branches,
    mask_prefix,
    resample_decision,
)
from genagent.training.rewards import FormatPenalties, RewardWeights, RLReward, RLRewardOutput
from genagent.trajectory import Trajectory

if TYPE_CHECKING:
    import torch

    from genagent.agent import Agent
    from genagent.training.data import TokenRow
    from genagent.training.rl_trainer import RLResult, RLTrainer

__all__ = [
    "Aggregation",
    "RLConfig",
    "RLResult",
    "RLRewardConfig",
    "RLStepResult",
    "RLTrainer",
    "RolloutConfig",
    "RolloutGroup",
    "build_rows",
    "config_tasks",
    "derive_seed",
    "policy_loss",
    "rl_step",
    "rollout_groups",
]

logger = logging.getLogger("genagent.training")

Aggregation = Literal["token", "sequence"]
_SEED_LIMIT = 2**31 - 1


# --------------------------------------------------------------------------- the loss


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    aggregation: Aggregation = "token",
    sequence_ids: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped importance-ratio objective, with an optional KL penalty to a reference.

    Per policy token ``t`` (``mask == 1``), with ``rho = exp(logp - old_logp)``:

    ```text
    pg_t = -min(rho * A_t, clip(rho, 1 - clip_low, 1 + clip_high) * A_t)
    kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3 estimator, >= 0)
    l_t  = pg_t + kl_coef * kl_t
    ```

    The clip range is decoupled (DAPO, "clip-higher"): ``clip_high > clip_low`` leaves room
    for low-probability tokens to grow, which keeps exploration alive.

    Aggregation: ``"token"`` is the sum of ``l_t`` over every policy token of the step divided
    by their number (long trajectories weigh by their length); ``"sequence"`` is the mean of
    ``l_t`` within each sequence, averaged over sequences.

    Args:
        logprobs: Log-probabilities of the tokens under the current policy (with gradients).
        old_logprobs: Their log-probabilities under the policy that sampled them.
        advantages: Per-token advantages.
        mask: 1 on policy tokens, 0 elsewhere.
        clip_low: Lower clip: ``rho >= 1 - clip_low`` for negative advantages.
        clip_high: Upper clip: ``rho <= 1 + clip_high`` for positive advantages.
        ref_logprobs: Log-probabilities under the reference model (for the KL term).
        kl_coef: Weight of the KL term (0: no KL).
        aggregation: ``"token"`` or ``"sequence"``.
        sequence_ids: For ``"sequence"`` on packed 1-D tensors: the sequence of each token
            (2-D tensors: each row is a sequence).
        normalizer: Divide by this instead of this call's own count (of tokens for
            ``"token"``, of sequences for ``"sequence"``): the step's total, when its loss is
            accumulated over several micro-batches.

    Returns:
        ``(loss, metrics)``; metrics: ``clip_fraction`` (share of policy tokens where the
        clipped term was taken), ``approx_kl`` (k3 estimate of KL(old || current)),
        ``ratio_mean``, ``ratio_max``, ``kl`` (to the reference, when given), ``pg_loss``,
        ``tokens``.

    Raises:
        ConfigurationError: For shape mismatches, negative clips, an unknown aggregation, or
            ``kl_coef > 0`` without ``ref_logprobs``.
    """
    import torch

    if clip_low < 0 or clip_high < 0 or clip_low >= 1:
        raise ConfigurationError(
            f"clip_low must be in [0, 1) and clip_high >= 0, got {clip_low} and {clip_high}"
        )
    if aggregation not in ("token", "sequence"):
        raise ConfigurationError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    if kl_coef < 0:
        raise ConfigurationError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ConfigurationError("kl_coef > 0 needs ref_logprobs (a reference model)")
    shapes = {t.shape for t in (logprobs, old_logprobs, advantages, mask)}
    if ref_logprobs is not None:
        shapes.add(ref_logprobs.shape)
    if len(shapes) != 1:
        raise ConfigurationError(f"tensors must have one shape, got {sorted(map(tuple, shapes))}")
    m = mask.to(logprobs.dtype)
    old = old_logprobs.detach().to(logprobs.dtype)
    adv = advantages.detach().to(logprobs.dtype)
    log_ratio = torch.where(m > 0, logprobs - old, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    unclipped, clipped = ratio * adv, clipped_ratio * adv
    pg = -torch.minimum(unclipped, clipped)
    per_token = pg
    kl_mean = None
    if ref_logprobs is not None:
        diff = torch.where(m > 0, ref_logprobs.detach().to(logprobs.dtype) - logprobs, 0.0)
        kl = torch.exp(diff) - diff - 1.0
        kl_mean = kl
        if kl_coef > 0:
            per_token = pg + kl_coef * kl
    count = m.sum()
    if aggregation == "token":
        denom = torch.as_tensor(normalizer if normalizer is not None else count.clamp(min=1.0))
        loss = (per_token * m).sum() / denom
    else:
        if sequence_ids is None:
            if per_token.dim() != 2:
                raise ConfigurationError(
                    "aggregation='sequence' on 1-D tensors needs sequence_ids (or pass 2-D "
                    "tensors, one sequence per row)"
                )
            seq_sum, seq_count = (per_token * m).sum(-1), m.sum(-1)
        else:
            ids = sequence_ids.reshape(-1).long()
            n = int(ids.max()) + 1 if ids.numel() else 0
            flat, fm = (per_token * m).reshape(-1), m.reshape(-1)
            seq_sum = torch.zeros(n, dtype=flat.dtype, device=flat.device).index_add(0, ids, flat)
            seq_count = torch.zeros(n, dtype=fm.dtype, device=fm.device).index_add(0, ids, fm)
        present = seq_count > 0
        means = seq_sum[present] / seq_count[present]
        denom = torch.as_tensor(
            normalizer if normalizer is not None else max(int(present.sum()), 1)
        )
        loss = means.sum() / denom
    with torch.no_grad():
        n_tok = float(count)
        safe = max(n_tok, 1.0)
        taken = ((clipped < unclipped) & (m > 0)).to(logprobs.dtype)
        k3_old = torch.exp(-log_ratio) + log_ratio - 1.0
        metrics = {
            "clip_fraction": float(taken.sum()) / safe,
            "approx_kl": float((k3_old * m).sum()) / safe,
            "ratio_mean": float((ratio * m).sum()) / safe,
            "ratio_max": float(torch.where(m > 0, ratio, 0.0).max()) if n_tok else 1.0,
            "pg_loss": float((pg * m).sum()) / safe,
            "tokens": n_tok,
        }
        if kl_mean is not None:
            metrics["kl"] = float((kl_mean * m).sum()) / safe
    return loss, metrics


# --------------------------------------------------------------------------- rollouts


@dataclass
class RolloutGroup:
    """The trajectories whose rewards are normalised together.

    Attributes:
        task: The task.
        trajectories: The group's trajectories (``G``, more after resampling).
        rewards: Their rewards, in order.
        kind: ``"prompt"`` (rollouts of the task) or ``"branch"`` (continuations of one prefix).
        parent: For a branch group: ``(parent trajectory id, branch turn)``.
        resample_rounds: Extra rounds of rollouts this group took.
        gave_up: The group still had no signal after ``max_resample`` rounds.
    """

    task: Task
    trajectories: list[Trajectory]
    rewards: list[RLRewardOutput]
    kind: Literal["prompt", "branch"] = "prompt"
    parent: tuple[str, int] | None = None
    resample_rounds: int = 0
    gave_up: bool = False

    @property
    def totals(self) -> list[float]:
        """The total reward of each trajectory."""
        return [r.total for r in self.rewards]

    def advantages(
        self, *, eps: float = 1e-6, std_normalize: bool = True, min_std: float = 1e-6
    ) -> GroupAdvantages:
        """The group-normalised advantages (see :func:`group_advantages`)."""
        return group_advantages(self.totals, eps=eps, std_normalize=std_normalize, min_std=min_std)


def derive_seed(*parts: object) -> int:
    """A reproducible seed from ``parts`` (blake2b, in ``[0, 2**31 - 1)``)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _SEED_LIMIT


async def _run_one(agent: Agent, task: Task, seed: int) -> Trajectory:
    """One rollout with its own sampling seed; a run-ending error keeps its partial trajectory."""
    clone = copy.copy(agent)
    clone.sampling = agent.sampling.model_copy(update={"seed": seed})
    try:
        return await clone.arun(task, seed=seed)
    except RunError as exc:
        if exc.trajectory is None:
            raise
        return exc.trajectory


async def rollout_groups(
    agent: Agent,
    tasks: Sequence[str | Task],
    *,
    reward: RLReward,
    group_size: int | None = None,
    seed: int = 0,
    config: ResampleConfig | None = None,
    concurrency: int = 8,
) -> list[RolloutGroup]:
    """Run ``G`` trajectories per task through the agent, score, resample and branch them.

    Rollouts use ``agent`` as configured (its policy, tools, protocol, limits); each run gets
    its own base seed and sampling seed, derived from ``seed``, the task's position, the
    resampling round and the rollout's position, so a step is reproducible. The definition of
    resampling and branching is in :mod:`genagent.training.resample`.

    Args:
        agent: The agent whose policy is the policy under training.
        tasks: Prompts or tasks.
        reward: The RL reward.
        group_size: Rollouts per task (overrides ``config.group_size``).
        seed: Seed of this step's rollouts.
        config: Resampling and branching settings.
        concurrency: Most runs in flight at once.

    Returns:
        The prompt groups, in task order, then the branch groups.
    """
    config = config or ResampleConfig()
    if group_size is not None:
        config = ResampleConfig(**{**vars(config), "group_size": group_size})
    if concurrency < 1:
        raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
    if agent.sampling.temperature == 0.0:
        raise ConfigurationError(
            "the agent samples greedily (temperature=0): every rollout of a group would be "
            "the same; set Agent(sampling=SamplingParams(temperature=1.0))"
        )
    if agent.sampling.temperature is None:
        logger.warning(
            "the agent's sampling temperature is unset: the policy's default applies (greedy "
            "for many checkpoints, which makes every rollout of a group the same); set "
            "Agent(sampling=SamplingParams(temperature=1.0))"
        )
    items = [Task.coerce(t) for t in tasks]
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(coro: Any) -> Trajectory:
        async with semaphore:
            result: Trajectory = await coro
            return result

    async def rollouts(jobs: list[tuple[int, int, int]]) -> list[Trajectory]:
        return list(
            await asyncio.gather(
                *(
                    limited(_run_one(agent, items[i], derive_seed(seed, i, r, j)))
                    for i, r, j in jobs
                )
            )
        )

    g = config.group_size
    first = await rollouts([(i, 0, j) for i in range(len(items)) for j in range(g)])
    scores = await reward.ascore_many(first)
    groups = [
        RolloutGroup(items[i], first[i * g : (i + 1) * g], scores[i * g : (i + 1) * g])
        for i in range(len(items))
    ]
    # resampling: extra rounds for groups without signal, all such groups together
    round_ = 0
    while True:
        pending = []
        for i, group in enumerate(groups):
            decision = resample_decision(group.totals, group.resample_rounds, config)
            if decision == "resample":
                pending.append(i)
            elif decision == "give_up" and not group.gave_up:
                group.gave_up = True
        if not pending:
            break
        round_ += 1
        k = config.resample_count
        extra = await rollouts([(i, round_, j) for i in pending for j in range(k)])
        extra_scores = await reward.ascore_many(extra)
        for n, i in enumerate(pending):
            groups[i].trajectories.extend(extra[n * k : (n + 1) * k])
            groups[i].rewards.extend(extra_scores[n * k : (n + 1) * k])
            groups[i].resample_rounds += 1
    # branching: new continuations from intermediate turns, one group per prefix
    branch_jobs: list[tuple[int, Trajectory, int]] = []
    for i, group in enumerate(groups):
        rng = random.Random(derive_seed(seed, i, "branch"))
        for ti, turn in choose_branches(
            group.trajectories,
            config.branches_per_group,
            mode=config.branch_points,
            rng=rng,
        ):
            branch_jobs.append((i, group.trajectories[ti], turn))
    branch_groups: list[RolloutGroup] = []
    if branch_jobs:
        b = config.branch_count

        async def branch(job: tuple[int, Trajectory, int], j: int) -> Trajectory:
            i, parent, turn = job
            async with semaphore:
                try:
                    return await branch_run(
                        agent, parent, turn, seed=derive_seed(seed, i, parent.id, turn, j)
                    )
                except RunError as exc:
                    if exc.trajectory is None:
                        raise
                    return exc.trajectory

        runs = await asyncio.gather(*(branch(job, j) for job in branch_jobs for j in range(b)))
        run_scores = await reward.ascore_many(runs)
        for n, (i, parent, turn) in enumerate(branch_jobs):
            branch_groups.append(
                RolloutGroup(
                    items[i],
                    list(runs[n * b : (n + 1) * b]),
                    list(run_scores[n * b : (n + 1) * b]),
                    kind="branch",
                    parent=(parent.id, turn),
                )
            )
    return groups + branch_groups


# --------------------------------------------------------------------------- the update


@dataclass
class RLStepResult:
    """What one RL update did.

    Attributes:
        loss: The step's loss (summed over micro-batches).
        metrics: Averages of :func:`policy_loss` metrics over policy tokens, plus ``groups``,
            ``groups_with_signal``, ``rows``, ``micro_batches``, ``reward_mean``, ``grad_norm``.
        skipped: True when no group had signal (no optimizer step was taken).
    """

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


def build_rows(
    groups: Sequence[RolloutGroup],
    *,
    eps: float = 1e-6,
    std_normalize: bool = True,
    min_std: float = 1e-6,
    drop_no_signal: bool = True,
) -> list[TokenRow]:
    """Token rows of every trajectory, with group-normalised advantages.

    Rows come from :func:`genagent.training.data.rows_from_trajectory` (the exact recorded
    ids, with the reward's ``turn_rewards`` and the group's id); a branch's copied prefix is
    masked out (:func:`~genagent.training.resample.mask_prefix`), and rows left with no
    trained token are dropped. Groups without signal are left out when ``drop_no_signal``.
    A trajectory without recorded token ids (a run whose first policy call failed) gives no
    row; its reward still counts in its group's mean.
    """
    from genagent.errors import TrajectoryError
    from genagent.training.data import rows_from_trajectory

    out: list[TokenRow] = []
    for g_index, group in enumerate(groups):
        adv = group.advantages(eps=eps, std_normalize=std_normalize, min_std=min_std)
        if not adv.has_signal and drop_no_signal:
            continue
        group_id = f"{group.kind}-{g_index}"
        per_traj: list[list[TokenRow]] = []
        for traj, rew in zip(group.trajectories, group.rewards, strict=True):
            try:
                rows = rows_from_trajectory(
                    traj, reward=rew.total, turn_rewards=rew.turn_rewards, group_id=group_id
                )
            except TrajectoryError as exc:
                logger.warning("trajectory %s gives no training row: %s", traj.id, exc)
                rows = []
            start = branch_start(traj)
            if start:
                rows = [mask_prefix(r, start) for r in rows]
            per_traj.append([r for r in rows if r.num_policy_tokens > 0])
        out.extend(broadcast_advantages(per_traj, adv.advantages))
    return out


def _token_logprobs(function: Any, model: Any, batch: Any, temperature: float) -> torch.Tensor:
    """``token_logprobs`` at the sampling temperature (logits divided by it)."""
    if "temperature" in inspect.signature(function).parameters:
        out: torch.Tensor = function(model, batch, temperature=temperature)
        return out
    if temperature != 1.0:
        raise ConfigurationError(
            f"this genagent's token_logprobs cannot apply temperature={temperature}; sample the "
            "rollouts at temperature 1.0"
        )
    out = function(model, batch)
    return out


def _batch_tensor(batch: Any, name: str) -> Any:
    value = batch.get(name) if isinstance(batch, Mapping) else getattr(batch, name, None)
    return value


def rl_step(
    model: Any,
    optimizer: Any,
    groups: Sequence[RolloutGroup],
    *,
    processor: Any = None,
    max_tokens: int = 8192,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    kl_coef: float = 0.0,
    ref_model: Any = None,
    aggregation: Aggregation = "token",
    temperature: float = 1.0,
    max_grad_norm: float | None = 1.0,
    eps: float = 1e-6,
    std_normalize: bool = True,
    min_std: float = 1e-6,
    old_logprobs: Literal["rollout", "recompute"] = "rollout",
) -> RLStepResult:
    """One policy update on rollout groups.

    Builds rows (:func:`build_rows`), packs them (:func:`genagent.training.data.pack`),
    computes per-token log-probabilities with gradients
    (:func:`genagent.training.data.token_logprobs`, logits divided by ``temperature`` as at
    sampling), accumulates :func:`policy_loss` over the micro-batches (normalised by the whole
    step's token or sequence count), clips the gradient norm and steps the optimizer.

    A rollout policy that caches keys and values (``TransformersPolicy``) holds caches
    computed with the old weights afterwards: call its ``close()`` before the next rollouts
    (:class:`~genagent.training.rl_trainer.RLTrainer` does).

    Args:
        model: The model under training (the one the rollout policy wraps).
        optimizer: Its optimizer.
        groups: From :func:`rollout_groups`.
        processor: The model's processor (images of the rows are encoded with it).
        max_tokens: Token budget of one packed micro-batch.
        clip_low: See :func:`policy_loss`.
        clip_high: See :func:`policy_loss`.
        kl_coef: Weight of the KL to ``ref_model`` (0: none).
        ref_model: The frozen reference model (needed when ``kl_coef > 0``).
        aggregation: ``"token"`` or ``"sequence"``.
        temperature: The sampling temperature of the rollouts.
        max_grad_norm: Gradient-norm clip (``None``: none).
        eps: See :func:`~genagent.training.advantages.group_advantages`.
        std_normalize: See :func:`~genagent.training.advantages.group_advantages`.
        min_std: See :func:`~genagent.training.advantages.group_advantages`.
        old_logprobs: ``"rollout"``: the log-probabilities recorded at sampling (the
            importance ratio then also corrects for differences between the inference and
            training forward passes); ``"recompute"``: recomputed with this model before
            the update (no gradient), as most trainers do.

    Raises:
        ConfigurationError: For ``kl_coef > 0`` without ``ref_model``, or bad settings.
    """
    import torch

    from genagent.training.data import pack, token_logprobs

    if kl_coef > 0 and ref_model is None:
        raise ConfigurationError("kl_coef > 0 needs ref_model (a frozen copy of the start model)")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigurationError(
            f"temperature must be > 0 (the rollouts' sampling temperature), got {temperature!r}"
        )
    rows = build_rows(groups, eps=eps, std_normalize=std_normalize, min_std=min_std)
    all_totals = [t for g in groups for t in g.totals]
    info = {
        "groups": float(len(groups)),
        "groups_with_signal": float(sum(g.advantages(min_std=min_std).has_signal for g in groups)),
        "reward_mean": sum(all_totals) / len(all_totals) if all_totals else 0.0,
        "rows": float(len(rows)),
    }
    if not rows:
        return RLStepResult(loss=0.0, metrics={**info, "micro_batches": 0.0}, skipped=True)
    batches = pack(rows, max_tokens, processor=processor)

    def logprobs_of(m: Any, batch: Any) -> torch.Tensor:
        return _token_logprobs(token_logprobs, m, batch, temperature).reshape(-1)

    def tensors(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        mask = _batch_tensor(batch, "loss_mask").reshape(-1).float()
        adv = _batch_tensor(batch, "advantages").reshape(-1).float()
        old = _batch_tensor(batch, "old_logprobs")
        return mask, adv, (old.reshape(-1).float() if old is not None else None)

    def sequence_ids(batch: Any, n: int) -> torch.Tensor | None:
        cu = _batch_tensor(batch, "cu_seqlens")
        if cu is None:
            return None
        cu = cu.reshape(-1).long().cpu()
        lengths = cu[1:] - cu[:-1]
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        return ids[:n] if ids.numel() >= n else None

    masks = [tensors(b)[0] for b in batches]
    if aggregation == "token":
        normalizer = float(sum(float(m.sum()) for m in masks))
    else:
        normalizer = float(len(rows))
    normalizer = max(normalizer, 1.0)

    was_training = model.training
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total_loss = 0.0
    sums: dict[str, float] = {}
    tokens = 0.0
    try:
        for batch in batches:
            mask, adv, old = tensors(batch)
            if old_logprobs == "recompute" or old is None:
                with torch.no_grad():
                    old = logprobs_of(model, batch).detach().float()
            logp = logprobs_of(model, batch)
            device = logp.device
            mask, adv, old = mask.to(device), adv.to(device), old.to(device)
            # tokens without a recorded log-probability (NaN) are on-policy: ratio 1
            old = torch.where(torch.isfinite(old), old, logp.detach())
            ref = None
            if ref_model is not None:
                with torch.no_grad():
                    ref = logprobs_of(ref_model, batch).to(device)
            seq = sequence_ids(batch, logp.numel()) if aggregation == "sequence" else None
            if aggregation == "sequence" and seq is None:
                seq = torch.zeros(logp.numel(), dtype=torch.long)
            loss, metrics = policy_loss(
                logp,
                old,
                adv,
                mask,
                clip_low=clip_low,
                clip_high=clip_high,
                ref_logprobs=ref,
                kl_coef=kl_coef,
                aggregation=aggregation,
                sequence_ids=seq.to(device) if seq is not None else None,
                normalizer=normalizer,
            )
            loss.backward()  # type: ignore[no-untyped-call]
            total_loss += float(loss.detach())
            n = metrics["tokens"]
            tokens += n
            for key, value in metrics.items():
                if key != "tokens":
                    sums[key] = sums.get(key, 0.0) + value * n
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = float("nan")
        if max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    if not math.isfinite(total_loss):
        logger.warning("the RL loss is not finite (%s)", total_loss)
    metrics_out = {k: v / max(tokens, 1.0) for k, v in sums.items()}
    metrics_out.update(info)
    metrics_out.update(
        {"micro_batches": float(len(batches)), "tokens": tokens, "grad_norm": grad_norm}
    )
    return RLStepResult(loss=total_loss, metrics=metrics_out)


# --------------------------------------------------------------------------- the trainer


class RLRewardConfig(BaseModel):
    """The RL reward of :class:`RLTrainer` (simulator judges; pass ``reward=`` for others).

    Attributes:
        final: The pointwise reward of the final image: ``"scene"`` (the simulator's
            ``SceneJudge``).
        reflection: Add the reflection-accuracy reward (``ReflectionAccuracy`` with the same
            judge as reference).
        weights: Term weights.
        protocol_error: Penalty per malformed reply.
        empty_reply: Penalty per empty reply.
        no_answer: Penalty per run without an answer.
        max_format_penalty: The format term is clipped at minus this.
    """

    model_config = ConfigDict(extra="forbid")

    final: Literal["scene"] = "scene"
    reflection: bool = True
    weights: dict[str, float] = Field(
        default_factory=lambda: {"final": 1.0, "reflection": 0.5, "format": 1.0}
    )
    protocol_error: float = Field(0.25, ge=0)
    empty_reply: float = Field(0.5, ge=0)
    no_answer: float = Field(0.25, ge=0)
    max_format_penalty: float = Field(1.0, ge=0)

    def build(self) -> RLReward:
        """The :class:`RLReward` these settings describe."""
        from genagent.rewards.reflection import ReflectionAccuracy
        from genagent.sim import SceneJudge

        unknown = set(self.weights) - {"final", "reflection", "format"}
        if unknown:
            raise ConfigurationError(
                f"unknown reward weights {sorted(unknown)}; use final, reflection and format"
            )
        judge = SceneJudge()
        return RLReward(
            judge,
            reflection=ReflectionAccuracy(SceneJudge()) if self.reflection else None,
            weights=RewardWeights(**self.weights),
            penalties=FormatPenalties(
                protocol_error=self.protocol_error,
                empty_reply=self.empty_reply,
                no_answer=self.no_answer,
                max_total=self.max_format_penalty,
            ),
        )


class RolloutConfig(BaseModel):
    """Who serves the rollouts of :class:`RLTrainer`: the model in process, or a vLLM server.

    With ``backend="vllm"`` the rollouts are requests to an OpenAI-compatible vLLM server that
    serves the base model with the trained LoRA adapter under ``adapter_name``; the trainer
    saves the adapter and has the server load it before the first rollouts (also after a
    resume) and after every ``sync_every`` optimizer steps (and the last one). Only LoRA can be
    pushed to vLLM over HTTP: full fine-tuning needs a collective weight broadcast into the
    engine (verl, OpenRLHF), which genagent does not implement.

    Attributes:
        backend: ``"local"`` (a ``TransformersPolicy`` wrapping the model under training) or
            ``"vllm"``.
        base_url: The vLLM server, ``http://host:8000`` (``/v1`` is accepted).
        adapter_name: The adapter's name on the server (the ``model`` of rollout requests).
        api_key_env: The name of the environment variable that holds the server's API key
            (vLLM's ``--api-key``); the key itself is never stored, logged or saved.
        sync_every: Optimizer steps between syncs.
        timeout_s: Read timeout of one rollout request, and of one adapter load.
        adapter_dir: Where the adapters are saved for the server (``step-N`` folders; default
            ``output_dir/rollout-adapters``). The server must read them at the same path.
        keep_adapters: Adapter folders kept (older ones are deleted).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: Literal["local", "vllm"] = "local"
    base_url: str | None = None
    adapter_name: str = Field("policy", min_length=1)
    api_key_env: str | None = None
    sync_every: int = Field(1, ge=1)
    timeout_s: float = Field(300.0, gt=0)
    adapter_dir: Path | None = None
    keep_adapters: int = Field(2, ge=1)

    @field_validator("adapter_dir", mode="before")
    @classmethod
    def _adapter_dir_relative_to_file(cls, value: Any, info: ValidationInfo) -> Any:
        return _relative(value, info)


def _check_rollout(rollout: RolloutConfig, lora: LoRAConfig | None) -> None:
    """Refuse rollout settings that cannot work (``RLConfig`` and ``RLTrainer`` call it).

    Raises:
        ConfigurationError: For ``backend="vllm"`` without ``base_url``, or without LoRA.
    """
    if rollout.backend != "vllm":
        return
    if not rollout.base_url:
        raise ConfigurationError(
            "rollout.backend = 'vllm' needs rollout.base_url, the vLLM server's address "
            "(e.g. 'http://localhost:8000')"
        )
    if lora is None:
        raise ConfigurationError(
            "rollout.backend = 'vllm' needs LoRA (set `lora`): genagent pushes the trained "
            "weights to vLLM as a LoRA adapter over HTTP, and a full fine-tune cannot be sent "
            "that way. Train a LoRA adapter, or use rollout.backend = 'local', or a framework "
            "that broadcasts full weights into the engine (verl, OpenRLHF)"
        )


class RLConfig(TrainConfig):
    """Agentic RL (multi-turn GRPO with resampling and branching); see ``docs/training.md``.

    Attributes:
        prompts: Training prompts.
        tasks_jsonl: JSONL files of tasks (``{"prompt": ..., "metadata": {...}}`` per line).
        sim_tasks: Sample this many simulator tasks (GenEval++-style) with ``seed``.
        tasks_per_step: Tasks rolled out per optimizer step (each gives ``group_size`` runs).
        group_size: Rollouts per task (``G``).
        max_resample: Extra rounds for groups whose rewards are all equal.
        resample_size: Rollouts per extra round (default: ``group_size``).
        min_std: Rewards within this standard deviation count as all equal.
        branches_per_group: Branch points drawn per task group (0: no branching).
        branch_size: Continuations per branch point (default: ``group_size``).
        branch_points: ``"after_image"`` or ``"any"``.
        clip_low: Lower clip of the importance ratio.
        clip_high: Upper clip (decoupled, "clip-higher").
        kl_coef: Weight of the k3 KL to the reference (the model at the start; with LoRA,
            the model with its adapter disabled).
        std_normalize: Divide advantages by the group's standard deviation.
        old_logprobs: ``"rollout"`` (recorded at sampling) or ``"recompute"``.
        max_rounds: The agent's most images per run.
        max_new_tokens: Most tokens per reply.
        temperature: Sampling temperature of the rollouts (also applied to the logits in the
            update).
        top_p: Nucleus sampling mass of the rollouts (the ratio uses the untruncated
            distribution).
        concurrency: Agent runs in flight.
        reward: The reward.
        rollout: Who serves the rollouts (the model in process, or a vLLM server with weight
            syncs); see :class:`RolloutConfig`.
    """

    prompts: list[str] = Field(default_factory=list)
    tasks_jsonl: list[str] = Field(default_factory=list)
    sim_tasks: int = Field(0, ge=0)
    tasks_per_step: int = Field(4, ge=1)
    group_size: int = Field(8, ge=1)
    max_resample: int = Field(2, ge=0)
    resample_size: int | None = Field(None, ge=1)
    min_std: float = Field(1e-6, ge=0)
    branches_per_group: int = Field(0, ge=0)
    branch_size: int | None = Field(None, ge=1)
    branch_points: Literal["after_image", "any"] = "after_image"
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.28, ge=0)
    kl_coef: float = Field(0.0, ge=0)
    std_normalize: bool = True
    old_logprobs: Literal["rollout", "recompute"] = "rollout"
    max_rounds: int = Field(3, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    concurrency: int = Field(8, ge=1)
    reward: RLRewardConfig = Field(default_factory=RLRewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)

    @field_validator("rollout")
    @classmethod
    def _rollout_can_work(cls, value: RolloutConfig, info: ValidationInfo) -> RolloutConfig:
        if "lora" in info.data:  # else `lora` itself was invalid, and that error is reported
            _check_rollout(value, info.data["lora"])
        return value

    @property
    def resample(self) -> ResampleConfig:
        """The resampling and branching settings."""
        return ResampleConfig(
            group_size=self.group_size,
            max_resample=self.max_resample,
            resample_size=self.resample_size,
            min_std=self.min_std,
            branches_per_group=self.branches_per_group,
            branch_size=self.branch_size,
            branch_points=self.branch_points,
        )


def config_tasks(config: RLConfig) -> list[Task]:
    """The training tasks a configuration names (prompts, then JSONL files, then simulator).

    Raises:
        ConfigurationError: If a tasks file cannot be read or a line is not a task.
    """
    import json

    tasks = [Task(prompt=p) for p in config.prompts]
    for path in config.tasks_jsonl:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigurationError(f"cannot read tasks from {path}: {exc.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                tasks.append(Task.model_validate(json.loads(line)))
            except ValueError as exc:
                raise ConfigurationError(f"{path}:{n} is not a task: {exc}") from None
    if config.sim_tasks:
        from genagent.sim import sample_tasks

        tasks.extend(sample_tasks(config.sim_tasks, seed=config.seed))
    return tasks


def __getattr__(name: str) -> Any:
    # the trainer needs torch at import; the rest of this module does not
    if name in ("RLTrainer", "RLResult"):
        from genagent.training import rl_trainer

        return getattr(rl_trainer, name)
    raise AttributeError(f"module 'genagent.training.rl' has no attribute {name!r}")
