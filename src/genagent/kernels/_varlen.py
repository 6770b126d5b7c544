"""Variable-length (packed) fused attention in Triton: forward, backward, autograd (private).

Layout: ``q`` is ``(total_q, Hq, D)``, ``k``/``v`` are ``(total_k, Hkv, D)``, sequences are packed
back to back and delimited by ``cu_seqlens`` (int32 cumulative starts). Query head ``h`` reads
key/value head ``h // (Hq // Hkv)``: K/V are never repeated.

Kernels (FlashAttention-2 scheme, fp32 accumulation, exp2 with the scale folded into log2(e)):

* ``_fwd_kernel``: one program per (query tile, query head, sequence); streams key tiles in two
  phases, the fully visible tiles without masks, then the diagonal/ragged tail with masks. Saves the
  natural-log LSE per query row for the backward (``-inf`` for a row that sees no key).
* ``_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` (minus the LSE's own gradient, if any).
* ``_bwd_dkdv_kernel``: one program per (key tile, kv head, sequence); loops over the query heads of
  the GQA group and their query tiles, so dK/dV are summed in registers and written once
  (no atomics).
* ``_bwd_dq_kernel``: one program per (query tile, query head, sequence), recomputing P.

The head dim is padded to the next power of two inside the kernels (masked loads and stores);
token strides are passed, so views that are not contiguous in the token dim need no copy.
"""

from __future__ import annotations

import itertools
import math
import operator
from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from genagent.errors import ConfigurationError
from genagent.kernels import _configs

__all__ = ["varlen_attention", "varlen_attention_with_lse"]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- forward kernel


