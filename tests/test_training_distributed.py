"""Several processes: two CPU processes (gloo) match one process on the same data.

The two-process run is real: two Python processes joined by a gloo process group through
accelerate (as ``accelerate launch --cpu --num_processes 2`` starts them), each with half the
step's rows. It gathers prompt groups across ranks before computing advantages, and one SFT
optimizer step gives the parameters of one process stepping on all the rows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from genagent.errors import ConfigurationError
from genagent.training.distributed import (
    VLLMSyncError,
    end_processes,
    gather_groups,
    shard,
    sync_lora_to_vllm,
    world,
)

from ._servers import Reply, ScriptedServer

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6  # fp32 parameters after one step

# group id -> (sample index, reward): each prompt's samples are split over the ranks
GROUPS: dict[str, list[tuple[int, float]]] = {
    "prompt-a": [(0, 1.0), (1, 0.0), (2, 0.5), (3, 1.0)],
    "prompt-b": [(4, 0.2), (5, 0.9), (6, 0.9)],
    "prompt-c": [(7, 0.0), (8, 0.0)],  # no signal
}
# rows longer than half of max_tokens: one row per micro-batch; trained token counts differ
ROW_SPECS = [(30, 5), (18, 8), (24, 3), (28, 12)]  # (length, first trained position)
MAX_TOKENS = 32


# --------------------------------------------------------------------------- local helpers


def test_shard_splits_a_step_into_disjoint_slices_that_cover_it() -> None:
    items = list(range(11))
    for size in (1, 2, 3, 4):
        parts = [shard(items, rank, size) for rank in range(size)]
        assert sorted(x for part in parts for x in part) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard(items, 1, 3) == [1, 4, 7, 10]
    with pytest.raises(ConfigurationError):
        shard(items, 2, 2)


def test_one_process_world_and_gather_are_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    here = world()
    assert (here.rank, here.size, here.is_main) == (0, 1, True)
    assert shard([1, 2, 3]) == [1, 2, 3]
    groups = gather_groups({"b": [2, 1], "a": [3]}, order=None)
    assert list(groups) == ["a", "b"] and groups["b"] == [2, 1]
    assert gather_groups({"b": [2, 1]}, order=lambda x: x) == {"b": [1, 2]}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert world().rank == 3 and not world().is_main  # launched, group not initialised yet
    end_processes()  # no process group: nothing to end


# --------------------------------------------------------------------------- vLLM sync


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def test_sync_lora_to_vllm_reloads_the_adapter_in_place(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "step-1" / "model")
    with ScriptedServer() as server:
        server.script("POST", "/v1/load_lora_adapter", Reply("Success: LoRA adapter loaded"))
        sync_lora_to_vllm(adapter, server.url + "/v1", "policy", api_key="k")
        (request,) = server.requests
        assert request.body == {
            "lora_name": "policy",
            "lora_path": str(adapter.resolve()),
            "load_inplace": True,
        }
        assert request.headers.get("Authorization") == "Bearer k"


def test_sync_lora_to_vllm_unloads_first_on_servers_without_load_inplace(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "a")
    already = {"object": "error", "message": "The lora adapter 'policy' has already been loaded."}
    with ScriptedServer() as server:
        server.script("POST", "/v1/load_lora_adapter", Reply(already, status=400), Reply("Success"))
        server.script("POST", "/v1/unload_lora_adapter", Reply("Success"))
        sync_lora_to_vllm(adapter, server.url, "policy")
        assert [r.path for r in server.requests] == [
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/v1/load_lora_adapter",
        ]
        assert server.requests[1].body == {"lora_name": "policy"}


def test_sync_lora_to_vllm_says_what_the_server_answered(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "a")
    with ScriptedServer() as server:
        server.script("POST", "/v1/load_lora_adapter", Reply({"detail": "Not Found"}, 404))
        with pytest.raises(VLLMSyncError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            sync_lora_to_vllm(adapter, server.url, "policy")
    with pytest.raises(ConfigurationError, match=r"adapter_config\.json"):
        sync_lora_to_vllm(tmp_path, "http://127.0.0.1:9", "policy")


# --------------------------------------------------------------------------- two processes


def _rows() -> list[Any]:
    from genagent.training.data import TokenRow

    rows = []
    for i, (length, start) in enumerate(ROW_SPECS):
        ids = [40 + (7 * i + 3 * j) % 60 for j in range(length)]
        rows.append(
            TokenRow(
                input_ids=ids,
                loss_mask=[0] * start + [1] * (length - start),
                old_logprobs=None,
                images=[],
                turn_of_token=[0] * length,
                turn_rewards={},
                reward=None,
            )
        )
    return rows


def _config(model: str, out: Path, world_size: int) -> Any:
    from genagent.training.config import SFTConfig

    return SFTConfig.model_validate(
        {
            "model": model,
            "output_dir": out,
            # Adam's first step is about lr * sign(g); eps = 1 makes it about lr * g, so a wrong
            # loss normalisation (a different gradient scale) shows in the parameters
            "lr": 1.0,
            "eps": 1.0,
            "max_grad_norm": None,
            "max_steps": 1,
            "max_tokens": MAX_TOKENS,
            "grad_accum": len(ROW_SPECS) // world_size,  # the same rows per step in all
            "warmup_steps": 0,
            "schedule": "constant",
            "mixed_precision": "no",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "tensorboard": False,
        }
    )


def _advantages(groups: dict[str, list[tuple[int, float]]]) -> dict[int, float]:
    from genagent.training.advantages import group_advantages

    out: dict[int, float] = {}
    for members in groups.values():
        values = group_advantages([reward for _, reward in members]).advantages
        out.update({index: a for (index, _), a in zip(members, values, strict=True)})
    return out


def _sft_step(model: str, out: Path) -> dict[str, Any]:
    """One optimizer step of SFTTrainer on this process's share of the rows."""
    import torch
    from safetensors.torch import load_file

    from genagent.training.sft import SFTTrainer

    trainer = SFTTrainer(_config(model, out, world().size), rows=_rows())
    runtime = trainer.runtime
    trainer.setup_optimizer(1)
    (group, *_) = trainer._groups(0)  # this rank's micro-batches of the first step
    local_tokens = sum(trainer.count_tokens(b) for b in group)
    bare = runtime.unwrap(trainer.model)
    before = {n: p.detach().clone() for n, p in bare.named_parameters() if p.requires_grad}
    result = trainer.train_step(group)
    after = {n: p.detach().clone() for n, p in bare.named_parameters() if p.requires_grad}
    final = trainer.save_final()
    trainer.close()
    saved = load_file(final / "model" / "adapter_model.safetensors")
    update = max(float((after[n] - before[n]).abs().max()) for n in after)
    torch.save(after, out / f"params_rank{runtime.process_index}.pt")
    return {
        "processes": runtime.num_processes,
        "distributed_type": runtime.distributed_type,
        "local_tokens": local_tokens,
        "tokens": result.tokens,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "update": update,
        "saved_tensors": len(saved),
    }


