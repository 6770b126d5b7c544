"""SFT trainer: it learns, accumulates per token, resumes exactly, and is driven by files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from genagent.errors import ConfigurationError  # noqa: E402
from genagent.testing import tiny_qwen2_5_vl  # noqa: E402
from genagent.training._common import (  # noqa: E402
    complete_checkpoints,
    latest_checkpoint,
    lora_target_pattern,
)
from genagent.training.config import LoRAConfig, SFTConfig  # noqa: E402
from genagent.training.sft import SFTTrainer, load_messages_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen2_5_vl(
        tmp_path_factory.mktemp("tiny") / "model", tokenizer="byte", layers=1, max_pixels=56 * 56
    )


def _row(ids: list[int], trained_from: int) -> Any:
    from genagent.training.data import TokenRow

    n = len(ids)
    return TokenRow(
        input_ids=ids,
        loss_mask=[0] * trained_from + [1] * (n - trained_from),
        old_logprobs=None,
        images=[],
        turn_of_token=[0] * n,
        turn_rewards={},
        reward=None,
    )


def _rows(count: int = 3, length: int = 24) -> list[Any]:
    # printable bytes (the byte vocabulary), a different "prompt" and "answer" per row
    return [
        _row([40 + (7 * i + 3 * j) % 60 for j in range(length)], trained_from=8)
        for i in range(count)
    ]


def _config(model: Path, out: Path, **overrides: Any) -> SFTConfig:
    values: dict[str, Any] = {
        "model": str(model),
        "output_dir": out,
        "lr": 1e-2,
        "max_steps": 4,
        "max_tokens": 32,  # one row per micro-batch
        "warmup_steps": 0,
        "schedule": "constant",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "tensorboard": False,
    }
    values.update(overrides)
    return SFTConfig.model_validate(values)


def _metrics(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _trainable(trainer: SFTTrainer) -> dict[str, Any]:
    model = trainer.runtime.unwrap(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_few_steps_reduce_the_loss_on_the_training_rows(
    tiny_model: Path, tmp_path: Path, lora: bool
) -> None:
    config = _config(
        tiny_model,
        tmp_path,
        max_steps=8,
        lr=1e-2 if lora else 2e-3,
        lora={"r": 8, "alpha": 16, "dropout": 0.0} if lora else None,
    )
    trainer = SFTTrainer(config, rows=_rows())
    before = trainer.evaluate().loss
    result = trainer.train()
    after = trainer.evaluate().loss
    assert result.steps == 8
    assert after < before - 0.3, (before, after)
    saved = {p.name for p in (tmp_path / "final" / "model").iterdir()}
    assert ("adapter_model.safetensors" in saved) is lora
    assert "tokenizer.json" in saved


def test_lora_trains_the_language_model_only(tiny_model: Path, tmp_path: Path) -> None:
    trainer = SFTTrainer(_config(tiny_model, tmp_path), rows=_rows())
    names = list(_trainable(trainer))
    assert names and all("lora_" in n for n in names)
    assert not any(".visual." in n for n in names)
    assert any("q_proj" in n for n in names) and any("down_proj" in n for n in names)


def test_lora_target_pattern_excludes_the_vision_tower() -> None:
    import re

    pattern = lora_target_pattern(["q_proj", "down_proj"], include_vision=False)
    assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
    assert re.fullmatch(pattern, "model.layers.0.mlp.down_proj")
    assert not re.fullmatch(pattern, "model.visual.blocks.0.mlp.down_proj")
    assert not re.fullmatch(pattern, "model.language_model.layers.0.self_attn.qq_proj")
    assert re.fullmatch(
        lora_target_pattern(["down_proj"], include_vision=True),
        "model.visual.blocks.0.mlp.down_proj",
    )


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(
    tiny_model: Path, tmp_path: Path
) -> None:
    from genagent.training.data import pack

    # rows with different numbers of trained tokens: a mean of per-batch means would differ
    first = _row(list(range(40, 70)), trained_from=5)
    second = _row(list(range(70, 82)), trained_from=8)
    trainer = SFTTrainer(_config(tiny_model, tmp_path, lora=None), rows=[first, second])
    trainer.model.zero_grad()
    together = trainer.compute_gradients(pack([first, second], 1000, processor=trainer.processor))
    grads_together = {
        n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
    }

    trainer.model.zero_grad()
    apart = [
        *pack([first], 1000, processor=trainer.processor),
        *pack([second], 1000, processor=trainer.processor),
    ]
    assert len(apart) == 2
    accumulated = trainer.compute_gradients(apart)
    grads_apart = {
        n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
    }

    assert together.tokens == accumulated.tokens == 25 + 4
    assert accumulated.loss == pytest.approx(together.loss, rel=1e-5)
    assert grads_together.keys() == grads_apart.keys() and grads_together
    for name, grad in grads_together.items():
        torch.testing.assert_close(grads_apart[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- checkpoints


def _interrupt_after(trainer: SFTTrainer, steps: int) -> None:
    original = trainer.train_step

    def step(group: Any) -> Any:
        if trainer.state.step >= steps:
            raise KeyboardInterrupt
        return original(group)

    trainer.train_step = step  # type: ignore[method-assign]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resuming_a_checkpoint_continues_exactly(
    tiny_model: Path, tmp_path: Path, lora: bool
) -> None:
    # 3 rows, one per micro-batch: the save at step 2 is mid-epoch, step 4 is in epoch 1;
    # LoRA dropout draws random numbers, so the random state must be restored too
    settings: dict[str, Any] = {
        "save_every": 2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.2} if lora else None,
        "lr": 1e-2 if lora else 1e-3,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_steps": 1,
    }
    straight = SFTTrainer(_config(tiny_model, tmp_path / "a", **settings), rows=_rows())
    straight.train()

    interrupted = SFTTrainer(_config(tiny_model, tmp_path / "b", **settings), rows=_rows())
    _interrupt_after(interrupted, 2)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert [p.name for p in complete_checkpoints(tmp_path / "b")] == ["step-000002"]

    resumed = SFTTrainer(
        _config(tiny_model, tmp_path / "b", **settings), rows=_rows(), resume_from="latest"
    )
    result = resumed.train()
    assert sorted(result.losses) == [3, 4]

    expected, got = _trainable(straight), _trainable(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    losses_a, losses_b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert sorted(losses_b) == [1, 2, 3, 4]
    assert [losses_b[s] for s in (3, 4)] == [losses_a[s] for s in (3, 4)]


def test_a_checkpoint_interrupted_while_written_is_never_resumed(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tiny_model, tmp_path, save_every=2, keep_last=5)
    trainer = SFTTrainer(config, rows=_rows())
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if "step-000004" in str(path):
            raise OSError("disk full")
        calls["n"] += 1
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    monkeypatch.setattr(torch, "save", real_save)

    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / ".tmp-step-000004").exists()  # the half-written folder
    assert not (checkpoints / "step-000004").exists()
    assert latest_checkpoint(tmp_path) == checkpoints / "step-000002"
    resumed = SFTTrainer(config, rows=_rows(), resume_from="latest")
    assert resumed.resumed_from == checkpoints / "step-000002"
    assert resumed.train().steps == 4
    assert latest_checkpoint(tmp_path) == checkpoints / "step-000004"


def test_keep_last_deletes_older_checkpoints(tiny_model: Path, tmp_path: Path) -> None:
    SFTTrainer(_config(tiny_model, tmp_path, save_every=1, keep_last=2), rows=_rows()).train()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_resume_from_a_folder_that_is_not_a_checkpoint_fails_clearly(
    tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match="not a complete checkpoint"):
        SFTTrainer(_config(tiny_model, tmp_path), rows=_rows(), resume_from=tmp_path)


# --------------------------------------------------------------------------- configuration


_TOML = """
model = "model"
output_dir = "runs/sft"
messages_jsonl = ["data/chats.jsonl"]
lr = 2e-5
max_steps = 3

