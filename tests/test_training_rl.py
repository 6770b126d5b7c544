"""Agentic RL: rewards, group advantages, resampling and branching on fixed rewards, the clipped
policy loss on hand-made tensors, and one end-to-end update of a tiny real Qwen2.5-VL."""

from __future__ import annotations

import asyncio
import copy
import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from genagent import Agent
from genagent.errors import ConfigurationError
from genagent.images import MemoryImageStore
from genagent.rewards import ReflectionAccuracy, reward
from genagent.sim import HeuristicPolicy, SceneJudge, sample_tasks, scene_tools
from genagent.tasks import Task
from genagent.training.advantages import (
    broadcast_advantages,
    group_advantages,
    group_has_signal,
    token_advantages,
)
from genagent.training.resample import (
    ResampleConfig,
    branch_points,
    branch_run,
    branch_start,
    choose_branches,
    mask_prefix,
    resample_decision,
)
from genagent.training.rewards import (
    FormatPenalties,
    RewardWeights,
    RLReward,
    RLRewardOutput,
    combine_rewards,
)
from genagent.training.rl import RolloutGroup, rollout_groups
from genagent.trajectory import (
    Action,
    ErrorInfo,
    Termination,
    ToolCall,
    ToolOutcome,
    Trajectory,
    Turn,
)

# --------------------------------------------------------------------------- helpers


@reward
def constant_08(prompt: str, image: Any) -> float:
    return 0.8


def _image_ref(color: str = "red") -> Any:
    return MemoryImageStore().put(Image.new("RGB", (8, 8), color))


def _call_turn(index: int, round_: int | None, image: int | None) -> Turn:
    call = ToolCall(name="image_generation_tool", arguments={"caption": "a cup"})
    outcome = ToolOutcome(
        tool="image_generation_tool",
        round=round_,
        images=[image] if image is not None else [],
        selected=0 if image is not None else None,
    )
    return Turn(
        index=index,
        reply="<think>x</think><tool_call>{}</tool_call>",
        action=Action(kind="tool_call", tool_call=call),
        tool_result=outcome,
    )


def _bad_turn(index: int, reply: str) -> Turn:
    return Turn(
        index=index, reply=reply, error=ErrorInfo(type="ProtocolError", message="no action")
    )


def _answer_turn(index: int) -> Turn:
    return Turn(index=index, reply="<answer>done</answer>", action=Action(kind="answer"))


def _trajectory(turns: list[Turn], termination: Termination, n_images: int) -> Trajectory:
    images = [_image_ref(c) for c in ["red", "blue", "green"][:n_images]]
    return Trajectory(
        task=Task(prompt="a cup"),
        turns=turns,
        images=images,
        final_image_index=n_images - 1 if n_images else None,
        termination=termination,
    )


# --------------------------------------------------------------------------- rewards


def test_format_penalties_and_weights_on_hand_built_trajectories() -> None:
    # empty reply (0.5) + malformed reply (0.25); answered: no no_answer penalty
    traj = _trajectory(
        [_bad_turn(0, "  "), _bad_turn(1, "garbage"), _call_turn(2, 1, 0), _answer_turn(3)],
        Termination.ANSWERED,
        1,
    )
    out = asyncio.run(combine_rewards(traj, final=constant_08))
    assert out.final == pytest.approx(0.8)
    assert out.reflection == 0.0
    assert out.format == pytest.approx(-0.75)
    assert out.total == pytest.approx(0.8 - 0.75)
    assert out.turn_rewards == {0: pytest.approx(-0.5), 1: pytest.approx(-0.25)}
    assert out.components["format.empty_reply"] == 1.0
    assert out.components["format.protocol_error"] == 1.0
    assert out.components["format.no_answer"] == 0.0

    # no image, never answered, many errors: final is missing_score, format clipped at -1
    bad = _trajectory([_bad_turn(i, "junk") for i in range(6)], Termination.ERROR, 0)
    out = asyncio.run(
        combine_rewards(
            bad, final=constant_08, weights=RewardWeights(final=2.0, format=0.5), missing_score=0.1
        )
    )
    assert out.final == pytest.approx(0.1)
    assert out.format == pytest.approx(-1.0)  # 6 * 0.25 + 0.25 clipped at max_total
    assert out.total == pytest.approx(2.0 * 0.1 + 0.5 * -1.0)
    assert out.turn_rewards == {i: pytest.approx(0.5 * -0.25) for i in range(6)}
    assert "final_error" in out.info

    # a run that hit max_rounds without answering gets the no_answer penalty only
    capped = _trajectory([_call_turn(0, 1, 0)], Termination.MAX_ROUNDS, 1)
    penalties = FormatPenalties(no_answer=0.3)
    out = asyncio.run(combine_rewards(capped, final=constant_08, penalties=penalties))
    assert out.format == pytest.approx(-0.3)
    assert out.turn_rewards == {}

    with pytest.raises(ConfigurationError):
        RewardWeights(final=-1.0)
    with pytest.raises(ConfigurationError):
        RLReward("not a reward")  # type: ignore[arg-type]


