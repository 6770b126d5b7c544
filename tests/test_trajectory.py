"""Trajectory: save/load round trips of real simulator runs, derived views, and corrupt folders."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import pytest

import genagent
from genagent.errors import InvalidImageError, TrajectoryError
from genagent.images import DirectoryImageStore
from genagent.rewards._output import RewardOutput
from genagent.sim import sample_tasks
from genagent.tasks import Task
from genagent.trajectory import TRAJECTORY_FILE, Termination, Trajectory

GEN = "image_generation_tool"
EDIT = "image_editing_tool"


def _find_run(predicate: Any, **agent_kwargs: Any) -> Trajectory:
    """The first simulator run (deterministic tasks and seeds) that satisfies ``predicate``."""
    agent = genagent.Agent(max_rounds=3, **agent_kwargs)
    for i, task in enumerate(sample_tasks(40, seed=0)):
        trajectory = agent.run(task, seed=i)
        if predicate(trajectory):
            return trajectory
    raise AssertionError("no simulator run matched; did the simulator change?")


@pytest.fixture(scope="module")
def three_rounds() -> Trajectory:
    """A run that used all three rounds, including an edit."""
    return _find_run(
        lambda t: t.num_rounds == 3 and EDIT in [r.tool for r in t.rounds],
    )


@pytest.fixture(scope="module")
def answered() -> Trajectory:
    """A run of at least two rounds that ended with the policy's answer."""
    return _find_run(lambda t: t.termination is Termination.ANSWERED and t.num_rounds >= 2)


@pytest.fixture
def saved(three_rounds: Trajectory, tmp_path: Path) -> Path:
    return three_rounds.save(tmp_path / "run")


def _rewrite_json(folder: Path, change: Any) -> Path:
    path = folder / TRAJECTORY_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- round trip


def test_saved_trajectory_loads_equal_to_the_original(
    three_rounds: Trajectory, saved: Path
) -> None:
    loaded = Trajectory.load(saved)

    assert loaded == three_rounds
    assert loaded.num_rounds == 3


def test_answered_trajectory_loads_equal_to_the_original(
    answered: Trajectory, tmp_path: Path
) -> None:
    loaded = Trajectory.load(answered.save(tmp_path))

    assert loaded == answered
    assert loaded.answer == answered.answer
    assert loaded.termination is Termination.ANSWERED


def test_load_accepts_the_trajectory_json_path(three_rounds: Trajectory, saved: Path) -> None:
    assert Trajectory.load(saved / TRAJECTORY_FILE) == three_rounds


def test_load_accepts_a_string_path(three_rounds: Trajectory, saved: Path) -> None:
    assert Trajectory.load(str(saved)) == three_rounds


def test_saved_image_files_are_byte_identical_to_the_originals(
    three_rounds: Trajectory, saved: Path
) -> None:
    assert len(three_rounds.images) == 3
    for ref in three_rounds.images:
        assert (saved / "images" / ref.filename).read_bytes() == ref.read_bytes()


def test_loaded_image_refs_read_the_original_bytes(three_rounds: Trajectory, saved: Path) -> None:
    loaded = Trajectory.load(saved)

    for original, ref in zip(three_rounds.images, loaded.images, strict=True):
        assert ref.read_bytes() == original.read_bytes()


def test_loaded_final_image_decodes(three_rounds: Trajectory, saved: Path) -> None:
    loaded = Trajectory.load(saved)

    image = loaded.final_image
    ref = loaded.final_image_ref
    assert image is not None and ref is not None
    assert image.size == (ref.width, ref.height)
    assert ref == three_rounds.final_image_ref


def test_loaded_message_images_are_bound(three_rounds: Trajectory, saved: Path) -> None:
    loaded = Trajectory.load(saved)

    shown = [img for m in loaded.to_messages() for img in m.images]
    assert shown
    assert all(img.read_bytes() for img in shown)


