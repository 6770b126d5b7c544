"""A custom generation tool, written two ways, driven by a policy that speaks the GenAgent protocol.

Run: python examples/custom_tool.py
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw

from genagent import (
    Agent,
    GenerationTool,
    Message,
    SamplingParams,
    ToolContext,
    ToolResult,
    tool,
)
from genagent.policies import FunctionPolicy
from genagent.tools import GenerationArgs


class PosterTool(GenerationTool):
    """A toy 'generator' that prints the caption on a poster (a stand-in for a real model)."""

    description = "Generate a poster that shows the caption. Returns the image."
    max_images_per_call = 8  # one call can make all the candidates

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self.loaded = False

    def setup(self) -> None:
        # heavy work (loading weights, opening clients) belongs here: it runs once, lazily
        self.loaded = True

    def __call__(self, args: GenerationArgs, ctx: ToolContext) -> ToolResult:
        images = []
        for seed in ctx.seeds:  # one image per requested candidate
            hue = (seed * 47) % 255
            image = Image.new("RGB", (self.size, self.size), (hue, 200, 255 - hue))
            text = "\n".join(textwrap.wrap(args.caption, 18)[:6])
            ImageDraw.Draw(image).multiline_text((6, 6), text, fill="black")
            images.append(image)
        return ToolResult(images=images, seeds=list(ctx.seeds), metadata={"size": self.size})


@tool
def solid(caption: str, ctx: ToolContext) -> Image.Image:
    """Paint the image in the first colour word of the caption.

    Args:
        caption: What to draw; its first colour word sets the colour.
    """
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    colour = next((w for w in caption.lower().split() if w in colours), "gray")
    return Image.new("RGB", (64, 64), colour)


def two_step_policy(
    messages: Sequence[Message], stop: Sequence[str], sampling: SamplingParams | None
) -> str:
    """Generate once with a detailed caption, then accept the image."""
    request = next(m.text for m in messages if m.role == "user")
    if not any(m.images for m in messages):
        call = {"name": "image_generation_tool", "arguments": {"caption": f"{request}, detailed"}}
        return f"<think>Write a caption.</think><tool_call>{json.dumps(call)}</tool_call>"
    return "<judge>Looks right.</judge><answer>Done.</answer>"


if __name__ == "__main__":
    poster = PosterTool()
    agent = Agent(tool=poster, policy=FunctionPolicy(two_step_policy), candidates=3)
    trajectory = agent.run("a red kite over the sea", seed=0)
    print("class tool:", trajectory.termination.value, len(trajectory.images), "images")
    print("setup ran:", poster.loaded, "| seeds:", trajectory.turns[0].tool_result.seeds)
    print("schema:", json.dumps(PosterTool.schema()["function"]["parameters"]["required"]))

    trajectory = Agent(tool=solid, policy=FunctionPolicy(two_step_policy)).run("a blue sky")
    print("@tool:", trajectory.termination.value, trajectory.final_image.getpixel((0, 0)))
    trajectory.save("custom-tool-run")
    print("saved to custom-tool-run/")
