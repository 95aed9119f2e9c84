"""``qlora-med data preview`` through the real CLI, on the demo recipe pointed at the session's tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_med import cli
from qlora_med.prompts.templates import IGNORE_INDEX, encode, render

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "demo_cpu.yaml")
INSTRUCT = str(ROOT / "data" / "sample" / "instruct.json")


def _run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["data", "preview", *args])
    return code, capsys.readouterr().out


def test_text_report_highlights_trained_tokens(capsys, sample_recipe):
    code, out = _run(
        capsys, INSTRUCT, "--recipe", RECIPE, "--stage", "instruct", "--limit", "2", *sample_recipe
    )
    assert code == 0
    assert out.startswith("template mistral_instruct: Mistral-7B-Instruct-v0.2's own format")
    assert "SentencePiece legacy mode" in out and "── 1/2 " in out and "── 2/2 " in out
    assert "<s> ▁[ INST ] ▁ <image>x16 ▁ <0x0A>" in out  # one run of image tokens; legacy pieces
    assert "[▁This ▁is" in out and ". </s>] ▁[ INST ]" in out  # not a terminal: trained tokens in brackets
    assert "truncated 0" in out and "\033[" not in out


def test_json_report_is_what_training_encodes(capsys, sample_recipe, processor):
    overrides = [*sample_recipe, "stages.instruct.template=llava_med_v15", "stages.instruct.max_length=60"]
    code, out = _run(capsys, INSTRUCT, "--recipe", RECIPE, "--stage", "instruct", "--json", *overrides)
    assert code == 0
    report = json.loads(out)
    assert (
        report["template"] == "llava_med_v15" and report["tokenizer_mode"]["mode"] == "sentencepiece_legacy"
    )
    assert report["max_length"] == 60 and report["num_image_tokens"] == 16 and len(report["records"]) == 3
    tok = processor.tokenizer
    records = json.loads(Path(INSTRUCT).read_text())
    for row, raw in zip(report["records"], records, strict=False):
        assert set(row) == {"id", "input_ids", "labels"} and row["id"] == raw["id"]
        turns = raw["conversations"]
        rounds = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
        enc = encode(
            tok,
            render("llava_med_v15", rounds, "<image>", tok.bos_token, tok.eos_token),
            report["image_token_id"],
            16,
            60,
        )
        assert (row["input_ids"], row["labels"]) == (enc.input_ids, enc.labels)
        assert row["input_ids"].count(report["image_token_id"]) == 16


def test_truncation_and_unusable_records_are_counted(capsys, sample_recipe, tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = {
        "id": "a",
        "image": "x.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nIs there a pneumothorax in the left hemithorax?"},
            {"from": "gpt", "value": "No pneumothorax is seen; the left lung is fully expanded. " * 4},
        ],
    }
    bad = {"id": "b", "conversations": [{"from": "gpt", "value": "answer first"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n{not json\n")
    code, out = _run(
        capsys,
        str(data),
        "--recipe",
        RECIPE,
        "--stage",
        "instruct",
        *sample_recipe,
        "stages.instruct.max_length=40",
    )
    assert code == 0
    assert "truncated " in out and "truncated 0" not in out.split("── 2/3")[0]
    assert "── 2/3 b" in out and "unusable: turn 1: expected alternating human/gpt" in out
    assert "── 3/3 #3" in out and "invalid JSON" in out


def test_colour_on_a_terminal(sample_recipe, processor):
    from qlora_med.data.preview import format_text, preview_records

    preview = preview_records(INSTRUCT, processor.tokenizer, "vicuna_v1", 16, 256, limit=1)
    text = format_text(preview, processor.tokenizer, colour=True)
    assert "\033[1;32m▁This ▁is" in text and "[▁This" not in text
    record = preview.records[0]
    assert record.trained == sum(label != IGNORE_INDEX for label in record.labels) and record.truncated == 0


def test_unknown_stage_is_a_user_error(capsys, sample_recipe):
    code = cli.main(["data", "preview", INSTRUCT, "--recipe", RECIPE, "--stage", "vqa", *sample_recipe])
    assert code == 1
