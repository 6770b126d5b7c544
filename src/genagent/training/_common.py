"""Trainer machinery shared by the SFT and RL trainers (private).

* loading a model and processor through transformers' ``from_pretrained`` (a folder or an id),
  LoRA through peft (language model only unless asked), a frozen vision tower, gradient
  checkpointing;
* AdamW with warm-up and a cosine / linear / constant schedule;
* :class:`Runtime`: an ``accelerate.Accelerator`` when accelerate is installed (so the same code
  runs in one process or under ``accelerate launch`` with DDP / FSDP), else plain torch;
* :class:`Trainer`: one optimizer step over several packed micro-batches with token-level loss
  normalisation, atomic checkpoints that resume exactly, metrics logging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genagent.errors import ConfigurationError
from genagent.training.config import TrainConfig

__all__ = [
    "CHECKPOINT_PATTERN",
    "MetricsLogger",
    "Runtime",
    "StepResult",
    "Trainer",
    "apply_lora",
    "build_optimizer",
    "build_scheduler",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_model_and_processor",
    "restore_rng_state",
    "rng_state",
    "seed_everything",
]

logger = logging.getLogger("genagent.training")

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
"""Names of complete checkpoint folders under ``output_dir/checkpoints``."""

STATE_FILE = "trainer_state.json"  # written last: a folder without it is not a checkpoint
MODEL_DIR = "model"
_VISION_NAMES = ("visual", "vision_tower", "vision_model")

LossFn = Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]]
"""``fn(model, micro_batch) -> (summed loss, number of trained tokens)``."""


# --------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The random states of python, numpy and torch (CPU and CUDA), for a checkpoint."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- models


def _resolve_attention(name: str, device: str) -> Any:
    if name not in ("genagent_varlen", "fused"):
        return name
    from genagent import kernels

    if not kernels.is_available(device if device.startswith("cuda") else "cpu"):
        logger.info("the fused attention kernels cannot run on %s; using sdpa", device)
        return "sdpa"
    from genagent.kernels.hf import register

    return register()


def load_model_and_processor(
    model: str,
    *,
    device: str,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    trust_remote_code: bool = False,
    processor_from: str | None = None,
) -> tuple[Any, Any]:
    """Load a model and its processor through transformers' own loading path.

    ``AutoModelForImageTextToText`` (``AutoModelForCausalLM`` for text-only models), and the
    processor as :class:`~genagent.policies.transformers.TransformersPolicy` loads it (an
    image-only Qwen-VL processor where torchvision is missing).

    Args:
        model: A model id or a folder.
        device: Where to put it.
        dtype: Name of the weights' dtype.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"genagent_varlen"``, ...
        revision: Branch, tag or commit.
        trust_remote_code: Allow the checkpoint's own code.
        processor_from: Load the processor from here instead of ``model``.

    Raises:
        ConfigurationError: If the checkpoint cannot be loaded (with what to try).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from genagent.policies.transformers import _load_processor

    attention = _resolve_attention(attn_implementation, device)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    kwargs: dict[str, Any] = {
        **common,
        "dtype": getattr(torch, dtype),
        "attn_implementation": attention,
    }
    auto_vl: Any = AutoModelForImageTextToText
    auto_lm: Any = AutoModelForCausalLM
    try:
        try:
            loaded = auto_vl.from_pretrained(model, **kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
            loaded = auto_lm.from_pretrained(model, **kwargs)
        processor = _load_processor(processor_from or model, None, common, loaded.config)
    except ConfigurationError:
        raise
    except Exception as exc:  # OSError, ValueError, SafetensorError, ... from the loaders
        raise ConfigurationError(
            f"cannot load the model {model!r}: {type(exc).__name__}: {exc}. Check `model` in "
            "the configuration (a Hugging Face id or a folder saved with save_pretrained)."
        ) from exc
    if attention != attn_implementation and attention != "sdpa":
        from genagent.kernels.hf import enable_fused_attention

        enable_fused_attention(loaded, attention)
    return loaded.to(device), processor


def _is_vision(name: str) -> bool:
    return any(part in _VISION_NAMES for part in name.split("."))


def lora_target_pattern(target_modules: Sequence[str], *, include_vision: bool) -> str:
    """The peft ``target_modules`` regex: these layer names, outside the vision tower."""
    names = "|".join(re.escape(t) for t in target_modules)
    if include_vision:
        return rf"^(?:.*\.)?(?:{names})$"
    vision = "|".join(_VISION_NAMES)
    return rf"^(?!(?:.*\.)?(?:{vision})\.)(?:.*\.)?(?:{names})$"


def apply_lora(model: Any, config: TrainConfig) -> Any:
    """Freeze what is not trained; wrap in a peft LoRA model when ``config.lora`` is set.

    Raises:
        ConfigurationError: If peft is missing, or no layer matches the target modules.
    """
    if config.lora is None:
        for name, param in model.named_parameters():
            param.requires_grad_(config.train_vision or not _is_vision(name))
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigurationError(
            "LoRA needs peft: `pip install 'genagent[train]'` (or set lora = null in the "
            "configuration for full fine-tuning)"
        ) from None
    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_pattern(lora.target_modules, include_vision=config.train_vision),
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ConfigurationError(
            f"LoRA: {exc}. Set lora.target_modules to names of linear layers of this model "
            f"(default: {list(lora.target_modules)})"
        ) from None
    return wrapped


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (non-reentrant: works with frozen inputs)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False


# --------------------------------------------------------------------------- optimisation


def build_optimizer(model: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norms get no weight decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    if not decay and not no_decay:
        raise ConfigurationError(
            "no trainable parameters: check lora.target_modules, or train_vision / lora"
        )
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.eps
    )


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """The learning rate multiplier before optimizer step ``step + 1`` (0-based ``step``)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    shape = 1.0 - progress if schedule == "linear" else cosine
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``config.warmup_steps``, then ``config.schedule`` to ``total_steps``."""

    def factor(step: int) -> float:
        return lr_factor(
            step,
            total=total_steps,
            warmup=config.warmup_steps,
            schedule=config.schedule,
            min_ratio=config.min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- runtime


def _mixed_precision(config: TrainConfig) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class Runtime:
    """Devices, processes and precision: an ``accelerate.Accelerator`` when installed.

    Under ``accelerate launch`` it is the launched process group (DDP or FSDP as configured
    there); in a plain process it is one process on the best device. Without accelerate, one
    process with torch's autocast.

    Args:
        config: The training configuration (``mixed_precision``).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.mixed_precision = _mixed_precision(config)
        self.accelerator: Any = None
        try:
            from accelerate import Accelerator  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            if self.mixed_precision == "fp16":
                raise ConfigurationError(
                    "mixed_precision='fp16' needs accelerate (loss scaling): "
                    "`pip install 'genagent[train]'`, or use 'bf16' / 'no'"
                ) from None
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.num_processes = 1
            self.process_index = 0
        else:
            # `torchrun` on a machine without CUDA: accelerate must be told to use the CPU, or
            # every process would silently train alone
            cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
            self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=cpu)
            self.device = self.accelerator.device
            self.num_processes = self.accelerator.num_processes
            self.process_index = self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes files (checkpoints, logs)."""
        return self.process_index == 0

    @property
    def distributed_type(self) -> str:
        """``"NO"``, ``"MULTI_GPU"`` (DDP), ``"FSDP"``, ... (accelerate's names)."""
        if self.accelerator is None:
            return "NO"
        return str(getattr(self.accelerator.distributed_type, "value", "NO"))

    @property
    def is_fsdp(self) -> bool:
        """Whether the parameters are sharded over the processes (FSDP1 or FSDP2)."""
        return self.distributed_type == "FSDP" and self.num_processes > 1

    @property
    def is_fsdp2(self) -> bool:
        """Whether accelerate shards with FSDP2 (``fully_shard``)."""
        return self.is_fsdp and bool(getattr(self.accelerator, "is_fsdp2", False))

    def prepare_model(self, model: Any) -> Any:
        """Move (and, when distributed, wrap) the model.

        Under FSDP2 the model is sharded later, together with its optimizer (:meth:`prepare`),
        as accelerate requires.
        """
        if self.accelerator is None:
            return model.to(self.device)
        if self.is_fsdp2:
            return model
        return self.accelerator.prepare_model(model)

    def prepare(self, model: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """The model (given to :meth:`prepare_model` before) and its optimizer, both prepared.

        Under FSDP2 accelerate shards the model here and points the optimizer at the shards.
        """
        if self.is_fsdp2:
            prepared_model, prepared_optimizer = self.accelerator.prepare(model, optimizer)
            return prepared_model, prepared_optimizer
        return model, self.prepare_optimizer(optimizer)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """Wrap the optimizer (loss scaling for fp16)."""
        if self.accelerator is None:
            return optimizer
        return self.accelerator.prepare_optimizer(optimizer)

    def unwrap(self, model: Any) -> Any:
        """The model without distributed wrappers."""
        return model if self.accelerator is None else self.accelerator.unwrap_model(model)

    def bare_model(self, model: Any) -> Any:
        """The model to give :func:`~genagent.training.data.token_logprobs`.

        It calls the model's parts (vision tower, language model, head) directly. Without
        sharding that is the transformers model inside the distributed and peft wrappers (LoRA
        layers stay in it), and gradients are averaged over processes by
        :meth:`sync_gradients`, not by DDP's forward hooks. Under FSDP it is the wrapped model
        itself: ``token_logprobs`` calls the parts from inside its forward, where the
        parameters are gathered and the gradients reduce-scattered by FSDP's hooks.
        """
        if self.is_fsdp:
            return model
        bare = self.unwrap(model)
        get_base = getattr(bare, "get_base_model", None)
        return get_base() if callable(get_base) else bare

    def sync_gradients(self, model: Any) -> None:
        """Average the gradients over the processes (once per optimizer step)."""
        if self.num_processes == 1 or self.is_fsdp:  # FSDP reduce-scatters in the backward
            return
        from genagent.training.distributed import all_reduce_gradients

        # one flat reduce per dtype and device; a gradient missing on some rank (a vision tower
        # on a rank without images) counts as zeros there instead of deadlocking the others
        all_reduce_gradients(model.parameters(), mean=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The mixed-precision context of a forward pass."""
        if self.accelerator is not None:
            return self.accelerator.autocast()  # type: ignore[no-any-return]
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def full_parameters(self, model: Any) -> contextlib.AbstractContextManager[None]:
        """The model's whole parameters on every process, for forward passes run apart.

        Under FSDP2 each wrapped block's forward gathers its parameters (a collective), so
        forward passes that processes run on their own, in different numbers (generation),
        would wait forever for each other. Inside this context every FSDP2 module of the model
        is gathered once, on every process together, and kept whole: the forwards then run
        without a collective. On leaving, every module is resharded and its reshard policy
        restored (also after an error). The full parameters live on every process meanwhile,
        as in one process (the memory of the whole model, not of a shard). Without sharding
        nothing is done.

        Raises:
            ConfigurationError: Under FSDP1 (``FullyShardedDataParallel``), which cannot run
                forward passes inside ``summon_full_params``: use FSDP2.
        """
        if not self.is_fsdp:
            return contextlib.nullcontext()
        if not self.is_fsdp2:
            raise ConfigurationError(
                "under FSDP1 (fsdp_version: 1) forward passes cannot run with the full "
                "parameters gathered (summon_full_params forbids them), so processes "
                "generating on their own would hang: use FSDP2 (fsdp_version: 2)"
            )
        return _fsdp2_full_parameters(model)

    def no_sync(self, model: Any, skip: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip DDP's gradient all-reduce (not FSDP's reduce-scatter: it keeps shards)."""
        if skip and self.accelerator is not None and self.num_processes > 1 and not self.is_fsdp:
            return self.accelerator.no_sync(model)  # type: ignore[no-any-return]
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass (with loss scaling when fp16)."""
        if self.accelerator is None:
            loss.backward()  # type: ignore[no-untyped-call,unused-ignore]
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self, model: Any, max_norm: float | None) -> float:
        """Clip (when ``max_norm`` is set) and return the gradient norm before clipping."""
        if self.is_fsdp:  # accelerate's FSDP path (the norm over every shard) wants them all
            params = list(model.parameters())
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        limit = max_norm if max_norm is not None else float("inf")
        if self.accelerator is not None:
            norm = self.accelerator.clip_grad_norm_(params, limit)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, limit)
        return float(norm)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the processes."""
        if self.accelerator is None or self.num_processes == 1:
            return value
        return self.accelerator.reduce(value, reduction="sum")  # type: ignore[no-any-return]

    def wait(self) -> None:
        """Wait for every process."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def state_dict(self, model: Any) -> dict[str, Any] | None:
        """The full state dict where sharding needs gathering (FSDP), else ``None``."""
        if self.accelerator is not None and self.distributed_type == "FSDP":
            return self.accelerator.get_state_dict(model)  # type: ignore[no-any-return]
        return None

    def optimizer_state_dict(self, model: Any, optimizer: Any) -> dict[str, Any]:
        """The optimizer's whole state, for the main process to save.

        Under FSDP each process holds the state of its parameter shards: every process must
        call this (a collective), and the state is gathered, keyed by parameter names.
        """
        if not self.is_fsdp:
            return optimizer.state_dict()  # type: ignore[no-any-return]
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, _inner_optimizer(optimizer), options=options)

    def load_optimizer_state(self, model: Any, optimizer: Any, path: Path) -> None:
        """Load what :meth:`optimizer_state_dict` saved (a collective under FSDP)."""
        if not self.is_fsdp:
            optimizer.load_state_dict(
                torch.load(path, map_location=self.device, weights_only=False)
            )
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        # every process reads the file: the whole state is in it, and each keeps its shards
        state = torch.load(path, map_location="cpu", weights_only=False)
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(
            model, _inner_optimizer(optimizer), optim_state_dict=state, options=options
        )


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def _reshard_policy(module: Any) -> list[Any] | None:
    """What decides whether ``module``'s FSDP2 parameter groups reshard after forward.

    ``set_reshard_after_forward`` sets it but nothing public reads it back, so it is read
    from the groups (``post_forward_mesh_info`` in torch 2.13); ``None`` if absent.
    """
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None or not all(hasattr(g, "post_forward_mesh_info") for g in groups):
        return None
    return [g.post_forward_mesh_info for g in groups]


@contextlib.contextmanager
def _fsdp2_full_parameters(model: Any) -> Iterator[None]:
    """See :meth:`Runtime.full_parameters` (every process must enter it, in the same order)."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise ConfigurationError(
            f"{type(model).__name__} has no FSDP2 module (fully_shard) although accelerate "
            "runs FSDP2: give the trainer's model"
        )
    root = modules[0]  # modules() walks from the top: the outermost one, FSDP's root
    from genagent.training.data import _call_through

    # FSDP learns which module is its root from the first forward pass: an empty one through
    # the root (it gathers the root's own parameters, on every process) settles that before
    # the blocks are gathered one by one below
    _call_through(root, root, lambda: None)
    policies = [_reshard_policy(m) for m in modules]
    try:
        for module in modules:  # the same modules in the same order on every process
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()  # all-gathers now; its forward's unshard is then a no-op
        yield
    finally:
        for module, policy in zip(modules, policies, strict=True):
            module.reshard()  # frees the whole parameters: local, no collective
            if policy is None:  # FSDP2's defaults: the root alone keeps them after forward
                module.set_reshard_after_forward(module is not root, recurse=False)
                continue
            groups = module._get_fsdp_state()._fsdp_param_groups
            for group, mesh_info in zip(groups, policy, strict=True):
                group.post_forward_mesh_info = mesh_info


# --------------------------------------------------------------------------- checkpoints


def complete_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints under ``output_dir/checkpoints``, oldest first.

    A folder counts only if it is named ``step-N`` (temporary folders are not) and holds
    ``trainer_state.json``, which is written last.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


# --------------------------------------------------------------------------- metrics


class MetricsLogger:
    """A console line (the ``genagent.training`` logger), ``metrics.jsonl``, TensorBoard, W&B.

    TensorBoard is used when ``config.tensorboard`` and it is installed; W&B when
    ``config.wandb_project`` is set and ``wandb`` is installed. Neither is required.

    Args:
        config: The training configuration.
        enabled: Whether this process writes (the main process).
        resume_step: Records after this step are dropped from an existing ``metrics.jsonl``
            (a resumed run writes them again).
    """

    def __init__(self, config: TrainConfig, *, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = Path(config.output_dir) / "metrics.jsonl"
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept: list[str] = []
            if resume_step is not None:
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    with contextlib.suppress(ValueError):
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
            self.path.write_text("".join(f"{k}\n" for k in kept), encoding="utf-8")
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.debug("tensorboard is not installed; not logging to it")
            else:
                self._tb = SummaryWriter(str(Path(config.output_dir) / "tensorboard"))
        if config.wandb_project:
            try:
                import wandb  # type: ignore[import-not-found,unused-ignore]
            except ImportError:
                logger.warning(
                    "wandb_project is set but wandb is not installed: `pip install wandb`"
                )
            else:
                self._wandb = wandb.init(
                    project=config.wandb_project,
                    name=config.run_name,
                    config=config.model_dump(mode="json"),
                    resume="allow",
                )

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (it must hold ``step``)."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record["step"])
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in numbers.items()}, step=step)
        logger.info(
            "step %d | %s",
            step,
            " | ".join(_fmt(k, v) for k, v in record.items() if k != "step"),
        )

    def close(self) -> None:
        """Flush and close the optional backends."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key} {value:.3e}" if key == "lr" else f"{key} {value:.4f}"
    return f"{key} {value}"


# --------------------------------------------------------------------------- trainer


@dataclass
class StepResult:
    """What one optimizer step (or one gradient computation) did.

    Attributes:
        loss: Mean loss per trained token over the step's micro-batches (all processes).
        tokens: Trained tokens (all processes).
        grad_norm: Gradient norm before clipping (``nan`` when not computed).
        lr: Learning rate of the step (``nan`` when no step was taken).
        extra: Other summed statistics from the loss function.
    """

    loss: float
    tokens: int
    grad_norm: float = float("nan")
    lr: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainState:
    """Where training is: written into every checkpoint.

    Attributes:
        step: Optimizer steps done.
        epoch: The current epoch.
        batch_in_epoch: Optimizer steps done in this epoch (groups of micro-batches consumed).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class Trainer:
    """Base of the trainers: model set-up, one optimizer step, checkpoints, logging.

    Subclasses give the loss (:meth:`loss`) and drive :meth:`train_step`.

    Args:
        config: The configuration.
        resume_from: A checkpoint folder, ``"latest"``, or ``None`` (default: ``config``'s).
    """

    config: TrainConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.loss is Trainer.loss:  # caught when the class is defined, not mid-training
            raise ConfigurationError(
                f"trainer class {cls.__qualname__}: implement `def loss(self, model, batch) -> "
                "(summed loss, trained tokens)`"
            )

    def __init__(self, config: TrainConfig, *, resume_from: str | os.PathLike[str] | None = None):
        if type(self) is Trainer:
            raise ConfigurationError("Trainer is a base class: use SFTTrainer or RLTrainer")
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.runtime = Runtime(config)
        self.state = TrainState()
        target = resume_from if resume_from is not None else config.resume_from
        self.resumed_from = self._find_resume(target)
        # the same seed on every process while the model is built: new weights (LoRA's) must
        # agree, as FSDP keeps each process's own shard of them; then a seed per process
        seed_everything(config.seed)
        self.model, self.processor = self._load_model()
        if self.runtime.process_index:
            seed_everything(config.seed + self.runtime.process_index)
        self.optimizer: Any = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.total_steps = 0
        self._metrics: MetricsLogger | None = None

    # ------------------------------------------------------------------ set-up

    def _find_resume(self, target: str | os.PathLike[str] | None) -> Path | None:
        if target is None:
            return None
        if str(target) == "latest":
            return latest_checkpoint(self.output_dir)
        path = Path(target)
        if not (path / STATE_FILE).is_file():
            raise ConfigurationError(
                f"{path} is not a complete checkpoint (no {STATE_FILE}); point resume_from at "
                f"a folder {self.output_dir / 'checkpoints'}/step-N, or use 'latest'"
            )
        return path

    def _load_model(self) -> tuple[Any, Any]:
        config = self.config
        checkpoint = self.resumed_from
        full_from_checkpoint = checkpoint is not None and config.lora is None
        source = config.model
        if checkpoint is not None and config.lora is None:  # full weights from the checkpoint
            source = str(checkpoint / MODEL_DIR)
        model, processor = load_model_and_processor(
            source,
            device="cpu",
            dtype=config.dtype,
            attn_implementation=config.attn_implementation,
            revision=None if full_from_checkpoint else config.revision,
            trust_remote_code=config.trust_remote_code,
            processor_from=config.model,
        )
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.resumed_from is not None and config.lora is not None:
            from peft import PeftModel

            model.requires_grad_(False)
            model = PeftModel.from_pretrained(
                model, str(self.resumed_from / MODEL_DIR), is_trainable=True
            )
        else:
            model = apply_lora(model, config)
        model.train()
        return self.runtime.prepare_model(model), processor

    def setup_optimizer(self, total_steps: int) -> None:
        """Build the optimizer and schedule for ``total_steps`` (restored when resuming)."""
        self.total_steps = total_steps
        optimizer = build_optimizer(self.model, self.config)
        self.scheduler = build_scheduler(optimizer, self.config, total_steps)
        self.model, self.optimizer = self.runtime.prepare(self.model, optimizer)
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
        self._metrics = MetricsLogger(
            self.config,
            enabled=self.runtime.is_main_process,
            resume_step=self.state.step if self.resumed_from is not None else None,
        )

    # ------------------------------------------------------------------ steps

    def loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of one micro-batch and its number of trained tokens.

        Every subclass defines it (checked when the subclass is defined); the base never runs.
        """
        raise ConfigurationError(f"{type(self).__name__} defines no loss")

    def compute_gradients(self, micro_batches: Sequence[Any]) -> StepResult:
        """Forward and backward over the micro-batches of one step, accumulating gradients.

        The loss is normalised per token over the whole step: each micro-batch's summed loss
        is divided by the number of trained tokens in all the step's micro-batches (of all
        processes), so one micro-batch of two rows and two micro-batches of one row give the
        same gradient. Gradients are added to what ``.grad`` holds (call ``zero_grad`` first).
        """
        runtime = self.runtime
        counts = [self.count_tokens(b) for b in micro_batches]
        local = torch.tensor(float(sum(counts)), device=runtime.device)
        total = float(runtime.sum(local).item())
        # DDP and FSDP average gradients over processes: scale back up to a sum over all tokens
        scale = runtime.num_processes / max(total, 1.0)
        loss_sum = torch.zeros((), device=runtime.device)
        for batch, weight in (
            _fsdp_schedule(list(micro_batches))
            if runtime.is_fsdp
            else ((b, 1.0) for b in micro_batches)
        ):
            # no DDP all-reduce per micro-batch: the loss runs on the bare model, and
            # sync_gradients averages once per step
            stats = self._loss_stats() if weight == 0.0 else None
            with runtime.no_sync(self.model, skip=True):
                with runtime.autocast():
                    summed, _ = self.loss(self.model, batch)
                runtime.backward(summed.float() * (scale * weight))
            if stats is not None:  # a padding pass: its statistics do not count
                self._restore_loss_stats(stats)
                continue
            loss_sum += summed.detach().float()
        runtime.sync_gradients(self.model)
        loss_total = float(runtime.sum(loss_sum).item())
        return StepResult(loss=loss_total / max(total, 1.0), tokens=int(total))

    def _loss_stats(self) -> Any:
        """What :meth:`loss` accumulates on the trainer (``_step_metrics``), copied."""
        stats = getattr(self, "_step_metrics", None)
        return dict(stats) if isinstance(stats, dict) else None

    def _restore_loss_stats(self, stats: Any) -> None:
        if stats is not None:
            self._step_metrics = stats

    def count_tokens(self, batch: Any) -> int:
        """Trained tokens in a micro-batch (``loss_mask`` summed)."""
        return int(batch.loss_mask.sum().item())

    def train_step(self, micro_batches: Sequence[Any]) -> StepResult:
        """One optimizer step over ``micro_batches`` (this process's share)."""
        if self.optimizer is None or self.scheduler is None:
            raise ConfigurationError("call setup_optimizer(total_steps) before train_step")
        self.optimizer.zero_grad(set_to_none=True)
        result = self.compute_gradients(micro_batches)
        result.grad_norm = self.runtime.clip_grad_norm(self.model, self.config.max_grad_norm)
        result.lr = self.current_lr
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.batch_in_epoch += 1
        return result

    def log_step(self, result: StepResult, started: float) -> None:
        """Log the step's metrics when ``log_every`` says so."""
        if self._metrics is None or self.state.step % self.config.log_every:
            return
        record: dict[str, Any] = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens": result.tokens,
            "step_s": round(time.perf_counter() - started, 4),
            **result.extra,
        }
        self._metrics.log(record)

    @property
    def current_lr(self) -> float:
        """The learning rate of the next step."""
        if self.scheduler is None:
            return self.config.lr
        return float(self.scheduler.get_last_lr()[0])

    # ------------------------------------------------------------------ checkpoints

    def maybe_save(self) -> Path | None:
        """Write a checkpoint when ``save_every`` says so."""
        every = self.config.save_every
        if every is None or self.state.step % every:
            return None
        return self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically and keep the last ``keep_last``."""
        root = self.output_dir / "checkpoints"
        final = root / f"step-{self.state.step:06d}"
        self._save_to(final, training_state=True)
        if self.runtime.is_main_process:
            for old in complete_checkpoints(self.output_dir)[: -self.config.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.runtime.wait()
        return final

    def save_final(self) -> Path:
        """Write the trained model (or adapter) and the processor to ``output_dir/final``."""
        return self._save_to(self.output_dir / "final", training_state=False)

    def _save_to(self, final: Path, *, training_state: bool) -> Path:
        runtime = self.runtime
        state_dict = runtime.state_dict(self.model)  # every process takes part under FSDP
        optimizer_state = None
        if training_state and self.optimizer is not None:  # a collective under FSDP too
            optimizer_state = runtime.optimizer_state_dict(self.model, self.optimizer)
        rank_rng = rng_state()
        runtime.wait()
        tmp = final.parent / f".tmp-{final.name}"
        if runtime.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / MODEL_DIR).mkdir(parents=True)
            model = runtime.unwrap(self.model)
            kwargs: dict[str, Any] = {"safe_serialization": True}
            if state_dict is not None:
                kwargs["state_dict"] = state_dict
            model.save_pretrained(tmp / MODEL_DIR, **kwargs)
            if self.processor is not None:
                self.processor.save_pretrained(tmp / MODEL_DIR)
            if optimizer_state is not None and self.scheduler is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        runtime.wait()
        if training_state:  # each process its own random state
            torch.save(rank_rng, tmp / f"rng_{runtime.process_index}.pt")
        runtime.wait()
        if runtime.is_main_process:
            state = {
                "step": self.state.step,
                "epoch": self.state.epoch,
                "batch_in_epoch": self.state.batch_in_epoch,
                "total_steps": self.total_steps,
                "num_processes": runtime.num_processes,
                "lora": self.config.lora is not None,
                "config": self.config.model_dump(mode="json"),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            if final.exists():  # e.g. `final` of an earlier run
                shutil.rmtree(final)
            tmp.rename(final)
        runtime.wait()
        return final

    def _restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        if int(state.get("num_processes", 1)) != self.runtime.num_processes:
            logger.warning(
                "resuming a checkpoint written by %s processes with %s: the data order differs",
                state.get("num_processes"),
                self.runtime.num_processes,
            )
        self.state = TrainState(
            step=int(state["step"]),
            epoch=int(state["epoch"]),
            batch_in_epoch=int(state["batch_in_epoch"]),
        )
        assert self.optimizer is not None and self.scheduler is not None
        self.runtime.load_optimizer_state(self.model, self.optimizer, checkpoint / "optimizer.pt")
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
        rng_file = checkpoint / f"rng_{self.runtime.process_index}.pt"
        if rng_file.exists():
            restore_rng_state(torch.load(rng_file, weights_only=False))
        logger.info("resumed from %s at step %d", checkpoint, self.state.step)

    def close(self) -> None:
        """Close the metrics backends."""
        if self._metrics is not None:
            self._metrics.close()


def _has_images(batch: Any) -> bool:
    return getattr(batch, "pixel_values", None) is not None


def _fsdp_schedule(batches: list[Any]) -> list[tuple[Any, float]]:
    """This process's micro-batches under FSDP, padded so that every process runs alike.

    FSDP gathers each wrapped block's parameters in its forward, a collective: every process
    must run as many forward passes as the others, through the same blocks (the vision tower
    only where all have images). A process with fewer micro-batches repeats one of its own
    (another process's when it has none) with weight 0. Every process computes the same
    schedule from everyone's image flags, so a mismatch is refused on all of them at once
    rather than waiting forever.

    Raises:
        ConfigurationError: If the micro-batches at some position have images on some
            processes and not on others.
    """
    from genagent.training.distributed import gather_objects

    everyone = gather_objects([_has_images(b) for b in batches])
    length = max(len(flags) for flags in everyone)
    wanted: list[bool] = []
    for i in range(length):
        at_i = {f[i] for f in everyone if i < len(f)}
        if len(at_i) > 1:
            raise ConfigurationError(
                f"under FSDP, micro-batch {i} of this step has images on some processes and "
                "not on others: the vision tower's sharded parameters are gathered by all "
                "processes together. Train text-only rows and rows with images in separate "
                "steps, or use DDP (the vision tower is small) instead of FSDP"
            )
        wanted.append(at_i.pop())
    starved = any(not flags for flags in everyone)  # a process without micro-batches
    lent = {f for flags in everyone for f in flags[:1] + flags[-1:]} if starved else set()
    for mine in everyone:  # checked alike on every process
        for i in range(len(mine), length):
            if wanted[i] not in set(mine) | lent:
                raise ConfigurationError(
                    f"under FSDP, a process has no micro-batch {'with' if wanted[i] else 'without'}"
                    " images to pad its step with; every process must run alike"
                )
    donors: list[Any] = []
    if starved:
        donors = [b for mine in gather_objects(batches[:1] + batches[-1:]) for b in mine]
    schedule = [(b, 1.0) for b in batches]
    for i in range(len(batches), length):
        pool = [b for b in batches + donors if _has_images(b) == wanted[i]]
        schedule.append((pool[0], 0.0))
    return schedule


def iter_groups(items: Sequence[Any], size: int, *, drop_last: bool) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` items (the last one shorter unless ``drop_last``)."""
    for start in range(0, len(items), size):
        group = list(items[start : start + size])
        if len(group) < size and drop_last:
            return
        yield group
