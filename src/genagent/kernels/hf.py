"""genagent's fused varlen attention as a transformers attention implementation.

:func:`register` adds the kernel to transformers under :data:`ATTENTION_NAME`
(``"genagent_varlen"``), with its own mask builder; :func:`enable_fused_attention` registers it
and switches a loaded model (the language model and, for Qwen2-VL / Qwen2.5-VL, the vision
tower) over to it. Select it at load time with
``from_pretrained(..., attn_implementation="genagent_varlen")`` after :func:`register`, or with
``TransformersPolicy.from_pretrained(..., attn_implementation="fused")``.

What the fused path serves (one kernel call per attention layer):

* **Packed sequences**: several sequences in one row, given as ``cu_seq_lens_q/k`` (and
  ``max_length_q/k``) keyword arguments, as the block-diagonal mask transformers builds from
  position ids that restart, or (with no mask) as ``position_ids`` that restart at 0.
* **Padded batches**: the padding is removed before the call and put back after it (padded
  query positions get zeros), whatever the padding pattern (left, right, or holes such as
  :class:`~genagent.policies.TransformersPolicy` leaves between cached turns).
* **Decoding with a KV cache**: the decode kernel when no row is padded, else the varlen kernel
  with bottom-right causal alignment.
* **The Qwen2-VL / Qwen2.5-VL vision tower**: one call per layer for all windows of all images
  (transformers loops over the windows in Python for every implementation whose name does not
  contain "flash"; :func:`enable_fused_attention` replaces that loop, see
  :func:`enable_fused_attention`).

Everything else falls back to PyTorch's scaled-dot-product attention, computed as transformers'
``"sdpa"`` implementation computes it (or to eager attention when attention weights are
requested), and the first fallback for each reason is logged on the ``genagent.kernels``
logger. :func:`stats` counts which path served each call.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import threading
import types
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from genagent.errors import ConfigurationError

__all__ = [
    "ATTENTION_NAME",
    "attention_forward",
    "enable_fused_attention",
    "fused_attention_mask",
    "register",
    "reset_stats",
    "stats",
]

logger = logging.getLogger("genagent.kernels")

ATTENTION_NAME = "genagent_varlen"
"""The name of the fused attention in transformers' ``AttentionInterface``. (A name containing
"flash" would be sent to transformers' flash-attn loader, which fails.)"""

_DECODE_MAX_Q = 16  # longest query block the decode kernel takes (speculative / chunked steps)
_QUERY_OFFSET_ATTR = "_genagent_query_offset"  # set on 4-D masks built by fused_attention_mask
_CACHE_SIZE = 4  # layouts kept per thread (the vision tower alternates two per forward)

_lock = threading.Lock()
_counts: Counter[str] = Counter()
_fallbacks: Counter[str] = Counter()
_logged: set[str] = set()
_available: dict[str, tuple[bool, str | None]] = {}


# --------------------------------------------------------------------------- registration


