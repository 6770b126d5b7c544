"""genagent's core and the simulator demo work where torch and friends are not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCK = """
import importlib.abc, sys

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "diffusers", "triton", "accelerate"}:
            raise ImportError(f"{name} is blocked for this test")
        return None

sys.meta_path.insert(0, _Block())
"""


def test_core_api_and_demo_run_without_torch(tmp_path: Path) -> None:
    code = BLOCK + (
        "from genagent import Agent, Reward, Tool, Trajectory\n"
        "from genagent.sim.demo import run_demo\n"
        "report = run_demo(16, rounds=2, out='out', progress=False)\n"
        "assert report.per_round[-1].value >= report.single_shot.value\n"
        "t = Agent().run('two cats', seed=0)\n"
        "t.save('one'); assert Trajectory.load('one') == t\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_demo_runs_without_torch(tmp_path: Path) -> None:
    code = BLOCK + ("from genagent.cli import main\nmain(['demo', '--tasks', '8', '--no-save'])\n")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "single-shot" in result.stdout
