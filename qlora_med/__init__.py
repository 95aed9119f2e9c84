"""qlora-med: QLoRA fine-tuning of LLaVA-style biomedical vision-language assistants."""

__version__ = "0.1.0"
