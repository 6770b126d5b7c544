"""Group-normalised advantages (GRPO) and their broadcast to a trajectory's policy tokens.

For a group of ``G`` trajectories of one prompt (or of one branch prefix) with total rewards
``r_1 .. r_G``:

```text
A_i = (r_i - mean(r)) / (std(r) + eps)      std: the population standard deviation (ddof=0)
A_i = r_i - mean(r)                          with std_normalize=False (Dr. GRPO)
```

A group whose rewards are all equal (``std(r) <= min_std``) carries no learning signal: every
advantage is exactly 0 and the group is flagged (:attr:`GroupAdvantages.has_signal` is False),
which is what trajectory resampling (:mod:`genagent.training.resample`) acts on.

Every policy token of a trajectory (``loss_mask == 1``) gets its trajectory's advantage;
prompt, observation and copied-prefix tokens get 0 (they are not trained).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from genagent.errors import ConfigurationError

__all__ = [
    "GroupAdvantages",
    "broadcast_advantages",
    "group_advantages",
    "group_has_signal",
    "group_std",
    "token_advantages",
    "with_advantage",
]


@dataclass(frozen=True)
class GroupAdvantages:
    """The advantages of one group.

    Attributes:
        advantages: One advantage per trajectory, in order.
        mean: Mean reward of the group.
        std: Population standard deviation of the rewards.
        has_signal: False when the rewards are all equal (``std <= min_std``): every
            advantage is 0.
    """

    advantages: list[float]
    mean: float
    std: float
    has_signal: bool


def _rewards(rewards: Sequence[float]) -> list[float]:
    values = [float(r) for r in rewards]
    if not values:
        raise ConfigurationError("a group needs at least one reward")
    if not all(math.isfinite(v) for v in values):
        raise ConfigurationError(f"rewards must be finite, got {values!r}")
    return values


def group_std(rewards: Sequence[float]) -> float:
    """Population standard deviation (ddof=0) of ``rewards``."""
    values = _rewards(rewards)
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def group_has_signal(rewards: Sequence[float], *, min_std: float = 1e-6) -> bool:
    """Whether the group's rewards differ (``std > min_std``): only then are advantages non-zero."""
    return group_std(rewards) > min_std


def group_advantages(
    rewards: Sequence[float],
    *,
    eps: float = 1e-6,
    std_normalize: bool = True,
    min_std: float = 1e-6,
) -> GroupAdvantages:
    """GRPO advantages of one group: ``(r - mean) / (std + eps)``, or ``r - mean``.

    Args:
        rewards: Total reward of each trajectory of the group.
        eps: Added to the standard deviation.
        std_normalize: Divide by the standard deviation (False: only centre, as Dr. GRPO).
        min_std: Rewards whose standard deviation is at most this are "all equal": the
            advantages are 0 and the group is flagged as having no signal.

    Returns:
        The advantages, mean, standard deviation and the signal flag.

    Raises:
        ConfigurationError: For an empty group, non-finite rewards or a negative ``eps`` /
            ``min_std``.

    Example:
        ```python
        from genagent.training.advantages import group_advantages

        print(group_advantages([1.0, 0.0, 0.0, 1.0]).advantages)  # about [1, -1, -1, 1]
        ```
    """
    if eps < 0 or min_std < 0:
        raise ConfigurationError(f"eps and min_std must be >= 0, got {eps!r} and {min_std!r}")
    values = _rewards(rewards)
    mean = sum(values) / len(values)
    std = group_std(values)
    if std <= min_std:
        return GroupAdvantages([0.0] * len(values), mean, std, has_signal=False)
    scale = (std + eps) if std_normalize else 1.0
    return GroupAdvantages([(v - mean) / scale for v in values], mean, std, has_signal=True)


def with_advantage(row: Any, advantage: float) -> Any:
    """``row`` with ``advantage`` set (a copy for frozen dataclasses, else set in place)."""
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        params = getattr(type(row), "__dataclass_params__", None)
        if params is not None and params.frozen:
            return dataclasses.replace(row, advantage=advantage)
    row.advantage = advantage
    return row


def broadcast_advantages(
    rows_per_trajectory: Sequence[Sequence[Any]], advantages: Sequence[float]
) -> list[Any]:
    """Give every row of trajectory ``i`` the advantage ``advantages[i]``.

    A trajectory may give several rows (one per segment of consistent token ids); all get its
    advantage. Rows are ``TokenRow`` objects (anything with an ``advantage`` attribute).

    Returns:
        The rows, flattened in order, with their advantages set.
    """
    if len(rows_per_trajectory) != len(advantages):
        raise ConfigurationError(
            f"got {len(advantages)} advantages for {len(rows_per_trajectory)} trajectories"
        )
    return [
        with_advantage(row, float(a))
        for rows, a in zip(rows_per_trajectory, advantages, strict=True)
        for row in rows
    ]


def token_advantages(advantage: float, loss_mask: Sequence[int] | Sequence[bool]) -> list[float]:
    """The per-token advantages of one row: ``advantage`` on policy tokens, 0 elsewhere."""
    return [float(advantage) if m else 0.0 for m in loss_mask]
