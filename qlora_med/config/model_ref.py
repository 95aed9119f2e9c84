"""What a recipe's model string names: a local folder, or a Hugging Face Hub model ``org/name[@revision]``.

Pure (only ``Path.exists``): no network and no huggingface_hub. Fetching a Hub model is
``qlora_med.model.source.resolve_model``; this module is what the config layer needs to tell the two apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qlora_med.errors import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


@dataclass(frozen=True)
class ModelRef:
    """A local model folder (``path``), or a Hub repo at ``revision`` (None: the default branch)."""

    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.repo_id}@{self.revision or 'main'}"

    @property
    def name(self) -> str:
        """The folder's or the repo's own name (``clip-vit-large-patch14-336``), without org or revision."""
        return self.path.name if self.path is not None else self.repo_id.rpartition("/")[2]


def parse_model_ref(value: str, *, key: str = "model.name_or_path", revision: str | None = None) -> ModelRef:
    """An existing local path wins; else ``org/name[@revision]`` is a Hub id; anything else is a ConfigError.

    ``revision`` is ``model.revision``: it pins a Hub id without ``@``, must agree with an ``@revision`` in
    ``value``, and makes no sense for a local folder.
    """
    if Path(value).exists():
        if revision is not None:
            raise ConfigError(
                f"model.revision: '{revision}' pins a Hub model, but {key} '{value}' is a local "
                "folder; drop model.revision, or name the Hub id (org/name)"
            )
        return ModelRef(path=Path(value))
    repo_id, at, rev = value.partition("@")
    if (
        HUB_ID.fullmatch(repo_id)
        and ".." not in repo_id
        and "--" not in repo_id
        and not repo_id.endswith(".git")
    ):
        if at and (not rev or any(c.isspace() for c in rev)):
            raise ConfigError(
                f"{key}: '{value}' has an empty or malformed revision after '@'; write "
                f"{repo_id}@<branch, tag or commit>, or drop '@' for the default branch"
            )
        if at and revision is not None and rev != revision:
            raise ConfigError(
                f"{key}: '{value}' pins revision '{rev}' but model.revision is '{revision}'; "
                "give the revision once (either @revision or model.revision)"
            )
        return ModelRef(repo_id=repo_id, revision=rev or revision)
    raise ConfigError(
        f"{key}: '{value}' is neither an existing folder nor a Hub model id; download the model "
        "there, or name it as on the Hub: org/name or org/name@revision (e.g. llava-hf/llava-1.5-7b-hf)"
    )
