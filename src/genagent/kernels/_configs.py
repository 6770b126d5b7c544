"""Tile configurations for the attention kernels, and the opt-in autotuner (private).

Every launch uses a fixed default per GPU family (:func:`default_config`), so a training run with
varying sequence lengths compiles each kernel once and never pauses to benchmark. Autotuning is
opt-in (``GENAGENT_KERNELS_AUTOTUNE=1`` or :func:`set_autotune`); it benchmarks a short list of
candidates the first time a *bucketed* problem is seen (:func:`autotune_key`: power-of-two buckets
of the sequence lengths, the padded head dim, dtype, causal and GQA group) and reuses the winner for
every later call in the same bucket. A config that needs more shared memory than the GPU has is
shrunk once and remembered, so a too-ambitious default degrades instead of failing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "KernelConfig",
    "KernelKind",
    "autotune_enabled",
    "autotune_key",
    "default_config",
    "gpu_family",
    "set_autotune",
]

logger = logging.getLogger("genagent.kernels")

KernelKind = Literal["fwd", "bwd", "decode"]
_KINDS: tuple[KernelKind, ...] = ("fwd", "bwd", "decode")


@dataclass(frozen=True)
class KernelConfig:
    """The tiles and launch parameters of one kernel launch.

    The meaning of the two tiles depends on the kernel kind:

    * ``fwd``: each program owns ``BLOCK_M`` queries and streams keys ``BLOCK_N`` at a time.
    * ``bwd``: the dK/dV kernel owns ``BLOCK_N`` keys and streams queries ``BLOCK_M`` at a time;
      the dQ kernel owns ``BLOCK_N`` queries and streams keys ``BLOCK_M`` at a time (the owned tile
      is the large one in both).
    * ``decode``: ``BLOCK_M`` caps the query rows (query heads of a group x query positions) one
      program handles; ``BLOCK_N`` is the key tile streamed from the cache.

    Attributes:
        BLOCK_M: Rows of the first tile (a power of two, at least 16).
        BLOCK_N: Rows of the second tile (a power of two, at least 16).
        num_warps: Warps per program.
        num_stages: Software-pipelining stages of the streamed loads.
    """

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("BLOCK_M", "BLOCK_N"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name}={value} must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps={self.num_warps} must be 1, 2, 4, 8 or 16")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages={self.num_stages} must be >= 1")


# --------------------------------------------------------------------------- defaults

# (kind, family, head-dim bucket) -> config. Families: "sm90" (H100/H200,
# 228 KB shared memory), "sm80" (A100, 164 KB), "sm89" (L4/L40/RTX 40xx, ~100 KB), "other"
# (A10/RTX 30xx and other 8.x GPUs, ~100 KB) and "interpreter" (TRITON_INTERPRET=1 on the CPU,
# where a larger tile means fewer interpreted steps but the tests want several tiles per sequence);
# "fp32" holds the configs of 4-byte inputs on any GPU.
_C = KernelConfig
_TABLE: dict[tuple[str, str, int], KernelConfig] = {
    ("fwd", "sm90", 64): _C(128, 64, 4, 3),
    ("fwd", "sm90", 128): _C(128, 64, 8, 3),
    ("fwd", "sm90", 256): _C(128, 32, 8, 2),
    ("fwd", "sm80", 64): _C(128, 64, 8, 3),
    ("fwd", "sm80", 128): _C(128, 32, 8, 2),
    ("fwd", "sm80", 256): _C(64, 32, 8, 2),
    ("fwd", "sm89", 64): _C(128, 64, 8, 2),
    ("fwd", "sm89", 128): _C(64, 64, 8, 2),
    ("fwd", "sm89", 256): _C(64, 32, 8, 1),
    ("fwd", "other", 64): _C(64, 64, 4, 2),
    ("fwd", "other", 128): _C(64, 32, 4, 2),
    ("fwd", "other", 256): _C(32, 32, 4, 1),
    ("bwd", "sm90", 64): _C(32, 128, 8, 2),
    ("bwd", "sm90", 128): _C(32, 64, 8, 2),
    ("bwd", "sm90", 256): _C(16, 32, 8, 1),
    ("bwd", "sm80", 64): _C(32, 128, 8, 2),
    ("bwd", "sm80", 128): _C(32, 64, 8, 2),
    ("bwd", "sm80", 256): _C(16, 32, 8, 1),
    ("bwd", "sm89", 64): _C(32, 64, 4, 2),
    ("bwd", "sm89", 128): _C(32, 64, 8, 1),
    ("bwd", "sm89", 256): _C(16, 32, 8, 1),
    ("bwd", "other", 64): _C(16, 64, 4, 1),
    ("bwd", "other", 128): _C(16, 32, 4, 1),
    ("bwd", "other", 256): _C(16, 16, 4, 1),
    ("decode", "sm90", 64): _C(64, 128, 4, 3),
    ("decode", "sm90", 128): _C(64, 64, 4, 3),
    ("decode", "sm90", 256): _C(32, 64, 4, 2),
    ("decode", "sm80", 64): _C(64, 128, 4, 3),
    ("decode", "sm80", 128): _C(64, 64, 4, 2),
    ("decode", "sm80", 256): _C(32, 32, 4, 2),
    ("decode", "sm89", 64): _C(64, 64, 4, 2),
    ("decode", "sm89", 128): _C(64, 64, 4, 2),
    ("decode", "sm89", 256): _C(32, 32, 4, 1),
    ("decode", "other", 64): _C(64, 64, 4, 2),
    ("decode", "other", 128): _C(32, 32, 4, 2),
    ("decode", "other", 256): _C(16, 32, 4, 1),
    # fp32 inputs (exact "ieee" products, no tensor cores): small tiles on every GPU
    ("fwd", "fp32", 64): _C(32, 32, 4, 2),
    ("fwd", "fp32", 128): _C(16, 16, 4, 2),
    ("fwd", "fp32", 256): _C(16, 16, 4, 1),
    ("bwd", "fp32", 64): _C(16, 64, 4, 2),
    ("bwd", "fp32", 128): _C(16, 32, 4, 1),
    ("bwd", "fp32", 256): _C(16, 16, 4, 1),
    ("decode", "fp32", 64): _C(16, 64, 4, 2),
    ("decode", "fp32", 128): _C(16, 16, 4, 2),
    ("decode", "fp32", 256): _C(16, 16, 4, 1),
}
_INTERPRETER: dict[KernelKind, KernelConfig] = {
    "fwd": _C(32, 32, 1, 1),
    "bwd": _C(16, 32, 1, 1),
    "decode": _C(64, 32, 1, 1),
}


def _head_dim_bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def gpu_family(device: torch.device | str | None) -> str:
    """The config family of ``device``: sm90, sm80, sm89, other or interpreter."""
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return "interpreter"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(dev)
    if major >= 9:
        return "sm90"
    if (major, minor) == (8, 9):
        return "sm89"
    if major == 8 and minor == 0:
        return "sm80"
    return "other"


def default_config(
    kind: KernelKind, head_dim: int, dtype: torch.dtype, device: torch.device | str | None
) -> KernelConfig:
    """The fixed tile config for one kernel kind on one device.

    The defaults are chosen per GPU family (sm80: A100; sm89: L4/L40/RTX 40xx; sm90: H100/H200;
    anything else, and the CPU interpreter, get conservative tiles) and per head-dim bucket
    (<= 64, <= 128, <= 256). fp32 inputs get small tiles on every GPU (their exact products run
    without tensor cores and need many registers). The tables were checked by compiling every
    kernel for sm80, sm89 and sm90 with Triton's own ptxas: shared memory within each family's
    limit and no register spills for fp16/bf16 at head dims up to 128.

    Args:
        kind: ``"fwd"``, ``"bwd"`` or ``"decode"``.
        head_dim: The head dim of the inputs (before the kernel pads it to a power of two).
        dtype: The input dtype.
        device: The device of the inputs (a CUDA device, or ``"cpu"`` for the interpreter).

    Returns:
        The config the kernels use when autotuning is off.

    Raises:
        ValueError: If ``kind`` is not one of the three kinds.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} must be one of {', '.join(_KINDS)}")
    family = gpu_family(device)
    if family == "interpreter":
        return _INTERPRETER[kind]
    if dtype.itemsize >= 4:
        family = "fp32"
    return _TABLE[(kind, family, _head_dim_bucket(head_dim))]