def register() -> str:
    """Register the fused attention and its mask builder with transformers.

    Safe to call any number of times, from any thread. Afterwards
    ``from_pretrained(..., attn_implementation=ATTENTION_NAME)`` and
    ``model.set_attn_implementation(ATTENTION_NAME)`` select it.

    Returns:
        :data:`ATTENTION_NAME`.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    with _lock:
        # both registries: without the mask builder transformers passes attention_mask=None
        # for an unknown name, and padding would be silently ignored
        AttentionInterface.register(ATTENTION_NAME, attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, fused_attention_mask)
    return ATTENTION_NAME


def stats() -> dict[str, Any]:
    """Which path served the attention calls since the start (or :func:`reset_stats`).

    Returns:
        ``{"fused": n, "varlen": n, "decode": n, "fallback": {reason: n}}``: ``fused`` counts
        the calls the kernels served (``varlen`` + ``decode``), ``fallback`` the calls served by
        PyTorch attention, by reason.
    """
    with _lock:
        return {
            "fused": _counts["varlen"] + _counts["decode"],
            "varlen": _counts["varlen"],
            "decode": _counts["decode"],
            "fallback": dict(_fallbacks),
        }


def reset_stats() -> None:
    """Zero the counters of :func:`stats` (and log each path's first use again)."""
    with _lock:
        _counts.clear()
        _fallbacks.clear()
        _logged.clear()


def _note(path: str, message: str, *, fallback: bool) -> None:
    with _lock:
        if fallback:
            _fallbacks[path] += 1
        else:
            _counts[path] += 1
        first = path not in _logged
        _logged.add(path)
    if first:
        if fallback:
            logger.warning("%s falls back to PyTorch attention: %s", ATTENTION_NAME, message)
        else:
            logger.info("%s: %s", ATTENTION_NAME, message)


# --------------------------------------------------------------------------- mask builder


def fused_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask builder registered with transformers' ``AttentionMaskInterface``.

    For a plain causal mask whose queries are the last ``q_length`` keys (no cache, or a
    dynamic cache) it returns the 2-D padding mask, or ``None`` when nothing is padded, as the
    flash-attention builder does: nothing of size query x key is built. Any other pattern
    (packed sequences, sliding windows, static caches, overlays) is built by transformers'
    ``sdpa_mask`` as a 4-D boolean mask, always materialised, and marked with where its queries
    sit, so that :func:`attention_forward` can read it or hand it to SDPA unchanged.

    Args:
        batch_size: Rows.
        q_length: Query positions.
        kv_length: Key positions.
        q_offset: Position of the first query.
        kv_offset: Position of the first key.
        mask_function: transformers' mask pattern (``causal_mask_function`` by default).
        attention_mask: The 2-D padding mask (1: a real token), or ``None``.
        **kwargs: Passed on to ``sdpa_mask``.

    Returns:
        ``None``, a 2-D boolean padding mask, or a 4-D boolean mask (True: attend).
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.bool()
    standard = (
        mask_function is causal_mask_function
        and kv_offset == 0
        and isinstance(q_offset, int)
        and q_offset + q_length == kv_length
        and (attention_mask is None or attention_mask.shape[-1] == kv_length)
    )
    if standard:
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask
    kwargs.pop("allow_is_causal_skip", None)  # `None` would mean top-left causal to SDPA
    build_sdpa: Any = sdpa_mask
    mask: torch.Tensor | None = build_sdpa(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        **kwargs,
    )
    if mask is not None:
        offset = int(q_offset) - int(kv_offset)
        setattr(mask, _QUERY_OFFSET_ATTR, offset)  # read back by _layout
    return mask


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Layout:
    """How the (batch, length) positions of one call map to the kernel's packed sequences."""

    kind: str  # "dense" (every row whole), "padded" (rows with padding), "packed"
    batch: int
    q_len: int
    k_len: int
    causal: bool
    cu_q: torch.Tensor  # int32 (n + 1,)
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    q_index: torch.Tensor | None = None  # served rows of the flattened (B * Q) queries
    k_index: torch.Tensor | None = None
    valid_k: torch.Tensor | None = None  # "padded": (B, K) real keys
    q_offset: int = 0  # "padded": key index of the first query

    def sdpa_mask(self, device: torch.device) -> torch.Tensor | None:
        """The same pattern as a 4-D boolean mask for SDPA (``None``: SDPA's own flags do)."""
        q = torch.arange(self.q_len, device=device)
        k = torch.arange(self.k_len, device=device)
        if self.kind == "packed":
            seg_q, pos_q, len_q = _segments(self.cu_q, self.batch, self.q_len)
            seg_k, pos_k, len_k = _segments(self.cu_k, self.batch, self.k_len)
            mask = seg_q[:, :, None] == seg_k[:, None, :]
            if self.causal:  # bottom-right within each sequence
                last = pos_q + (len_k - len_q)[seg_q]
                mask = mask & (pos_k[:, None, :] <= last[:, :, None])
            return mask[:, None]
        if self.kind == "padded":
            assert self.valid_k is not None
            mask = self.valid_k[:, None, :].expand(-1, self.q_len, -1)
            if self.causal:
                mask = mask & (k[None, :] <= q[:, None] + self.q_offset)
            return mask[:, None]
        if not self.causal or self.q_len in (1, self.k_len):
            return None
        return (k[None, :] <= q[:, None] + (self.k_len - self.q_len))[None, None]


class _LayoutCache(threading.local):
    def __init__(self) -> None:
        self.entries: list[tuple[tuple[Any, ...], tuple[Any, ...], _Layout | str]] = []


_layout_cache = _LayoutCache()


def _cached_layout(
    sources: tuple[torch.Tensor | None, ...],
    extra: tuple[Any, ...],
    build: Callable[[], _Layout | str],
) -> _Layout | str:
    """One layout per mask: every layer of a forward gets the same mask object."""
    key = (
        *((id(t), _version(t), tuple(t.shape)) if t is not None else None for t in sources),
        *extra,
    )
    for entry_key, refs, layout in _layout_cache.entries:
        if entry_key == key and all(
            (r is None and t is None) or (r is not None and r() is t)
            for r, t in zip(refs, sources, strict=True)
        ):
            return layout
    layout = build()
    refs = tuple(weakref.ref(t) if isinstance(t, torch.Tensor) else None for t in sources)
    _layout_cache.entries = [(key, refs, layout), *_layout_cache.entries[: _CACHE_SIZE - 1]]
    return layout


def _version(tensor: torch.Tensor) -> int:
    """The in-place version counter (-1 for inference tensors, which have none)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return -1


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _dense(batch: int, q_len: int, k_len: int, causal: bool, device: torch.device) -> _Layout:
    rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return _Layout("dense", batch, q_len, k_len, causal, rows * q_len, rows * k_len, q_len, k_len)


def _padded(valid_k: torch.Tensor, q_len: int, q_offset: int, causal: bool) -> _Layout | str:
    """Rows with padding: each row's real queries against its real keys."""
    batch, k_len = valid_k.shape
    if q_offset < 0 or q_offset + q_len > k_len:
        return "a mask whose queries are not among its keys"
    valid_q = valid_k[:, q_offset : q_offset + q_len]
    if causal and q_offset + q_len < k_len and bool(valid_k[:, q_offset + q_len :].any()):
        return "a mask with real keys after the queries"
    n_q = valid_q.sum(1)
    keep = n_q > 0  # rows with no real query (all padding) are left out
    valid_k = valid_k & keep[:, None]
    n_k = valid_k.sum(1)
    if bool(valid_k.all()):
        return _dense(batch, q_len, k_len, causal, valid_k.device)
    lengths = torch.stack([n_q[keep], n_k[keep]])
    maxima = lengths.amax(1).tolist() if lengths.numel() else [0, 0]
    return _Layout(
        "padded",
        batch,
        q_len,
        k_len,
        causal,
        _cu(n_q[keep]),
        _cu(n_k[keep]),
        int(maxima[0]),
        int(maxima[1]),
        q_index=valid_q.reshape(-1).nonzero().squeeze(1),
        k_index=valid_k.reshape(-1).nonzero().squeeze(1),
        valid_k=valid_k,
        q_offset=q_offset,
    )


def _packed_from_starts(starts: torch.Tensor, causal: bool) -> _Layout:
    """Packed rows (queries = keys) from a (B, S) bool tensor marking each sequence's start."""
    batch, length = starts.shape
    starts = starts.clone()
    starts[:, 0] = True
    bounds = F.pad(starts.reshape(-1).nonzero().squeeze(1), (0, 1), value=batch * length)
    cu = bounds.to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return _Layout("packed", batch, length, length, causal, cu, cu, longest, longest)


def _as_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _packed_from_cu(
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int | None,
    max_k: int | None,
    batch: int,
    q_len: int,
    k_len: int,
    causal: bool,
) -> _Layout | str:
    cu_q = cu_q.to(torch.int32).reshape(-1)
    cu_k = cu_k.to(torch.int32).reshape(-1)
    if cu_q.numel() != cu_k.numel() or cu_q.numel() < 2:
        return "cu_seq_lens_q and cu_seq_lens_k of different lengths"
    firsts_lasts = torch.stack([cu_q[0], cu_k[0], cu_q[-1], cu_k[-1]]).tolist()
    if firsts_lasts != [0, 0, batch * q_len, batch * k_len]:
        return "cu_seq_lens that do not cover the batch"
    if max_q is None:
        max_q = int((cu_q[1:] - cu_q[:-1]).max())
    if max_k is None:
        max_k = int((cu_k[1:] - cu_k[:-1]).max())
    return _Layout("packed", batch, q_len, k_len, causal, cu_q, cu_k, max_q, max_k)


def _segments(cu: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, ...]:
    """Per position of a (B, L) batch: its sequence, its place in it, and the sequence's length."""
    cu = cu.long()
    lengths = cu[1:] - cu[:-1]
    starts = torch.arange(0, batch * length + 1, length, device=cu.device)
    if not bool(torch.isin(starts, cu).all()):
        raise ConfigurationError(
            f"packed sequences (cu_seq_lens) cross the rows of a {batch}-row batch, which "
            "PyTorch attention cannot express: pack them into one row (batch size 1)"
        )
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    pos = torch.arange(batch * length, device=cu.device) - cu[seg]
    return seg.view(batch, length), pos.view(batch, length), lengths


def _bool_4d(mask: torch.Tensor, batch: int, q_len: int, k_len: int) -> torch.Tensor | str:
    """A 4-D mask as (B, Q, K) booleans (True: attend), or why it cannot be read."""
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            mask = mask != 0
        else:
            allowed = mask == 0
            blocked = (mask == -math.inf) | (mask <= torch.finfo(mask.dtype).min)
            if not bool((allowed | blocked).all()):
                return "an additive float mask (a bias, not only padding)"
            mask = allowed
    if mask.shape[-2:] != (q_len, k_len) or mask.shape[0] not in (1, batch):
        return "a mask of another shape than the keys"
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            return "a mask that differs between heads"
        mask = mask[:, :1]
    return mask[:, 0].expand(batch, q_len, k_len)


def _layout_from_4d(mask4: torch.Tensor, offset: int | None, causal_hint: bool) -> _Layout | str:
    """Read padding or packing out of a 4-D boolean mask; anything else is a custom mask."""
    _, q_len, k_len = mask4.shape
    offset = k_len - q_len if offset is None else offset
    if not 0 <= offset <= k_len - q_len:
        return "a mask whose queries are not among its keys"
    q = torch.arange(q_len, device=mask4.device)
    k = torch.arange(k_len, device=mask4.device)
    tri = k[None, :] <= q[:, None] + offset
    # padding: every row attends to its real keys (causally or not); a copy, so that the
    # cached layout does not keep the (B, Q, K) mask alive
    valid_k = mask4[:, -1, :].clone()
    for causal in (causal_hint, not causal_hint):
        expected = valid_k[:, None, :] & tri if causal else valid_k[:, None, :].expand_as(mask4)
        if torch.equal(expected, mask4):
            return _padded(valid_k, q_len, offset, causal)
    # packing: block-diagonal sequences, each starting where a row first attends to itself
    if q_len == k_len and bool(mask4.any(-1).all()):
        first = mask4.int().argmax(-1)
        starts = first == q[None, :]
        segments = starts.long().cumsum(1)
        same = segments[:, :, None] == segments[:, None, :]
        for causal in (causal_hint, not causal_hint):
            expected = same & tri if causal else same
            if torch.equal(expected, mask4):
                return _packed_from_starts(starts, causal)
    return "a custom mask (neither padding nor packed sequences)"


def _layout(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    kwargs: dict[str, Any],
) -> _Layout | str:
    batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    device = query.device
    shape = (batch, q_len, k_len, causal, str(device))
    if attention_mask is not None and attention_mask.ndim == 4:
        mask = attention_mask
        offset = getattr(mask, _QUERY_OFFSET_ATTR, None)

        def from_4d() -> _Layout | str:
            mask4 = _bool_4d(mask, batch, q_len, k_len)
            if isinstance(mask4, str):
                return mask4
            return _layout_from_4d(mask4.to(device), offset, causal)

        return _cached_layout((mask,), shape, from_4d)
    if attention_mask is not None and attention_mask.ndim == 2:
        mask2 = attention_mask

        def from_2d() -> _Layout | str:
            valid = mask2.to(device).bool()
            if valid.shape[0] != batch:
                return "a padding mask of another batch size"
            if valid.shape[1] > k_len:  # as the flash-attention mask builder slices it
                valid = valid[:, -k_len:]
            offset = valid.shape[1] - q_len  # a shorter mask covers the seen tokens only
            if valid.shape[1] < k_len:
                valid = F.pad(valid, (0, k_len - valid.shape[1]))
            return _padded(valid, q_len, offset, causal)

        return _cached_layout((mask2,), shape, from_2d)
    if attention_mask is not None:
        return "a mask of another rank than 2 or 4"
    cu_q = kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens_q"))
    cu_k = kwargs.get("cu_seq_lens_k", kwargs.get("cu_seqlens_k", cu_q))
    if isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor):
        max_q = _as_int(kwargs.get("max_length_q", kwargs.get("max_seqlen_q")))
        max_k = _as_int(kwargs.get("max_length_k", kwargs.get("max_seqlen_k", max_q)))
        q_tensor, k_tensor = cu_q, cu_k
        return _cached_layout(
            (q_tensor, k_tensor),
            (*shape, max_q, max_k),
            lambda: _packed_from_cu(
                q_tensor.to(device), k_tensor.to(device), max_q, max_k, batch, q_len, k_len, causal
            ),
        )
    position_ids = kwargs.get("position_ids")
    if (
        isinstance(position_ids, torch.Tensor)
        and position_ids.ndim == 2
        and batch == 1
        and q_len == k_len
        and position_ids.shape[-1] == q_len
        and q_len > 1
    ):
        positions = position_ids

        def from_positions() -> _Layout | str:
            pos = positions[:1].to(device)
            if int(pos[0, 0]) == 0 and bool((pos[:, 1:] == 0).any()):
                return _packed_from_starts(pos == 0, causal)  # restarts at 0: packed
            return _dense(batch, q_len, k_len, causal, device)

        return _cached_layout((positions,), shape, from_positions)
    return _cached_layout((), shape, lambda: _dense(batch, q_len, k_len, causal, device))


