"""Name registries for tools and policies, used by the CLI (``--tool``, ``--policy``).

Entries are factories, given as callables or as ``"module:attribute"`` strings that are imported
only when used, so registering a torch-backed tool costs nothing at import. Third-party packages
add entries through the ``genagent.tools`` and ``genagent.policies`` entry-point groups.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from genagent.errors import ConfigurationError

__all__ = ["Registry", "RegistryEntry", "policies", "rewards", "tools"]

T = TypeVar("T")

# packages that genagent extras provide -> the extra to install
_EXTRAS = {
    "torch": "local",
    "transformers": "local",
    "accelerate": "local",
    "safetensors": "local",
    "diffusers": "diffusers",
    "triton": "kernels",
    "peft": "train",
}


@dataclass(frozen=True)
class RegistryEntry:
    """One registered factory.

    Attributes:
        name: The registry name.
        target: A callable, or ``"module:attribute"`` imported on first use.
        description: One line for ``genagent list``.
    """

    name: str
    target: Callable[..., Any] | str
    description: str = ""

    def load(self) -> Callable[..., Any]:
        """Resolve the factory: import ``module`` of ``"module:attr.sub"`` and walk the path.

        Raises:
            ConfigurationError: If the module cannot be imported (naming the extra to install
                when a genagent extra provides the missing package) or the attribute is missing.
        """
        if callable(self.target):
            return self.target
        spec = self.target.split("[", 1)[0].strip()  # entry-point syntax allows "[extras]"
        module_name, _, path = spec.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            missing = (exc.name or "").split(".")[0]
            extra = _EXTRAS.get(missing)
            advice = (
                f"install it with `pip install 'genagent[{extra}]'`"
                if extra
                else "check the module path, or install the package that provides it"
            )
            raise ConfigurationError(
                f"{self.name!r} cannot be loaded: module {missing or module_name!r} is not "
                f"available; {advice}"
            ) from exc
        for attr in filter(None, path.split(".")):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise ConfigurationError(
                    f"{self.name!r} points at {self.target!r}, but {module_name} has no {path!r}"
                ) from None
        if not callable(obj):
            raise ConfigurationError(f"{self.name!r} points at {self.target!r}, not a callable")
        factory: Callable[..., Any] = obj
        return factory


class Registry(Generic[T]):
    """A mapping from names to factories.

    Args:
        kind: What the registry holds, for error messages (``"tool"``, ``"policy"``).
        group: The entry-point group third-party packages register under.
        plural: The plural of ``kind`` (default: ``kind + "s"``).
    """

    def __init__(self, kind: str, group: str, *, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.group = group
        self._entries: dict[str, RegistryEntry] = {}
        self._entry_points_loaded = False

    def register(
        self,
        name: str,
        target: Callable[..., Any] | str | None = None,
        *,
        description: str = "",
        overwrite: bool = False,
    ) -> Any:
        """Register a factory under ``name``; usable as a decorator when ``target`` is omitted.

        Raises:
            ConfigurationError: If ``name`` is taken and ``overwrite`` is false.
        """

        def add(obj: Callable[..., Any] | str) -> Callable[..., Any] | str:
            if name in self._entries and not overwrite:
                raise ConfigurationError(
                    f"a {self.kind} named {name!r} is already registered; pass overwrite=True "
                    "to replace it"
                )
            self._entries[name] = RegistryEntry(name, obj, description)
            return obj

        return add if target is None else add(target)

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the entry ``name`` with ``kwargs``.

        Raises:
            ConfigurationError: If no such entry exists (the message lists the known names), or
                the factory rejects the arguments.
        """
        factory = self.entry(name).load()
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as exc:
            raise ConfigurationError(
                f"{self.kind} {name!r} does not take these arguments: {exc}"
            ) from None
        except ValueError:
            pass  # no introspectable signature (a builtin): let the call decide
        try:
            result: T = factory(**kwargs)
        except ConfigurationError:
            raise
        except ValueError as exc:
            raise ConfigurationError(f"{self.kind} {name!r}: {exc}") from exc
        except Exception as exc:
            raise ConfigurationError(
                f"{self.kind} {name!r} failed to build: {type(exc).__name__}: {exc}"
            ) from exc
        return result

    def entry(self, name: str) -> RegistryEntry:
        """Return the entry ``name``."""
        self._load_entry_points()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ConfigurationError(
                f"unknown {self.kind} {name!r}; known {self.plural}: {known}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load_entry_points()
        return sorted(self._entries)

    def entries(self) -> list[RegistryEntry]:
        """Registered entries, sorted by name."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._entries:
                self._entries[ep.name] = RegistryEntry(ep.name, ep.value, f"from {ep.value}")


tools: Registry[Any] = Registry("tool", "genagent.tools")
"""Tool factories. A factory returns a ``Tool`` or a list of tools."""

policies: Registry[Any] = Registry("policy", "genagent.policies", plural="policies")
"""Policy factories."""

rewards: Registry[Any] = Registry("reward", "genagent.rewards")
"""Reward (judge) factories, for ``--judge``."""

tools.register(
    "scene",
    "genagent.sim:scene_tools",
    description="simulator: SceneTool + SceneEditTool (offline, no weights)",
)
tools.register(
    "sim",
    "genagent.sim:scene_tools",
    description="simulator: the same as scene",
)
tools.register(
    "scene-generate",
    "genagent.sim:SceneTool",
    description="simulator: SceneTool only (GenAgent v1: generation tool only)",
)
for _name, _target, _description in (
    ("flux", "FluxTool", "FLUX.1 [dev], 28 steps (diffusers; model=... for other weights)"),
    ("flux-schnell", "_families:flux_schnell", "FLUX.1 [schnell], 4 steps (diffusers)"),
    ("flux-turbo", "_families:flux_turbo", "FLUX.1 [dev] + Turbo-Alpha LoRA, 8 steps (diffusers)"),
    ("flux+kontext", "_families:flux_and_kontext", "FLUX.1 [dev] + FLUX.1 Kontext editing"),
    ("sd3", "SD3Tool", "Stable Diffusion 3.5 Large (diffusers)"),
    ("sdxl", "SDXLTool", "Stable Diffusion XL base 1.0 (diffusers)"),
    ("qwen-image", "QwenImageTool", "Qwen-Image (diffusers)"),
    ("qwen-image+edit", "_families:qwen_image_and_edit", "Qwen-Image + Qwen-Image-Edit"),
    ("diffusers", "DiffusersTool", "any diffusers text-to-image pipeline: model=<id or folder>"),
):
    _module = "genagent.tools" + ("." if ":" in _target else ":")
    tools.register(_name, _module + _target, description=_description)

for _name, _target, _description in (
    (
        "genagent-server",
        "GenAgentServerTool",
        "a GenAgent /generate/ server (genagent serve): base_url=...",
    ),
    ("genagent-server-edit", "GenAgentServerEditTool", "an editing tool behind genagent serve"),
    (
        "openai-images",
        "OpenAIImagesTool",
        "OpenAI Images API (gpt-image-1, dall-e-3); OPENAI_API_KEY",
    ),
    ("openai-images-edit", "OpenAIImageEditTool", "OpenAI image edits (gpt-image-1, dall-e-2)"),
    ("bfl", "BFLTool", "Black Forest Labs API (flux-pro-1.1, ...); BFL_API_KEY"),
    ("bfl-edit", "BFLEditTool", "FLUX Kontext editing on the Black Forest Labs API"),
    ("fal", "FalTool", "fal.ai queue (fal-ai/flux/dev, ...); FAL_KEY"),
    ("fal-edit", "FalEditTool", "image editing on fal.ai (fal-ai/flux-pro/kontext)"),
    (
        "replicate",
        "ReplicateTool",
        "Replicate predictions (black-forest-labs/flux-dev, ...); REPLICATE_API_TOKEN",
    ),
    ("replicate-edit", "ReplicateEditTool", "editing on Replicate (flux-kontext-pro)"),
    ("comfyui", "ComfyUITool", "a ComfyUI workflow in the API format: workflow=<file>"),
    ("comfyui-edit", "ComfyUIEditTool", "a ComfyUI editing workflow (LoadImage + instruction)"),
    ("a1111", "A1111Tool", "AUTOMATIC1111 / Forge txt2img (started with --api)"),
    ("a1111-edit", "A1111EditTool", "AUTOMATIC1111 / Forge img2img"),
):
    tools.register(_name, f"genagent.tools.http:{_target}", description=_description)
rewards.register(
    "scene",
    "genagent.sim:SceneJudge",
    description="simulator: SceneJudge, strict per-constraint check of simulator images",
)
for _name, _target, _description in (
    ("checklist", "checklist", "VLM judge: GenEval++-style checklist, strict 0/1 (policy=...)"),
    ("wise", "wise", "VLM judge: WISE WiScore (consistency, realism, aesthetics; policy=...)"),
    ("wise-verified", "wise_verified", "VLM judge: WISE Verified, binary (policy=...)"),
    ("pointwise", "pointwise", "VLM judge: a 0-10 rating of criterion=... (policy=...)"),
    (
        "pairwise",
        "pairwise",
        "VLM judge: P(better than the run's previous image; reference=first|<image file>)",
    ),
):
    rewards.register(_name, f"genagent.rewards._factories:{_target}", description=_description)

policies.register(
    "heuristic",
    "genagent.sim:HeuristicPolicy",
    description="simulator: rule-based policy speaking the full GenAgent protocol",
)
