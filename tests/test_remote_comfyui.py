"""ComfyUITool / ComfyUIEditTool against a real HTTP server on 127.0.0.1 that acts as ComfyUI.

The fake speaks the ComfyUI routes the adapter uses (``POST /prompt``, ``GET /history/{id}``,
``GET /view``, ``POST /upload/image``, ``GET``/``POST /queue``, ``POST /interrupt``), records
every workflow it is sent, and draws each image in a colour derived from the seed it was
given, so tests can check which seed produced which image.
"""

from __future__ import annotations

import asyncio
import copy
import email.parser
import email.policy
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs

import pytest
from PIL import Image

from genagent import (
    Agent,
    ConfigurationError,
    ScriptedPolicy,
    Task,
    Termination,
    ToolContext,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tools import EditArgs, GenerationArgs
from genagent.tools.http.comfyui import ComfyUIEditTool, ComfyUITool

from ._servers import Recorded, Reply, ScriptedServer

SECRET = "comfy-SECRET-123"
NOWHERE = "http://127.0.0.1:9"  # for tools that must not reach a server

# A text-to-image graph as ComfyUI's "Export (API)" writes it (SD 1.5 default workflow, plus a
# PreviewImage whose images are not the result).
WORKFLOW: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286, "steps": 20, "cfg": 8.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["5", 0],
        },
        "_meta": {"title": "KSampler"},
    },
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
        "_meta": {"title": "Load Checkpoint"},
    },
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 512, "height": 512, "batch_size": 4},
        "_meta": {"title": "Empty Latent Image"},
    },
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a placeholder", "clip": ["4", 1]},
        "_meta": {"title": "Positive Prompt"},
    },
    "7": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "blurry, text, watermark", "clip": ["4", 1]},
        "_meta": {"title": "Negative Prompt"},
    },
    "8": {
        "class_type": "VAEDecode",
        "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
        "_meta": {"title": "VAE Decode"},
    },
    "9": {
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
        "_meta": {"title": "Save Image"},
    },
    "10": {
        "class_type": "PreviewImage",
        "inputs": {"images": ["8", 0]},
        "_meta": {"title": "Preview Image"},
    },
}  # fmt: skip

