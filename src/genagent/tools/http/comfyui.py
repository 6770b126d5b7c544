"""``ComfyUITool`` and ``ComfyUIEditTool``: your ComfyUI workflow as a generator.

ComfyUI runs node graphs. You export a workflow in its API format (``{node_id: {"class_type",
"inputs", "_meta": {"title"}}}``), and the adapter fills in, per call, the caption, the seed,
the size and (for editing) the uploaded input image, then queues it with ``POST /prompt``, polls
``GET /history/{prompt_id}`` until it is done, and downloads the output node's images with
``GET /view``. The nodes that receive each value are named by id or title, or found in the graph
when that is unambiguous (the text encoder wired to the sampler's ``positive`` input, the only
``KSampler``, the only ``EmptyLatentImage``, the only ``SaveImage``); the choice is checked when
the tool is made, not on the first call.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias, TypeGuard
from urllib.parse import quote, urlencode

from genagent._http import excerpt
from genagent.errors import (
    ConfigurationError,
    GenAgentError,
    ToolExecutionError,
    ToolRefused,
    ToolUnavailable,
)
from genagent.tools._base import EditTool, GenerationTool, ToolContext, ToolResult
from genagent.tools.http._base import HTTPResponseError, RemoteTool

if TYPE_CHECKING:
    from genagent.images import ImageRef

__all__ = ["ComfyUIEditTool", "ComfyUITool", "NodeRefs"]

logger = logging.getLogger("genagent.tools.comfyui")

NodeRefs: TypeAlias = "str | int | Sequence[str | int]"
"""One node or several, each by id (``"6"``, ``6``) or title (``"Positive Prompt"``).