def test_save_writes_only_trajectory_json_and_images(three_rounds: Trajectory, saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["images", TRAJECTORY_FILE]
    assert sorted(p.name for p in (saved / "images").iterdir()) == sorted(
        ref.filename for ref in three_rounds.images
    )


def test_loaded_trajectory_can_be_saved_again_elsewhere(
    three_rounds: Trajectory, saved: Path, tmp_path: Path
) -> None:
    copy = Trajectory.load(saved).save(tmp_path / "copy")

    assert Trajectory.load(copy) == three_rounds


def test_loaded_trajectory_can_be_saved_again_in_place(
    three_rounds: Trajectory, saved: Path
) -> None:
    loaded = Trajectory.load(saved)
    loaded.answer = "edited afterwards"

    loaded.save(saved)

    assert Trajectory.load(saved).answer == "edited afterwards"


def test_save_creates_missing_parent_folders(three_rounds: Trajectory, tmp_path: Path) -> None:
    folder = three_rounds.save(tmp_path / "a" / "b" / "c")

    assert Trajectory.load(folder) == three_rounds


def test_round_trip_keeps_every_candidate(tmp_path: Path) -> None:
    original = genagent.Agent(max_rounds=2, candidates=2).run("a photo of two red apples", seed=1)
    assert all(len(r.candidates) == 2 for r in original.rounds)

    loaded = Trajectory.load(original.save(tmp_path))

    assert loaded == original
    assert [r.candidates for r in loaded.rounds] == [r.candidates for r in original.rounds]


def test_nan_and_inf_rewards_round_trip(three_rounds: Trajectory, tmp_path: Path) -> None:
    original = three_rounds.model_copy(
        update={
            "rewards": {
                "geneval": RewardOutput(
                    score=float("nan"),
                    components={"up": float("inf"), "down": float("-inf"), "none": None},
                    info={"raw": float("nan")},
                ),
                "ok": RewardOutput(score=0.5),
            }
        }
    )

    loaded = Trajectory.load(original.save(tmp_path)).rewards

    assert loaded["geneval"].score is not None and math.isnan(loaded["geneval"].score)
    assert loaded["geneval"].components == {"up": math.inf, "down": -math.inf, "none": None}
    assert math.isnan(loaded["geneval"].info["raw"])
    assert loaded["ok"].score == 0.5


def test_trajectory_pickles_with_its_images(three_rounds: Trajectory) -> None:
    restored = pickle.loads(pickle.dumps(three_rounds))

    assert restored == three_rounds
    assert restored.images[0].read_bytes() == three_rounds.images[0].read_bytes()


# --------------------------------------------------------------------------- views


def test_to_messages_starts_with_system_then_user_request(three_rounds: Trajectory) -> None:
    messages = three_rounds.to_messages()

    assert messages[0].role == "system"
    assert "<tools>" in messages[0].text
    assert messages[1].role == "user"
    assert messages[1].text == three_rounds.prompt


def test_to_messages_alternates_replies_and_tool_responses(answered: Trajectory) -> None:
    messages = answered.to_messages()[2:]

    assert [m.role for m in messages] == ["assistant", "user"] * answered.num_rounds + ["assistant"]
    assert "<answer>" in messages[-1].text
    tool_responses = messages[1::2]
    for response, record in zip(tool_responses, answered.rounds, strict=True):
        assert response.text.startswith("<tool_response>")
        assert response.text.endswith("</tool_response>")
        assert response.images == [record.image]


def test_to_messages_replies_include_the_closing_suffix(three_rounds: Trajectory) -> None:
    replies = [m for m in three_rounds.to_messages() if m.role == "assistant"]

    assert [m.text for m in replies] == [t.reply + t.reply_suffix for t in three_rounds.turns]
    # The simulator's replies are cut at the "</tool_call>" stop sequence; the suffix restores it.
    assert all(m.text.rstrip().endswith("</tool_call>") for m in replies[:3])


def test_to_messages_is_the_same_after_loading(three_rounds: Trajectory, saved: Path) -> None:
    assert Trajectory.load(saved).to_messages() == three_rounds.to_messages()


def test_rounds_record_tool_arguments_and_images_in_order(three_rounds: Trajectory) -> None:
    rounds = three_rounds.rounds

    assert [r.round for r in rounds] == [1, 2, 3]
    assert rounds[0].tool == GEN
    assert "caption" in rounds[0].arguments
    edit = next(r for r in rounds if r.tool == EDIT)
    assert "instruction" in edit.arguments
    assert [r.image for r in rounds] == three_rounds.images
    for r in rounds:
        assert r.candidates == (r.image,)
        turn = three_rounds.turns[r.turn_index]
        assert turn.action is not None and turn.action.tool_call is not None
        assert turn.action.tool_call.name == r.tool


def test_num_rounds_counts_image_rounds(answered: Trajectory) -> None:
    assert answered.num_rounds == len(answered.rounds) == len(answered.images)
    assert len(answered.turns) == answered.num_rounds + 1  # the last turn answers


def test_image_after_round_is_that_rounds_image(three_rounds: Trajectory) -> None:
    images = [r.image for r in three_rounds.rounds]

    assert [three_rounds.image_after_round(k) for k in (1, 2, 3)] == images


def test_image_after_round_beyond_the_last_round_is_the_final_image(
    answered: Trajectory,
) -> None:
    final = answered.final_image_ref

    assert final is not None
    assert answered.image_after_round(answered.num_rounds + 1) == final
    assert answered.image_after_round(100) == final


@pytest.mark.parametrize("k", [0, -1])
def test_image_after_round_below_one_raises(three_rounds: Trajectory, k: int) -> None:
    with pytest.raises(ValueError, match="numbered from 1"):
        three_rounds.image_after_round(k)


def test_trajectory_without_images_has_no_rounds() -> None:
    empty = Trajectory(task=Task(prompt="a cat"))

    assert empty.rounds == []
    assert empty.num_rounds == 0
    assert empty.image_after_round(1) is None
    assert empty.final_image is None


# --------------------------------------------------------------------------- broken folders


def test_truncated_json_raises_trajectory_error_naming_the_file(saved: Path) -> None:
    path = saved / TRAJECTORY_FILE
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    with pytest.raises(TrajectoryError, match="not valid JSON") as info:
        Trajectory.load(saved)

    assert info.value.path == path
    assert str(path) in str(info.value)


def test_binary_garbage_json_raises_trajectory_error(saved: Path) -> None:
    path = saved / TRAJECTORY_FILE
    path.write_bytes(b"\xff\xfe\x00garbage")

    with pytest.raises(TrajectoryError) as info:
        Trajectory.load(saved)

    assert info.value.path == path


@pytest.mark.parametrize(
    "content",
    ["[" * 200_000 + "]" * 200_000, '{"schema_version": ' + "1" * 5_000 + "}"],
    ids=["deeply_nested", "huge_number"],
)
def test_pathological_json_raises_trajectory_error(saved: Path, content: str) -> None:
    path = saved / TRAJECTORY_FILE
    path.write_text(content)

    with pytest.raises(TrajectoryError) as info:
        Trajectory.load(saved)

    assert info.value.path == path


def test_missing_json_raises_trajectory_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(TrajectoryError, match="no such file") as info:
        Trajectory.load(tmp_path)

    assert info.value.path == tmp_path / TRAJECTORY_FILE


def test_missing_folder_raises_trajectory_error(tmp_path: Path) -> None:
    with pytest.raises(TrajectoryError) as info:
        Trajectory.load(tmp_path / "nowhere")

    assert info.value.path == tmp_path / "nowhere" / TRAJECTORY_FILE


def test_json_that_is_not_an_object_raises_trajectory_error(tmp_path: Path) -> None:
    (tmp_path / TRAJECTORY_FILE).write_text("[1, 2, 3]")

    with pytest.raises(TrajectoryError, match="not an object") as info:
        Trajectory.load(tmp_path)

    assert info.value.path == tmp_path / TRAJECTORY_FILE


def test_unknown_schema_version_raises_trajectory_error(saved: Path) -> None:
    path = _rewrite_json(saved, lambda d: d.update(schema_version=99))

    with pytest.raises(TrajectoryError, match="schema_version 99") as info:
        Trajectory.load(saved)

    assert info.value.path == path


def test_missing_schema_version_raises_trajectory_error(saved: Path) -> None:
    _rewrite_json(saved, lambda d: d.pop("schema_version"))

    with pytest.raises(TrajectoryError, match="schema_version None"):
        Trajectory.load(saved)


def test_schema_mismatch_raises_trajectory_error_naming_the_field(saved: Path) -> None:
    path = _rewrite_json(saved, lambda d: d.update(turns="not a list"))

    with pytest.raises(TrajectoryError, match="turns") as info:
        Trajectory.load(saved)

    assert info.value.path == path
    assert "trajectory schema" in str(info.value)


def test_missing_image_file_raises_trajectory_error_naming_it(
    three_rounds: Trajectory, saved: Path
) -> None:
    image = saved / "images" / three_rounds.images[1].filename
    image.unlink()

    with pytest.raises(TrajectoryError, match="missing") as info:
        Trajectory.load(saved)

    assert info.value.path == image
    assert image.name in str(info.value)


def test_corrupted_image_file_raises_trajectory_error_naming_it(
    three_rounds: Trajectory, saved: Path
) -> None:
    image = saved / "images" / three_rounds.images[0].filename
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))

    with pytest.raises(TrajectoryError, match="corrupt") as info:
        Trajectory.load(saved)

    assert info.value.path == image


