"""Local diffusers generators: ``DiffusersTool`` (text-to-image) and ``DiffusersEditTool``.

A tool wraps one diffusers pipeline, given as an instance or loaded lazily in ``setup()`` through
``from_pretrained``. Every request goes through a :class:`~genagent.tools.MicroBatcher`: the
candidates of one call, and the calls of concurrent runs that share the tool, are generated in
one pipeline call when their settings match, each image with its own seeded generator, so a
batched image equals the image generated alone with the same seed. The pipeline's step
callback reports progress to the run's hooks and a progress bar, and stops the denoising when
every run in the batch has spent its budget. Needs the ``[diffusers]`` extra.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import pickle
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from genagent.errors import (
    BudgetExceeded,
    ConfigurationError,
    GenAgentError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tools._base import EditTool, GenerationTool, Tool, ToolContext, ToolResult
from genagent.tools._batching import MicroBatcher

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

__all__ = [
    "DiffusersEditTool",
    "DiffusersTool",
    "Family",
    "GenerationSettings",
    "Lora",
]

logger = logging.getLogger("genagent.tools.diffusers")

_RESERVED_CALL_KWARGS = frozenset(
    {
        "prompt", "prompt_2", "prompt_3", "negative_prompt", "image", "generator", "latents",
        "num_images_per_prompt", "output_type", "return_dict", "callback_on_step_end",
        "width", "height", "num_inference_steps", "guidance_scale", "true_cfg_scale",
        "max_sequence_length",
    }
)  # fmt: skip

Offload = Literal["model", "sequential"]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter to load into the pipeline.

    Attributes:
        source: A Hugging Face repository id or a local folder or ``.safetensors`` file.
        weight_name: The weights file inside the repository or folder, when it holds several.
        scale: The adapter's strength (``set_adapters`` weight).
        adapter_name: Its name in the pipeline (default: ``lora_<i>``).
    """

    source: str
    weight_name: str | None = None
    scale: float = 1.0
    adapter_name: str | None = None


@dataclass(frozen=True)
class Family:
    """Defaults of one model family: its pipeline class and the settings its authors recommend.

    Attributes:
        name: Short name (``"flux"``), recorded in trajectories.
        pipeline: The diffusers pipeline class name (``"FluxPipeline"``).
        model: The default model id.
        width: Default width in pixels (``None``: the pipeline's, or the input image's).
        height: Default height in pixels.
        steps: Default number of denoising steps.
        guidance: Default ``guidance_scale`` (``None``: not passed).
        true_cfg: Default ``true_cfg_scale`` for pipelines with real classifier-free
            guidance next to distilled guidance (Qwen-Image), else ``None``.
        negative_prompt: Default negative prompt (``None``: none).
        supports_negative_prompt: Whether the family uses a negative prompt.
        max_sequence_length: Default text length of the T5 / Qwen encoder (``None``: not passed).
        mps_dtype: The dtype ``"auto"`` picks on Apple MPS (fp16 overflows in some families).
        lora: Adapters the preset loads.
        fuse_lora: Whether the preset fuses its adapters into the weights.
        min_diffusers: The diffusers version that added the pipeline (for error messages).
    """

    name: str
    pipeline: str
    model: str
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    true_cfg: float | None = None
    negative_prompt: str | None = None
    supports_negative_prompt: bool = True
    max_sequence_length: int | None = None
    mps_dtype: str = "float16"
    lora: tuple[Lora, ...] = ()
    fuse_lora: bool = False
    min_diffusers: str = "0.32"


@dataclass(frozen=True)
class GenerationSettings:
    """The settings of one generation: requests with equal settings share a pipeline call.

    ``None`` leaves a setting to the pipeline's own default.

    Attributes:
        width: Width in pixels.
        height: Height in pixels.
        steps: Denoising steps (``num_inference_steps``).
        guidance: ``guidance_scale``.
        true_cfg: ``true_cfg_scale`` (FLUX with a negative prompt, Qwen-Image).
        negative_prompt: What the image should not show, for families that use one.
        max_sequence_length: Text encoder length (FLUX, SD3, Qwen-Image).
        extra: Further pipeline arguments, as sorted ``(name, value)`` pairs.
    """

    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    true_cfg: float | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with some settings changed (``None`` values are ignored)."""
        extra = changes.pop("extra", None)
        updated = dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
        if extra:
            merged = {**dict(self.extra), **dict(extra)}
            updated = dataclasses.replace(updated, extra=tuple(sorted(merged.items())))
        return updated

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline keyword arguments these settings set (not the prompt)."""
        kwargs: dict[str, Any] = {}
        for name, value in (
            ("width", self.width),
            ("height", self.height),
            ("num_inference_steps", self.steps),
            ("guidance_scale", self.guidance),
            ("true_cfg_scale", self.true_cfg),
            ("max_sequence_length", self.max_sequence_length),
        ):
            if value is not None:
                kwargs[name] = value
        kwargs.update(self.extra)
        return kwargs


# --------------------------------------------------------------------------- requests


@dataclass
class _Request:
    """One pipeline request: one or more images with one prompt and settings."""

    prompt: str
    seeds: list[int]
    settings: GenerationSettings
    image: PILImage.Image | None = None  # the image to edit
    ctx: ToolContext | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # raised by its progress hook or budget check
    done: bool = False

    @property
    def key(self) -> tuple[Any, ...]:
        size = self.image.size if self.image is not None else None
        return (_fingerprint(self.settings), size)


