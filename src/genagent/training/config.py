"""Training configurations: :class:`TrainConfig` (shared by the trainers) and :class:`SFTConfig`.

A configuration is a pydantic model, built in Python or read from a ``.toml``, ``.yaml`` /
``.yml`` (needs PyYAML) or ``.json`` file with :meth:`TrainConfig.from_file`. Unknown keys are
errors that name the key; relative paths in a file are relative to the file's folder;
``overrides`` (``["lora.r=8", "lr=1e-4"]``, the CLI's ``--set``) are applied before validation.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from genagent.errors import ConfigurationError

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LoRAConfig",
    "SFTConfig",
    "SFTFilter",
    "TrainConfig",
    "load_config_dict",
]

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Qwen2 / Qwen2.5-VL language model's attention and MLP projections."""

C = TypeVar("C", bound="TrainConfig")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoRAConfig(_Strict):
    """A LoRA adapter (peft) on the language model.

    Attributes:
        r: Rank.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter's input.
        target_modules: Names of the linear layers that get an adapter (last name component).
            The vision tower never gets one unless ``TrainConfig.train_vision`` is set.
    """

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


class TrainConfig(_Strict):
    """What every trainer shares: the model, optimisation, precision, checkpoints and logging.

    Attributes:
        model: A Hugging Face model id or a local folder (loaded through transformers'
            ``from_pretrained``).
        output_dir: Where checkpoints (``checkpoints/step-N``), the final model (``final``) and
            the metrics (``metrics.jsonl``) go.
        revision: Branch, tag or commit of ``model``.
        trust_remote_code: Allow the checkpoint's own modelling code.
        lora: A LoRA adapter to train, or ``None`` for full fine-tuning.
        train_vision: Also train the vision tower (frozen by default).
        dtype: Dtype of the weights. ``"float32"`` keeps fp32 master weights (mixed precision
            then computes in bf16); ``"bfloat16"`` trains in pure bf16 (less memory).
        mixed_precision: ``"auto"``: bf16 autocast on CUDA GPUs that support it, none elsewhere
            (fp32 on CPU); or ``"no"``, ``"bf16"``, ``"fp16"`` (with loss scaling).
        attn_implementation: ``"sdpa"``, ``"eager"``, or ``"genagent_varlen"`` (the fused
            packed-attention kernel when it can be used, else ``"sdpa"``).
        gradient_checkpointing: Recompute activations in the backward pass (less memory).
        max_tokens: Token budget of one packed micro-batch.
        grad_accum: Micro-batches per optimizer step (per process).
        epochs: Passes over the data (ignored when ``max_steps`` is set).
        max_steps: Optimizer steps in all (overrides ``epochs``).
        lr: Peak learning rate.
        schedule: Shape of the learning rate after warm-up.
        warmup_steps: Linear warm-up from 0 to ``lr``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` (cosine and linear).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        eps: AdamW epsilon.
        max_grad_norm: Clip the gradient norm to this (``None``: no clipping).
        seed: Seeds python, numpy and torch; also the data order (``seed + epoch``).
        save_every: Write a checkpoint every this many steps (``None``: only the final save).
        keep_last: Checkpoints kept (older ones are deleted).
        log_every: A console line and a metrics record every this many steps.
        resume_from: A checkpoint folder, ``"latest"`` (the newest complete checkpoint in
            ``output_dir``, if any), or ``None`` to start afresh.
        tensorboard: Also log to TensorBoard when it is installed.
        wandb_project: Also log to Weights & Biases (when installed) under this project.
        run_name: Name of the run for TensorBoard and W&B.
    """

    model: str
    output_dir: Path
    revision: str | None = None
    trust_remote_code: bool = False
    lora: LoRAConfig | None = Field(default_factory=LoRAConfig)
    train_vision: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    max_tokens: int = Field(4096, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    save_every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    resume_from: str | None = None
    tensorboard: bool = True
    wandb_project: str | None = None
    run_name: str | None = None

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_relative_to_file(cls, value: Any, info: ValidationInfo) -> Any:
        return _relative(value, info)

    @field_validator("model", mode="before")
    @classmethod
    def _model_folder_relative_to_file(cls, value: Any, info: ValidationInfo) -> Any:
        # a model id ("Qwen/Qwen2.5-VL-3B-Instruct") stays as it is; a folder next to the file
        # is made absolute
        base = _base_dir(info)
        if isinstance(value, str) and base is not None and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists():
                return str(candidate)
        return value

    @field_validator("resume_from", mode="before")
    @classmethod
    def _resume_relative_to_file(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or value == "latest":
            return value
        return str(_relative(value, info))

    @classmethod
    def from_file(cls: type[C], path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> C:
        """Read a configuration file, apply ``KEY=VALUE`` overrides, and validate it.

        Args:
            path: A ``.toml``, ``.yaml`` / ``.yml`` or ``.json`` file.
            overrides: ``"key=value"`` strings; dotted keys reach into sections
                (``"lora.r=8"``); values are parsed as JSON when they can be (``1e-4``,
                ``true``, ``null``, ``["a"]``), else taken as text.

        Raises:
            ConfigurationError: If the file cannot be read, has an unknown key or an invalid
                value (the key is named).
        """
        file = Path(path)
        data = load_config_dict(file)
        apply_overrides(data, overrides)
        return cls.from_dict(data, base_dir=file.resolve().parent, source=str(file))

    @classmethod
    def from_dict(
        cls: type[C],
        data: dict[str, Any],
        *,
        base_dir: str | os.PathLike[str] | None = None,
        source: str = "the configuration",
    ) -> C:
        """Validate a mapping; relative paths are taken relative to ``base_dir`` when given.

        Raises:
            ConfigurationError: On an unknown key or an invalid value (the key is named).
        """
        context = {"base_dir": Path(base_dir) if base_dir is not None else None}
        try:
            return cls.model_validate(data, context=context)
        except ValidationError as exc:
            raise ConfigurationError(_explain(exc, cls, source)) from None


class SFTFilter(_Strict):
    """Which saved trajectories to train on (rejection-sampling SFT).

    Attributes:
        min_reward: Keep trajectories whose reward is at least this (those without a score are
            dropped).
        reward: Name of the reward in ``Trajectory.rewards`` to compare (default: the only one;
            an error when a trajectory has several).
        termination: Keep trajectories that ended this way (e.g. ``["answered"]``).
    """

    min_reward: float | None = None
    reward: str | None = None
    termination: list[str] | None = None


class SFTConfig(TrainConfig):
    """Supervised fine-tuning: assistant-only loss on saved trajectories or chat conversations.

    Attributes:
        trajectories: Glob patterns of saved trajectory folders (a folder without
            ``trajectory.json`` is searched recursively).
        messages_jsonl: JSONL files, one conversation per line:
            ``{"messages": [OpenAI-style messages; images as paths relative to the file]}``.
        filter: Which trajectories to keep.
        split_on_breaks: Start a new row where a trajectory's token ids do not continue the
            previous turn's (see ``Trajectory.token_prefix_breaks``).
        use_token_ids: Train on the token ids saved with a trajectory when it has them (else
            its messages are tokenised with the processor's chat template).
    """

    trajectories: list[str] = Field(default_factory=list)
    messages_jsonl: list[str] = Field(default_factory=list)
    filter: SFTFilter = Field(default_factory=SFTFilter)
    split_on_breaks: bool = True
    use_token_ids: bool = True

    @field_validator("trajectories", "messages_jsonl", mode="before")
    @classmethod
    def _paths_relative_to_file(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        if isinstance(value, list):
            return [str(_relative(v, info)) for v in value]
        return value


# --------------------------------------------------------------------------- helpers


def _base_dir(info: ValidationInfo) -> Path | None:
    context = info.context or {}
    base = context.get("base_dir")
    return Path(base) if base is not None else None


def _relative(value: Any, info: ValidationInfo) -> Any:
    base = _base_dir(info)
    if base is None or not isinstance(value, (str, os.PathLike)):
        return value
    path = Path(os.fspath(value)).expanduser()
    return path if path.is_absolute() else base / path


def load_config_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.toml``, ``.yaml`` / ``.yml`` or ``.json`` file into a dict.

    Raises:
        ConfigurationError: If the file is missing, of another kind, or not a mapping.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the configuration {file}: {exc.strerror or exc}"
        ) from None
    data: Any
    try:
        if suffix == ".toml":
            data = _toml_loads(text, file)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore[import-untyped,unused-ignore]
            except ImportError:
                raise ConfigurationError(
                    f"{file} is YAML, which needs PyYAML: `pip install pyyaml`, or write the "
                    "configuration as .toml or .json"
                ) from None
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigurationError(
                f"{file}: unknown configuration format {suffix!r}; use .toml, .yaml, .yml or .json"
            )
    except ConfigurationError:
        raise
    except Exception as exc:  # TOMLDecodeError, YAMLError, JSONDecodeError
        raise ConfigurationError(f"cannot parse {file}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"{file} must hold a mapping of keys to values at the top level")
    return data


def _toml_loads(text: str, file: Path) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads(text)
    try:  # Python 3.10
        import tomli  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigurationError(
            f"{file} is TOML, which Python 3.10 reads with tomli: `pip install tomli`, or write "
            "the configuration as .json"
        ) from None
    return tomli.loads(text)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``"a.b=value"`` overrides to ``data`` in place (and return it).

    Raises:
        ConfigurationError: If an override is not ``KEY=VALUE``.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigurationError(f"an override takes KEY=VALUE (e.g. lr=1e-4), got {item!r}")
        value: Any
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        target = data
        *parents, last = key.split(".")
        for part in parents:
            child = target.get(part)
            if not isinstance(child, dict):
                child = {}
                target[part] = child
            target = child
        target[last] = value
    return data


def _explain(exc: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines: list[str] = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields))
            lines.append(
                f"unknown key {key!r} in {source} (a typo? the keys of {cls.__name__} are: {known})"
            )
        elif error["type"] == "missing":
            lines.append(f"{source} is missing the required key {key!r}")
        else:
            lines.append(f"invalid value for {key!r} in {source}: {error['msg']}")
    return "; ".join(lines)
