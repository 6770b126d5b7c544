"""The offline simulator: a stand-in generator, judge and policy (SIMULATOR, not real models).

It keeps the whole agent loop honest and measurable on a CPU with no weights:

* :class:`SceneTool` draws a caption's scene as labelled glyphs, making the mistakes real
  generators make, more often for complex scenes and less often for explicit captions;
* :class:`SceneEditTool` applies edit instructions to simulator images;
* :class:`SceneJudge` scores an image against a task, per constraint, from the record every
  simulator image embeds;
* :class:`HeuristicPolicy` speaks the full GenAgent protocol using what the images show;
* :func:`sample_tasks` makes GenEval++-style tasks.

See ``docs/simulator.md`` for the error model.
"""

from genagent.sim._generator import BASE_ERROR, EXPLICIT_FACTOR, ErrorModel
from genagent.sim._render import RECORD_KEY, SceneRecord, read_record
from genagent.sim._scene import (
    CheckResult,
    Constraint,
    DrawnObject,
    ObjectSpec,
    SceneSpec,
    check_scene,
    parse_caption,
)
from genagent.sim.judge import SceneJudge
from genagent.sim.policy import HeuristicPolicy, write_caption
from genagent.sim.tasks import CATEGORIES, sample_tasks
from genagent.sim.tools import EDIT_SUCCESS, SceneEditTool, SceneTool, parse_edit, scene_tools

__all__ = [
    "BASE_ERROR",
    "CATEGORIES",
    "EDIT_SUCCESS",
    "EXPLICIT_FACTOR",
    "RECORD_KEY",
    "CheckResult",
    "Constraint",
    "DrawnObject",
    "ErrorModel",
    "HeuristicPolicy",
    "ObjectSpec",
    "SceneEditTool",
    "SceneJudge",
    "SceneRecord",
    "SceneSpec",
    "SceneTool",
    "check_scene",
    "parse_caption",
    "parse_edit",
    "read_record",
    "sample_tasks",
    "scene_tools",
    "write_caption",
]