# --------------------------------------------------------------------------- forward


def _kernel_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why the kernels cannot run on these tensors (None: they can)."""
    device = query.device
    cache_key = f"{device.type}:{device.index}"
    found = _available.get(cache_key)
    if found is None:
        try:
            from genagent import kernels
        except Exception as exc:  # triton missing or broken: PyTorch attention serves
            found = (False, f"the kernels cannot be imported ({type(exc).__name__}: {exc})")
        else:
            why: str | None = None
            try:
                ok = bool(kernels.is_available(device))
            except Exception as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
            if not ok and why is None:
                why = (
                    f"the kernels cannot run on {device.type} "
                    "(they need a CUDA GPU, or TRITON_INTERPRET=1 for tests on a CPU)"
                )
            found = (ok, why)
        _available[cache_key] = found
    if not found[0]:
        return found[1]
    from genagent import kernels

    # the kernels' batched layout: (batch, seq, heads, head_dim)
    reason: str | None = kernels.unsupported_reason(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    )
    if reason is not None:
        return f"the kernels cannot take these tensors: {reason}"
    return None


def _static_reason(
    query: torch.Tensor, key: torch.Tensor, dropout: float, causal: bool, kwargs: dict[str, Any]
) -> str | None:
    if kwargs.get("output_attentions"):
        return "attention weights are requested (output_attentions)"
    if dropout > 0.0:
        return "attention dropout is on (training with attention_dropout > 0)"
    for name in ("sliding_window", "softcap", "position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return f"the layer uses {name}"
    if query.shape[1] % key.shape[1] != 0:
        return "query heads are not a multiple of key heads"
    if causal and query.shape[2] > key.shape[2]:
        return "there are more queries than keys in causal attention"
    return None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered as :data:`ATTENTION_NAME`.

    Args:
        module: The attention layer (``is_causal`` is read from it unless ``is_causal`` is
            passed).
        query: ``(B, Hq, S, D)``.
        key: ``(B, Hkv, K, D)``, not repeated for grouped-query attention.
        value: ``(B, Hkv, K, D)``.
        attention_mask: ``None``, a 2-D padding mask ``(B, K)`` (1: real token), or a 4-D mask
            ``(B, 1, S, K)`` (boolean, True: attend; or additive float).
        scaling: Softmax scale (default ``D ** -0.5``).
        dropout: Attention dropout probability (anything above 0 falls back to SDPA).
        **kwargs: ``is_causal``; packing as ``cu_seq_lens_q/k`` with ``max_length_q/k`` (or
            ``cu_seqlens_*`` / ``max_seqlen_*``), or ``position_ids`` restarting at 0;
            ``output_attentions``; whatever else transformers passes.

    Returns:
        The output ``(B, S, Hq, D)``, contiguous, and the attention weights (``None`` unless
        they were requested).
    """
    is_causal = kwargs.pop("is_causal", None)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    reason = _static_reason(query, key, dropout, causal, kwargs)
    if reason is None:
        reason = _kernel_reason(query, key, value)
    layout: _Layout | str | None = None
    if reason is None:
        layout = _layout(query, key, attention_mask, causal, kwargs)
        if isinstance(layout, str):
            reason = f"the mask is {layout}"
        else:
            return _fused(query, key, value, layout, scaling), None
    _note(reason, reason, fallback=True)
    return _fallback(
        module, query, key, value, attention_mask, layout, scaling, dropout, causal, kwargs
    )


