"""Prompt templates: rendering, answer spans, the masking rule, the tokenizer mode, exported chat templates."""