@dataclass
class _Output:
    images: list[PILImage.Image]
    seeds: list[int]
    blocked: list[str | None]  # why each image is unusable ("nsfw", "black"), or None
    batch_images: int  # images in the pipeline call that made these
    latency_s: float
    settings: GenerationSettings = field(default_factory=GenerationSettings)


class _OutOfMemory(Exception):
    """The accelerator ran out of memory (the batcher retries smaller batches)."""


# --------------------------------------------------------------------------- the tools


class _DiffusersBackend(Tool, abstract=True):
    """Loading, configuration, batching and calling shared by the diffusers tools."""

    default_family: ClassVar[Family | None] = None
    _edit: ClassVar[bool] = False
    max_images_per_call: ClassVar[int] = 64

    def __init__(
        self,
        model: str | os.PathLike[str] | Any | None = None,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        offload: Offload | None = None,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
        lora: str | Lora | Sequence[str | Lora] | None = None,
        lora_scale: float | None = None,
        fuse_lora: bool | None = None,
        scheduler: str | Any | None = None,
        scheduler_kwargs: Mapping[str, Any] | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        true_cfg: float | None = None,
        negative_prompt: str | None = None,
        max_sequence_length: int | None = None,
        call_kwargs: Mapping[str, Any] | None = None,
        max_batch_size: int = 4,
        max_wait_s: float = 0.02,
        pipeline_class: str | type | None = None,
        revision: str | None = None,
        variant: str | None = None,
        pipeline_kwargs: Mapping[str, Any] | None = None,
        generator_device: str = "cpu",
        check_blank: bool = True,
        progress: bool | None = None,
        family: Family | None = None,
    ) -> None:
        family = family or self.default_family
        self.family = family
        if model is None:
            if family is None:
                raise ConfigurationError(
                    f"{type(self).__name__} needs a model: a Hugging Face id, a local folder, "
                    "or a diffusers pipeline instance"
                )
            model = family.model
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, str) and not callable(model):
            raise ConfigurationError(
                f"model must be a model id, a folder or a diffusers pipeline, got "
                f"{type(model).__name__}"
            )
        self._given = None if isinstance(model, str) else model
        self.model = model if isinstance(model, str) else _pipeline_source(model)
        self.device = device
        self.dtype = dtype
        if offload not in (None, "model", "sequential"):
            raise ConfigurationError(
                f"offload must be None, 'model' or 'sequential', got {offload!r}"
            )
        self.offload: Offload | None = offload
        self.vae_slicing = vae_slicing
        self.vae_tiling = vae_tiling
        self.loras = _loras(lora, lora_scale, family)
        self.fuse_lora = fuse_lora if fuse_lora is not None else bool(family and family.fuse_lora)
        self.scheduler = scheduler
        self.scheduler_kwargs = dict(scheduler_kwargs or {})
        if max_batch_size < 1:
            raise ConfigurationError(f"max_batch_size must be >= 1, got {max_batch_size}")
        base = GenerationSettings(
            width=family.width if family else None,
            height=family.height if family else None,
            steps=family.steps if family else None,
            guidance=family.guidance if family else None,
            true_cfg=family.true_cfg if family else None,
            negative_prompt=family.negative_prompt if family else None,
            max_sequence_length=family.max_sequence_length if family else None,
        )
        self.settings = base.replace(
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            true_cfg=true_cfg,
            negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length,
            extra=tuple(sorted((call_kwargs or {}).items())),
        )
        self._check_settings(self.settings)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.pipeline_class = pipeline_class
        self.revision = revision
        self.variant = variant
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.generator_device = generator_device
        self.check_blank = check_blank
        self.progress = progress
        self.pipe: Any = None
        self._batcher: MicroBatcher[_Request, _Output] | None = None
        self._lock = threading.RLock()
        self._call_params: frozenset[str] = frozenset()
        self._placed: dict[str, str] = {}
        self._given_configured = False  # a given pipeline already has our LoRA and scheduler

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Load the pipeline (unless one was given) and apply the settings.

        The scheduler, LoRA adapters, device or offload, and VAE slicing and tiling, in that
        order. Calling it again does nothing (call it yourself to load before the first run).

        Raises:
            ConfigurationError: If the extra is missing, or a setting does not fit the pipeline.
            ToolUnavailable: If the weights cannot be loaded (with what to try).
        """
        with self._lock:
            if self.pipe is None:
                self._setup()
        self._start_batcher()

    def _setup(self) -> None:
        _require_diffusers()
        from genagent._torch import pick_device, pick_dtype

        device = pick_device(self.device)
        if self.offload is not None and not device.startswith(("cuda", "xpu")):
            raise ConfigurationError(
                f"offload={self.offload!r} moves weights between CPU memory and a GPU; it needs "
                f"a CUDA device, but the device is {device!r}. Drop offload= on this machine."
            )
        import torch

        try:
            torch.Generator(device=self.generator_device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigurationError(
                f"generator_device={self.generator_device!r} is not usable here ({exc}); use "
                "'cpu' (the default: the same image for a seed on every device)"
            ) from exc
        mps_dtype = _torch_dtype(self.family.mps_dtype) if self.family else None
        dtype = pick_dtype(self.dtype, device, mps=mps_dtype)
        if self._given is None:
            import diffusers

            # a setting the pipeline does not take fails before a long download or load
            cls = self._resolve_pipeline_class(diffusers)
            if cls is diffusers.DiffusionPipeline:
                cls = _class_from_index(self.model, diffusers) or cls
            self._check_call(self.settings, _call_parameters(cls), cls.__name__)
            pipe = self._load(dtype)
        else:
            pipe = self._given
        params = _call_parameters(type(pipe))
        self._check_call(self.settings, params, type(pipe).__name__)
        self._configure(pipe, device, dtype)
        self._call_params = params
        self._placed = {
            "device": str(getattr(pipe, "device", device)),
            "dtype": str(getattr(pipe, "dtype", dtype)).removeprefix("torch."),
        }
        self.pipe = pipe

    def _start_batcher(self) -> MicroBatcher[_Request, _Output]:
        with self._lock:
            if self._batcher is None:
                self._batcher = MicroBatcher(
                    self._process,
                    key=lambda r: r.key,
                    size=lambda r: len(r.seeds),
                    max_batch_size=self.max_batch_size,
                    max_wait_s=self.max_wait_s,
                    name=f"genagent-{self.name}",
                )
            return self._batcher

    def _load(self, dtype: torch.dtype | None) -> Any:
        import diffusers

        cls = self._resolve_pipeline_class(diffusers)
        kwargs: dict[str, Any] = {_dtype_argument(diffusers): dtype, **self.pipeline_kwargs}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.variant is not None:
            kwargs["variant"] = self.variant
        _import_genagent_components(self.model)
        start = time.perf_counter()
        try:
            pipe = cls.from_pretrained(self.model, **kwargs)
        except GenAgentError:
            raise
        except Exception as exc:
            raise _load_error(self.model, exc) from exc
        logger.info("loaded %s from %s in %.1f s", type(pipe).__name__, self.model, _since(start))
        return pipe

    def _resolve_pipeline_class(self, diffusers: Any) -> Any:
        wanted = self.pipeline_class or (self.family.pipeline if self.family else None)
        if wanted is None:
            return diffusers.DiffusionPipeline
        if not isinstance(wanted, str):
            return wanted
        cls = getattr(diffusers, wanted, None)
        if cls is None:
            needs = self.family.min_diffusers if self.family else "a newer version"
            raise ConfigurationError(
                f"the installed diffusers {diffusers.__version__} has no {wanted}; it needs "
                f"diffusers>={needs}: `pip install -U diffusers`"
            )
        return cls

    def _configure(self, pipe: Any, device: str, dtype: torch.dtype | None) -> None:
        import torch

        if not (self._given is not None and self._given_configured):
            if self.scheduler is not None or self.scheduler_kwargs:
                pipe.scheduler = self._make_scheduler(pipe)
            if self.loras:
                self._load_loras(pipe)
            if self._given is not None:
                self._given_configured = True  # never twice: not after pickling, not on retry
        for component in getattr(pipe, "components", {}).values():
            if isinstance(component, torch.nn.Module):
                component.eval()  # modules built from configs start in training mode
        # a given pipeline stays where it is unless device= or a dtype is asked for
        cast_to = dtype if self._given is not None and self.dtype not in (None, "auto") else None
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        elif self._given is None or self.device is not None or cast_to is not None:
            try:
                if cast_to is not None:
                    pipe.to(device, cast_to) if self.device is not None else pipe.to(cast_to)
                else:
                    pipe.to(device)
            except Exception as exc:
                raise ToolUnavailable(
                    f"cannot move {self.model} to {device}: {type(exc).__name__}: {exc}. Try "
                    "offload='model' (about a third of the GPU memory), a smaller dtype, or "
                    "another device."
                ) from exc
        vae = getattr(pipe, "vae", None)
        for enabled, method in ((self.vae_slicing, "slicing"), (self.vae_tiling, "tiling")):
            if not enabled:
                continue
            target = vae if vae is not None and hasattr(vae, f"enable_{method}") else pipe
            switch = getattr(target, f"enable_{method}", None)
            if switch is None:
                raise ConfigurationError(f"{type(pipe).__name__} has no VAE {method}")
            switch()
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # genagent draws its own

    def _make_scheduler(self, pipe: Any) -> Any:
        import diffusers

        if self.scheduler is None:  # only scheduler_kwargs: the same class, reconfigured
            return type(pipe.scheduler).from_config(pipe.scheduler.config, **self.scheduler_kwargs)
        if not isinstance(self.scheduler, str):
            return self.scheduler
        cls = getattr(diffusers, self.scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            compatible = [c.__name__ for c in getattr(pipe.scheduler, "compatibles", [])]
            raise ConfigurationError(
                f"unknown scheduler {self.scheduler!r}; schedulers compatible with "
                f"{type(pipe).__name__}: {', '.join(sorted(compatible)) or 'see diffusers'}"
            )
        return cls.from_config(pipe.scheduler.config, **self.scheduler_kwargs)

    def _load_loras(self, pipe: Any) -> None:
        if not hasattr(pipe, "load_lora_weights"):
            raise ConfigurationError(f"{type(pipe).__name__} cannot load LoRA adapters")
        names = []
        loaded = {n for ns in _adapters(pipe).values() for n in ns}
        for i, spec in enumerate(self.loras):
            name = spec.adapter_name or f"lora_{i}"
            names.append(name)
            if name in loaded:
                continue  # a retried set-up: it is there already
            kwargs = {"adapter_name": name}
            if spec.weight_name is not None:
                kwargs["weight_name"] = spec.weight_name
            try:
                pipe.load_lora_weights(spec.source, **kwargs)
            except Exception as exc:
                if "peft" in str(exc).lower() and "backend" in str(exc).lower():
                    raise ConfigurationError(
                        "loading a LoRA needs peft: `pip install 'genagent[diffusers]'` "
                        "(or `pip install peft`)"
                    ) from exc
                raise _load_error(spec.source, exc, what="the LoRA") from exc
        pipe.set_adapters(names, adapter_weights=[spec.scale for spec in self.loras])
        if self.fuse_lora:
            pipe.fuse_lora(adapter_names=names)
            pipe.unload_lora_weights()

    # ------------------------------------------------------------------ calling

    async def _generate(
        self,
        prompt: str,
        seeds: Sequence[int],
        settings: GenerationSettings,
        *,
        image: PILImage.Image | None = None,
        ctx: ToolContext | None = None,
    ) -> list[_Output]:
        """Submit one prompt's images (split by ``max_batch_size``) and await them."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigurationError(f"the prompt must be non-empty text, got {prompt!r}")
        bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
        if bad or any(s >= 2**63 for s in seeds):
            raise ConfigurationError(
                f"seeds must be non-negative ints below 2**63, got {list(seeds)!r}"
            )
        await cast("Tool", self).ensure_setup()
        if settings is not self.settings:
            self._check_call(settings, self._call_params, type(self.pipe).__name__)
        requests = [
            _Request(prompt, list(seeds[i : i + self.max_batch_size]), settings, image, ctx)
            for i in range(0, len(seeds), self.max_batch_size)
        ]
        tasks = [asyncio.ensure_future(self._submit(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for request in requests:
                request.cancelled.set()  # stop the denoising of what still runs
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _submit(self, request: _Request) -> _Output:
        for _ in range(2):
            try:
                return await self._start_batcher().asubmit(request)
            except RuntimeError as exc:
                if "is closed" not in str(exc):
                    raise
                # close() swapped the batcher after we took it: the next one serves this call
        raise ToolUnavailable(f"{self.name} was closed while a call was submitted")

    def _process(self, requests: list[_Request]) -> list[_Output | BaseException]:
        """Run one batch on the batcher's thread (OOM: retried smaller)."""
        try:
            return self._call_pipeline(requests)
        except _OutOfMemory as exc:
            reason = str(exc)
        # out of memory; retried outside the except block, so that nothing of the failed
        # call (its traceback holds activations) stays alive while the smaller calls run
        _empty_cache()
        images = sum(len(r.seeds) for r in requests)
        if len(requests) > 1:
            raise _OutOfMemory(reason)  # the batcher runs the requests one at a time
        if images > 1:
            logger.warning("out of memory with %d images; generating them one by one", images)
            request = requests[0]
            parts: list[_Output] = []
            for seed in request.seeds:
                part = self._process([dataclasses.replace(request, seeds=[seed])])[0]
                if isinstance(part, BaseException):
                    return [part]
                parts.append(part)
            return [_join(parts)]
        settings = requests[0].settings
        raise ToolUnavailable(
            f"out of memory generating one {settings.width or '?'}x{settings.height or '?'} "
            f"image with {type(self.pipe).__name__} ({reason}). Try offload='model' (or "
            "'sequential' on small cards), vae_tiling=True, a smaller width/height, or "
            "dtype='bfloat16'."
        )

    def _call_pipeline(self, requests: list[_Request]) -> list[_Output | BaseException]:
        import torch

        from genagent._progress import progress_bar

        pipe = self.pipe
        settings = requests[0].settings
        prompts = [r.prompt for r in requests for _ in r.seeds]
        seeds = [s for r in requests for s in r.seeds]
        kwargs = settings.call_kwargs()  # checked against the pipeline at set-up / submission
        kwargs["prompt"] = prompts
        if settings.negative_prompt is not None:
            kwargs["negative_prompt"] = [settings.negative_prompt] * len(prompts)
        if self._edit:
            kwargs["image"] = [r.image for r in requests for _ in r.seeds]
        kwargs["generator"] = [
            torch.Generator(device=self.generator_device).manual_seed(s) for s in seeds
        ]
        kwargs["output_type"] = "pil"
        total = settings.steps or _default_steps(pipe)
        can_interrupt = hasattr(type(pipe), "interrupt")
        enabled = self.progress if self.progress is not None else sys.stderr.isatty()
        label = f"{self.name}: {len(seeds)} image{'s' if len(seeds) != 1 else ''}"
        start = time.perf_counter()
        with progress_bar(total or 0, label, enabled=enabled) as advance:

            def on_step(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
                advance()
                for request in requests:
                    if request.done:
                        continue
                    if request.cancelled.is_set():
                        request.done = True
                        continue
                    if request.ctx is None:
                        continue
                    try:
                        request.ctx.check_budget()
                        request.ctx.report_progress(
                            step + 1, total, tool=self.name, batch_images=len(seeds)
                        )
                    except BaseException as exc:  # a spent budget or a failing hook
                        request.error, request.done = exc, True
                if can_interrupt and all(r.done for r in requests):
                    pipeline._interrupt = True  # the documented way to stop early
                return tensors

            if _accepts(self._call_params, "callback_on_step_end"):
                kwargs["callback_on_step_end"] = on_step
            oom: str | None = None
            try:
                with _pipeline_lock(pipe), torch.inference_mode():  # one call at a time per pipe
                    output = pipe(**kwargs)
            except Exception as exc:
                if not _is_oom(exc):
                    raise ToolUnavailable(
                        f"{type(pipe).__name__} failed: {type(exc).__name__}: {exc}"
                    ) from exc
                oom = str(exc).splitlines()[0][:200]
            if oom is not None:  # raised outside the except block: see _process
                raise _OutOfMemory(oom)
        latency = _since(start)
        images = list(output.images)
        if len(images) != len(seeds):
            raise ToolUnavailable(
                f"{type(pipe).__name__} returned {len(images)} images for {len(seeds)} requested"
            )
        nsfw = getattr(output, "nsfw_content_detected", None)
        results: list[_Output | BaseException] = []
        at = 0
        for request in requests:
            n = len(request.seeds)
            if request.error is not None:
                results.append(request.error)
            elif request.cancelled.is_set():
                results.append(BudgetExceeded("the call was cancelled"))
            else:
                part = images[at : at + n]
                blocked = [
                    "nsfw"
                    if nsfw is not None and bool(nsfw[at + i])
                    else ("black" if self.check_blank and _is_black(img) else None)
                    for i, img in enumerate(part)
                ]
                results.append(
                    _Output(part, list(request.seeds), blocked, len(seeds), latency, settings)
                )
            at += n
        return results

    def _settings_with(self, overrides: Mapping[str, Any]) -> GenerationSettings:
        if not overrides:
            return self.settings
        fields = {f.name for f in dataclasses.fields(GenerationSettings)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigurationError(f"unknown settings {unknown}; choose from {sorted(fields)}")
        extra = overrides.get("extra")
        if extra is not None and isinstance(extra, Mapping):
            overrides = {**overrides, "extra": tuple(sorted(extra.items()))}
        settings = self.settings.replace(**overrides)
        self._check_settings(settings)
        return settings

    def _check_settings(self, settings: GenerationSettings) -> None:
        """Checks that need no pipeline: sizes, steps, the negative prompt, reserved names."""
        for label, value in (("width", settings.width), ("height", settings.height)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 8
            ):
                raise ConfigurationError(f"{label} must be an int of pixels >= 8, got {value!r}")
        steps = settings.steps
        if steps is not None and (
            not isinstance(steps, int) or isinstance(steps, bool) or steps < 1
        ):
            raise ConfigurationError(f"steps must be a positive int, got {steps!r}")
        family = self.family
        if (
            settings.negative_prompt is not None
            and family is not None
            and not family.supports_negative_prompt
            and not (settings.true_cfg is not None and settings.true_cfg > 1)
        ):
            raise ConfigurationError(
                f"{family.name} ignores a negative prompt unless true classifier-free guidance "
                "is on: pass true_cfg=... (> 1) with it (each step then runs twice)"
            )
        reserved = sorted(dict(settings.extra).keys() & _RESERVED_CALL_KWARGS)
        if reserved:
            raise ConfigurationError(
                f"call_kwargs may not set {', '.join(reserved)}: the tool sets them per call "
                "(size, steps, guidance and the negative prompt have arguments of their own)"
            )

    def _check_call(self, settings: GenerationSettings, params: frozenset[str], name: str) -> None:
        """Every setting must be an argument of the pipeline: nothing is silently dropped."""
        wanted = set(settings.call_kwargs())
        if settings.negative_prompt is not None:
            wanted.add("negative_prompt")
        unknown = sorted(k for k in wanted if params and k not in params)
        if unknown:
            hint = (
                f" ({type(self).__name__} is for {self.family.pipeline}; is this the right "
                "tool for these weights?)"
                if self.family is not None and self.family.pipeline != name
                else ""
            )
            raise ConfigurationError(
                f"{name} takes no {', '.join(unknown)}; remove "
                f"{'it' if len(unknown) == 1 else 'them'} from the tool's settings{hint}"
            )

    # ------------------------------------------------------------------ results

    def _result(self, outputs: list[_Output], ctx: ToolContext | None) -> ToolResult:
        joined = _join(outputs)
        kept = [i for i, why in enumerate(joined.blocked) if why is None]
        reasons = sorted({why for why in joined.blocked if why is not None})
        if not kept:
            raise ToolRefused(
                f"the generator returned {_blocked_text(reasons, len(joined.images))}",
                hint="Describe the image differently (safety filters react to some wordings), "
                "or try again.",
            )
        text = None
        if len(kept) < len(joined.images):
            dropped = len(joined.images) - len(kept)
            text = f"{dropped} of {len(joined.images)} candidates were dropped: " + (
                _blocked_text(reasons, dropped)
            )
        metadata = {
            **self._describe_call(joined),
            "seed_policy": ctx.seed_policy if ctx is not None else None,
        }
        if text is not None:
            metadata["blocked"] = [why for why in joined.blocked]
        return ToolResult(
            images=[joined.images[i] for i in kept],
            text=text,
            seeds=[joined.seeds[i] for i in kept],
            metadata=metadata,
        )

    def _describe_call(self, output: _Output) -> dict[str, Any]:
        settings = output.settings
        return {
            "model": self.model,
            "pipeline": type(self.pipe).__name__,
            "width": output.images[0].width if output.images else settings.width,
            "height": output.images[0].height if output.images else settings.height,
            "steps": settings.steps,
            "guidance": settings.guidance,
            "true_cfg": settings.true_cfg,
            "seeds": output.seeds,
            **self._placed,
            "batch_images": output.batch_images,
            "pipeline_s": round(output.latency_s, 4),
        }

    def describe(self) -> dict[str, Any]:
        """Settings recorded in trajectory metadata."""
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "family": self.family.name if self.family else None,
            "model": self.model,
            "device": self.device,
            "dtype": str(self.dtype),
            "offload": self.offload,
            "lora": [dataclasses.asdict(spec) for spec in self.loras],
            "fuse_lora": self.fuse_lora,
            "scheduler": self.scheduler
            if isinstance(self.scheduler, (str, type(None)))
            else (type(self.scheduler).__name__),
            "settings": {
                k: v for k, v in dataclasses.asdict(self.settings).items() if v not in (None, ())
            },
            "max_batch_size": self.max_batch_size,
        }

    @property
    def batcher_stats(self) -> Any:
        """Counters of the micro-batcher (``None`` before set-up)."""
        return self._batcher.stats if self._batcher is not None else None

    def close(self) -> None:
        """Stop the batching thread once queued calls are done (the pipeline stays loaded).

        A later call starts a new one.
        """
        with self._lock:
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    def __getstate__(self) -> dict[str, Any]:
        # the pipeline and the worker thread stay in this process; set-up runs again there
        state = super().__getstate__()
        for key in ("pipe", "_batcher", "_lock"):
            state.pop(key, None)
        state["_call_params"] = frozenset()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.pipe, self._batcher, self._lock = None, None, threading.RLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"


class DiffusersTool(_DiffusersBackend, GenerationTool):
    """A text-to-image tool backed by any diffusers pipeline.

    The pipeline is given as an instance, or as a model id or local folder loaded lazily (in
    ``setup()``, before the first call) through ``from_pretrained``. Candidates of one call and
    the calls of concurrent runs are generated together (micro-batching) when their settings
    match, each image with its own seeded generator.

    Args:
        model: A Hugging Face model id, a local folder (``str`` or ``Path``), or a pipeline
            instance.
        device: ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"cpu"`` (default: the best available;
            a given pipeline instance stays where it is unless ``device`` is given).
        dtype: ``"auto"`` (bf16 on GPUs that support it, fp32 on CPU), a torch dtype or its name.
            A given pipeline instance keeps its dtype under ``"auto"``.
        offload: ``"model"`` (``enable_model_cpu_offload``: whole models move to the GPU when
            used) or ``"sequential"`` (``enable_sequential_cpu_offload``: layer by layer, least
            memory, slowest). Needs a CUDA device.
        vae_slicing: Decode a batch one image at a time (less memory for large batches).
        vae_tiling: Decode large images in tiles.
        lora: LoRA adapters: a repository id, a folder or file, a :class:`Lora`, or a list.
            They replace a preset's adapters (to add to the turbo preset's, list both:
            ``[*FluxTool.presets["turbo"].lora, Lora("my/style")]``).
        lora_scale: Strength of the adapters given as strings or by the preset (default 1.0);
            a :class:`Lora` carries its own ``scale``.
        fuse_lora: Fuse the adapters into the weights (faster calls; cannot be changed later).
        scheduler: A scheduler instance, or a diffusers class name
            (``"DPMSolverMultistepScheduler"``) built from the pipeline's scheduler config.
        scheduler_kwargs: Extra arguments for that class's ``from_config``; alone, they
            reconfigure the pipeline's own scheduler (e.g. ``{"shift": 3.0}``).
        width: Image width (default: the family's).
        height: Image height.
        steps: Denoising steps.
        guidance: ``guidance_scale``.
        true_cfg: ``true_cfg_scale`` (real classifier-free guidance of FLUX and Qwen-Image).
        negative_prompt: What images should not show (families that use one).
        max_sequence_length: Text encoder length (FLUX, SD3, Qwen-Image).
        call_kwargs: Further arguments for every pipeline call.
        max_batch_size: Most images in one pipeline call.
        max_wait_s: Longest a call waits for others to share its pipeline call.
        pipeline_class: The pipeline class (or its name) to load with (default: the family's,
            else ``DiffusionPipeline``, which reads ``model_index.json``).
        revision: Branch, tag or commit of the weights.
        variant: Weights variant (``"fp16"``).
        pipeline_kwargs: Further ``from_pretrained`` arguments (``quantization_config``, ...).
        generator_device: Where seeded noise is drawn. ``"cpu"`` (default) gives the same
            image for a seed on every device.
        check_blank: Report all-black images (a safety filter, or fp16 overflow) to the model
            instead of showing them.
        progress: Draw a progress bar per pipeline call (default: when standard error is a
            terminal).
        family: Defaults of a model family (pipeline class, size, steps, guidance, ...); the
            family tools (``FluxTool``, ...) set theirs.

    Example:
        ```py
        from genagent import Agent
        from genagent.tools import DiffusersTool

        tool = DiffusersTool("stabilityai/sdxl-turbo", steps=2, guidance=0.0)
        Agent(tool=tool).run("a red cube on a blue sphere")
        ```
    """

    description: ClassVar[str] = (
        "Generate an image from a detailed caption. Returns the generated image."
    )

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Generate ``ctx.num_images`` images of ``args.caption``, one per seed in ``ctx.seeds``.

        ``ctx.settings`` (``width``, ``height``, ``steps``, ...) override the tool's settings for
        this call.
        """
        settings = self._settings_with(ctx.settings)
        outputs = await self._generate(args.caption, ctx.seeds, settings, ctx=ctx)
        return self._result(outputs, ctx)

    def generate(
        self,
        prompt: str,
        *,
        seeds: Sequence[int] = (0,),
        **settings: Any,
    ) -> list[PILImage.Image]:
        """Generate images outside an agent (thread-safe; batched with concurrent calls).

        Args:
            prompt: The caption.
            seeds: One seed per image.
            **settings: Overrides of :class:`GenerationSettings` fields for this call.

        Returns:
            The images, in the order of ``seeds`` (blocked images included).
        """
        from genagent._async import run_sync

        return run_sync(self.agenerate(prompt, seeds=seeds, **settings))

    async def agenerate(
        self,
        prompt: str,
        *,
        seeds: Sequence[int] = (0,),
        **settings: Any,
    ) -> list[PILImage.Image]:
        """Async :meth:`generate`."""
        outputs = await self._generate(prompt, list(seeds), self._settings_with(settings))
        return _join(outputs).images


class DiffusersEditTool(_DiffusersBackend, EditTool):
    """An image editing tool backed by a diffusers image-to-image or editing pipeline.

    The policy writes an ``instruction``; the tool edits the run's current image with it. It
    takes the same arguments as :class:`DiffusersTool`; ``width`` and ``height`` default to
    what the pipeline derives from the input image.
    """

    _edit: ClassVar[bool] = True
    description: ClassVar[str] = (
        "Edit the most recent image according to an instruction. Returns the edited image."
    )

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Edit ``ctx.current_image`` by ``args.instruction``, one image per seed."""
        if ctx.current_image is None:
            raise ToolRefused("there is no image to edit yet", hint="Generate an image first.")
        current = ctx.current_image
        image = await asyncio.to_thread(lambda: current.open().convert("RGB"))
        outputs = await self._generate(
            args.instruction, ctx.seeds, self._settings_with(ctx.settings), image=image, ctx=ctx
        )
        return self._result(outputs, ctx)

    def edit(
        self,
        image: PILImage.Image,
        instruction: str,
        *,
        seeds: Sequence[int] = (0,),
        **settings: Any,
    ) -> list[PILImage.Image]:
        """Edit an image outside an agent (thread-safe; batched with concurrent calls)."""
        from genagent._async import run_sync

        return run_sync(self.aedit(image, instruction, seeds=seeds, **settings))

    async def aedit(
        self,
        image: PILImage.Image,
        instruction: str,
        *,
        seeds: Sequence[int] = (0,),
        **settings: Any,
    ) -> list[PILImage.Image]:
        """Async :meth:`edit`."""
        if not hasattr(image, "convert") or not hasattr(image, "size"):
            raise ConfigurationError(f"image must be a PIL image, got {type(image).__name__}")
        outputs = await self._generate(
            instruction, list(seeds), self._settings_with(settings), image=image.convert("RGB")
        )
        return _join(outputs).images


# --------------------------------------------------------------------------- helpers


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"local generators need torch and diffusers ({exc.name} is missing): "
            "`pip install 'genagent[diffusers]'`"
        ) from exc


def _import_genagent_components(model: str) -> None:
    """Import genagent modules that a local pipeline's ``model_index.json`` names.

    diffusers records custom component classes (the test pipelines' image-only processor) by
    module path but does not import the module itself.
    """
    import importlib
    import json
    from pathlib import Path

    index = Path(model) / "model_index.json"
    try:
        entries = json.loads(index.read_text()).values() if index.is_file() else ()
    except (OSError, ValueError):
        return  # from_pretrained reports it
    for entry in entries:
        library = entry[0] if isinstance(entry, list) and entry else None
        if isinstance(library, str) and library.startswith("genagent."):
            importlib.import_module(library)


def _dtype_argument(diffusers: Any) -> str:
    """``dtype`` where diffusers has it (it deprecated ``torch_dtype``), else ``torch_dtype``."""
    utils = getattr(getattr(diffusers, "utils", None), "deprecation_utils", None)
    return "dtype" if hasattr(utils, "_resolve_dtype") else "torch_dtype"


def _torch_dtype(name: str) -> torch.dtype | None:
    import torch

    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


def _pipeline_source(pipe: Any) -> str:
    path = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return str(path) if path else f"<{type(pipe).__name__} instance>"


def _loras(
    lora: str | Lora | Sequence[str | Lora] | None, scale: float | None, family: Family | None
) -> tuple[Lora, ...]:
    """The adapters to load.

    ``lora`` replaces the preset's; ``scale`` applies to strings and to the preset's adapters
    (a ``Lora`` carries its own).
    """
    if lora is None:
        preset = family.lora if family else ()
        return tuple(
            spec if scale is None else dataclasses.replace(spec, scale=scale) for spec in preset
        )
    items = [lora] if isinstance(lora, (str, os.PathLike, Lora)) else list(lora)
    specs = []
    for item in items:
        if isinstance(item, os.PathLike):
            item = os.fspath(item)
        if isinstance(item, str):
            specs.append(Lora(item, scale=1.0 if scale is None else scale))
        elif isinstance(item, Lora):
            specs.append(item)
        else:
            raise ConfigurationError(
                f"lora must be a path, a repository id or a Lora(...), got {type(item).__name__}"
            )
    return tuple(specs)


def _call_parameters(cls: type) -> frozenset[str]:
    """The named arguments of a pipeline class's ``__call__`` (empty: unknown)."""
    try:
        parameters = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return frozenset()
    # named parameters only: SDXL's **kwargs holds deprecated callbacks, and silently dropping a
    # setting there would hide a mistake
    return frozenset(
        name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    )


def _fingerprint(settings: GenerationSettings) -> Any:
    """A batching key for settings, safe to compare even when ``extra`` holds arrays."""
    try:
        hash(settings)
        return settings
    except TypeError:
        pass
    try:
        return pickle.dumps(settings)
    except Exception:
        return ("unbatchable", object())  # equal to nothing else


def _class_from_index(model: str, diffusers: Any) -> Any:
    """The pipeline class a local folder's ``model_index.json`` names, if diffusers has it."""
    import json
    from pathlib import Path

    try:
        name = json.loads((Path(model) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return getattr(diffusers, name, None) if isinstance(name, str) else None


def _adapters(pipe: Any) -> dict[str, list[str]]:
    """Adapters loaded in the pipeline, by component (none when it cannot say)."""
    try:
        found = pipe.get_list_adapters()
    except Exception:
        return {}
    return found if isinstance(found, dict) else {}


_PIPE_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_PIPE_LOCKS_GUARD = threading.Lock()


def _pipeline_lock(pipe: Any) -> threading.Lock:
    """One lock per pipeline object: tools sharing a pipeline never run it at once."""
    with _PIPE_LOCKS_GUARD:
        try:
            lock = _PIPE_LOCKS.get(pipe)
            if lock is None:
                lock = _PIPE_LOCKS[pipe] = threading.Lock()
        except TypeError:  # not weak-referenceable: fall back to the tool's own thread
            return threading.Lock()
        return lock


def _accepts(params: frozenset[str], name: str) -> bool:
    return not params or name in params


def _default_steps(pipe: Any) -> int | None:
    try:
        default = inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default
    except (KeyError, TypeError, ValueError):
        return None
    return default if isinstance(default, int) else None


def _is_black(image: PILImage.Image) -> bool:
    extrema: Any = image.getextrema()
    if isinstance(extrema[0], tuple):
        return all(high == 0 for _, high in extrema)
    return bool(extrema[1] == 0)


def _blocked_text(reasons: list[str], count: int) -> str:
    parts = []
    if "nsfw" in reasons:
        parts.append("blocked by the pipeline's safety checker")
    if "black" in reasons:
        parts.append(
            "an all-black image (a safety filter, or a numerical overflow: load in bfloat16 or "
            "float32)"
        )
    noun = "image" if count == 1 else "images"
    return f"{count} unusable {noun}: " + "; ".join(parts)


def _join(outputs: Sequence[_Output]) -> _Output:
    if len(outputs) == 1:
        return outputs[0]
    return _Output(
        images=[i for o in outputs for i in o.images],
        seeds=[s for o in outputs for s in o.seeds],
        blocked=[b for o in outputs for b in o.blocked],
        batch_images=max((o.batch_images for o in outputs), default=0),
        latency_s=sum(o.latency_s for o in outputs),
        settings=outputs[0].settings if outputs else GenerationSettings(),
    )


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and "out of memory" in text


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if (
        mps is not None
        and getattr(torch.backends, "mps", None)
        and torch.backends.mps.is_available()
    ):
        mps.empty_cache()


def _load_error(source: str, exc: BaseException, what: str = "the pipeline") -> ToolUnavailable:
    """A loading failure as a ``ToolUnavailable`` that says what to try."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    kinds = {type(e).__name__ for e in chain}
    full = " ".join(str(e) for e in chain).lower()
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    if "GatedRepoError" in kinds or "gated" in full:
        advice = (
            f"{source} is gated: accept its licence on https://huggingface.co/{source}, then run "
            "`huggingface-cli login` (or set HF_TOKEN)"
        )
    elif kinds & {"RepositoryNotFoundError", "RevisionNotFoundError"}:
        advice = (
            f"no such repository or revision: check the id {source!r}; for a private "
            "repository run `huggingface-cli login`"
        )
    elif (
        kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}
        or "not fully cached" in full
        or "outgoing traffic has been disabled" in full
    ):
        advice = (
            "the weights are not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE "
            "set, or no network): download them first (`huggingface-cli download ...`) or pass a "
            "local folder"
        )
    elif kinds & {"ImportError", "ModuleNotFoundError"}:
        missing = next(
            (getattr(e, "name", None) for e in chain if isinstance(e, ImportError)), None
        )
        advice = (
            f"a component needs a package that is not installed ({missing or 'see above'}): "
            "install it and try again"
        )
    elif (
        "SafetensorError" in kinds
        or "unable to load weights from checkpoint" in full
        or "header too large" in full
        or "incomplete metadata" in full
    ):
        advice = "a weights file is corrupt or incomplete: delete it and download it again"
    elif "JSONDecodeError" in kinds:
        advice = "a config file (model_index.json or a component's config) is not valid JSON"
    elif "already in use" in full:
        advice = (
            "the pipeline already has an adapter of that name (a pipeline instance set up "
            "twice?): give the Lora an adapter_name of its own"
        )
    else:
        advice = (
            "check the id or folder (a folder needs a model_index.json); for gated weights run "
            "`huggingface-cli login`; offline, pass a local folder"
        )
    return ToolUnavailable(
        f"cannot load {what} {source!r}: {type(exc).__name__}: {first}. {advice}"
    )


def _since(start: float) -> float:
    return time.perf_counter() - start