def _fused(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: _Layout,
    scaling: float | None,
) -> torch.Tensor:
    from genagent import kernels

    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    if layout.kind == "dense" and layout.causal and 0 < q_len < k_len and q_len <= _DECODE_MAX_Q:
        _note("decode", "the fused decode kernel serves decoding steps", fallback=False)
        seqlens = torch.full((batch,), k_len, dtype=torch.int32, device=query.device)
        out: torch.Tensor = kernels.decode_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            seqlens,
            softmax_scale=scaling,
        )
        return out.reshape(batch, q_len, heads, value.shape[-1]).contiguous()
    _note("varlen", "the fused varlen kernel serves attention", fallback=False)
    q = query.transpose(1, 2).reshape(batch * q_len, heads, dim)
    k = key.transpose(1, 2).reshape(batch * k_len, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * k_len, value.shape[1], value.shape[-1])
    if layout.q_index is not None:
        q = q.index_select(0, layout.q_index)
    if layout.k_index is not None:
        k = k.index_select(0, layout.k_index)
        v = v.index_select(0, layout.k_index)
    if q.shape[0] == 0:
        out = q.new_zeros(0, heads, value.shape[-1])
    else:
        out = kernels.varlen_attention(
            q,
            k,
            v,
            layout.cu_q,
            layout.cu_k,
            layout.max_q,
            layout.max_k,
            causal=layout.causal,
            softmax_scale=scaling,
        )
    if layout.q_index is not None:
        full = out.new_zeros(batch * q_len, heads, out.shape[-1])
        out = full.index_copy(0, layout.q_index, out)
    return out.reshape(batch, q_len, heads, out.shape[-1]).contiguous()


