"""Policies: the contract and the backends.

``Policy`` is the protocol every backend implements; ``ScriptedPolicy`` and ``FunctionPolicy``
are test doubles shipped with the package. ``TransformersPolicy`` (extra ``[local]``) runs a
local model; ``OpenAIPolicy`` talks to any OpenAI-compatible server (vLLM, SGLang, OpenAI).
Both are imported on first use, so ``import genagent`` stays light.
"""

from typing import TYPE_CHECKING, Any

from genagent.policies._base import Policy, PolicyOutput, SamplingParams, describe_policy
from genagent.policies.scripted import FunctionPolicy, ScriptedPolicy

if TYPE_CHECKING:
    from genagent.policies.openai import OpenAIPolicy
    from genagent.policies.transformers import TransformersPolicy

__all__ = [
    "FunctionPolicy",
    "OpenAIPolicy",
    "Policy",
    "PolicyOutput",
    "SamplingParams",
    "ScriptedPolicy",
    "TransformersPolicy",
    "describe_policy",
    "policy_from_spec",
]

_LAZY = {
    "OpenAIPolicy": "genagent.policies.openai",
    "TransformersPolicy": "genagent.policies.transformers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        from genagent.errors import ConfigurationError

        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as exc:
            raise ConfigurationError(
                f"{name} needs packages that are not installed ({exc.name or exc}); install "
                "them with `pip install 'genagent[local]'`"
            ) from exc
        return getattr(module, name)
    if name == "policy_from_spec":
        from genagent.policies._resolve import policy_from_spec

        return policy_from_spec
    raise AttributeError(f"module 'genagent.policies' has no attribute {name!r}")
