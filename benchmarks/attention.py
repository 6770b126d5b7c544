"""Fused attention kernels (genagent.kernels) against what transformers runs, in one process.

Three suites, each comparing the kernel with the alternatives on the same inputs:

* **lm**: the 7B language model's attention (28 query heads, 4 KV heads, head dim 128, causal),
  sequences packed to 8k, 16k and 32k tokens per batch in three mixes: ``uniform`` (2,048 tokens
  each), ``agentic`` (a few multi-turn conversations of 2-8k tokens) and ``short`` (many
  200-800-token sequences). Forward, and backward. The kernel's one ``varlen_attention`` call
  runs against ``hf_sdpa_padded`` (transformers' own ``sdpa_attention_forward`` on the padded
  batch with the 4-D mask transformers' ``sdpa_mask`` builds, so GQA goes through ``repeat_kv``
  exactly as in a model), ``sdpa_loop`` (the same function on each sequence alone),
  ``torch_varlen`` (``torch.nn.attention.varlen.varlen_attn``, where torch has it) and
  ``flash_attn`` (``flash_attn_varlen_func``, where installed).
* **vision**: the Qwen2.5-VL vision tower (16 heads, head dim 80, not causal) on 448, 896 and
  1344 px images. Window layers use the real windows (``get_vision_window_index`` with patch 14,
  window 112, spatial merge 2: 8x8-patch windows of 64 tokens); full layers attend over the
  whole image. ``sdpa_loop`` is transformers' path outside flash-attention: one SDPA call per
  window, from a Python loop.
* **decode**: one new token (q length 1) per sequence at batch 1, 8 and 64 over a KV cache of
  1k-32k tokens (the first sequence holds the full context, the others 1/2 to all of it), the
  kernel's ``decode_attention`` against ``hf_sdpa_padded`` (transformers' call on the padded
  cache with its mask), ``sdpa_repeat_kv`` (the cache repeated to 28 heads, then masked SDPA)
  and ``flash_attn`` (``flash_attn_with_kvcache``).

Figures: forward FLOPs are 4 * sum(L_i^2) * heads * head_dim (halved when causal) and backward
FLOPs 2.5x forward; decode GB/s counts the K and V cache bytes that must be read (the real
lengths, not the padding) plus q and the output. Every implementation is credited with the
same useful work, so its TFLOP/s and GB/s are effective figures and their ratios are speed
ratios. Times are medians of ``--iters`` runs after ``--warmup``, from CUDA events, with the L2
cache flushed before each run. Each implementation's largest error against a float32 reference
(SDPA per sequence) is reported too. A case that would not fit in free GPU memory is skipped,
and the report says so.

On a CUDA machine: ``python benchmarks/attention.py`` (a table; ``--json`` prints JSON instead,
``--json-out PATH`` also writes it to a file; ``--suites`` and the shape options pick a subset).
Without CUDA, or with ``--smoke``, it runs tiny shapes on the CPU with ``TRITON_INTERPRET=1``:
the timings then mean nothing, but every code path runs and the kernel's outputs and gradients
are checked against SDPA, which is what tests/test_benchmarks.py does.

Usage: python benchmarks/attention.py [--smoke] [--suites lm vision decode]
       [--tokens 8192 16384 32768] [--mixes uniform agentic short] [--images 448 896 1344]
       [--decode-batch 1 8 64] [--decode-context 1024 4096 16384 32768] [--no-backward]
       [--warmup 3] [--iters 10] [--dtype bfloat16] [--json] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Qwen2.5-VL 7B: language model and vision tower
LM_HEADS, LM_KV_HEADS, LM_HEAD_DIM = 28, 4, 128
VISION_HEADS, VISION_HEAD_DIM = 16, 80
VISION_PATCH, VISION_WINDOW, VISION_MERGE = 14, 112, 2
# (lowest, highest) tokens per sequence; "uniform" uses one length
MIXES: dict[str, tuple[int, int]] = {
    "uniform": (2048, 2048),
    "agentic": (2048, 8192),
    "short": (200, 800),
}
# smoke shapes: the same mixes and windows, 64x shorter sequences, few heads
SMOKE_SCALE = 64
SMOKE_LM_HEADS, SMOKE_LM_KV_HEADS, SMOKE_VISION_HEADS = 4, 2, 2
# peak memory bandwidth in GB/s, by device name (first match wins)
PEAK_BANDWIDTH_GBS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 4800.0),
    (("H100", "PCIE"), 2000.0),
    (("H100",), 3350.0),
    (("A100", "80GB"), 2039.0),
    (("A100",), 1555.0),
    (("L40S",), 864.0),
    (("4090",), 1008.0),
]
TARGETS = {
    "lm_fwd_speedup_vs_hf_sdpa": 3.0,
    "vision_window_speedup_vs_sdpa_loop": 5.0,
    "lm_fwd_tflops_h100": 350.0,
    "lm_bwd_speed_vs_flash_attn": 0.7,
    "decode_percent_of_peak_bandwidth": 60.0,
}
KERNEL = "kernel"


# ---------------------------------------------------------------------------------------------
# timing and memory


class Timer:
    """Median milliseconds of a function: CUDA events with an L2 flush on a GPU, else wall time."""

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters
        # as triton.testing.do_bench: overwrite 256 MB so that no run starts with a warm L2
        self.flush = (
            torch.empty(256 * 2**20, dtype=torch.int8, device=device)
            if device.type == "cuda"
            else None
        )

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.flush is None:
            times = []
            for _ in range(self.iters):
                start = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start))
            return statistics.median(times)
        event = torch.cuda.Event
        starts = [event(enable_timing=True) for _ in range(self.iters)]  # type: ignore[no-untyped-call]
        ends = [event(enable_timing=True) for _ in range(self.iters)]  # type: ignore[no-untyped-call]
        for begin, finish in zip(starts, ends, strict=True):
            self.flush.zero_()
            begin.record()
            fn()
            finish.record()
        torch.cuda.synchronize(self.device)
        times = [b.elapsed_time(f) for b, f in zip(starts, ends, strict=True)]
        return statistics.median(times)


def memory_shortfall(device: torch.device, needed_bytes: int) -> str | None:
    """Why a run needing about ``needed_bytes`` more would not fit, or None if it would."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if needed_bytes <= 0.9 * free:
        return None
    return f"needs about {needed_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# what is compared


