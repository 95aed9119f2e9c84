"""Bench tests run their tiny models on one thread: tiny ops on several OpenMP threads spend their time in barriers
(~10 ms an op on a busy machine), which would make these tests slow and their timings meaningless."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
