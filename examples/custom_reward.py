"""A custom reward used two ways: as the judge of best-of-N candidates, and as a final score.

Runs offline on the simulator (SceneTool draws labelled glyphs; it is not a real generator).
Run: python examples/custom_reward.py
"""

from __future__ import annotations

from PIL import Image

from genagent import Agent, CompositeReward, Reward, RewardContext, RewardOutput, reward
from genagent.sim import SceneJudge, sample_tasks


class Colourfulness(Reward):
    """Share of pixels that are strongly saturated (a crude aesthetic score)."""

    def score(
        self, prompt: str, image: Image.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        histogram = image.convert("RGB").convert("HSV").getchannel("S").histogram()
        share = sum(histogram[121:]) / sum(histogram)
        return RewardOutput(score=share, info={"threshold": 120})


@reward
def not_blank(prompt: str, image: Image.Image) -> float:
    """1.0 unless the image is a single flat colour."""
    return 0.0 if len(image.getcolors(maxcolors=2) or []) == 1 else 1.0


if __name__ == "__main__":
    judge = CompositeReward(
        {"correct": (SceneJudge("fraction"), 1.0), "colour": (Colourfulness(), 0.1)}
    )
    agent = Agent(
        candidates=4,  # four images per call; the judge keeps the best
        judge=judge,
        rewards={"scene": SceneJudge(), "not_blank": not_blank},
        max_rounds=2,
    )
    for task in sample_tasks(4, seed=2):
        trajectory = agent.run(task, seed=1)
        first = trajectory.turns[0].tool_result
        scores = ", ".join(f"{s:.2f}" for s in first.scores or [])
        print(
            f"{task.prompt!r}: candidate scores [{scores}] -> kept #{first.selected}; "
            f"final scene score {trajectory.rewards['scene'].score}, "
            f"not_blank {trajectory.rewards['not_blank'].score}"
        )
