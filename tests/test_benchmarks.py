"""Benchmark scripts keep working (a smoke run with tiny settings; nothing here is timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_loop_overhead_reports_every_measure() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "loop_overhead.py"),
            "--runs",
            "3",
            "--repeat",
            "1",
            "--image-iters",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    results = report["results"]
    for key in (
        "framework_async_tool_us_per_turn",
        "framework_sync_tool_us_per_turn",
        "with_storage_64px_us_per_turn",
        "storage_1024px_us_per_image",
        "encoding_1024px_us_per_image",
        "save_us_per_turn",
        "load_us_per_turn",
    ):
        assert results[key] > 0
    assert report["info"]["rounds"] == 4


def test_policy_multiturn_reports_reuse_and_batching() -> None:
    pytest.importorskip("torch")
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "policy_multiturn.py"),
            "--tokenizer", "byte", "--tokens", "4", "--repeat", "1", "--hidden", "32",
            "--layers", "1", "--image-side", "112", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)["results"]
    assert results["reuse_same_tokens"] is True and results["batched_same_tokens"] is True
    assert results["reuse_prefill_tokens"] < results["full_prefill_prefill_tokens"]
    assert results["batched_batches"] < results["one_at_a_time_batches"]


def test_diffusers_batching_reports_throughput_and_image_equality() -> None:
    pytest.importorskip("diffusers")
    result = subprocess.run(
        [
            sys.executable, str(BENCHMARKS / "diffusers_batching.py"),
            "--runs", "3", "--size", "16", "--steps", "2", "--repeat", "1", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)["results"]
    assert results["one_at_a_time_pipeline_calls"] == 3
    assert 1 <= results["micro_batched_pipeline_calls"] <= 3
    assert results["max_pixel_diff"] <= 1 and results["values_compared"] == 3 * 16 * 16 * 3
    assert results["throughput_ratio"] > 0


def test_remote_concurrency_reports_speedups() -> None:
    pytest.importorskip("uvicorn")
    result = subprocess.run(
        [
            sys.executable, str(BENCHMARKS / "remote_concurrency.py"),
            "--prompts", "8", "--latency-ms", "50", "--concurrency", "1", "4", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)["results"]
    assert results["c1_answered"] == results["c4_answered"] == 8
    # 4 requests in flight overlap the 50 ms waits: about 4x, and well over 1.5x even on a
    # loaded 2-core machine; a client that serialised them would give 1x
    assert results["c4_speedup"] > 1.5, results


def test_attention_smoke_checks_the_kernels_against_sdpa() -> None:
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    # tiny shapes on the CPU under the Triton interpreter: the harness runs, timings mean nothing
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "attention.py"), "--smoke", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["info"]["mode"] == "smoke" and report["info"]["triton_interpret"] is True
    results = report["results"]
    assert [c["name"].split(", ")[1] for c in results["vision"]] == [
        "window attention",
        "full attention",
    ]
    for suite in ("lm", "vision", "decode"):
        assert results[suite], suite
        for case in results[suite]:
            kernel = case["results"]["kernel"]
            assert "fwd_ms" in kernel and "failed" not in kernel, (case["name"], kernel)
            assert suite == "decode" or kernel["max_grad_error"] < 1e-4, (case["name"], kernel)
    # float32: the kernel, the padded transformers batch and the per-sequence loop all agree
    # with the float32 reference to rounding
    assert results["summary"]["kernel_max_error"] < 1e-4
    assert results["summary"]["baseline_max_error"] < 1e-4
    assert results["summary"]["lm_fwd_speedup_vs_hf_sdpa"]["target"] == 3.0
