"""FSDP2: two CPU processes (gloo) with sharded parameters match one process.

accelerate 1.15 turns FSDP on only for accelerator devices (``AcceleratorState`` keeps
``MULTI_CPU`` for ``--cpu`` runs, whatever ``ACCELERATE_USE_FSDP`` says), while torch's
``fully_shard`` itself runs on CPU with gloo. So each rank here starts as
``accelerate launch --cpu`` would, and the test then marks accelerate's state as FSDP with an
FSDP2 plugin: from there on it is accelerate's own FSDP2 path (``Accelerator.prepare`` with
``fsdp2_prepare_model``: decoder layers and vision blocks, the embeddings, and the final
norm with the head as their own units, the rest in the root) and genagent's real
``SFTTrainer``. What it checks:

* one optimizer step (LoRA, unequal token counts per rank) gives the parameters of one
  process stepping on all the rows, and so does a second step (Adam's state in play);
* a checkpoint written under FSDP (the optimizer state gathered from the shards) resumes to
  the same second step;
* ``token_logprobs`` refuses a part of an FSDP2 model instead of computing with shards;
* ``RLTrainer`` with local rollouts (``TransformersPolicy`` on the sharded model under
  training), the ranks generating different numbers of tokens (so different numbers of forward
  passes), completes its step without a collective during generation, and its parameters are
  those of one process stepping on the same rollouts.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from genagent.training.distributed import end_processes

from .test_training_distributed import _config, _launch, _require_gloo, _rows, _tiny_model

TOLERANCE = 1e-6  # fp32 parameters after a step


def _as_fsdp2() -> None:
    """Make the trainers' ``Runtime`` see accelerate in FSDP2 mode (on CPU, see above)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from genagent.training import _common

    original = _common.Runtime.__init__

    def init(self: Any, config: Any) -> None:
        original(self, config)
        # AcceleratorState copies PartialState's fields each time it is built: set both
        PartialState().distributed_type = DistributedType.FSDP
        state = self.accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            state_dict_type="FULL_STATE_DICT",
        )

    _common.Runtime.__init__ = init  # type: ignore[method-assign]


