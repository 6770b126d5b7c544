"""The fused attention kernels (genagent.kernels) against a per-sequence fp32 SDPA reference.

Without a GPU they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), which is slow:
shapes stay small, but each case still spans several tiles (the interpreter tiles are 32 x 32).
bf16 runs on a GPU only: bf16 matmuls are wrong under the interpreter (triton issue 11584).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

pytest.importorskip("triton", reason="the kernels extra (triton) is not installed")
torch = pytest.importorskip("torch")
F = torch.nn.functional

from genagent import kernels  # noqa: E402
from genagent.errors import ConfigurationError  # noqa: E402
from genagent.kernels import _configs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    not kernels.is_available(DEVICE),
    reason=f"the kernels cannot run on {DEVICE} (the CPU needs TRITON_INTERPRET=1, see conftest)",
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 is checked on a GPU only (triton issue 11584)"
)


# --------------------------------------------------------------------------- helpers


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32, device=DEVICE)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens_q: list[int],
    lens_k: list[int],
    *,
    causal: bool,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence fp32 SDPA, K/V heads repeated for GQA (here only); rows with no key give 0."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    sq = sk = 0
    for lq, lk in zip(lens_q, lens_k, strict=True):
        qs = q[sq : sq + lq].float().transpose(0, 1)  # (H, Lq, D)
        ks = k[sk : sk + lk].float().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[sk : sk + lk].float().transpose(0, 1).repeat_interleave(group, 0)
        sq, sk = sq + lq, sk + lk
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:  # bottom-right: query i sees key j <= i + lk - lq
            visible = torch.arange(lk, device=q.device)[None, :] <= (
                torch.arange(lq, device=q.device)[:, None] + lk - lq
            )
        has_key = visible.any(1)
        out = qs.new_zeros(qs.shape)
        rows = has_key.nonzero().flatten()
        if rows.numel():
            out[:, rows] = F.scaled_dot_product_attention(
                qs[:, rows], ks, vs, attn_mask=visible[rows], scale=scale
            )
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        outs.append(out.transpose(0, 1))
        lses.append(torch.logsumexp(scores, -1))
    return torch.cat(outs), torch.cat(lses, 1)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale (at least 1)."""
    expected = expected.float()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), "non-finite entries differ"
    if not finite.any():
        return 0.0
    diff = (actual.float() - expected)[finite].abs().max().item()
    return diff / max(1.0, expected[finite].abs().max().item())


