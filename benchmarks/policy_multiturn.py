"""TransformersPolicy on a tiny Qwen2.5-VL (CPU): multi-turn KV reuse, and batching.

1. One 5-round run, one image per round, greedy, with and without KV reuse: prompt tokens
   encoded (prefill) and wall time; the greedy tokens must be identical.
2. 8 concurrent 2-round runs, served as batches (max_batch_size=8) and one at a time
   (max_batch_size=1): wall time; the greedy tokens must be identical.

The model is random (real Qwen2.5 tokenizer, tiny width), so every reply is answered with a new
image whatever it says: the protocol here is a stand-in that always draws.

Usage: python benchmarks/policy_multiturn.py [--tokenizer qwen|byte] [--tokens 32] [--repeat 3]
       [--hidden 256] [--layers 4] [--image-side 448] [--json]
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

import torch

import genagent
from genagent import Action, Agent, GenAgentProtocol, ProtocolState, SamplingParams, ToolCall
from genagent.policies import TransformersPolicy
from genagent.sim import SceneTool, sample_tasks
from genagent.testing import tiny_qwen2_5_vl


class AlwaysDraw(GenAgentProtocol):
    """Every reply asks for a new image (a random model writes no valid tool calls)."""

    def parse(self, reply: str, state: ProtocolState) -> Action:
        call = ToolCall(name="image_generation_tool", arguments={"caption": "a red cup"})
        return Action(kind="tool_call", thought=reply[:40], tool_call=call)


def runs(
    policy: TransformersPolicy, prompts: list[str], rounds: int, tokens: int, side: int
) -> tuple[float, list[Any]]:
    agent = Agent(
        tool=SceneTool(size=side),
        policy=policy,
        protocol=AlwaysDraw(),
        max_rounds=rounds,
        sampling=SamplingParams(max_new_tokens=tokens),
    )
    start = time.perf_counter()
    trajectories = agent.run_batch(prompts, seeds=list(range(len(prompts))), concurrency=8)
    return time.perf_counter() - start, trajectories


def outputs(trajectories: list[Any]) -> list[list[Any]]:
    return [[t.output_ids for t in traj.turns] for traj in trajectories]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per turn")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument(
        "--tokenizer",
        choices=["qwen", "byte"],
        default="qwen",
        help="qwen: the real 151k vocabulary, whose output layer makes decoding memory-bound "
        "(as for real LLMs on GPUs); byte: a 300-token vocabulary, so decoding a tiny model on "
        "a CPU is compute-bound",
    )
    parser.add_argument("--hidden", type=int, default=256, help="width of the language model")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument(
        "--image-side", type=int, default=448, help="image size (448 px: 256 visual tokens)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        tiny_qwen2_5_vl(
            folder,
            tokenizer=args.tokenizer,
            hidden_size=args.hidden,
            layers=args.layers,
            max_pixels=args.image_side * args.image_side,
        )
        base = TransformersPolicy.from_pretrained(folder, device="cpu")

    def policy(**kwargs: Any) -> TransformersPolicy:
        return TransformersPolicy(base.model, base.processor, **kwargs)

    results: dict[str, Any] = {}
    # 1. KV reuse on a 5-round run
    for label, reuse in (("reuse", True), ("full_prefill", False)):
        times, prefill, prompt = [], 0, 0
        for _ in range(args.repeat):
            p = policy(reuse_kv=reuse, max_batch_size=1)
            seconds, trajectories = runs(p, ["a red cup"], 5, args.tokens, args.image_side)
            times.append(seconds)
            prefill, prompt = p.stats.prefill_tokens, p.stats.prompt_tokens
            results[f"{label}_outputs"] = outputs(trajectories)
        results[f"{label}_wall_s"] = statistics.median(times)
        results[f"{label}_prefill_tokens"] = prefill
        results[f"{label}_prompt_tokens"] = prompt
    results["reuse_same_tokens"] = results.pop("reuse_outputs") == results.pop(
        "full_prefill_outputs"
    )
    results["prefill_reduction"] = (
        results["full_prefill_prefill_tokens"] / results["reuse_prefill_tokens"]
    )
    results["reuse_speedup"] = results["full_prefill_wall_s"] / results["reuse_wall_s"]

    # 2. batching 8 concurrent runs
    prompts = [t.prompt for t in sample_tasks(8, seed=0)]
    for label, size in (("batched", 8), ("one_at_a_time", 1)):
        times = []
        for _ in range(args.repeat):
            p = policy(max_batch_size=size, batch_wait_s=0.02)
            seconds, trajectories = runs(p, prompts, 2, args.tokens, args.image_side)
            times.append(seconds)
            results[f"{label}_outputs"] = outputs(trajectories)
            results[f"{label}_batches"] = p.stats.batches
            results[f"{label}_decode_steps"] = p.stats.decode_steps
        results[f"{label}_wall_s"] = statistics.median(times)
    results["batched_same_tokens"] = results.pop("batched_outputs") == results.pop(
        "one_at_a_time_outputs"
    )
    results["batching_speedup"] = results["one_at_a_time_wall_s"] / results["batched_wall_s"]

    info = {
        "genagent": genagent.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "tokenizer": args.tokenizer,
        "hidden": args.hidden,
        "layers": args.layers,
        "image_side": args.image_side,
        "tokens_per_turn": args.tokens,
        "repeat": args.repeat,
    }
    if args.json:
        print(json.dumps({"info": info, "results": results}, indent=2))
        return
    print(" | ".join(f"{k} {v}" for k, v in info.items()))
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<36}{shown:>12}")


if __name__ == "__main__":
    main()
