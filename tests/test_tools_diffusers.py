"""Local diffusers tools on tiny real pipelines, saved to folders and loaded by the tools.

Every pipeline is the real diffusers class built from a tiny config (genagent.testing), saved
with ``save_pretrained`` and loaded by the tool through ``from_pretrained``.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from genagent import (  # noqa: E402
    Agent,
    ConfigurationError,
    Hooks,
    ScriptedPolicy,
    Termination,
    ToolUnavailable,
)
from genagent.testing import tiny_diffusers_pipeline, tiny_flux_lora  # noqa: E402
from genagent.tools import (  # noqa: E402
    DiffusersTool,
    FluxKontextTool,
    FluxTool,
    Lora,
    QwenImageEditTool,
    QwenImageTool,
    SD3Tool,
    SDXLTool,
    ToolProgress,
)

SMALL: dict[str, Any] = {"device": "cpu", "width": 32, "height": 32, "steps": 2}
TEXT = {"max_sequence_length": 32}


def generation_call(caption: str) -> str:
    arguments = {"name": "image_generation_tool", "arguments": {"caption": caption}}
    return f"<think>Draw it.</think><tool_call>{json.dumps(arguments)}</tool_call>"


def edit_call(instruction: str) -> str:
    arguments = {"name": "image_editing_tool", "arguments": {"instruction": instruction}}
    return f"<judge>Almost.</judge><tool_call>{json.dumps(arguments)}</tool_call>"


ANSWER = "<judge>It matches.</judge><answer>Done.</answer>"


def pixels(image: Image.Image) -> Any:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    kinds = ["flux", "flux-kontext", "sd3", "sdxl", "qwen-image", "qwen-image-edit", "sd"]
    return {kind: tiny_diffusers_pipeline(kind, root / kind) for kind in kinds}


@pytest.fixture(scope="session")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("peft")
    return tiny_flux_lora(tmp_path_factory.mktemp("lora"))


def flux(folders: dict[str, Path], **kwargs: Any) -> FluxTool:
    return FluxTool(str(folders["flux"]), **{**SMALL, **TEXT, **kwargs})


# --------------------------------------------------------------------------- the agent


def test_an_agent_runs_flux_from_a_folder_and_a_seed_gives_the_same_image(
    folders: dict[str, Path],
) -> None:
    tool = flux(folders)
    policy = ScriptedPolicy([generation_call("three red apples left of a blue cup"), ANSWER])
    agent = Agent(tool=tool, policy=policy)
    first = agent.run("three red apples left of a blue cup", seed=7)
    again = agent.run("three red apples left of a blue cup", seed=7)
    other = agent.run("three red apples left of a blue cup", seed=8)
    assert first.termination is Termination.ANSWERED
    assert first.final_image is not None and first.final_image.size == (32, 32)
    outcome = first.turns[0].tool_result
    assert outcome is not None and outcome.metadata["pipeline"] == "FluxPipeline"
    assert outcome.metadata["seed_policy"] == "per_round" and outcome.seeds
    assert outcome.metadata["seeds"] == outcome.seeds
    assert (outcome.metadata["device"], outcome.metadata["dtype"]) == ("cpu", "float32")
    assert first.images[0].sha256 == again.images[0].sha256
    assert first.images[0].sha256 != other.images[0].sha256
    # the recorded seed regenerates the recorded image outside the agent
    (alone,) = tool.generate("three red apples left of a blue cup", seeds=outcome.seeds)
    assert max_diff(alone, first.final_image) == 0


def test_generation_then_editing_with_two_local_tools(folders: dict[str, Path]) -> None:
    editor = FluxKontextTool(
        str(folders["flux-kontext"]),
        **SMALL,
        **TEXT,
        call_kwargs={"max_area": 32 * 32, "_auto_resize": False},
    )
    policy = ScriptedPolicy([generation_call("a red cube"), edit_call("make it blue"), ANSWER])
    trajectory = Agent(tools=[flux(folders), editor], policy=policy).run("a blue cube", seed=0)
    assert trajectory.termination is Termination.ANSWERED
    assert len(trajectory.images) == 2 and trajectory.final_image_index == 1
    edit = trajectory.turns[1].tool_result
    assert edit is not None and edit.metadata["pipeline"] == "FluxKontextPipeline"
    assert trajectory.images[0].sha256 != trajectory.images[1].sha256


@pytest.mark.parametrize("seed_policy", ["fixed", "per_round"])
def test_the_seed_policy_is_recorded_on_every_result(
    folders: dict[str, Path], seed_policy: str
) -> None:
    policy = ScriptedPolicy([generation_call("a cat"), generation_call("a cat"), ANSWER])
    agent = Agent(tool=flux(folders), policy=policy, seed_policy=seed_policy)  # type: ignore[arg-type]
    trajectory = agent.run("a cat", seed=3)
    first, second = (trajectory.turns[i].tool_result for i in (0, 1))
    assert first is not None and second is not None
    assert first.metadata["seed_policy"] == second.metadata["seed_policy"] == seed_policy
    if seed_policy == "fixed":  # as the GenAgent authors: the same seed, the same image
        assert first.seeds == second.seeds == [3]
        assert trajectory.images[0].sha256 == trajectory.images[1].sha256
    else:
        assert first.seeds != second.seeds


def test_candidates_are_one_batched_pipeline_call_with_a_seed_each(
    folders: dict[str, Path],
) -> None:
    tool = flux(folders)
    policy = ScriptedPolicy([generation_call("a green frog"), ANSWER])
    trajectory = Agent(tool=tool, policy=policy, candidates=3).run("a green frog", seed=1)
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and len(outcome.images) == 3 and len(set(outcome.seeds)) == 3
    assert outcome.metadata["batch_images"] == 3
    assert tool.batcher_stats.batches == 1 and tool.batcher_stats.largest_batch == 3
    for index, seed in zip(outcome.images, outcome.seeds, strict=True):
        (alone,) = tool.generate("a green frog", seeds=[seed])
        assert max_diff(alone, trajectory.images[index].open()) == 0


def test_concurrent_runs_share_pipeline_calls_and_get_their_own_images(
    folders: dict[str, Path],
) -> None:
    tool = flux(folders, max_batch_size=8, max_wait_s=0.2)
    prompts = ["a red cat", "a blue dog", "a green bird", "a yellow fish"]
    policy = ScriptedPolicy([lambda messages: generation_call(messages[1].text), ANSWER])
    runs = Agent(tool=tool, policy=policy).run_batch(prompts, seeds=[1, 2, 3, 4])
    assert tool.batcher_stats.batches < len(prompts)  # coalesced across runs
    for prompt, trajectory in zip(prompts, runs, strict=True):
        outcome = trajectory.turns[0].tool_result
        assert outcome is not None
        (alone,) = tool.generate(prompt, seeds=outcome.seeds)
        assert max_diff(alone, trajectory.final_image) == 0  # type: ignore[arg-type]


def test_threads_and_event_loops_calling_one_tool_get_their_own_images(
    folders: dict[str, Path],
) -> None:
    tool = flux(folders, max_batch_size=4, max_wait_s=0.05)
    jobs = [
        (f"a {colour} ball", seed) for seed, colour in enumerate(["red", "blue", "gray", "tan"])
    ]
    expected = {job: tool.generate(job[0], seeds=[job[1]])[0] for job in jobs}
    got: dict[tuple[str, int], Image.Image] = {}

    def in_thread(job: tuple[str, int]) -> None:
        got[job] = tool.generate(job[0], seeds=[job[1]])[0]

    async def in_loop() -> list[list[Image.Image]]:
        return await asyncio.gather(*(tool.agenerate(p, seeds=[s]) for p, s in jobs))

    threads = [threading.Thread(target=in_thread, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    from_loop = asyncio.run(in_loop())
    for thread in threads:
        thread.join()
    for job, images in zip(jobs, from_loop, strict=True):
        assert max_diff(images[0], expected[job]) == 0
        assert max_diff(got[job], expected[job]) == 0


# --------------------------------------------------------------------------- families


FAMILIES = [
    ("sd3", SD3Tool, TEXT),
    ("sdxl", SDXLTool, {}),
    ("qwen-image", QwenImageTool, TEXT),
]


@pytest.mark.parametrize(("kind", "cls", "extra"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_generates_from_its_folder_and_batches_like_single_calls(
    folders: dict[str, Path], kind: str, cls: type[DiffusersTool], extra: dict[str, Any]
) -> None:
    tool = cls(str(folders[kind]), **SMALL, **extra)
    together = tool.generate("a castle at night", seeds=[5, 6])
    alone = [tool.generate("a castle at night", seeds=[s])[0] for s in (5, 6)]
    assert [image.size for image in together] == [(32, 32), (32, 32)]
    assert max_diff(together[0], together[1]) > 0
    # classifier-free guidance batches the negative prompt too; a pixel on a rounding edge may
    # move by one level
    assert all(max_diff(a, b) <= 1 for a, b in zip(together, alone, strict=True))
    assert tool.describe()["family"] == tool.family.name  # type: ignore[union-attr]


EDITORS = [
    ("qwen-image-edit", QwenImageEditTool, 64, {}),
    (
        "flux-kontext",
        FluxKontextTool,
        32,
        {"call_kwargs": {"max_area": 32 * 32, "_auto_resize": False}},
    ),
]


@pytest.mark.parametrize(("kind", "cls", "side", "extra"), EDITORS, ids=[e[0] for e in EDITORS])
def test_edits_of_different_images_batch_and_each_gets_its_own_image(
    folders: dict[str, Path], kind: str, cls: type[DiffusersTool], side: int, extra: dict[str, Any]
) -> None:
    tool = cls(str(folders[kind]), device="cpu", width=side, height=side, steps=2, **TEXT, **extra)
    tool.setup()
    inputs = _record_denoiser_inputs(tool)  # what the denoiser saw of each input image
    red, noise = Image.new("RGB", (side, side), "red"), Image.effect_noise((side, side), 90)
    jobs = [(red, 1), (noise.convert("RGB"), 2)]

    async def both() -> list[list[Image.Image]]:
        return await asyncio.gather(*(tool.aedit(img, "add a hat", seeds=[s]) for img, s in jobs))

    together = asyncio.run(both())
    assert tool.batcher_stats.largest_batch == 2  # two runs' edits in one call
    batched = inputs[0]  # the denoiser's first input in the batched pipeline call
    assert batched.shape[0] == 2
    alone = []
    for source, seed in jobs:
        inputs.clear()
        alone.append(tool.edit(source, "add a hat", seeds=[seed])[0])
        # one row of the batch is exactly this image's latents with this seed's noise
        assert sum(torch.allclose(row, inputs[0][0], atol=1e-5) for row in batched) == 1
    assert max_diff(alone[0], alone[1]) > 1  # so a swapped result would show
    for image, expected in zip(together, alone, strict=True):
        assert max_diff(image[0], expected) <= 1 and image[0].size == (side, side)


def _record_denoiser_inputs(tool: DiffusersTool) -> list[Any]:
    """Every input the denoiser sees (noise and image latents), in order."""
    seen: list[Any] = []

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        seen.append(kwargs["hidden_states"].detach().clone())

    tool.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_a_family_defaults_are_the_authors_and_arguments_override_them() -> None:
    dev, schnell, turbo = FluxTool(), FluxTool(preset="schnell"), FluxTool(preset="turbo")
    assert (dev.settings.steps, dev.settings.guidance, dev.model) == (
        28, 3.5, "black-forest-labs/FLUX.1-dev",
    )  # fmt: skip
    assert (schnell.settings.steps, schnell.settings.guidance) == (4, 0.0)
    assert schnell.settings.max_sequence_length == 256
    assert turbo.settings.steps == 8 and turbo.fuse_lora
    assert turbo.loras[0].source == "alimama-creative/FLUX.1-Turbo-Alpha"
    assert FluxTool("my/finetune", preset="turbo", steps=6).settings.steps == 6
    assert QwenImageTool().settings.true_cfg == 4.0 and SDXLTool().settings.guidance == 5.0
    with pytest.raises(ConfigurationError, match=r"unknown preset 'fast'.*schnell"):
        FluxTool(preset="fast")
    with pytest.raises(ConfigurationError, match="true_cfg"):
        FluxTool(negative_prompt="blurry")  # FLUX.1-dev is guidance-distilled


# --------------------------------------------------------------------------- progress, budget


class Progress(Hooks):
    def __init__(self) -> None:
        self.events: list[ToolProgress] = []

    def on_tool_progress(self, ctx: Any, progress: ToolProgress) -> None:
        self.events.append(progress)


def test_the_step_callback_feeds_hooks_and_a_progress_bar(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    hook = Progress()
    tool = flux(folders, steps=3, progress=True)
    policy = ScriptedPolicy([generation_call("a kite"), ANSWER])
    Agent(tool=tool, policy=policy, hooks=hook).run("a kite", seed=0)
    assert [(e.tool, e.step, e.total) for e in hook.events] == [
        ("image_generation_tool", step, 3) for step in (1, 2, 3)
    ]
    assert "image_generation_tool: 1 image" in capsys.readouterr().err


def test_a_spent_budget_stops_the_denoising(folders: dict[str, Path]) -> None:
    now = [0.0]
    steps_run: list[int] = []

    class Clock(Hooks):
        def on_tool_progress(self, ctx: Any, progress: ToolProgress) -> None:
            steps_run.append(progress.step)
            if progress.step == 2:
                now[0] += 1000.0  # the run's time is up while the generator works

    tool = flux(folders, steps=20)
    forwards = _count_forwards(tool)
    policy = ScriptedPolicy([generation_call("a boat"), ANSWER])
    agent = Agent(tool=tool, policy=policy, hooks=Clock(), time_budget_s=60, clock=lambda: now[0])
    trajectory = agent.run("a boat", seed=0)
    assert trajectory.termination is Termination.BUDGET
    assert steps_run == [1, 2]
    assert len(forwards) == 3  # stopped after the step that saw the budget spent, not 20


def _count_forwards(tool: DiffusersTool) -> list[int]:
    tool.setup()
    calls: list[int] = []
    tool.pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    return calls


# --------------------------------------------------------------------------- failures


def test_out_of_memory_in_a_batch_falls_back_to_one_image_at_a_time(
    folders: dict[str, Path],
) -> None:
    tool = flux(folders)
    tool.setup()
    _oom_when(tool, lambda batch: batch > 1)
    images = tool.generate("a lamp", seeds=[1, 2])
    alone = [flux(folders).generate("a lamp", seeds=[s])[0] for s in (1, 2)]
    assert all(max_diff(a, b) == 0 for a, b in zip(images, alone, strict=True))


def test_out_of_memory_for_one_image_says_what_to_try(folders: dict[str, Path]) -> None:
    tool = flux(folders)
    tool.setup()
    _oom_when(tool, lambda batch: True)
    policy = ScriptedPolicy([generation_call("a lamp"), ANSWER])
    with pytest.raises(ToolUnavailable, match=r"out of memory.*offload='model'") as info:
        Agent(tool=tool, policy=policy).run("a lamp", seed=0)
    assert info.value.trajectory is not None  # the partial run is kept


def _oom_when(tool: DiffusersTool, condition: Any) -> None:
    def hook(module: Any, args: Any, kwargs: Any) -> None:
        if condition(kwargs["hidden_states"].shape[0]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    tool.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_black_image_is_reported_to_the_model(folders: dict[str, Path]) -> None:
    pipe = type(tiny_diffusers_pipeline("flux")).from_pretrained(str(folders["flux"]))
    with torch.no_grad():  # a decoder that can only output black
        pipe.vae.decoder.conv_out.weight.zero_()
        pipe.vae.decoder.conv_out.bias.fill_(-10.0)
    tool = FluxTool(pipe, **SMALL, **TEXT)
    policy = ScriptedPolicy(
        [generation_call("a night sky"), generation_call("a night sky"), ANSWER]
    )
    trajectory = Agent(tool=tool, policy=policy, max_retries=1).run("a night sky", seed=0)
    error = trajectory.turns[0].tool_result.error  # type: ignore[union-attr]
    assert error is not None and error.type == "ToolRefused" and "all-black" in error.message
    assert not trajectory.images  # never shown as a result
    shown = policy.calls[1][-1].text
    assert "all-black" in shown and "bfloat16" in shown


def test_a_safety_checker_block_is_reported_and_blocked_candidates_dropped(
    folders: dict[str, Path],
) -> None:
    pipe = _sd_with_safety_checker(folders["sd"], block={1})
    tool = DiffusersTool(pipe, **SMALL)
    policy = ScriptedPolicy([generation_call("a beach"), ANSWER])
    trajectory = Agent(tool=tool, policy=policy, candidates=3).run("a beach", seed=0)
    outcome = trajectory.turns[0].tool_result
    assert outcome is not None and len(outcome.images) == 2 and len(outcome.seeds) == 2
    assert outcome.text is not None and "1 of 3 candidates were dropped" in outcome.text
    assert "safety checker" in outcome.text
    assert outcome.metadata["blocked"] == [None, "nsfw", None]


def test_a_generation_blocked_entirely_is_a_refusal_the_model_sees(
    folders: dict[str, Path],
) -> None:
    tool = DiffusersTool(_sd_with_safety_checker(folders["sd"], block={0}), **SMALL)
    policy = ScriptedPolicy([generation_call("a beach"), ANSWER])
    trajectory = Agent(tool=tool, policy=policy, max_retries=0).run("a beach", seed=0)
    assert trajectory.termination is Termination.ERROR
    error = trajectory.turns[0].tool_result.error  # type: ignore[union-attr]
    assert error is not None and "safety checker" in error.message


def _sd_with_safety_checker(folder: Path, block: set[int]) -> Any:
    """The tiny SD pipeline with a real (tiny) safety checker that flags the given images."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    layers = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}
    text = {"vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = CLIPConfig(
        text_config={**layers, "num_hidden_layers": 1, **text},
        vision_config={**layers, "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    real_forward = checker.forward

    def forward(clip_input: Any, images: Any) -> Any:
        images, _ = real_forward(clip_input, images)
        flags = [i in block for i in range(len(images))]
        for i in block:
            images[i] = images[i] * 0  # what the real checker does: a black image
        return images, flags

    checker.forward = forward  # type: ignore[method-assign]
    base = StableDiffusionPipeline.from_pretrained(str(folder))
    extractor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    components = {**base.components, "safety_checker": checker, "feature_extractor": extractor}
    return StableDiffusionPipeline(**components)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "check the id or folder"),
        ("index", "model_index.json"),
        ("weights", "corrupt or incomplete"),
    ],
)
def test_unloadable_weights_are_a_typed_error_that_says_what_to_try(
    folders: dict[str, Path], tmp_path: Path, breakage: str, message: str
) -> None:
    folder = tmp_path / "broken"
    if breakage != "missing":
        shutil.copytree(folders["flux"], folder)
    if breakage == "index":
        (folder / "model_index.json").write_text("{ not json")
    if breakage == "weights":
        for weights in (folder / "transformer").glob("*.safetensors"):
            weights.write_bytes(b"\x00garbage")
    policy = ScriptedPolicy([generation_call("a cat"), ANSWER])
    with pytest.raises(ToolUnavailable, match=message):
        Agent(tool=FluxTool(str(folder), **SMALL), policy=policy).run("a cat")


