"""The model families, each with the settings its authors recommend.

``FluxTool``, ``SD3Tool``, ``SDXLTool`` and ``QwenImageTool`` generate; ``FluxKontextTool`` and
``QwenImageEditTool`` edit.

Each is a :class:`~genagent.tools.DiffusersTool` (or ``DiffusersEditTool``) with a
:class:`~genagent.tools.Family` of defaults; every argument of those classes is accepted and
overrides the family's value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from genagent.errors import ConfigurationError
from genagent.tools._diffusers import DiffusersEditTool, DiffusersTool, Family, Lora

__all__ = [
    "FLUX_DEV",
    "FLUX_KONTEXT",
    "FLUX_SCHNELL",
    "FLUX_TURBO",
    "QWEN_IMAGE",
    "QWEN_IMAGE_EDIT",
    "SD3",
    "SDXL",
    "FluxKontextTool",
    "FluxTool",
    "QwenImageEditTool",
    "QwenImageTool",
    "SD3Tool",
    "SDXLTool",
    "flux_and_kontext",
    "qwen_image_and_edit",
]

FLUX_DEV = Family(
    name="flux-dev",
    pipeline="FluxPipeline",
    model="black-forest-labs/FLUX.1-dev",
    width=1024,
    height=1024,
    steps=28,
    guidance=3.5,
    supports_negative_prompt=False,
    max_sequence_length=512,
    mps_dtype="bfloat16",
    min_diffusers="0.30",
)
"""FLUX.1 [dev]: 28 steps, guidance 3.5 (guidance-distilled; no negative prompt)."""

FLUX_SCHNELL = dataclasses.replace(
    FLUX_DEV,
    name="flux-schnell",
    model="black-forest-labs/FLUX.1-schnell",
    steps=4,
    guidance=0.0,
    max_sequence_length=256,
)
"""FLUX.1 [schnell]: 4 steps, no guidance, 256 text tokens (its limit)."""

FLUX_TURBO = dataclasses.replace(
    FLUX_DEV,
    name="flux-turbo",
    steps=8,
    lora=(
        Lora(
            "alimama-creative/FLUX.1-Turbo-Alpha",
            weight_name="diffusion_pytorch_model.safetensors",
        ),
    ),
    fuse_lora=True,
)
"""FLUX.1 [dev] with the FLUX.1-Turbo-Alpha LoRA fused, at 8 steps: how the GenAgent authors
served their generator."""

SD3 = Family(
    name="sd3.5-large",
    pipeline="StableDiffusion3Pipeline",
    model="stabilityai/stable-diffusion-3.5-large",
    width=1024,
    height=1024,
    steps=28,
    guidance=3.5,
    max_sequence_length=256,
    mps_dtype="bfloat16",
    min_diffusers="0.31",
)
"""Stable Diffusion 3.5 Large: 28 steps, guidance 3.5."""

SDXL = Family(
    name="sdxl",
    pipeline="StableDiffusionXLPipeline",
    model="stabilityai/stable-diffusion-xl-base-1.0",
    width=1024,
    height=1024,
    steps=30,
    guidance=5.0,
    min_diffusers="0.19",
)
"""Stable Diffusion XL base 1.0: 30 steps, guidance 5.0."""

QWEN_IMAGE = Family(
    name="qwen-image",
    pipeline="QwenImagePipeline",
    model="Qwen/Qwen-Image",
    width=1328,
    height=1328,
    steps=50,
    true_cfg=4.0,
    negative_prompt=" ",
    max_sequence_length=512,
    mps_dtype="bfloat16",
    min_diffusers="0.35",
)
"""Qwen-Image: 1328 px, 50 steps, true classifier-free guidance 4.0 (as its model card)."""

FLUX_KONTEXT = Family(
    name="flux-kontext",
    pipeline="FluxKontextPipeline",
    model="black-forest-labs/FLUX.1-Kontext-dev",
    steps=28,
    guidance=2.5,
    supports_negative_prompt=False,
    max_sequence_length=512,
    mps_dtype="bfloat16",
    min_diffusers="0.35",
)
"""FLUX.1 Kontext [dev]: 28 steps, guidance 2.5; the size follows the input image."""

QWEN_IMAGE_EDIT = Family(
    name="qwen-image-edit",
    pipeline="QwenImageEditPipeline",
    model="Qwen/Qwen-Image-Edit",
    steps=50,
    true_cfg=4.0,
    negative_prompt=" ",
    max_sequence_length=512,
    mps_dtype="bfloat16",
    min_diffusers="0.35",
)
"""Qwen-Image-Edit: 50 steps, true classifier-free guidance 4.0; the size follows the image."""


class _Presets:
    """``preset=`` selection shared by the family tools (first base, before the tool class)."""

    presets: ClassVar[Mapping[str, Family]] = {}
    default_preset: ClassVar[str] = ""

    def __init__(
        self, model: str | Any | None = None, *, preset: str | None = None, **kwargs: Any
    ) -> None:
        family = self._family(preset, kwargs.pop("family", None))
        init: Any = super().__init__  # the tool class that follows this mixin
        init(model, family=family, **kwargs)

    @classmethod
    def _family(cls, preset: str | None, family: Family | None) -> Family:
        if family is not None:
            return family
        name = preset or cls.default_preset
        if name not in cls.presets:
            raise ConfigurationError(
                f"unknown preset {name!r} for {cls.__name__}; choose from {sorted(cls.presets)}"
            )
        return cls.presets[name]


class FluxTool(_Presets, DiffusersTool):
    """FLUX.1 text-to-image.

    Presets: ``"dev"`` (FLUX.1 [dev], 28 steps, guidance 3.5; the default), ``"schnell"``
    (FLUX.1 [schnell], 4 steps) and ``"turbo"`` (FLUX.1 [dev] with the FLUX.1-Turbo-Alpha LoRA
    fused, 8 steps: how the GenAgent authors served FLUX). ``model`` replaces the preset's
    weights (a fine-tune, a local folder) and keeps its settings.

    Args:
        model: Model id, local folder or pipeline instance (default: the preset's).
        preset: ``"dev"``, ``"schnell"`` or ``"turbo"``.
        **kwargs: Any argument of :class:`DiffusersTool` (``device``, ``offload``, ``steps``, ...).

    Example:
        ```py
        from genagent import Agent
        from genagent.tools import FluxTool

        tool = FluxTool(preset="turbo", offload="model")
        Agent(tool=tool).run("three red apples left of a blue cup")
        ```
    """

    presets: ClassVar[Mapping[str, Family]] = {
        "dev": FLUX_DEV,
        "schnell": FLUX_SCHNELL,
        "turbo": FLUX_TURBO,
    }
    default_preset: ClassVar[str] = "dev"


class SD3Tool(_Presets, DiffusersTool):
    """Stable Diffusion 3 / 3.5 text-to-image (default: SD 3.5 Large, 28 steps, guidance 3.5).

    Args:
        model: Model id, local folder or pipeline instance.
        **kwargs: Any argument of :class:`DiffusersTool`.
    """

    presets: ClassVar[Mapping[str, Family]] = {"large": SD3}
    default_preset: ClassVar[str] = "large"


class SDXLTool(_Presets, DiffusersTool):
    """Stable Diffusion XL text-to-image (default: SDXL base 1.0, 30 steps, guidance 5.0).

    Args:
        model: Model id, local folder or pipeline instance.
        **kwargs: Any argument of :class:`DiffusersTool`.
    """

    presets: ClassVar[Mapping[str, Family]] = {"base": SDXL}
    default_preset: ClassVar[str] = "base"


class QwenImageTool(_Presets, DiffusersTool):
    """Qwen-Image text-to-image (1328 px, 50 steps, true CFG 4.0), strong at rendering text.

    Needs a diffusers that provides ``QwenImagePipeline`` (0.35 or later).

    Args:
        model: Model id, local folder or pipeline instance.
        **kwargs: Any argument of :class:`DiffusersTool`.
    """

    presets: ClassVar[Mapping[str, Family]] = {"base": QWEN_IMAGE}
    default_preset: ClassVar[str] = "base"


class FluxKontextTool(_Presets, DiffusersEditTool):
    """FLUX.1 Kontext editing: changes the current image by an instruction (28 steps, 2.5).

    Needs a diffusers that provides ``FluxKontextPipeline``.

    Args:
        model: Model id, local folder or pipeline instance.
        **kwargs: Any argument of :class:`DiffusersTool`.
    """

    presets: ClassVar[Mapping[str, Family]] = {"dev": FLUX_KONTEXT}
    default_preset: ClassVar[str] = "dev"


class QwenImageEditTool(_Presets, DiffusersEditTool):
    """Qwen-Image-Edit editing: changes the current image by an instruction (50 steps, CFG 4).

    Needs a diffusers that provides ``QwenImageEditPipeline`` (0.35 or later).

    Args:
        model: Model id, local folder or pipeline instance.
        **kwargs: Any argument of :class:`DiffusersTool`.
    """

    presets: ClassVar[Mapping[str, Family]] = {"base": QWEN_IMAGE_EDIT}
    default_preset: ClassVar[str] = "base"


# --------------------------------------------------------------------------- registry factories


def flux_schnell(model: str | Any | None = None, **kwargs: Any) -> FluxTool:
    """``FluxTool(preset="schnell")`` (registry name ``flux-schnell``)."""
    return FluxTool(model, preset="schnell", **kwargs)


def flux_turbo(model: str | Any | None = None, **kwargs: Any) -> FluxTool:
    """``FluxTool(preset="turbo")`` (registry name ``flux-turbo``)."""
    return FluxTool(model, preset="turbo", **kwargs)


def flux_and_kontext(
    model: str | None = None, edit_model: str | None = None, **kwargs: Any
) -> list[DiffusersTool | DiffusersEditTool]:
    """FLUX.1 [dev] to generate and FLUX.1 Kontext to edit, sharing the other settings.

    Args:
        model: The generator's weights (default FLUX.1 [dev]).
        edit_model: The editor's weights (default FLUX.1 Kontext [dev]).
        **kwargs: Passed to both (``device``, ``offload``, ``dtype``, ...).
    """
    return [FluxTool(model, **kwargs), FluxKontextTool(edit_model, **kwargs)]


def qwen_image_and_edit(
    model: str | None = None, edit_model: str | None = None, **kwargs: Any
) -> list[DiffusersTool | DiffusersEditTool]:
    """Qwen-Image to generate and Qwen-Image-Edit to edit, sharing the other settings.

    Args:
        model: The generator's weights (default Qwen-Image).
        edit_model: The editor's weights (default Qwen-Image-Edit).
        **kwargs: Passed to both.
    """
    return [QwenImageTool(model, **kwargs), QwenImageEditTool(edit_model, **kwargs)]