def _fallback(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layout: _Layout | str | None,
    scaling: float | None,
    dropout: float,
    causal: bool,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch attention with the same pattern the fused path would have used."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = attention_mask
    if mask is None or mask.ndim != 4:  # the pattern the fused path reads, as a 4-D mask
        if layout is None:
            layout = _layout(query, key, attention_mask, causal, kwargs)
        if isinstance(layout, str):
            raise ConfigurationError(
                f"{ATTENTION_NAME} cannot serve this call: {layout}. Pass a 2-D padding mask "
                "(batch, keys), a 4-D mask (batch, 1, queries, keys), or cu_seq_lens_q/k that "
                "start at 0 and end at the number of tokens"
            )
        mask = layout.sdpa_mask(query.device)
    if kwargs.get("output_attentions") or kwargs.get("softcap") is not None:
        return _eager(module, query, key, value, mask, scaling, dropout, causal, kwargs)
    rest = {k: v for k, v in kwargs.items() if k != "output_attentions"}
    out, _ = sdpa_attention_forward(
        module,
        query,
        key,
        value,
        mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=causal,
        **rest,
    )
    return out, None


def _eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    causal: bool,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its weights (for ``output_attentions``), as transformers' eager path."""
    repeats = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(repeats, dim=1)
    value = value.repeat_interleave(repeats, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None and causal and q_len > 1:
        q = torch.arange(q_len, device=query.device)
        k = torch.arange(k_len, device=query.device)
        mask = (k[None, :] <= q[:, None] + (k_len - q_len))[None, None]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


# --------------------------------------------------------------------------- models

# vision attentions that loop over windows outside flash attention: (module, class) -> the
# name of the rotary function of that module
_VISION_ATTENTIONS = {
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"): (
        "apply_rotary_pos_emb_vision"
    ),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention"): (
        "apply_rotary_pos_emb_vision"
    ),
}
_VISION_PARAMETERS = ["self", "hidden_states", "cu_seqlens", "position_embeddings", "max_seqlen"]
_PATCHED_ATTR = "_genagent_fused_forward"