def test_a_hub_id_offline_says_the_weights_are_not_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ToolUnavailable, match="not in the local cache"):
        FluxTool("someone/not-downloaded", device="cpu").generate("a cat")


def test_settings_that_do_not_fit_fail_at_set_up_with_what_to_do(
    folders: dict[str, Path],
) -> None:
    with pytest.raises(ConfigurationError, match="takes no max_sequence_length"):
        SDXLTool(str(folders["sdxl"]), device="cpu", max_sequence_length=77).setup()
    with pytest.raises(ConfigurationError, match="needs a CUDA device"):
        FluxTool(str(folders["flux"]), device="cpu", offload="model").setup()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="sees no CUDA GPU"):
            FluxTool(str(folders["flux"]), device="cuda").setup()
    with pytest.raises(
        ConfigurationError, match=r"has no NoSuchPipeline.*pip install -U diffusers"
    ):
        DiffusersTool(str(folders["flux"]), pipeline_class="NoSuchPipeline").setup()
    with pytest.raises(ConfigurationError, match="generator_device='nowhere'"):
        flux(folders, generator_device="nowhere").setup()
    with pytest.raises(ConfigurationError, match="call_kwargs may not set num_images_per_prompt"):
        flux(folders, call_kwargs={"num_images_per_prompt": 2})
    with pytest.raises(ConfigurationError, match=r"unknown scheduler 'Nope'.*Euler"):
        flux(folders, scheduler="Nope").setup()
    with pytest.raises(ConfigurationError, match="unknown settings \\['stepz'\\]"):
        flux(folders).generate("a cat", stepz=3)