@triton.jit
def _fwd_inner(
    acc,
    m_i,
    l_i,
    q,
    kt_ptrs,
    v_ptrs,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    lo,
    hi,
    seqlen_k,
    diag,
    qk_scale,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    # 64-bit offsets: a long sequence times a wide token stride can pass 2**31
    kt_ptrs += tl.cast(lo, tl.int64) * stride_kt
    v_ptrs += tl.cast(lo, tl.int64) * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK:
            kt = tl.load(
                kt_ptrs, mask=(cols[None, :] < seqlen_k) & (offs_d[:, None] < D), other=0.0
            )
            v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & (offs_d[None, :] < D), other=0.0)
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASK:
            valid = cols[None, :] < seqlen_k
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m = -inf; subtract 0 instead to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        kt_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    CU_Q,
    CU_K,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_lse_h,
    total_q,
    total_k,
    group,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # the last query tiles see the most keys (causal): launch them first for a shorter tail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // group
    # clamped to the tensors, so that bad cu_seqlens can never read or write out of bounds
    q_start = tl.minimum(tl.load(CU_Q + b), total_q)
    seqlen_q = tl.minimum(tl.load(CU_Q + b + 1), total_q) - q_start
    k_start = tl.minimum(tl.load(CU_K + b), total_k)
    seqlen_k = tl.minimum(tl.load(CU_K + b + 1), total_k) - k_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    EVEN_D: tl.constexpr = D == BLOCK_D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < D), other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # bottom-right causal: query i sees key j iff j <= i + diag
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + diag), 0)
        full = tl.maximum(tl.minimum(seqlen_k, start_m + diag + 1), 0)
    else:
        hi = seqlen_k
        full = seqlen_k
    full = (full // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, kt_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
        0, full, seqlen_k, diag, qk_scale,
        D, BLOCK_N, EVEN_D, False, CAUSAL, PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, kt_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
        full, hi, seqlen_k, diag, qk_scale,
        D, BLOCK_N, EVEN_D, True, CAUSAL, PRECISION,
    )  # fmt: skip

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = Out + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    row_ok = offs_m < seqlen_q
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(LSE + h * stride_lse_h + q_start + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------- backward kernels


@triton.jit
def _bwd_preprocess_kernel(
    Out,
    DO,
    DLSE,
    DELTA,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_dlse_h,
    stride_dlse_t,
    stride_delta_h,
    total_q,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    mask = (rows[:, None] < total_q) & (offs_d[None, :] < D)
    o = tl.load(
        Out + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        DO + rows64[:, None] * stride_dot + h * stride_doh + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse_i / d s_ij = p_ij: the LSE's gradient enters dS exactly like -delta
        dlse = tl.load(
            DLSE + h * stride_dlse_h + rows64 * stride_dlse_t, mask=rows < total_q, other=0.0
        )
        delta -= dlse.to(tl.float32)
    tl.store(DELTA + h * stride_delta_h + rows, delta, mask=rows < total_q)


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    qt_ptrs,
    do_ptrs,
    LSE_h,
    DELTA_h,
    stride_qt,
    stride_dot,
    offs_n,
    offs_d,
    lo,
    hi,
    seqlen_q,
    diag,
    qk_scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m0 = tl.arange(0, BLOCK_M)
    qt_ptrs += tl.cast(lo, tl.int64) * stride_qt
    do_ptrs += tl.cast(lo, tl.int64) * stride_dot
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < seqlen_q
        qt = tl.load(qt_ptrs, mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        lse = tl.load(LSE_h + offs_m, mask=row_ok, other=0.0)
        # a row that saw no key has lse = -inf and P = 0: use +inf so that exp2(s - lse) = 0
        lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA_h + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if MASK:
            pt = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
        qt_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    CU_Q,
    CU_K,
    sm_scale,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lse_h,
    total_q,
    total_k,
    group,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.minimum(tl.load(CU_Q + b), total_q)
    seqlen_q = tl.minimum(tl.load(CU_Q + b + 1), total_q) - q_start
    k_start = tl.minimum(tl.load(CU_K + b), total_k)
    seqlen_k = tl.minimum(tl.load(CU_K + b + 1), total_k) - k_start
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols64 = (k_start + offs_n).to(tl.int64)
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < D)
    k = tl.load(
        K + cols64[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + cols64[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        # rows < lo see no key of this tile; rows >= full see all of them (no mask needed)
        lo = tl.maximum(start_n - diag, 0)
        lo = tl.minimum((lo // BLOCK_M) * BLOCK_M, seqlen_q)
        full = tl.maximum(start_n + BLOCK_N - 1 - diag, 0)
        full = tl.minimum(tl.cdiv(full, BLOCK_M) * BLOCK_M, seqlen_q)
        full = tl.maximum(full, lo)
    else:
        lo = 0
        full = 0
    first = q_start.to(tl.int64)
    offs_m0 = tl.arange(0, BLOCK_M)
    for g in range(group):
        h = kvh * group + g
        qt_ptrs = (
            Q + first * stride_qt + h * stride_qh
            + offs_m0[None, :] * stride_qt + offs_d[:, None] * stride_qd
        )  # fmt: skip
        do_ptrs = (
            DO + first * stride_dot + h * stride_doh
            + offs_m0[:, None] * stride_dot + offs_d[None, :] * stride_dod
        )  # fmt: skip
        LSE_h = LSE + h * stride_lse_h + q_start
        DELTA_h = DELTA + h * stride_lse_h + q_start
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, qt_ptrs, do_ptrs, LSE_h, DELTA_h, stride_qt, stride_dot,
            offs_n, offs_d, lo, full, seqlen_q, diag, qk_scale,
            D, BLOCK_M, True, PRECISION,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, qt_ptrs, do_ptrs, LSE_h, DELTA_h, stride_qt, stride_dot,
            offs_n, offs_d, full, seqlen_q, seqlen_q, diag, qk_scale,
            D, BLOCK_M, False, PRECISION,
        )  # fmt: skip
    dk *= sm_scale
    tl.store(
        DK + cols64[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + cols64[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    kt_ptrs,
    vt_ptrs,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    lo,
    hi,
    seqlen_k,
    diag,
    qk_scale,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    kt_ptrs += tl.cast(lo, tl.int64) * stride_kt
    vt_ptrs += tl.cast(lo, tl.int64) * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        mask = (cols[None, :] < seqlen_k) & (offs_d[:, None] < D) if MASK else offs_d[:, None] < D
        kt = tl.load(kt_ptrs, mask=mask, other=0.0)
        vt = tl.load(vt_ptrs, mask=mask, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            valid = cols[None, :] < seqlen_k
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
        kt_ptrs += BLOCK_N * stride_kt
        vt_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    CU_Q,
    CU_K,
    sm_scale,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_dqt,
    stride_dqh,
    stride_lse_h,
    total_q,
    total_k,
    group,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // group
    q_start = tl.minimum(tl.load(CU_Q + b), total_q)
    seqlen_q = tl.minimum(tl.load(CU_Q + b + 1), total_q) - q_start
    k_start = tl.minimum(tl.load(CU_K + b), total_k)
    seqlen_k = tl.minimum(tl.load(CU_K + b + 1), total_k) - k_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = (q_start + offs_m).to(tl.int64)
    row_ok = offs_m < seqlen_q
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(
        Q + rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + rows64[:, None] * stride_dot + h * stride_doh + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    )
    lse = tl.load(LSE + h * stride_lse_h + q_start + offs_m, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + h * stride_lse_h + q_start + offs_m, mask=row_ok, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + diag), 0)
        full = tl.maximum(tl.minimum(seqlen_k, start_m + diag + 1), 0)
    else:
        hi = seqlen_k
        full = seqlen_k
    full = (full // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, kt_ptrs, vt_ptrs, stride_kt, stride_vt, offs_m, offs_d,
        0, full, seqlen_k, diag, qk_scale, D, BLOCK_N, False, CAUSAL, PRECISION,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, kt_ptrs, vt_ptrs, stride_kt, stride_vt, offs_m, offs_d,
        full, hi, seqlen_k, diag, qk_scale, D, BLOCK_N, True, CAUSAL, PRECISION,
    )  # fmt: skip
    dq *= sm_scale
    tl.store(
        DQ + rows64[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=mask,
    )


# --------------------------------------------------------------------------- host side


def _block_d(head_dim: int) -> int:
    return max(16, int(triton.next_power_of_2(head_dim)))


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs get exact fp32 products (TF32 would lose ~3 decimal digits); 2-byte inputs use
    # the backend's default (the option only concerns fp32 operands)
    return "ieee" if dtype == torch.float32 else None


def _check_cu_seqlens(name: str, cu: Any, device: torch.device, batch_plus_one: int | None) -> None:
    if not isinstance(cu, torch.Tensor):
        raise ConfigurationError(
            f"{name} must be an int32 torch tensor of cumulative sequence starts, got {type(cu)}"
        )
    if cu.dtype != torch.int32:
        raise ConfigurationError(
            f"{name} must be int32, got {cu.dtype}; pass {name}.to(torch.int32)"
        )
    if cu.dim() != 1 or cu.numel() < 1:
        raise ConfigurationError(
            f"{name} must be 1-D with batch + 1 entries (0, len0, len0 + len1, ...), "
            f"got shape {tuple(cu.shape)}"
        )
    if batch_plus_one is not None and cu.numel() != batch_plus_one:
        raise ConfigurationError(
            f"{name} has {cu.numel()} entries but cu_seqlens_q has {batch_plus_one}: "
            "both must describe the same batch (batch + 1 entries each)"
        )
    if cu.device != device:
        raise ConfigurationError(
            f"{name} is on {cu.device} but q is on {device}; move it with {name}.to(q.device)"
        )


def _check_cu_values(name: str, cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Value checks; they need the values on the host, so only CPU tensors get them (no sync)."""
    values = cu.tolist()
    if values[0] != 0:
        raise ConfigurationError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in itertools.pairwise(values)]
    if any(n < 0 for n in lengths):
        raise ConfigurationError(f"{name} must be non-decreasing, got {values}")
    if values[-1] > total:
        raise ConfigurationError(
            f"{name} ends at {values[-1]} but the packed tensor has only {total} tokens"
        )
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ConfigurationError(
            f"a sequence in {name} has {longest} tokens but max_seqlen is {max_seqlen}; "
            "pass the longest length (tokens past max_seqlen would be skipped)"
        )


def _as_length(name: str, value: Any) -> int:
    # an int-like (numpy int, 0-d integer tensor) is accepted: transformers passes either
    try:
        length = operator.index(value)
    except TypeError:
        length = -1
    if isinstance(value, bool) or length < 0:
        raise ConfigurationError(f"{name} must be an int >= 0, got {value!r}")
    return length


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    from genagent.kernels import unsupported_reason

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConfigurationError(
                f"{name} must be a 3-D tensor (tokens, heads, head_dim) of packed sequences, "
                f"got {shape}; flatten (batch, seq) into tokens and pass cu_seqlens"
            )
    if k.shape != v.shape:
        raise ConfigurationError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[2] != k.shape[2]:
        raise ConfigurationError(
            f"q and k must have the same head dim, got {q.shape[2]} and {k.shape[2]}"
        )
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ConfigurationError(f"the fused attention kernel cannot run here: {reason}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, None)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, cu_seqlens_q.numel())
    if q.device.type == "cpu":
        _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
        _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)


def _launch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    batch = cu_q.numel() - 1
    # tokens outside every sequence (cu_seqlens_q[-1] < total_q) keep these values: zeros and an
    # empty row's -inf, never uninitialised memory
    out = torch.zeros((total_q, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.full((hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch == 0 or max_q == 0 or max_k == 0 or k.shape[0] == 0:
        return out, lse
    group = hq // hkv

    def launch(cfg: _configs.KernelConfig) -> None:
        grid = (triton.cdiv(max_q, cfg.BLOCK_M), hq, batch)
        _fwd_kernel[grid](
            q, k, v, out, lse, cu_q, cu_k, scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), out.stride(0), out.stride(1), lse.stride(0),
            total_q, k.shape[0], group,
            D=d, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=_block_d(d),
            CAUSAL=causal, PRECISION=_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    key = _configs.autotune_key(
        "fwd", max_seqlen_q=max_q, max_seqlen_k=max_k, head_dim=d, dtype=q.dtype,
        causal=causal, group=group, device=q.device,
    )  # fmt: skip
    default = _configs.default_config("fwd", d, q.dtype, q.device)
    _configs.run_with_config("fwd", key, default, launch, device=q.device)
    return out, lse


def _launch_backward(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    batch = cu_q.numel() - 1
    dq = torch.zeros((total_q, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.zeros((total_k, hkv, d), dtype=k.dtype, device=k.device)
    dv = torch.zeros((total_k, hkv, d), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0 or batch == 0 or max_q == 0 or max_k == 0:
        return dq, dk, dv
    group = hq // hkv
    block_d = _block_d(d)
    delta = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    pre_block = 64
    _bwd_preprocess_kernel[(triton.cdiv(total_q, pre_block), hq)](
        out, do, dlse if dlse is not None else delta, delta,
        out.stride(0), out.stride(1), *do.stride(),
        *(dlse.stride() if dlse is not None else (0, 0)), delta.stride(0),
        total_q, D=d, BLOCK=pre_block, BLOCK_D=block_d, HAS_DLSE=dlse is not None,
    )  # fmt: skip
    qk_scale = scale * _LOG2E
    precision = _precision(q.dtype)

    def launch(cfg: _configs.KernelConfig) -> None:
        grid_kv = (triton.cdiv(max_k, cfg.BLOCK_N), hkv, batch)
        _bwd_dkdv_kernel[grid_kv](
            q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, scale, qk_scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
            total_q, total_k, group,
            D=d, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d,
            CAUSAL=causal, PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        # the dQ kernel owns the large tile of queries and streams keys in the small one
        grid_q = (triton.cdiv(max_q, cfg.BLOCK_N), hq, batch)
        _bwd_dq_kernel[grid_q](
            q, k, v, do, lse, delta, dq, cu_q, cu_k, scale, qk_scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            dq.stride(0), dq.stride(1), lse.stride(0),
            total_q, total_k, group,
            D=d, BLOCK_M=cfg.BLOCK_N, BLOCK_N=cfg.BLOCK_M, BLOCK_D=block_d,
            CAUSAL=causal, PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    key = _configs.autotune_key(
        "bwd", max_seqlen_q=max_q, max_seqlen_k=max_k, head_dim=d, dtype=q.dtype,
        causal=causal, group=group, device=q.device,
    )  # fmt: skip
    default = _configs.default_config("bwd", d, q.dtype, q.device)
    _configs.run_with_config("bwd", key, default, launch, device=q.device)
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _launch_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = _launch_backward(
            dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale
        )
        return dq, dk, dv, None, None, None, None, None, None


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
    """Implementation of :func:`genagent.kernels.varlen_attention_with_lse`."""
    max_seqlen_q = _as_length("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _as_length("max_seqlen_k", max_seqlen_k)
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else float(softmax_scale)
    out, lse = _VarlenAttention.apply(  # type: ignore[no-untyped-call]
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), scale
    )
    return out, lse


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
    """Implementation of :func:`genagent.kernels.varlen_attention`."""
    out, _ = varlen_attention_with_lse(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, softmax_scale=softmax_scale,
    )  # fmt: skip
    return out