``"<node>:<input>"`` names the input as well (``"6:t5xxl"``), for nodes whose input the adapter
does not know.
"""

Candidates = Literal["per_seed", "batch"]

# which inputs of a node receive each value, by class; other classes use the generic names
_TEXT_INPUTS: dict[str, tuple[str, ...]] = {
    "CLIPTextEncode": ("text",),
    "CLIPTextEncodeFlux": ("clip_l", "t5xxl"),
    "CLIPTextEncodeSD3": ("clip_l", "clip_g", "t5xxl"),
    "CLIPTextEncodeSDXL": ("text_g", "text_l"),
    "CLIPTextEncodeSDXLRefiner": ("text",),
    "CLIPTextEncodeHunyuanDiT": ("bert", "mt5xl"),
    "TextEncodeQwenImageEdit": ("prompt",),
    "TextEncodeQwenImageEditPlus": ("prompt",),
}
_ROLES: dict[str, tuple[dict[str, tuple[str, ...]], tuple[str, ...], str]] = {
    # role: (inputs by class, generic inputs, what it is, for messages)
    "caption": (_TEXT_INPUTS, ("text", "prompt"), "caption (a text encoder)"),
    "negative": (_TEXT_INPUTS, ("text", "prompt"), "negative prompt (a text encoder)"),
    "seed": (
        {
            "KSampler": ("seed",),
            "KSamplerAdvanced": ("noise_seed",),
            "RandomNoise": ("noise_seed",),
            "SamplerCustom": ("noise_seed",),
        },
        ("seed", "noise_seed"),
        "seed (KSampler 'seed', RandomNoise 'noise_seed')",
    ),
    "image": ({"LoadImage": ("image",)}, ("image",), "image to edit (a LoadImage node)"),
    "steps": ({}, ("steps",), "step count"),
    "guidance": (
        {"FluxGuidance": ("guidance",)},
        ("guidance", "cfg"),
        "guidance (FluxGuidance 'guidance', a sampler's 'cfg')",
    ),
}
_LATENT_WHAT = "size (a latent node with width, height and batch_size, like EmptyLatentImage)"
_OUTPUT_CLASSES = ("SaveImage", "PreviewImage")


@dataclass(frozen=True)
class _Target:
    """Inputs of one node that receive a value."""

    node: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class _Plan:
    """Where each value goes, resolved once when the tool is made."""

    caption: tuple[_Target, ...]
    negative: tuple[_Target, ...]
    seed: tuple[_Target, ...]
    latent: tuple[str, ...]
    image: tuple[_Target, ...]
    steps: tuple[_Target, ...]
    guidance: tuple[_Target, ...]
    outputs: tuple[str, ...]

    def nodes(self) -> dict[str, list[str]]:
        """Node ids by role (for records)."""
        found: dict[str, list[str]] = {}
        for role in ("caption", "negative", "seed", "image", "steps", "guidance"):
            targets: tuple[_Target, ...] = getattr(self, role)
            if targets:
                found[role] = [f"{t.node}:{'/'.join(t.inputs)}" for t in targets]
        if self.latent:
            found["latent"] = list(self.latent)
        found["outputs"] = list(self.outputs)
        return found


class _ComfyUI(RemoteTool, abstract=True):
    service: ClassVar[str] = "ComfyUI"
    default_base_url: ClassVar[str | None] = "http://127.0.0.1:8188"
    api_key_env: ClassVar[tuple[str, ...]] = ("COMFYUI_API_KEY",)
    max_images_per_call: ClassVar[int] = 8
    _edits: ClassVar[bool] = False

    def __init__(
        self,
        workflow: Mapping[str, Any] | str | os.PathLike[str],
        base_url: str | None = None,
        *,
        caption_node: NodeRefs | None = None,
        negative_node: NodeRefs | None = None,
        seed_node: NodeRefs | Literal[False] | None = None,
        latent_node: NodeRefs | None = None,
        image_node: NodeRefs | None = None,
        steps_node: NodeRefs | None = None,
        guidance_node: NodeRefs | None = None,
        output_node: NodeRefs | None = None,
        candidates: Candidates = "per_seed",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        upload_subfolder: str = "",
        stop_on_exit: bool = True,
        **http: Any,
    ) -> None:
        http.setdefault("max_poll_interval_s", 2.0)  # polls of a local server are cheap
        super().__init__(base_url, **http)
        where = type(self).__name__
        if candidates not in ("per_seed", "batch"):
            raise ConfigurationError(
                f"{where}: candidates must be 'per_seed' or 'batch', got {candidates!r}"
            )
        for key, value in (("width", width), ("height", height), ("steps", steps)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConfigurationError(f"{where}: {key} must be a positive int, got {value!r}")
        if guidance is not None and (
            not isinstance(guidance, (int, float)) or isinstance(guidance, bool)
        ):
            raise ConfigurationError(f"{where}: guidance must be a number, got {guidance!r}")
        if image_node is not None and not self._edits:
            raise ConfigurationError(
                f"{where} does not upload images; image_node is for ComfyUIEditTool"
            )
        self.workflow, self.workflow_source = _load_workflow(workflow)
        self.workflow_sha256 = hashlib.sha256(
            json.dumps(self.workflow, sort_keys=True).encode()
        ).hexdigest()
        self.candidates: Candidates = candidates
        self.settings: dict[str, Any] = {
            k: v
            for k, v in {
                "width": width,
                "height": height,
                "steps": steps,
                "guidance": guidance,
                "negative_prompt": negative_prompt,
            }.items()
            if v is not None
        }
        self.upload_subfolder = upload_subfolder.strip("/")
        self.stop_on_exit = stop_on_exit
        self.client_id = uuid.uuid4().hex
        self.plan = _Planner(self.workflow, where).plan(
            caption=caption_node,
            negative=negative_node,
            seed=seed_node,
            latent=latent_node,
            image=image_node,
            steps=steps_node,
            guidance=guidance_node,
            outputs=output_node,
            edits=self._edits,
            batch=candidates == "batch",
            settings=self.settings,
        )

    # ------------------------------------------------------------------ one call

    async def _run(self, text: str, ctx: ToolContext, image: ImageRef | None) -> ToolResult:
        settings = {**self.settings, **ctx.settings}
        start = time.perf_counter()
        uploaded = await self._upload(image) if image is not None else None
        n = max(1, ctx.num_images)
        seeds: list[int | None] = [ctx.seeds[i] if i < len(ctx.seeds) else None for i in range(n)]
        has_batch = any("batch_size" in self._node(nid)["inputs"] for nid in self.plan.latent)
        recorded: list[int | None]
        if self.plan.seed and (self.candidates == "per_seed" or not has_batch):
            mode = "per_seed"  # one prompt per seed: each image reproducible from its seed
            jobs = [(seed, 1) for seed in seeds]
            recorded = list(seeds)
        elif has_batch:
            mode = "batch"  # one prompt, batch_size = n: image 0 has the first seed
            jobs = [(seeds[0], n)]
            recorded = [seeds[0] if self.plan.seed else None] + [None] * (n - 1)
        else:  # no seed and no batch size to set: the same prompt n times
            mode = "repeat"
            jobs = [(None, 1)] * n
            recorded = [None] * n
        applied, ignored = self._applicable(settings)
        prompt_ids: list[str] = []
        finished: dict[str, dict[str, Any]] = {}
        try:
            for seed, batch in jobs:
                workflow = self._prepare(text, seed, batch, applied, uploaded)
                prompt_ids.append(await self._submit(workflow))
            await self._wait(prompt_ids, finished, ctx)
            images: list[bytes] = []
            for (_, batch), prompt_id in zip(jobs, prompt_ids, strict=True):
                images.extend(await self._images(prompt_id, finished[prompt_id], batch))
        except BaseException:
            unfinished = [p for p in prompt_ids if p not in finished]
            if unfinished and self.stop_on_exit:
                await self._stop(unfinished)
            raise
        metadata: dict[str, Any] = {
            "server": self.http.base_url,
            "prompt_ids": prompt_ids,
            "candidates": mode,
            "request_s": round(time.perf_counter() - start, 4),
            **{k: v for k, v in applied.items() if k != "negative_prompt"},
        }
        if uploaded is not None:
            metadata["uploaded_image"] = uploaded
        if ignored:
            metadata["ignored_settings"] = ignored
        return ToolResult(images=list(images), seeds=recorded, metadata=metadata)

    def _applicable(self, settings: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The settings this workflow can take, and the names of those it cannot."""
        where = {
            "width": self.plan.latent,
            "height": self.plan.latent,
            "steps": self.plan.steps,
            "guidance": self.plan.guidance,
            "negative_prompt": self.plan.negative,
        }
        applied: dict[str, Any] = {}
        ignored: list[str] = []
        for key, value in settings.items():
            if value is None:
                continue
            if where.get(key):
                applied[key] = value
            else:
                ignored.append(key)
        return applied, sorted(ignored)

    def _prepare(
        self,
        text: str,
        seed: int | None,
        batch: int,
        settings: Mapping[str, Any],
        image: str | None,
    ) -> dict[str, Any]:
        """A copy of the workflow with this call's values in their nodes."""
        workflow = copy.deepcopy(self.workflow)

        def put(targets: Iterable[_Target], value: Any) -> None:
            for target in targets:
                for name in target.inputs:
                    workflow[target.node]["inputs"][name] = value

        put(self.plan.caption, text)
        if seed is not None:
            put(self.plan.seed, seed)
        if image is not None:
            put(self.plan.image, image)
        if "negative_prompt" in settings:
            put(self.plan.negative, settings["negative_prompt"])
        if "steps" in settings:
            put(self.plan.steps, settings["steps"])
        if "guidance" in settings:
            put(self.plan.guidance, settings["guidance"])
        for node in self.plan.latent:
            inputs = workflow[node]["inputs"]
            if "batch_size" in inputs:
                inputs["batch_size"] = batch
            for key in ("width", "height"):
                if key in settings:
                    inputs[key] = settings[key]
        return workflow

    # ------------------------------------------------------------------ the API

    async def _upload(self, image: ImageRef) -> str:
        """``POST /upload/image``; the value for the LoadImage node's ``image`` input."""
        data = await asyncio.to_thread(image.read_bytes)
        fields = {"overwrite": "true", "type": "input"}
        if self.upload_subfolder:
            fields["subfolder"] = self.upload_subfolder
        # named by content: the same image uploaded twice (or by two runs) is one file
        answer = await self.http.json(
            "POST",
            "/upload/image",
            files={"image": (f"genagent_{image.filename}", data, image.mime_type)},
            data=fields,
        )
        name = answer.get("name") if isinstance(answer, dict) else None
        if not isinstance(name, str) or not name:
            raise ToolExecutionError(
                f"{self.service} answered the image upload without a file name: "
                f"{self._shown(answer)}",
                hint="Try the call again.",
            )
        subfolder = answer.get("subfolder")
        kind = answer.get("type")
        value = (
            f"{subfolder.strip('/')}/{name}" if isinstance(subfolder, str) and subfolder else name
        )
        if isinstance(kind, str) and kind and kind != "input":
            value += f" [{kind}]"
        return value

    async def _submit(self, workflow: dict[str, Any]) -> str:
        """``POST /prompt``; the prompt id."""
        body = {"prompt": workflow, "client_id": self.client_id}
        try:
            data = await self.http.json("POST", "/prompt", json=body, idempotent=False)
        except HTTPResponseError as exc:
            if exc.status == 400 and isinstance(exc.data, dict):
                raise ToolUnavailable(self._rejected(exc.data)) from None
            raise
        answer: dict[str, Any] = data if isinstance(data, dict) else {}
        prompt_id = answer.get("prompt_id")
        if isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
            prompt_id = str(prompt_id)
        if not isinstance(prompt_id, str) or not prompt_id.strip():
            raise ToolExecutionError(
                f"{self.service} accepted the workflow but returned no prompt_id: "
                f"{self._shown(data)}",
                hint="Try the call again.",
            )
        node_errors = answer.get("node_errors")
        if isinstance(node_errors, dict) and node_errors:
            # some outputs failed validation and the others were queued: ours must not be
            # among the failed ones
            failed = {
                str(out)
                for errors in node_errors.values()
                if isinstance(errors, dict)
                for out in (errors.get("dependent_outputs") or [])
            }
            if failed & set(self.plan.outputs):
                await self._stop([prompt_id])
                raise ToolUnavailable(self._rejected(answer))
            logger.warning("%s", self._rejected(answer))
        logger.debug("ComfyUI queued prompt %s (number %s)", prompt_id, answer.get("number"))
        return prompt_id

    async def _history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of a prompt, or ``None`` while it is queued or running."""
        path = f"/history/{quote(prompt_id, safe='')}"
        data = await self.http.json("GET", path)
        if not isinstance(data, dict):
            raise ToolExecutionError(
                f"{self.service} answered GET {path} with {type(data).__name__}, not an object: "
                f"{self._shown(data)}",
                hint="Try the call again.",
            )
        entry = data.get(prompt_id)
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise ToolExecutionError(
                f"{self.service} answered GET {path} with a malformed entry: {self._shown(entry)}",
                hint="Try the call again.",
            )
        return entry

    async def _wait(
        self, prompt_ids: list[str], finished: dict[str, dict[str, Any]], ctx: ToolContext
    ) -> None:
        """Poll the history until every prompt is done or one failed (fills ``finished``)."""

        async def fetch() -> dict[str, dict[str, Any]]:
            for prompt_id in prompt_ids:
                if prompt_id in finished:
                    continue
                entry = await self._history(prompt_id)
                if entry is None or not _is_finished(entry):
                    break  # ComfyUI runs its queue in order: the later ones wait too
                finished[prompt_id] = entry
                if _status(entry).get("status_str") == "error":
                    break
            return finished

        def done(state: dict[str, dict[str, Any]]) -> bool:
            return len(state) == len(prompt_ids) or any(
                _status(e).get("status_str") == "error" for e in state.values()
            )

        what = (
            f"the job {prompt_ids[0]}"
            if len(prompt_ids) == 1
            else f"the {len(prompt_ids)} jobs {', '.join(prompt_ids)}"
        )
        await self.poll(fetch, done, ctx=ctx, what=what)
        for prompt_id, entry in finished.items():
            if _status(entry).get("status_str") == "error":
                raise self._failed(prompt_id, _status(entry))

    async def _images(self, prompt_id: str, entry: dict[str, Any], expected: int) -> list[bytes]:
        """The checked images of the output node(s) of a finished prompt."""
        outputs = entry.get("outputs")
        if not isinstance(outputs, dict):
            raise ToolExecutionError(
                f"{self.service} reports the job {prompt_id} done but its history has no outputs",
                hint="Try the call again.",
            )
        files: list[dict[str, Any]] = []
        for node in self.plan.outputs:
            produced = outputs.get(node)
            items = produced.get("images") if isinstance(produced, dict) else None
            if isinstance(items, list):
                files.extend(
                    item
                    for item in items
                    if isinstance(item, dict)
                    and isinstance(item.get("filename"), str)
                    and item["filename"]
                )
        if len(files) < expected:
            others = sorted(
                str(node)
                for node, produced in outputs.items()
                if isinstance(produced, dict) and produced.get("images")
            )
            raise ToolExecutionError(
                f"{self.service} finished the job {prompt_id} with {len(files)} image(s) from "
                f"the output node(s) {', '.join(self.plan.outputs)}, {expected} expected"
                + (
                    f"; the nodes with images are {', '.join(others)}: if the result is one of "
                    "them, name it with output_node=..."
                    if others
                    else ""
                ),
                hint="Try the call again.",
            )
        images = []
        for item in files[:expected]:
            params = {
                **self.http.params,
                "filename": item["filename"],
                "subfolder": item.get("subfolder")
                if isinstance(item.get("subfolder"), str)
                else "",
                "type": item.get("type") if isinstance(item.get("type"), str) else "output",
            }
            url = f"{self.http.url('/view')}?{urlencode(params)}"
            what = self.http.redact(f"image {item['filename'][:80]!r}")
            images.append(await self.image_from_url(url, what=what))
        return images

    async def _stop(self, prompt_ids: list[str]) -> None:
        """Take unfinished prompts off the queue, and interrupt the one running (best effort).

        Only a prompt of this tool that ``GET /queue`` shows running is interrupted, by id, so
        that another client's job is never stopped (older servers ignore the id).
        """

        async def stop() -> None:
            queue = await self.http.json("GET", "/queue", timeout_s=10.0)
            running = {
                str(item[1])
                for item in (queue.get("queue_running") if isinstance(queue, dict) else None) or []
                if isinstance(item, list) and len(item) > 1
            }
            await self.http.request(
                "POST", "/queue", json={"delete": list(prompt_ids)}, timeout_s=10.0
            )
            for prompt_id in prompt_ids:
                if prompt_id in running:
                    await self.http.request(
                        "POST", "/interrupt", json={"prompt_id": prompt_id}, timeout_s=10.0
                    )

        try:
            await asyncio.wait_for(stop(), timeout=30.0)
            logger.info("ComfyUI: stopped %s", ", ".join(prompt_ids))
        except (GenAgentError, TimeoutError, asyncio.TimeoutError) as exc:
            logger.warning(
                "ComfyUI: could not stop %s: %s", ", ".join(prompt_ids), self.http.redact(str(exc))
            )

    # ------------------------------------------------------------------ errors

    def _shown(self, data: Any) -> str:
        try:
            text = json.dumps(data)
        except (TypeError, ValueError):
            text = repr(data)
        return self.http.redact(excerpt(text))

    def _describe_node(self, node_id: str) -> str:
        node = self.workflow.get(node_id)
        return _describe(node_id, node) if node is not None else f"{node_id}"

    def _rejected(self, data: Mapping[str, Any]) -> str:
        """The message of a workflow ComfyUI refused (``POST /prompt`` 400 / node_errors)."""
        parts: list[str] = []
        error = data.get("error")
        if isinstance(error, dict):
            head = str(error.get("message") or error.get("type") or "invalid prompt")
            details = error.get("details")
            parts.append(f"{head}: {details}" if details else head)
        elif isinstance(error, str) and error:
            parts.append(error)
        node_errors = data.get("node_errors")
        if isinstance(node_errors, dict):
            for node_id, info in list(node_errors.items())[:5]:
                reasons = info.get("errors") if isinstance(info, dict) else None
                texts = [
                    excerpt(
                        f"{r.get('message', '')}: {r['details']}"
                        if r.get("details")
                        else str(r.get("message", "")),
                        300,
                    )
                    for r in (reasons if isinstance(reasons, list) else [])
                    if isinstance(r, dict)
                ]
                parts.append(
                    f"node {self._describe_node(str(node_id))}: {'; '.join(texts) or 'invalid'}"
                )
        message = (
            f"{self.service} rejected the workflow: {'; '.join(parts) or 'no reason given'}. "
            "Fix the workflow (a missing model, a custom node that is not installed, an input "
            "out of range) and check it in ComfyUI, then export it again in the API format"
        )
        return self.http.redact(message)

    def _failed(self, prompt_id: str, status: Mapping[str, Any]) -> ToolUnavailable:
        """The error of a job whose history says it failed."""
        messages = status.get("messages")
        events = {
            m[0]: m[1]
            for m in (messages if isinstance(messages, list) else [])
            if isinstance(m, list) and len(m) == 2 and isinstance(m[1], dict)
        }
        failure = events.get("execution_error")
        if failure is not None:
            node = str(failure.get("node_id", "?"))
            kind = failure.get("exception_type") or "error"
            detail = excerpt(str(failure.get("exception_message") or ""), 500)
            where = (
                self._describe_node(node)
                if node in self.workflow
                else f"{node} ({failure.get('node_type', '?')})"
            )
            message = (
                f"{self.service} failed running node {where} of the job {prompt_id}: "
                f"{kind}: {detail}. Check that node's inputs and the ComfyUI server log"
            )
        elif "execution_interrupted" in events:
            message = (
                f"{self.service} interrupted the job {prompt_id} (it was cancelled on the "
                "server, or the server restarted)"
            )
        else:
            message = (
                f"{self.service} reports that the job {prompt_id} failed, without details; "
                "check the ComfyUI server log"
            )
        return ToolUnavailable(self.http.redact(message))

    def _node(self, node_id: str) -> dict[str, Any]:
        node: dict[str, Any] = self.workflow[node_id]
        return node

    # ------------------------------------------------------------------ records

    def describe(self) -> dict[str, Any]:
        """Settings for trajectory metadata (never the API key)."""
        return {
            **super().describe(),
            "workflow": self.workflow_source or "(a dict)",
            "workflow_sha256": self.workflow_sha256,
            "nodes": self.plan.nodes(),
            "candidates": self.candidates,
            "settings": dict(self.settings),
        }


class ComfyUITool(_ComfyUI, GenerationTool):
    """Generate with a ComfyUI workflow: the caption, seed and size go into its nodes.

    Export the workflow from ComfyUI in the API format (Workflow > Export (API); in older
    versions, enable the dev mode options in the settings and use Save (API Format)) and pass
    the file or the loaded dict. Each call copies it, writes the caption into the positive
    text encoder, the seed into the sampler and the size into the empty latent, queues it
    (``POST /prompt``), polls ``GET /history/{prompt_id}`` and downloads the output node's
    images (``GET /view``).

    Nodes are named by id (``"6"``) or title (``"Positive Prompt"``), one or a list, with
    ``":input"`` to name the input too (``"6:t5xxl"``). Left out, they are found in the graph:
    the text encoder wired (through conditioning nodes) to a sampler's ``positive`` input, the
    only node with a ``seed`` / ``noise_seed``, the only latent with ``width``, ``height`` and
    ``batch_size``, the only ``SaveImage`` (else the only ``PreviewImage``). A node that cannot
    be found, or that several nodes could be, is a :class:`~genagent.ConfigurationError` listing
    the candidates, when the tool is made.

    Candidates (``ctx.num_images``): with ``candidates="per_seed"`` (the default) each seed is
    its own prompt with batch size 1, all queued at once, so every image is reproducible from
    its recorded seed; ``"batch"`` sets the latent's ``batch_size`` and queues one prompt with
    the first seed (faster on a GPU with room; only the first image's seed is recorded).

    Args:
        workflow: The API-format workflow: a dict, the path of its JSON file, or JSON text.
        base_url: The server (default ``http://127.0.0.1:8188``).
        caption_node: The node(s) receiving the caption.
        negative_node: The node(s) receiving ``negative_prompt`` (default: the text encoder
            wired to the sampler's ``negative`` input, found only when a negative prompt is
            set).
        seed_node: The node(s) receiving the seed; ``False`` leaves the workflow's seeds (the
            candidates then come from the latent's batch, or are the same prompt repeated,
            which ComfyUI may answer from its cache).
        latent_node: The latent node(s) receiving width, height and batch size.
        image_node: ``ComfyUIEditTool`` only: the LoadImage node of the image to edit.
        steps_node: The node(s) receiving ``steps``.
        guidance_node: The node(s) receiving ``guidance``.
        output_node: The node(s) whose images are the result.
        candidates: ``"per_seed"`` or ``"batch"`` (above).
        width: Image width written into the latent node (default: the workflow's).
        height: Image height.
        steps: Sampling steps.
        guidance: Guidance (FluxGuidance ``guidance`` or the sampler's ``cfg``).
        negative_prompt: A negative prompt.
        upload_subfolder: ``ComfyUIEditTool``: the input subfolder uploads go to.
        stop_on_exit: When a call ends early (a spent run budget, a cancelled run, a poll
            timeout), take its prompts off the ComfyUI queue and interrupt the running one.
        **http: :class:`~genagent.tools.http.RemoteTool` settings (``api_key`` (default: the
            ``COMFYUI_API_KEY`` variable, sent as a bearer token, for a server behind an
            authenticating proxy), ``timeout_s``, ``max_retries``, ``poll_timeout_s``,
            ``max_poll_interval_s`` (2 s here: polls of a ComfyUI server are cheap),
            ``max_image_bytes``, ``transport``, ...).

    Raises:
        ConfigurationError: For a workflow that is not in the API format, or a node that is
            missing, ambiguous, or lacks the input a value goes to.

    Example:
        ```py
        from genagent import Agent
        from genagent.tools import ComfyUITool

        tool = ComfyUITool("flux_dev_api.json", "http://gpu-box:8188", width=1024, height=1024)
        agent = Agent(tool=tool, policy=my_policy)
        ```
    """

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Run the workflow for ``ctx.num_images`` images of ``args.caption``."""
        return await self._run(args.caption, ctx, None)


class ComfyUIEditTool(_ComfyUI, EditTool):
    """Edit with a ComfyUI workflow: the current image is uploaded into its LoadImage node.

    The current image goes up with ``POST /upload/image`` (named by its SHA-256, so the same
    image is stored once) and its name is written into the LoadImage node (``image_node``,
    default: the only LoadImage); the instruction goes where :class:`ComfyUITool` puts the
    caption (e.g. ``TextEncodeQwenImageEdit``'s ``prompt``, or the CLIPTextEncode of a Flux
    Kontext graph). Takes the arguments of :class:`ComfyUITool`.
    """

    _edits: ClassVar[bool] = True

    async def acall(self, args: Any, ctx: ToolContext) -> ToolResult:
        """Run the workflow on ``ctx.current_image`` with ``args.instruction``."""
        if ctx.current_image is None:
            raise ToolRefused("there is no image to edit yet", hint="Generate an image first.")
        return await self._run(args.instruction, ctx, ctx.current_image)


# --------------------------------------------------------------------------- the workflow


def _load_workflow(
    workflow: Mapping[str, Any] | str | os.PathLike[str],
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The workflow as a private, JSON-clean dict with string node ids, and its path."""
    source: str | None = None
    if isinstance(workflow, str) and workflow.lstrip().startswith("{"):
        where = "the workflow JSON"
        try:
            data: Any = json.loads(workflow)
        except ValueError as exc:
            raise ConfigurationError(f"{where} is not valid JSON: {exc}") from None
    elif isinstance(workflow, (str, os.PathLike)):
        path = Path(workflow).expanduser()
        source = where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the ComfyUI workflow {where}: {exc.strerror or exc}"
            ) from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(
                f"the ComfyUI workflow {where} is not JSON ({exc}); export it from ComfyUI in "
                "the API format"
            ) from None
    elif isinstance(workflow, Mapping):
        where = "the workflow"
        try:
            data = json.loads(json.dumps(dict(workflow)))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"the workflow must be JSON-serialisable: {exc}") from None
    else:
        raise ConfigurationError(
            "workflow must be a dict in ComfyUI's API format or the path of its JSON file, got "
            f"{type(workflow).__name__}"
        )
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ConfigurationError(
            f"{where} is in ComfyUI's UI format (what the editor saves), not the API format: "
            "in ComfyUI use Workflow > Export (API) (older versions: enable the dev mode "
            "options in the settings, then Save (API Format))"
        )
    if not isinstance(data, dict) or not data:
        raise ConfigurationError(
            f"{where} is not a ComfyUI API-format workflow (an object of nodes by id)"
        )
    for node_id, node in data.items():
        if (
            not isinstance(node, dict)
            or not isinstance(node.get("class_type"), str)
            or not isinstance(node.setdefault("inputs", {}), dict)
        ):
            raise ConfigurationError(
                f"{where}: node {node_id!r} is not an API-format node (an object with "
                "'class_type' and 'inputs'); export the workflow from ComfyUI in the API format"
            )
    return data, source


def _is_link(value: Any) -> TypeGuard[list[Any]]:
    """Whether an input value is a link ``[node_id, output_index]``."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _title(node: Mapping[str, Any]) -> str | None:
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) else None
    return title if isinstance(title, str) and title else None


def _describe(node_id: str, node: Mapping[str, Any]) -> str:
    title = _title(node)
    kind = node.get("class_type", "?")
    return f"{node_id} ({kind}{f' {title!r}' if title and title != kind else ''})"


def _status(entry: Mapping[str, Any]) -> dict[str, Any]:
    status = entry.get("status")
    return status if isinstance(status, dict) else {}


def _is_finished(entry: Mapping[str, Any]) -> bool:
    """Whether a history entry is final (ComfyUI writes it when the job ends)."""
    status = entry.get("status")
    if isinstance(status, dict):
        return status.get("status_str") in ("success", "error") or status.get("completed") is True
    return status is not None or "outputs" in entry  # servers before `status` existed


class _Planner:
    """Resolves node references and finds nodes in the graph (construction time only)."""

    def __init__(self, workflow: dict[str, dict[str, Any]], where: str) -> None:
        self.nodes = workflow
        self.where = where

    # ------------------------------------------------------------------ graph

    def inputs(self, node_id: str) -> dict[str, Any]:
        inputs: dict[str, Any] = self.nodes[node_id]["inputs"]
        return inputs

    def kind(self, node_id: str) -> str:
        return str(self.nodes[node_id]["class_type"])

    def upstream(self, node_id: str, name: str) -> str | None:
        value = self.inputs(node_id).get(name)
        if _is_link(value) and str(value[0]) in self.nodes:
            return str(value[0])
        return None

    def listing(self, ids: Iterable[str], limit: int = 30) -> str:
        ids = list(ids)
        shown = ", ".join(_describe(i, self.nodes[i]) for i in ids[:limit])
        return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")

    def role_inputs(self, node_id: str, role: str, *, literal: bool = False) -> tuple[str, ...]:
        """The inputs of a node that take the role's value (literal values only, if asked)."""
        by_class, generic, _ = _ROLES[role]
        inputs = self.inputs(node_id)
        names = by_class.get(self.kind(node_id), generic)
        found = tuple(n for n in names if n in inputs and not (literal and _is_link(inputs[n])))
        return found

    def is_text_encoder(self, node_id: str) -> bool:
        if self.kind(node_id) in _TEXT_INPUTS:
            return True
        inputs = self.inputs(node_id)
        # a generic encoder: a clip input and a literal text
        return "clip" in inputs and any(isinstance(inputs.get(n), str) for n in ("text", "prompt"))

    def conditioning_sources(self, which: Literal["positive", "negative"]) -> list[str]:
        """Text encoders wired, through conditioning nodes, to samplers' ``which`` input."""
        starts: list[tuple[str, str]] = [
            (nid, which) for nid in self.nodes if self.upstream(nid, which) is not None
        ]
        if which == "positive":  # SamplerCustomAdvanced -> BasicGuider(conditioning)
            for nid in self.nodes:
                guider = self.upstream(nid, "guider")
                if guider is not None and self.upstream(guider, "conditioning") is not None:
                    starts.append((guider, "conditioning"))
        found: list[str] = []
        seen: set[str] = set()

        def walk(node_id: str | None, depth: int) -> None:
            if node_id is None or node_id in seen or depth > 32:
                return
            seen.add(node_id)
            if self.is_text_encoder(node_id):
                if node_id not in found:
                    found.append(node_id)
                return
            if self.kind(node_id) == "ConditioningZeroOut":
                return  # its output does not depend on the text
            for name in self.inputs(node_id):
                if name == which or name.startswith("conditioning"):
                    walk(self.upstream(node_id, name), depth + 1)

        for node_id, name in starts:
            walk(self.upstream(node_id, name), 0)
        return found

    # ------------------------------------------------------------------ references

    def resolve(self, ref: str | int, param: str) -> tuple[str, str | None]:
        """``(node id, input or None)`` of a reference by id, title or ``node:input``."""
        key = str(ref).strip()
        if key in self.nodes:
            return key, None
        titled = [nid for nid, node in self.nodes.items() if _title(node) == key]
        if len(titled) == 1:
            return titled[0], None
        if len(titled) > 1:
            raise ConfigurationError(
                f"{self.where}: {param}={key!r} is the title of {len(titled)} nodes "
                f"({self.listing(titled)}); pass the node's id instead"
            )
        if ":" in key:
            node_part, _, name = key.rpartition(":")
            node_id, _ = self.resolve(node_part, param)
            if name not in self.inputs(node_id):
                raise ConfigurationError(
                    f"{self.where}: {param}={key!r}: node "
                    f"{_describe(node_id, self.nodes[node_id])} has no input {name!r}; its "
                    f"inputs are {', '.join(self.inputs(node_id))}"
                )
            return node_id, name
        raise ConfigurationError(
            f"{self.where}: {param}={key!r} is neither a node id nor a node title of the "
            f"workflow; its nodes are {self.listing(self.nodes)}"
        )

    def refs(self, value: NodeRefs, param: str) -> list[tuple[str, str | None]]:
        raw: Any = value  # checked here: users pass anything
        items: list[Any] = (
            [raw]
            if isinstance(raw, (str, int))
            else list(raw)
            if isinstance(raw, (list, tuple))
            else [raw]
        )
        if not items:
            raise ConfigurationError(f"{self.where}: {param} names no node")
        for item in items:
            if not isinstance(item, (str, int)) or isinstance(item, bool):
                raise ConfigurationError(
                    f"{self.where}: {param} takes node ids or titles, got {item!r}"
                )
        return [self.resolve(item, param) for item in items]

    def targets(self, value: NodeRefs, role: str, param: str) -> tuple[_Target, ...]:
        out = []
        for node_id, name in self.refs(value, param):
            names = (name,) if name is not None else self.role_inputs(node_id, role)
            if not names:
                _, generic, what = _ROLES[role]
                raise ConfigurationError(
                    f"{self.where}: {param}: node {_describe(node_id, self.nodes[node_id])} has "
                    f"none of the inputs the {what} goes to ({', '.join(generic)}); name the "
                    "input: "
                    f"{param}='{node_id}:<input>' (its inputs are "
                    f"{', '.join(self.inputs(node_id))})"
                )
            out.append(_Target(node_id, names))
        return tuple(out)

    def choose(self, found: list[str], *, needed: bool, what: str, param: str) -> list[str]:
        """The one node found; with none or several, an error if the role is needed."""
        if len(found) == 1:
            return found
        if not needed:
            return []
        if not found:
            raise ConfigurationError(
                f"{self.where}: no node of the workflow takes the {what}; pass {param}=... "
                f"with the node's id or title (its nodes are {self.listing(self.nodes)})"
            )
        raise ConfigurationError(
            f"{self.where}: cannot tell which node takes the {what}: the workflow has "
            f"{len(found)} candidates, {self.listing(found)}. Pass {param}=... with the id or "
            f"title of one (e.g. {param}={found[0]!r}), or a list of several"
        )

    def auto(self, role: str, found: list[str], *, needed: bool, param: str) -> tuple[_Target, ...]:
        chosen = self.choose(found, needed=needed, what=_ROLES[role][2], param=param)
        return tuple(_Target(n, self.role_inputs(n, role)) for n in chosen)

    def with_literal(self, role: str) -> list[str]:
        return [nid for nid in self.nodes if self.role_inputs(nid, role, literal=True)]

    # ------------------------------------------------------------------ the plan

    def plan(
        self,
        *,
        caption: NodeRefs | None,
        negative: NodeRefs | None,
        seed: NodeRefs | Literal[False] | None,
        latent: NodeRefs | None,
        image: NodeRefs | None,
        steps: NodeRefs | None,
        guidance: NodeRefs | None,
        outputs: NodeRefs | None,
        edits: bool,
        batch: bool,
        settings: Mapping[str, Any],
    ) -> _Plan:
        # the caption: the text encoder(s) wired to the samplers' positive input
        if caption is not None:
            caption_targets = self.targets(caption, "caption", "caption_node")
        else:
            positive = self.conditioning_sources("positive")
            negatives = set(self.conditioning_sources("negative")) - set(positive)
            if not positive:
                positive = [n for n in self.nodes if self.is_text_encoder(n) and n not in negatives]
            caption_targets = self.auto("caption", positive, needed=True, param="caption_node")
        caption_ids = {t.node for t in caption_targets}

        if negative is not None:
            negative_targets = self.targets(negative, "negative", "negative_node")
        else:
            found = [n for n in self.conditioning_sources("negative") if n not in caption_ids]
            negative_targets = self.auto(
                "negative", found, needed="negative_prompt" in settings, param="negative_node"
            )

        if seed is False:
            seed_targets: tuple[_Target, ...] = ()
        elif seed is not None:
            seed_targets = self.targets(seed, "seed", "seed_node")
        else:
            try:
                seed_targets = self.auto(
                    "seed", self.with_literal("seed"), needed=True, param="seed_node"
                )
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"{exc} (or seed_node=False to keep the workflow's seeds)"
                ) from None

        latent_needed = batch or "width" in settings or "height" in settings
        if latent is not None:
            latent_ids = []
            for node_id, name in self.refs(latent, "latent_node"):
                inputs = self.inputs(node_id)
                if name is not None or not ("width" in inputs and "height" in inputs):
                    raise ConfigurationError(
                        f"{self.where}: latent_node: node {_describe(node_id, self.nodes[node_id])}"
                        " needs 'width' and 'height' inputs (name the node, not an input)"
                    )
                latent_ids.append(node_id)
        else:
            found = [
                n
                for n in self.nodes
                if all(isinstance(self.inputs(n).get(k), int) for k in ("width", "height"))
                and isinstance(self.inputs(n).get("batch_size"), int)
            ]
            if len(found) > 1:  # prefer the latent wired straight into a sampler
                wired = [
                    n
                    for n in found
                    if any(self.upstream(s, "latent_image") == n for s in self.nodes)
                ]
                found = wired if len(wired) == 1 else found
            latent_ids = self.choose(
                found, needed=latent_needed, what=_LATENT_WHAT, param="latent_node"
            )

        if image is not None:
            image_targets = self.targets(image, "image", "image_node")
        elif edits:
            loaders = [
                n
                for n in self.nodes
                if self.kind(n).startswith("LoadImage")
                and "Mask" not in self.kind(n)
                and isinstance(self.inputs(n).get("image"), str)
            ]
            image_targets = self.auto("image", loaders, needed=True, param="image_node")
        else:
            image_targets = ()

        if steps is not None:
            steps_targets = self.targets(steps, "steps", "steps_node")
        else:
            steps_targets = self.auto(
                "steps", self.with_literal("steps"), needed="steps" in settings, param="steps_node"
            )

        if guidance is not None:
            guidance_targets = self.targets(guidance, "guidance", "guidance_node")
        else:
            flux = [
                n for n in self.nodes if isinstance(self.inputs(n).get("guidance"), (int, float))
            ]
            found = flux or [
                n for n in self.nodes if isinstance(self.inputs(n).get("cfg"), (int, float))
            ]
            guidance_targets = self.auto(
                "guidance", found, needed="guidance" in settings, param="guidance_node"
            )

        if outputs is not None:
            output_ids = []
            for node_id, name in self.refs(outputs, "output_node"):
                if name is not None:
                    raise ConfigurationError(
                        f"{self.where}: output_node names nodes, not inputs: got {node_id}:{name}"
                    )
                output_ids.append(node_id)
        else:
            saved = [n for n in self.nodes if self.kind(n) == _OUTPUT_CLASSES[0]]
            previews = [n for n in self.nodes if self.kind(n) == _OUTPUT_CLASSES[1]]
            output_ids = self.choose(
                saved or previews,
                needed=True,
                what="result images (a SaveImage, or PreviewImage, node)",
                param="output_node",
            )
        return _Plan(
            caption=caption_targets,
            negative=negative_targets,
            seed=seed_targets,
            latent=tuple(dict.fromkeys(latent_ids)),
            image=image_targets,
            steps=steps_targets,
            guidance=guidance_targets,
            outputs=tuple(dict.fromkeys(output_ids)),
        )