def test_rl_reward_with_reflection_on_simulator_runs() -> None:
    agent = Agent(tools=scene_tools(), policy=HeuristicPolicy(seed=0), max_rounds=3)
    traj = agent.run(sample_tasks(1, seed=4)[0], seed=0)
    rl = RLReward(SceneJudge(), reflection=ReflectionAccuracy(SceneJudge()))
    out = asyncio.run(rl.ascore(traj))
    assert 0.0 <= out.final <= 1.0 and 0.0 <= out.reflection <= 1.0
    assert out.format == 0.0  # the heuristic policy speaks the protocol
    assert out.total == pytest.approx(out.final + 0.5 * out.reflection)
    assert rl.describe()["weights"] == {"final": 1.0, "reflection": 0.5, "format": 1.0}


# --------------------------------------------------------------------------- advantages


def test_group_advantages_hand_computed() -> None:
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert adv.mean == 0.5 and adv.std == 0.5 and adv.has_signal
    a = 0.5 / (0.5 + 1e-6)
    assert adv.advantages == pytest.approx([a, -a, -a, a])
    assert adv.advantages == pytest.approx([1, -1, -1, 1], abs=1e-5)

    adv = group_advantages([3.0, 1.0, 2.0], eps=0.0)
    s = math.sqrt(2 / 3)
    assert adv.std == pytest.approx(s)
    assert adv.advantages == pytest.approx([1 / s, -1 / s, 0.0])
    assert group_advantages([3.0, 1.0, 2.0], std_normalize=False).advantages == pytest.approx(
        [1.0, -1.0, 0.0]
    )

    flat = group_advantages([0.7, 0.7, 0.7, 0.7])
    assert flat.advantages == [0.0] * 4 and not flat.has_signal
    assert not group_advantages([1.0]).has_signal
    # "all equal" within min_std
    near = group_advantages([0.5, 0.505], min_std=0.01)
    assert not near.has_signal and near.advantages == [0.0, 0.0]
    assert group_has_signal([0.5, 0.505], min_std=0.001)
    with pytest.raises(ConfigurationError):
        group_advantages([])
    with pytest.raises(ConfigurationError):
        group_advantages([1.0, math.nan])


@dataclass
class FakeRow:
    loss_mask: list[int]
    turn_of_token: list[int]
    advantage: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def test_broadcast_advantages_to_policy_tokens() -> None:
    rows = [[FakeRow([0, 1, 1], [0, 0, 0]), FakeRow([0, 1], [2, 2])], [FakeRow([1], [0])]]
    flat = broadcast_advantages(rows, [0.5, -2.0])
    assert [r.advantage for r in flat] == [0.5, 0.5, -2.0]
    assert token_advantages(0.5, [0, 1, 1, 0]) == [0.0, 0.5, 0.5, 0.0]
    with pytest.raises(ConfigurationError):
        broadcast_advantages(rows, [1.0])


# --------------------------------------------------------------------------- resampling


def test_resample_decisions_on_fixed_rewards() -> None:
    config = ResampleConfig(group_size=4, max_resample=2, min_std=0.01)
    assert resample_decision([1, 0, 0, 0], 0, config) == "keep"
    assert resample_decision([0, 0, 0, 0], 0, config) == "resample"
    assert resample_decision([0, 0, 0, 0], 1, config) == "resample"
    assert resample_decision([0, 0, 0, 0], 2, config) == "give_up"
    assert resample_decision([0.5, 0.505, 0.5, 0.5], 0, config) == "resample"  # within tol
    assert resample_decision([1, 1], 0, ResampleConfig(max_resample=0)) == "give_up"
    assert config.resample_count == 4 and config.branch_count == 4
    with pytest.raises(ConfigurationError):
        ResampleConfig(group_size=0)
    with pytest.raises(ConfigurationError):
        ResampleConfig(branch_points="middle")  # type: ignore[arg-type]