def make_inputs(
    lens_q: list[int], lens_k: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(hq * 1000 + hkv * 100 + d + sum(lens_q))
    q = torch.randn(sum(lens_q), hq, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=gen).to(DEVICE, dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


@dataclass
class Case:
    lens_q: list[int]
    lens_k: list[int]
    hq: int
    hkv: int
    d: int
    causal: bool
    dtype: torch.dtype

    def __str__(self) -> str:
        kind = "causal" if self.causal else "full"
        dtype = str(self.dtype).removeprefix("torch.")
        lens = self.lens_q if self.lens_q == self.lens_k else f"{self.lens_q}x{self.lens_k}"
        return f"{dtype}-{kind}-g{self.hq // self.hkv}-d{self.d}-{lens}"


RAGGED = [1, 7, 33, 64]
CASES = [
    Case(RAGGED, RAGGED, 2, 2, 64, True, torch.float32),
    Case(RAGGED, RAGGED, 4, 2, 80, False, torch.float32),
    Case(RAGGED, RAGGED, 14, 2, 128, True, torch.float32),
    Case([0, 40, 0, 5], [0, 40, 0, 5], 14, 2, 64, False, torch.float32),
    Case(RAGGED, RAGGED, 2, 2, 128, False, torch.float16),
    Case(RAGGED, RAGGED, 4, 2, 80, True, torch.float16),
    Case([5, 40], [5, 40], 14, 2, 64, True, torch.float16),
    # bottom-right causal with Lq != Lk: fewer queries than keys (chunked prefill), more queries
    # than keys (the first rows see no key), and an empty key sequence
    Case([3, 16, 1], [10, 40, 1], 4, 2, 64, True, torch.float32),
    Case([20, 6, 4], [5, 6, 0], 2, 1, 64, True, torch.float32),
    Case([3, 16, 1], [10, 40, 1], 2, 2, 80, False, torch.float16),
]
# relative to the reference's magnitude: fp32 is exact up to summation order; fp16 rounds the
# inputs to the kernel's matmuls (P and dS) to 11 bits
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def run_case(case: Case) -> dict[str, float]:
    """Forward + backward of the kernel and the reference; the error of each output."""
    q, k, v = make_inputs(case.lens_q, case.lens_k, case.hq, case.hkv, case.d, case.dtype)
    out, lse = kernels.varlen_attention_with_lse(
        q, k, v, cu_seqlens(case.lens_q), cu_seqlens(case.lens_k),
        max(case.lens_q), max(case.lens_k), causal=case.causal,
    )  # fmt: skip
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_lse = reference(q, k, v, case.lens_q, case.lens_k, causal=case.causal)
    want = torch.autograd.grad(ref_out, (q, k, v), grad_out.float())
    assert out.dtype == case.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (case.hq, q.shape[0])
    errors = {"out": max_error(out, ref_out), "lse": max_error(lse, ref_lse)}
    errors |= {f"d{name}": max_error(g, w) for name, g, w in zip("qkv", got, want, strict=True)}
    return errors


# --------------------------------------------------------------------------- varlen attention


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=str)
def test_outputs_lse_and_gradients_match_sdpa_per_sequence(case: Case) -> None:
    errors = run_case(case)
    assert max(errors.values()) <= TOLERANCE[case.dtype], errors


def random_case(seed: int) -> Case:
    rng = torch.Generator().manual_seed(seed)

    def pick(options: list[int]) -> int:
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    batch = pick([1, 2, 3])
    lens_q = [int(n) for n in torch.randint(0, 70, (batch,), generator=rng)]
    same = pick([0, 1]) == 1
    lens_k = lens_q if same else [int(n) for n in torch.randint(0, 70, (batch,), generator=rng)]
    hkv, group = pick([1, 2]), pick([1, 2, 7])
    return Case(
        lens_q, lens_k, hkv * group, hkv, pick([64, 80, 128]), pick([0, 1]) == 1, torch.float32
    )


@needs_kernels
@pytest.mark.parametrize("seed", range(4))
def test_random_ragged_batches_match_sdpa(seed: int) -> None:
    case = random_case(seed)
    errors = run_case(case)
    assert max(errors.values()) <= TOLERANCE[case.dtype], (str(case), errors)


TILES = {
    # the GPU defaults' shapes (large tiles, fewer than one per short sequence) and tiny ones
    "gpu-like": {"fwd": (128, 64), "bwd": (32, 128), "decode": (64, 64)},
    "tiny": {"fwd": (16, 16), "bwd": (16, 16), "decode": (16, 16)},
}


@needs_kernels
@pytest.mark.parametrize("tiles", sorted(TILES))
def test_results_do_not_depend_on_tile_sizes(tiles: str, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = {kind: _configs.KernelConfig(m, n) for kind, (m, n) in TILES[tiles].items()}
    monkeypatch.setattr(_configs, "default_config", lambda kind, *args: configs[kind])
    for case in (
        Case([70, 1, 45], [70, 1, 45], 4, 2, 80, True, torch.float32),
        Case([3, 50], [70, 150], 2, 1, 64, True, torch.float16),
    ):
        errors = run_case(case)
        assert max(errors.values()) <= TOLERANCE[case.dtype], (str(case), errors)
    q = torch.randn(2, 3, 4, 64, device=DEVICE)
    k_cache, v_cache = torch.randn(2, 2, 150, 2, 64, device=DEVICE).unbind(0)
    out = kernels.decode_attention(
        q, k_cache, v_cache, torch.tensor([150, 40], dtype=torch.int32, device=DEVICE)
    )
    assert max_error(out, decode_reference(q, k_cache, v_cache, [150, 40])) <= 2e-5


@needs_kernels
def test_rows_that_see_no_key_get_zero_output_and_minus_inf_lse() -> None:
    lens_q, lens_k = [6, 3], [2, 0]  # causal: rows 0..3 of the first sequence see no key
    q, k, v = make_inputs(lens_q, lens_k, 2, 2, 64, torch.float32)
    out, lse = kernels.varlen_attention_with_lse(
        q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 6, 2, causal=True
    )
    empty = [0, 1, 2, 3, 6, 7, 8]
    assert torch.all(out[empty] == 0) and torch.all(lse[:, empty] == float("-inf"))
    assert torch.isfinite(lse[:, [4, 5]]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@needs_kernels
def test_token_strided_views_need_no_copy() -> None:
    # q, k, v as slices of one fused projection, and every other token of a longer tensor
    lens = [9, 33]
    qkv = torch.randn(2 * sum(lens), 4 + 2 + 2, 64, device=DEVICE)[::2]
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    assert not q.is_contiguous() and q.stride(0) == 2 * 8 * 64
    cu = cu_seqlens(lens)
    out = kernels.varlen_attention(q, k, v, cu, cu, 33, 33, causal=True)
    expected = kernels.varlen_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 33, 33, causal=True
    )
    assert torch.equal(out, expected)
    assert max_error(out, reference(q, k, v, lens, lens, causal=True)[0]) <= 2e-5


@needs_kernels
def test_lse_is_differentiable() -> None:
    lens = [5, 20]
    q, k, v = make_inputs(lens, lens, 4, 2, 64, torch.float32)
    cu = cu_seqlens(lens)
    out, lse = kernels.varlen_attention_with_lse(q, k, v, cu, cu, 20, 20, causal=True)
    got = torch.autograd.grad(out.sum() + (lse * lse).sum(), (q, k, v))
    ref_out, ref_lse = reference(q, k, v, lens, lens, causal=True)
    want = torch.autograd.grad(ref_out.sum() + (ref_lse * ref_lse).sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        assert max_error(g, w) <= 2e-5


@needs_kernels
def test_softmax_scale_and_odd_head_dim() -> None:
    lens = [3, 17]
    q, k, v = make_inputs(lens, lens, 2, 1, 40, torch.float32)  # 40 is padded to 64 inside
    cu = cu_seqlens(lens)
    out = kernels.varlen_attention(q, k, v, cu, cu, 17, 17, softmax_scale=0.3)
    assert max_error(out, reference(q, k, v, lens, lens, causal=False, scale=0.3)[0]) <= 2e-5


@needs_kernels
def test_an_empty_batch_gives_empty_outputs() -> None:
    q, k, v = make_inputs([0, 0], [0, 0], 2, 2, 64, torch.float32)
    cu = cu_seqlens([0, 0])
    out, lse = kernels.varlen_attention_with_lse(q, k, v, cu, cu, 0, 0, causal=True)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)


@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bf16_matches_sdpa_on_gpu(causal: bool) -> None:
    case = Case([1, 7, 100, 257], [1, 7, 100, 257], 14, 2, 128, causal, torch.bfloat16)
    errors = run_case(case)
    assert max(errors.values()) <= TOLERANCE[torch.bfloat16], errors


# --------------------------------------------------------------------------- decode


def decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    """The queries are the last Lq positions: the varlen reference with Lk = cache length."""
    len_q = q.shape[1]
    out = [
        reference(q[b], k_cache[b, :n], v_cache[b, :n], [len_q], [n], causal=True)[0]
        for b, n in enumerate(lengths)
    ]
    return torch.stack(out)


@needs_kernels
@pytest.mark.parametrize(
    ("lengths", "len_q", "hq", "hkv", "d", "dtype", "num_splits"),
    [
        ([300], 1, 14, 2, 128, torch.float32, None),  # batch 1, long cache: split
        ([5, 200, 77], 4, 14, 2, 64, torch.float32, None),
        ([3, 100], 4, 7, 7, 80, torch.float16, 1),  # 3 < Lq: the first query sees no entry
        ([64, 1, 128], 1, 7, 1, 64, torch.float32, 3),
        ([50, 100], 16, 16, 1, 64, torch.float32, 2),  # 256 query rows: several row blocks
    ],
    ids=["b1-lq1-g7-split", "b3-lq4-g7", "fp16-lq4-g1-short", "b3-lq1-g7-3splits", "lq16-g16"],
)
def test_decode_matches_reference(
    lengths: list[int],
    len_q: int,
    hq: int,
    hkv: int,
    d: int,
    dtype: torch.dtype,
    num_splits: int | None,
) -> None:
    gen = torch.Generator().manual_seed(len(lengths) + len_q + d)
    cache_len = max(lengths) + 3  # the cache is longer than any sequence
    q = torch.randn(len(lengths), len_q, hq, d, generator=gen).to(DEVICE, dtype)
    k_cache = torch.randn(len(lengths), cache_len, hkv, d, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(len(lengths), cache_len, hkv, d, generator=gen).to(DEVICE, dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = kernels.decode_attention(q, k_cache, v_cache, seqlens, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    expected = decode_reference(q, k_cache, v_cache, lengths)
    assert max_error(out, expected) <= TOLERANCE[dtype]


@needs_kernels
def test_decode_split_count_does_not_change_the_result() -> None:
    q = torch.randn(2, 2, 4, 64, device=DEVICE)
    k_cache, v_cache = torch.randn(2, 2, 130, 2, 64, device=DEVICE).unbind(0)
    seqlens = torch.tensor([130, 61], dtype=torch.int32, device=DEVICE)
    one = kernels.decode_attention(q, k_cache, v_cache, seqlens, num_splits=1)
    for splits in (2, 5):
        split = kernels.decode_attention(q, k_cache, v_cache, seqlens, num_splits=splits)
        assert (split - one).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- errors


def _packed(hq: int = 2, hkv: int = 2, d: int = 64) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(8, hq, d, device=DEVICE),
        torch.randn(8, hkv, d, device=DEVICE),
        torch.randn(8, hkv, d, device=DEVICE),
    )


@needs_kernels
@pytest.mark.parametrize(
    ("cu", "match"),
    [
        (torch.tensor([0, 3, 8], dtype=torch.int64), "must be int32"),
        (torch.tensor([0, 5, 3], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 3, 9], dtype=torch.int32), "only 8 tokens"),
        (torch.tensor([1, 3, 8], dtype=torch.int32), "must start at 0"),
    ],
    ids=["int64", "decreasing", "past-the-end", "not-from-zero"],
)
def test_bad_cu_seqlens_are_rejected_with_the_fix(cu: torch.Tensor, match: str) -> None:
    q, k, v = _packed()
    with pytest.raises(ConfigurationError, match=match):
        kernels.varlen_attention(q, k, v, cu.to(DEVICE), cu.to(DEVICE), 8, 8)


@needs_kernels
def test_max_seqlen_shorter_than_a_sequence_is_rejected() -> None:
    q, k, v = _packed()
    cu = cu_seqlens([3, 5])
    with pytest.raises(ConfigurationError, match="max_seqlen"):
        kernels.varlen_attention(q, k, v, cu, cu, 4, 5)


@needs_kernels
def test_max_seqlen_may_be_an_integer_tensor() -> None:
    q, k, v = _packed()
    cu = cu_seqlens([3, 5])
    out = kernels.varlen_attention(q, k, v, cu, cu, torch.tensor(5), 5)
    assert torch.equal(out, kernels.varlen_attention(q, k, v, cu, cu, 5, 5))
    with pytest.raises(ConfigurationError, match="max_seqlen_k must be an int"):
        kernels.varlen_attention(q, k, v, cu, cu, 5, 5.0)  # type: ignore[arg-type]


@needs_kernels
def test_bad_shapes_are_rejected() -> None:
    q, k, v = _packed(hq=3, hkv=2)
    cu = cu_seqlens([8])
    with pytest.raises(ConfigurationError, match="Hq % Hkv"):
        kernels.varlen_attention(q, k, v, cu, cu, 8, 8)
    with pytest.raises(ConfigurationError, match="3-D tensor"):
        kernels.varlen_attention(q[None], k[None], v[None], cu, cu, 8, 8)
    with pytest.raises(ConfigurationError, match="same batch"):
        kernels.varlen_attention(*_packed(), cu, cu_seqlens([4, 4]), 8, 8)
    q4 = torch.randn(1, 1, 2, 64, device=DEVICE)
    cache = torch.randn(1, 8, 2, 64, device=DEVICE)
    with pytest.raises(ConfigurationError, match="int32"):
        kernels.decode_attention(q4, cache, cache, torch.tensor([8], device=DEVICE))


# --------------------------------------------------------------------------- availability


def test_availability_follows_the_interpreter_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = (torch.randn(4, 2, 64) for _ in range(3))
    if kernels.is_available("cpu"):
        assert kernels.unsupported_reason(q, k, v) is None
    monkeypatch.setattr(kernels, "_interpreter_active", lambda: False)
    assert not kernels.is_available("cpu")
    assert "TRITON_INTERPRET=1" in (kernels.unsupported_reason(q, k, v) or "")


def test_unsupported_reason_names_the_obstacle() -> None:
    def qkv(
        hq: int = 2, hkv: int = 2, d: int = 64, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv = torch.zeros(4, hkv, d, dtype=dtype)
        return torch.zeros(4, hq, d, dtype=dtype), kv, kv

    fp16_kv = qkv(dtype=torch.float16)[1]
    cases = {
        "float64": qkv(dtype=torch.float64),
        "head dim 512": qkv(d=512),
        "not a multiple": qkv(hq=5, hkv=2),
        "different dtypes": (qkv()[0], fp16_kv, fp16_kv),
        "dims": (torch.zeros(4, 64), torch.zeros(4, 64), torch.zeros(4, 64)),
    }
    for words, (q, k, v) in cases.items():
        reason = kernels.unsupported_reason(q, k, v)
        assert reason is not None and words in reason, (words, reason)
    if kernels.is_available("cpu"):
        assert "11584" in (kernels.unsupported_reason(*qkv(dtype=torch.bfloat16)) or "")


def test_import_works_without_torch_or_triton() -> None:
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'triton'}:\n"
        "            raise ImportError(name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import genagent.kernels as k\n"
        "print(k.is_available(), k.unsupported_reason(None, None, None))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.startswith("False ")
    assert "pip install 'genagent[kernels]'" in result.stdout


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("family", ["sm90", "sm80", "sm89", "other", "interpreter"])
def test_every_kind_has_a_default_config(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_configs, "gpu_family", lambda device: family)
    for kind in ("fwd", "bwd", "decode"):
        for d in (64, 80, 128, 256):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                config = kernels.default_config(kind, d, dtype, "cuda")
                assert isinstance(config, kernels.KernelConfig)
    with pytest.raises(ValueError, match="kind"):
        kernels.default_config("sideways", 64, torch.float16, "cuda")  # type: ignore[arg-type]


def test_autotune_is_off_by_default_and_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GENAGENT_KERNELS_AUTOTUNE", raising=False)
    assert not kernels.autotune_enabled()
    monkeypatch.setenv("GENAGENT_KERNELS_AUTOTUNE", "1")
    assert kernels.autotune_enabled()
    kernels.set_autotune(False)
    try:
        assert not kernels.autotune_enabled()
    finally:
        kernels.set_autotune(None)


def test_autotune_key_buckets_lengths() -> None:
    def key(seqlen: int, **kw: object) -> tuple[object, ...]:
        args: dict[str, object] = dict(
            max_seqlen_q=seqlen, max_seqlen_k=seqlen, head_dim=128,
            dtype=torch.float16, causal=True, group=4, device="cpu",
        )  # fmt: skip
        return _configs.autotune_key("fwd", **(args | kw))  # type: ignore[arg-type]

    assert key(1000) == key(1020) == key(1024)
    assert key(1000) != key(1030)
    assert key(1000) != key(1000, causal=False) != key(1000, group=1)


def test_the_tuner_benchmarks_once_per_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_configs, "_tuned", {})
    kernels.set_autotune(True)
    benched: list[_configs.KernelConfig] = []
    launched: list[_configs.KernelConfig] = []

    def bench(fn: object) -> float:
        fn()  # type: ignore[operator]
        benched.append(launched[-1])
        return 1.0 if launched[-1].BLOCK_N == 128 else 2.0

    default = _configs.KernelConfig(64, 64)
    try:
        for seqlen in (1000, 1020):
            key = _configs.autotune_key(
                "fwd", max_seqlen_q=seqlen, max_seqlen_k=seqlen, head_dim=64,
                dtype=torch.float16, causal=True, group=1, device="cpu",
            )  # fmt: skip
            used = _configs.run_with_config(
                "fwd", key, default, launched.append, device=torch.device("cpu"), bench=bench
            )
            assert used.BLOCK_N == 128 and launched[-1] == used
    finally:
        kernels.set_autotune(None)
    assert len(benched) == len(set(benched)) > 1  # each candidate once, the second call cached


def test_a_config_too_big_for_the_gpu_is_shrunk_and_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_configs, "_shrunk", {})

    class OutOfResources(Exception):
        pass

    tried: list[_configs.KernelConfig] = []

    def launch(config: _configs.KernelConfig) -> None:
        tried.append(config)
        if config.num_stages > 1 or config.BLOCK_N > 32:
            raise OutOfResources("shared memory")

    default = _configs.KernelConfig(64, 64, 4, 3)
    key = ("fwd", "sm89", "torch.float16", 128)
    first = _configs.run_with_config("fwd", key, default, launch, device=torch.device("cpu"))
    assert first == _configs.KernelConfig(64, 32, 4, 1)
    tried.clear()
    assert _configs.run_with_config("fwd", key, default, launch, device=torch.device("cpu"))
    assert tried == [first]
