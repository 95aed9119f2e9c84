"""Point huggingface_hub at a Hub stand-in (``hub_standin.py``, 127.0.0.1 only) with a fresh cache and no token.

``with serve_hub(monkeypatch, tmp_path / "hf-cache") as hub:`` sets what ``HF_ENDPOINT`` / ``HF_HUB_CACHE`` /
``HF_HUB_OFFLINE`` would (huggingface_hub reads them once, at import, so its constants are patched too);
``hub.state.models[repo_id] = HubModel(files)`` publishes a repo, ``hub.state.requests`` logs every request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.hub_standin import HubStandIn

TOKEN = "hf_test_token_do_not_print_0123456789"


@contextmanager
def serve_hub(monkeypatch, cache: Path, token: str = TOKEN) -> Iterator[HubStandIn]:
    from huggingface_hub import constants

    with HubStandIn(token) as server:
        for name, value in (("HF_ENDPOINT", server.url), ("HF_HUB_CACHE", str(cache))):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks plain HTTP, not Xet
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # TRL pings {endpoint}/api/telemetry
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache.parent / "no-token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(cache.parent / "no-stored-tokens"))
        yield server


def go_offline(monkeypatch) -> None:
    """``HF_HUB_OFFLINE=1``, as huggingface_hub would have read it at import."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def file_requests(hub: HubStandIn) -> list[str]:
    """The file requests (``HEAD``/``GET .../resolve/...``) the stand-in answered, in order."""
    return [r for r in hub.state.requests if "/resolve/" in r]


def fetched_files(hub: HubStandIn) -> set[str]:
    """The file names whose bytes were downloaded (``GET .../resolve/<rev>/<file>``)."""
    return {r.split("/resolve/")[1].split("/", 1)[1] for r in file_requests(hub) if r.startswith("GET ")}


def folder_files(folder: Path) -> dict[str, bytes]:
    """A model folder's files as a stand-in repo (``HubModel(folder_files(tiny_dir))``)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