class FixedReward(RLReward):
    """Totals from a fixed list per prompt, consumed in rollout order."""

    def __init__(self, totals: dict[str, list[float]]) -> None:
        super().__init__(constant_08)
        self.totals = {k: list(v) for k, v in totals.items()}

    async def ascore(self, trajectory: Trajectory) -> RLRewardOutput:
        total = self.totals[trajectory.prompt].pop(0)
        return RLRewardOutput(total=total, final=total, reflection=0.0, format=0.0)


def _sim_agent() -> Agent:
    return Agent(tools=scene_tools(), policy=HeuristicPolicy(seed=0), max_rounds=3)


def test_rollout_groups_resamples_until_signal_or_gives_up() -> None:
    tasks = ["two red apples", "a blue cup", "three cats"]
    fixed = FixedReward(
        {
            "two red apples": [1.0, 0.0],  # signal at once
            "a blue cup": [0.0, 0.0, 0.0, 1.0],  # signal after one extra round
            "three cats": [0.5] * 6,  # never: gives up after max_resample=2 rounds
        }
    )
    config = ResampleConfig(group_size=2, max_resample=2)
    groups = asyncio.run(rollout_groups(_sim_agent(), tasks, reward=fixed, config=config, seed=3))
    assert [g.task.prompt for g in groups] == tasks
    assert [len(g.trajectories) for g in groups] == [2, 4, 6]
    assert [g.resample_rounds for g in groups] == [0, 1, 2]
    assert [g.gave_up for g in groups] == [False, False, True]
    assert [g.advantages().has_signal for g in groups] == [True, True, False]
    assert groups[1].totals == [0.0, 0.0, 0.0, 1.0]
    assert groups[2].advantages().advantages == [0.0] * 6
    assert all(v == [] for v in fixed.totals.values())
    # every rollout got its own seed
    seeds = [t.metadata["seed"] for g in groups for t in g.trajectories]
    assert len(set(seeds)) == len(seeds)


def _three_round_trajectory() -> Trajectory:
    # turn 0 draws (round 1); turn 1 judges it and redraws (round 2); turn 2 is malformed;
    # turn 3 draws again (round 3, tool error); turn 4 answers
    failed = _call_turn(3, None, None)
    assert failed.tool_result is not None
    failed.tool_result.error = ErrorInfo(type="ToolExecutionError", message="boom")
    turns = [_call_turn(0, 1, 0), _call_turn(1, 2, 1), _bad_turn(2, "?"), failed, _answer_turn(4)]
    return _trajectory(turns, Termination.ANSWERED, 2)


def test_branch_points_and_choice() -> None:
    traj = _three_round_trajectory()
    assert branch_points(traj) == [1, 2]  # the turns right after an image
    assert branch_points(traj, "any") == [1, 2, 3, 4]
    short = _trajectory([_call_turn(0, 1, 0)], Termination.MAX_ROUNDS, 1)
    assert branch_points(short) == []  # no turn judged the image
    rng = random.Random(0)
    chosen = choose_branches([traj, short, traj], 3, rng=rng)
    assert len(chosen) == 3 and len(set(chosen)) == 3
    assert all(i in (0, 2) and t in (1, 2) for i, t in chosen)
    assert choose_branches([traj], 10, rng=rng) == [(0, 1), (0, 2)]  # all there are
    assert choose_branches([short], 2, rng=rng) == []


def test_mask_prefix_trains_only_new_turns() -> None:
    row = FakeRow([0, 1, 1, 0, 1, 1, 0, 1], [-1, 0, 0, 1, 1, 1, 2, 2])
    masked = mask_prefix(row, 2)
    assert masked.loss_mask == [0, 0, 0, 0, 0, 0, 0, 1]


def test_branch_run_replays_the_prefix_and_continues() -> None:
    calls: list[int] = []
    tools = scene_tools()
    generator = tools[0]
    original = generator.invoke

    async def counting(args: Any, ctx: Any) -> Any:
        calls.append(ctx.round)
        return await original(args, ctx)

    generator.invoke = counting  # type: ignore[method-assign]
    agent = Agent(tools=tools, policy=HeuristicPolicy(seed=0), max_rounds=3)
    task = sample_tasks(1, seed=11)[0]
    parent = asyncio.run(agent.arun(task, seed=5))
    points = branch_points(parent)
    assert points, "the simulator run should judge at least one image"
    t = points[0]
    calls.clear()
    child = asyncio.run(branch_run(agent, parent, t, seed=99))
    assert child.metadata["branch"] == {"parent": parent.id, "turn": t}
    assert branch_start(child) == t and branch_start(parent) == 0
    # the prefix is copied: same replies, same images; the tool was not called for it
    assert [x.reply for x in child.turns[:t]] == [x.reply for x in parent.turns[:t]]
    assert child.images[0].sha256 == parent.images[0].sha256
    assert all(r > 1 for r in calls)
    assert child.termination is not None
    with pytest.raises(ConfigurationError):
        asyncio.run(branch_run(agent, parent, len(parent.turns) + 1, seed=1))


