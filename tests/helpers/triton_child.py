"""Run a test file's ``test_child_*`` tests in a child process under ``TRITON_INTERPRET=1``.

The interpreter must be chosen before triton is imported, so those tests run in a fresh pytest
process; in the parent they are skipped (``child_only``) and one ``test_triton_interpreter`` per file
launches the child.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = os.environ.get("QLORA_MED_TRITON_CHILD") == "1"
child_only = pytest.mark.skipif(not CHILD, reason="runs in the Triton-interpreter child (test_triton_interpreter)")


def run_children(test_file: str) -> None:
    """Run ``test_file``'s ``test_child_*`` tests under the Triton interpreter; fail with their output."""
    if CHILD:
        pytest.skip("already in the child")
    env = {**os.environ, "TRITON_INTERPRET": "1", "QLORA_MED_TRITON_CHILD": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "test_child_", test_file]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
