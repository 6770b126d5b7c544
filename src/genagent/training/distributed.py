"""Several processes: who am I, data shards, gathering groups, reductions, vLLM weight sync.

The trainers run unchanged in one process or under ``accelerate launch`` (DDP or FSDP, one or
several nodes): :class:`~genagent.training._common.Runtime` wraps an ``accelerate.Accelerator``,
which joins the process group that the launcher describes. This module holds the pieces that
the trainers (and user code) need around that:

* :func:`world`: this process's rank, the number of processes, whether it is the main one;
* :func:`shard`: the deterministic slice of a step's items that one rank trains on, so that the
  ranks together see exactly the items of a one-process step, each item once;
* :func:`gather_groups`: every rank's members of each group (the rollouts of one prompt), merged
  across ranks in a deterministic order, so group-normalised advantages see the whole group;
* :func:`all_reduce_sum`, :func:`all_reduce_mean` and :func:`all_reduce_gradients`: reductions
  that are the identity in one process;
* :func:`sync_lora_to_vllm`: ask a vLLM server to (re)load a saved LoRA adapter, so rollouts
  served by vLLM use the weights of the latest update (what ``RLTrainer`` does with
  ``rollout.backend = "vllm"``).

Everything here is the identity, or a plain local computation, when ``torch.distributed`` is
not initialised; importing the module does not import torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from genagent.errors import ConfigurationError, GenAgentError

if TYPE_CHECKING:
    import torch

__all__ = [
    "VLLMSyncError",
    "World",
    "all_reduce_gradients",
    "all_reduce_mean",
    "all_reduce_sum",
    "end_processes",
    "gather_groups",
    "gather_objects",
    "is_distributed",
    "shard",
    "sync_lora_to_vllm",
    "world",
]

logger = logging.getLogger("genagent.training")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class World(NamedTuple):
    """Where this process stands among the training processes.

    Attributes:
        rank: This process's index, ``0 .. size - 1``.
        size: The number of processes (over every node).
        local_rank: This process's index on its node.
    """

    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and talks to servers."""
        return self.rank == 0


