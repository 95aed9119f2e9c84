"""Issue 14, data classes: every bad input ends in one line naming file, record, cause and fix (exit 1), or a counted
skip under ``on_bad_record: skip``; ``data check`` and training apply the same rules. Images stay inside
``image_folder``; pixel limits instead of PIL's raised global; ``<image>`` only in the first human turn;
answer_type in VQA files; UTF-8 (BOM tolerated) and Git LFS pointers; the pad colour as LLaVA computes it."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from qlora_med.cli import main as cli
from qlora_med.config.schema import DataConfig, StageConfig
from qlora_med.data.build import build_stage_dataset
from qlora_med.data.check import check_file
from qlora_med.data.collate import VisionCollator
from qlora_med.data.images import ImageTooLarge, load_image, mean_colour, pad_colour
from qlora_med.data.model_text import load_model_text
from qlora_med.data.records import iter_json_objects
from qlora_med.errors import ConfigError, DataError

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 1234567\n".format("ab" * 32)


def _rec(rid, image="cell.png", q="<image>\nWhat is shown?", a="A cell.", **extra):
    turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": rid, "image": image, "conversations": turns, **extra}


@pytest.fixture()
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SAMPLE / "images" / "cell.png", images / "cell.png")
    return images


@pytest.fixture(scope="module")
def model_text(tiny_dir):
    return load_model_text(str(tiny_dir))


def _stage(path: Path, folder: Path, kind: str = "instruct", **data) -> StageConfig:
    return StageConfig(name="s", kind=kind, max_length=128,
                       data=DataConfig(path=str(path), image_folder=str(folder), **data))


def _build(stage, processor, cache):
    return build_stage_dataset(stage, processor, 16, "<image>", 0, cache)


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` (a few bytes of data: a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# --- 1. images stay inside image_folder --------------------------------------------------------------------------


@pytest.fixture()
def outside(tmp_path, folder) -> dict[str, str]:
    """Records' image names that lead out of ``folder`` in each way, to a real image outside it."""
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    shutil.copy(SAMPLE / "images" / "cell.png", secret)
    os.symlink(secret, folder / "link.png")
    os.symlink(secret.parent, folder / "linked_dir")
    return {"absolute": str(secret), "dotdot": "../outside/secret.png", "symlink": "link.png",
            "symlinked_dir": "linked_dir/secret.png"}


CAUSES = {"absolute": "is an absolute path", "dotdot": "leads out of it with '..'",
          "symlink": "is reached through a symlink", "symlinked_dir": "is reached through a symlink"}