def test_verify_images_false_skips_the_image_check(three_rounds: Trajectory, saved: Path) -> None:
    (saved / "images" / three_rounds.images[0].filename).unlink()

    loaded = Trajectory.load(saved, verify_images=False)

    assert loaded == three_rounds
    with pytest.raises(InvalidImageError):
        loaded.images[0].read_bytes()


def test_saving_unbound_image_refs_raises_trajectory_error(
    three_rounds: Trajectory, tmp_path: Path
) -> None:
    detached = Trajectory.model_validate_json(three_rounds.model_dump_json())
    folder = tmp_path / "out"

    with pytest.raises(TrajectoryError, match="not bound") as info:
        detached.save(folder)

    assert info.value.path is not None
    assert info.value.path.name == three_rounds.images[0].filename
    assert not (folder / TRAJECTORY_FILE).exists()  # no JSON naming images that were not written


def test_image_refs_from_any_store_can_be_saved(three_rounds: Trajectory, tmp_path: Path) -> None:
    store = DirectoryImageStore(tmp_path / "elsewhere")
    rebound = Trajectory.model_validate_json(three_rounds.model_dump_json())
    for ref in three_rounds.images:
        store.put(ref.read_bytes())
    for ref in rebound.images:
        ref.bind(store)
    for turn in rebound.turns:
        for message in turn.messages:
            for img in message.images:
                img.bind(store)

    loaded = Trajectory.load(rebound.save(tmp_path / "saved"))

    assert loaded == three_rounds


