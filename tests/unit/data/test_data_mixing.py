"""A stage mixing several weighted sources: config, exact proportions, determinism under the seed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from qlora_med.config.files import validate_paths
from qlora_med.config.loader import load_recipe, save_resolved
from qlora_med.config.schema import DataConfig, StageConfig
from qlora_med.data.build import build_stage_dataset, draw_indices
from qlora_med.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "data" / "sample"
DEMO = ROOT / "recipes" / "demo_cpu.yaml"


def _source(file: str, weight: float = 1.0, **kw) -> dict:
    return {"path": str(SAMPLE / f"{file}.json"), "image_folder": str(SAMPLE / "images"), "weight": weight, **kw}


def _mixed_recipe(tmp_path: Path, sources: list[dict]) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data["stages"][1]["data"] = sources
    path = tmp_path / "mix.yaml"
    path.write_text("# mixed\n" + yaml.safe_dump(data))
    return path


def test_one_mapping_or_a_list_of_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    single = load_recipe(DEMO)
    assert isinstance(single.stage("align").data, list) and len(single.stage("align").data) == 1
    assert single.stage("align").data[0].weight == 1.0
    path = _mixed_recipe(tmp_path, [_source("instruct", name="inst"), _source("vqa_train", 2)])
    recipe = load_recipe(path, ["stages.instruct.data.inst.weight=0.5"])
    validate_paths(recipe)
    assert [(d.name, d.weight) for d in recipe.stage("instruct").data] == [("inst", 0.5), (None, 2.0)]
    save_resolved(recipe, tmp_path / "resolved.yaml")  # the resolved config loads back
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again.stage("instruct").data == recipe.stage("instruct").data


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.instruct\.data\.inst\.weight must be a positive number"):
        load_recipe(_mixed_recipe(tmp_path, [_source("instruct", 0, name="inst"), _source("vqa_train")]))
    with pytest.raises(ConfigError, match=r"stages\.instruct\.data\[1\]\.weight must be a positive number"):
        load_recipe(_mixed_recipe(tmp_path, [_source("instruct"), _source("vqa_train", -1)]))
    with pytest.raises(ConfigError, match=r"duplicate source names \['a'\]"):
        load_recipe(_mixed_recipe(tmp_path, [_source("instruct", name="a"), _source("vqa_train", name="a")]))
    with pytest.raises(ConfigError, match=r"stages\.instruct\.data: no data sources"):
        load_recipe(_mixed_recipe(tmp_path, []))
    missing = _source("vqa_train")
    missing["path"] = "nope.json"
    with pytest.raises(ConfigError, match=r"stages\.instruct\.data\[1\]\.path: file 'nope\.json' not found"):
        validate_paths(load_recipe(_mixed_recipe(tmp_path, [_source("instruct"), missing]), ["output_dir=x"]))


@pytest.mark.parametrize("weight", [0.3, 0.5, 1.0, 1.5, 2.0, 3.25])
def test_draw_sizes_and_multiplicities(weight):
    n = 40
    indices = draw_indices(n, weight, np.random.default_rng([7, 0]))
    if weight == 1.0:
        assert indices is None
        return
    counts = Counter(indices.tolist())
    assert len(indices) == round(weight * n) and set(counts) <= set(range(n))
    assert set(counts.values()) <= {int(weight), int(weight) + 1}, "each sample floor(w) or floor(w)+1 times"
    if weight >= 1:
        assert len(counts) == n, "upsampling keeps every sample"
    again = draw_indices(n, weight, np.random.default_rng([7, 0]))
    other = draw_indices(n, weight, np.random.default_rng([8, 0]))
    assert np.array_equal(indices, again)
    assert np.array_equal(indices, other) == (weight == int(weight)), "only the fraction is random"


def test_too_small_a_weight_is_an_error():
    with pytest.raises(DataError, match="weight 0.01 draws no sample from a source of 20"):
        draw_indices(20, 0.01, np.random.default_rng(0))


def _stage(*sources: dict) -> StageConfig:
    return StageConfig(name="mix", kind="instruct", max_length=128, data=[DataConfig(**s) for s in sources])


def test_mixed_stage_proportions_and_determinism(processor, tmp_path):
    stage = _stage(_source("instruct", 0.5), _source("vqa_train", 2.0, name="vqa"))

    def build(seed):
        return build_stage_dataset(stage, processor, 16, "<image>", seed, tmp_path / "cache")

    dataset, stats = build(42)
    instruct_ids = {r["id"] for r in json.loads((SAMPLE / "instruct.json").read_text())}
    from_instruct = [i for i in dataset["id"] if i in instruct_ids]
    from_vqa = Counter(i for i in dataset["id"] if i not in instruct_ids)
    assert len(from_instruct) == 10 and len(set(from_instruct)) == 10, "half of 20, without repeats"
    assert len(from_vqa) == 20 and set(from_vqa.values()) == {2}, "every VQA sample exactly twice"
    assert [s.drawn for s in stats.sources] == [10, 40] and stats.samples == len(dataset) == 50
    assert [s.name for s in stats.sources] == ["instruct", "vqa"]
    assert all(s.cache_hit for s in build(42)[1].sources), "the draw happens after the cache"
    assert build(42)[0]["id"] == dataset["id"], "same seed, same mix"
    assert build(1)[0]["id"] != dataset["id"], "another seed draws another half"
    for source in stats.sources:  # drawing writes nothing into the shared cache entries
        manifest = json.loads((Path(source.cache) / "manifest.json").read_text())
        assert sorted(p.name for p in Path(source.cache).iterdir()) == sorted(manifest["files"] + ["manifest.json"])
