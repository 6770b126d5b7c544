r"""Registry factories of the VLM judges, for ``--judge`` (``genagent eval``, ``genagent run``).

Each takes the judge's model as a policy spec (a server URL, a registry name or a model id, as
``genagent run --policy`` takes), so that the command line can build a judge::

    genagent eval geneval++ --judge checklist \\
        --judge-arg policy=https://api.openai.com/v1 --judge-arg model=gpt-4.1
"""

from __future__ import annotations

import os
from typing import Any

from genagent.errors import ConfigurationError
from genagent.rewards.judges import (
    ChecklistJudge,
    PairwiseAsReward,
    PairwiseJudge,
    PointwiseJudge,
    WiseJudge,
)

JUDGE_ENV = "GENAGENT_JUDGE"


def _policy(policy: str | None, model: str | None, options: dict[str, Any], judge: str) -> Any:
    from genagent.policies import policy_from_spec

    spec = policy or os.environ.get(JUDGE_ENV)
    if not spec:
        raise ConfigurationError(
            f"the {judge} judge needs a vision-language model: --judge-arg policy=URL (an "
            "OpenAI-compatible server, e.g. https://api.openai.com/v1 with --judge-arg "
            "model=gpt-4.1, or a vLLM server), a registry name or a model id; or set "
            f"{JUDGE_ENV}"
        )
    if model is not None:
        options = {**options, "model": model}
    return policy_from_spec(spec, **options)


def checklist(
    policy: str | None = None,
    model: str | None = None,
    mode: str = "strict",
    counts: str | None = None,
    retries: int = 1,
    **policy_options: Any,
) -> ChecklistJudge:
    """A :class:`~genagent.rewards.ChecklistJudge` on the model ``policy`` names.

    ``counts`` defaults to per task: ``at_least`` for GenEval (``geneval``, ``geneval-long``)
    tasks, as GenEval's official rule reads their counts, ``exact`` otherwise (GenEval++);
    ``counts=exact`` or ``counts=at_least`` forces one reading for every task.
    """
    return ChecklistJudge(
        _policy(policy, model, policy_options, "checklist"),
        mode=mode,  # type: ignore[arg-type]  # checked by the judge
        counts=counts,  # type: ignore[arg-type]
        retries=retries,
    )


def wise(
    policy: str | None = None,
    model: str | None = None,
    mode: str = "wiscore",
    retries: int = 1,
    **policy_options: Any,
) -> WiseJudge:
    """A :class:`~genagent.rewards.WiseJudge` (WiScore) on the model ``policy`` names."""
    return WiseJudge(
        _policy(policy, model, policy_options, "wise"),
        mode=mode,  # type: ignore[arg-type]  # checked by the judge
        retries=retries,
    )


def wise_verified(
    policy: str | None = None, model: str | None = None, retries: int = 1, **policy_options: Any
) -> WiseJudge:
    """A binary WISE Verified :class:`~genagent.rewards.WiseJudge`."""
    return wise(policy, model, mode="verified", retries=retries, **policy_options)


def pointwise(
    criterion: str,
    policy: str | None = None,
    model: str | None = None,
    scale_max: int = 10,
    retries: int = 1,
    **policy_options: Any,
) -> PointwiseJudge:
    """A :class:`~genagent.rewards.PointwiseJudge` rating ``criterion`` from 0 to ``scale_max``."""
    return PointwiseJudge(
        _policy(policy, model, policy_options, "pointwise"),
        criterion,
        scale=(0, scale_max),
        retries=retries,
    )


def pairwise(
    policy: str | None = None,
    model: str | None = None,
    reference: str = "previous",
    criterion: str | None = None,
    swap: bool = True,
    retries: int = 1,
    **policy_options: Any,
) -> PairwiseAsReward:
    """A :class:`~genagent.rewards.PairwiseJudge` used as a pointwise reward.

    It scores an image by the probability that it is better than ``reference``: the run's
    ``previous`` image (default; best-of-N keeps the candidate most likely to beat the image
    the run continued from), its ``first`` image, or an image file (a path) -- a fixed anchor,
    which is what an evaluation needs, since it scores images without their run.
    """
    judge = PairwiseJudge(
        _policy(policy, model, policy_options, "pairwise"),
        criterion=criterion,
        swap=swap,
        retries=retries,
    )
    return PairwiseAsReward(judge, reference)