def _full(trainer: Any) -> dict[str, Any]:
    """The trainable parameters, whole (gathered from the shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in trainer.runtime.unwrap(trainer.model).named_parameters():
        if param.requires_grad:
            value = param.full_tensor() if isinstance(param, DTensor) else param
            out[name] = value.detach().clone()
    return out


def _steps(model: str, out: Path) -> dict[str, Any]:
    """Two steps, a checkpoint after the first, and a resumed second step."""
    import torch

    from genagent.training.distributed import world
    from genagent.training.sft import SFTTrainer

    config = _config(model, out, world().size)
    trainer = SFTTrainer(config, rows=_rows())
    trainer.setup_optimizer(2)
    (group, *_) = trainer._groups(0)  # this rank's micro-batches
    first = trainer.train_step(group)
    params = {"step1": _full(trainer)}
    checkpoint = trainer.save_checkpoint()
    second = trainer.train_step(group)
    params["step2"] = _full(trainer)
    trainer.close()

    resumed = SFTTrainer(config, rows=_rows(), resume_from=checkpoint)
    resumed.setup_optimizer(2)
    again = resumed.train_step(group)
    params["resumed"] = _full(resumed)
    resumed.close()
    torch.save(params, out / f"params_rank{trainer.runtime.process_index}.pt")
    return {
        "distributed_type": trainer.runtime.distributed_type,
        "fsdp2": trainer.runtime.is_fsdp2,
        "processes": trainer.runtime.num_processes,
        "losses": [first.loss, second.loss, again.loss],
        "grad_norms": [first.grad_norm, second.grad_norm, again.grad_norm],
        "tokens": first.tokens,
        "local_tokens": sum(trainer.count_tokens(b) for b in group),
    }


def _refuses_a_part(model: Any, batch: Any) -> str:
    from genagent.errors import ConfigurationError
    from genagent.training.data import token_logprobs

    try:
        token_logprobs(model.get_base_model(), batch)
    except ConfigurationError as exc:
        return str(exc)
    return ""


def _worker(out_dir: str, model: str) -> None:
    """One rank of the two-process FSDP2 run (``RANK`` etc. in the environment)."""
    import torch

    torch.set_num_threads(1)
    _as_fsdp2()
    out = Path(out_dir)
    report = _steps(model, out)
    rank = int(os.environ["RANK"])
    # a part of the sharded model, called outside the root's forward, is refused
    from genagent.training.sft import SFTTrainer

    trainer = SFTTrainer(_config(model, out / "part", 2), rows=_rows())
    trainer.setup_optimizer(1)
    (group, *_) = trainer._groups(0)
    report["refusal"] = _refuses_a_part(trainer.model, group[0])
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))
    end_processes()  # or a rank may abort at exit while the other still talks to it


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(tmp_path_factory)


@pytest.mark.timeout(180)
def test_fsdp2_two_processes_match_one_process_and_resume(tiny_model: Path, tmp_path: Path) -> None:
    torch = _require_gloo()
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (fully_shard)")

    (tmp_path / "two").mkdir()
    _launch(tmp_path / "two", str(tiny_model), 2, 150, module=__name__)
    reports = [json.loads((tmp_path / "two" / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["distributed_type"] == "FSDP" and report["fsdp2"]
        assert report["processes"] == 2
        assert "not the module given to fully_shard" in report["refusal"]
    assert reports[0]["local_tokens"] != reports[1]["local_tokens"]  # unequal shards

    torch.set_num_threads(1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        assert name not in os.environ
    (tmp_path / "one").mkdir()
    one = _steps(str(tiny_model), tmp_path / "one")
    assert one["processes"] == 1 and one["distributed_type"] == "NO"
    assert reports[0]["tokens"] == one["tokens"]
    for report in reports:
        for got, want in zip(report["losses"], one["losses"], strict=True):
            assert abs(got - want) < 1e-5
        for got, want in zip(report["grad_norms"], one["grad_norms"], strict=True):
            assert abs(got - want) < 1e-5 * max(1.0, want)

    reference = torch.load(tmp_path / "one" / "params_rank0.pt")
    moved = max(
        float((reference["step2"][n] - reference["step1"][n]).abs().max())
        for n in reference["step1"]
    )
    assert moved > 1e-3  # the second step moved far more than the tolerance
    # resuming in one process is exact (the baseline of the FSDP resume below)
    for name, value in reference["step2"].items():
        assert torch.equal(reference["resumed"][name], value), name
    for rank in (0, 1):
        params = torch.load(tmp_path / "two" / f"params_rank{rank}.pt")
        diffs = {}
        for key in ("step1", "step2", "resumed"):
            assert params[key].keys() == reference[key].keys()
            diffs[key] = max(
                float((params[key][n] - reference[key][n]).abs().max()) for n in reference[key]
            )
        print(f"rank {rank}: max |param diff| FSDP2 vs one process: {diffs}")
        assert max(diffs.values()) < TOLERANCE, diffs
        # the resumed second step is the uninterrupted one
        resume = max(
            float((params["resumed"][n] - params["step2"][n]).abs().max()) for n in params["step2"]
        )
        assert resume < 1e-7, resume


def test_fsdp_schedule_pads_every_process_to_the_same_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from genagent.errors import ConfigurationError
    from genagent.training import _common, distributed

    text, image = SimpleNamespace(pixel_values=None), SimpleNamespace(pixel_values=1)

    def gathered(*answers: list[Any]) -> None:
        replies = iter(answers)
        monkeypatch.setattr(distributed, "gather_objects", lambda value: next(replies))

    # this process (rank 1) has one micro-batch, rank 0 two: it repeats its own, weight 0
    gathered([[False, False], [False]])
    assert _common._fsdp_schedule([text]) == [(text, 1.0), (text, 0.0)]
    # a process without micro-batches borrows another's
    gathered([[True], []], [[image, image], []])
    assert _common._fsdp_schedule([]) == [(image, 0.0)]
    # images at the same position on some processes only: refused (on every process alike)
    gathered([[True], [False]])
    with pytest.raises(ConfigurationError, match="vision tower"):
        _common._fsdp_schedule([text])
    gathered([[False, True], [False]])
    with pytest.raises(ConfigurationError, match="pad"):
        _common._fsdp_schedule([text])


# --------------------------------------------------------------------------- RL, local rollouts

RL_TASKS = (7, 3)  # of sample_tasks(8, seed=2): rank r rolls out task RL_TASKS[r]
COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "broadcast",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "barrier",
)
GENERATION_THREAD = "genagent-policy-"  # TransformersPolicy's worker thread runs the forwards
RL_LAUNCH_TIMEOUT_S = 100  # the step takes about 15 s; a hang is killed after this


def _rl_tasks() -> list[Any]:
    from genagent.sim import sample_tasks

    tasks = sample_tasks(8, seed=2)
    return [tasks[i] for i in RL_TASKS]


def _draw(prompt: str) -> str:
    """A scripted tool call that draws ``prompt`` (its length sets the reply's tokens)."""
    return (
        '<think>Draw it.</think><tool_call>{"name": "image_generation_tool", "arguments": '
        f'{{"caption": "{prompt}"}}}}</tool_call>'
    )


def _rl_config(model: str, out: Path) -> Any:
    from genagent.training.rl import RLConfig

    return RLConfig.model_validate(
        {
            "model": model,
            "output_dir": out,
            # Adam's first step with eps = 1 is about lr * g (as in _config), and the policy
            # gradients of LoRA's B are about 1e-5 here: lr = 1000 makes the step about 1e-2,
            # so a wrong gradient scale shows far above the tolerance
            "lr": 1000.0,
            "eps": 1.0,
            "weight_decay": 0.0,
            "max_grad_norm": None,
            "warmup_steps": 0,
            "schedule": "constant",
            "mixed_precision": "no",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "tensorboard": False,
            "max_steps": 2,  # the second rollouts follow a training step (Adam's state too)
            "tasks_per_step": 2,  # one task per rank
            "group_size": 2,
            "max_resample": 2,
            "max_rounds": 1,  # one reply per run: text-only rows, no vision tower in training
            "max_new_tokens": 200,
            "concurrency": 2,
            "max_tokens": 2400,  # one row (about 2,300 byte tokens) per micro-batch
        }
    )


def _count_collectives() -> dict[str, dict[str, int]]:
    """Count torch.distributed collectives by name, in the generation thread and elsewhere.

    FSDP2 calls them through the ``torch.distributed`` module (``dist.all_gather_single``,
    ``dist.reduce_scatter_single``), so wrapping the module's functions sees every one.
    """
    import threading

    import torch.distributed as dist

    counts: dict[str, dict[str, int]] = {"generation": {}, "other": {}}
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            thread = threading.current_thread().name
            where = counts["generation" if thread.startswith(GENERATION_THREAD) else "other"]
            where[_name] = where.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return counts


def _watch_full_parameters(runtime: Any) -> list[dict[str, Any]]:
    """Record the FSDP2 modules' state around each ``full_parameters`` (each step's rollouts)."""
    from torch.distributed.fsdp import FSDPModule

    from genagent.training._common import _reshard_policy

    full_parameters = runtime.full_parameters
    entries: list[dict[str, Any]] = []

    def groups(modules: list[Any]) -> list[Any]:
        return [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]

    def policy(modules: list[Any]) -> list[Any]:  # resharded after forward, per group
        return [[info is not None for info in _reshard_policy(m) or []] for m in modules]

    @contextlib.contextmanager
    def watched(model: Any) -> Any:
        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        seen: dict[str, Any] = {"modules": len(modules), "policy_before": policy(modules)}
        entries.append(seen)
        with full_parameters(model):
            seen["whole_inside"] = all(g.is_unsharded for g in groups(modules))
            seen["policy_inside"] = policy(modules)
            yield
        seen["sharded_after"] = all(g.is_sharded for g in groups(modules))
        seen["policy_after"] = policy(modules)

    runtime.full_parameters = watched
    return entries


def _rl_worker(out_dir: str, model: str) -> None:
    """One rank of the two-process FSDP2 RL step with local rollouts."""
    import faulthandler

    import torch

    # a hang shows where every thread waits, in the rank's log, before the launcher kills it
    faulthandler.dump_traceback_later(RL_LAUNCH_TIMEOUT_S - 10)
    torch.set_num_threads(1)
    _as_fsdp2()
    counts = _count_collectives()
    from genagent.testing import ScriptedLogits
    from genagent.training import rl_trainer

    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    rows: list[list[Any]] = []  # each step's
    build_rows = rl_trainer.build_rows

    def recorded(*args: Any, **kwargs: Any) -> Any:
        built = build_rows(*args, **kwargs)
        rows.append(list(built))
        return built

    rl_trainer.build_rows = recorded  # type: ignore[assignment]
    trainer = rl_trainer.RLTrainer(_rl_config(model, out), tasks=_rl_tasks())
    # each rank rolls out its own task (tasks_per_step = 2 over 2 ranks); the scripted replies
    # differ in length, so the ranks generate different numbers of tokens (forward passes)
    reply = _draw(trainer.tasks[rank].prompt)
    trainer.policy.logits_processors = [ScriptedLogits(trainer.processor.tokenizer, [reply])]
    trainer.agent.max_retries = 0
    gathering = _watch_full_parameters(trainer.runtime)
    result = trainer.train()
    params = _full(trainer)  # gathered by both ranks
    torch.save({"rows": rows, "params": params}, out / f"rl_rank{rank}.pt")
    stats = trainer.policy.stats
    report = {
        "distributed_type": trainer.runtime.distributed_type,
        "fsdp2": trainer.runtime.is_fsdp2,
        "steps": result.steps,
        "losses": [record["loss"] for record in result.history],
        "rows": [len(step) for step in rows],
        "decode_steps": stats.decode_steps,
        "sequences": stats.sequences,
        "collectives": counts,
        "gathering": gathering,
        "policy_model_is_root": trainer.policy.model is trainer.runtime.unwrap(trainer.model),
    }
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))
    end_processes()  # or a rank may abort at exit while the other still talks to it


