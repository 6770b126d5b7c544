"""genagent's fused varlen attention inside transformers (``genagent.kernels.hf``).

Without a GPU the Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set by
conftest.py). The model tests use a tiny real Qwen2.5-VL saved and reloaded through
``from_pretrained``, in float32, and compare every path with transformers' own SDPA.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("triton")

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from genagent import kernels  # noqa: E402
from genagent._qwen_processors import image_only_processor  # noqa: E402
from genagent.images import MemoryImageStore  # noqa: E402
from genagent.kernels import hf  # noqa: E402
from genagent.messages import Message  # noqa: E402
from genagent.policies import SamplingParams, TransformersPolicy  # noqa: E402
from genagent.testing import tiny_qwen2_5_vl  # noqa: E402

if not kernels.is_available("cpu") and not torch.cuda.is_available():
    pytest.skip("the kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

TOL = 1e-4  # float32


@pytest.fixture(autouse=True)
def _fresh_stats() -> None:
    hf.reset_stats()


class _Attention(torch.nn.Module):
    """What transformers' attention functions read from a layer."""

    def __init__(self, causal: bool = True, groups: int = 2) -> None:
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Plain SDPA with an explicit (B, Q, K) mask, as (B, Q, H, D)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    return out.transpose(1, 2)


def _qkv(batch: int, q_len: int, k_len: int, dtype: Any = torch.float32) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(batch * 100 + q_len + k_len)
    q = torch.randn(batch, 4, q_len, 16, generator=g, dtype=dtype)
    k = torch.randn(batch, 2, k_len, 16, generator=g, dtype=dtype)
    v = torch.randn(batch, 2, k_len, 16, generator=g, dtype=dtype)
    return q, k, v


def _padding_mask(valid: torch.Tensor, q_len: int, causal: bool) -> torch.Tensor:
    """(B, Q, K) allowed pairs for key padding ``valid`` (B, K), queries the last Q keys."""
    k_len = valid.shape[1]
    allowed = valid[:, None, :].expand(-1, q_len, -1)
    if causal:
        tri = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
        allowed = allowed & tri
    return allowed


PADDINGS = {
    "left": [[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]],
    "right": [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]],
    # cached turn, its padding, then the new chunk: what TransformersPolicy's prefill passes
    "holes": [[0, 1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0, 1, 1]],
}


@pytest.mark.parametrize("q_len", [8, 3, 1])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize("rank", [2, 4])
def test_padded_masks_match_sdpa(padding: str, q_len: int, causal: bool, rank: int) -> None:
    valid = torch.tensor(PADDINGS[padding], dtype=torch.bool)
    q, k, v = _qkv(2, q_len, 8)
    allowed = _padding_mask(valid, q_len, causal)
    mask = valid if rank == 2 else allowed[:, None]
    out, weights = hf.attention_forward(_Attention(causal), q, k, v, mask)
    assert weights is None and out.shape == (2, q_len, 4, 16) and out.is_contiguous()
    real = valid[:, 8 - q_len :]
    expected = _reference(q, k, v, allowed)
    assert F.pad((out - expected)[real].abs().flatten(), (0, 1)).max() < TOL
    assert (out[~real] == 0).all()  # padded queries get zeros
    assert hf.stats()["fused"] == 1 and not hf.stats()["fallback"]


def test_packed_sequences_from_cu_seqlens_position_ids_and_masks() -> None:
    lengths = [5, 9, 2]
    total = sum(lengths)
    q, k, v = _qkv(1, total, total)
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32)
    segment = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    tri = torch.arange(total)[None, :] <= torch.arange(total)[:, None]
    allowed = ((segment[:, None] == segment[None, :]) & tri)[None]
    expected = _reference(q, k, v, allowed)
    layer = _Attention()
    by_cu, _ = hf.attention_forward(
        layer, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9
    )
    by_cu_alias, _ = hf.attention_forward(layer, q, k, v, None, cu_seqlens_q=cu, cu_seqlens_k=cu)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    by_positions, _ = hf.attention_forward(layer, q, k, v, None, position_ids=positions)
    by_mask, _ = hf.attention_forward(layer, q, k, v, allowed[:, None])
    for out in (by_cu, by_cu_alias, by_positions, by_mask):
        assert (out - expected).abs().max() < TOL
    assert hf.stats() == {"fused": 4, "varlen": 4, "decode": 0, "fallback": {}}


