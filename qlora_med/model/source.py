"""Where a model named in a recipe comes from: a local folder, or a Hub id fetched into the HF cache.

``org/name`` or ``org/name@revision`` (branch, tag or commit; or ``model.revision``) that is not an existing
local path is a Hugging Face Hub model (the parsing is :mod:`qlora_med.config.model_ref`, so the config layer
can tell the two apart): ``huggingface_hub.snapshot_download`` fetches only the files a load needs
(safetensors weights, JSON configs, tokenizer files, chat templates) into the shared HF cache
(``HF_HUB_CACHE`` / ``HF_HOME``), with its own progress bars, resuming dropped transfers; a second
resolve is a cache hit. Given a ``role``, its ``config.json`` comes first and an unsupported model is refused
before the weights download. Pickle weights (``.bin``/``.pt``) only with ``allow_pickle`` (``model.allow_pickle``).
The token comes from ``HF_TOKEN`` or ``hf auth login`` as huggingface_hub reads it and is never logged;
``HF_HUB_OFFLINE=1`` uses the cache only; ``HF_ENDPOINT`` selects another Hub (mirrors, tests).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlora_med.config.model_kind import Role, read_kind
from qlora_med.config.model_ref import HUB_ID, ModelRef, parse_model_ref
from qlora_med.errors import ConfigError, QloraMedError

__all__ = ["HUB_ID", "ModelRef", "parse_model_ref", "resolve_model", "hub_file"]
logger = logging.getLogger(__name__)

# configs (and weight indexes), tokenizer files, chat templates
CONFIGS = ["*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
ALLOW = ["*.safetensors", *CONFIGS]
PICKLE = ["*.bin", "*.pt", "*.pth"]
IGNORE = ["original/*", "consolidated*"]  # reference-code copies of the weights that transformers never reads


def resolve_model(
    value: str,
    *,
    key: str = "model.name_or_path",
    allow_pickle: bool = False,
    revision: str | None = None,
    role: Role | None = None,
    weights: bool = True,
) -> Path:
    """The local folder holding the model ``value`` names (a local folder as is, a Hub id downloaded/cached).

    ``revision``: ``model.revision`` (see :func:`parse_model_ref`). ``role``: check the model's kind from its
    ``config.json`` first (:func:`qlora_med.config.model_kind.read_kind`), so a Hub model that cannot serve
    is refused after one small file, before its weights download. ``weights=False``: configs and tokenizer
    files only (``data check``'s tokenizer).
    """
    ref = parse_model_ref(value, key=key, revision=revision)
    if ref.path is not None:
        if not ref.path.is_dir():
            raise ConfigError(
                f"{key}: '{value}' is a file; point it at the model folder (with config.json) "
                "or at a Hub id org/name"
            )
        if role is not None:
            read_kind(ref.path, role=role, where=f"{key}: '{value}'")
        return ref.path
    commit = None
    if role is not None:  # config.json alone first; the rest is fetched at that same commit
        config = _snapshot(ref, key, ["config.json"]) / "config.json"
        read_kind(config, role=role, where=f"{key}: Hub model '{ref}'")
        commit = config.parent.name
    if not weights:
        return _snapshot(ref, key, CONFIGS, commit)
    folder = _snapshot(ref, key, ALLOW, commit)
    if not any(folder.glob("*.safetensors")):
        if not allow_pickle:
            raise ConfigError(
                f"{key}: Hub model '{ref}' has no .safetensors weights (only pickle .bin/.pt "
                "files, which can run code when loaded, or none); pick a repo or revision with "
                "safetensors weights, or allow pickle weights (model.allow_pickle: true) for a repo "
                "you trust"
            )
        folder = _snapshot(ref, key, ALLOW + PICKLE, folder.name)
        if not any(p for pattern in PICKLE for p in folder.glob(pattern)):
            raise ConfigError(
                f"{key}: Hub model '{ref}' has no weights (.safetensors, .bin or .pt); "
                "check the id: it may hold adapters or another format only"
            )
        logger.warning("%s: %s has no safetensors weights; using its pickle weights (allow_pickle)", key, ref)
    logger.info("%s: Hub model %s resolved to %s", key, ref, folder)
    return folder


def hub_file(ref: ModelRef, key: str = "model.name_or_path", filename: str = "config.json") -> Path:
    """One file of a Hub model (``hf_hub_download``; default its config.json): from the HF cache when there,
    else fetched into it; ``HF_HUB_OFFLINE=1``: the cache only. Failures are :func:`resolve_model`'s one-line
    errors. Also the ``hub_config`` of :func:`qlora_med.config.files.validate_paths`."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(ref, key):
        return Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision))


