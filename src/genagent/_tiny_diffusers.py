"""Tiny, real diffusers pipelines built offline from configs (private; see ``genagent.testing``).

Every component is the real class with a tiny config and random weights, in eval mode; 2 steps
at 32-64 px take milliseconds on a CPU. Importing this module imports torch, transformers and
diffusers (the ``[diffusers]`` extra).
"""

from __future__ import annotations

import json
from typing import Any

import diffusers as _diffusers
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = ["PIPELINES", "tiny_flux_lora", "tiny_pipeline"]

D: Any = _diffusers  # untyped: attribute access keeps mypy strict quiet


def _byte_chars() -> list[str]:
    """The byte-level BPE alphabet (GPT-2 / CLIP / Qwen), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(printable, codes, strict=True))
    return [chr(table[b]) for b in range(256)]


def _clip_tokenizer() -> Any:
    """Byte-level CLIP BPE without merges: every byte is a token (and its word-final form)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_chars():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    cls: Any = CLIPTokenizer
    return cls(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> Any:
    """A unigram T5 tokenizer over ASCII letters, digits and punctuation."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()":
        pieces += [(ch, -3.0), ("▁" + ch, -3.5)]
    cls: Any = T5Tokenizer
    return cls(vocab=pieces, model_max_length=512)


def _eval(*modules: Any) -> None:
    # modules built from a config start in training mode: T5's dropout would make a seed's
    # images differ from call to call
    for module in modules:
        module.eval()


def _clip_config(tokenizer: Any) -> Any:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5(tokenizer: Any, **kwargs: Any) -> Any:
    config_class: Any = T5Config
    return T5EncoderModel(
        config_class(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            is_encoder_decoder=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0,
            **kwargs,
        )
    )


# --------------------------------------------------------------------------- FLUX


def _flux_components(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    transformer = D.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    clip = CLIPTextModel(_clip_config(tokenizer))
    t5 = _t5(tokenizer_2, feed_forward_proj="gated-gelu")
    # one VAE block: scale factor 1; one latent channel packed 2x2 = the transformer's 4
    vae = D.AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    _eval(transformer, clip, t5, vae)
    return {
        "scheduler": D.FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": clip,
        "tokenizer": tokenizer,
        "text_encoder_2": t5,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }


def _flux(seed: int) -> Any:

    return D.FluxPipeline(**_flux_components(seed))


def _flux_kontext(seed: int) -> Any:

    return D.FluxKontextPipeline(**_flux_components(seed))


def tiny_flux_lora(seed: int = 1, rank: int = 4) -> dict[str, Any]:
    """A random LoRA state dict for the tiny FLUX transformer (needs peft).

    Save it with ``D.FluxPipeline.save_lora_weights(folder, transformer_lora_layers=...)``.
    peft initialises LoRA B to zeros (a no-op); here A and B are random, so it changes images.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = _flux_components(0)["transformer"]
    torch.manual_seed(seed)
    transformer.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    state: dict[str, Any] = get_peft_model_state_dict(transformer)
    return state


# --------------------------------------------------------------------------- SD 1.x, SD3, SDXL


def _sd(seed: int) -> Any:
    torch.manual_seed(seed)
    unet = D.UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
        attention_head_dim=2,
    )
    vae = D.AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    _eval(unet, vae, text_encoder)
    scheduler = D.DDIMScheduler(
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return D.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd3(seed: int) -> Any:

    torch.manual_seed(seed)
    transformer = D.SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    tok, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    te = CLIPTextModelWithProjection(_clip_config(tok))
    te2 = CLIPTextModelWithProjection(_clip_config(tok2))
    te3 = _t5(tok3)
    vae = D.AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    _eval(transformer, te, te2, te3, vae)
    return D.StableDiffusion3Pipeline(
        scheduler=D.FlowMatchEulerDiscreteScheduler(),
        text_encoder=te,
        text_encoder_2=te2,
        text_encoder_3=te3,
        tokenizer=tok,
        tokenizer_2=tok2,
        tokenizer_3=tok3,
        transformer=transformer,
        vae=vae,
    )


def _sdxl(seed: int) -> Any:

    torch.manual_seed(seed)
    unet = D.UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 (pooled text)
        cross_attention_dim=64,  # the two text encoders' 32 each, concatenated
        norm_num_groups=2,
    )
    vae = D.AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    tok, tok2 = _clip_tokenizer(), _clip_tokenizer()
    te, te2 = CLIPTextModel(_clip_config(tok)), CLIPTextModelWithProjection(_clip_config(tok2))
    _eval(unet, vae, te, te2)
    return D.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=D.EulerDiscreteScheduler(beta_schedule="scaled_linear"),
        force_zeros_for_empty_prompt=True,
    )