# --------------------------------------------------------------------------- switches


def test_a_lora_changes_images_and_fusing_it_changes_nothing_more(
    folders: dict[str, Path], lora_folder: Path
) -> None:
    base = flux(folders).generate("a shoe", seeds=[2])[0]
    half = flux(folders, lora=str(lora_folder), lora_scale=0.5)
    fused = flux(folders, lora=Lora(str(lora_folder), scale=0.5), fuse_lora=True)
    with_lora, with_fused = (
        half.generate("a shoe", seeds=[2])[0],
        fused.generate("a shoe", seeds=[2])[0],
    )
    assert max_diff(base, with_lora) > 0
    assert max_diff(with_lora, with_fused) <= 1
    assert fused.describe()["lora"][0]["scale"] == 0.5 and fused.describe()["fuse_lora"]


def test_the_turbo_preset_loads_and_fuses_its_lora(
    folders: dict[str, Path], lora_folder: Path
) -> None:
    tool = FluxTool(
        str(folders["flux"]), preset="turbo", lora=str(lora_folder), device="cpu",
        width=32, height=32, **TEXT,
    )  # fmt: skip
    forwards = _count_forwards(tool)
    tool.generate("a shoe", seeds=[0])
    assert len(forwards) == 8  # the preset's 8 steps
    assert not tool.pipe.get_list_adapters()  # fused and unloaded


