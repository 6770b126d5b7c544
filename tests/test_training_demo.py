"""The CPU training demonstration runs end to end (``--quick``; no thresholds on learning)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "training_demo.py"


def test_training_demo_quick_runs_every_stage(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["setting"] == "quick"
    assert [s["stage"] for s in report["stages"]] == ["before SFT", "after SFT", "after RL"]
    for stage in [*report["stages"], report["teacher"]]:
        assert stage["runs"] == report["held_out_tasks"] > 0
        assert stage["replies"] >= stage["runs"]
        assert 0 <= stage["parsed"] <= stage["replies"]
        assert 0.0 <= stage["parsed_fraction"] <= 1.0
        low, high = stage["parsed_ci95"]
        assert 0.0 <= low <= stage["parsed_fraction"] <= high <= 1.0
        for key in ("reward_strict", "reward_fraction", "answered_fraction"):
            assert 0.0 <= stage[key] <= 1.0
            low, high = (
                stage[f"{key}_ci95"] if key != "answered_fraction" else stage["answered_ci95"]
            )
            assert 0.0 <= low <= high <= 1.0
        assert stage["wall_s"] >= 0
    # the teacher speaks the protocol: every reply parses
    assert report["teacher"]["parsed_fraction"] == 1.0
    assert report["sft"]["steps"] >= 1 and report["sft"]["rows"] == report["train_tasks"]
    assert report["rl"]["steps"] == report["settings"]["rl_steps"]
    assert (tmp_path / "sft" / "final" / "model").is_dir()
    assert (tmp_path / "rl" / "final" / "model").is_dir()
    assert report["total_s"] > 0
    # paired changes between consecutive stages, on the same held-out tasks
    assert [(c["from"], c["to"], c["reward"]) for c in report["changes"]] == [
        ("before SFT", "after SFT", "fraction"),
        ("before SFT", "after SFT", "strict"),
        ("after SFT", "after RL", "fraction"),
        ("after SFT", "after RL", "strict"),
    ]
    stages = {s["stage"]: s for s in report["stages"]}
    for change in report["changes"]:
        before, after = stages[change["from"]], stages[change["to"]]
        key = change["reward"]
        assert len(before[f"per_run_{key}"]) == len(after[f"per_run_{key}"]) == before["runs"]
        assert change["better"] + change["worse"] + change["same"] == before["runs"]
        expected = after[f"reward_{key}"] - before[f"reward_{key}"]
        assert abs(change["mean"] - expected) < 1e-9
        low, high = change["ci95"]
        assert low <= change["mean"] <= high


def test_training_demo_table(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import training_demo
    finally:
        sys.path.remove(str(SCRIPT.parent))
    row = {
        "stage": "after SFT",
        "runs": 4,
        "replies": 8,
        "parsed": 8,
        "parsed_fraction": 1.0,
        "parsed_ci95": [0.676, 1.0],
        "runs_all_parsed": 4,
        "reward_strict": 0.25,
        "reward_strict_ci95": [0.0, 0.74],
        "reward_fraction": 0.5,
        "reward_fraction_ci95": [0.2, 0.8],
        "answered": 1,
        "wall_s": 3.0,
    }
    text = training_demo.table({"stages": [row], "teacher": {**row, "stage": "heuristic teacher"}})
    assert "| after SFT | 8/8 = 100.0% (67.6%-100.0%) | 4/4 | 0.250 (0.000-0.740)" in text
    assert "heuristic teacher" in text
