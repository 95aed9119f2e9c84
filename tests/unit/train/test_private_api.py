"""The private TRL/transformers names ``StageTrainer`` relies on (``trainer.PRIVATE_API``) still exist."""

from __future__ import annotations

import inspect

import pytest
import transformers
import trl

from qlora_med.train.trainer import PRIVATE_API, PrivateName, StageTrainer

VERSIONS = f"transformers {transformers.__version__}, TRL {trl.__version__}"


@pytest.fixture(scope="module")
def sft_trainer(tmp_path_factory) -> trl.SFTTrainer:
    """A plain SFTTrainer on a one-layer Llama, for the attributes TRL sets in ``__init__``."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
        pad_token="<unk>", eos_token="<unk>",
    )
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))
    args = trl.SFTConfig(output_dir=str(tmp_path_factory.mktemp("sft")), use_cpu=True, report_to="none", max_length=None,
                         remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
    return trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": [[1, 1]]}),
                          processing_class=tokenizer)


def _label(entry: PrivateName) -> str:
    return f"{entry.owner.__module__}.{entry.owner.__qualname__}.{entry.name}"


def test_the_table_names_every_private_method_stage_trainer_overrides():
    overridden = {name for name in vars(StageTrainer)
                  if name.startswith("_") and not name.startswith("__") and hasattr(trl.SFTTrainer, name)}
    assert overridden == {"_save", "_load_from_checkpoint", "_save_checkpoint"}
    missing = overridden - {e.name for e in PRIVATE_API}
    assert not missing, f"add {missing} to qlora_med.train.trainer.PRIVATE_API"


@pytest.mark.parametrize("entry", PRIVATE_API, ids=lambda e: e.name)
def test_private_name_still_exists(entry: PrivateName, request):
    owner = request.getfixturevalue("sft_trainer") if entry.on_instance else entry.owner
    if entry.on_instance:
        assert isinstance(owner, entry.owner)
    assert hasattr(owner, entry.name), (
        f"{_label(entry)} no longer exists in {VERSIONS}; qlora_med.train.trainer relies on it ({entry.why}): "
        "adapt StageTrainer to the new API or pin the previous version"
    )
    override = vars(StageTrainer).get(entry.name)
    if override is not None:  # our override must still take the parameters the caller passes
        theirs = list(inspect.signature(getattr(entry.owner, entry.name)).parameters)
        ours = list(inspect.signature(override).parameters)
        assert ours == theirs, (
            f"{_label(entry)} now takes {theirs} in {VERSIONS}; StageTrainer.{entry.name} takes {ours}"
        )
