"""The accelerate configs in recipes/accelerate load into accelerate's classes and wrap the right layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "recipes" / "accelerate"
YAMLS = sorted(CONFIGS.rglob("*.yaml"))


def test_expected_configs_exist() -> None:
    names = {p.name for p in YAMLS}
    assert {"ddp_8gpu.yaml", "fsdp_qlora_8gpu.yaml", "deepspeed_zero2.yaml"} <= names
    assert (CONFIGS / "README.md").is_file()


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_loads_into_accelerate_config(path: Path) -> None:
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.num_processes == 8 and cfg.num_machines == 1 and cfg.use_cpu is False
    assert path.read_text().lstrip().startswith("#"), "each config opens with a comment: what, launch, memory"
    assert "accelerate launch --config_file recipes/accelerate/" + path.name in path.read_text()


def test_deepspeed_json_is_zero2_and_referenced() -> None:
    cfg = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    ds_path = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
    ds = json.loads(ds_path.read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"


def _tiny_llava() -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14)
    text = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, head_dim=8)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=63))


def test_fsdp_config_wraps_exactly_decoder_and_encoder_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config_from_file(str(CONFIGS / "fsdp_qlora_8gpu.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_sync_module_states"]
    # what `accelerate launch` does with the YAML: export FSDP_* variables that the plugin reads
    for key, value in fsdp.items():
        env = "FSDP_TRANSFORMER_CLS_TO_WRAP" if key == "fsdp_transformer_layer_cls_to_wrap" else key.upper()
        monkeypatch.setenv(env, str(value).lower() if isinstance(value, bool) else str(value))
    if not torch.cuda.is_available():  # sync_module_states needs a device to build its param_init_fn
        monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    plugin = FullyShardedDataParallelPlugin()
    model = _tiny_llava()
    plugin.set_auto_wrap_policy(model)
    wrapped = [name for name, module in model.named_modules()
               if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0)]
    expected = [f"model.vision_tower.encoder.layers.{i}" for i in range(2)]
    expected += [f"model.language_model.layers.{i}" for i in range(3)]
    assert sorted(wrapped) == sorted(expected)