@dataclass
class Impl:
    """One attention implementation, set up for one case.

    ``make_inputs`` builds its inputs from the case's packed tensors (the first three are q, k
    and v, which become leaves for the backward pass); ``to_packed`` maps its output, and the
    gradients of q, k and v, to the packed layout of the reference; ``from_packed`` maps the
    packed gradient of the output to its layout.
    """

    name: str
    forward: Callable[..., Tensor]
    make_inputs: Callable[[], list[Tensor]]
    to_packed: Callable[[Tensor], Tensor] = lambda x: x
    from_packed: Callable[[Tensor], Tensor] = lambda x: x
    extra_bytes: int = 0
    skip: str | None = None


@dataclass
class Case:
    """One shape: the packed inputs, the float32 reference and the useful work done."""

    suite: str
    name: str
    shape: dict[str, Any]
    flops_fwd: float = 0.0
    bytes_read: float = 0.0
    impls: list[Impl] = field(default_factory=list)
    reference_out: Tensor | None = None
    grad_out: Tensor | None = None
    reference_grads: list[Tensor] | None = None


class HFModule(torch.nn.Module):
    """The attributes transformers' attention functions read from the attention layer."""

    def __init__(self, num_key_value_groups: int, is_causal: bool) -> None:
        super().__init__()
        self.num_key_value_groups = num_key_value_groups
        self.is_causal = is_causal


@dataclass
class Backends:
    """What this process can run: transformers' functions, and what else is installed."""

    hf_attention: Callable[..., tuple[Tensor, Any]]  # sdpa_attention_forward
    hf_mask: Callable[..., Tensor | None]  # masking_utils.sdpa_mask
    hf_window_index: Callable[..., tuple[Tensor, Tensor]]  # vision_utils.get_vision_window_index
    kernels: Any = None
    kernel_skip: str | None = None
    torch_varlen: Callable[..., Any] | None = None
    torch_varlen_kwargs: set[str] = field(default_factory=set)
    torch_varlen_skip: str | None = None
    flash_varlen: Callable[..., Tensor] | None = None
    flash_kvcache: Callable[..., Tensor] | None = None
    flash_skip: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)