def test_decoding_uses_the_decode_kernel_or_varlen_with_padding() -> None:
    q, k, v = _qkv(2, 1, 9)
    layer = _Attention()
    out, _ = hf.attention_forward(layer, q, k, v, None)
    expected = _reference(q, k, v, torch.ones(2, 1, 9, dtype=torch.bool))
    assert (out - expected).abs().max() < TOL
    assert hf.stats()["decode"] == 1
    valid = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9], dtype=torch.bool)
    padded, _ = hf.attention_forward(layer, q, k, v, valid)
    assert (padded - _reference(q, k, v, valid[:, None, :])).abs().max() < TOL
    # a chunk of 3 new tokens on a cache of 6, no padding: bottom-right causal
    q3, k3, v3 = _qkv(2, 3, 9)
    chunk, _ = hf.attention_forward(layer, q3, k3, v3, None)
    allowed = _padding_mask(torch.ones(2, 9, dtype=torch.bool), 3, causal=True)
    assert (chunk - _reference(q3, k3, v3, allowed)).abs().max() < TOL
    assert hf.stats() == {"fused": 3, "varlen": 1, "decode": 2, "fallback": {}}


def test_gradients_match_sdpa() -> None:
    valid = torch.tensor(PADDINGS["right"], dtype=torch.bool)
    allowed = _padding_mask(valid, 8, causal=True)
    grads = []
    for fused in (True, False):
        q, k, v = (t.requires_grad_() for t in _qkv(2, 8, 8))
        if fused:
            out, _ = hf.attention_forward(_Attention(), q, k, v, valid)
        else:
            out = _reference(q, k, v, allowed)
        (out[valid] * torch.linspace(-1, 1, 16)).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() < TOL
    assert hf.stats()["fused"] == 1


def test_unsupported_calls_fall_back_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    valid = torch.tensor(PADDINGS["left"], dtype=torch.bool)
    layer = _Attention()
    caplog.set_level(logging.INFO, logger="genagent.kernels")
    q, k, v = _qkv(2, 8, 8, dtype=torch.float64)  # a dtype the kernels do not take
    expected = _reference(q, k, v, _padding_mask(valid, 8, causal=True))
    for _ in range(3):
        out, _ = hf.attention_forward(layer, q, k, v, valid)
        assert (out - expected)[valid].abs().max() < 1e-10
    # an additive bias is not a padding pattern
    q, k, v = _qkv(2, 8, 8)
    bias = torch.randn(2, 1, 8, 8)
    out, _ = hf.attention_forward(layer, q, k, v, bias)
    groups = q.shape[1] // k.shape[1]
    expected_bias = F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=bias
    ).transpose(1, 2)
    assert (out - expected_bias).abs().max() < TOL
    # attention weights requested: eager attention, weights returned
    out, weights = hf.attention_forward(layer, q, k, v, valid, output_attentions=True)
    assert weights is not None and weights.shape == (2, 4, 8, 8)
    allowed = _padding_mask(valid, 8, causal=True)
    assert (out - _reference(q, k, v, allowed))[valid].abs().max() < TOL
    fallback = hf.stats()["fallback"]
    assert hf.stats()["fused"] == 0
    assert sorted(fallback.values()) == [1, 1, 3]
    assert any("float64" in reason for reason in fallback)
    assert any("output_attentions" in reason for reason in fallback)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # one per reason, not one per call
    assert all("falls back to PyTorch attention" in r.getMessage() for r in warnings)


def test_kernels_unavailable_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "is_available", lambda device=None: False)
    monkeypatch.setattr(hf, "_available", {})
    q, k, v = _qkv(1, 8, 8)
    out, _ = hf.attention_forward(_Attention(), q, k, v, None)
    allowed = _padding_mask(torch.ones(1, 8, dtype=torch.bool), 8, causal=True)
    assert (out - _reference(q, k, v, allowed)).abs().max() < TOL
    (reason,) = hf.stats()["fallback"]
    assert "TRITON_INTERPRET" in reason


