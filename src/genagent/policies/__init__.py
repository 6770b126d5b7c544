"""Policies: the contract and the backends.

``Policy`` is the protocol every backend implements; ``ScriptedPolicy`` and ``FunctionPolicy``
are test doubles shipped with the package.
"""

from genagent.policies._base import Policy, PolicyOutput, SamplingParams, describe_policy
from genagent.policies.scripted import FunctionPolicy, ScriptedPolicy

__all__ = [
    "FunctionPolicy",
    "Policy",
    "PolicyOutput",
    "SamplingParams",
    "ScriptedPolicy",
    "describe_policy",
]
