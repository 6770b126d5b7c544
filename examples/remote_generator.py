"""Share one generator among many agents: `genagent serve` + `GenAgentServerTool`.

On a GPU box you would run:

    genagent serve --tool flux --host 0.0.0.0 --port 8000

and point every agent at it with `GenAgentServerTool("http://gpu-box:8000")`. This example does
both on this machine, offline: it serves the simulator's generator (SIMULATOR: glyph drawings)
in a subprocess, runs 16 agents against it concurrently, prints what the server saw, and shuts
the server down gracefully.

    python examples/remote_generator.py [--tool scene-generate] [--runs 16]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time

import httpx

from genagent import Agent
from genagent.sim import sample_tasks
from genagent.tools import GenAgentServerTool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", default="scene-generate", help="a registered tool to serve")
    parser.add_argument("--runs", type=int, default=16)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "genagent", "serve", "--tool", args.tool, "--port", str(port),
         "--max-concurrency", "8", "--log-level", "warning"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until the tool has loaded
            try:
                if httpx.get(f"{url}/health", timeout=1).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.1)

        tool = GenAgentServerTool(url)
        agent = Agent(tool=tool, policy="heuristic", max_rounds=3)  # SIMULATOR policy
        tasks = sample_tasks(args.runs, seed=0)
        start = time.perf_counter()
        runs = agent.run_batch(tasks, seeds=range(args.runs), concurrency=args.runs)
        wall = time.perf_counter() - start
        images = sum(run.num_rounds for run in runs)
        answered = sum(run.termination.value == "answered" for run in runs)
        print(f"{len(runs)} runs, {images} images from {url} in {wall:.2f} s")
        print(f"answered: {answered} of {len(runs)}")
        health = httpx.get(f"{url}/health").json()
        print(f"server: {health['served']} requests served by {health['tool']}")
    finally:
        server.send_signal(signal.SIGTERM)  # graceful: in-flight requests finish first
        server.wait(30)
    print("server stopped")


if __name__ == "__main__":
    main()
