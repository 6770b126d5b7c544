"""Shared test configuration. Every test is offline; network tests bind only 127.0.0.1."""

from __future__ import annotations

import os
import shutil

from hypothesis import HealthCheck, settings

# Without an NVIDIA GPU the Triton kernels (tests/test_kernels.py) run on CPU tensors through
# Triton's interpreter, which must be chosen before any module defines a kernel.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
