"""One run per output_dir at a time: ``<output_dir>/.lock`` holds the holder's pid, host and start time.

A second run on the same folder is refused with who holds it; a lock whose process is gone (same host, pid
not alive) is stale and taken over with a log line. Only the main process of a launch takes the lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlora_med.errors import QloraMedError

logger = logging.getLogger(__name__)
LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(holder) + "\n")
    return True


@contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir``'s lock for the duration (refusing when a live run holds it)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK
    while not _try_create(path):
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            logger.warning("%s: stale lock of pid %d (no longer running); taking it over", path, pid)
            path.unlink(missing_ok=True)
            continue
        raise QloraMedError(
            f"{output_dir} is in use by another run (pid {pid} on {host}, since {holder.get('started')}): wait for "
            f"it to finish or use another output_dir; if that process is gone, delete {path}"
        )
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