def test_rollout_groups_branches_form_their_own_groups() -> None:
    tasks = sample_tasks(2, seed=7)
    config = ResampleConfig(group_size=2, max_resample=0, branches_per_group=1, branch_size=2)
    rl = RLReward(SceneJudge(), reflection=ReflectionAccuracy(SceneJudge()))
    groups = asyncio.run(rollout_groups(_sim_agent(), tasks, reward=rl, config=config, seed=1))
    prompt_groups = [g for g in groups if g.kind == "prompt"]
    branch_groups = [g for g in groups if g.kind == "branch"]
    assert len(prompt_groups) == 2
    assert 1 <= len(branch_groups) <= 2
    for g in branch_groups:
        assert g.parent is not None and len(g.trajectories) == 2
        parent_id, turn = g.parent
        parents = [t for p in prompt_groups for t in p.trajectories if t.id == parent_id]
        assert len(parents) == 1 and turn in branch_points(parents[0])
        assert all(branch_start(t) == turn for t in g.trajectories)
        assert g.resample_rounds == 0


# --------------------------------------------------------------------------- the loss

torch = pytest.importorskip("torch")


def _loss(**kwargs: Any) -> Any:
    from genagent.training.rl import policy_loss

    return policy_loss(**kwargs)


def test_policy_loss_clips_at_both_bounds() -> None:
    ratios = torch.tensor([1.5, 0.5, 1.0, 1.1, 0.5, 1.5])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    logp = torch.log(ratios).requires_grad_(True)
    old = torch.zeros(6)
    mask = torch.ones(6)
    loss, metrics = _loss(
        logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, clip_low=0.2, clip_high=0.28
    )
    # per token: -min(r A, clip(r) A)
    expected = [-1.28, 0.8, -1.0, 1.1, -0.5, 1.5]
    assert float(loss.detach()) == pytest.approx(sum(expected) / 6)
    assert metrics["clip_fraction"] == pytest.approx(2 / 6)  # tokens 0 and 1
    assert metrics["ratio_mean"] == pytest.approx(float(ratios.mean()))
    loss.backward()
    grad = logp.grad
    assert grad is not None
    # clipped tokens get no gradient; others d/dlogp of -r A = -r A / 6
    assert float(grad[0]) == 0.0 and float(grad[1]) == 0.0
    assert float(grad[2]) == pytest.approx(-1.0 / 6)
    assert float(grad[3]) == pytest.approx(1.1 / 6)
    assert float(grad[4]) == pytest.approx(-0.5 / 6)  # below the low bound, A > 0: not clipped
    assert float(grad[5]) == pytest.approx(1.5 / 6)  # above the high bound, A < 0: not clipped
    # approx KL (k3 of old vs new): mean of 1/r - 1 + log r ... here exp(-lr) + lr - 1
    k3 = (1 / ratios) + torch.log(ratios) - 1
    assert metrics["approx_kl"] == pytest.approx(float(k3.mean()), rel=1e-5)


def test_policy_loss_kl_term_and_masking() -> None:
    logp = torch.log(torch.tensor([2.0, 1.0, 4.0]))
    old = logp.clone()  # ratio 1
    adv = torch.zeros(3)
    mask = torch.tensor([1.0, 1.0, 0.0])
    ref = torch.zeros(3)
    loss, metrics = _loss(
        logprobs=logp,
        old_logprobs=old,
        advantages=adv,
        mask=mask,
        ref_logprobs=ref,
        kl_coef=0.1,
    )
    kl0 = 0.5 + math.log(2.0) - 1.0  # exp(ref - logp) - (ref - logp) - 1 at r = 2
    assert metrics["kl"] == pytest.approx(kl0 / 2)  # the masked token does not count
    assert float(loss) == pytest.approx(0.1 * kl0 / 2)
    assert metrics["tokens"] == 2.0
    with pytest.raises(ConfigurationError):
        _loss(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, kl_coef=0.1)
    with pytest.raises(ConfigurationError):
        _loss(logprobs=logp, old_logprobs=old[:2], advantages=adv, mask=mask)


