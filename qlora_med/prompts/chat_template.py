"""Jinja chat templates that reproduce :func:`qlora_med.prompts.templates.render` for exported models.

``processor.apply_chat_template(messages, tokenize=False)`` on a merged or exported model gives the
same text as ``render(template, turns, image_token, bos_token, eos_token).text`` for conversations
with an image in the first user message (the only kind the curriculum trains on). The image placeholder
goes where ``render`` puts it: to the front of the first question (``<image>\\n{question}``); in
``llava_med_v1`` where the text has it, else after the question (``{question}\\n<image>``). A first message
without an image part and without ``<image>`` in its text gets no placeholder (``render`` always adds one).
System messages are ignored: every template has a fixed system prompt, as in training. The assistant prefix is
part of each user turn, so ``add_generation_prompt`` changes nothing.

The text starts with the BOS token: tokenize it with ``add_special_tokens=False`` (what
``apply_chat_template(tokenize=True)`` does). Training tokenized it in the template's SentencePiece mode
(:mod:`qlora_med.prompts.tokenization`); a tokenizer loaded from the exported folder tokenizes the same text as its
pipeline says, which for SentencePiece tokenizers saved by transformers 5 is not legacy mode.
"""

from __future__ import annotations

from qlora_med.prompts.templates import KIT_TEMPLATES, LLAVA_MED_V1_SYSTEM, VICUNA_SYSTEM

# Shared prologue: text of a message (string or list of parts) and the first-question rules.
_PROLOGUE = """\
{%- macro text(m) -%}
{%- if m['content'] is string -%}{{ m['content'] }}
{%- else -%}{%- for p in m['content'] -%}{%- if p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro has_image(m) -%}
{%- if m['content'] is not string -%}{%- for p in m['content'] -%}{%- if p['type'] == 'image' -%}1{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- macro question(m, first) -%}
{%- set q = text(m) -%}
{%- if first and (has_image(m) or IMG in q) -%}{{ IMG + '\\n' + (q | replace(IMG, '') | trim) }}
{%- else -%}{{ q }}{%- endif -%}
{%- endmacro -%}
{%- macro question_in_place(m, first) -%}
{%- set q = text(m) -%}
{%- if first and IMG not in q and has_image(m) -%}{{ q + '\\n' + IMG }}
{%- else -%}{{ q }}{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(first=true) -%}
"""


def _inst_body(close: str) -> str:
    """mistral_instruct / llava_med_v15: one BOS, ``[INST] q [/INST]``, then `` a`` + ``close``."""
    return (
        "{{- bos_token -}}\n"
        "{%- for m in messages -%}\n"
        "{%- if m['role'] == 'user' -%}{{ '[INST] ' + question(m, ns.first) + ' [/INST]' }}"
        "{%- set ns.first = false -%}\n"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' + text(m) + " + close + " }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}"
    )


_BODIES = {
    "mistral_instruct": _inst_body("eos_token"),
    "llava_med_v15": _inst_body("' ' + eos_token"),
    "vicuna_v1": """\
{{- bos_token + SYSTEM -}}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}{{ ' USER: ' + (question(m, ns.first) | trim) + ' ASSISTANT:' }}{%- set ns.first = false -%}
{%- elif m['role'] == 'assistant' -%}{{ ' ' + (text(m) | trim) + eos_token }}
{%- endif -%}
{%- endfor -%}""",
    "llava_med_v1": """\
{{- bos_token + SYSTEM + '\\n\\n' -}}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}{{ '### Human: ' + question_in_place(m, ns.first) + '\\n### Assistant:' }}
{%- set ns.first = false -%}
{%- elif m['role'] == 'assistant' -%}{{ ' ' + text(m) + '\\n' }}
{%- endif -%}
{%- endfor -%}
{%- if messages and messages[-1]['role'] == 'assistant' -%}{{ '### ' }}{%- endif -%}""",
    "plain": """\
{{- bos_token + IMG -}}
{%- for m in messages -%}
{%- if m['role'] == 'assistant' -%}{{ text(m) + '\\n' }}{%- endif -%}
{%- endfor -%}""",
}

_SYSTEMS = {"vicuna_v1": VICUNA_SYSTEM, "llava_med_v1": LLAVA_MED_V1_SYSTEM}


def _literal(value: str) -> str:
    """A Jinja string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(template: str, image_token: str = "<image>") -> str:
    """The Jinja chat template for one of :data:`qlora_med.prompts.templates.KIT_TEMPLATES`."""
    if template not in KIT_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(KIT_TEMPLATES)}")
    header = "{%- set IMG = " + _literal(image_token) + " -%}\n"
    if template in _SYSTEMS:
        header += "{%- set SYSTEM = " + _literal(_SYSTEMS[template]) + " -%}\n"
    return header + _PROLOGUE + _BODIES[template]


def set_chat_template(processor, template: str, image_token: str) -> None:
    """Attach the template to a processor and its tokenizer (both are saved by ``save_pretrained``);
    ``chat_template`` keeps the model's own."""
    if template == "chat_template":
        return
    jinja = chat_template(template, image_token)
    processor.chat_template = jinja
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.chat_template = jinja
