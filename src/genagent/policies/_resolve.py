"""Choosing a policy from a string: a server URL, a registry name, or a model id or path."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from genagent.errors import ConfigurationError

__all__ = ["DEFAULT_POLICY_MODEL", "POLICY_ENV", "default_policy", "policy_from_spec"]

POLICY_ENV: Final = "GENAGENT_POLICY"
"""Environment variable naming the default policy (a URL, a registry name, a model id or path)."""

DEFAULT_POLICY_MODEL: Final = "deep-kaixun/GenAgent"
"""Hugging Face id used for the released GenAgent weights when nothing else is configured."""


def policy_from_spec(spec: str, **kwargs: Any) -> Any:
    """Build a policy from a string.

    * ``http://...`` or ``https://...``: an :class:`~genagent.policies.OpenAIPolicy` for that
      OpenAI-compatible server (vLLM, SGLang, OpenAI);
    * a name in ``genagent.registry.policies`` (``"heuristic"``, ...): that factory;
    * anything else: a Hugging Face model id or a local folder, loaded lazily (on the first
      call) by :class:`~genagent.policies.TransformersPolicy`.

    Raises:
        ConfigurationError: If the spec is empty or names nothing known (a bare word that is
            neither a registered policy nor an existing folder), an option is not accepted by
            the policy it selects, or the backend it needs is not installed.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigurationError("an empty policy spec; give a URL, a registry name or a model")
    if spec.startswith(("http://", "https://")):
        from genagent.policies.openai import OpenAIPolicy

        return _call(OpenAIPolicy, "OpenAIPolicy", base_url=spec, **kwargs)
    from genagent import registry

    if spec in registry.policies:
        return registry.policies.create(spec, **kwargs)
    if "/" not in spec and "\\" not in spec and not Path(spec).expanduser().exists():
        known = ", ".join(sorted(registry.policies.names())) or "(none registered)"
        raise ConfigurationError(
            f"unknown policy {spec!r}: not a registered policy ({known}), not a server URL "
            "(http://host:port/v1), and not a model id ('owner/name') or an existing folder. "
            "For a Hugging Face id without an owner, use "
            "TransformersPolicy.from_pretrained(...) directly."
        )
    try:
        from genagent.policies.transformers import TransformersPolicy
    except ImportError as exc:
        raise ConfigurationError(
            f"the policy {spec!r} is a local model, which needs torch and transformers "
            f"({exc.name or exc} is missing): `pip install 'genagent[local]'`; or set "
            f"{POLICY_ENV} to the URL of an OpenAI-compatible server"
        ) from exc
    kwargs.setdefault("lazy", True)
    return _call(TransformersPolicy.from_pretrained, "TransformersPolicy", spec, **kwargs)


def _call(factory: Callable[..., Any], name: str, *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``, with an unknown option named as a ConfigurationError."""
    try:
        inspect.signature(factory).bind(*args, **kwargs)
        return factory(*args, **kwargs)
    except TypeError as exc:
        if "argument" not in str(exc):
            raise
        raise ConfigurationError(
            f"bad options for {name}: {exc}. It accepts: {_accepted(factory, name)}"
        ) from None


def _accepted(factory: Callable[..., Any], name: str) -> str:
    names = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if name == "TransformersPolicy":
        from genagent.policies.transformers import TransformersPolicy

        names += [
            p.name
            for p in inspect.signature(TransformersPolicy).parameters.values()
            if p.kind == p.KEYWORD_ONLY
        ]
    return ", ".join(sorted(set(names)))


def default_policy() -> Any:
    """The policy an ``Agent`` gets when none is given.

    ``$GENAGENT_POLICY`` if set, else the GenAgent weights (:data:`DEFAULT_POLICY_MODEL`).
    """
    return policy_from_spec(os.environ.get(POLICY_ENV) or DEFAULT_POLICY_MODEL)