def _rl_one_process(
    model: str, out: Path, steps: list[list[Any]]
) -> tuple[dict[str, Any], list[float]]:
    """One process, ``RLTrainer`` steps on the given rows (each step's rows of both ranks)."""
    from genagent.training.data import pack
    from genagent.training.rl_trainer import RLTrainer

    config = _rl_config(model, out)
    trainer = RLTrainer(config, tasks=_rl_tasks())
    trainer.setup_optimizer(len(steps))
    losses = []
    for rows in steps:
        trainer._step_metrics = {}
        batches = pack(rows, config.max_tokens, processor=trainer.processor)
        losses.append(trainer.train_step(batches).loss)
    params = _full(trainer)
    trainer.close()
    return params, losses


@pytest.mark.timeout(180)
def test_fsdp2_rl_local_rollouts_do_not_hang_and_match_one_process(
    tiny_model: Path, tmp_path: Path
) -> None:
    torch = _require_gloo()
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (fully_shard)")

    two = tmp_path / "two"
    two.mkdir()
    # a hang (ranks waiting in an all-gather the other never joins) is killed and fails here
    _launch(two, str(tiny_model), 2, RL_LAUNCH_TIMEOUT_S, worker="_rl_worker", module=__name__)
    reports = [json.loads((two / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["distributed_type"] == "FSDP" and report["fsdp2"]
        assert report["steps"] == 2
        assert report["policy_model_is_root"]  # the rollouts use the sharded model itself
        # generation ran without a single collective; training did run FSDP's collectives
        assert report["collectives"]["generation"] == {}, report["collectives"]
        assert report["collectives"]["other"]["all_gather_single"] > 0  # FSDP's, counted
        first, second = report["gathering"]  # the rollouts of each step
        for entry in (first, second):
            assert entry["modules"] > 2 and entry["whole_inside"] and entry["sharded_after"]
            assert all(g == [False] for g in entry["policy_inside"]), entry
        # the reshard policy is restored (the first rollouts are also FSDP's first forward,
        # where FSDP settles the root's own policy: compare from the second on)
        assert second["policy_before"] == second["policy_after"] == first["policy_after"]
        assert any(g == [True] for g in second["policy_after"]), second
    # both steps train on rows (a rank without any would borrow another's, with weight 0)
    assert all(reports[0]["rows"][i] + reports[1]["rows"][i] for i in (0, 1)), reports
    # the ranks ran different numbers of forward passes in generation
    assert reports[0]["decode_steps"] != reports[1]["decode_steps"], reports
    assert reports[0]["losses"] == pytest.approx(reports[1]["losses"], abs=1e-6)

    saved = [torch.load(two / f"rl_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, value in saved[0]["params"].items():  # every rank ends with the same weights
        assert torch.equal(saved[1]["params"][name], value), name

    torch.set_num_threads(1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        assert name not in os.environ
    one = tmp_path / "one"
    one.mkdir()
    steps = [saved[0]["rows"][i] + saved[1]["rows"][i] for i in (0, 1)]
    reference, losses = _rl_one_process(str(tiny_model), one, steps)
    assert losses == pytest.approx(reports[0]["losses"], abs=1e-5)
    params = saved[0]["params"]
    assert params.keys() == reference.keys()
    moved = max(float(v.abs().max()) for n, v in reference.items() if "lora_B" in n)
    assert moved > 1e-3  # LoRA's B starts at 0: the steps moved far more than the tolerance
    diff = max(float((params[n] - reference[n]).abs().max()) for n in reference)
    print(f"RL, 2 steps: max |param diff| FSDP2 (local rollouts) vs one process: {diff:.3g}")
    assert diff < TOLERANCE, diff


def test_fsdp1_refuses_local_rollouts(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FSDP1 cannot run forward passes with its parameters summoned: refused, not a hang."""
    from types import SimpleNamespace

    from genagent.errors import ConfigurationError
    from genagent.training import _common
    from genagent.training.rl_trainer import RLTrainer

    fsdp1 = SimpleNamespace(is_fsdp=True, is_fsdp2=False)
    with pytest.raises(ConfigurationError, match="FSDP2"):
        _common.Runtime.full_parameters(fsdp1, object())  # type: ignore[arg-type]
    assert isinstance(
        _common.Runtime.full_parameters(SimpleNamespace(is_fsdp=False), object()),  # type: ignore[arg-type]
        contextlib.nullcontext,
    )

    # one process, seen as FSDP1 (the model is then prepared as accelerate would without it)
    monkeypatch.setattr(_common.Runtime, "is_fsdp", property(lambda self: True))
    monkeypatch.setattr(_common.Runtime, "is_fsdp2", property(lambda self: False))
    with pytest.raises(ConfigurationError, match=r"FSDP1 .*rollout\.backend = 'vllm'"):
        RLTrainer(_rl_config(str(tiny_model), tmp_path), tasks=_rl_tasks())