[lora]
r = 8
"""


def test_toml_yaml_and_json_configs_read_the_same(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    (tmp_path / "model").mkdir()
    (tmp_path / "a.toml").write_text(_TOML)
    (tmp_path / "b.yaml").write_text(
        "model: model\noutput_dir: runs/sft\nmessages_jsonl: [data/chats.jsonl]\n"
        "lr: 2.0e-5\nmax_steps: 3\nlora: {r: 8}\n"
    )
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "model": "model",
                "output_dir": "runs/sft",
                "messages_jsonl": ["data/chats.jsonl"],
                "lr": 2e-5,
                "max_steps": 3,
                "lora": {"r": 8},
            }
        )
    )
    configs = [SFTConfig.from_file(tmp_path / name) for name in ("a.toml", "b.yaml", "c.json")]
    assert configs[0] == configs[1] == configs[2]
    config = configs[0]
    assert config.output_dir == tmp_path / "runs" / "sft"  # relative to the file
    assert config.model == str(tmp_path / "model")  # an existing folder is made absolute
    assert config.messages_jsonl == [str(tmp_path / "data" / "chats.jsonl")]
    assert config.lora == LoRAConfig(r=8)


def test_a_model_id_is_left_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('model = "Qwen/Qwen2.5-VL-3B-Instruct"\noutput_dir = "o"\n')
    assert SFTConfig.from_file(tmp_path / "c.toml").model == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_an_unknown_key_is_named(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(_TOML + "\n[filter]\nmin_rewrd = 0.5\n")
    with pytest.raises(ConfigurationError, match=r"unknown key 'filter\.min_rewrd'"):
        SFTConfig.from_file(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text("learning_rate = 1e-4\n" + _TOML)
    with pytest.raises(ConfigurationError, match="unknown key 'learning_rate'"):
        SFTConfig.from_file(tmp_path / "d.toml")


def test_set_overrides_replace_values_and_reach_into_sections(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(_TOML)
    config = SFTConfig.from_file(
        tmp_path / "c.toml",
        ["lr=1e-3", "lora.r=4", 'filter.termination=["answered"]', "run_name=my run"],
    )
    assert config.lr == 1e-3
    assert config.lora is not None and config.lora.r == 4
    assert config.filter.termination == ["answered"]
    assert config.run_name == "my run"
    assert SFTConfig.from_file(tmp_path / "c.toml", ["lora=null"]).lora is None
    with pytest.raises(ConfigurationError, match="KEY=VALUE"):
        SFTConfig.from_file(tmp_path / "c.toml", ["lr"])
    with pytest.raises(ConfigurationError, match="'max_steps'"):
        SFTConfig.from_file(tmp_path / "c.toml", ["max_steps=-1"])


def test_an_unsupported_config_format_says_which_to_use(tmp_path: Path) -> None:
    (tmp_path / "c.ini").write_text("[x]\n")
    with pytest.raises(ConfigurationError, match=r"\.toml, \.yaml, \.yml or \.json"):
        SFTConfig.from_file(tmp_path / "c.ini")


# --------------------------------------------------------------------------- data sources


def _image(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)


def test_messages_jsonl_reads_openai_style_conversations_with_images(tmp_path: Path) -> None:
    _image(tmp_path / "cat.png")
    conversation = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "cat.png"}},
                    {"type": "text", "text": "What is it?"},
                ],
            },
            {"role": "assistant", "content": "A red square."},
        ]
    }
    (tmp_path / "chats.jsonl").write_text(json.dumps(conversation) + "\n\n")
    [(messages, images)] = load_messages_jsonl(tmp_path / "chats.jsonl")
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert messages[1] == {"role": "assistant", "content": "A red square."}
    assert images[0].size == (40, 40)
    (tmp_path / "bad.jsonl").write_text(
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]}]}\n'
    )
    with pytest.raises(ConfigurationError, match=r"bad\.jsonl, line 1: cannot read the image"):
        load_messages_jsonl(tmp_path / "bad.jsonl")


def test_cli_train_sft_writes_checkpoints_and_metrics(tiny_model: Path, tmp_path: Path) -> None:
    _image(tmp_path / "cat.png")
    lines = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "cat.png"},
                        {"type": "text", "text": f"Describe {i}."},
                    ],
                },
                {"role": "assistant", "content": f"A red square number {i}."},
            ]
        }
        for i in range(2)
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "sft.toml").write_text(
        f'model = "{tiny_model}"\noutput_dir = "out"\nmessages_jsonl = ["chats.jsonl"]\n'
        "max_steps = 5\nsave_every = 2\nmax_tokens = 512\ntensorboard = false\n"
        "[lora]\nr = 4\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, "-m", "genagent", "train", "sft", str(tmp_path / "sft.toml"),
         "--set", "max_steps=2", "--set", "lr=1e-3"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002"]
    assert (out / "final" / "model" / "adapter_model.safetensors").is_file()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(1e-3)  # --set took effect (cosine from there)
    assert all(r["tokens"] > 0 and r["loss"] > 0 for r in records)
    assert "step 2" in proc.stderr


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "sft.toml").write_text('model = "m"\noutput_dir = "o"\nepochz = 1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "genagent", "train", "sft", str(tmp_path / "sft.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "unknown key 'epochz'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_trainer_without_a_loss_is_refused_when_it_is_defined() -> None:
    from genagent.errors import ConfigurationError
    from genagent.training._common import Trainer

    with pytest.raises(ConfigurationError, match="implement `def loss"):

        class NoLoss(Trainer):
            pass
