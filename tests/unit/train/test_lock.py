"""One run per output_dir: a live holder is named, a dead one's lock is taken over, the lock goes at exit."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import pytest

from qlora_med import cli
from qlora_med.errors import QloraMedError
from qlora_med.train.lock import LOCK, run_lock


def test_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path, caplog):
    with run_lock(tmp_path):
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["host"] == socket.gethostname()
        with pytest.raises(QloraMedError, match=rf"is in use by another run \(pid {holder['pid']} on "):
            with run_lock(tmp_path):
                pass
        assert cli.main(["run", "recipes/demo_cpu.yaml", f"output_dir={tmp_path}"]) == 1
        assert f"delete {tmp_path / LOCK}" in caplog.text
    assert not (tmp_path / LOCK).exists()


def test_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level(logging.WARNING), run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] != pid
    assert f"stale lock of pid {pid}" in caplog.text and not (tmp_path / LOCK).exists()
