"""Hooks that log every step and refuse a forbidden caption, over a batch of runs.

Runs offline on the simulator. Run: python examples/hooks_and_batches.py
"""

from __future__ import annotations

import logging
from collections import Counter

from genagent import Agent, Hooks, RunContext, ToolCall, ToolRefused, Trajectory, Turn
from genagent.sim import sample_tasks


class StepLog(Hooks):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    async def on_turn_end(self, ctx: RunContext, turn: Turn) -> None:
        kind = turn.action.kind if turn.action else "error"
        self.counts[kind] += 1
        logging.info("run %s turn %d: %s", ctx.run_id[:8], turn.index, kind)

    async def on_run_end(self, ctx: RunContext, trajectory: Trajectory) -> None:
        self.counts[f"end:{trajectory.termination.value}"] += 1


class NoGiraffes(Hooks):
    async def before_tool(self, ctx: RunContext, call: ToolCall) -> ToolCall | None:
        if "giraffe" in str(call.arguments).lower():
            raise ToolRefused("giraffes are not allowed here", hint="Leave the giraffe out.")
        return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    log = StepLog()
    agent = Agent(hooks=[log, NoGiraffes()], max_rounds=3)
    trajectories = agent.run_batch(sample_tasks(24, seed=0), seeds=list(range(24)), concurrency=4)
    print(dict(sorted(log.counts.items())))
    refused = sum(
        1
        for t in trajectories
        for turn in t.turns
        if turn.error and turn.error.type == "ToolRefused"
    )
    print(f"{len(trajectories)} runs, {refused} refused calls")