@pytest.mark.parametrize("how", sorted(CAUSES))
def test_training_refuses_an_image_outside_the_folder(processor, folder, outside, tmp_path, how):
    path = _write(tmp_path / "d.json", [_rec("good"), _rec("escape", image=outside[how])])
    with pytest.raises(DataError) as err:
        _build(_stage(path, folder), processor, tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: record escape (#2): image '{outside[how]}' ")
    assert CAUSES[how] in message and str(tmp_path / "outside" / "secret.png") in message
    assert "data.allow_outside_images: true" in message and "on_bad_record: skip" in message
    dataset, stats = _build(_stage(path, folder, on_bad_record="skip"), processor, tmp_path / "cache")
    assert dataset["id"] == ["good"] and stats.sources[0].skipped == {"image_outside": 1}
    dataset, _ = _build(_stage(path, folder, allow_outside_images=True), processor, tmp_path / "cache")
    assert dataset["id"] == ["good", "escape"]


def test_paths_that_stay_inside_are_fine(processor, folder, tmp_path):
    (folder / "sub").mkdir()
    records = [_rec("a", image="sub/../cell.png"), _rec("b", image=str(folder / "cell.png")), _rec("c")]
    dataset, _ = _build(_stage(_write(tmp_path / "d.json", records), folder), processor, tmp_path / "cache")
    assert dataset["id"] == ["a", "b", "c"]


def test_data_check_counts_images_outside_and_the_flag_allows_them(tiny_dir, folder, outside, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(_rec(how, image=name)) for how, name in outside.items()) + "\n")
    args = ["data", "check", str(path), "--image-folder", str(folder), "--tokenizer", str(tiny_dir)]
    assert cli(args) == 1
    out = capsys.readouterr().out
    assert "image outside the folder  4" in out and "unusable records          4" in out
    assert "dotdot (#2): image_outside: image '../outside/secret.png' leads out of it with '..'" in out
    assert cli([*args, "--allow-outside-images"]) == 0
    assert "OK: every record is usable" in capsys.readouterr().out


def _pathvqa(src: Path, name: str) -> Path:
    (src / "images" / "train").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(src / "images" / "train" / "train_0001.jpg")
    (src / "qas" / "train").mkdir(parents=True)
    (src / "qas" / "test").mkdir(parents=True)
    (src / "qas" / "train" / "train_qa.json").write_text(json.dumps([{"image": name, "question": "Q?", "answer": "yes"}]))
    (src / "qas" / "test" / "test_qa.json").write_text(json.dumps([{"image": "x", "question": "Q?", "answer": "no"}]))
    return src


def test_pathvqa_converter_refuses_an_image_outside_its_source(tmp_path, caplog):
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (4, 4)).save(secret)
    src = _pathvqa(tmp_path / "deep" / "er" / "pvqa", "../../../../outside/secret")
    out = tmp_path / "out"
    assert cli(["data", "convert", "pathvqa", str(src), "--out", str(out)]) == 1
    assert "train_qa.json record 0: image '../../../../outside/secret' resolves to" in caplog.text
    assert "outside the release's image folder" in caplog.text
    assert not list(out.rglob("secret*")), "nothing from outside the source was copied"


def test_slake_converter_refuses_dotdot_and_link_copies_across_file_systems(tmp_path, monkeypatch):
    from qlora_med.data.convert import convert

    src = tmp_path / "Slake1.0"
    (src / "imgs" / "xmlab1").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(src / "imgs" / "xmlab1" / "source.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.jpg")

    def rec(name):
        return {"img_name": name, "question": "Q?", "answer": "Lung", "q_lang": "en", "answer_type": "OPEN",
                "content_type": "Organ", "qid": 1}

    (src / "train.json").write_text(json.dumps([rec("../../secret.jpg")]))
    (src / "test.json").write_text(json.dumps([rec("xmlab1/source.jpg")]))
    with pytest.raises(DataError, match=r"train\.json record 0: image '\.\./\.\./secret\.jpg' resolves to .*secret"):
        convert("slake", src, tmp_path / "out")
    (src / "train.json").write_text(json.dumps([rec("xmlab1/./source.jpg")]))

    def no_hard_links(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    convert("slake", src, tmp_path / "out", link=True)
    placed = tmp_path / "out" / "images" / "xmlab1" / "source.jpg"
    assert placed.is_file() and not placed.is_symlink(), "a copy, not a symlink leading out of the image folder"


# --- 2. pixel limits -----------------------------------------------------------------------------------------------


def test_pil_global_limit_is_left_alone():
    import qlora_med.data.images  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)  # PIL's own default


def test_a_decompression_bomb_is_a_record_level_problem(processor, folder, tmp_path, model_text):
    _png_header(folder / "bomb.png", 30000, 30000)
    path = _write(tmp_path / "d.json", [_rec("good"), _rec("bomb", image="bomb.png")])
    with pytest.raises(DataError) as err:
        _build(_stage(path, folder), processor, tmp_path / "cache")
    message = str(err.value)
    assert message.startswith(f"{path}: record bomb (#2): image '{folder / 'bomb.png'}' is refused as a "
                              "decompression bomb") and "on_bad_record: skip" in message and "\n" not in message
    dataset, stats = _build(_stage(path, folder, on_bad_record="skip"), processor, tmp_path / "cache")
    assert dataset["id"] == ["good"] and stats.sources[0].skipped == {"image_too_large": 1}
    tok, n_image = model_text.tokenizer, model_text.image_tokens
    report = check_file(path, folder, tok, num_image_tokens=n_image)
    assert report.problems == {"image_too_large": 1} and report.images_too_large == 1 and not report.ok
    assert "1 too large" in report.text()