def test_policy_loss_token_vs_sequence_aggregation() -> None:
    zeros = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 3.0, 9.0], [-2.0, 5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    common = {"logprobs": zeros, "old_logprobs": zeros, "advantages": adv, "mask": mask}
    token, _ = _loss(**common, aggregation="token")
    assert float(token) == pytest.approx(-(1 + 3 - 2) / 3)
    sequence, _ = _loss(**common, aggregation="sequence")
    assert float(sequence) == pytest.approx(-((1 + 3) / 2 + -2) / 2)  # = 0
    # packed 1-D with sequence ids gives the same numbers
    flat = {k: v.reshape(-1) for k, v in common.items()}
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    packed, _ = _loss(**flat, aggregation="sequence", sequence_ids=ids)
    assert float(packed) == pytest.approx(float(sequence))
    # the step's total as normalizer (micro-batch accumulation)
    summed, _ = _loss(**common, aggregation="token", normalizer=10.0)
    assert float(summed) == pytest.approx(-(1 + 3 - 2) / 10)
    with pytest.raises(ConfigurationError):
        _loss(**flat, aggregation="sequence")
    with pytest.raises(ConfigurationError):
        _loss(**common, aggregation="mean")


def test_rollout_group_totals() -> None:
    outs = [RLRewardOutput(total=v, final=v, reflection=0, format=0) for v in (1.0, 3.0)]
    group = RolloutGroup(Task(prompt="x"), [], outs)
    assert group.totals == [1.0, 3.0]
    assert group.advantages(eps=0.0).advantages == pytest.approx([-1.0, 1.0])


# --------------------------------------------------------------------------- end to end

pytest.importorskip("transformers")

# a task whose simulator images are right about half the time (SceneJudge 1 or 0)
TASK = sample_tasks(6, seed=2)[3]
DRAW = (
    '<think>Draw it.</think><tool_call>{"name": "image_generation_tool", "arguments": '
    f'{{"caption": "{TASK.prompt}"}}}}</tool_call>'
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from genagent.policies import TransformersPolicy
    from genagent.testing import tiny_qwen2_5_vl

    # the byte vocabulary keeps the output layer small (fast on a CPU)
    folder = tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-rl"), tokenizer="byte")
    loaded = TransformersPolicy.from_pretrained(str(folder), device="cpu")
    return loaded.model, loaded.processor


def test_rl_step_end_to_end_on_a_tiny_model(tiny_model: tuple[Any, Any]) -> None:
    from genagent.policies import SamplingParams, TransformersPolicy
    from genagent.testing import ScriptedLogits
    from genagent.training.data import pack, token_logprobs
    from genagent.training.rl import build_rows, rl_step

    model, processor = tiny_model
    torch.manual_seed(0)
    # the policy wraps the very model object that is optimised; its first reply is scripted
    # (a valid tool call, so that runs have images), the rest is the random model's own text,
    # which the protocol rejects (format penalties)
    policy = TransformersPolicy(
        model, processor, logits_processors=[ScriptedLogits(processor.tokenizer, [DRAW])]
    )
    agent = Agent(
        tools=scene_tools(),
        policy=policy,
        max_rounds=2,
        max_retries=0,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=200),
    )
    reward_fn = RLReward(SceneJudge(), reflection=ReflectionAccuracy(SceneJudge()))
    config = ResampleConfig(group_size=2, max_resample=3)
    groups = asyncio.run(rollout_groups(agent, [TASK], reward=reward_fn, config=config, seed=0))
    policy.close()
    assert len(groups) == 1 and len(groups[0].trajectories) >= 2
    traj = groups[0].trajectories[0]
    assert traj.turns[0].output_ids and traj.images  # recorded ids, an image
    assert all(r.components["format.protocol_error"] > 0 for r in groups[0].rewards)
    assert groups[0].advantages().has_signal, groups[0].totals

    rows = build_rows(groups)
    assert len(rows) == len(groups[0].trajectories)
    assert all(r.images and r.advantage is not None for r in rows)
    # the recorded log-probabilities of the model's own (unscripted) tokens are what the
    # training forward pass computes: the rows hold the exact sampled ids, aligned
    batch = pack(rows[:1], 8192, processor=processor)[0]
    with torch.no_grad():
        now = token_logprobs(model, batch)[0]
    assert batch.old_logprobs is not None
    free = torch.tensor([t >= 1 for t in rows[0].turn_of_token]) & (batch.loss_mask[0] > 0)
    assert int(free.sum()) > 0
    assert float((now[free] - batch.old_logprobs[0][free]).abs().mean()) < 0.05

    before = [p.detach().clone() for p in model.parameters()]
    reference = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result = rl_step(model, optimizer, groups, processor=processor, max_tokens=8192)
    assert not result.skipped
    assert math.isfinite(result.loss)
    assert result.metrics["tokens"] == sum(r.num_policy_tokens for r in rows)
    assert result.metrics["groups_with_signal"] == 1.0
    assert 0.0 <= result.metrics["clip_fraction"] <= 1.0
    changed = sum(
        not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True)
    )
    assert changed > 0

    # sequence aggregation and the KL term to the frozen start model, on the same groups
    again = rl_step(
        model,
        optimizer,
        groups,
        processor=processor,
        aggregation="sequence",
        kl_coef=0.1,
        ref_model=reference,
        old_logprobs="recompute",
    )
    assert math.isfinite(again.loss) and again.metrics["kl"] > 0.0
    assert again.metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # recomputed: on-policy
    with pytest.raises(ConfigurationError):
        rl_step(model, optimizer, groups, processor=processor, kl_coef=0.1)


