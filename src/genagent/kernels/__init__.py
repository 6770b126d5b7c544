"""Fused attention kernels in Triton: packed variable-length attention and KV-cache decoding.

Install with ``pip install 'genagent[kernels]'`` (torch and triton). Importing this package needs
neither: triton is imported on the first kernel call, and :func:`is_available` /
:func:`unsupported_reason` say whether (and why not) the kernels can serve given tensors.

* :func:`varlen_attention` / :func:`varlen_attention_with_lse`: training and prefill on sequences
  packed back to back (``cu_seqlens``), causal or not, native GQA, differentiable.
* :func:`decode_attention`: a few new query positions per sequence against a padded KV cache,
  GQA-aware and split along the cache (flash-decoding).

Tiles are fixed per GPU family (:func:`default_config`); :func:`set_autotune` (or
``GENAGENT_KERNELS_AUTOTUNE=1``) benchmarks candidates once per bucketed problem size instead.
On the CPU the kernels run under the Triton interpreter when ``TRITON_INTERPRET=1`` is set before
the kernels are first used (tests only: it is slow).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from genagent.kernels._configs import (
    KernelConfig,
    autotune_enabled,
    default_config,
    set_autotune,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "KernelConfig",
    "autotune_enabled",
    "decode_attention",
    "default_config",
    "is_available",
    "set_autotune",
    "unsupported_reason",
    "varlen_attention",
    "varlen_attention_with_lse",
]

_DTYPES = ("float16", "bfloat16", "float32")
_MAX_HEAD_DIM = 256


def _triton_missing() -> str | None:
    try:
        import torch  # noqa: F401
        import triton  # noqa: F401
    except ImportError as exc:
        return (
            f"{exc.name or 'triton'} is not installed; install the kernels extra: "
            "pip install 'genagent[kernels]'"
        )
    return None


def _interpreter_active() -> bool:
    """Whether the kernels run under the Triton interpreter (CPU tensors work then).

    The interpreter is chosen when the kernels are defined: once ``_varlen`` is imported its
    kernels decide; before that, ``TRITON_INTERPRET`` does.
    """
    module = sys.modules.get("genagent.kernels._varlen")
    if module is not None:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(module._fwd_kernel, InterpretedFunction)
    import triton

    return bool(triton.knobs.runtime.interpret)


def _device_reason(device: torch.device) -> str | None:
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{device} was asked for but this torch sees no CUDA GPU"
        if _interpreter_active():
            return None
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            # compiled for sm75 (T4) the kernels spill registers heavily: SDPA is the better path
            return (
                f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; "
                "the kernels need 8.0 or newer (A100, A10, L4/L40, H100, ...)"
            )
        return None
    if device.type == "cpu":
        if _interpreter_active():
            return None
        return (
            "the tensors are on the CPU and the Triton interpreter is off; use a CUDA device "
            "(or, for tests, set TRITON_INTERPRET=1 before genagent.kernels first runs a kernel)"
        )
    return f"device type {device.type!r} is not supported; the kernels run on CUDA GPUs"


def is_available(device: torch.device | str | None = None) -> bool:
    """Whether the kernels can run on ``device``.

    Args:
        device: A CUDA device, or ``"cpu"`` (true only under ``TRITON_INTERPRET=1``). ``None``
            means the current CUDA device.

    Returns:
        ``True`` if triton imports and the device can run the kernels; :func:`unsupported_reason`
        says why not for given tensors.
    """
    if _triton_missing() is not None:
        return False
    import torch

    try:
        dev = torch.device(device) if device is not None else torch.device("cuda")
    except (RuntimeError, TypeError):
        return False
    return _device_reason(dev) is None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot serve these tensors, or ``None`` if they can.

    Accepts the packed layout of :func:`varlen_attention` (``(tokens, heads, head_dim)``) and the
    batched layout of :func:`decode_attention` (``(batch, seq, heads, head_dim)``).

    Args:
        q: The queries.
        k: The keys (or key cache).
        v: The values (or value cache).

    Returns:
        A sentence naming the obstacle (triton missing, a CPU tensor without the interpreter, an
        unsupported dtype, head dim or head count, mixed devices, ...), or ``None``.
    """
    missing = _triton_missing()
    if missing is not None:
        return missing
    import torch

    tensors: dict[str, object] = {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a torch tensor"
        if t.dim() not in (3, 4):
            return (
                f"{name} has {t.dim()} dims; expected (tokens, heads, head_dim) or "
                "(batch, seq, heads, head_dim)"
            )
    if not q.dim() == k.dim() == v.dim():
        return f"q, k and v have {q.dim()}, {k.dim()} and {v.dim()} dims; they must agree"
    if not q.device == k.device == v.device:
        return f"q, k and v are on different devices ({q.device}, {k.device}, {v.device})"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k and v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype}); cast them"
    if str(q.dtype).removeprefix("torch.") not in _DTYPES:
        return f"dtype {q.dtype} is not supported; use float16, bfloat16 or float32"
    head_dim = q.shape[-1]
    if not head_dim == k.shape[-1] == v.shape[-1]:
        return f"head dims differ (q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]})"
    if not 0 < head_dim <= _MAX_HEAD_DIM:
        return f"head dim {head_dim} is not supported; the kernels take 1..{_MAX_HEAD_DIM}"
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv != v.shape[-2]:
        return f"k has {hkv} heads but v has {v.shape[-2]}"
    if hkv == 0 or hq % hkv:
        return (
            f"{hq} query heads are not a multiple of {hkv} key/value heads (GQA needs "
            "Hq % Hkv == 0)"
        )
    reason = _device_reason(q.device)
    if reason is not None:
        return reason
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return (
            "bfloat16 matmuls are wrong under the Triton interpreter (triton issue 11584); "
            "use float16 or float32 on the CPU"
        )
    return None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention over sequences packed back to back, fused in one Triton kernel (differentiable).

    Sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``; tokens never attend across sequences. Query head
    ``h`` reads key/value head ``h // (Hq // Hkv)`` (native GQA: K/V are not repeated; their
    gradients are summed over each group). A causal mask with ``Lq != Lk`` is aligned bottom-right
    as in flash-attn: query ``i`` sees keys ``j <= i + Lk - Lq``, and a query that sees no key
    gets a zero output. Sequences of length 0 are allowed. Computation is in fp32 whatever the
    input dtype.

    Args:
        q: Queries, ``(total_q, Hq, D)``, fp16, bf16 or fp32; ``D`` up to 256 (padded inside the
            kernel). May be strided in the token dim.
        k: Keys, ``(total_k, Hkv, D)``, same dtype and device, ``Hq % Hkv == 0``.
        v: Values, same shape as ``k``.
        cu_seqlens_q: int32 ``(batch + 1,)`` cumulative query starts, from 0.
        cu_seqlens_k: int32 ``(batch + 1,)`` cumulative key starts, from 0.
        max_seqlen_q: Length of the longest query sequence (sets the launch grid).
        max_seqlen_k: Length of the longest key sequence.
        causal: Apply the (bottom-right) causal mask.
        softmax_scale: Scale of the scores; ``1 / sqrt(D)`` by default.

    Returns:
        ``(total_q, Hq, D)`` in ``q``'s dtype.

    Raises:
        ConfigurationError: For shapes, dtypes, devices or ``cu_seqlens`` the kernel cannot take,
            saying what to change (``cu_seqlens`` values are checked for CPU tensors only, since
            reading them from a GPU would synchronize; out-of-range values are clamped inside the
            kernel, so they cannot read or write out of bounds).
    """
    from genagent.kernels._varlen import varlen_attention as impl

    return impl(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, softmax_scale=softmax_scale,
    )  # fmt: skip


def varlen_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`varlen_attention` that also returns the log-sum-exp of each query row.

    The LSE is differentiable too (its gradient flows into q and k), which is what merging
    partial attention results (ring attention, chunked prefill) needs.

    Args:
        q: As in :func:`varlen_attention`.
        k: As in :func:`varlen_attention`.
        v: As in :func:`varlen_attention`.
        cu_seqlens_q: As in :func:`varlen_attention`.
        cu_seqlens_k: As in :func:`varlen_attention`.
        max_seqlen_q: As in :func:`varlen_attention`.
        max_seqlen_k: As in :func:`varlen_attention`.
        causal: As in :func:`varlen_attention`.
        softmax_scale: As in :func:`varlen_attention`.

    Returns:
        ``(out, lse)``: ``out`` as from :func:`varlen_attention`; ``lse`` of shape
        ``(Hq, total_q)``, float32, the natural-log log-sum-exp of the scaled scores of each row
        (``-inf`` for a row that sees no key).

    Raises:
        ConfigurationError: As in :func:`varlen_attention`.
    """
    from genagent.kernels._varlen import varlen_attention_with_lse as impl

    return impl(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, softmax_scale=softmax_scale,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of a few new query positions against a padded KV cache (inference only).

    The queries of sequence ``b`` are its last ``Lq`` positions: query ``t`` sits at position
    ``cache_seqlens[b] - Lq + t`` and sees cache entries ``0..`` that position (causal among the
    new queries, which must already be written to the cache). One program serves all query heads
    of a key/value head, so the cache is read once per kv head, and the cache is split along its
    length across programs (flash-decoding) so that a single long sequence fills the GPU.

    Args:
        q: ``(B, Lq, Hq, D)``, a few positions (``Lq`` of 1..16 is typical).
        k_cache: ``(B, Lmax, Hkv, D)``, same dtype and device, ``Hq % Hkv == 0``.
        v_cache: Same shape as ``k_cache``.
        cache_seqlens: int32 ``(B,)``, the valid length of each cache (new queries included).
        softmax_scale: Scale of the scores; ``1 / sqrt(D)`` by default.
        num_splits: Chunks per sequence; ``None`` picks enough to fill the GPU.

    Returns:
        ``(B, Lq, Hq, D)`` in ``q``'s dtype; a query that sees no cache entry gets zeros.

    Raises:
        ConfigurationError: For shapes, dtypes or devices the kernel cannot take.
    """
    from genagent.kernels._decode import decode_attention as impl

    return impl(
        q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale, num_splits=num_splits
    )
