"""RL rollouts served by a vLLM server, with the trained LoRA adapter synced after each update.

The server is real HTTP on 127.0.0.1 speaking vLLM's OpenAI-compatible wire format
(``/v1/chat/completions`` with ``return_token_ids`` and ``logprobs``, the runtime LoRA
endpoints ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, ``--api-key`` bearer
auth), backed by a real tiny Qwen2.5-VL with peft adapters loaded from the folders the trainer
writes. It renders the chat template as vLLM does (the whole conversation every call, images
from ``data:`` URLs expanded to their image tokens) and writes scripted replies through the
model's sampling path, so token ids and log-probabilities are the model's own.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from genagent.errors import ConfigurationError
from genagent.protocol import GenAgentProtocol
from genagent.sim import SceneJudge, sample_tasks
from genagent.training.rewards import RLReward, RLRewardOutput
from genagent.trajectory import Trajectory

from ._servers import Recorded, Reply, ScriptedServer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from genagent.training import rl_trainer  # noqa: E402  (needs torch)
from genagent.training.distributed import VLLMSyncError  # noqa: E402
from genagent.training.rl import RLConfig, RLTrainer  # noqa: E402

KEY_ENV = "GENAGENT_TEST_VLLM_KEY"
KEY = "sk-test-6f1d9c0e-never-logged"
TASK = sample_tasks(6, seed=2)[3]
DRAW = (
    '<think>Draw it.</think><tool_call>{"name": "image_generation_tool", "arguments": '
    f'{{"caption": "{TASK.prompt}"}}}}</tool_call>'
)
ANSWER = "<think>Good.</think><answer>done</answer>"


class ShortPrompt(GenAgentProtocol):
    """GenAgent's reply format with a one-line system prompt: short rows train fast on a CPU."""

    def system_prompt(self, tools: Sequence[Any]) -> str:
        return "Call image_generation_tool in <tool_call>, then <answer>."


class AlternatingReward(RLReward):
    """Totals 1, 0, 1, 0, ... in scoring order: every group of two has signal (no resampling)."""

    def __init__(self) -> None:
        super().__init__(SceneJudge())
        self.calls = 0

    async def ascore(self, trajectory: Trajectory) -> RLRewardOutput:
        self.calls += 1
        total = float(self.calls % 2)
        return RLRewardOutput(total=total, final=total, reflection=0.0, format=0.0)


# --------------------------------------------------------------------------- the server


@dataclass
class Completion:
    """What the server answered to one chat request."""

    model: str
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]


