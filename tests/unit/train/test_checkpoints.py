"""Checkpoint bookkeeping: the resume lookup deletes nothing; incomplete checkpoints go only when asked."""

from __future__ import annotations

import logging

from qlora_med.train.checkpoints import (
    last_complete_checkpoint,
    list_checkpoints,
    mark_complete,
    remove_incomplete_checkpoints,
    rotate_checkpoints,
)


def _checkpoints(stage_dir, steps_complete: dict[int, bool]) -> None:
    for step, complete in steps_complete.items():
        path = stage_dir / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "projector.safetensors").write_bytes(b"x")
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