def test_register_is_idempotent_and_avoids_flash_names() -> None:
    assert hf.register() == hf.register() == hf.ATTENTION_NAME == "genagent_varlen"
    assert "flash" not in hf.ATTENTION_NAME
    assert ALL_ATTENTION_FUNCTIONS[hf.ATTENTION_NAME] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[hf.ATTENTION_NAME] is hf.fused_attention_mask
    # plain causal masks stay 2-D (or None); other patterns are built by sdpa_mask, 4-D
    pad = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert hf.fused_attention_mask(2, 3, 3, attention_mask=pad) is pad
    assert hf.fused_attention_mask(2, 1, 3, q_offset=2, attention_mask=pad.bool()) is pad
    assert hf.fused_attention_mask(2, 3, 3, attention_mask=torch.ones(2, 3)) is None
    four_d = hf.fused_attention_mask(2, 1, 5, q_offset=2, attention_mask=torch.ones(2, 3))
    assert four_d is not None and four_d.shape == (2, 1, 1, 5)


# --------------------------------------------------------------------------- the tiny Qwen2.5-VL


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen25vl-fused"), tokenizer="byte")


@pytest.fixture(scope="module")
def models(checkpoint: Path) -> dict[str, Any]:
    """The same checkpoint loaded twice: with SDPA, and with the fused attention."""
    hf.register()
    auto: Any = AutoModelForImageTextToText
    sdpa = auto.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    fused = auto.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation=hf.ATTENTION_NAME
    )
    hf.enable_fused_attention(fused)
    processor = image_only_processor("qwen2_5_vl").from_pretrained(checkpoint)
    return {"sdpa": sdpa.eval(), "fused": fused.eval(), "processor": processor}


def _image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.RandomState(seed).rand(height, width, 3) * 255
    return Image.fromarray(pixels.astype("uint8"))


IMAGES = [(0, 56, 56), (1, 84, 56), (2, 112, 112)]
PROMPTS = ["a red cup", "hi", "describe this picture, please"]


def _conversations(processor: Any) -> list[dict[str, Any]]:
    encoded = []
    for text, image in zip(PROMPTS, IMAGES, strict=True):
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        rendered = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        encoded.append(processor(text=[rendered], images=[_image(*image)], return_tensors="pt"))
    return encoded


def _packed(model: Any, conversations: list[dict[str, Any]]) -> dict[str, Any]:
    """One row: text positions restart at 0 for each conversation (row 0 of 4-row positions)."""
    positions = []
    for enc in conversations:
        ids = enc["input_ids"]
        types = (ids == model.config.image_token_id).int()
        rope, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=enc["image_grid_thw"]
        )
        text = torch.arange(ids.shape[1]).view(1, 1, -1)
        positions.append(torch.cat([text, rope]))
    return {
        "input_ids": torch.cat([e["input_ids"] for e in conversations], 1),
        "position_ids": torch.cat(positions, 2),
        "pixel_values": torch.cat([e["pixel_values"] for e in conversations]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in conversations]),
    }