def _worker(out_dir: str, model: str) -> None:
    """One rank of the two-process run (``RANK`` etc. in the environment)."""
    import torch

    torch.set_num_threads(1)
    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    report: dict[str, Any] = {}
    # (b) first: the Accelerator created by the trainer initialises the gloo process group
    report["sft"] = _sft_step(model, out / "two")
    here = world()
    report["world"] = [here.rank, here.size, here.is_main]
    # (a) each rank ran a strided share of every prompt's samples
    mine = {gid: shard(members, here.rank, here.size) for gid, members in GROUPS.items()}
    whole = gather_groups(mine, order=lambda member: member[0])
    report["groups"] = whole
    advantages = _advantages(whole)
    report["advantages"] = {
        index: advantages[index] for members in mine.values() for index, _ in members
    }
    # a rank without a parameter's gradient still takes part in the reduction
    from genagent.training.distributed import all_reduce_gradients, all_reduce_sum

    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    params[0].grad = torch.full((3,), float(rank + 1))
    if rank == 0:
        params[1].grad = torch.full((3,), 4.0)
    all_reduce_gradients(params)
    report["grads"] = [p.grad.tolist() for p in params if p.grad is not None]
    report["sum"] = float(all_reduce_sum(torch.tensor(float(rank + 1))))
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))
    end_processes()  # or a rank may abort at exit while the other still talks to it


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(
    out: Path,
    model: str,
    processes: int,
    timeout_s: float,
    worker: str = "_worker",
    module: str = "tests.test_training_distributed",
) -> None:
    """Start the ranks as ``accelerate launch --cpu`` would (its environment), wait for them.

    Ranks still running after ``timeout_s`` (a hang in a collective) are killed, and the test
    fails with their logs.
    """
    port = _free_port()
    code = f"from {module} import {worker}; {worker}({str(out)!r}, {model!r})"
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
    hung = False
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        hung = True
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
    assert not hung, f"the ranks did not finish within {timeout_s} s (a hang?)\n{logs}"
    assert all(p.returncode == 0 for p in procs), logs


