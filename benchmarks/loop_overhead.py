"""Framework overhead of the agent loop, per turn, with image work reported separately.

The policy is a ScriptedPolicy (no model) and the tool returns a ready-made image instantly, so
what is left is genagent itself: building messages, parsing the reply, validating arguments,
recording the turn, running the (empty) hooks. Image handling is measured on its own:

* framework: runs with a store that skips validation (the image is already a ready reference)
* storage: ``ImageStore.put`` of encoded PNG bytes (decode check, decompression-bomb guard, hash)
* encoding: PIL image -> PNG bytes (what a tool returning PIL images costs)
* persistence: ``Trajectory.save`` / ``Trajectory.load`` (with hash verification) per turn

Usage: python benchmarks/loop_overhead.py [--runs 300] [--rounds 4] [--repeat 5] [--image-iters 200]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from typing import Any

from PIL import Image

import genagent
from genagent import (
    Agent,
    GenerationTool,
    ImageRef,
    MemoryImageStore,
    ScriptedPolicy,
    ToolContext,
    ToolResult,
    Trajectory,
)
from genagent.images import encode_png, inspect_image

CALL = (
    "<think>I will draw it.</think>\n<judge>Not yet right.</judge>\n"
    '<tool_call>\n{"name": "image_generation_tool", "arguments": {"caption": "three red apples '
    'on the left and a blue cup on the right"}}\n</tool_call>'
)


def png(side: int) -> bytes:
    """A photo-like PNG: smooth colour fields plus fine grain, so it compresses like a real
    generated image (neither a flat colour nor pure noise)."""
    rng = random.Random(side)
    coarse = Image.frombytes("RGB", (side // 8, side // 8), rng.randbytes((side // 8) ** 2 * 3))
    smooth = coarse.resize((side, side), Image.Resampling.BICUBIC)
    grain = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    return encode_png(Image.blend(smooth, grain, 0.08))


class InstantTool(GenerationTool):
    """Returns the same encoded PNG immediately (async: no worker thread)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult(images=[self.data for _ in ctx.seeds])


class InstantSyncTool(InstantTool):
    """The same, as a sync tool (the agent runs it in a worker thread)."""

    def __call__(self, args: Any, ctx: ToolContext) -> ToolResult:
        return ToolResult(images=[self.data for _ in ctx.seeds])

    acall = GenerationTool.acall  # type: ignore[assignment]


class TrustingStore(MemoryImageStore):
    """Skips validation and hashing: isolates the framework from image handling."""

    def __init__(self, ref: ImageRef) -> None:
        super().__init__()
        self.ref = ref

    def put(self, image: Any) -> ImageRef:
        return self.ref.bind(self)

    def _read(self, ref: ImageRef) -> bytes:
        raise KeyError(ref.sha256)


def time_runs(agent: Agent, runs: int) -> tuple[float, int]:
    """Seconds for ``runs`` sequential runs, and the number of turns they made."""

    async def go() -> tuple[float, int]:
        turns = 0
        start = time.perf_counter()
        for i in range(runs):
            trajectory = await agent.arun("three red apples and a blue cup", seed=i)
            turns += len(trajectory.turns)
        return time.perf_counter() - start, turns

    return asyncio.run(go())


def per_call(fn: Any, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="runs per measurement")
    parser.add_argument("--rounds", type=int, default=4, help="images per run")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (median reported)")
    parser.add_argument(
        "--image-iters", type=int, default=200, help="calls per image measurement (1024 px: /5)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    small = png(64)
    ref = inspect_image(small)
    replies = [CALL] * args.rounds

    def agent(tool: GenerationTool, store: Any) -> Agent:
        return Agent(
            tool=tool,
            policy=ScriptedPolicy(replies, cycle=True),
            max_rounds=args.rounds,
            image_store=store,
            seed=0,
        )

    results: dict[str, float] = {}
    configs = {
        "framework_async_tool_us_per_turn": agent(InstantTool(small), lambda: TrustingStore(ref)),
        "framework_sync_tool_us_per_turn": agent(
            InstantSyncTool(small), lambda: TrustingStore(ref)
        ),
        "with_storage_64px_us_per_turn": agent(InstantTool(small), MemoryImageStore),
    }
    time_runs(configs["framework_async_tool_us_per_turn"], 20)  # warm-up
    for name, configured in configs.items():
        samples = []
        for _ in range(args.repeat):
            seconds, turns = time_runs(configured, args.runs)
            samples.append(1e6 * seconds / turns)
        results[name] = statistics.median(samples)

    for side in (64, 512, 1024):
        data = png(side)
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        store = MemoryImageStore()
        n = args.image_iters if side <= 512 else max(1, args.image_iters // 5)
        results[f"storage_{side}px_us_per_image"] = 1e6 * per_call(
            lambda d=data, s=store: s.put(d), n
        )
        results[f"encoding_{side}px_us_per_image"] = 1e6 * per_call(lambda p=pil: encode_png(p), n)

    trajectory = agent(InstantTool(small), MemoryImageStore).run("three red apples", seed=0)
    with tempfile.TemporaryDirectory() as folder:
        results["save_us_per_turn"] = (
            1e6 * per_call(lambda: trajectory.save(folder), 50) / len(trajectory.turns)
        )
        results["load_us_per_turn"] = (
            1e6 * per_call(lambda: Trajectory.load(folder), 50) / len(trajectory.turns)
        )

    info = {
        "genagent": genagent.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "runs": args.runs,
        "rounds": args.rounds,
        "repeat": args.repeat,
    }
    if args.json:
        print(json.dumps({"info": info, "results": results}, indent=2))
        return
    print(f"genagent {info['genagent']} | Python {info['python']} | {info['machine']}")
    print(
        f"{args.runs} runs x {args.rounds} rounds ({args.rounds + 1} turns each), "
        f"median of {args.repeat}"
    )
    print(f"{'measure':<40}{'value':>12}")
    for name, value in results.items():
        print(f"{name:<40}{value:>12.1f}")
    overhead = results["framework_async_tool_us_per_turn"]
    print(f"\nframework overhead per turn: {overhead / 1000:.3f} ms (target < 1 ms)")


if __name__ == "__main__":
    main()
