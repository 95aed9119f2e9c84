"""Building the tiny model: seeded weights, and the caller's global RNG left as it was."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from qlora_med.config.schema import TinyModelConfig
from qlora_med.model.tiny import build_tiny


def test_build_tiny_keeps_the_callers_rng_and_is_seeded(tmp_path, tiny_dir):
    torch.manual_seed(1234)  # as the runner's set_seed(recipe.seed) before building on first use
    before = torch.get_rng_state()
    expected_next = torch.rand(3)
    torch.set_rng_state(before)
    build_tiny(TinyModelConfig(), tmp_path / "tiny")
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected_next)  # a LoRA init after the build sees the same numbers
    # weights come from cfg.seed, not from the caller's RNG: same as the session's model built earlier
    ours, session = (
        load_file(tmp_path / "tiny" / "model.safetensors"),
        load_file(tiny_dir / "model.safetensors"),
    )
    assert ours.keys() == session.keys()
    assert all(torch.equal(ours[k], session[k]) for k in ours)