def test_packed_conversations_with_images_match_sdpa(models: dict[str, Any]) -> None:
    sdpa, fused = models["sdpa"], models["fused"]
    conversations = _conversations(models["processor"])
    packed = _packed(sdpa, conversations)
    lengths = [e["input_ids"].shape[1] for e in conversations]
    cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
    with torch.no_grad():
        # without a cache, transformers builds the block-diagonal mask from the positions
        expected = sdpa(**packed, use_cache=False).logits
        by_mask = fused(**packed, use_cache=False).logits
        assert hf.stats()["fused"] == 4 and not hf.stats()["fallback"]  # 2 vision + 2 text
        by_cu = fused(
            **packed,
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max(lengths),
            max_length_k=max(lengths),
        ).logits
        alone = [sdpa(**e).logits[0] for e in conversations]
    assert (by_mask - expected).abs().max() < TOL
    assert (by_cu - expected).abs().max() < TOL
    # the packed reference really is packed: each conversation as if alone
    assert (expected[0] - torch.cat(alone)).abs().max() < TOL
    assert hf.stats()["fused"] == 8 and not hf.stats()["fallback"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_sdpa(models: dict[str, Any], side: str) -> None:
    processor = models["processor"]
    processor.tokenizer.padding_side = side
    chats = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
        for t in PROMPTS
    ]
    texts = [
        processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats
    ]
    images = [_image(*image) for image in IMAGES]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = models["sdpa"](**batch).logits
        out = models["fused"](**batch).logits
    real = batch["attention_mask"].bool()
    assert not real.all()
    assert (out - expected)[real].abs().max() < TOL
    assert hf.stats()["fused"] == 4 and not hf.stats()["fallback"]


def test_vision_tower_makes_one_call_per_layer(models: dict[str, Any]) -> None:
    conversations = _conversations(models["processor"])
    pixels = torch.cat([e["pixel_values"] for e in conversations])
    grid = torch.cat([e["image_grid_thw"] for e in conversations])
    sdpa_visual, fused_visual = models["sdpa"].model.visual, models["fused"].model.visual
    depth = len(fused_visual.blocks)
    with torch.no_grad():
        expected = sdpa_visual(pixels, grid_thw=grid).pooler_output
        out = fused_visual(pixels, grid_thw=grid).pooler_output
        assert hf.stats()["fused"] == depth  # every window and image of a layer in one call
        # the same tower without the replaced forward: transformers' loop, a call per window
        hf.reset_stats()
        sdpa_visual.set_attn_implementation(hf.ATTENTION_NAME)
        try:
            looped = sdpa_visual(pixels, grid_thw=grid).pooler_output
        finally:
            sdpa_visual.set_attn_implementation("sdpa")
    windowed = hf.stats()["fused"]
    assert windowed > depth + len(IMAGES)  # windows of layer 0, images of layer 1
    assert (out - expected).abs().max() < TOL
    assert (looped - expected).abs().max() < TOL
    assert not hf.stats()["fallback"]


def test_output_attentions_falls_back_in_the_model(models: dict[str, Any]) -> None:
    (enc, *_) = _conversations(models["processor"])
    with torch.no_grad():
        expected = models["sdpa"](**enc).logits
        out = models["fused"](**enc, output_attentions=True)
    assert out.attentions is not None and all(a is not None for a in out.attentions)
    assert (out.logits - expected).abs().max() < TOL
    assert any("output_attentions" in reason for reason in hf.stats()["fallback"])


def test_policy_greedy_generation_equals_sdpa(checkpoint: Path) -> None:
    fused = TransformersPolicy.from_pretrained(
        str(checkpoint), device="cpu", attn_implementation="fused"
    )
    sdpa = TransformersPolicy.from_pretrained(
        str(checkpoint), device="cpu", attn_implementation="sdpa"
    )
    config = fused.model.config
    assert config.text_config._attn_implementation == hf.ATTENTION_NAME
    assert config.vision_config._attn_implementation == hf.ATTENTION_NAME
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0)
    store = MemoryImageStore()
    prompts = [
        [Message.user(store.put(_image(0, 56, 56)), "a red cup")],
        [Message.user(store.put(_image(2, 112, 112)), "describe this picture, please")],
    ]

    async def answers(policy: TransformersPolicy) -> list[Any]:
        batch = await asyncio.gather(*(policy.generate(p, sampling=sampling) for p in prompts))
        single = await policy.generate(prompts[0], sampling=sampling)  # no padding: decode kernel
        return [o.output_ids for o in [*batch, single]]

    try:
        got = asyncio.run(answers(fused))
        want = asyncio.run(answers(sdpa))
    finally:
        fused.close()
        sdpa.close()
    assert got == want
    assert all(len(ids) > 0 for ids in got)
    counts = hf.stats()
    assert counts["varlen"] > 0 and counts["decode"] > 0 and not counts["fallback"]