# --------------------------------------------------------------------------- Qwen-Image

_QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>",
]  # fmt: skip


def _qwen_templates() -> list[str]:
    """The prompt templates the Qwen-Image pipelines wrap prompts in."""
    t2i: Any = D.QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None
    )
    edit: Any = D.QwenImageEditPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=None,
    )
    return [t2i.prompt_template_encode, edit.prompt_template_encode]


def _qwen_tokenizer(texts: list[str]) -> Any:
    """A byte-level Qwen2 BPE with merges trained so every word of ``texts`` is one token.

    The Qwen-Image pipelines drop a fixed number of leading template tokens (34; 64 for the
    edit pipeline), counted with the real Qwen2.5 tokenizer. Trained on the templates, this
    small tokenizer splits them into exactly as many tokens, so prompts are embedded properly.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    cls: Any = Qwen2Tokenizer
    base = cls(
        vocab={ch: i for i, ch in enumerate(_byte_chars())},
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    chunks: list[str] = []
    for text in texts:
        for special in _QWEN_SPECIALS:
            text = text.replace(special, "\x00")
        chunks.extend(c for c in text.split("\x00") if c)
    bpe = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    bpe.normalizer = base.backend_tokenizer.normalizer
    bpe.pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(chunks, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = cls(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True)
                for t in _QWEN_SPECIALS
                if t not in ("<|endoftext|>", "<|im_end|>")
            ]
        }
    )
    return tokenizer


def _qwen_text_encoder(tokenizer: Any, hidden: int = 32) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen_components(seed: int, *, fast_vae: bool) -> dict[str, Any]:

    torch.manual_seed(seed)
    transformer = D.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    z_dim = 4
    if fast_vae:
        # scale factor 16 with 2 channels: the edit pipeline always encodes its input at about
        # 1024x1024, which this VAE does in ~0.15 s instead of ~11 s
        vae = D.AutoencoderKLQwenImage(
            base_dim=2,
            z_dim=z_dim,
            dim_mult=[1] * 5,
            num_res_blocks=0,
            temperal_downsample=[False] * 4,
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        )
    else:
        vae = D.AutoencoderKLQwenImage(
            base_dim=z_dim * 6,
            z_dim=z_dim,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        )
    tokenizer = _qwen_tokenizer(_qwen_templates())
    text_encoder = _qwen_text_encoder(tokenizer)
    _eval(transformer, vae, text_encoder)
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": D.FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }


def _qwen_image(seed: int) -> Any:

    return D.QwenImagePipeline(**_qwen_components(seed, fast_vae=False))


def _qwen_image_edit(seed: int) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    components = _qwen_components(seed, fast_vae=True)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=28 * 28,
        max_pixels=112 * 112,
    )
    from genagent._qwen_processors import ImageOnlyQwen2VLProcessor

    components["processor"] = ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=components["tokenizer"]
    )
    return D.QwenImageEditPipeline(**components)


PIPELINES = {
    "sd": _sd,
    "flux": _flux,
    "flux-kontext": _flux_kontext,
    "sd3": _sd3,
    "sdxl": _sdxl,
    "qwen-image": _qwen_image,
    "qwen-image-edit": _qwen_image_edit,
}
"""Builders by family name."""


def tiny_pipeline(kind: str, seed: int = 0) -> Any:
    """Build the tiny pipeline of a family (see :data:`PIPELINES`)."""
    try:
        builder = PIPELINES[kind]
    except KeyError:
        raise ValueError(f"unknown pipeline {kind!r}; choose from {sorted(PIPELINES)}") from None
    return builder(seed)
