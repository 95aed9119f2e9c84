"""Out-of-memory fallback, tested on CPU by injecting the error the CUDA allocator raises."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora_med.config.loader import load_recipe

ROOT = Path(__file__).resolve().parents[3]


def test_oom_halves_micro_batch_keeps_global_batch_and_continues(tiny_dir, tmp_path, monkeypatch, caplog):
    import qlora_med.train.runner as runner

    recipe = load_recipe(ROOT / "recipes" / "demo_cpu.yaml", [
        f"model.name_or_path={tiny_dir}", f"output_dir={tmp_path / 'run'}",
        f"stages.align.data.path={ROOT / 'data/sample/alignment.json'}",
        f"stages.align.data.image_folder={ROOT / 'data/sample/images'}",
        "stages.align.max_steps=4", "stages.align.save_steps=100", "stages.align.logging_steps=1",
        "stages.align.per_device_batch_size=4", "stages.align.gradient_accumulation_steps=1",
        "stages.align.padding_free=false",  # rows = samples: the fake OOM counts them
    ])
    seen_batches: list[int] = []
    real = runner.setup_trainable

    def with_small_gpu(model, *args, **kwargs):
        model = real(model, *args, **kwargs)
        forward = model.forward
        calls = {"n": 0}

        def forward_that_ooms(*f_args, **f_kwargs):
            rows = f_kwargs["input_ids"].shape[0]
            seen_batches.append(rows)
            calls["n"] += 1
            if rows > 2 and calls["n"] > 2:  # two steps fit, then a long batch does not
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(*f_args, **f_kwargs)

        model.forward = forward_that_ooms
        return model

    monkeypatch.setattr(runner, "setup_trainable", with_small_gpu)
    info = runner.train_stage(recipe, recipe.stage("align"))

    assert info["steps"] == 4 and info["oom_halvings"] == 1
    assert (info["micro_batch"], info["gradient_accumulation_steps"]) == (2, 2)  # global batch still 4
    assert seen_batches[:3] == [4, 4, 4] and set(seen_batches[3:]) == {2}
    assert "continuing with micro-batch 2 x accumulation 2 (global batch unchanged)" in caplog.text
    history = json.loads((tmp_path / "run" / "align" / "final" / "log_history.json").read_text())
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == [1, 2, 3, 4]  # continued from the last step, none redone or skipped