def _tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL the two-process tests train (one layer, 4 image tokens)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from genagent.testing import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(
        tmp_path_factory.mktemp("tiny") / "model", tokenizer="byte", layers=1, max_pixels=56 * 56
    )


def _require_gloo() -> Any:
    """Skip unless two CPU processes can form a gloo group here; return ``torch``."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    try:
        _free_port()
    except OSError as exc:
        pytest.skip(f"no loopback TCP port for the process group: {exc}")
    return torch


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(tmp_path_factory)


@pytest.mark.timeout(180)
def test_two_gloo_processes_match_one_process(tiny_model: Path, tmp_path: Path) -> None:
    torch = _require_gloo()

    (tmp_path / "two").mkdir()
    _launch(tmp_path, str(tiny_model), processes=2, timeout_s=150)
    reports = [json.loads((tmp_path / f"report_rank{r}.json").read_text()) for r in range(2)]

    # (a) the whole groups on every rank, and the advantages of one process
    expected = _advantages(GROUPS)
    for rank, report in enumerate(reports):
        assert report["world"] == [rank, 2, rank == 0]
        assert {k: [tuple(m) for m in v] for k, v in report["groups"].items()} == GROUPS
        mine = {int(i): a for i, a in report["advantages"].items()}
        assert mine and all(abs(a - expected[i]) < 1e-12 for i, a in mine.items())
    covered = sorted(int(i) for report in reports for i in report["advantages"])
    assert covered == sorted(expected)  # each sample on exactly one rank
    assert reports[0]["grads"] == [[1.5] * 3, [2.0] * 3] == reports[1]["grads"]
    assert reports[0]["sum"] == reports[1]["sum"] == 3.0

    # (b) one SFT step over the two ranks is the one-process step on all the rows
    torch.set_num_threads(1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        assert name not in os.environ
    (tmp_path / "one").mkdir()
    one = _sft_step(str(tiny_model), tmp_path / "one")
    two = [r["sft"] for r in reports]
    assert one["processes"] == 1
    assert all(r["processes"] == 2 and r["distributed_type"] == "MULTI_CPU" for r in two)
    assert two[0]["local_tokens"] != two[1]["local_tokens"]  # unequal shards on purpose
    assert two[0]["local_tokens"] + two[1]["local_tokens"] == one["tokens"]
    assert two[0]["tokens"] == two[1]["tokens"] == one["tokens"]
    assert abs(two[0]["loss"] - one["loss"]) < 1e-5
    assert abs(two[0]["grad_norm"] - one["grad_norm"]) < 1e-5 * max(1.0, one["grad_norm"])
    assert one["update"] > 1e-3  # the step moved the parameters far more than the tolerance

    reference = torch.load(tmp_path / "one" / "params_rank0.pt")
    diffs = []
    for rank in range(2):
        params = torch.load(tmp_path / "two" / f"params_rank{rank}.pt")
        assert params.keys() == reference.keys()
        diffs.append(max(float((params[n] - reference[n]).abs().max()) for n in reference))
    print(f"max |param diff| two processes vs one: rank 0 {diffs[0]:.3e}, rank 1 {diffs[1]:.3e}")
    assert max(diffs) < TOLERANCE, diffs
    # only the main process wrote the final adapter, once
    assert (tmp_path / "two" / "final" / "model" / "adapter_model.safetensors").is_file()
    assert two[0]["saved_tensors"] == one["saved_tensors"] > 0
