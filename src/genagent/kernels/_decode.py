"""Decode attention over a padded KV cache: GQA-aware flash-decoding in Triton (private).

Each program owns one key/value head and *all* query rows that read it (the query heads of the GQA
group x the few query positions), so a cache tile is loaded once per kv head and multiplied against
the whole group with one ``tl.dot``. The cache is split along its length into chunks
(flash-decoding): several programs work on one sequence, each writes a partial output and its LSE,
and a small reduction kernel combines them, so batch 1 with a long context still fills the GPU.
With a single chunk the first kernel writes the output directly and the reduction is skipped.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from genagent.errors import ConfigurationError
from genagent.kernels import _configs

__all__ = ["decode_attention"]

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    Q,
    K,
    V,
    SEQLENS,
    Out,
    OPART,
    LSEPART,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_pb,
    stride_ps,
    stride_ph,
    stride_pr,
    stride_lb,
    stride_ls,
    stride_lh,
    len_q,
    len_cache,
    group,
    chunk,
    n_row_blocks,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    kvh = tl.program_id(1) // n_row_blocks
    row_block = tl.program_id(1) % n_row_blocks
    b = tl.program_id(2)
    seqlen = tl.minimum(tl.load(SEQLENS + b), len_cache)
    # row r of this program = query head (kvh * group + r // len_q) at query position r % len_q
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    g = rows // len_q
    t = rows % len_q
    row_ok = rows < group * len_q
    h = kvh * group + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # fmt: skip
    # the queries are the last len_q positions: query t sees cache positions j <= pos
    pos = seqlen - len_q + t
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seqlen)
    k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh
    kt_ptrs = k_base + (lo + offs_n)[None, :].to(tl.int64) * stride_kt + offs_d[:, None] * stride_kd
    v_ptrs = v_base + (lo + offs_n)[:, None].to(tl.int64) * stride_vt + offs_d[None, :] * stride_vd
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        kt = tl.load(kt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(col_ok[None, :] & (cols[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        kt_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if SPLIT:
        lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
        local = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
        tl.store(
            OPART + b * stride_pb + split * stride_ps + kvh * stride_ph
            + local[:, None] * stride_pr + offs_d[None, :],
            acc,
        )  # fmt: skip
        tl.store(LSEPART + b * stride_lb + split * stride_ls + kvh * stride_lh + local, lse2)
    else:
        tl.store(
            Out + b.to(tl.int64) * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh
            + offs_d[None, :],
            acc.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )  # fmt: skip


@triton.jit
def _decode_reduce_kernel(
    OPART,
    LSEPART,
    Out,
    stride_pb,
    stride_ps,
    stride_ph,
    stride_pr,
    stride_lb,
    stride_ls,
    stride_lh,
    stride_ob,
    stride_ot,
    stride_oh,
    n_splits,
    len_q,
    group,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    kvh = tl.program_id(0)
    row_block = tl.program_id(1)
    b = tl.program_id(2)
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    lse_base = LSEPART + b * stride_lb + kvh * stride_lh + rows
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(lse_base + s * stride_ls))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    o_base = OPART + b * stride_pb + kvh * stride_ph + rows[:, None] * stride_pr + offs_d[None, :]
    for s in range(n_splits):
        w = tl.math.exp2(tl.load(lse_base + s * stride_ls) - m_safe)
        acc += w[:, None] * tl.load(o_base + s * stride_ps)
        total += w
    acc = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    g = rows // len_q
    t = rows % len_q
    h = kvh * group + g
    tl.store(
        Out + b.to(tl.int64) * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh
        + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=(rows < group * len_q)[:, None] & (offs_d < D)[None, :],
    )  # fmt: skip


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4  # the interpreter: a few chunks, enough to exercise the reduction


def _pick_splits(programs: int, len_cache: int, block_n: int, device: torch.device) -> int:
    """Chunks per sequence: enough programs for about two waves, chunks of >= 4 key tiles."""
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    by_occupancy = -(-2 * sms // programs)
    by_length = max(1, len_cache // (4 * block_n))
    return max(1, min(by_occupancy, by_length, 128))


def _check_decode_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor
) -> None:
    from genagent.kernels import unsupported_reason

    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConfigurationError(
                f"{name} must be a 4-D tensor (batch, seq, heads, head_dim), got {shape}"
            )
    if k_cache.shape != v_cache.shape:
        raise ConfigurationError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
            f"{tuple(v_cache.shape)}"
        )
    if q.shape[0] != k_cache.shape[0] or q.shape[3] != k_cache.shape[3]:
        raise ConfigurationError(
            f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} must agree on batch (dim 0) "
            "and head dim (dim 3)"
        )
    reason = unsupported_reason(q, k_cache, v_cache)
    if reason is not None:
        raise ConfigurationError(f"the decode attention kernel cannot run here: {reason}")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        got = cache_seqlens.dtype if isinstance(cache_seqlens, torch.Tensor) else cache_seqlens
        raise ConfigurationError(
            f"cache_seqlens must be an int32 tensor of shape (batch,), got {got}; "
            "pass cache_seqlens.to(torch.int32)"
        )
    if cache_seqlens.shape != (q.shape[0],):
        raise ConfigurationError(
            f"cache_seqlens must have shape ({q.shape[0]},) (one length per sequence), "
            f"got {tuple(cache_seqlens.shape)}"
        )
    if cache_seqlens.device != q.device:
        raise ConfigurationError(
            f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}; "
            "move it with cache_seqlens.to(q.device)"
        )
    if q.device.type == "cpu" and cache_seqlens.numel():
        lengths = cache_seqlens.tolist()
        if min(lengths) < 0 or max(lengths) > k_cache.shape[1]:
            raise ConfigurationError(
                f"cache_seqlens must lie in [0, {k_cache.shape[1]}] (the cache length), "
                f"got {lengths}"
            )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Implementation of :func:`genagent.kernels.decode_attention`."""
    _check_decode_inputs(q, k_cache, v_cache, cache_seqlens)
    if num_splits is not None and (isinstance(num_splits, bool) or num_splits < 1):
        raise ConfigurationError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    batch, len_q, hq, d = q.shape
    len_cache, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    out = torch.empty((batch, len_q, hq, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if len_cache == 0:
        return out.zero_()
    block_d = max(16, int(triton.next_power_of_2(d)))
    default = _configs.default_config("decode", d, q.dtype, q.device)
    rows = group * len_q
    precision = "ieee" if q.dtype == torch.float32 else None

    def launch(cfg: _configs.KernelConfig) -> None:
        block_r = min(cfg.BLOCK_M, max(16, triton.next_power_of_2(rows)))
        n_row_blocks = triton.cdiv(rows, block_r)
        splits = num_splits or _pick_splits(
            batch * hkv * n_row_blocks, len_cache, cfg.BLOCK_N, q.device
        )
        chunk = triton.cdiv(triton.cdiv(len_cache, splits), cfg.BLOCK_N) * cfg.BLOCK_N
        splits = triton.cdiv(len_cache, chunk)
        padded_rows = n_row_blocks * block_r
        if splits > 1:
            opart = torch.empty(
                (batch, splits, hkv, padded_rows, block_d), dtype=torch.float32, device=q.device
            )
            lsepart = torch.empty(
                (batch, splits, hkv, padded_rows), dtype=torch.float32, device=q.device
            )
        else:
            opart = lsepart = out  # unused
        p_strides = opart.stride()[:4] if splits > 1 else (0, 0, 0, 0)
        l_strides = lsepart.stride()[:3] if splits > 1 else (0, 0, 0)
        _decode_kernel[(splits, hkv * n_row_blocks, batch)](
            q, k_cache, v_cache, cache_seqlens, out, opart, lsepart, scale * _LOG2E,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride()[:3],
            *p_strides, *l_strides, len_q, len_cache, group, chunk, n_row_blocks,
            D=d, BLOCK_R=block_r, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d, SPLIT=splits > 1,
            PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if splits > 1:
            _decode_reduce_kernel[(hkv, n_row_blocks, batch)](
                opart, lsepart, out, *p_strides, *l_strides, *out.stride()[:3],
                splits, len_q, group, D=d, BLOCK_R=block_r, BLOCK_D=block_d,
                num_warps=4,
            )  # fmt: skip

    key = _configs.autotune_key(
        "decode", max_seqlen_q=len_q, max_seqlen_k=len_cache, head_dim=d, dtype=q.dtype,
        causal=True, group=group, device=q.device,
    )  # fmt: skip
    _configs.run_with_config("decode", key, default, launch, device=q.device)
    return out