# --------------------------------------------------------------------------- review fixes


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(final_image_index=99),
        lambda d: d.update(final_image_index=-1),
        lambda d: next(t for t in d["turns"] if t["tool_result"])["tool_result"].update(
            images=[42]
        ),
        lambda d: next(t for t in d["turns"] if t["tool_result"])["tool_result"].update(selected=7),
    ],
    ids=["final-too-large", "final-negative", "round-image", "round-selection"],
)
def test_indices_that_point_nowhere_are_rejected_on_load(saved: Path, change: Any) -> None:
    path = _rewrite_json(saved, change)
    with pytest.raises(TrajectoryError, match="does not match the trajectory schema") as info:
        Trajectory.load(saved)
    assert info.value.path == path


def test_an_image_format_cannot_lead_outside_the_images_folder(saved: Path, tmp_path: Path) -> None:
    # a hostile file naming a format like "x/../../secret" must not make refs read elsewhere
    def hostile(data: dict[str, Any]) -> None:
        data["images"][0]["format"] = "x/../../../secret.txt"

    _rewrite_json(saved, hostile)
    with pytest.raises(TrajectoryError, match="does not match the trajectory schema"):
        Trajectory.load(saved, verify_images=False)


def test_save_into_an_unwritable_place_is_a_trajectory_error(
    three_rounds: Trajectory, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrajectoryError, match="cannot write") as info:
        three_rounds.save(blocker / "run")
    assert info.value.path is not None and str(blocker) in str(info.value.path)
