"""Choosing a policy from a string: a server URL, a registry name, or a model id or path."""

from __future__ import annotations

import os
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
        ConfigurationError: If the spec is empty, or the backend it needs is not installed.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigurationError("an empty policy spec; give a URL, a registry name or a model")
    if spec.startswith(("http://", "https://")):
        from genagent.policies.openai import OpenAIPolicy

        return OpenAIPolicy(base_url=spec, **kwargs)
    from genagent import registry

    if spec in registry.policies:
        return registry.policies.create(spec, **kwargs)
    try:
        from genagent.policies.transformers import TransformersPolicy
    except ImportError as exc:
        raise ConfigurationError(
            f"the policy {spec!r} is a local model, which needs torch and transformers "
            f"({exc.name or exc} is missing): `pip install 'genagent[local]'`; or set "
            f"{POLICY_ENV} to the URL of an OpenAI-compatible server"
        ) from exc
    return TransformersPolicy.from_pretrained(spec, lazy=True, **kwargs)


def default_policy() -> Any:
    """The policy an ``Agent`` gets when none is given.

    ``$GENAGENT_POLICY`` if set, else the GenAgent weights (:data:`DEFAULT_POLICY_MODEL`).
    """
    return policy_from_spec(os.environ.get(POLICY_ENV) or DEFAULT_POLICY_MODEL)