def _dist() -> Any:
    """``torch.distributed`` when it is initialised, else ``None``."""
    try:
        import torch.distributed as dist
    except ImportError:  # no torch
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group of more than one process is initialised."""
    dist = _dist()
    return dist is not None and int(dist.get_world_size()) > 1


def end_processes() -> None:
    """End a distributed run: wait for every process, then shut the process group down.

    Call it once at the end of a script run by ``accelerate launch`` or ``torchrun`` (``genagent
    train`` does). A process that exits while another still talks to it can otherwise abort
    (gloo: "terminate called without an active exception"), which the launcher reports as a
    failed run. Does nothing when no process group is initialised.
    """
    dist = _dist()
    if dist is None:
        return
    dist.barrier()
    dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        return default


def world() -> World:
    """This process's rank, the number of processes and its rank on the node.

    The initialised ``torch.distributed`` process group when there is one (what accelerate
    joins), else the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables that ``torchrun`` and
    ``accelerate launch`` set (before the group is initialised), else one process.

    Example:
        ```python
        from genagent.training.distributed import world

        me = world()
        if me.is_main:
            print(f"{me.size} processes")
        ```
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    dist = _dist()
    if dist is not None:
        return World(int(dist.get_rank()), int(dist.get_world_size()), local_rank)
    size = max(1, _env_int("WORLD_SIZE", 1))
    rank = min(max(0, _env_int("RANK", 0)), size - 1)
    return World(rank, size, local_rank)


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's deterministic share of a step's items: ``items[rank::world_size]``.

    Every item goes to exactly one rank, so the ranks together see exactly the items that
    one process would see in the step, and the slices are disjoint. The split is strided (item
    ``i`` to rank ``i % world_size``): ranks get counts that differ by at most one, and items in
    a sorted order (longest first, say) spread evenly. The trainers normalise the loss by the
    number of trained tokens of *all* ranks, so unequal shards still give the one-process
    gradient.

    Args:
        items: The items of one step, in the same order on every rank.
        rank: This rank (default: :func:`world`'s).
        world_size: The number of ranks (default: :func:`world`'s).

    Returns:
        The items of this rank, in their order.

    Raises:
        ConfigurationError: If ``world_size < 1`` or ``rank`` is not in ``0 .. world_size - 1``.

    Example:
        ```python
        from genagent.training.distributed import shard

        assert shard(list(range(5)), 0, 2) == [0, 2, 4]
        assert shard(list(range(5)), 1, 2) == [1, 3]
        ```
    """
    if rank is None or world_size is None:
        here = world()
        rank = here.rank if rank is None else rank
        world_size = here.size if world_size is None else world_size
    r, n = rank, world_size
    if n < 1 or not 0 <= r < n:
        raise ConfigurationError(f"shard: rank {r} is not in 0 .. {n - 1} (world size {n})")
    return list(items[r::n])


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), indexed by rank; ``[value]`` in one process.

    A collective: every rank must call it. Under NCCL each process must have its CUDA device
    set (accelerate does this).
    """
    dist = _dist()
    if dist is None or int(dist.get_world_size()) == 1:
        return [value]
    out: list[Any] = [None] * int(dist.get_world_size())
    dist.all_gather_object(out, value)
    return out


def _sorted_keys(keys: Iterable[K]) -> list[K]:
    unique = list(dict.fromkeys(keys))
    try:
        return sorted(unique)  # type: ignore[type-var]
    except TypeError:  # keys of mixed types: a stable order all the same
        return sorted(unique, key=lambda k: (type(k).__name__, repr(k)))


def gather_groups(
    local_groups: Mapping[K, Sequence[T]],
    *,
    order: Callable[[T], Any] | None = None,
) -> dict[K, list[T]]:
    """Merge every rank's members of each group: the whole groups, on every rank.

    Each rank passes the members it holds of each group (group id to members, such as the
    rollouts of one prompt it ran with their rewards); every rank gets back every group with
    the members of all ranks, so group statistics (the mean and standard deviation of a GRPO
    group) are those of the whole group, as in one process. Without an initialised process
    group it is the identity (with the same ordering).

    The result is deterministic and the same on every rank: groups sorted by id, members in
    rank order then in each rank's order, or sorted by ``order`` (stable) when given, which
    makes the member order independent of how members were split across ranks.

    A collective: every rank must call it, also a rank that holds no group (pass ``{}``).

    Args:
        local_groups: This rank's members of each group, by group id (picklable; ids
            sortable, or of mixed types, then sorted by type name and ``repr``).
        order: A sort key of members within a group (a sample index, a trajectory id).

    Returns:
        Every group id with all its members.

    Example:
        ```python
        from genagent.training.advantages import group_advantages
        from genagent.training.distributed import gather_groups

        # this rank ran samples 0 and 2 of prompt "p1"; another rank ran 1 and 3
        mine = {"p1": [(0, 1.0), (2, 0.0)]}
        groups = gather_groups(mine, order=lambda member: member[0])
        advantages = group_advantages([reward for _, reward in groups["p1"]]).advantages
        ```
    """
    parts = gather_objects({key: list(members) for key, members in local_groups.items()})
    merged: dict[K, list[T]] = {}
    for key in _sorted_keys(k for part in parts for k in part):
        members = [m for part in parts for m in part.get(key, ())]
        merged[key] = sorted(members, key=order) if order is not None else members
    return merged


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returned. The identity in one process."""
    dist = _dist()
    if dist is not None and int(dist.get_world_size()) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the ranks, in place; returned. The identity in one process."""
    dist = _dist()
    if dist is not None and int(dist.get_world_size()) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(int(dist.get_world_size()))
    return tensor


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], *, mean: bool = True) -> None:
    """Sum (or average) the gradients of trainable parameters over the ranks, in one bucket.

    Unlike an all-reduce per parameter that skips ``grad is None``, it takes part in the same
    collective on every rank even when a parameter got no gradient on some rank (a vision
    tower on a rank whose micro-batches hold no image): the missing gradient counts as zeros
    (and is then set). One flat all-reduce per dtype and device, in a fixed parameter order.

    Args:
        parameters: The parameters, in the same order on every rank (``model.parameters()``).
        mean: Divide by the number of ranks (DDP's convention); else a sum.
    """
    import torch

    dist = _dist()
    if dist is None or int(dist.get_world_size()) == 1:
        return
    size = int(dist.get_world_size())
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for param in parameters:
        if param.requires_grad:
            buckets.setdefault((param.dtype, param.device), []).append(param)
    for params in buckets.values():
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if mean:
            flat.div_(size)
        offset = 0
        for grad in grads:
            count = grad.numel()
            grad.copy_(flat[offset : offset + count].view_as(grad))
            offset += count


