"""Shared fixtures: a tiny LLaVA built from config once per session, and the sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings {HF_ENDPOINT}/api/telemetry: nothing leaves the machine


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def bnb_cpu_dequantize() -> None:
    """bitsandbytes' AVX-512 CPU dequantize corrected as the kit does before it quantizes (see
    qlora_med.patches.bnb_cpu), so tests that call bitsandbytes directly see what the kit and a GPU see."""
    from qlora_med.patches import bnb_cpu

    bnb_cpu.install()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA (CLIP + Mistral from config, real Mistral tokenizer) saved in HF format."""
    from qlora_med.config.schema import TinyModelConfig
    from qlora_med.model.tiny import build_tiny

    return build_tiny(TinyModelConfig(), tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture()
def sample_recipe(tmp_path, tiny_dir) -> list[str]:
    """Overrides that point the demo recipe at the session's tiny model and a temp output dir."""
    return [f"model.name_or_path={tiny_dir}", f"output_dir={tmp_path / 'run'}"]
