"""Where a model named in a recipe comes from: a local folder, or a Hub id fetched into the HF cache.

``org/name`` or ``org/name@revision`` (branch, tag or commit) that is not an existing local path is a
Hugging Face Hub model: ``huggingface_hub.snapshot_download`` fetches only the files a load needs
(safetensors weights, JSON configs, tokenizer files, chat templates) into the shared HF cache
(``HF_HUB_CACHE`` / ``HF_HOME``), with its own progress bars, resuming dropped transfers; a second
resolve is a cache hit. Pickle weights (``.bin``/``.pt``) only with ``allow_pickle=True``. The token
comes from ``HF_TOKEN`` or ``hf auth login`` as huggingface_hub reads it and is never logged;
``HF_HUB_OFFLINE=1`` uses the cache only; ``HF_ENDPOINT`` selects another Hub (mirrors, tests).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_med.errors import ConfigError, QloraMedError

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
ALLOW = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]  # *.json: indexes too
PICKLE = ["*.bin", "*.pt", "*.pth"]
IGNORE = ["original/*", "consolidated*"]  # reference-code copies of the weights that transformers never reads


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


def parse_model_ref(value: str, *, key: str = "model.name_or_path") -> ModelRef:
    """An existing local path wins; else ``org/name[@revision]`` is a Hub id; anything else is a ConfigError."""
    if Path(value).exists():
        return ModelRef(path=Path(value))
    repo_id, at, revision = value.partition("@")
    if HUB_ID.fullmatch(repo_id) and ".." not in repo_id and "--" not in repo_id and not repo_id.endswith(".git"):
        if at and (not revision or any(c.isspace() for c in revision)):
            raise ConfigError(f"{key}: '{value}' has an empty or malformed revision after '@'; write "
                              f"{repo_id}@<branch, tag or commit>, or drop '@' for the default branch")
        return ModelRef(repo_id=repo_id, revision=revision or None)
    raise ConfigError(f"{key}: '{value}' is neither an existing folder nor a Hub model id; download the model "
                      "there, or name it as on the Hub: org/name or org/name@revision (e.g. llava-hf/llava-1.5-7b-hf)")


def resolve_model(value: str, *, key: str = "model.name_or_path", allow_pickle: bool = False) -> Path:
    """The local folder holding the model ``value`` names (a local folder as is, a Hub id downloaded/cached)."""
    ref = parse_model_ref(value, key=key)
    if ref.path is not None:
        if not ref.path.is_dir():
            raise ConfigError(f"{key}: '{value}' is a file; point it at the model folder (with config.json) "
                              "or at a Hub id org/name")
        return ref.path
    folder = _snapshot(ref, key, ALLOW)
    if not any(folder.glob("*.safetensors")):
        if not allow_pickle:
            raise ConfigError(f"{key}: Hub model '{ref}' has no .safetensors weights (only pickle .bin/.pt "
                              "files, which can run code when loaded, or none); pick a repo or revision with "
                              "safetensors weights, or allow pickle weights (allow_pickle=True) for a repo you trust")
        folder = _snapshot(ref, key, ALLOW + PICKLE)
        if not any(p for pattern in PICKLE for p in folder.glob(pattern)):
            raise ConfigError(f"{key}: Hub model '{ref}' has no weights (.safetensors, .bin or .pt); "
                              "check the id: it may hold adapters or another format only")
        logger.warning("%s: %s has no safetensors weights; using its pickle weights (allow_pickle)", key, ref)
    logger.info("%s: Hub model %s resolved to %s", key, ref, folder)
    return folder


def _snapshot(ref: ModelRef, key: str, patterns: list[str]) -> Path:
    """``snapshot_download`` the files matching ``patterns``; every failure becomes one line naming the id."""
    import httpx2
    from huggingface_hub import constants, get_token, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = constants.ENDPOINT
    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns,
                                      ignore_patterns=IGNORE))
    except GatedRepoError as err:
        raise ConfigError(f"{key}: Hub model '{ref.repo_id}' is gated: accept its conditions at {hub}/{ref.repo_id} "
                          "while logged in, then set HF_TOKEN (or run `hf auth login`) to a token of that "
                          "account") from err
    except RepositoryNotFoundError as err:
        token = ("no token is set; set HF_TOKEN (or run `hf auth login`)" if get_token() is None
                 else "the token in use (HF_TOKEN or `hf auth login`) cannot read it; use one that can")
        raise ConfigError(f"{key}: '{ref.repo_id}' is not a local folder and the Hub ({hub}) has no model by that "
                          f"id visible to you: check the id (org/name, as on the model page); if it is private "
                          f"or gated, {token}") from err
    except RevisionNotFoundError as err:
        raise ConfigError(f"{key}: Hub model '{ref.repo_id}' has no revision '{ref.revision}': use an existing "
                          f"branch, tag or commit ({hub}/{ref.repo_id}/tree/main lists them), or drop "
                          f"'@{ref.revision}' for the default branch") from err
    except LocalEntryNotFoundError as err:
        what = "is only partly in" if isinstance(err, IncompleteSnapshotError) else "is not in"
        if constants.is_offline_mode():
            raise QloraMedError(f"{key}: Hub model '{ref}' {what} the local cache ({constants.HF_HUB_CACHE}) and "
                                f"HF_HUB_OFFLINE=1 forbids downloading it: download it once with network access "
                                f"(`hf download {ref.repo_id}`, or this command without HF_HUB_OFFLINE), or unset "
                                "HF_HUB_OFFLINE") from err
        raise _network_error(ref, key, hub, err.__cause__ or err) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise QloraMedError(f"{key}: the Hub ({hub}) refused the token (HTTP {status}) for '{ref.repo_id}': "
                                "check HF_TOKEN or `hf auth login`") from err
        raise _network_error(ref, key, hub, err) from err
    except (httpx2.HTTPError, OSError) as err:
        raise _network_error(ref, key, hub, err) from err


def _network_error(ref: ModelRef, key: str, hub: str, err: BaseException) -> QloraMedError:
    reason = (str(err).strip().splitlines() or [""])[0][:200]
    return QloraMedError(f"{key}: could not download Hub model '{ref}' from {hub} ({type(err).__name__}: {reason}) "
                         "and it is not fully cached: check the network and HF_ENDPOINT, then run again (finished "
                         "files stay in the cache), or set HF_HUB_OFFLINE=1 to use a cached copy")