def load_backends(device: torch.device) -> Backends:
    """Imports what the kernel is compared with (after TRITON_INTERPRET is settled)."""
    try:
        import transformers
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import sdpa_mask
        from transformers.vision_utils import get_vision_window_index
    except ImportError as error:
        raise SystemExit(
            f"benchmarks/attention.py compares against transformers ({error}): "
            "pip install 'genagent[local]'"
        ) from error
    found = Backends(sdpa_attention_forward, sdpa_mask, get_vision_window_index)
    try:
        import triton

        found.versions["triton"] = triton.__version__
    except ImportError:
        found.versions["triton"] = None
    try:
        import genagent.kernels as kernels

        found.kernels = kernels
        if not kernels.is_available(device):
            found.kernel_skip = f"genagent.kernels cannot run on {device} here"
    except ImportError as error:
        found.kernel_skip = f"genagent.kernels not importable: {error}"
    found.versions["transformers"] = transformers.__version__
    try:
        from torch.nn.attention.varlen import varlen_attn

        found.torch_varlen = varlen_attn
        found.torch_varlen_kwargs = set(inspect.signature(varlen_attn).parameters)
        if device.type != "cuda":
            found.torch_varlen_skip = "torch varlen_attn runs on CUDA only"
    except ImportError:
        found.torch_varlen_skip = f"torch {torch.__version__} has no varlen_attn"
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        found.versions["flash_attn"] = flash_attn.__version__
        found.flash_varlen, found.flash_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache
        if device.type != "cuda":
            found.flash_skip = "flash-attn runs on CUDA only"
    except ImportError:
        found.versions["flash_attn"] = None
        found.flash_skip = "flash-attn not installed"
    return found


