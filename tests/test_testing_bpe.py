"""``qwen_tokenizer("bpe")``: merges learned from a corpus, loaded as a real Qwen2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from genagent.testing import qwen_tokenizer, tiny_qwen2_5_vl

CORPUS = [
    "a photo of three refrigerators left of a blue parking meter",
    "a photo of two giraffes and a red refrigerator",
    '<think>The request asks for a giraffe.</think>\n<tool_call>\n{"name": "x"}\n</tool_call>',
] * 20


def test_frequent_words_become_single_tokens_and_text_round_trips() -> None:
    tok = qwen_tokenizer("bpe", corpus=CORPUS, vocab_size=400)
    pieces = tok.convert_ids_to_tokens(tok.encode(" refrigerators", add_special_tokens=False))
    assert pieces == ["Ġrefrigerators"]
    # a word never seen still encodes, byte by byte, and decodes to the same text
    text = "a photo of 7 zebras — ünïcode <|im_start|>user\nhi<|im_end|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # the Qwen special tokens come after the learned vocabulary, as single ids
    ids = tok.encode("<|im_start|><|image_pad|><tool_call>", add_special_tokens=False)
    assert len(ids) == 3 and min(ids) >= len(tok) - 22
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_bpe_tokenizer_is_deterministic_and_refuses_bad_arguments() -> None:
    a = qwen_tokenizer("bpe", corpus=CORPUS, vocab_size=400)
    b = qwen_tokenizer("bpe", corpus=CORPUS, vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="corpus"):
        qwen_tokenizer("bpe")
    with pytest.raises(ValueError, match="at least 256"):
        qwen_tokenizer("bpe", corpus=CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="'bpe'"):
        qwen_tokenizer("words")


def test_tiny_model_with_a_bpe_tokenizer_loads_through_the_real_path(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from transformers import AutoConfig, AutoTokenizer

    tok = qwen_tokenizer("bpe", corpus=CORPUS, vocab_size=400)
    folder = tiny_qwen2_5_vl(tmp_path / "m", tokenizer=tok, hidden_size=32, layers=1)
    loaded = AutoTokenizer.from_pretrained(folder)
    text = " a photo of two giraffes <|im_end|>"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(
        text, add_special_tokens=False
    )
    assert AutoConfig.from_pretrained(folder).text_config.vocab_size == len(tok)


def test_tiny_model_heads_and_tied_embeddings_survive_the_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    folder = tiny_qwen2_5_vl(
        tmp_path / "m", tokenizer="byte", hidden_size=64, layers=1, heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    config = AutoConfig.from_pretrained(folder)
    assert config.text_config.num_attention_heads == 2
    assert sum(config.text_config.rope_parameters["mrope_section"]) == 64 // 2 // 2
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, config.text_config.vocab_size)
    with pytest.raises(ValueError, match="heads"):
        tiny_qwen2_5_vl(tmp_path / "bad", tokenizer="byte", hidden_size=64, heads=3)
