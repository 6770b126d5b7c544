"""Training: trajectories to token rows, SFT, multi-turn GRPO.

The data layer (:mod:`genagent.training.data`) turns recorded trajectories into token rows
(exact ids, a loss mask on the policy's own tokens, recorded log-probs, images, rewards), packs
them into micro-batches, computes packed log-probabilities, and exports them as JSONL for TRL
and verl. Importing this package does not import torch; the functions that need it do.
"""

from __future__ import annotations

import importlib
from typing import Any

from genagent.training.config import LoRAConfig, SFTConfig, SFTFilter, TrainConfig
from genagent.training.data import (
    IMAGES_DIR,
    MicroBatch,
    TokenRow,
    collate,
    export_trl,
    export_verl,
    pack,
    read_jsonl_rows,
    rope_position_ids,
    rows_from_messages,
    rows_from_trajectory,
    token_logprobs,
)

__all__ = [
    "IMAGES_DIR",
    "FormatPenalties",
    "GroupAdvantages",
    "LoRAConfig",
    "MicroBatch",
    "RLConfig",
    "RLResult",
    "RLReward",
    "RLRewardConfig",
    "RLRewardOutput",
    "RLStepResult",
    "RLTrainer",
    "ResampleConfig",
    "RewardWeights",
    "RolloutConfig",
    "RolloutGroup",
    "SFTConfig",
    "SFTFilter",
    "SFTResult",
    "SFTTrainer",
    "TokenRow",
    "TrainConfig",
    "branch_points",
    "branch_run",
    "broadcast_advantages",
    "build_rows",
    "choose_branches",
    "collate",
    "combine_rewards",
    "export_trl",
    "export_verl",
    "format_penalties",
    "group_advantages",
    "group_has_signal",
    "mask_prefix",
    "pack",
    "policy_loss",
    "read_jsonl_rows",
    "resample_decision",
    "rl_step",
    "rollout_groups",
    "rope_position_ids",
    "rows_from_messages",
    "rows_from_trajectory",
    "token_logprobs",
]

# the trainers and the RL core import torch or the agent: loaded on first use, so that
# importing the package stays light
_LAZY = {
    "SFTTrainer": "genagent.training.sft",
    "SFTResult": "genagent.training.sft",
    "RLReward": "genagent.training.rewards",
    "RLRewardOutput": "genagent.training.rewards",
    "RewardWeights": "genagent.training.rewards",
    "FormatPenalties": "genagent.training.rewards",
    "combine_rewards": "genagent.training.rewards",
    "format_penalties": "genagent.training.rewards",
    "group_advantages": "genagent.training.advantages",
    "GroupAdvantages": "genagent.training.advantages",
    "group_has_signal": "genagent.training.advantages",
    "broadcast_advantages": "genagent.training.advantages",
    "ResampleConfig": "genagent.training.resample",
    "resample_decision": "genagent.training.resample",
    "branch_points": "genagent.training.resample",
    "choose_branches": "genagent.training.resample",
    "branch_run": "genagent.training.resample",
    "mask_prefix": "genagent.training.resample",
    "RLConfig": "genagent.training.rl",
    "RLRewardConfig": "genagent.training.rl",
    "RolloutConfig": "genagent.training.rl",
    "RolloutGroup": "genagent.training.rl",
    "RLStepResult": "genagent.training.rl",
    "policy_loss": "genagent.training.rl",
    "rollout_groups": "genagent.training.rl",
    "rl_step": "genagent.training.rl",
    "build_rows": "genagent.training.rl",
    "RLTrainer": "genagent.training.rl_trainer",
    "RLResult": "genagent.training.rl_trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genagent.training' has no attribute {name!r}")