@dataclass
class TinyVLLM:
    """The vLLM routes the trainer uses, served by a tiny real model (see the module docstring).

    ``accept_loads``: answer 404 to ``load_lora_adapter`` after that many loads, as a server
    started without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` does; ``token_ids``: honour
    ``return_token_ids`` (vLLM before 0.10.2 ignores it).
    """

    folder: Path
    model: Any = None
    processor: Any = None
    peft: Any = None
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> path
    events: list[tuple[str, str]] = field(default_factory=list)  # ("load", path) / ("chat", name)
    completions: list[Completion] = field(default_factory=list)
    accept_loads: int | None = None
    token_ids: bool = True
    loads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        from genagent.policies import TransformersPolicy
        from genagent.testing import ScriptedLogits

        loaded = TransformersPolicy.from_pretrained(str(self.folder), device="cpu")
        self.model, self.processor = loaded.model.eval(), loaded.processor
        self.tokenizer = self.processor.tokenizer
        self.script = ScriptedLogits(self.tokenizer, [DRAW, ANSWER])
        config = self.model.config
        self.never = [config.image_token_id, config.video_token_id]
        self.never += [config.vision_start_token_id, config.vision_end_token_id]

    def reset(self) -> None:
        self.adapters.clear()
        self.events.clear()
        self.completions.clear()
        self.accept_loads, self.token_ids, self.loads = None, True, 0

    def install(self, server: ScriptedServer) -> None:
        server.always("POST", "/v1/chat/completions", self._authorized(self.chat))
        server.always("POST", "/v1/load_lora_adapter", self._authorized(self.load))
        server.always("POST", "/v1/unload_lora_adapter", self._authorized(self.unload))

    def _authorized(self, handler: Any) -> Any:
        def serve(request: Recorded) -> Reply:
            if request.headers.get("Authorization") != f"Bearer {KEY}":
                return Reply({"error": "Unauthorized"}, 401)
            return handler(request)

        return serve

    # ------------------------------------------------------------------ LoRA

    def load(self, request: Recorded) -> Reply:
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        body = request.body
        name, path = body["lora_name"], body["lora_path"]
        with self.lock:
            self.loads += 1
            if self.accept_loads is not None and self.loads > self.accept_loads:
                return Reply({"detail": "Not Found"}, 404)
            if name in self.adapters and not body.get("load_inplace"):
                message = f"The lora adapter '{name}' has already been loaded."
                return Reply({"object": "error", "message": message, "code": 400}, 400)
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            elif name not in self.peft.peft_config:
                self.peft.load_adapter(path, adapter_name=name)
            else:  # in place: the new weights into the served adapter
                weights = load_file(str(Path(path) / "adapter_model.safetensors"))
                set_peft_model_state_dict(self.peft, weights, adapter_name=name)
            self.peft.eval()
            self.adapters[name] = path
            self.events.append(("load", path))
        return Reply(f"Success: LoRA adapter '{name}' added successfully.")

    def unload(self, request: Recorded) -> Reply:
        with self.lock:
            self.adapters.pop(request.body["lora_name"], None)
        return Reply("Success")

    def adapter_weights(self, name: str) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        return {
            k: v.detach().clone()
            for k, v in get_peft_model_state_dict(self.peft, adapter_name=name).items()
        }

    # ------------------------------------------------------------------ chat

    def chat(self, request: Recorded) -> Reply:
        from PIL import Image

        body = request.body
        name = body["model"]
        if name not in self.adapters:
            message = f"The model `{name}` does not exist."
            return Reply({"object": "error", "message": message, "code": 404}, 404)
        # as TransformersPolicy renders a conversation: every content as parts, images as
        # {"type": "image"} in order
        conversation, images = [], []
        for message in body["messages"]:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
            for part in [] if isinstance(content, str) else content:
                if part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    data = part["image_url"]["url"].split(",", 1)[1]
                    images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
                    parts.append({"type": "image"})
            conversation.append({"role": message["role"], "content": parts})
        text = self.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        encoded = self.processor(
            text=[text], images=images or None, return_tensors="pt", add_special_tokens=False
        )
        prompt_ids = encoded["input_ids"][0].tolist()
        temperature = float(body.get("temperature", 1.0))
        with self.lock:
            self.events.append(("chat", name))
            self.peft.set_adapter(name)
            n = len(prompt_ids)

            def scripted(input_ids: Any, scores: Any) -> Any:
                ids = input_ids[0].tolist()
                return self.script(ids[:n], ids[n:], scores[0]).unsqueeze(0)

            with torch.no_grad():
                out = self.peft.generate(
                    **encoded,
                    max_new_tokens=int(body["max_tokens"]),
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=float(body.get("top_p") or 1.0),
                    logits_processor=[scripted],
                    suppress_tokens=self.never,
                    output_logits=True,
                    return_dict_in_generate=True,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
        output_ids = out.sequences[0, n:].tolist()
        # the log-probabilities of the model's own logits at the sampling temperature, before
        # the script forced the token (vLLM's --logprobs-mode processed_logprobs)
        logprobs = [
            float(torch.log_softmax(logits[0].float() / temperature, -1)[token])
            for logits, token in zip(out.logits, output_ids, strict=True)
        ]
        output_ids, text, finish, stop = self._stop(output_ids, body.get("stop") or [])
        logprobs = logprobs[: len(output_ids)]
        with self.lock:
            self.completions.append(Completion(name, prompt_ids, output_ids, logprobs))
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "stop_reason": stop,
            "logprobs": None,
        }
        if body.get("logprobs"):
            tokens = [self.tokenizer.decode([t]) for t in output_ids]
            choice["logprobs"] = {
                "content": [
                    {"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                    for t, lp in zip(tokens, logprobs, strict=True)
                ]
            }
        reply: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.completions)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(output_ids),
                "total_tokens": len(prompt_ids) + len(output_ids),
            },
        }
        if body.get("return_token_ids") and self.token_ids:
            choice["token_ids"] = output_ids
            reply["prompt_token_ids"] = prompt_ids
        return Reply(reply)

    def _stop(self, ids: list[int], stops: list[str]) -> tuple[list[int], str, str, str | None]:
        """vLLM's stop strings: the text ends before one, the token ids keep its tokens.

        Special tokens stay in the text: this vocabulary marks ``<tool_call>`` special, which
        the real Qwen vocabulary does not (vLLM would skip it otherwise).
        """
        eos = self.tokenizer.eos_token_id
        for k in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:k], skip_special_tokens=False)
            for stop in stops:
                if stop in text:
                    return ids[:k], text[: text.index(stop)], "stop", stop
        if ids and ids[-1] == eos:
            return ids, self.tokenizer.decode(ids[:-1], skip_special_tokens=False), "stop", None
        return ids, self.tokenizer.decode(ids, skip_special_tokens=False), "length", None


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genagent.testing import tiny_qwen2_5_vl

    # the byte vocabulary keeps the output layer small (fast on a CPU)
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-vllm"), tokenizer="byte")