# --------------------------------------------------------------------------- autotuning

_lock = threading.Lock()
_autotune_override: bool | None = None
_tuned: dict[tuple[object, ...], KernelConfig] = {}
_shrunk: dict[tuple[object, ...], KernelConfig] = {}


def set_autotune(enabled: bool | None) -> None:
    """Turn the autotuner on or off for this process.

    Args:
        enabled: ``True`` or ``False``; ``None`` goes back to the ``GENAGENT_KERNELS_AUTOTUNE``
            environment variable (``1`` turns it on; off when unset).
    """
    global _autotune_override
    _autotune_override = enabled


def autotune_enabled() -> bool:
    """Whether the autotuner runs: :func:`set_autotune`, else ``GENAGENT_KERNELS_AUTOTUNE=1``."""
    if _autotune_override is not None:
        return _autotune_override
    return os.environ.get("GENAGENT_KERNELS_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes")


def _pow2_bucket(n: int) -> int:
    """The smallest power of two >= ``n`` (at least 16): 1000 and 1020 both map to 1024."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def autotune_key(
    kind: KernelKind,
    *,
    max_seqlen_q: int,
    max_seqlen_k: int,
    head_dim: int,
    dtype: torch.dtype,
    causal: bool,
    group: int,
    device: torch.device | str | None = None,
) -> tuple[object, ...]:
    """The autotuner's cache key: sizes are bucketed so varying lengths reuse one tuning result.

    Args:
        kind: The kernel kind.
        max_seqlen_q: Longest query sequence (decode: query positions per sequence).
        max_seqlen_k: Longest key sequence (decode: the cache length).
        head_dim: The head dim.
        dtype: The input dtype.
        causal: Whether the mask is causal.
        group: Query heads per key/value head.
        device: The device (its GPU family is part of the key).

    Returns:
        A hashable key.
    """
    return (
        kind,
        gpu_family(device),
        str(dtype),
        _pow2_bucket(head_dim),
        _pow2_bucket(max_seqlen_q),
        _pow2_bucket(max_seqlen_k),
        bool(causal),
        int(group),
    )


def _candidates(kind: KernelKind, default: KernelConfig) -> list[KernelConfig]:
    if kind == "fwd":
        grid = [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)]
        launch = [(4, 2), (4, 3), (8, 3)]
    elif kind == "bwd":
        grid = [(16, 64), (32, 64), (32, 128), (64, 64), (64, 128)]
        launch = [(4, 1), (4, 2), (8, 2)]
    else:
        grid = [(default.BLOCK_M, 32), (default.BLOCK_M, 64), (default.BLOCK_M, 128)]
        launch = [(4, 2), (4, 3), (8, 3)]
    found = [default]
    for (m, n), (warps, stages) in ((g, s) for g in grid for s in launch):
        config = KernelConfig(m, n, warps, stages)
        if config not in found:
            found.append(config)
    return found


def _is_out_of_resources(exc: BaseException) -> bool:
    return type(exc).__name__ in ("OutOfResources", "OutOfResourcesError")


def _shrink(config: KernelConfig) -> KernelConfig | None:
    """A smaller config to retry with after an out-of-shared-memory error, or ``None``."""
    if config.num_stages > 1:
        return replace(config, num_stages=config.num_stages - 1)
    if config.BLOCK_N > 16:
        return replace(config, BLOCK_N=config.BLOCK_N // 2)
    if config.BLOCK_M > 16:
        return replace(config, BLOCK_M=config.BLOCK_M // 2)
    return None


def run_with_config(
    kind: KernelKind,
    key: tuple[object, ...],
    default: KernelConfig,
    launch: Callable[[KernelConfig], None],
    *,
    device: torch.device,
    bench: Callable[[Callable[[], None]], float] | None = None,
) -> KernelConfig:
    """Launch ``launch`` with the config for ``key`` and return the config used.

    Without autotuning (the default), the config is ``default``, or the smaller one it was shrunk
    to after an earlier out-of-resources error. With autotuning on a GPU, the first call for a key
    benchmarks the candidates (``bench``: ``triton.testing.do_bench`` unless given) and keeps the
    fastest; the tuned launches leave their outputs written, and the winner is launched last.
    """
    # the interpreter's timings mean nothing: it tunes only with an injected `bench` (tests)
    use_tuner = autotune_enabled() and (device.type == "cuda" or bench is not None)
    if not use_tuner:
        return _launch_shrinking((kind, *key[1:4]), default, launch)
    with _lock:
        tuned = _tuned.get(key)
    if tuned is not None:
        launch(tuned)
        return tuned
    measure = bench if bench is not None else _do_bench
    timings: list[tuple[float, KernelConfig]] = []
    for config in _candidates(kind, default):
        try:
            timings.append((measure(lambda config=config: launch(config)), config))  # type: ignore[misc]
        except Exception as exc:
            if not _is_out_of_resources(exc):
                raise
    if not timings:
        return _launch_shrinking((kind, *key[1:4]), default, launch)
    best = min(timings, key=lambda item: item[0])[1]
    logger.info("autotuned %s for %s: %s (%.3f ms)", kind, key, best, min(t for t, _ in timings))
    with _lock:
        _tuned[key] = best
    launch(best)
    return best


def _launch_shrinking(
    shrink_key: tuple[object, ...], default: KernelConfig, launch: Callable[[KernelConfig], None]
) -> KernelConfig:
    with _lock:
        config: KernelConfig | None = _shrunk.get(shrink_key, default)
    while config is not None:
        try:
            launch(config)
        except Exception as exc:
            if not _is_out_of_resources(exc):
                raise
            smaller = _shrink(config)
            logger.warning("%s does not fit this GPU (%s); retrying with %s", config, exc, smaller)
            config = smaller
            continue
        if config != default:
            with _lock:
                _shrunk[shrink_key] = config
        return config
    raise RuntimeError(f"no tile config fits this GPU for {shrink_key}")


def _do_bench(fn: Callable[[], None]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20))


def _clear_caches() -> None:
    """Forget tuned and shrunk configs (tests)."""
    with _lock:
        _tuned.clear()
        _shrunk.clear()
