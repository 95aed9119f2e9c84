"""``qlora-med bench --profile``: the labelled shares and the top ops of a tiny kit run."""

from __future__ import annotations

from qlora_med.bench.profiling import format_profile, labelled_ranges, profile_kit
from qlora_med.bench.suite import BenchSpec
from qlora_med.config.schema import TinyModelConfig


def test_profile_reports_shares_and_top_ops(tmp_path):
    spec = BenchSpec(model=TinyModelConfig(), model_name="tiny", batch_size=2, mixes=("instruct",), max_length=256,
                     cache_dir=str(tmp_path))  # fmt: skip
    profile = profile_kit(spec, steps=1)
    shares = profile["shares"]
    assert set(shares) == {"nf4_dequant", "lora_layers", "loss", "optimizer"}
    assert 0 < shares["nf4_dequant"] < shares["lora_layers"] < 1  # dequant happens inside the fused layers
    assert shares["loss"] > 0 and shares["optimizer"] > 0
    assert profile["top_ops"] and profile["kernels"]["nf4_lora"] == "torch"
    text = format_profile(profile)
    assert "NF4 dequantize" in text and profile["top_ops"][0]["op"][:40] in text


def test_labels_are_undone():
    from qlora_med.kernels import nf4_lora

    before = (nf4_lora.dequantize_4bit, nf4_lora.NF4LoRAFunction.__dict__["forward"])
    with labelled_ranges():
        assert nf4_lora.dequantize_4bit is not before[0]
    assert (nf4_lora.dequantize_4bit, nf4_lora.NF4LoRAFunction.__dict__["forward"]) == before
