"""Run agents on a local diffusers generator, micro-batched across concurrent runs.

With real weights and a policy (a vLLM server, a local model, see docs/policies.md):

    python examples/local_generator.py --model black-forest-labs/FLUX.1-dev \
        --policy http://localhost:8000/v1 --offload model "three red apples left of a blue cup"

Without --model it builds a tiny random FLUX pipeline offline (its images are noise) and a
scripted policy, to show the wiring: concurrent runs share pipeline calls, every image records
its seed, and the same seed gives the same image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

from genagent import Agent, Message, ScriptedPolicy
from genagent.tools import FluxTool

PROMPTS = [
    "three red apples left of a blue cup",
    "a green bicycle below a yellow kite",
    "two black cats on a white sofa",
    "a purple umbrella right of an orange car",
]


def caption_of(messages: list[Message]) -> str:
    """The scripted policy's tool call: the user's request as the caption."""
    request = next(m.text for m in messages if m.role == "user")
    call = {"name": "image_generation_tool", "arguments": {"caption": request}}
    return f"<think>Draw exactly what was asked.</think><tool_call>{json.dumps(call)}</tool_call>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="*", default=PROMPTS)
    parser.add_argument("--model", help="model id or folder (default: a tiny offline FLUX)")
    parser.add_argument("--preset", default="dev", choices=["dev", "schnell", "turbo"])
    parser.add_argument("--policy", help="URL, model id or folder (default: scripted)")
    parser.add_argument("--offload", choices=["model", "sequential"])
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--out", default="local-runs")
    args = parser.parse_args()

    settings: dict[str, Any] = {"offload": args.offload, "max_batch_size": args.max_batch_size}
    model = args.model
    if model is None:
        from genagent.testing import tiny_diffusers_pipeline

        model = str(tiny_diffusers_pipeline("flux", tempfile.mkdtemp(prefix="tiny-flux-")))
        settings.update(width=32, height=32, steps=4, max_sequence_length=32, device="cpu")
        print("generator: a tiny random FLUX pipeline (offline demo; its images are noise)")
    tool = FluxTool(model, preset=args.preset, **settings)

    if args.policy:
        from genagent.policies import policy_from_spec

        policy = policy_from_spec(args.policy)
    else:
        policy = ScriptedPolicy([caption_of, "<judge>It matches.</judge><answer>Done.</answer>"])
    agent = Agent(tool=tool, policy=policy, candidates=args.candidates, seed_policy="fixed")

    runs = agent.run_batch(args.prompts, seeds=range(len(args.prompts)))
    tool_calls = 0
    for prompt, trajectory in zip(args.prompts, runs, strict=True):
        outcome = trajectory.turns[0].tool_result if trajectory.turns else None
        seeds = outcome.seeds if outcome else []
        tool_calls += sum(1 for t in trajectory.turns if t.tool_result is not None)
        print(f"{trajectory.termination.value}: {prompt!r} seeds={seeds}")
        trajectory.save(f"{args.out}/{trajectory.id}")
    stats = tool.batcher_stats
    print(
        f"{len(runs)} runs, {tool_calls} tool calls in {stats.batches} pipeline call(s) "
        f"(largest: {stats.largest_batch} images)"
    )

    # the recorded seed regenerates the recorded image
    turn = runs[0].turns[0] if runs[0].turns else None
    call = turn.action.tool_call if turn and turn.action else None
    outcome = turn.tool_result if turn else None
    if call is not None and outcome is not None and outcome.images:
        caption = str(call.arguments["caption"])
        (again,) = tool.generate(caption, seeds=outcome.seeds[:1])
        same = again.tobytes() == runs[0].images[outcome.images[0]].open().tobytes()
        print(f"same seed, same image: {same}")
    print(f"trajectories saved under {args.out}/")


if __name__ == "__main__":
    main()