def test_a_scheduler_can_be_swapped_by_name(folders: dict[str, Path]) -> None:
    tool = SDXLTool(str(folders["sdxl"]), **SMALL, scheduler="DPMSolverMultistepScheduler")
    images = tool.generate("a tree", seeds=[0])
    assert type(tool.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    default = SDXLTool(str(folders["sdxl"]), **SMALL).generate("a tree", seeds=[0])
    assert max_diff(images[0], default[0]) > 0


def test_vae_slicing_and_tiling_are_switched_on(folders: dict[str, Path]) -> None:
    tool = SDXLTool(str(folders["sdxl"]), **SMALL, vae_slicing=True, vae_tiling=True)
    images = tool.generate("a road", seeds=[0, 1])
    assert tool.pipe.vae.use_slicing and tool.pipe.vae.use_tiling
    assert len(images) == 2


def test_a_pickled_tool_loads_again_where_it_is_unpickled(folders: dict[str, Path]) -> None:
    tool = flux(folders)
    image = tool.generate("a cup", seeds=[4])[0]
    copy = pickle.loads(pickle.dumps(tool))
    assert copy.pipe is None
    assert max_diff(copy.generate("a cup", seeds=[4])[0], image) == 0


def test_importing_the_tools_does_not_import_torch() -> None:
    code = (
        "import sys; from genagent.tools import FluxTool, DiffusersTool; FluxTool(); "
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------- review findings


def test_the_failed_batch_is_freed_before_the_smaller_retries(folders: dict[str, Path]) -> None:
    import gc
    import weakref

    tool = flux(folders)
    tool.setup()
    failed: list[Any] = []
    alive_during_retry: list[bool] = []

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        states = kwargs["hidden_states"]
        if states.shape[0] > 1:
            failed.append(weakref.ref(states))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        gc.collect()
        alive_during_retry.append(any(ref() is not None for ref in failed))

    tool.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    assert len(tool.generate("a lamp", seeds=[1, 2])) == 2
    assert failed and alive_during_retry and not any(alive_during_retry)


def test_tools_sharing_one_pipeline_never_run_it_at_once(folders: dict[str, Path]) -> None:
    shared = flux(folders)
    shared.setup()
    tools = [FluxTool(shared.pipe, **SMALL, **TEXT) for _ in range(2)]
    expected = [shared.generate(f"a {c} hat", seeds=[i])[0] for i, c in enumerate("ab")]
    got: dict[int, Image.Image] = {}

    def call(i: int) -> None:
        got[i] = tools[i].generate(f"a {'ab'[i]} hat", seeds=[i])[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(max_diff(got[i], expected[i]) == 0 for i in range(2))


def test_a_given_pipeline_gets_its_lora_once_even_after_pickling(
    folders: dict[str, Path], lora_folder: Path
) -> None:
    pipe = type(tiny_diffusers_pipeline("flux")).from_pretrained(str(folders["flux"]))
    tool = FluxTool(pipe, **SMALL, **TEXT, lora=str(lora_folder), lora_scale=0.5, fuse_lora=True)
    image = tool.generate("a hat", seeds=[3])[0]
    copy = pickle.loads(pickle.dumps(tool))
    assert max_diff(copy.generate("a hat", seeds=[3])[0], image) == 0  # not fused twice
    fresh = type(pipe).from_pretrained(str(folders["flux"]))
    once = FluxTool(fresh, **SMALL, **TEXT, lora=str(lora_folder), lora_scale=0.5)
    assert max_diff(once.generate("a hat", seeds=[3])[0], image) <= 1  # the LoRA, once


def test_a_setting_the_pipeline_does_not_take_fails_before_loading(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionXLPipeline

    loads: list[str] = []
    real = StableDiffusionXLPipeline.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        loads.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", spy)
    with pytest.raises(ConfigurationError, match="takes no max_sequence_length"):
        SDXLTool(str(folders["sdxl"]), device="cpu", max_sequence_length=77).setup()
    with pytest.raises(ConfigurationError, match="takes no no_such_argument"):
        DiffusersTool(str(folders["sdxl"]), call_kwargs={"no_such_argument": 1}).setup()
    assert loads == []  # no weights were read to report either mistake


def test_per_call_settings_are_checked_like_the_tools_own(folders: dict[str, Path]) -> None:
    tool = flux(folders)
    with pytest.raises(ConfigurationError, match="takes no no_such_kwarg"):
        tool.generate("a cat", extra={"no_such_kwarg": 1})
    with pytest.raises(ConfigurationError, match="true_cfg"):
        tool.generate("a cat", negative_prompt="blurry")
    with pytest.raises(ConfigurationError, match="steps must be a positive int"):
        tool.generate("a cat", steps=0)
    with pytest.raises(ConfigurationError, match="may not set num_images_per_prompt"):
        tool.generate("a cat", extra={"num_images_per_prompt": 2})
    with pytest.raises(ConfigurationError, match="seeds must be non-negative ints"):
        tool.generate("a cat", seeds=[1, "2"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="non-empty text"):
        tool.generate("  ")
    with pytest.raises(ConfigurationError, match="must be a PIL image"):
        FluxKontextTool(str(folders["flux-kontext"])).edit(b"png bytes", "x")  # type: ignore[arg-type]
    both = tool.generate("a cat", seeds=[0], negative_prompt="blurry", true_cfg=2.0)
    assert both[0].size == (32, 32)


def test_a_given_pipeline_takes_an_explicit_dtype_and_presets_take_lora_scale(
    folders: dict[str, Path],
) -> None:
    pipe = type(tiny_diffusers_pipeline("flux")).from_pretrained(str(folders["flux"]))
    tool = FluxTool(pipe, **SMALL, **TEXT, dtype="bfloat16")
    tool.setup()
    assert tool.pipe.dtype == torch.bfloat16
    turbo = FluxTool(preset="turbo", lora_scale=0.5)
    assert [spec.scale for spec in turbo.loras] == [0.5]
    own = FluxTool(lora=[Lora("a/b", scale=0.8), "c/d"], lora_scale=0.3)
    assert [spec.scale for spec in own.loras] == [0.8, 0.3]
    shifted = flux(folders, scheduler_kwargs={"shift": 2.0})
    shifted.setup()
    assert shifted.pipe.scheduler.config.shift == 2.0


def test_closing_while_calls_run_loses_none_of_them(folders: dict[str, Path]) -> None:
    tool = flux(folders, max_wait_s=0.05)
    tool.setup()

    async def calls() -> list[list[Image.Image]]:
        tasks = [asyncio.ensure_future(tool.agenerate(f"a {i}", seeds=[i])) for i in range(4)]
        await asyncio.sleep(0)
        tool.close()
        more = await tool.agenerate("after", seeds=[9])  # a new batcher serves it
        return [*(await asyncio.gather(*tasks)), more]

    assert [len(images) for images in asyncio.run(calls())] == [1] * 5


def test_load_errors_name_the_right_cause() -> None:
    from genagent.tools._diffusers import _load_error

    token = _load_error("x/y", ValueError("Invalid header value b'Bearer hf_abc\\n'"))
    assert "corrupt" not in str(token)
    try:
        raise OSError("Unable to load weights from checkpoint file") from ImportError(
            "no module", name="sentencepiece"
        )
    except OSError as exc:
        missing = _load_error("x/y", exc)
    assert "not installed (sentencepiece)" in str(missing)


def test_gated_weights_say_how_to_get_access(tmp_path: Path) -> None:
    """Against a local server speaking the Hub's wire format for a gated repository."""
    from ._servers import Reply, ScriptedServer

    def gated(request: Any) -> Reply:
        return Reply(
            {"error": "Access to model org/gated is restricted. Please log in."},
            401,
            headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted."},
        )

    code = (
        "from genagent.tools import FluxTool\n"
        "try:\n"
        "    FluxTool('org/gated', device='cpu').setup()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    with ScriptedServer() as server:
        for path in ("/api/models/org/gated", "/api/models/org/gated/revision/main"):
            server.always("GET", path, gated)
        env = {
            **os.environ,
            "HF_ENDPOINT": server.url,
            "HF_HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        asked = [r.path for r in server.requests]
    assert "/api/models/org/gated" in asked  # it asked the Hub, which answered "gated"
    assert out.stdout.startswith("ToolUnavailable"), out.stderr[-2000:]
    assert "is gated" in out.stdout and "huggingface-cli login" in out.stdout
