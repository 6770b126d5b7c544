"""The reward contract: ``Reward``, ``PairwiseReward``, ``@reward`` and ``CompositeReward``.

Rewards score images. The same object serves as a *judge* at inference time (choosing the best
of ``candidates`` images, scoring final images) and as a *training reward*. Implement ``score``
(sync; run in a worker thread) or ``async ascore``. A score of ``None`` is a recorded failure.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, overload

from genagent._async import run_sync
from genagent.errors import ConfigurationError
from genagent.images import ImageRef
from genagent.rewards._output import PairwiseOutput, RewardOutput
from genagent.tasks import Task

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from genagent.trajectory import Trajectory

__all__ = [
    "CompositeReward",
    "PairwiseReward",
    "Reward",
    "RewardContext",
    "coerce_reward_output",
    "reward",
]

logger = logging.getLogger("genagent.rewards")


@dataclass
class RewardContext:
    """What a reward may use besides the prompt and the image.

    Attributes:
        task: The task, with the metadata a judge checks (GenEval ``include``, ...).
        trajectory: The trajectory the image belongs to, when scored inside a run.
        round: The image's round, when known.
        image_ref: The image's stored reference (encoded bytes via ``read_bytes()``).
        metadata: Free-form extras.
    """

    task: Task | None = None
    trajectory: Trajectory | None = None
    round: int | None = None
    image_ref: ImageRef | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Reward:
    """Base class of pointwise rewards: ``score(prompt, image, ctx) -> RewardOutput``.

    ``score`` may also return a float (or ``None`` for a failure); it is wrapped in a
    :class:`RewardOutput`. Subclasses get a default ``name`` from the class name.

    Attributes:
        name: Key under which the reward is recorded in ``Trajectory.rewards``.
    """

    name: str = "reward"
    _abstract: ClassVar[bool] = True

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._abstract = abstract
        if "name" not in cls.__dict__:
            cls.name = _snake(cls.__name__)
        if not abstract and cls.score is Reward.score and cls.ascore is Reward.ascore:
            raise ConfigurationError(
                f"reward class {cls.__qualname__}: implement `def score(self, prompt, image, "
                "ctx)` or `async def ascore(self, prompt, image, ctx)`"
            )
        _check_sync_async(cls, "score", "ascore", Reward)

    def score(
        self, prompt: str, image: PILImage.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        """Score ``image`` for ``prompt`` (sync). Override this or :meth:`ascore`."""
        return coerce_reward_output(run_sync(self.ascore(prompt, image, ctx)))

    async def ascore(
        self, prompt: str, image: PILImage.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        """Score ``image`` for ``prompt`` (async). Override this or :meth:`score`."""
        return coerce_reward_output(await asyncio.to_thread(self.score, prompt, image, ctx))

    async def safe_ascore(
        self, prompt: str, image: PILImage.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        """Like :meth:`ascore`, but an exception becomes a recorded failure (score ``None``)."""
        try:
            return coerce_reward_output(await self.ascore(prompt, image, ctx))
        except ConfigurationError:
            raise  # a reward returning the wrong type is a bug to fix, not a failed score
        except Exception as exc:
            logger.warning("reward %r failed: %s: %s", self.name, type(exc).__name__, exc)
            return RewardOutput(
                score=None, info={"error": {"type": type(exc).__name__, "message": str(exc)}}
            )

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for metadata."""
        return {"name": self.name, "class": f"{type(self).__module__}.{type(self).__qualname__}"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PairwiseReward:
    """Base class of pairwise rewards: ``compare(prompt, a, b, ctx) -> PairwiseOutput``.

    The output is the probability that image ``a`` satisfies the prompt better than ``b``.
    """

    name: str = "pairwise_reward"

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = _snake(cls.__name__)
        if (
            not abstract
            and cls.compare is PairwiseReward.compare
            and cls.acompare is PairwiseReward.acompare
        ):
            raise ConfigurationError(
                f"pairwise reward class {cls.__qualname__}: implement `compare(self, prompt, a, "
                "b, ctx)` or `async acompare(...)`"
            )
        _check_sync_async(cls, "compare", "acompare", PairwiseReward)

    def compare(
        self,
        prompt: str,
        a: PILImage.Image,
        b: PILImage.Image,
        ctx: RewardContext | None = None,
    ) -> PairwiseOutput:
        """Compare two images (sync). Override this or :meth:`acompare`."""
        return _coerce_pairwise_output(run_sync(self.acompare(prompt, a, b, ctx)))

    async def acompare(
        self,
        prompt: str,
        a: PILImage.Image,
        b: PILImage.Image,
        ctx: RewardContext | None = None,
    ) -> PairwiseOutput:
        """Compare two images (async). Override this or :meth:`compare`."""
        return _coerce_pairwise_output(await asyncio.to_thread(self.compare, prompt, a, b, ctx))


def _coerce_pairwise_output(value: Any) -> PairwiseOutput:
    """Turn a probability, ``None`` or :class:`PairwiseOutput` into a :class:`PairwiseOutput`."""
    if isinstance(value, PairwiseOutput):
        return value
    return PairwiseOutput(prob_a_better=None if value is None else float(value))


def _check_sync_async(cls: type, sync: str, async_: str, base: type) -> None:
    """The sync method must be plain and the async one ``async def`` (checked at definition)."""
    if getattr(cls, sync) is not getattr(base, sync) and inspect.iscoroutinefunction(
        getattr(cls, sync)
    ):
        raise ConfigurationError(
            f"{cls.__qualname__}.{sync} is async; name an async implementation `{async_}`"
        )
    if getattr(cls, async_) is not getattr(base, async_) and not inspect.iscoroutinefunction(
        getattr(cls, async_)
    ):
        raise ConfigurationError(
            f"{cls.__qualname__}.{async_} must be `async def`; name a sync one `{sync}`"
        )


def coerce_reward_output(value: Any) -> RewardOutput:
    """Turn a float, bool, ``None`` or :class:`RewardOutput` into a :class:`RewardOutput`.

    A NaN or infinite score becomes a failure (``None``, with the reason in ``info``): it could
    not be compared, and would win or lose a best-of-N choice arbitrarily.
    """
    if isinstance(value, RewardOutput):
        if value.score is not None and not math.isfinite(value.score):
            return value.model_copy(
                update={"score": None, "info": {**value.info, "error": f"score {value.score}"}}
            )
        return value
    if value is None:
        return RewardOutput(score=None)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return RewardOutput(score=None, info={"error": f"score {value}"})
        return RewardOutput(score=float(value))
    raise ConfigurationError(
        f"a reward returned {type(value).__name__}; return a float, None or a RewardOutput"
    )


# --------------------------------------------------------------------------- @reward


@overload
def reward(fn: Callable[..., Any], /) -> Reward: ...


@overload
def reward(*, name: str | None = None) -> Callable[[Callable[..., Any]], Reward]: ...


def reward(
    fn: Callable[..., Any] | None = None, /, *, name: str | None = None
) -> Reward | Callable[[Callable[..., Any]], Reward]:
    """Make a :class:`Reward` from a function ``fn(prompt, image[, ctx]) -> float | RewardOutput``.

    The function may be async. Its name (or ``name=``) becomes the reward's name.

    Example:
        ```python
        from genagent import reward

        @reward
        def brightness(prompt, image):
            return sum(image.convert("L").getdata()) / (255 * image.width * image.height)
        ```
    """

    def build(func: Callable[..., Any]) -> Reward:
        try:
            params = inspect.signature(func).parameters
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"@reward needs a function, got {func!r}") from exc
        positional = [
            p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(positional) not in (2, 3):
            raise ConfigurationError(
                f"@reward function {func.__qualname__}: take (prompt, image) or (prompt, image, "
                f"ctx), got {len(positional)} positional parameters"
            )
        takes_ctx = len(positional) == 3
        reward_name = name or func.__name__

        class _FunctionReward(Reward):
            async def ascore(
                self, prompt: str, image: PILImage.Image, ctx: RewardContext | None = None
            ) -> RewardOutput:
                args = (prompt, image, ctx) if takes_ctx else (prompt, image)
                if inspect.iscoroutinefunction(func):
                    result = await func(*args)
                else:
                    result = await asyncio.to_thread(func, *args)
                return coerce_reward_output(result)

        _FunctionReward.__name__ = _FunctionReward.__qualname__ = f"Reward[{reward_name}]"
        instance = _FunctionReward()
        instance.name = reward_name
        instance.__dict__["__wrapped__"] = func
        return instance

    return build(fn) if fn is not None else build


# --------------------------------------------------------------------------- composite


class CompositeReward(Reward):
    """A weighted sum of rewards, scored concurrently.

    Args:
        rewards: ``{name: reward}`` or ``{name: (reward, weight)}``, or a sequence of rewards or
            ``(reward, weight)`` pairs (named by ``reward.name``). Weights default to 1.
        normalize: Divide by the sum of the weights (a weighted mean).
        on_missing: ``"fail"``: the composite is ``None`` if any member fails (default);
            ``"skip"``: failed members are left out and the rest renormalised.
        name: The composite's name.

    Example:
        ```python
        from genagent import CompositeReward, reward

        @reward
        def a(prompt, image):
            return 1.0

        @reward
        def b(prompt, image):
            return 0.0

        combined = CompositeReward({"a": (a, 0.75), "b": (b, 0.25)})
        ```
    """

    def __init__(
        self,
        rewards: Mapping[str, Reward | tuple[Reward, float]]
        | Sequence[Reward | tuple[Reward, float]],
        *,
        normalize: bool = False,
        on_missing: str = "fail",
        name: str = "composite",
    ) -> None:
        if on_missing not in {"fail", "skip"}:
            raise ConfigurationError(f"on_missing must be 'fail' or 'skip', got {on_missing!r}")
        items: list[tuple[str, Reward | tuple[Reward, float]]]
        if isinstance(rewards, Mapping):
            items = list(rewards.items())
        else:
            items = [(r[0].name if isinstance(r, tuple) else r.name, r) for r in rewards]
        self.members: dict[str, tuple[Reward, float]] = {}
        for key, spec in items:
            member, weight = spec if isinstance(spec, tuple) else (spec, 1.0)
            if not isinstance(member, Reward):
                raise ConfigurationError(f"composite member {key!r} is not a Reward: {member!r}")
            if key in self.members:
                raise ConfigurationError(f"two composite members are named {key!r}")
            self.members[key] = (member, float(weight))
        if not self.members:
            raise ConfigurationError("CompositeReward needs at least one reward")
        self.normalize = normalize
        self.on_missing = on_missing
        self.name = name

    async def ascore(
        self, prompt: str, image: PILImage.Image, ctx: RewardContext | None = None
    ) -> RewardOutput:
        """Score with every member and combine."""
        names = list(self.members)
        outputs = await asyncio.gather(
            *(self.members[n][0].safe_ascore(prompt, image, ctx) for n in names)
        )
        components = {n: o.score for n, o in zip(names, outputs, strict=True)}
        info = {n: o.info for n, o in zip(names, outputs, strict=True) if o.info}
        present = [(n, self.members[n][1], s) for n, s in components.items() if s is not None]
        missing = [n for n, s in components.items() if s is None]
        if (missing and self.on_missing == "fail") or not present:
            return RewardOutput(score=None, components=components, info={**info, "failed": missing})
        total = sum(w * s for _, w, s in present)
        present_weight = sum(w for _, w, _ in present)
        if self.normalize:
            total = total / present_weight if present_weight else 0.0
        elif missing and present_weight:
            # "skip": rescale so the missing members' weight is spread over the present ones.
            total *= sum(w for _, w in self.members.values()) / present_weight
        return RewardOutput(score=total, components=components, info=info)
