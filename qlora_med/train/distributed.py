"""Multi-process awareness for `accelerate launch` / `torchrun`: one writer, quiet non-main ranks."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from qlora_med.errors import QloraMedError


def check_launch() -> None:
    """Refuse a launch that asked for several processes but runs one.

    ``accelerate launch --cpu --num_processes N`` (and ``--cpu`` with an FSDP or multi-GPU config) goes to
    accelerate's simple launcher: it sets ``MASTER_ADDR``/``MASTER_PORT`` for N > 1 but starts one process,
    without ``WORLD_SIZE``, so training would silently run on one process without DDP or FSDP.
    """
    env = os.environ
    if "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        raise QloraMedError(
            "accelerate launch asked for several processes, but its CPU launcher started only this one "
            "(no WORLD_SIZE; FSDP/multi-GPU configs are ignored with --cpu): for DDP on CPU run "
            "`torchrun --nproc_per_node N -m qlora_med.cli run RECIPE` (gloo); FSDP and DeepSpeed need GPUs"
        )


def launched_ranks() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def quiet_non_main_ranks() -> None:
    """Only rank 0 logs INFO; other ranks log warnings and errors, tagged with their rank."""
    rank, world = launched_ranks()
    if world > 1 and rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))


def state():
    """accelerate's process state (initialises the process group under a launcher)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return launched_ranks()[1] == 1 or state().is_main_process


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cached model); the others then reuse its output."""
    if launched_ranks()[1] == 1:
        yield
        return
    with state().main_process_first():
        yield