def test_the_pixel_limit_is_read_from_the_header_before_decoding(processor, folder, tmp_path):
    big = _png_header(folder / "big.png", 8000, 6000)  # 48 MP declared; decoding it would fail (data cut short)
    with pytest.raises(ImageTooLarge, match=r"record r: image '.*big.png' is 8000x6000 = 48,000,000 pixels, over "
                                            r"the limit of 40,000,000 \(data.max_image_pixels\)"):
        load_image(big, record_id="r")
    path = _write(tmp_path / "d.json", [_rec("big", image="big.png"), _rec("small")])
    dataset, stats = _build(_stage(path, folder, on_bad_record="skip"), processor, tmp_path / "cache")
    assert dataset["id"] == ["small"] and stats.sources[0].skipped == {"image_too_large": 1}
    with pytest.raises(DataError, match=r"record big \(#1\): image '.*cell.png' is 213x256 = 54,528 pixels, over "
                                        r"the limit of 50,000 \(data.max_image_pixels\)"):  # a recipe's own limit
        _build(_stage(_write(tmp_path / "e.json", [_rec("big", image="cell.png"), _rec("small")]), folder,
                      max_image_pixels=50_000), processor, tmp_path / "cache")
    # the collator refuses it too (eval decodes through it): a skip, or one line
    collator = VisionCollator(processor, "pad", on_bad_record="skip")
    assert collator.pixel_values([str(big), str(folder / "cell.png")], ["big", "ok"])[1] == [1]
    assert collator.skipped == 1
    with pytest.raises(ImageTooLarge, match="record big: image"):
        VisionCollator(processor, "pad").pixel_values([str(big)], ["big"])


@pytest.mark.parametrize("value", [0, -5, 10**9, 4.5e7, True])
def test_max_image_pixels_is_validated(folder, tmp_path, value):
    with pytest.raises(ConfigError, match=r"stages.s.data.max_image_pixels must be a whole number from 1 to "
                                          r"178956970 \(PIL refuses larger images"):
        _stage(tmp_path / "d.json", folder, max_image_pixels=value)


def test_large_images_are_shrunk_once_into_the_cache(processor, folder, tmp_path):
    wide = Image.linear_gradient("L").resize((3000, 1000)).convert("RGB")
    wide.save(folder / "wide.png")
    path = _write(tmp_path / "d.json", [_rec("wide", image="wide.png"), _rec("small")])
    collator = VisionCollator(processor, "pad")
    expected = collator.pixel_values([str(folder / "wide.png")], ["wide"])[0]  # the original, decoded per draw
    dataset, stats = _build(_stage(path, folder), processor, tmp_path / "cache")
    entry = Path(stats.sources[0].cache)
    copy = Path(dataset[0]["image"])
    assert copy.parent == entry / "images" and stats.sources[0].shrunk == 1
    assert Image.open(copy).size == (2048, 683) and dataset[1]["image"] == str(folder / "cell.png")
    (folder / "wide.png").unlink()  # training never opens the original again
    assert torch.equal(collator([dataset[0]])["pixel_values"], expected), "same pixels as the full-size decode"


