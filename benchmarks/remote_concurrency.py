"""Remote generation under concurrency: 64 agent runs through a loopback generator server.

A ``genagent serve`` of a stand-in generator that takes 100 ms per image (asynchronously, like a
remote GPU) runs in its own process on 127.0.0.1; ``GenAgentServerTool`` talks to it over real
HTTP. 64 agent
runs, one generation each, run with ``run_batch(concurrency=c)`` for c in 1, 8, 32: wall time,
images per second, and the speedup over c = 1. The ideal speedup is c; the gap is HTTP,
encoding and loop overhead.

Usage: python benchmarks/remote_concurrency.py [--prompts 64] [--latency-ms 100]
       [--concurrency 1 8 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
from PIL import Image

import genagent
from genagent import Agent, GenerationTool, ScriptedPolicy, ToolContext, ToolResult
from genagent.server import make_server
from genagent.tools import GenAgentServerTool


class SlowPainter(GenerationTool):
    """A stand-in for a remote GPU: ``latency_s`` per image, awaited (not blocking the server)."""

    max_images_per_call = 8

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        await asyncio.sleep(self.latency_s * len(ctx.seeds))
        images = [Image.new("RGB", (64, 64), (seed % 256, 90, 160)) for seed in ctx.seeds]
        return ToolResult(images=images, seeds=list(ctx.seeds))


def tool_call(messages: list[Any]) -> str:
    request = next(m.text for m in messages if m.role == "user")
    call = {"name": "image_generation_tool", "arguments": {"caption": request}}
    return f"<think>Draw it.</think><tool_call>{json.dumps(call)}</tool_call>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=100.0, help="server time per image")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve is not None:  # the server process
        server = make_server(
            SlowPainter(args.latency_ms / 1000),
            port=args.serve,
            log_level="warning",
            max_concurrency=max(args.concurrency),
            max_queue=4 * args.prompts,
        )
        server.run()
        return

    # the server runs in a process of its own, as a generator server would
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, __file__, "--serve", str(port), "--latency-ms", str(args.latency_ms)]
    command += ["--prompts", str(args.prompts), "--concurrency", *map(str, args.concurrency)]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit("the benchmark server did not start")
        time.sleep(0.05)

    prompts = [f"{n} red apples left of a blue cup" for n in range(args.prompts)]
    tool = GenAgentServerTool(url, max_in_flight=max(args.concurrency))
    policy = ScriptedPolicy([tool_call, "<judge>Fine.</judge><answer>Done.</answer>"])
    agent = Agent(tool=tool, policy=policy)
    agent.run_batch(prompts[:4], concurrency=4, progress=False)  # warm-up
    results: dict[str, Any] = {}
    for concurrency in args.concurrency:
        start = time.perf_counter()
        runs = agent.run_batch(
            prompts, concurrency=concurrency, progress=False, seeds=range(args.prompts)
        )
        wall = time.perf_counter() - start
        answered = sum(1 for r in runs if r.termination.value == "answered")
        results[f"c{concurrency}_wall_s"] = wall
        results[f"c{concurrency}_images_per_s"] = args.prompts / wall
        results[f"c{concurrency}_answered"] = answered
    base = results[f"c{args.concurrency[0]}_wall_s"]
    for concurrency in args.concurrency[1:]:
        results[f"c{concurrency}_speedup"] = base / results[f"c{concurrency}_wall_s"]
    process.send_signal(signal.SIGTERM)
    process.wait(30)

    info = {
        "genagent": genagent.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "prompts": args.prompts,
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
    }
    if args.json:
        print(json.dumps({"info": info, "results": results}, indent=2))
        return
    print(" | ".join(f"{k} {v}" for k, v in info.items()))
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<28}{shown:>12}")


if __name__ == "__main__":
    main()
