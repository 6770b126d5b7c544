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
* ``token_logprobs`` refuses a part of an FSDP2 model instead of computing with shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .test_training_distributed import REPO, _config, _free_port, _rows

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


def _launch(out: Path, model: str, processes: int, timeout_s: float) -> None:
    """Start the ranks as ``accelerate launch --cpu`` would (its environment), wait for them."""
    port = _free_port()
    code = f"from tests.test_training_fsdp import _worker; _worker({str(out)!r}, {model!r})"
    procs = []
    for rank in range(processes):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(processes),
            "LOCAL_WORLD_SIZE": str(processes),
            "ACCELERATE_USE_CPU": "true",  # what `accelerate launch --cpu` sets
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
        with (out / f"log_rank{rank}.txt").open("w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code], env=env, cwd=REPO, stdout=log, stderr=log
                )
            )
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = "\n".join(
        f"--- rank {r} (exit {p.returncode}) ---\n"
        + (out / f"log_rank{r}.txt").read_text(errors="replace")[-4000:]
        for r, p in enumerate(procs)
    )
    assert all(p.returncode == 0 for p in procs), logs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from genagent.testing import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(
        tmp_path_factory.mktemp("tiny") / "model", tokenizer="byte", layers=1, max_pixels=56 * 56
    )


@pytest.mark.timeout(180)
def test_fsdp2_two_processes_match_one_process_and_resume(tiny_model: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    try:
        _free_port()
    except OSError as exc:
        pytest.skip(f"no loopback TCP port for the process group: {exc}")

    (tmp_path / "two").mkdir()
    _launch(tmp_path / "two", str(tiny_model), processes=2, timeout_s=150)
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