def test_large_embedded_images_are_shrunk_once(processor, tmp_path):
    from io import BytesIO

    import datasets

    out = BytesIO()
    Image.linear_gradient("L").resize((2500, 400)).save(out, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    table = tmp_path / "t.parquet"
    datasets.Dataset.from_dict({"image": [{"bytes": out.getvalue(), "path": "wide.png"}], "question": ["Q?"],
                                "answer": ["yes"]}, features=features).to_parquet(table)
    stage = StageConfig(name="s", kind="vqa", max_length=128, data=DataConfig(path=str(table)))
    dataset, stats = _build(stage, processor, tmp_path / "cache")
    assert stats.sources[0].shrunk == 1 and Image.open(BytesIO(dataset[0]["image_bytes"])).size == (2048, 328)


# --- 3. one record rule set ----------------------------------------------------------------------------------------


def test_image_token_in_an_answer_is_refused_by_check_and_training(processor, folder, tmp_path, model_text):
    path = _write(tmp_path / "d.json", [_rec("good"), _rec("leak", a="See <image> here.")])
    tok, n_image = model_text.tokenizer, model_text.image_tokens
    report = check_file(path, folder, tok, num_image_tokens=n_image)
    assert report.problems == {"image_token": 1} and report.unusable == 1
    assert "turn 1 (human), turn 2 (gpt)" in report.first_unusable[0]
    with pytest.raises(DataError) as err:
        _build(_stage(path, folder), processor, tmp_path / "cache")
    assert str(err.value).startswith(f"{path}: record leak (#2): needs exactly one '<image>' in the first human turn "
                                     "(found 2: turn 1 (human), turn 2 (gpt)); remove it from the answer")
    _, stats = _build(_stage(path, folder, on_bad_record="skip"), processor, tmp_path / "cache")
    assert stats.sources[0].skipped == {"image_token": 1}


def test_vqa_record_without_answer_type_is_refused_as_eval_score_refuses_it(processor, folder, tmp_path, model_text):
    from qlora_med.eval.metrics import load_vqa_examples

    records = [_rec(1, answer_type="CLOSED", a="yes"), _rec(2, a="no"), _rec(3, answer_type="open")]
    path = _write(tmp_path / "vqa.json", records)
    tok, n_image = model_text.tokenizer, model_text.image_tokens
    report = check_file(path, folder, tok, num_image_tokens=n_image)
    assert report.format == "vqa" and report.problems == {"answer_type": 1}
    assert report.first_unusable == ["2 (#2): answer_type: has no answer_type: a VQA file needs OPEN or CLOSED in "
                                     "every record (eval score splits accuracy by it); add it (data convert writes it)"]
    with pytest.raises(DataError, match=r"record 2 \(#2\): has no answer_type: a VQA file needs OPEN or CLOSED"):
        _build(_stage(path, folder, kind="vqa"), processor, tmp_path / "cache")
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"question_id": i, "text": "yes"}) + "\n" for i in (1, 2, 3)))
    with pytest.raises(DataError, match="answer_type must be OPEN or CLOSED"):
        load_vqa_examples(path, pred)


def test_invalid_utf8_is_named_by_line_and_byte_offset(folder, tmp_path, model_text, tiny_dir, caplog):
    good = json.dumps(_rec("a")).encode()
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(good + b"\n" + good.replace(b"A cell.", b"Caf\xe9.").replace(b'"a"', b'"b"') + b"\n")
    offset = len(good) + 1 + good.replace(b'"a"', b'"b"').index(b"A cell.") + 3
    with pytest.raises(DataError) as err:
        list(iter_json_objects(jsonl))
    assert str(err.value).startswith(f"{jsonl}: line 2: not valid UTF-8 at byte offset {offset} (bytes e9")
    assert "re-encode it as UTF-8" in str(err.value)
    tok, n_image = model_text.tokenizer, model_text.image_tokens
    report = check_file(jsonl, folder, tok, num_image_tokens=n_image)
    assert report.problems == {"invalid_utf8": 1} and report.records == 2 and report.unusable == 1
    listed = tmp_path / "d.json"
    listed.write_bytes(b"[\n" + good + b",\n" + good.replace(b"A cell.", b"\xff") + b"\n]")
    offset = 2 + len(good) + 2 + good.index(b"A cell.")
    assert cli(["data", "check", str(listed), "--image-folder", str(folder), "--tokenizer", str(tiny_dir)]) == 1
    assert f"d.json: not valid UTF-8 at line 3, byte offset {offset} (bytes ff" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("layout", ["JSON list", "JSONL"])
def test_a_utf8_bom_is_tolerated(folder, tmp_path, model_text, layout):
    records = [_rec(f"r{i}") for i in range(6)]
    text = json.dumps(records, indent=1) if layout == "JSON list" else "\n".join(map(json.dumps, records))
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [o["id"] for _, o in iter_json_objects(path)] == [f"r{i}" for i in range(6)]
    tok, n_image = model_text.tokenizer, model_text.image_tokens
    report = check_file(path, folder, tok, num_image_tokens=n_image)
    assert report.ok and report.records == 6 and report.layout == layout


