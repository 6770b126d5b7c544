"""Registries of tools, policies and judges: what the CLI's --tool / --policy / --judge use."""

from __future__ import annotations

from typing import Any

import pytest

from genagent import ConfigurationError, registry
from genagent.registry import Registry


def make(size: int = 8) -> dict[str, int]:
    return {"size": size}


class Factories:
    @staticmethod
    def nested(size: int = 1) -> dict[str, int]:
        return {"nested": size}


def broken(**kwargs: Any) -> None:
    raise RuntimeError("weights missing")


def test_register_and_create_with_arguments() -> None:
    reg: Registry[Any] = Registry("thing", "genagent.tests.things")
    reg.register("a", make, description="makes a thing")
    assert reg.create("a", size=3) == {"size": 3}
    assert reg.names() == ["a"] and "a" in reg
    assert reg.entries()[0].description == "makes a thing"


def test_register_works_as_a_decorator_and_refuses_duplicates() -> None:
    reg: Registry[Any] = Registry("thing", "genagent.tests.things")

    @reg.register("b")
    def b() -> str:
        return "b"

    assert reg.create("b") == "b"
    with pytest.raises(ConfigurationError, match="already registered"):
        reg.register("b", make)
    reg.register("b", make, overwrite=True)
    assert reg.create("b") == {"size": 8}


def test_string_targets_are_imported_lazily_with_dotted_attribute_paths() -> None:
    reg: Registry[Any] = Registry("thing", "genagent.tests.things")
    reg.register("nested", f"{__name__}:Factories.nested")
    assert reg.create("nested", size=2) == {"nested": 2}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (f"{__name__}:missing", "has no 'missing'"),
        ("genagent_no_such_module:thing", "check the module path"),
        ("torch_not_installed_here.sub:thing", "check the module path"),
    ],
)
def test_bad_targets_are_configuration_errors(target: str, message: str) -> None:
    reg: Registry[Any] = Registry("thing", "genagent.tests.things")
    reg.register("x", target)
    with pytest.raises(ConfigurationError, match=message):
        reg.create("x")


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    reg: Registry[Any] = Registry("thing", "genagent.tests.things")
    reg.register("flux", "diffusers:FluxPipeline")
    with pytest.raises(ConfigurationError, match=r"genagent\[diffusers\]"):
        reg.create("flux")


def test_unknown_names_list_the_known_ones_with_the_right_plural() -> None:
    # (other tests and doc examples may register more names: only the built-ins are checked)
    with pytest.raises(ConfigurationError, match=r"known policies: .*heuristic"):
        registry.policies.create("nope")
    with pytest.raises(ConfigurationError, match=r"known tools: .*scene"):
        registry.tools.create("nope")


def test_wrong_arguments_and_failing_factories_are_configuration_errors() -> None:
    reg: Registry[Any] = Registry("thing", "genagent.tests.things")
    reg.register("a", make)
    reg.register("broken", broken)
    with pytest.raises(ConfigurationError, match="does not take these arguments"):
        reg.create("a", colour="red")
    with pytest.raises(ConfigurationError, match="failed to build: RuntimeError: weights missing"):
        reg.create("broken")


def test_built_in_entries() -> None:
    assert {"scene", "scene-generate"} <= set(registry.tools.names())
    assert "heuristic" in registry.policies.names()
    assert "scene" in registry.rewards.names()
    tools = registry.tools.create("scene", size=64)
    assert [t.name for t in tools] == ["image_generation_tool", "image_editing_tool"]


def test_third_party_entry_points_are_found(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # an installed package declaring `[project.entry-points."genagent.tools"]`
    (tmp_path / "acme_tools.py").write_text(
        "from genagent.sim import SceneTool\ndef make(size=64):\n    return SceneTool(size=size)\n"
    )
    info = tmp_path / "acme_tools-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-tools\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[genagent.tools]\nacme = acme_tools:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry[Any] = Registry("tool", "genagent.tools")
    assert "acme" in reg.names()
    assert reg.create("acme", size=32).size == 32