@pytest.fixture(scope="module")
def served(tiny_folder: Path) -> Any:
    vllm = TinyVLLM(tiny_folder)
    with ScriptedServer() as server:
        vllm.install(server)
        yield vllm, server


@pytest.fixture
def vllm(served: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[TinyVLLM, ScriptedServer]:
    server_state, server = served
    server_state.reset()
    server.requests.clear()
    monkeypatch.setenv(KEY_ENV, KEY)
    return server_state, server


def _config(folder: Path, out: Path, url: str, **overrides: Any) -> RLConfig:
    data: dict[str, Any] = {
        "model": str(folder),
        "output_dir": str(out),
        "max_steps": 2,
        "group_size": 2,
        "max_resample": 0,
        "tasks_per_step": 1,
        "max_rounds": 2,
        "max_new_tokens": 200,
        "lr": 5e-3,
        "tensorboard": False,
        "lora": {"r": 4, "alpha": 8},
        "rollout": {"backend": "vllm", "base_url": url, "api_key_env": KEY_ENV},
        **overrides,
    }
    return RLConfig.from_dict(data)


def _trainer(config: RLConfig) -> RLTrainer:
    return RLTrainer(
        config,
        tasks=[TASK],
        reward=AlternatingReward(),
        agent_kwargs={"max_retries": 0, "protocol": ShortPrompt()},
    )


# --------------------------------------------------------------------------- end to end


def test_rollouts_use_the_served_adapter_synced_before_and_after_every_step(
    vllm: tuple[TinyVLLM, ScriptedServer],
    tiny_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from safetensors.torch import load_file

    server, http = vllm
    rows: list[Any] = []
    build_rows = rl_trainer.build_rows

    def recording(*args: Any, **kwargs: Any) -> Any:
        built = build_rows(*args, **kwargs)
        rows.extend(built)
        return built

    monkeypatch.setattr(rl_trainer, "build_rows", recording)
    caplog.set_level(logging.DEBUG, logger="genagent")
    out = tmp_path / "out"
    result = _trainer(_config(tiny_folder, out, http.url)).train()

    # synced before the first rollouts and after each of the two steps, in that order
    adapters = out / "rollout-adapters"
    loads = [Path(path).name for kind, path in server.events if kind == "load"]
    assert loads == ["step-000000", "step-000001", "step-000002"]
    kinds = [kind for kind, _ in server.events]
    assert kinds[0] == "load" and kinds[-1] == "load"
    first_sync_after_step = kinds.index("load", 1)
    assert "chat" in kinds[1:first_sync_after_step] and "chat" in kinds[first_sync_after_step:]
    assert sorted(p.name for p in adapters.iterdir()) == ["step-000001", "step-000002"]
    assert [r["sync_s"] > 0 for r in result.history] == [True, True]

    # the server now serves exactly the trained adapter, which training did change
    served_weights = server.adapter_weights("policy")
    saved = load_file(str(result.final_dir / "model" / "adapter_model.safetensors"))
    assert sorted(served_weights) == sorted(saved)
    assert all(torch.equal(served_weights[k], saved[k]) for k in saved)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)

    # rows are the server's ids: a row is one completion's prompt + output ids, its loss mask
    # covers exactly the output ids of the completions it holds, with the server's logprobs
    assert rows and all(r.advantage is not None for r in rows)
    for row in rows:
        assert any(c.prompt_ids + c.output_ids == row.input_ids for c in server.completions)
        # the completions whose ids the row holds (the same ids may come from both steps)
        spans: dict[tuple[int, int], list[list[float]]] = {}
        for c in server.completions:
            start, end = len(c.prompt_ids), len(c.prompt_ids) + len(c.output_ids)
            if row.input_ids[:end] == c.prompt_ids + c.output_ids:
                spans.setdefault((start, end), []).append(c.logprobs)
        trained = {i for start, end in spans for i in range(start, end)}
        assert {i for i, m in enumerate(row.loss_mask) if m} == trained
        for (start, end), candidates in spans.items():
            recorded = row.old_logprobs[start:end]
            assert any(recorded == pytest.approx(lp, abs=1e-6) for lp in candidates)
    # the trainer's forward pass agrees with the server's weights: the importance ratio is ~1
    assert all(abs(r["ratio_mean"] - 1.0) < 1e-3 for r in result.history)

    # the key went to the server as a bearer token on every request, and nowhere else
    assert {r.headers.get("Authorization") for r in http.requests} == {f"Bearer {KEY}"}
    assert {r.path for r in http.requests} >= {"/v1/chat/completions", "/v1/load_lora_adapter"}
    assert KEY not in caplog.text
    assert (out / "metrics.jsonl").is_file()
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and "sync_s" in record


# --------------------------------------------------------------------------- failures


def test_a_server_refusing_the_adapter_raises_vllm_sync_error(
    vllm: tuple[TinyVLLM, ScriptedServer], tiny_folder: Path, tmp_path: Path
) -> None:
    server, http = vllm
    server.accept_loads = 0
    trainer = _trainer(_config(tiny_folder, tmp_path / "out", http.url))
    with pytest.raises(VLLMSyncError, match=r"/v1/load_lora_adapter answered 404") as info:
        trainer.train()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in str(info.value)
    assert not server.completions  # no rollout against weights that are not the trainer's


def test_a_failed_sync_keeps_the_update_and_the_resumed_run_syncs_it_first(
    vllm: tuple[TinyVLLM, ScriptedServer], tiny_folder: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    server, http = vllm
    server.accept_loads = 1  # the sync at the start works, the one after step 1 fails
    out = tmp_path / "out"
    trainer = _trainer(_config(tiny_folder, out, http.url, max_steps=1))
    with pytest.raises(VLLMSyncError, match="resume_from='latest'"):
        trainer.train()
    checkpoint = out / "checkpoints" / "step-000001"
    assert (checkpoint / "trainer_state.json").is_file()
    assert json.loads((out / "metrics.jsonl").read_text())["step"] == 1

    # the server is fixed; the resumed run first has it serve the checkpoint's adapter
    server.reset()
    resumed = _trainer(_config(tiny_folder, out, http.url, max_steps=2, resume_from="latest"))
    result = resumed.train()
    assert result.steps == 2
    assert server.events[0] == ("load", str((out / "rollout-adapters" / "step-000001").resolve()))
    first = load_file(str(out / "rollout-adapters" / "step-000001" / "adapter_model.safetensors"))
    kept = load_file(str(checkpoint / "model" / "adapter_model.safetensors"))
    assert all(torch.equal(first[k], kept[k]) for k in kept)


def test_a_server_without_return_token_ids_is_refused_with_what_to_use(
    vllm: tuple[TinyVLLM, ScriptedServer], tiny_folder: Path, tmp_path: Path
) -> None:
    server, http = vllm
    server.token_ids = False
    trainer = _trainer(_config(tiny_folder, tmp_path / "out", http.url, max_steps=1))
    with pytest.raises(ConfigurationError, match="return_token_ids"):
        trainer.train()
    assert server.completions  # it did roll out; the replies came without ids


def test_vllm_rollouts_need_lora_and_a_base_url(tmp_path: Path) -> None:
    base = {"model": "m", "output_dir": str(tmp_path)}
    with pytest.raises(ConfigurationError, match=r"needs LoRA.*verl"):
        RLConfig.from_dict(
            {**base, "lora": None, "rollout": {"backend": "vllm", "base_url": "http://h:8000"}}
        )
    with pytest.raises(ConfigurationError, match=r"needs rollout\.base_url"):
        RLConfig.from_dict({**base, "rollout": {"backend": "vllm"}})
    with pytest.raises(ConfigurationError, match="sync_every"):
        RLConfig.from_dict({**base, "rollout": {"sync_every": 0}})
    # a configuration changed after validation is checked again by the trainer, before loading
    config = RLConfig.from_dict({**base, "rollout": {"backend": "vllm", "base_url": "http://h"}})
    config.lora = None
    with pytest.raises(ConfigurationError, match="needs LoRA"):
        RLTrainer(config, tasks=[TASK])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unset_api_key_variable_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = _config(Path("m"), tmp_path, "http://127.0.0.1:9")
    with pytest.raises(ConfigurationError, match=KEY_ENV):
        RLTrainer(config, tasks=[TASK])