def test_git_lfs_pointers_say_git_lfs_pull(folder, tmp_path, tiny_dir, processor, caplog):
    path = tmp_path / "d.json"
    path.write_text(LFS)
    assert cli(["data", "check", str(path), "--image-folder", str(folder), "--tokenizer", str(tiny_dir)]) == 1
    assert (f"{path}: is a Git LFS pointer file (standing for 1234567 bytes that were never downloaded), not the "
            "data itself: run `git lfs pull`") in caplog.text
    assert "invalid JSON" not in caplog.text
    (folder / "lfs.png").write_text(LFS)  # an image that is a pointer too: a record-level problem
    data = _write(tmp_path / "e.json", [_rec("good"), _rec("ptr", image="lfs.png")])
    _, stats = _build(_stage(data, folder, on_bad_record="skip"), processor, tmp_path / "cache")
    assert stats.sources[0].skipped == {"unreadable_image": 1}
    assert "is a Git LFS pointer file, not the image (run `git lfs pull`" in stats.sources[0].skip_examples[0]


def test_eval_reads_the_same_way(folder, tmp_path):
    from qlora_med.eval.generate import load_questions

    path = tmp_path / "test.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([_rec(1, answer_type="OPEN")]).encode())
    assert [q.id for q in load_questions(path, folder)] == ["1"]
    path.write_text(LFS)
    with pytest.raises(DataError, match="Git LFS pointer file"):
        load_questions(path, folder)


# --- 4. pad colour -------------------------------------------------------------------------------------------------


def test_pad_colour_is_llavas():
    assert pad_colour(CLIP_MEAN) == (122, 116, 104)  # LLaVA: tuple(int(x * 255) for x in image_mean); not (123, 117, 104)
    assert pad_colour((0.5, 0.5, 0.5)) == (127, 127, 127)


def test_collator_pads_with_exactly_that_colour(processor, folder):
    ip = processor.image_processor
    assert mean_colour(ip) == pad_colour(ip.image_mean)
    Image.new("RGB", (40, 10), (255, 255, 255)).save(folder / "strip.png")
    pixels = VisionCollator(processor, "pad").pixel_values([str(folder / "strip.png")], ["s"])[0][0]
    colour = torch.tensor(pad_colour(ip.image_mean), dtype=torch.float32) / 255
    expected = (colour - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    torch.testing.assert_close(pixels[:, 0, 0], expected, atol=1e-4, rtol=0)


def test_image_screen_shrinks_in_worker_processes_and_rebuilds_evicted_copies(tmp_path, monkeypatch):
    from io import BytesIO

    import qlora_med.data.screen as screen_module
    from qlora_med.data.screen import ImageScreen, ShrinkTarget

    files, blobs = [], []
    for i, width in enumerate((2100, 2300)):
        img = Image.linear_gradient("L").resize((width, 100 + i))
        files.append(tmp_path / f"f{i}.png")
        img.save(files[-1])
        out = BytesIO()
        img.save(out, format="PNG")
        blobs.append(out.getvalue())
    target = ShrinkTarget(tmp_path / "tmp", tmp_path / "final")
    screen = ImageScreen(10**6, shrink=target, workers=2)  # two decodes: a pool of two workers
    try:
        screen.screen([(files[0], "a"), (files[1], "b"), (files[0], "c")])
        assert screen._pool is not None and screen.shrunk == 2
        problem, copy = screen.apply(files[1])
        assert problem is None and copy.parent == target.final
        assert Image.open(target.folder / copy.name).size == (2048, 90)
        monkeypatch.setattr(screen_module, "RECENT", 1)
        screen.screen([(blobs[0], "d"), (blobs[1], "e")])
        first = screen.apply(blobs[0])[1]  # evicted by the second: shrunk again, the same bytes
        assert Image.open(BytesIO(first)).size == (2048, 98) and screen.apply(blobs[0])[1] == first
    finally:
        screen.close()
    assert ImageScreen(100).workers >= 1