def kernel_skip(backends: Backends, q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the kernel cannot take these tensors, in its own words, or None."""
    if backends.kernel_skip or backends.kernels is None:
        return backends.kernel_skip
    reason: str | None = backends.kernels.unsupported_reason(q, k, v)
    return reason


# ---------------------------------------------------------------------------------------------
# shapes


def mix_lengths(mix: str, total: int, rng: random.Random, scale: int = 1) -> list[int]:
    """Sequence lengths of one mix that add up to ``total`` (the last one takes the rest)."""
    low, high = (max(1, n // scale) for n in MIXES[mix])
    lengths: list[int] = []
    while total > 0:
        length = min(rng.randint(low, high), total)
        lengths.append(length)
        total -= length
    return lengths


def vision_windows(height: int, width: int, backends: Backends) -> list[int]:
    """Tokens per attention window of one image, as Qwen2.5-VL's vision tower splits it."""
    grid = torch.tensor([[1, height // VISION_PATCH, width // VISION_PATCH]])
    _, cu = backends.hf_window_index(
        grid, spatial_merge_size=VISION_MERGE, window_size=VISION_WINDOW, patch_size=VISION_PATCH
    )
    return [int(n) for n in (cu[1:] - cu[:-1]).tolist()]


def cumulative(lengths: Sequence[int], device: torch.device) -> Tensor:
    return F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)


def attention_flops(lengths: Sequence[int], heads: int, head_dim: int, causal: bool) -> float:
    flops = 4.0 * sum(n * n for n in lengths) * heads * head_dim
    return flops / 2 if causal else flops


# ---------------------------------------------------------------------------------------------
# implementations of packed (varlen) attention


def reference_varlen(
    q: Tensor, k: Tensor, v: Tensor, lengths: Sequence[int], causal: bool, grad_out: Tensor | None
) -> tuple[Tensor, list[Tensor] | None]:
    """Float32 SDPA per sequence (k and v repeated to the query heads), and its gradients."""
    q, k, v = (t.detach().float().requires_grad_(grad_out is not None) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))
        ks, vs = (t.repeat_interleave(groups, dim=0) for t in (ks, vs))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
        start += n
    out = torch.cat(outs)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, (q, k, v), grad_out.float())
    return out.detach(), [g.detach() for g in grads]


def varlen_impls(
    backends: Backends,
    lengths: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    causal: bool,
    packed: list[Tensor],
    backward: bool,
) -> list[Impl]:
    device = packed[0].device
    element = packed[0].element_size()
    total, batch, longest = sum(lengths), len(lengths), max(lengths)
    groups = heads // kv_heads
    scale = head_dim**-0.5
    cu = cumulative(lengths, device)
    copies = 3 if backward else 1  # tensors, and their gradients and the output's
    impls: list[Impl] = []

    def inputs() -> list[Tensor]:
        return list(packed)

    # the kernel: one call for the whole pack
    kernels = backends.kernels

    def kernel(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out: Tensor = kernels.varlen_attention(
            q, k, v, cu, cu, longest, longest, causal=causal, softmax_scale=scale
        )
        return out

    impls.append(Impl(KERNEL, kernel, inputs, skip=kernel_skip(backends, *packed)))

    # transformers on a right-padded batch, with the mask its sdpa path builds (language model)
    module = HFModule(groups, causal)
    hf_attention = backends.hf_attention
    if causal:
        positions = torch.arange(longest, device=device)
        padding = positions[None, :] < torch.tensor(lengths, device=device)[:, None]
        # built once per forward and shared by every layer in a model: not timed
        mask = backends.hf_mask(
            batch_size=batch, q_length=longest, kv_length=longest, attention_mask=padding,
            device=device,
        )  # fmt: skip
        rows = torch.cat(
            [b * longest + torch.arange(n, device=device) for b, n in enumerate(lengths)]
        )

        def to_padded(x: Tensor) -> Tensor:
            padded = x.new_zeros(batch * longest, *x.shape[1:])
            padded[rows] = x
            return padded.view(batch, longest, *x.shape[1:])

        def from_padded(x: Tensor) -> Tensor:
            return x.reshape(batch * longest, *x.shape[2:])[rows]

        def hf_padded(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            # (batch, length, heads, dim) -> (batch, heads, length, dim), as in every HF model
            out, _ = hf_attention(
                module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                dropout=0.0, scaling=scale, is_causal=causal,
            )  # fmt: skip
            return out

        padded_tokens = batch * longest
        extra = padded_tokens * (2 * heads + 2 * kv_heads) * head_dim * element * copies
        extra += 2 * padded_tokens * heads * head_dim * element * copies  # repeat_kv
        extra += batch * longest * longest * (1 + element)  # the mask, and its additive form
        impls.append(
            Impl(
                "hf_sdpa_padded",
                hf_padded,
                lambda: [to_padded(t) for t in packed],
                from_padded,
                to_padded,
                extra,
            )
        )

    # SDPA on each sequence (or window) alone: transformers' own loop in the vision tower
    def sdpa_loop(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # as Qwen2_5_VLVisionAttention.forward outside flash-attention
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        sizes = (cu[1:] - cu[:-1]).tolist()
        splits = [torch.split(t, sizes, dim=2) for t in (q, k, v)]
        outs = [
            hf_attention(
                module, qs, ks, vs, attention_mask=None, dropout=0.0, scaling=scale,
                is_causal=causal,
            )[0]
            for qs, ks, vs in zip(*splits, strict=True)
        ]  # fmt: skip
        return torch.cat(outs, dim=1)[0]

    loop_bytes = 2 * total * heads * head_dim * element * copies
    impls.append(Impl("sdpa_loop", sdpa_loop, inputs, extra_bytes=loop_bytes))

    # torch's own varlen attention
    torch_varlen, names = backends.torch_varlen, backends.torch_varlen_kwargs

    def torch_varlen_call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        assert torch_varlen is not None
        kwargs: dict[str, Any] = {"scale": scale}
        if "window_size" in names:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if groups > 1:
            if "enable_gqa" in names:
                kwargs["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        out: Tensor = torch_varlen(q, k, v, cu, cu, longest, longest, **kwargs)
        return out

    impls.append(Impl("torch_varlen", torch_varlen_call, inputs, skip=backends.torch_varlen_skip))

    # flash-attention 2
    flash = backends.flash_varlen

    def flash_call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        assert flash is not None
        return flash(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=causal)

    impls.append(Impl("flash_attn", flash_call, inputs, skip=backends.flash_skip))
    return impls


def varlen_case(
    suite: str,
    name: str,
    lengths: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    causal: bool,
    backends: Backends,
    device: torch.device,
    dtype: torch.dtype,
    backward: bool,
    seed: int,
) -> Case:
    generator = torch.Generator(device=device).manual_seed(seed)
    total = sum(lengths)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    q, k, v = (
        randn(total, heads, head_dim),
        randn(total, kv_heads, head_dim),
        randn(total, kv_heads, head_dim),
    )
    grad_out = randn(total, heads, head_dim) if backward else None
    out, grads = reference_varlen(q, k, v, lengths, causal, grad_out)
    packed = [q, k, v]
    shape = {
        "tokens": total,
        "sequences": len(lengths),
        "longest": max(lengths),
        "lengths": lengths,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "causal": causal,
    }
    return Case(
        suite,
        name,
        shape,
        flops_fwd=attention_flops(lengths, heads, head_dim, causal),
        impls=varlen_impls(backends, lengths, heads, kv_heads, head_dim, causal, packed, backward),
        reference_out=out,
        grad_out=grad_out,
        reference_grads=grads,
    )


# ---------------------------------------------------------------------------------------------
# decoding


def decode_case(
    name: str,
    batch: int,
    context: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    backends: Backends,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> Case:
    rng = random.Random(seed)
    lengths = [context] + [rng.randint(context // 2, context) for _ in range(batch - 1)]
    generator = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, 1, heads, head_dim, generator=generator, device=device, dtype=dtype)
    k_cache, v_cache = (
        torch.randn(
            batch, context, kv_heads, head_dim, generator=generator, device=device, dtype=dtype
        )
        for _ in range(2)
    )
    seqlens = torch.tensor(lengths, device=device, dtype=torch.int32)
    scale = head_dim**-0.5
    groups = heads // kv_heads
    element = q.element_size()
    cache_bytes = 2 * batch * context * kv_heads * head_dim * element

    outs = []  # float32 reference
    for b, n in enumerate(lengths):
        ks, vs = (
            c[b, :n].float().transpose(0, 1).repeat_interleave(groups, 0)
            for c in (k_cache, v_cache)
        )
        outs.append(
            F.scaled_dot_product_attention(q[b].float().transpose(0, 1), ks, vs).transpose(0, 1)
        )
    reference = torch.stack(outs)

    impls: list[Impl] = []
    kernels = backends.kernels

    def kernel(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out: Tensor = kernels.decode_attention(q, k, v, seqlens, softmax_scale=scale)
        return out

    skip = kernel_skip(backends, q, k_cache, v_cache)
    impls.append(Impl(KERNEL, kernel, lambda: [q, k_cache, v_cache], skip=skip))

    # transformers' layout: (batch, kv heads, length, dim) caches, a (batch, 1, 1, length) mask
    hf_attention = backends.hf_attention
    padding = torch.arange(context, device=device)[None, :] < seqlens[:, None].long()
    # None when nothing is padded (batch 1): transformers then runs SDPA with enable_gqa
    mask = backends.hf_mask(
        batch_size=batch, q_length=1, kv_length=context, q_offset=context - 1,
        attention_mask=padding, device=device,
    )  # fmt: skip
    module = HFModule(groups, True)

    def hf_inputs() -> list[Tensor]:
        return [
            q.transpose(1, 2),
            k_cache.transpose(1, 2).contiguous(),
            v_cache.transpose(1, 2).contiguous(),
        ]

    def hf_padded(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, _ = hf_attention(module, q, k, v, mask, dropout=0.0, scaling=scale, is_causal=True)
        return out

    impls.append(Impl("hf_sdpa_padded", hf_padded, hf_inputs, extra_bytes=cache_bytes))

    def sdpa_repeat_kv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # what transformers did before pack_gqa, and still does with a mask for longer queries
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        attn_mask = mask if mask is not None else padding[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return out.transpose(1, 2)

    extra = cache_bytes * (1 + groups)
    impls.append(Impl("sdpa_repeat_kv", sdpa_repeat_kv, hf_inputs, extra_bytes=extra))

    kvcache = backends.flash_kvcache

    def flash_call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        assert kvcache is not None
        return kvcache(q, k, v, cache_seqlens=seqlens, softmax_scale=scale)

    impls.append(
        Impl("flash_attn", flash_call, lambda: [q, k_cache, v_cache], skip=backends.flash_skip)
    )
    bytes_read = (sum(lengths) * kv_heads * 2 + batch * heads * 2) * head_dim * element
    shape = {
        "batch": batch,
        "context": context,
        "lengths": lengths,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
    }
    return Case("decode", name, shape, bytes_read=bytes_read, impls=impls, reference_out=reference)


# ---------------------------------------------------------------------------------------------
# running


def max_error(result: Tensor, reference: Tensor) -> float:
    difference = (result.float() - reference).abs()
    return float(difference.max()) if bool(difference.isfinite().all()) else math.inf


def measure(case: Case, impl: Impl, timer: Timer, device: torch.device) -> dict[str, Any]:
    """Times one implementation on one case and checks it against the reference."""
    if impl.skip:
        return {"skipped": impl.skip}
    backward = case.grad_out is not None
    shortfall = memory_shortfall(device, impl.extra_bytes)
    if shortfall:
        return {"skipped": f"would not fit: {shortfall}"}
    result: dict[str, Any] = {}
    try:
        tensors = impl.make_inputs()
        with torch.no_grad():
            assert case.reference_out is not None
            result["max_error"] = max_error(
                impl.to_packed(impl.forward(*tensors)), case.reference_out
            )
            result["fwd_ms"] = timer(lambda: impl.forward(*tensors))
        if backward:
            assert case.grad_out is not None and case.reference_grads is not None
            leaves = [t.detach().requires_grad_() for t in tensors[:3]]
            grad_out = impl.from_packed(case.grad_out)
            out = impl.forward(*leaves)
            grads = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
            result["max_grad_error"] = max(
                max_error(impl.to_packed(g), r)
                for g, r in zip(grads, case.reference_grads, strict=True)
            )
            del grads
            result["bwd_ms"] = timer(
                lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
            )
            del out
            result["fwd_bwd_ms"] = timer(
                lambda: torch.autograd.grad(impl.forward(*leaves), leaves, grad_out)
            )
    except torch.cuda.OutOfMemoryError:
        return {"skipped": "out of memory"}
    except Exception as error:
        # recorded, with the traceback on stderr, so that one failing shape (or baseline) does
        # not end a long run: the report says what failed, and keeps what was measured before
        traceback.print_exc()
        first_line = (str(error).splitlines() or [""])[0]
        result["failed"] = f"{type(error).__name__}: {first_line}"
    finally:
        release(device)
    for key, flops in (("fwd", case.flops_fwd), ("bwd", 2.5 * case.flops_fwd)):
        if flops and f"{key}_ms" in result:
            result[f"{key}_tflops"] = flops / result[f"{key}_ms"] / 1e9
    if case.flops_fwd and "fwd_bwd_ms" in result:
        result["fwd_bwd_tflops"] = 3.5 * case.flops_fwd / result["fwd_bwd_ms"] / 1e9
    if case.bytes_read and "fwd_ms" in result:
        result["gbps"] = case.bytes_read / result["fwd_ms"] / 1e6
    return result


def ratio(results: dict[str, Any], faster: str, slower: str, key: str) -> float | None:
    a, b = results.get(faster, {}).get(key), results.get(slower, {}).get(key)
    return b / a if a and b else None


def summarize(
    values: list[tuple[float, str]], target: float, **notes: str
) -> dict[str, Any] | None:
    """Geometric mean, min and max of a per-case figure, with the issue's target for it."""
    if not values:
        return None
    low, high = min(values), max(values)
    mean = math.exp(statistics.fmean(math.log(v) for v, _ in values))
    return {
        "target": target,
        "geomean": mean,
        "min": low[0],
        "min_case": low[1],
        "max": high[0],
        "max_case": high[1],
        "cases": len(values),
        **notes,
    }


def peak_bandwidth(device_name: str) -> float | None:
    upper = device_name.upper()
    for keys, gbps in PEAK_BANDWIDTH_GBS:
        if all(key in upper for key in keys):
            return gbps
    return None


def run(args: argparse.Namespace, device: torch.device, smoke: bool) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    backends = load_backends(device)
    timer = Timer(device, args.warmup, args.iters)
    backward = not args.no_backward
    scale = SMOKE_SCALE if smoke else 1
    lm_heads = (SMOKE_LM_HEADS, SMOKE_LM_KV_HEADS) if smoke else (LM_HEADS, LM_KV_HEADS)
    vision_heads = SMOKE_VISION_HEADS if smoke else VISION_HEADS
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_bandwidth_gbs or peak_bandwidth(device_name)

    details = info(args, device, device_name, peak, backends, smoke)
    if not args.json:
        print(" | ".join(f"{k} {v}" for k, v in details.items() if k != "reference"))

    builds: list[tuple[str, str, Callable[[], Case]]] = []
    seed = args.seed
    if "lm" in args.suites:
        for tokens in args.tokens:
            for mix in args.mixes:
                seed += 1
                lengths = mix_lengths(mix, tokens // scale, random.Random(seed), scale)
                name = f"{tokens // scale} tokens, {mix}"
                build: Callable[[], Case] = partial(
                    varlen_case, "lm", name, lengths, *lm_heads, LM_HEAD_DIM, True, backends,
                    device, dtype, backward, seed,
                )  # fmt: skip
                builds.append(("lm", name, build))
    if "vision" in args.suites:
        for side in args.images:
            # the smoke image is not square, so that one window is cut by the image's edge
            height, width = (side, side * 3 // 2) if smoke else (side, side)
            windows = vision_windows(height, width, backends)
            for layer, lengths in (("window", windows), ("full", [sum(windows)])):
                seed += 1
                name = f"{height}x{width} image, {layer} attention"
                build = partial(
                    varlen_case, "vision", name, lengths, vision_heads, vision_heads,
                    VISION_HEAD_DIM, False, backends, device, dtype, backward, seed,
                )  # fmt: skip
                builds.append(("vision", name, build))
    if "decode" in args.suites:
        for batch in args.decode_batch:
            for context in args.decode_context:
                seed += 1
                name = f"batch {batch}, context {context // scale}"
                build = partial(
                    decode_case, name, batch, context // scale, *lm_heads, LM_HEAD_DIM, backends,
                    device, dtype, seed,
                )  # fmt: skip
                builds.append(("decode", name, build))

    reports: dict[str, list[dict[str, Any]]] = {"lm": [], "vision": [], "decode": []}
    for suite, name, build in builds:
        try:
            case = build()
        except torch.cuda.OutOfMemoryError:
            # the inputs and the float32 reference alone do not fit
            release(device)
            reports[suite].append({"name": name, "skipped": "out of memory", "results": {}})
            if not args.json:
                print(f"-- {name}: skipped, out of memory")
            continue
        results = {impl.name: measure(case, impl, timer, device) for impl in case.impls}
        report: dict[str, Any] = {"name": case.name, **case.shape, "results": results}
        if case.suite == "lm":
            report["fwd_speedup_vs_hf_sdpa"] = ratio(results, KERNEL, "hf_sdpa_padded", "fwd_ms")
            report["bwd_speed_vs_flash_attn"] = ratio(results, KERNEL, "flash_attn", "bwd_ms")
        elif case.suite == "vision":
            report["fwd_speedup_vs_sdpa_loop"] = ratio(results, KERNEL, "sdpa_loop", "fwd_ms")
        else:
            report["fwd_speedup_vs_hf_sdpa"] = ratio(results, KERNEL, "hf_sdpa_padded", "fwd_ms")
            gbps = results.get(KERNEL, {}).get("gbps")
            report["percent_of_peak_bandwidth"] = 100 * gbps / peak if gbps and peak else None
        reports[case.suite].append(report)
        if not args.json:
            print_case(case.suite, report)
        del case
        release(device)

    def collect(suite: str, key: str, only: str | None = None) -> list[tuple[float, str]]:
        return [
            (r[key], r["name"])
            for r in reports[suite]
            if r.get(key) is not None and (only is None or only in r["name"])
        ]

    kernel_tflops = [
        (r["results"][KERNEL]["fwd_tflops"], r["name"])
        for r in reports["lm"]
        if "fwd_tflops" in r["results"].get(KERNEL, {})
    ]
    errors = [
        (impl, value)
        for suite in reports.values()
        for r in suite
        for impl, result in r["results"].items()
        for key, value in result.items()
        if key in ("max_error", "max_grad_error")
    ]
    summary = {
        "lm_fwd_speedup_vs_hf_sdpa": summarize(
            collect("lm", "fwd_speedup_vs_hf_sdpa"), TARGETS["lm_fwd_speedup_vs_hf_sdpa"]
        ),
        "vision_window_speedup_vs_sdpa_loop": summarize(
            collect("vision", "fwd_speedup_vs_sdpa_loop", "window"),
            TARGETS["vision_window_speedup_vs_sdpa_loop"],
        ),
        "lm_fwd_tflops": summarize(
            kernel_tflops, TARGETS["lm_fwd_tflops_h100"], target_device="H100"
        ),
        "lm_bwd_speed_vs_flash_attn": summarize(
            collect("lm", "bwd_speed_vs_flash_attn"), TARGETS["lm_bwd_speed_vs_flash_attn"]
        ),
        "decode_percent_of_peak_bandwidth": summarize(
            collect("decode", "percent_of_peak_bandwidth"),
            TARGETS["decode_percent_of_peak_bandwidth"],
        ),
        "kernel_max_error": max((v for i, v in errors if i == KERNEL), default=None),
        "baseline_max_error": max((v for i, v in errors if i != KERNEL), default=None),
    }
    return {"info": details, "results": {**reports, "summary": summary}}


def info(
    args: argparse.Namespace,
    device: torch.device,
    device_name: str,
    peak: float | None,
    backends: Backends,
    smoke: bool,
) -> dict[str, Any]:
    try:
        genagent_version = metadata.version("genagent")
    except metadata.PackageNotFoundError:
        genagent_version = None
    details: dict[str, Any] = {
        "mode": "smoke" if smoke else "benchmark",
        "device": device_name,
        "peak_bandwidth_gbs": peak,
        "genagent": genagent_version,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **backends.versions,
        "torch_varlen": backends.torch_varlen is not None,
        "kernel": backends.kernel_skip or "genagent.kernels",
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "dtype": args.dtype,
        "warmup": args.warmup,
        "iters": args.iters,
        "backward": not args.no_backward,
        "reference": "float32 SDPA per sequence, k and v repeated to the query heads",
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        details["capability"] = f"sm{properties.major}{properties.minor}"
        details["memory_gib"] = round(properties.total_memory / 2**30, 1)
    if smoke:
        details["note"] = (
            "smoke run: tiny shapes on the CPU with TRITON_INTERPRET=1; the timings are not "
            "performance figures, only the errors are meaningful"
        )
    return details


# ---------------------------------------------------------------------------------------------
# output

COLUMNS = {
    "lm": [
        ("fwd_ms", "fwd ms"), ("fwd_tflops", "TFLOP/s"), ("bwd_ms", "bwd ms"),
        ("bwd_tflops", "TFLOP/s"), ("fwd_bwd_ms", "fwd+bwd"), ("max_error", "max err"),
        ("max_grad_error", "grad err"),
    ],
    "decode": [("fwd_ms", "ms"), ("gbps", "GB/s"), ("max_error", "max err")],
}  # fmt: skip
COLUMNS["vision"] = COLUMNS["lm"]
TITLES = {
    "lm": "Language model: causal, packed",
    "vision": "Vision tower: windows and full attention",
    "decode": "Decoding: one token per sequence",
}
_printed: set[str] = set()


def show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}" if value < 0.01 else f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def print_case(suite: str, report: dict[str, Any]) -> None:
    columns = COLUMNS[suite]
    if suite not in _printed:
        _printed.add(suite)
        header = f"{'impl':<16}" + "".join(f"{label:>10}" for _, label in columns)
        print(f"\n{TITLES[suite]}\n{header}")
    if suite == "decode":
        percent = report["percent_of_peak_bandwidth"]
        extra = "peak bandwidth unknown" if percent is None else f"{percent:.0f}% of peak bandwidth"
    else:
        count = report["sequences"]
        extra = f"{count} sequence{'s' if count > 1 else ''}, longest {report['longest']}"
    print(f"-- {report['name']} ({extra})")
    for impl, result in report["results"].items():
        if "skipped" in result:
            print(f"{impl:<16}  skipped: {result['skipped']}")
            continue
        print(f"{impl:<16}" + "".join(f"{show(result.get(key)):>10}" for key, _ in columns))
        if "failed" in result:
            print(f"{impl:<16}  FAILED: {result['failed']}")
    for key in ("fwd_speedup_vs_hf_sdpa", "fwd_speedup_vs_sdpa_loop", "bwd_speed_vs_flash_attn"):
        if report.get(key) is not None:
            print(f"{'':<16}kernel {key.replace('_', ' ')}: {report[key]:.2f}x")


def print_summary(report: dict[str, Any]) -> None:
    print("\nTargets (kernel; geometric mean over cases, min and max)")
    units = {"lm_fwd_tflops": " TFLOP/s", "decode_percent_of_peak_bandwidth": "%"}
    for key, value in report["results"]["summary"].items():
        if key.endswith("max_error"):
            print(f"{key:<38}{show(value)}")
        elif value is None:
            print(f"{key:<38}not measured")
        else:
            unit = units.get(key, "x")
            print(
                f"{key:<38}{value['geomean']:.2f}{unit} (min {value['min']:.2f}, max "
                f"{value['max']:.2f}; target {value['target']:g}{unit})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes (in place of the shape options) on the CPU under TRITON_INTERPRET=1; "
        "the default without CUDA",
    )
    parser.add_argument(
        "--suites",
        nargs="+",
        choices=["lm", "vision", "decode"],
        default=["lm", "vision", "decode"],
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))
    parser.add_argument(
        "--images", type=int, nargs="+", default=[448, 896, 1344], help="image sides in pixels"
    )
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--decode-context", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (3; smoke 0)")
    parser.add_argument(
        "--iters", type=int, default=None, help="timed runs, median reported (10; smoke 1)"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peak-bandwidth-gbs", type=float, default=None, help="for a device not in the table"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--json-out", type=Path, default=None, help="also write JSON here")
    args = parser.parse_args()

    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        if not args.smoke:
            print(
                "No CUDA device: running the smoke configuration on the CPU (tiny shapes, "
                "TRITON_INTERPRET=1). Its timings are not performance figures.",
                file=sys.stderr,
            )
        # the interpreter must be chosen before triton, or a module using it, is imported
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("warning: triton was imported before TRITON_INTERPRET=1 was set", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "1"
        args.tokens = [8192]
        args.images = [112]
        args.decode_batch, args.decode_context = [3], [4096]
        # the interpreter takes about a second per kernel call: one timed run each
        defaults = (0, 1)
    else:
        defaults = (3, 10)
    args.warmup = defaults[0] if args.warmup is None else args.warmup
    args.iters = defaults[1] if args.iters is None else args.iters
    args.dtype = args.dtype or ("float32" if smoke else "bfloat16")
    device = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(args.seed)

    report = run(args, device, smoke)
    text = json.dumps(report, indent=2)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    if args.json:
        print(text)
        return
    print_summary(report)


if __name__ == "__main__":
    main()
