"""Kernels per family, never silently wrong: for each family's tiny model, one align stage through the real
``train_stage`` (its data pipeline, collator and chat template) with every kernel off, then with the fused
NF4+LoRA forward, the chunked loss (16 rows per chunk) and padding-free batches asked for. Per-step losses and
the trained tensors (LoRA and connector, i.e. the gradients' effect over 3 Adam steps) must match; a family
that cannot pack rows must say why in the log and train padded.

Tolerance (fp32, LoRA dropout 0 so packed and padded rows draw the same masks): losses 1e-5 relative; trained
tensors 1e-4 absolute on parameters of size ~1e-2 (sums in a different order, amplified by Adam's division).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_med.config.families import FAMILIES
from qlora_med.config.loader import load_recipe
from qlora_med.train.runner import train_stage

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "recipes" / "demo_cpu.yaml"
STEPS = ["stages.align.max_steps=3", "stages.align.per_device_batch_size=3", "stages.align.logging_steps=1",
         "stages.align.warmup_ratio=0.0", "stages.align.save_steps=100", "lora.dropout=0.0",
         "model.compute_dtype=fp32"]  # fmt: skip
PLAIN = ["kernels.nf4_lora=off", "kernels.loss=full", "kernels.liger=off", "stages.align.padding_free=false",
         "stages.align.sampling=random"]  # padded batches, in the same order as the packed ones
KERNELS = ["kernels.nf4_lora=on", "kernels.loss=chunked", "kernels.chunk_size=16", "kernels.liger=off",
           "stages.align.padding_free=true"]  # fmt: skip


def _train(family: str, base: Path, out: Path, overrides: list[str]) -> tuple[list[float], dict, dict]:
    template = [] if family == "llava" else ["stages.align.template=chat_template"]
    recipe = load_recipe(DEMO, [f"model.name_or_path={base}", f"model.tiny.family={family}", f"output_dir={out}",
                                f"model.cache_dir={base.parent / 'cache'}", *template, *STEPS, *overrides])
    info = train_stage(recipe, recipe.stage("align"))
    final = out / "align" / "final"
    history = json.loads((final / "log_history.json").read_text())
    tensors = {}
    for name in ("adapter_model.safetensors", "projector.safetensors"):
        tensors.update({f"{name}:{k}": v for k, v in load_file(final / name).items()})
    return [h["loss"] for h in history if "loss" in h], info["kernels"], tensors


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """family -> (plain run, kernels run, log of the kernels run), trained on first use."""
    runs: dict[str, tuple] = {}

    def get(family: str):
        if family not in runs:
            work = tmp_path_factory.mktemp(f"kernels-{family}")
            plain = _train(family, work / "tiny", work / "plain", PLAIN)
            handler = _Capture()
            logging.getLogger("qlora_med").addHandler(handler)
            try:
                fused = _train(family, work / "tiny", work / "kernels", KERNELS)
            finally:
                logging.getLogger("qlora_med").removeHandler(handler)
            runs[family] = (plain, fused, "\n".join(handler.lines))
        return runs[family]

    return get


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kernels_and_packing_train_like_the_plain_path(family_runs, family):
    (plain_losses, plain_kernels, plain_tensors), (losses, kernels, tensors), log = family_runs(family)
    assert plain_kernels["nf4_lora"] == "off" and plain_kernels["loss"] == "full"
    assert kernels["nf4_lora"] == "torch" and kernels["nf4_lora_modules"] > 0
    assert kernels["loss"] == "chunked" and kernels["chunk_size"] == 16
    packs = not FAMILIES[family].padding_free
    assert kernels["padding_free"] is packs
    if not packs:
        assert f"padding-free batches: off for {family}" in log and FAMILIES[family].padding_free in log
    assert len(losses) == len(plain_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-5, atol=0)
    assert tensors.keys() == plain_tensors.keys() and any("lora_A" in k for k in tensors)
    for name, value in tensors.items():
        torch.testing.assert_close(value, plain_tensors[name], rtol=0, atol=1e-4, msg=name)
