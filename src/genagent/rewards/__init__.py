"""Rewards and judges: pointwise and pairwise scores of images.

See ``docs/rewards.md`` and ``docs/judges.md``. The VLM judges (``genagent.rewards.judges``)
and the reflection-accuracy reward (``genagent.rewards.reflection``) are imported on first use:
they build on the policy contract, which itself records rewards in trajectories.
"""

from typing import TYPE_CHECKING, Any

from genagent.rewards._base import (
    CompositeReward,
    PairwiseReward,
    Reward,
    RewardContext,
    coerce_reward_output,
    reward,
)
from genagent.rewards._output import PairwiseOutput, RewardOutput

if TYPE_CHECKING:
    from genagent.rewards.judges import (
        ChecklistItem,
        ChecklistJudge,
        JudgeQuery,
        JudgeVerdict,
        PairwiseJudge,
        PointwiseJudge,
        VLMJudge,
        WiseJudge,
        build_checklist,
    )
    from genagent.rewards.reflection import PolicyVerdict, ReflectionAccuracy, read_judgment

__all__ = [
    "ChecklistItem",
    "ChecklistJudge",
    "CompositeReward",
    "JudgeQuery",
    "JudgeVerdict",
    "PairwiseAsReward",
    "PairwiseJudge",
    "PairwiseOutput",
    "PairwiseReward",
    "PointwiseJudge",
    "PolicyVerdict",
    "ReflectionAccuracy",
    "Reward",
    "RewardContext",
    "RewardOutput",
    "VLMJudge",
    "WiseJudge",
    "build_checklist",
    "coerce_reward_output",
    "read_judgment",
    "reward",
]

_LAZY = {
    "ChecklistItem": "genagent.rewards.judges",
    "ChecklistJudge": "genagent.rewards.judges",
    "JudgeQuery": "genagent.rewards.judges",
    "JudgeVerdict": "genagent.rewards.judges",
    "PairwiseAsReward": "genagent.rewards.judges",
    "PairwiseJudge": "genagent.rewards.judges",
    "PointwiseJudge": "genagent.rewards.judges",
    "VLMJudge": "genagent.rewards.judges",
    "WiseJudge": "genagent.rewards.judges",
    "build_checklist": "genagent.rewards.judges",
    "PolicyVerdict": "genagent.rewards.reflection",
    "ReflectionAccuracy": "genagent.rewards.reflection",
    "read_judgment": "genagent.rewards.reflection",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genagent.rewards' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