def test_rl_trainer_one_step_with_lora_and_branching(tmp_path: Any) -> None:
    pytest.importorskip("peft")
    from genagent.testing import ScriptedLogits, tiny_qwen2_5_vl
    from genagent.training.rl import RLConfig, RLTrainer

    folder = tiny_qwen2_5_vl(tmp_path / "model", tokenizer="byte")
    config = RLConfig(
        model=str(folder),
        output_dir=tmp_path / "out",
        max_steps=1,
        group_size=2,
        max_resample=3,
        tasks_per_step=1,
        branches_per_group=1,
        max_rounds=2,
        max_new_tokens=200,
        tensorboard=False,
        lora={"r": 4, "alpha": 8},
    )
    trainer = RLTrainer(config, tasks=[TASK])
    assert trainer.policy.model is trainer.runtime.unwrap(trainer.model)  # no copy
    trainer.policy.logits_processors = [ScriptedLogits(trainer.processor.tokenizer, [DRAW])]
    trainer.agent.max_retries = 0
    result = trainer.train()
    assert result.steps == 1 and (result.final_dir / "model").is_dir()
    (record,) = result.history
    assert math.isfinite(record["loss"]) and record["groups"] >= 1
    assert (tmp_path / "out" / "metrics.jsonl").is_file()
    # the reward's parts are logged next to the weighted total they make
    weights = trainer.reward.weights
    combined = (
        weights.final * record["reward_final"]
        + weights.reflection * record["reward_reflection"]
        + weights.format * record["reward_format"]
    )
    assert record["reward_mean"] == pytest.approx(combined)
    assert record["reward_format"] <= 0.0


def test_rl_config_reads_a_file(tmp_path: Any) -> None:
    from genagent.training.rl import RLConfig

    path = tmp_path / "rl.toml"
    path.write_text(
        'model = "m"\noutput_dir = "out"\nsim_tasks = 4\ngroup_size = 4\n'
        "branches_per_group = 1\n[reward]\nreflection = false\n",
        encoding="utf-8",
    )
    config = RLConfig.from_file(path, ["reward.no_answer=0.5"])
    assert config.resample.group_size == 4 and config.resample.branches_per_group == 1
    reward_fn = config.reward.build()
    assert reward_fn.reflection is None and reward_fn.penalties.no_answer == 0.5
    with pytest.raises(ConfigurationError):
        RLConfig.from_file(path, ["clip_low=2"])


def test_train_rl_command(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from genagent.cli import app
    from genagent.testing import tiny_qwen2_5_vl

    folder = tiny_qwen2_5_vl(tmp_path / "model", tokenizer="byte")
    path = tmp_path / "rl.toml"
    path.write_text(
        f'model = "{folder}"\noutput_dir = "out"\nprompts = ["two cats"]\nmax_steps = 1\n'
        "group_size = 2\nmax_resample = 0\nmax_new_tokens = 8\ntensorboard = false\n"
        "lora = {r = 2, alpha = 4}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["train", "rl", str(path), "--set", "max_rounds=1"])
    assert result.exit_code == 0, result.output
    assert "trained 1 RL steps" in result.output
    assert (tmp_path / "out" / "final" / "model").is_dir()