def _snapshot(ref: ModelRef, key: str, patterns: list[str], commit: str | None = None) -> Path:
    """``snapshot_download`` the files matching ``patterns`` (at ``commit`` when known: no revision look-up)."""
    from huggingface_hub import snapshot_download

    with _hub_errors(ref, key):
        return Path(
            snapshot_download(
                ref.repo_id, revision=commit or ref.revision, allow_patterns=patterns, ignore_patterns=IGNORE
            )
        )


@contextmanager
def _hub_errors(ref: ModelRef, key: str) -> Iterator[None]:
    """Every huggingface_hub failure inside becomes one line naming the key, the id and the fix (never the token)."""
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = constants.ENDPOINT
    try:
        yield
    except GatedRepoError as err:
        raise ConfigError(
            f"{key}: Hub model '{ref.repo_id}' is gated: accept its conditions at {hub}/{ref.repo_id} "
            "while logged in, then set HF_TOKEN (or run `hf auth login`) to a token of that "
            "account"
        ) from err
    except RepositoryNotFoundError as err:
        token = (
            "no token is set; set HF_TOKEN (or run `hf auth login`)"
            if get_token() is None
            else "the token in use (HF_TOKEN or `hf auth login`) cannot read it; use one that can"
        )
        raise ConfigError(
            f"{key}: '{ref.repo_id}' is not a local folder and the Hub ({hub}) has no model by that "
            f"id visible to you: check the id (org/name, as on the model page); if it is private "
            f"or gated, {token}"
        ) from err
    except RevisionNotFoundError as err:
        raise ConfigError(
            f"{key}: Hub model '{ref.repo_id}' has no revision '{ref.revision}': use an existing "
            f"branch, tag or commit ({hub}/{ref.repo_id}/tree/main lists them), or drop "
            f"'@{ref.revision}' for the default branch"
        ) from err
    except RemoteEntryNotFoundError as err:
        name = err.response.url.path.rpartition("/")[2] if err.response is not None else "the file"
        raise ConfigError(
            f"{key}: Hub model '{ref}' has no {name}: check the id; a model repo in the "
            "transformers format has config.json next to its weights"
        ) from err
    except LocalEntryNotFoundError as err:
        what = "is only partly in" if isinstance(err, IncompleteSnapshotError) else "is not in"
        if constants.is_offline_mode():
            raise QloraMedError(
                f"{key}: Hub model '{ref}' {what} the local cache ({constants.HF_HUB_CACHE}) and "
                f"HF_HUB_OFFLINE=1 forbids downloading it: download it once with network access "
                f"(`hf download {ref.repo_id}`, or this command without HF_HUB_OFFLINE), or unset "
                "HF_HUB_OFFLINE"
            ) from err
        raise _network_error(ref, key, hub, err.__cause__ or err) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise QloraMedError(
                f"{key}: the Hub ({hub}) refused the token (HTTP {status}) for '{ref.repo_id}': "
                "check HF_TOKEN or `hf auth login`"
            ) from err
        raise _network_error(ref, key, hub, err) from err
    except (httpx2.HTTPError, OSError) as err:
        raise _network_error(ref, key, hub, err) from err


def _network_error(ref: ModelRef, key: str, hub: str, err: BaseException) -> QloraMedError:
    reason = (str(err).strip().splitlines() or [""])[0][:200]
    return QloraMedError(
        f"{key}: could not download Hub model '{ref}' from {hub} ({type(err).__name__}: {reason}) "
        "and it is not fully cached: check the network and HF_ENDPOINT, then run again (finished "
        "files stay in the cache), or set HF_HUB_OFFLINE=1 to use a cached copy"
    )