# --------------------------------------------------------------------------- vLLM


class VLLMSyncError(GenAgentError, RuntimeError):
    """A vLLM server did not (re)load the adapter; the message says what it answered."""


def _api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def sync_lora_to_vllm(
    adapter_dir: str | os.PathLike[str],
    base_url: str,
    name: str,
    *,
    api_key: str | None = None,
    timeout_s: float = 120.0,
) -> None:
    """Make a running vLLM server serve the adapter saved in ``adapter_dir`` as ``name``.

    Calls vLLM's runtime LoRA endpoint ``POST {base}/v1/load_lora_adapter`` with
    ``{"lora_name": name, "lora_path": adapter_dir, "load_inplace": true}``: the server
    replaces the adapter of that name in place, and later requests with ``"model": name`` use
    the new weights. Servers that predate ``load_inplace`` answer that the name is already
    loaded; then the adapter is unloaded (``POST /v1/unload_lora_adapter``) and loaded again.

    The server must run with ``--enable-lora`` (and a ``--max-lora-rank`` at least the
    adapter's rank) and the environment variable ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``,
    and must be able to read ``adapter_dir`` (a shared or local file system): vLLM loads the
    files itself. Save a fresh folder per update (the trainer's saves are atomic renames),
    call this from the main process only, and start the next rollouts after it returns.
    :class:`~genagent.training.rl_trainer.RLTrainer` does all of this when
    ``rollout.backend = "vllm"``.

    Args:
        adapter_dir: A folder written by peft's ``save_pretrained``
            (``adapter_config.json`` and ``adapter_model.safetensors``).
        base_url: The server, ``http://host:8000`` (a trailing ``/v1`` is accepted).
        name: The adapter's name on the server (what rollout requests put in ``model``).
        api_key: Sent as a bearer token (vLLM's ``--api-key``).
        timeout_s: Per request.

    Raises:
        ConfigurationError: If ``adapter_dir`` holds no adapter.
        VLLMSyncError: If the server refused or could not be reached.

    Example:
        ```py
        from genagent.training.distributed import sync_lora_to_vllm

        sync_lora_to_vllm("runs/rl/adapters/step-000010/model", "http://localhost:8000", "policy")
        ```
    """
    import httpx

    folder = Path(adapter_dir).resolve()
    if not (folder / "adapter_config.json").is_file():
        raise ConfigurationError(
            f"{folder} holds no LoRA adapter (no adapter_config.json): pass the folder that "
            "peft's save_pretrained wrote (for a trainer's save, its `model` subfolder)"
        )
    root = _api_root(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    load = {"lora_name": name, "lora_path": str(folder), "load_inplace": True}
    try:
        with httpx.Client(timeout=timeout_s, headers=headers) as client:
            reply = client.post(f"{root}/v1/load_lora_adapter", json=load)
            if reply.status_code == 400 and "already" in reply.text.lower():
                logger.info("vLLM at %s did not replace %r in place; reloading it", root, name)
                gone = client.post(f"{root}/v1/unload_lora_adapter", json={"lora_name": name})
                if gone.status_code >= 400:
                    raise VLLMSyncError(_refusal(f"{root}/v1/unload_lora_adapter", gone))
                reply = client.post(
                    f"{root}/v1/load_lora_adapter",
                    json={"lora_name": name, "lora_path": str(folder)},
                )
    except httpx.HTTPError as exc:
        raise VLLMSyncError(f"cannot reach the vLLM server at {root}: {exc}") from exc
    if reply.status_code >= 400:
        raise VLLMSyncError(_refusal(f"{root}/v1/load_lora_adapter", reply))
    logger.info("vLLM at %s serves adapter %r from %s", root, name, folder)


def _refusal(endpoint: str, reply: Any) -> str:
    hint = ""
    if reply.status_code == 404:
        hint = (
            " (is the server started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?)"
        )
    elif reply.status_code in (401, 403):
        hint = " (the server wants its --api-key as a bearer token: pass api_key=...)"
    elif "max_lora_rank" in reply.text or "max-lora-rank" in reply.text:
        hint = " (start the server with --max-lora-rank at least the adapter's rank)"
    return f"POST {endpoint} answered {reply.status_code}: {reply.text[:500]}{hint}"
