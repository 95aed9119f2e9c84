"""Checkpoint bookkeeping: the resume lookup deletes nothing and skips checkpoints that do not verify;
incomplete checkpoints go only when asked; bad complete-marked ones are set aside, never deleted."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from qlora_med.train.checkpoints import (
    COMPLETE,
    checkpoint_problem,
    last_complete_checkpoint,
    list_checkpoints,
    mark_complete,
    remove_incomplete_checkpoints,
    rotate_checkpoints,
    set_aside_bad_checkpoints,
)


def _checkpoints(stage_dir, steps_complete: dict[int, bool]) -> None:
    for step, complete in steps_complete.items():
        path = stage_dir / f"checkpoint-{step}"
        path.mkdir(parents=True)
        save_file({"linear_1.weight": torch.full((4, 4), float(step))}, path / "projector.safetensors")
        torch.save({"state": {}, "step": step}, path / "optimizer.pt")
        (path / "scheduler.pt").write_bytes(b"scheduler")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if complete:
            mark_complete(path)


def test_lookup_finds_newest_complete_and_deletes_nothing(tmp_path):
    _checkpoints(tmp_path, {5: True, 10: True, 15: False})
    (tmp_path / "final").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert [(s, ok) for s, _p, ok in list_checkpoints(tmp_path)] == [(5, True), (10, True), (15, False)]
    assert (tmp_path / "checkpoint-15").is_dir()  # the lookup left the incomplete one alone
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_lookup_orders_by_step_not_by_name(tmp_path):
    _checkpoints(tmp_path, {9: True, 100: True})
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-100"


def test_remove_incomplete_deletes_only_unmarked_checkpoints_and_logs_each(tmp_path, caplog):
    _checkpoints(tmp_path, {5: True, 10: False, 15: False})
    with caplog.at_level(logging.WARNING, logger="qlora_med.train.checkpoints"):
        removed = remove_incomplete_checkpoints(tmp_path)
    assert removed == [tmp_path / "checkpoint-10", tmp_path / "checkpoint-15"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    for path in removed:
        assert f"removing incomplete checkpoint {path} (interrupted while being written)" in caplog.text
    assert remove_incomplete_checkpoints(tmp_path) == []
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-5"


def test_rotation_keeps_newest_complete_and_never_an_incomplete_one_in_their_place(tmp_path):
    _checkpoints(tmp_path, {1: True, 2: True, 3: True, 4: False})
    rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda p: (p / "projector.safetensors").write_bytes(
                (p / "projector.safetensors").read_bytes()[:40]
            ),
            "projector.safetensors is 40 bytes",
        ),
        (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda p: (p / "trainer_state.json").write_text('{"global_step": 99}'), "trainer_state.json changed since it was written"),
        (lambda p: (p / COMPLETE).write_text("{"), "its COMPLETE manifest is unreadable"),
        (lambda p: [(p / COMPLETE).write_text("ok\n"), (p / "projector.safetensors").write_bytes(b"x" * 9)],
         "projector.safetensors is unreadable"),
    ],
    ids=["truncated-safetensors", "no-optimizer", "changed-file", "damaged-manifest", "old-marker-bad-file"],
)
def test_bad_complete_checkpoint_is_named_and_the_older_good_one_used(tmp_path, caplog, damage, problem):
    _checkpoints(tmp_path, {5: True, 10: True})
    damage(tmp_path / "checkpoint-10")
    assert problem in checkpoint_problem(tmp_path / "checkpoint-10")
    with caplog.at_level(logging.WARNING, logger="qlora_med.train.checkpoints"):
        assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert f"checkpoint {tmp_path / 'checkpoint-10'} is marked complete but {problem}" in caplog.text
    assert (tmp_path / "checkpoint-10").is_dir()  # the lookup moved nothing
    assert set_aside_bad_checkpoints(tmp_path) == [tmp_path / "checkpoint-10.bad"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10.bad", "checkpoint-5"]
    assert checkpoint_problem(tmp_path / "checkpoint-5") is None


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    _checkpoints(tmp_path, {3: True})
    files = json.loads((tmp_path / "checkpoint-3" / COMPLETE).read_text())["files"]
    assert sorted(files) == ["optimizer.pt", "projector.safetensors", "scheduler.pt", "trainer_state.json"]
    assert all(len(meta["sha256"]) == 64 and meta["size"] > 0 for meta in files.values())


def test_checkpoint_marked_by_an_older_kit_still_resumes(tmp_path):
    _checkpoints(tmp_path, {5: True, 10: True})
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}" / COMPLETE).write_text("ok\n")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
