"""Prompt templates: rendering, answer spans, the masking rule, and the exported Jinja chat templates."""