# Flux dev with SamplerCustomAdvanced: the caption reaches the sampler through FluxGuidance and
# BasicGuider, the seed is RandomNoise's noise_seed, the size EmptySD3LatentImage's.
FLUX: dict[str, Any] = {
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["11", 0]},
          "_meta": {"title": "CLIP Text Encode (Positive Prompt)"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "flux", "images": ["8", 0]}},
    "10": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    "11": {"class_type": "DualCLIPLoader",
           "inputs": {"clip_name1": "t5xxl_fp16.safetensors", "clip_name2": "clip_l.safetensors",
                      "type": "flux"}},
    "12": {"class_type": "UNETLoader",
           "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
    "13": {"class_type": "SamplerCustomAdvanced",
           "inputs": {"noise": ["25", 0], "guider": ["22", 0], "sampler": ["16", 0],
                      "sigmas": ["17", 0], "latent_image": ["27", 0]}},
    "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
    "17": {"class_type": "BasicScheduler",
           "inputs": {"scheduler": "simple", "steps": 20, "denoise": 1.0, "model": ["12", 0]}},
    "22": {"class_type": "BasicGuider", "inputs": {"model": ["12", 0], "conditioning": ["26", 0]}},
    "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
    "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
    "27": {"class_type": "EmptySD3LatentImage",
           "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
}  # fmt: skip

# Qwen-Image-Edit: the instruction goes to the positive TextEncodeQwenImageEdit's "prompt", the
# current image to LoadImage.
EDIT: dict[str, Any] = {
    "3": {"class_type": "KSampler",
          "inputs": {"seed": 0, "steps": 20, "cfg": 2.5, "sampler_name": "euler",
                     "scheduler": "simple", "denoise": 1.0, "model": ["75", 0],
                     "positive": ["76", 0], "negative": ["77", 0], "latent_image": ["88", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["39", 0]}},
    "37": {"class_type": "UNETLoader",
           "inputs": {"unet_name": "qwen_image_edit.safetensors", "weight_dtype": "default"}},
    "38": {"class_type": "CLIPLoader",
           "inputs": {"clip_name": "qwen_2.5_vl_7b.safetensors", "type": "qwen_image"}},
    "39": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
    "60": {"class_type": "SaveImage", "inputs": {"filename_prefix": "edit", "images": ["8", 0]}},
    "75": {"class_type": "ModelSamplingAuraFlow", "inputs": {"shift": 3, "model": ["37", 0]}},
    "76": {"class_type": "TextEncodeQwenImageEdit",
           "inputs": {"prompt": "", "clip": ["38", 0], "vae": ["39", 0], "image": ["93", 0]},
           "_meta": {"title": "Instruction"}},
    "77": {"class_type": "TextEncodeQwenImageEdit",
           "inputs": {"prompt": "", "clip": ["38", 0], "vae": ["39", 0], "image": ["93", 0]}},
    "78": {"class_type": "LoadImage", "inputs": {"image": "example.png"},
           "_meta": {"title": "Load Image"}},
    "88": {"class_type": "VAEEncode", "inputs": {"pixels": ["93", 0], "vae": ["39", 0]}},
    "93": {"class_type": "ImageScaleToTotalPixels",
           "inputs": {"upscale_method": "lanczos", "megapixels": 1.0, "image": ["78", 0]}},
}  # fmt: skip


def generation_call(caption: str) -> str:
    arguments = {"name": "image_generation_tool", "arguments": {"caption": caption}}
    return f"<think>Draw it.</think><tool_call>{json.dumps(arguments)}</tool_call>"


def edit_call(instruction: str) -> str:
    arguments = {"name": "image_editing_tool", "arguments": {"instruction": instruction}}
    return f"<judge>Almost.</judge><tool_call>{json.dumps(arguments)}</tool_call>"


ANSWER = "<judge>It matches.</judge><answer>Done.</answer>"


def colour(seed: int, index: int = 0) -> tuple[int, int, int]:
    return (seed % 251, (seed // 251 + 40 * index) % 251, 200)


def png(rgb: tuple[int, int, int], size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(out, format="PNG")
    return out.getvalue()


def header(request: Recorded, name: str) -> str | None:
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """A recorded, instant sleep (advancing a fake clock when given one)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.calls: list[float] = []
        self.clock = clock

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.clock is not None:
            self.clock.now += seconds


class FakeComfy:
    """ComfyUI's HTTP API on a ScriptedServer: history empty, then pending, then done."""

    def __init__(self, server: ScriptedServer, *, pending_polls: int = 1) -> None:
        self.server = server
        self.pending_polls = pending_polls
        self.workflows: dict[str, dict[str, Any]] = {}
        self.client_ids: list[str] = []
        self.polls: dict[str, int] = {}
        self.done: set[str] = set()
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.uploads: list[dict[str, Any]] = []
        self.never_finish = False
        # (prompt id, the entry ComfyUI would write) -> the entry served
        self.finish: Callable[[str, dict[str, Any]], dict[str, Any]] = lambda pid, e: e
        server.always("POST", "/prompt", self._prompt)
        server.route("GET", r"/history/[^/]+", self._history)
        server.always("GET", "/view", self._view)
        server.always("POST", "/upload/image", self._upload)
        server.always("GET", "/queue", self._queue)
        server.always("POST", "/queue", lambda r: Reply(b""))
        server.always("POST", "/interrupt", lambda r: Reply(b""))

    @property
    def posted(self) -> list[dict[str, Any]]:
        return list(self.workflows.values())

    def requests(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.server.requests if r.method == method and r.path == path]

    def _prompt(self, request: Recorded) -> Reply:
        pid = f"p{len(self.workflows) + 1}"
        self.workflows[pid] = request.body["prompt"]
        self.client_ids.append(request.body.get("client_id"))
        return Reply({"prompt_id": pid, "number": len(self.workflows), "node_errors": {}})

    def _history(self, request: Recorded) -> Reply:
        pid = request.path.rsplit("/", 1)[1]
        count = self.polls[pid] = self.polls.get(pid, 0) + 1
        if pid not in self.workflows or self.never_finish or count == 1:
            return Reply({})  # queued or running: ComfyUI has no history yet
        if count <= 1 + self.pending_polls:
            status = {"status_str": None, "completed": False,
                      "messages": [["execution_start", {"prompt_id": pid}]]}  # fmt: skip
            return Reply({pid: {"prompt": [], "outputs": {}, "status": status}})
        self.done.add(pid)
        return Reply({pid: self.finish(pid, self._entry(pid))})

    def _entry(self, pid: str) -> dict[str, Any]:
        workflow = self.workflows[pid]
        seed = next(
            (n["inputs"][k] for n in workflow.values() for k in ("seed", "noise_seed")
             if isinstance(n["inputs"].get(k), int)),
            0,
        )  # fmt: skip
        batch = next(
            (n["inputs"]["batch_size"] for n in workflow.values() if "batch_size" in n["inputs"]),
            1,
        )
        outputs: dict[str, Any] = {}
        for node_id, node in workflow.items():
            if node["class_type"] not in ("SaveImage", "PreviewImage"):
                continue
            kind, sub = ("output", "run 1") if node["class_type"] == "SaveImage" else ("temp", "")
            images = []
            for i in range(batch):
                name = f"ComfyUI_{pid}_{node_id}_{i + 1:05}_.png"
                self.files[(name, sub, kind)] = png(colour(seed, i))
                images.append({"filename": name, "subfolder": sub, "type": kind})
            outputs[node_id] = {"images": images}
        status = {
            "status_str": "success",
            "completed": True,
            "messages": [["execution_start", {"prompt_id": pid}],
                         ["execution_success", {"prompt_id": pid}]],
        }  # fmt: skip
        return {"prompt": [0, pid, workflow, {}, []], "outputs": outputs, "status": status}

    def _view(self, request: Recorded) -> Reply:
        query = parse_qs(request.query, keep_blank_values=True)
        key = (
            query["filename"][0],
            query.get("subfolder", [""])[0],
            query.get("type", ["output"])[0],
        )
        data = self.files.get(key)
        if data is None:
            return Reply(b"", 404)
        return Reply(data, headers={"Content-Type": "image/png"})

    def _upload(self, request: Recorded) -> Reply:
        content_type = header(request, "content-type") or ""
        raw = request.body if isinstance(request.body, bytes) else b""
        message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw
        )
        fields: dict[str, str] = {}
        upload: dict[str, Any] = {}
        for part in message.iter_parts():
            name = str(part.get_param("name", header="content-disposition"))
            payload = cast("bytes", part.get_payload(decode=True))
            if part.get_filename():
                upload = {"field": name, "filename": part.get_filename(), "data": payload,
                          "content_type": part.get_content_type()}  # fmt: skip
            else:
                fields[name] = payload.decode()
        self.uploads.append({**upload, "fields": fields})
        return Reply(
            {"name": upload["filename"], "subfolder": fields.get("subfolder", ""), "type": "input"}
        )

    def _queue(self, request: Recorded) -> Reply:
        waiting = [pid for pid in self.workflows if pid not in self.done]
        return Reply({
            "queue_running": [[0, pid, {}, {}, []] for pid in waiting[:1]],
            "queue_pending": [[i, pid, {}, {}, []] for i, pid in enumerate(waiting[1:], 1)],
        })  # fmt: skip


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:  # one server for the module: each shutdown waits 0.5 s
        yield s


@pytest.fixture
def server(shared_server: ScriptedServer) -> ScriptedServer:
    s = shared_server
    with s._lock:  # a fresh script for every test
        s.routes.clear()
        s.fallback.clear()
        s.patterns.clear()
        s.requests.clear()
    return s


@pytest.fixture
def comfy(server: ScriptedServer) -> FakeComfy:
    return FakeComfy(server)


def make(
    server: ScriptedServer,
    workflow: Any = None,
    cls: type[ComfyUITool] | type[ComfyUIEditTool] = ComfyUITool,
    **kwargs: Any,
) -> Any:
    kwargs.setdefault("sleep", Sleeps())
    return cls(WORKFLOW if workflow is None else workflow, server.url, **kwargs)


def context(**kwargs: Any) -> ToolContext:
    return ToolContext(run_id="run", task=Task(prompt="a cat"), round=1, **kwargs)


def call(tool: ComfyUITool, caption: str = "a cat", **kwargs: Any) -> Any:
    return asyncio.run(tool.acall(GenerationArgs(caption=caption), context(**kwargs)))


def nodes_of(tool: Any) -> dict[str, list[str]]:
    nodes: dict[str, list[str]] = tool.describe()["nodes"]
    return nodes


# --------------------------------------------------------------------------- the agent


def test_an_agent_run_puts_caption_seed_and_size_into_the_right_nodes(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    tool = make(server, width=768, height=640)
    policy = ScriptedPolicy([generation_call("two red apples on a table"), ANSWER])
    trajectory = Agent(tool=tool, policy=policy, candidates=2).run("two red apples", seed=3)
    assert trajectory.termination is Termination.ANSWERED
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and len(outcome.images) == 2
    # one prompt per seed, each with the caption, its seed and the size; the rest untouched
    assert len(comfy.posted) == 2
    for posted, seed in zip(comfy.posted, outcome.seeds, strict=True):
        assert posted["6"]["inputs"]["text"] == "two red apples on a table"
        assert posted["3"]["inputs"]["seed"] == seed
        assert posted["5"]["inputs"] == {"width": 768, "height": 640, "batch_size": 1}
        assert posted["7"]["inputs"]["text"] == "blurry, text, watermark"
        assert posted["4"] == WORKFLOW["4"]
    assert WORKFLOW["6"]["inputs"]["text"] == "a placeholder"  # the tool's copy, not the user's
    assert len(set(comfy.client_ids)) == 1
    # each image is the SaveImage output of its seed's prompt (not the PreviewImage one)
    for index, seed in zip(outcome.images, outcome.seeds, strict=True):
        assert seed is not None
        image = trajectory.images[index].open().convert("RGB")
        assert image.getpixel((0, 0)) == colour(seed)
    views = comfy.requests("GET", "/view")
    assert len(views) == 2
    assert all(parse_qs(v.query)["subfolder"] == ["run 1"] for v in views)  # URL-encoded
    assert all(parse_qs(v.query)["type"] == ["output"] for v in views)
    # history: empty, then pending, then done
    assert sorted(comfy.polls.values()) == [3, 3]
    assert outcome.metadata["prompt_ids"] == ["p1", "p2"]
    assert outcome.metadata["candidates"] == "per_seed"
    assert (outcome.metadata["width"], outcome.metadata["height"]) == (768, 640)
    described = trajectory.metadata["tools"][0]
    assert described["nodes"] == {
        "caption": ["6:text"], "negative": ["7:text"], "seed": ["3:seed"], "steps": ["3:steps"],
        "guidance": ["3:cfg"], "latent": ["5"], "outputs": ["9"],
    }  # fmt: skip
    assert described["base_url"] == server.url and described["workflow_sha256"]


def test_batch_candidates_are_one_prompt_with_the_first_seed(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    tool = make(server, candidates="batch")
    policy = ScriptedPolicy([generation_call("a green frog"), ANSWER])
    trajectory = Agent(tool=tool, policy=policy, candidates=3).run("a green frog", seed=1)
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and len(outcome.images) == 3
    (posted,) = comfy.posted
    assert posted["5"]["inputs"]["batch_size"] == 3
    first = posted["3"]["inputs"]["seed"]
    assert outcome.seeds == [first, None, None]
    pixels = [trajectory.images[i].open().convert("RGB").getpixel((0, 0)) for i in outcome.images]
    assert pixels == [colour(first, i) for i in range(3)]
    assert outcome.metadata["candidates"] == "batch"


def test_the_edit_tool_uploads_the_current_image_into_load_image(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    generator = make(server)
    editor = make(server, EDIT, ComfyUIEditTool, upload_subfolder="genagent")
    policy = ScriptedPolicy([generation_call("a red cube"), edit_call("make it blue"), ANSWER])
    trajectory = Agent(tools=[generator, editor], policy=policy).run("a blue cube", seed=0)
    assert trajectory.termination is Termination.ANSWERED
    assert len(trajectory.images) == 2 and trajectory.final_image_index == 1
    (upload,) = comfy.uploads
    first = trajectory.images[0]
    assert upload["field"] == "image" and upload["data"] == first.read_bytes()
    assert upload["filename"] == f"genagent_{first.filename}"
    assert upload["fields"] == {"overwrite": "true", "type": "input", "subfolder": "genagent"}
    edit = comfy.posted[1]
    assert edit["78"]["inputs"]["image"] == f"genagent/genagent_{first.filename}"
    assert edit["76"]["inputs"]["prompt"] == "make it blue"
    assert edit["77"]["inputs"]["prompt"] == ""  # the negative encoder is left alone
    outcome = trajectory.turns[1].tool_result
    assert outcome is not None and outcome.metadata["uploaded_image"].endswith(first.filename)
    assert nodes_of(editor)["image"] == ["78:image"]


def test_the_edit_tool_refuses_without_an_image() -> None:
    editor = ComfyUIEditTool(EDIT, NOWHERE)
    with pytest.raises(ToolRefused, match="no image to edit"):
        asyncio.run(editor.acall(EditArgs(instruction="x"), context()))


def test_call_settings_reach_their_nodes_and_unknown_ones_are_recorded(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    tool = make(server)
    settings = {"width": 320, "steps": 4, "guidance": 5.5, "negative_prompt": "ugly", "lora": "x"}
    result = call(tool, seeds=[9], settings=settings)
    (posted,) = comfy.posted
    assert posted["5"]["inputs"]["width"] == 320 and posted["5"]["inputs"]["height"] == 512
    assert posted["3"]["inputs"]["steps"] == 4 and posted["3"]["inputs"]["cfg"] == 5.5
    assert posted["7"]["inputs"]["text"] == "ugly"
    assert result.metadata["ignored_settings"] == ["lora"]
    assert result.seeds == [9]


# --------------------------------------------------------------------------- node selection


def test_the_flux_graph_is_understood_without_naming_nodes(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    tool = make(server, FLUX, guidance=2.5, steps=8)
    assert nodes_of(tool) == {
        "caption": ["6:text"], "seed": ["25:noise_seed"], "steps": ["17:steps"],
        "guidance": ["26:guidance"], "latent": ["27"], "outputs": ["9"],
    }  # fmt: skip
    call(tool, "a lighthouse", seeds=[77])
    (posted,) = comfy.posted
    assert posted["6"]["inputs"]["text"] == "a lighthouse"
    assert posted["25"]["inputs"]["noise_seed"] == 77
    assert posted["26"]["inputs"]["guidance"] == 2.5 and posted["17"]["inputs"]["steps"] == 8


def test_nodes_are_named_by_title_by_id_or_with_their_input(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    by_title = make(
        server,
        caption_node="Positive Prompt",
        seed_node="KSampler",
        latent_node="Empty Latent Image",
        output_node="Preview Image",
        negative_node=7,
    )
    assert nodes_of(by_title) == {
        "caption": ["6:text"], "negative": ["7:text"], "seed": ["3:seed"], "steps": ["3:steps"],
        "guidance": ["3:cfg"], "latent": ["5"], "outputs": ["10"],
    }  # fmt: skip
    by_input = make(server, caption_node=["6:text", "Negative Prompt:text"], seed_node=["3"])
    assert nodes_of(by_input)["caption"] == ["6:text", "7:text"]
    result = call(by_title, "a fox", seeds=[5])
    assert comfy.posted[0]["6"]["inputs"]["text"] == "a fox"
    assert comfy.requests("GET", "/view")[0].query.count("type=temp") == 1  # the preview's image
    assert len(result.images) == 1


def test_a_workflow_loads_from_a_file_or_json_text(tmp_path: Path) -> None:
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(WORKFLOW), encoding="utf-8")
    from_file = ComfyUITool(path, NOWHERE)
    assert from_file.describe()["workflow"] == str(path)
    from_text = ComfyUITool(json.dumps(WORKFLOW), NOWHERE)
    assert from_file.describe()["workflow_sha256"] == from_text.describe()["workflow_sha256"]


def two_samplers() -> dict[str, Any]:
    workflow = copy.deepcopy(WORKFLOW)
    workflow["11"] = copy.deepcopy(workflow["3"])
    workflow["11"]["_meta"] = {"title": "Hires pass"}
    return workflow


def with_title(node: str, title: str) -> dict[str, Any]:
    workflow = copy.deepcopy(WORKFLOW)
    workflow[node]["_meta"] = {"title": title}
    return workflow


@pytest.mark.parametrize(
    ("workflow", "kwargs", "message"),
    [
        # ambiguous: two samplers with a seed, both listed
        (two_samplers(), {}, r"which node takes the seed.*2 candidates, 3 \(KSampler\), 11 "
                             r"\(KSampler 'Hires pass'\).*seed_node="),
        # missing: no output node
        ({k: v for k, v in WORKFLOW.items() if k not in ("9", "10")}, {},
         r"no node of the workflow takes the result images.*output_node="),
        # missing: no seed, with the way out
        ({k: v for k, v in WORKFLOW.items() if k != "3"}, {"caption_node": "6"},
         r"no node of the workflow takes the seed.*seed_node=False"),
        # a title on two nodes
        (with_title("7", "Positive Prompt"), {"caption_node": "Positive Prompt"},
         r"title of 2 nodes"),
        # neither an id nor a title: the nodes are listed
        (WORKFLOW, {"caption_node": "Prompt"}, r"neither a node id nor a node title.*6 "
                                               r"\(CLIPTextEncode 'Positive Prompt'\)"),
        # a node without the input
        (WORKFLOW, {"seed_node": "Load Checkpoint"}, r"none of the inputs.*'4:<input>'"),
        (WORKFLOW, {"caption_node": "6:clip_l"}, r"has no input 'clip_l'"),
        # the edit tool's image node on the generation tool
        (WORKFLOW, {"image_node": "3"}, r"image_node is for ComfyUIEditTool"),
        # a negative prompt with no negative encoder
        ({**{k: v for k, v in WORKFLOW.items() if k != "7"},
          "3": {**WORKFLOW["3"], "inputs": {**WORKFLOW["3"]["inputs"], "negative": ["6", 0]}}},
         {"negative_prompt": "ugly"}, r"no node of the workflow takes the negative prompt"),
        # the UI format
        ({"nodes": [], "links": [], "version": 0.4}, {}, r"UI format.*Export \(API\)"),
        ({"3": {"inputs": {}}}, {}, r"not an API-format node"),
        (WORKFLOW, {"candidates": "all"}, r"candidates must be"),
        (WORKFLOW, {"width": 0}, r"width must be a positive int"),
    ],
)  # fmt: skip
def test_missing_or_ambiguous_nodes_are_configuration_errors_naming_candidates(
    workflow: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):  # when the tool is made
        ComfyUITool(workflow, NOWHERE, **kwargs)


def test_ambiguous_caption_is_an_error_and_a_list_of_seed_nodes_fixes_two_samplers(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    loose = {k: v for k, v in WORKFLOW.items() if k != "3"}  # encoders wired to nothing
    loose["11"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    with pytest.raises(
        ConfigurationError, match=r"which node takes the caption .*2 candidates, 6 .*, 7 "
    ):
        make(server, loose)
    tool = make(server, two_samplers(), seed_node=["3", "Hires pass"])
    call(tool, seeds=[12])
    assert comfy.posted[0]["3"]["inputs"]["seed"] == comfy.posted[0]["11"]["inputs"]["seed"] == 12


def test_missing_workflow_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read the ComfyUI workflow"):
        ComfyUITool(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="is not JSON"):
        ComfyUITool(tmp_path / "bad.json")


# --------------------------------------------------------------------------- failures


def test_429_with_retry_after_then_success(server: ScriptedServer, comfy: FakeComfy) -> None:
    server.script("POST", "/prompt", Reply({"error": "busy"}, 429, headers={"Retry-After": "2"}))
    sleeps = Sleeps()
    result = call(make(server, sleep=sleeps), seeds=[1])
    assert len(result.images) == 1
    assert sleeps.calls[0] == 2.0  # the retry waited what the header said
    assert len(comfy.requests("POST", "/prompt")) == 2


def test_500_while_polling_then_success(server: ScriptedServer, comfy: FakeComfy) -> None:
    server.script("GET", "/history/p1", Reply("upstream broke", 500))
    sleeps = Sleeps()
    result = call(make(server, sleep=sleeps, backoff_s=1.0), seeds=[1])
    assert len(result.images) == 1
    assert 0.5 <= sleeps.calls[0] <= 1.0  # a backoff, not a poll interval


def test_a_hung_connection_times_out_and_gives_up(server: ScriptedServer) -> None:
    # the prompt may be queued already: queueing it again would run the workflow twice
    server.script("POST", "/prompt", *[Reply({"prompt_id": "late"}, delay_s=1.0)] * 2)
    tool = make(server, timeout_s=0.2, max_retries=1)
    with pytest.raises(ToolUnavailable, match=r"timed out.*not retried"):
        call(tool)
    assert [r.path for r in server.requests].count("/prompt") == 1


@pytest.mark.parametrize(
    ("route", "reply", "message"),
    [
        (("POST", "/prompt"), Reply("<html>502 Bad Gateway</html>"), "not JSON"),
        (("POST", "/prompt"), Reply({"number": 1, "node_errors": {}}), "no prompt_id"),
        (("GET", "/history/p1"), Reply(["p1"]), "not an object"),
        (("GET", "/history/p1"), Reply({"p1": "done"}), "malformed entry"),
        (("GET", "/history/p1"), Reply({"p1": {"status": {"status_str": "success",
                                                          "completed": True}}}),
         "history has no outputs"),
        (("GET", "/history/p1"), Reply({"p1": {"status": {"status_str": "success"},
                                               "outputs": {"8": {"images": []}}}}),
         r"0 image\(s\) from the output node\(s\) 9, 1 expected"),
    ],
)  # fmt: skip
def test_malformed_answers_are_errors_the_model_sees(
    server: ScriptedServer,
    comfy: FakeComfy,
    route: tuple[str, str],
    reply: Reply,
    message: str,
) -> None:
    server.script(*route, reply)  # the first call fails, the model's second one succeeds
    policy = ScriptedPolicy([generation_call("a cat"), generation_call("a cat"), ANSWER])
    trajectory = Agent(tool=make(server), policy=policy).run("a cat", seed=1)
    error = trajectory.turns[0].error
    assert error is not None and error.type == "ToolExecutionError"
    assert re.search(message, error.message)
    assert error.message in policy.calls[1][-1].text  # what the model was shown
    assert trajectory.termination is Termination.ANSWERED


def test_a_view_answering_html_is_not_an_image(server: ScriptedServer, comfy: FakeComfy) -> None:
    page = Reply("<html>login</html>", headers={"Content-Type": "text/html"})
    server.route("GET", "/view", lambda r: page)
    server.fallback.pop(("GET", "/view"))
    with pytest.raises(ToolExecutionError, match="'text/html', not an image"):
        call(make(server))


@pytest.mark.parametrize(
    ("limits", "message"),
    [({"max_image_bytes": 60}, "over the limit of 60 "),
     ({"max_image_pixels": 100}, "not usable")],
)  # fmt: skip
def test_an_oversized_image_is_a_tool_execution_error(
    server: ScriptedServer, comfy: FakeComfy, limits: dict[str, Any], message: str
) -> None:
    with pytest.raises(ToolExecutionError, match=message):
        call(make(server, **limits))


def test_an_invalid_workflow_names_the_node(server: ScriptedServer) -> None:
    server.script(
        "POST", "/prompt",
        Reply({
            "error": {"type": "prompt_outputs_failed_validation",
                      "message": "Prompt outputs failed validation", "details": "",
                      "extra_info": {}},
            "node_errors": {"4": {
                "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                            "details": "ckpt_name: 'v1-5.safetensors' not in []",
                            "extra_info": {"input_name": "ckpt_name"}}],
                "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}},
        }, 400),
    )  # fmt: skip
    policy = ScriptedPolicy([generation_call("a cat"), ANSWER])
    with pytest.raises(ToolUnavailable) as info:
        Agent(tool=make(server), policy=policy).run("a cat")
    message = str(info.value)
    assert "rejected the workflow" in message
    assert "node 4 (CheckpointLoaderSimple 'Load Checkpoint')" in message
    assert "ckpt_name: 'v1-5.safetensors' not in []" in message
    assert len(server.requests) == 1  # a 400 is not retried


def test_node_errors_on_the_output_node_in_a_200_stop_the_call(server: ScriptedServer) -> None:
    fake = FakeComfy(server)
    broken = {"7": {"errors": [{"message": "Required input is missing", "details": "clip"}],
                    "dependent_outputs": ["9"], "class_type": "CLIPTextEncode"}}  # fmt: skip
    server.script("POST", "/prompt", Reply({"prompt_id": "p1", "number": 1, "node_errors": broken}))
    with pytest.raises(ToolUnavailable, match=r"node 7 .*Required input is missing: clip"):
        call(make(server))
    assert fake.requests("POST", "/queue")[0].body == {"delete": ["p1"]}


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([["execution_start", {}],
          ["execution_error", {"prompt_id": "p1", "node_id": "3", "node_type": "KSampler",
                               "exception_type": "torch.OutOfMemoryError",
                               "exception_message": "CUDA out of memory. Tried to allocate 2 GiB",
                               "traceback": ["..."]}]],
         r"failed running node 3 \(KSampler\) of the job p1: torch.OutOfMemoryError: CUDA out of "
         r"memory"),
        ([["execution_interrupted", {"prompt_id": "p1", "node_id": "3"}]], "interrupted the job"),
        ([], "failed, without details"),
    ],
)  # fmt: skip
def test_an_execution_error_in_the_history_is_tool_unavailable(
    server: ScriptedServer, comfy: FakeComfy, messages: list[Any], expected: str
) -> None:
    comfy.finish = lambda pid, entry: {
        **entry,
        "outputs": {},
        "status": {"status_str": "error", "completed": False, "messages": messages},
    }
    with pytest.raises(ToolUnavailable, match=expected):
        call(make(server))
    assert comfy.requests("GET", "/view") == []


def test_a_job_that_never_finishes_times_out_and_is_taken_off_the_queue(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    comfy.never_finish = True
    tool = make(server, poll_timeout_s=0.05)
    with pytest.raises(ToolUnavailable, match=r"the job p1 was not done.*poll_timeout_s"):
        call(tool)
    assert comfy.requests("POST", "/queue")[0].body == {"delete": ["p1"]}
    assert comfy.requests("POST", "/interrupt")[0].body == {"prompt_id": "p1"}  # it was running


def test_a_spent_budget_while_polling_stops_the_job(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    comfy.never_finish = True
    clock = Clock()
    tool = make(server, sleep=Sleeps(clock), poll_interval_s=1.0)
    policy = ScriptedPolicy([generation_call("a cat"), ANSWER])
    agent = Agent(tool=tool, policy=policy, time_budget_s=10, clock=clock, candidates=2)
    trajectory = agent.run("a cat", seed=1)
    assert trajectory.termination is Termination.BUDGET
    assert comfy.requests("POST", "/queue")[0].body == {"delete": ["p1", "p2"]}
    assert [r.body for r in comfy.requests("POST", "/interrupt")] == [{"prompt_id": "p1"}]
    polls_at_stop = sum(comfy.polls.values())
    assert polls_at_stop <= 10  # stopped at the budget, not at poll_timeout_s


def test_stop_on_exit_false_leaves_the_queue_alone(
    server: ScriptedServer, comfy: FakeComfy
) -> None:
    comfy.never_finish = True
    with pytest.raises(ToolUnavailable):
        call(make(server, poll_timeout_s=0.0, stop_on_exit=False))
    assert comfy.requests("POST", "/queue") == [] and comfy.requests("GET", "/queue") == []


# --------------------------------------------------------------------------- secrets


def test_the_api_key_is_sent_and_never_leaks(
    server: ScriptedServer,
    comfy: FakeComfy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("COMFYUI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    # the proxy echoes the key in a rate-limit body (retried and logged) ...
    server.script(
        "POST", "/prompt", Reply(f"slow down, {SECRET}", 429, headers={"Retry-After": "1"})
    )
    tool = make(server)
    policy = ScriptedPolicy([generation_call("a cat"), ANSWER])
    trajectory = Agent(tool=tool, policy=policy).run("a cat", seed=2)
    assert trajectory.termination is Termination.ANSWERED
    sent = [header(r, "authorization") for r in server.requests]
    assert sent and all(value == f"Bearer {SECRET}" for value in sent)  # /view included
    # ... and in a rejection and an execution error
    server.script(
        "POST", "/prompt", Reply({"error": f"bad token {SECRET}", "node_errors": {}}, 400)
    )
    with pytest.raises(ToolUnavailable) as rejected:
        call(tool)
    comfy.finish = lambda pid, entry: {**entry, "status": {"status_str": "error", "messages": [
        ["execution_error", {"node_id": "3", "exception_message": f"auth {SECRET}"}]]}}  # fmt: skip
    with pytest.raises(ToolUnavailable) as failed:
        call(tool)
    texts = [str(rejected.value), str(failed.value), repr(tool), json.dumps(tool.describe())]
    texts += [record.getMessage() for record in caplog.records]
    assert any("429" in record.getMessage() for record in caplog.records)
    for text in texts:
        assert SECRET not in text
    folder = trajectory.save(tmp_path / "run")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
