"""The public surface is deliberate: these tests pin it, so a change to it is a visible decision."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import genagent

PUBLIC = {
    "genagent": [
        "Action", "Agent", "BudgetExceeded", "CompositeReward", "ConfigurationError",
        "DirectoryImageStore", "EditTool", "ErrorInfo", "FinalStep", "FunctionPolicy",
        "GenAgentError", "GenAgentProtocol", "GenerationTool", "HookError", "HookList", "Hooks",
        "ImagePart", "ImageRef", "ImageStore", "InvalidImageError", "MemoryImageStore", "Message",
        "ModelVisibleError", "PairwiseOutput", "PairwiseReward", "Policy", "PolicyError",
        "PolicyOutput", "PolicyStep", "ProtocolError", "ProtocolState", "ReplyProtocol", "Reward",
        "RewardContext", "RewardOutput", "RoundRecord", "RunContext", "RunError", "SamplingParams",
        "ScriptedPolicy", "SeedPolicy", "Step", "Task", "Termination", "TextPart", "Tool",
        "ToolArgumentError", "ToolCall", "ToolContext", "ToolDefinitionError",
        "ToolExecutionError", "ToolOutcome", "ToolProgress", "ToolRefused", "ToolResult",
        "ToolStep", "ToolUnavailable", "Trajectory", "TrajectoryError", "Turn", "Usage",
        "__version__", "reward", "tool",
    ],
    "genagent.tools": [
        "A1111EditTool", "A1111Tool", "BFLEditTool", "BFLTool", "BatcherStats",
        "ComfyUIEditTool", "ComfyUITool", "DiffusersEditTool", "DiffusersTool", "EditArgs",
        "EditTool", "FalEditTool", "FalTool", "Family", "FluxKontextTool", "FluxTool",
        "GenAgentServerEditTool", "GenAgentServerTool", "GenerationArgs", "GenerationSettings",
        "GenerationTool", "Lora", "MicroBatcher", "OpenAIImageEditTool", "OpenAIImagesTool",
        "QwenImageEditTool", "QwenImageTool", "RemoteTool", "ReplicateEditTool", "ReplicateTool",
        "SD3Tool", "SDXLTool", "Tool", "ToolContext", "ToolProgress", "ToolResult", "tool",
    ],
    "genagent.tools.http": [
        "A1111EditTool", "A1111Tool", "BFLEditTool", "BFLTool", "ComfyUIEditTool", "ComfyUITool",
        "FalEditTool", "FalTool", "GenAgentServerEditTool", "GenAgentServerTool",
        "HTTPResponseError", "OpenAIImageEditTool", "OpenAIImagesTool", "RemoteTool",
        "ReplicateEditTool", "ReplicateTool",
    ],
    "genagent.server": ["GenerateRequest", "ToolServer", "make_server", "serve"],
    "genagent.policies": [
        "FunctionPolicy", "OpenAIPolicy", "Policy", "PolicyOutput", "SamplingParams",
        "ScriptedPolicy", "TransformersPolicy", "describe_policy", "policy_from_spec",
    ],
    "genagent.policies.openai": ["OpenAIPolicy"],
    "genagent.policies.transformers": ["LogitsProcessor", "PolicyStats", "TransformersPolicy"],
    "genagent.testing": [
        "QWEN_VL_CHAT_TEMPLATE", "TINY_PIPELINES", "ScriptedLogits", "qwen_tokenizer",
        "tiny_diffusers_pipeline", "tiny_flux_lora", "tiny_qwen2_5_vl",
    ],
    "genagent.rewards": [
        "ChecklistItem", "ChecklistJudge", "CompositeReward", "JudgeQuery", "JudgeVerdict",
        "PairwiseAsReward", "PairwiseJudge", "PairwiseOutput", "PairwiseReward", "PointwiseJudge",
        "PolicyVerdict", "ReflectionAccuracy", "Reward", "RewardContext", "RewardOutput",
        "VLMJudge", "WiseJudge", "build_checklist", "coerce_reward_output", "read_judgment",
        "reward",
    ],
    "genagent.evals": [
        "BENCHMARKS", "GENEVAL_PP_TAGS", "GENEVAL_TAGS", "SCORING_RULES", "WISE_CATEGORIES",
        "WISE_LEGACY_RANGES", "WISE_LEGACY_WEIGHTS", "WISE_VERIFIED_RANGES",
        "WISE_VERIFIED_WEIGHTS", "Benchmark", "BenchmarkChecksumError", "BenchmarkDownloadError",
        "BenchmarkError", "BenchmarkFileError", "BenchmarkSummary", "CategoryScore", "EvalResult",
        "EvalSummary", "Evaluation", "ModeSummary", "PromptResult", "RoundScore", "Scoring",
        "aggregate", "default_cache_dir", "load_benchmark", "load_prompts", "load_results",
        "plot_scaling", "summarize_scores", "wiscore",
    ],
    "genagent.evals.report": ["write_report"],
    "genagent.kernels": [
        "KernelConfig", "autotune_enabled", "decode_attention", "default_config", "is_available",
        "set_autotune", "unsupported_reason", "varlen_attention", "varlen_attention_with_lse",
    ],
    "genagent.kernels.hf": [
        "ATTENTION_NAME", "attention_forward", "enable_fused_attention", "fused_attention_mask",
        "register", "reset_stats", "stats",
    ],
    "genagent.training": [
        "FormatPenalties", "GroupAdvantages", "IMAGES_DIR", "LoRAConfig", "MicroBatch", "RLConfig",
        "RLResult", "RLReward", "RLRewardConfig", "RLRewardOutput", "RLStepResult", "RLTrainer",
        "ResampleConfig", "RewardWeights", "RolloutConfig", "RolloutGroup", "SFTConfig",
        "SFTFilter", "SFTResult", "SFTTrainer", "TokenRow", "TrainConfig", "branch_points",
        "branch_run", "broadcast_advantages", "build_rows", "choose_branches", "collate",
        "combine_rewards", "export_trl", "export_verl", "format_penalties", "group_advantages",
        "group_has_signal", "mask_prefix", "pack", "policy_loss", "read_jsonl_rows",
        "resample_decision", "rl_step", "rollout_groups", "rope_position_ids", "rows_from_messages",
        "rows_from_trajectory", "token_logprobs",
    ],
    "genagent.sim": [
        "BASE_ERROR", "CATEGORIES", "EDIT_SUCCESS", "EXPLICIT_FACTOR", "RECORD_KEY",
        "CheckResult", "Constraint", "DrawnObject", "ErrorModel", "HeuristicPolicy", "ObjectSpec",
        "SceneEditTool", "SceneJudge", "SceneRecord", "SceneSpec", "SceneTool", "check_scene",
        "parse_caption", "parse_edit", "read_record", "sample_tasks", "scene_tools",
        "write_caption",
    ],
    "genagent.registry": ["Registry", "RegistryEntry", "policies", "rewards", "tools"],
    "genagent.protocol": [
        "DEFAULT_SYSTEM_TEMPLATE", "GenAgentProtocol", "ProtocolState", "ReplyProtocol",
    ],
    "genagent.trajectory": [
        "Action", "ErrorInfo", "RoundRecord", "TRAJECTORY_FILE", "Termination", "ToolCall",
        "ToolOutcome", "Trajectory", "Turn", "Usage",
    ],
    "genagent.errors": [
        "BudgetExceeded", "ConfigurationError", "GenAgentError", "HookError",
        "InvalidImageError", "ModelVisibleError", "PolicyError", "ProtocolError", "RunError",
        "ToolArgumentError", "ToolDefinitionError", "ToolExecutionError", "ToolRefused",
        "ToolUnavailable", "TrajectoryError",
    ],
    "genagent.hooks": ["HookList", "Hooks", "RunContext"],
    "genagent.images": [
        "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_IMAGE_PIXELS", "DirectoryImageStore",
        "ImageFormat", "ImageLike", "ImageRef", "ImageStore", "MemoryImageStore",
        "decode_base64_image", "encode_png", "inspect_image", "to_data_uri",
    ],
    "genagent.messages": ["ImagePart", "Message", "Part", "Role", "TextPart"],
    "genagent.tasks": ["Task"],
    "genagent.agent": ["Agent", "FinalStep", "PolicyStep", "SeedPolicy", "Step", "ToolStep"],
}  # fmt: skip


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_public_names_are_pinned(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_public_names_exist_and_are_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"


def test_core_contracts_import_from_the_top_level() -> None:
    from genagent import Agent, Reward, Tool, Trajectory  # noqa: F401


def test_version_is_a_string() -> None:
    assert isinstance(genagent.__version__, str) and genagent.__version__.count(".") >= 2


def test_import_is_light() -> None:
    # `import genagent` must not pull heavy or optional modules (HTTP-only use, fast start)
    code = (
        "import sys, genagent\n"
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'triton', 'PIL', 'rich',"
        " 'typer', 'httpx', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
