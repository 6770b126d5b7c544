"""Point an Agent at a policy served by vLLM (or any OpenAI-compatible server).

Serve the policy, for example the GenAgent weights, with the flags this example relies on:

    vllm serve <model> --limit-mm-per-prompt '{"image": 8}' --max-model-len 32768

then run (the generator here is the offline simulator; use your own tool with --tool):

    python examples/vllm_policy.py --base-url http://localhost:8000/v1 "three red apples"

The script prints each turn, the token usage and where the trajectory was saved.
"""

from __future__ import annotations

import argparse
import os

from genagent import Agent, SamplingParams, registry
from genagent.policies import OpenAIPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument(
        "--base-url", default=os.environ.get("GENAGENT_POLICY", "http://localhost:8000/v1")
    )
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--tool", default="scene", help="a registered tool (genagent list)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="vllm-run")
    args = parser.parse_args()

    policy = OpenAIPolicy(
        args.base_url,
        model=args.model,
        max_image_side=1024,  # images are sent as data URIs, downscaled to this side
        return_token_ids=True,  # vLLM: record prompt and output token ids on every turn
    )
    tools = registry.tools.create(args.tool)
    agent = Agent(
        tools if isinstance(tools, list) else [tools],
        policy=policy,
        max_rounds=args.rounds,
        sampling=SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=1024),
    )
    trajectory = agent.run(args.prompt)
    for turn in trajectory.turns:
        action = turn.action
        what = action.kind if action else f"error: {turn.error.message if turn.error else '?'}"
        print(f"turn {turn.index}: {what} ({turn.usage.completion_tokens} tokens)")
    print(
        f"{trajectory.termination.value} after {trajectory.num_rounds} image(s); "
        f"{trajectory.usage.prompt_tokens} prompt tokens, {trajectory.usage.cached_tokens} cached"
    )
    print(f"saved to {trajectory.save(args.out)}")


if __name__ == "__main__":
    main()
