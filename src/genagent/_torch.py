"""Device and dtype choice shared by the torch-backed policies and tools (private)."""

from __future__ import annotations

import torch

from genagent.errors import ConfigurationError

__all__ = ["pick_device", "pick_dtype"]


def pick_device(device: str | None) -> str:
    """The device to load on; an unusable explicit choice fails now, before any download."""
    if device is not None:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigurationError(
                f"device={device!r} is not a torch device; use 'cuda', 'cuda:1', 'mps' or 'cpu'"
            ) from exc
        if parsed.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ConfigurationError(
                    f"device={device!r} but this torch sees no CUDA GPU (torch "
                    f"{torch.__version__}); install a CUDA build of torch or use device='cpu'"
                )
            if parsed.index is not None and parsed.index >= count:
                raise ConfigurationError(
                    f"device={device!r} but only {count} CUDA GPU(s) are visible "
                    f"(cuda:0..cuda:{count - 1}); check CUDA_VISIBLE_DEVICES"
                )
        elif parsed.type == "mps" and not (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        ):
            raise ConfigurationError(
                f"device={device!r} but MPS is not available here; use device='cpu'"
            )
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(
    dtype: str | torch.dtype | None, device: str, *, mps: torch.dtype | None = None
) -> torch.dtype | None:
    """The dtype to load in.

    ``"auto"`` is bf16 on GPUs that support it (else fp16), fp16 on MPS (``mps`` overrides
    it) and fp32 on CPU; a name (``"bfloat16"``) or a torch dtype is taken as given.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ConfigurationError(f"unknown dtype {dtype!r}; use 'auto', 'bfloat16', ...")
        return resolved
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return mps or torch.float16
    return torch.float32
