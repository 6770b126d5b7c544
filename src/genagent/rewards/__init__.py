"""Rewards and judges: pointwise and pairwise scores of images.

See ``docs/rewards.md``.
"""

from genagent.rewards._base import (
    CompositeReward,
    PairwiseReward,
    Reward,
    RewardContext,
    coerce_reward_output,
    reward,
)
from genagent.rewards._output import PairwiseOutput, RewardOutput

__all__ = [
    "CompositeReward",
    "PairwiseOutput",
    "PairwiseReward",
    "Reward",
    "RewardContext",
    "RewardOutput",
    "coerce_reward_output",
    "reward",
]
