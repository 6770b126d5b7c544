"""Micro-batching of a local diffusers tool: concurrent agent runs on a tiny FLUX pipeline (CPU).

8 agent runs share one FluxTool; each makes one generation call. Served micro-batched
(``max_batch_size=8``: compatible calls coalesce into one pipeline call) and one at a time
(``max_batch_size=1``): wall time, images per second, pipeline calls, and how far every run's
image is from its one-at-a-time twin (the same seeds must give the same images; batched float32
kernels may round the last bit differently, which can move a value by one 8-bit level).

The pipeline is the real FluxPipeline with a tiny config and random weights (genagent.testing),
saved to a temporary folder and loaded by the tool.

Usage: python benchmarks/diffusers_batching.py [--runs 8] [--size 32] [--steps 4]
       [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

import genagent
from genagent import Agent, ScriptedPolicy
from genagent.testing import tiny_diffusers_pipeline
from genagent.tools import FluxTool

PROMPTS = [
    "three red apples left of a blue cup",
    "a green bicycle below a yellow kite",
    "two black cats on a white sofa",
    "a purple umbrella right of an orange car",
    "four white sheep in a green field",
    "a brown dog above a red ball",
    "a pink flamingo next to a grey elephant",
    "five yellow bananas on a wooden table",
]


def tool_call(messages: list[Any]) -> str:
    request = next(m.text for m in messages if m.role == "user")
    call = {"name": "image_generation_tool", "arguments": {"caption": request}}
    return f"<think>Draw it.</think><tool_call>{json.dumps(call)}</tool_call>"


def run(tool: FluxTool, prompts: list[str]) -> tuple[float, list[Any]]:
    policy = ScriptedPolicy([tool_call, "<judge>Fine.</judge><answer>Done.</answer>"])
    agent = Agent(tool=tool, policy=policy, seed_policy="fixed")
    start = time.perf_counter()
    trajectories = agent.run_batch(prompts, seeds=range(len(prompts)), concurrency=len(prompts))
    return time.perf_counter() - start, trajectories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="concurrent agent runs")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.runs)]

    with tempfile.TemporaryDirectory() as folder:
        tiny_diffusers_pipeline("flux", folder)
        loaded = FluxTool(folder, device="cpu")
        loaded.setup()
    settings = {
        "device": "cpu",
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "max_sequence_length": 32,
        "max_wait_s": 0.02,
    }
    results: dict[str, Any] = {}
    images: dict[str, list[Any]] = {}
    for label, size in (("micro_batched", args.runs), ("one_at_a_time", 1)):
        times = []
        for _ in range(args.repeat + 1):  # the first is a warm-up
            tool = FluxTool(loaded.pipe, max_batch_size=size, **settings)
            seconds, trajectories = run(tool, prompts)
            times.append(seconds)
        times = times[1:]
        results[f"{label}_wall_s"] = statistics.median(times)
        results[f"{label}_images_per_s"] = args.runs / statistics.median(times)
        results[f"{label}_pipeline_calls"] = tool.batcher_stats.batches
        images[label] = [np.asarray(t.final_image, dtype=np.int16) for t in trajectories]
    diff = np.abs(np.stack(images["micro_batched"]) - np.stack(images["one_at_a_time"]))
    results["identical_images"] = bool(diff.max() == 0)
    results["max_pixel_diff"] = int(diff.max())  # in 8-bit levels
    results["values_differing"] = int((diff > 0).sum())
    results["values_compared"] = int(diff.size)
    results["throughput_ratio"] = (
        results["micro_batched_images_per_s"] / results["one_at_a_time_images_per_s"]
    )

    info = {
        "genagent": genagent.__version__,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "size": args.size,
        "steps": args.steps,
        "repeat": args.repeat,
    }
    if args.json:
        print(json.dumps({"info": info, "results": results}, indent=2))
        return
    print(" | ".join(f"{k} {v}" for k, v in info.items()))
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<32}{shown:>12}")


if __name__ == "__main__":
    main()
