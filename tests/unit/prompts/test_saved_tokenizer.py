"""A stage's saved tokenizer, loaded by plain transformers in a process that never imports qlora_med, gives the
ids training gave, for every template (BOS, the `▁` after each added token, whitespace runs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from qlora_med.model.processor import add_llava_tokens, mistral_tokenizer
from qlora_med.prompts.templates import KIT_TEMPLATES as TEMPLATES
from qlora_med.prompts.templates import render, tokenizer_mode
from qlora_med.prompts.tokenization import save_training_tokenizer, tokenize

ROUNDS = [("<image>\nIs there a pneumothorax in the left  hemithorax?", "No."),
          ("Immunohistochemistry: which marker is positive?", "CD20, diffusely.")]
PLAIN = [("<image>", "Immunohistochemistry shows diffuse CD20 staining in the radiograph's  lymphoid cells.")]
LOAD = ("import json, sys\nfrom transformers import AutoTokenizer\nt = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(json.dumps([t(x, add_special_tokens=False)['input_ids'] for x in json.loads(sys.argv[2])]))\n"
        "print(json.dumps('qlora_med' in sys.modules))")


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_plain_transformers_reproduces_training_ids(template, tmp_path):
    tokenizer = mistral_tokenizer(tmp_path / "src")
    add_llava_tokens(tokenizer, "<image>")
    tokenizer.save_pretrained(tmp_path / "final")
    shutil.copy(tmp_path / "src" / "tokenizer.model", tmp_path / "final")
    mode = tokenizer_mode(template)
    assert save_training_tokenizer(tokenizer, mode, tmp_path / "final")
    texts = [render(template, PLAIN if template == "plain" else ROUNDS, "<image>").text,
             render(template, (PLAIN if template == "plain" else ROUNDS)[:1], "<image>").text]
    want = [tokenize(tokenizer, [t], mode)[0].tolist() for t in texts]
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "final"), json.dumps(texts)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, imported = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert got == want and imported is False
