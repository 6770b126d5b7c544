"""Reward outputs, kept apart from the reward classes so that trajectories can record them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PairwiseOutput", "RewardOutput"]


class RewardOutput(BaseModel):
    """The result of scoring one image.

    Attributes:
        score: The score, or ``None`` when the reward could not score the image (an unparseable
            judge reply, a failed request). ``None`` is a recorded failure, never a silent zero.
        components: Named sub-scores (per constraint, per criterion, per composite member).
        info: Anything else worth recording: the judge model and prompt, reasons, raw output.
    """

    model_config = ConfigDict(ser_json_inf_nan="constants")

    score: float | None
    components: dict[str, float | None] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Whether the reward failed to produce a score."""
        return self.score is None


class PairwiseOutput(BaseModel):
    """The result of comparing two images.

    Attributes:
        prob_a_better: Probability that image A satisfies the prompt better than image B
            (``None`` when the comparison failed).
        info: Reasons, judge model and prompt, raw output.
    """

    model_config = ConfigDict(ser_json_inf_nan="constants")

    prob_a_better: float | None = Field(default=None, ge=0.0, le=1.0)
    info: dict[str, Any] = Field(default_factory=dict)
