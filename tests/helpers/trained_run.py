"""A tiny trained run shared by the merge / export tests: one ``instruct`` stage, a few real steps.

Trained once per pytest session (cached under the session's base temp dir), in-process through
``run_recipe`` on the session's tiny model, so its artefacts are exactly what ``qlora-med run``
writes. The learning rate is the demo's (5e-3): after 3 steps the LoRA delta is ~15% of the weights
(|s·B·A| / |W|), far above the NF4 error, so the parity tests can tell merged from unmerged.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def trained_run(tmp_path_factory, tiny_dir: Path) -> Path:
    """The run directory (``<run>/instruct/final`` holds adapter + projector)."""
    from qlora_med.config.loader import load_recipe
    from qlora_med.train.runner import run_recipe

    out = tmp_path_factory.getbasetemp() / "shared-trained-run"
    if (out / "instruct" / "final" / "stage.json").is_file():
        return out
    recipe = yaml.safe_load((ROOT / "recipes" / "demo_cpu.yaml").read_text())
    stage = next(s for s in recipe["stages"] if s["name"] == "instruct")
    stage["data"] = {k: str(ROOT / v) for k, v in stage["data"].items()}
    stage.update(max_steps=STEPS, logging_steps=1, save_steps=100, per_device_batch_size=2, learning_rate=5e-3,
                 projector_lr=1e-3)
    recipe["stages"] = [stage]
    path = tmp_path_factory.getbasetemp() / "shared-trained-run.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # fp32 compute on every CPU ("auto" is bf16 on CPUs with native bf16): the parity tests' tolerances are fp32's
    run_recipe(load_recipe(path, [f"output_dir={out}", f"model.name_or_path={tiny_dir}", "model.compute_dtype=fp32"]))
    return out
