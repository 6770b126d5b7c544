"""The documentation builds, and every runnable example in it runs.

Fenced ``python`` blocks in README.md and docs/*.md, and in the docstrings of the public API,
are executed (each page's blocks in order, in a temporary working directory). Blocks fenced as
``py`` are illustrative (they need model weights or a server) and are not run.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import genagent

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)


def _blocks(text: str) -> list[str]:
    out = []
    for match in FENCE.finditer(text):
        indent = match.group("indent")
        body = match.group("body")
        lines = [
            line[len(indent) :] if line.startswith(indent) else line for line in body.splitlines()
        ]
        out.append("\n".join(lines))
    return out


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("no runnable examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for i, block in enumerate(blocks):
        code = compile(block, f"{page.name}[block {i}]", "exec", dont_inherit=True)
        exec(code, namespace)


def _public_docstrings() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    modules = [genagent]
    for info in pkgutil.walk_packages(genagent.__path__, "genagent."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        modules.append(importlib.import_module(info.name))
    seen: set[int] = set()
    for module in modules:
        for name, obj in [(module.__name__, module), *vars(module).items()]:
            if id(obj) in seen or not (
                inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj)
            ):
                continue
            if not str(getattr(obj, "__module__", None) or obj.__name__).startswith("genagent"):
                continue  # re-exported third-party objects (pydantic's BaseModel, ...)
            seen.add(id(obj))
            doc = inspect.getdoc(obj) or ""
            if "```python" in doc:
                found.append((f"{getattr(obj, '__module__', module.__name__)}.{name}", doc))
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    member_doc = inspect.getdoc(member) or ""
                    if "```python" in member_doc and id(member) not in seen:
                        seen.add(id(member))
                        found.append((f"{obj.__module__}.{obj.__qualname__}.{attr}", member_doc))
    return sorted(found)


DOCSTRINGS = _public_docstrings()


@pytest.mark.parametrize("where,doc", DOCSTRINGS, ids=[w for w, _ in DOCSTRINGS])
def test_docstring_examples_run(
    where: str, doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for i, block in enumerate(_blocks(doc)):
        exec(compile(block, f"{where}[block {i}]", "exec", dont_inherit=True), namespace)


def test_docstring_examples_are_found() -> None:
    # guard against the collector silently finding nothing
    assert any(w.endswith("Agent") for w, _ in DOCSTRINGS)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    # the docs extra is part of the test set-up: a missing mkdocs is a failure, not a skip
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "mkdocs"),
            "build",
            "--strict",
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