def _vision_patchable(module: torch.nn.Module) -> str | None:
    """Why this vision attention cannot be patched (None: it can)."""
    import transformers

    cls = type(module)
    rotary_name = _VISION_ATTENTIONS.get((cls.__module__, cls.__name__))
    if rotary_name is None:
        return "not a known vision attention"
    if int(transformers.__version__.split(".")[0]) != 5:
        return f"transformers {transformers.__version__} (the patch is written for 5.x)"
    names = [p.name for p in inspect.signature(cls.forward).parameters.values()]
    if names[: len(_VISION_PARAMETERS)] != _VISION_PARAMETERS:
        return f"{cls.__name__}.forward takes {names}"
    if not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "scaling", "config")):
        return f"{cls.__name__} lacks qkv/proj/num_heads/scaling"
    if not callable(getattr(sys.modules[cls.__module__], rotary_name, None)):
        return f"{cls.__module__} has no {rotary_name}"
    return None


def _vision_forward(
    self: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The flash-attention branch of Qwen-VL's vision attention, for :data:`ATTENTION_NAME`.

    transformers calls the attention once per window (and per image) unless the name contains
    "flash"; this does what its flash branch does: one call with ``cu_seqlens`` for all windows.
    """
    cls = type(self)
    if self.config._attn_implementation != ATTENTION_NAME:  # switched away since: the original
        result: torch.Tensor = cls.forward(
            self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs
        )
        return result
    rotary = getattr(
        sys.modules[cls.__module__], _VISION_ATTENTIONS[(cls.__module__, cls.__name__)]
    )
    length = hidden_states.shape[0]
    query, key, value = (
        self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    )
    assert position_embeddings is not None, "Qwen-VL vision attention needs position_embeddings"
    cos, sin = position_embeddings
    query, key = rotary(query, key, cos, sin)
    query = query.transpose(0, 1).unsqueeze(0)
    key = key.transpose(0, 1).unsqueeze(0)
    value = value.transpose(0, 1).unsqueeze(0)
    dropout = 0.0 if not self.training else float(getattr(self, "attention_dropout", 0.0))
    out, _ = attention_forward(
        self,
        query,
        key,
        value,
        None,
        scaling=self.scaling,
        dropout=dropout,
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=max_seqlen,
        max_length_k=max_seqlen,
        is_causal=False,
        **kwargs,
    )
    out = out.reshape(length, -1).contiguous()
    projected: torch.Tensor = self.proj(out)
    return projected


def enable_fused_attention(
    model: Any, attn_implementation: str | dict[str, Any] | None = None
) -> None:
    """Register the fused attention and switch ``model`` over to it, vision tower included.

    Sets :data:`ATTENTION_NAME` on every sub-model (a VLM's language model and vision tower)
    with transformers' ``set_attn_implementation``. For Qwen2-VL and Qwen2.5-VL it also
    replaces the ``forward`` of each vision attention layer (on the instances, not the class)
    by transformers' own flash-attention branch of that forward, so that each layer makes one
    call with ``cu_seqlens`` for all windows and images instead of one call per window:
    transformers takes that branch only for names containing "flash", which its loader sends to
    the flash-attn package. The replacement is checked against the forward's signature and
    transformers' major version; where the check fails, a warning is logged and the per-window
    calls stay (still served by the fused kernel, one window at a time). A replaced forward
    runs the original one whenever the vision config names another implementation, so
    switching back with ``set_attn_implementation("sdpa")`` needs nothing else.

    Args:
        model: A transformers ``PreTrainedModel``.
        attn_implementation: What to set instead of :data:`ATTENTION_NAME` everywhere: a dict
            per sub-config, as transformers takes it (``{"text_config": ATTENTION_NAME,
            "vision_config": "sdpa"}``).

    Raises:
        ConfigurationError: If the model cannot switch its attention implementation.
    """
    name = register()
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise ConfigurationError(
            f"{type(model).__name__} has no set_attn_implementation: pass a transformers "
            f"PreTrainedModel, or load it with attn_implementation={name!r} after "
            "genagent.kernels.hf.register()"
        )
    try:
        model.set_attn_implementation(name if attn_implementation is None else attn_implementation)
    except (ValueError, ImportError) as exc:
        raise ConfigurationError(
            f"{type(model).__name__} cannot use {name!r}: {exc}. Models that follow "
            "transformers' AttentionInterface (Qwen2, Qwen2-VL, Qwen2.5-VL, Llama, ...) can; "
            "keep attn_implementation='sdpa' for others"
        ) from exc
    _patch_vision(model)


def _patch_vision(model: Any) -> int:
    """Install the single-call vision forward on every known vision attention; returns how many."""
    patched = 0
    for module in model.modules():
        cls = type(module)
        if (cls.__module__, cls.__name__) not in _VISION_ATTENTIONS:
            continue
        if getattr(module, _PATCHED_ATTR, False):
            patched += 1
            continue
        why = _vision_patchable(module)
        if why is not None:
            logger.warning(
                "%s: the vision tower keeps one attention call per window (%s)",
                ATTENTION_NAME,
                why,
            )
            continue
        module.forward = types.MethodType(_vision_forward, module)
        setattr(module, _PATCHED_ATTR, True)
        patched += 1
    return patched
