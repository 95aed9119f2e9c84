"""A local stand-in for the few Hub endpoints ``HfApi.create_repo / create_branch / upload_folder`` call.

Serves on 127.0.0.1 only. Endpoints (as huggingface_hub 2.4 calls them):
``POST /api/repos/create``, ``GET /api/models/{repo}`` (repo_info, after a 401/403 on create),
``POST /api/models/{repo}/branch/{branch}``, ``POST /api/models/{repo}/preupload/{rev}``,
``POST /api/models/{repo}/commit/{rev}`` (NDJSON), ``POST /api/validate-yaml`` (the card), the LFS batch API
``POST /{repo}.git/info/lfs/objects/batch`` and the ``PUT`` it points to.
``drop_next`` closes the next N requests to ``drop_path`` without answering (a dropped connection).

Downloads (``snapshot_download`` / ``hf_hub_download``) from the repos in ``state.models``:
``GET /api/models/{repo}/revision/{rev}`` (repo_info: commit sha), ``GET /api/models/{repo}/tree/{rev}``
(the file list), ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (``X-Repo-Commit``, ``ETag``, ``Content-Length``;
``Range: bytes=N-`` answers 206). Errors carry the Hub's ``X-Error-Code`` (RepoNotFound, GatedRepo,
RevisionNotFound, EntryNotFound). A private repo needs the token, a public one takes any or none.
``cut_next`` sends only the first half of the next N downloads of ``cut_file``, then drops the connection.

Dataset repos (``load_dataset("org/name")``) from ``state.datasets``: the same routes under ``/api/datasets/{repo}``
(plus the bare ``/api/datasets/{repo}``, ``tree/{rev}/{folder}?recursive=`` and ``POST paths-info/{rev}``) and
``/datasets/{repo}/resolve/{rev}/{file}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


@dataclass
class HubModel:
    """A downloadable repo: its files at one commit, reachable by that sha or any name in ``revisions``."""

    files: dict[str, bytes]
    private: bool = False
    gated: bool = False  # the token's account never accepted the conditions: every request is refused
    revisions: set[str] = field(default_factory=lambda: {"main"})

    @property
    def sha(self) -> str:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name])
        return digest.hexdigest()

    @staticmethod
    def oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # the git blob id the Hub reports


@dataclass
class HubState:
    token: str
    lfs_threshold: int = 10**12  # files at least this big are announced as LFS uploads
    repos: dict[str, dict] = field(default_factory=dict)
    branches: dict[str, set[str]] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    validated: list[dict] = field(default_factory=list)
    drop_next: int = 0  # close this many connections to drop_path without answering
    drop_path: str = "/api/repos/create"
    models: dict[str, HubModel] = field(default_factory=dict)
    datasets: dict[str, HubModel] = field(default_factory=dict)  # dataset repos (files at one commit, as models)
    ranges: list[str] = field(default_factory=list)  # Range headers of file downloads
    cut_file: str | None = None  # "repo/file" whose download is cut half way ...
    cut_next: int = 0  # ... this many times
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: dict | None = None) -> None:
            data = json.dumps(payload or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            state.auth_headers.append(auth)
            if auth != f"Bearer {state.token}":
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return False
            return True

        def _handle(self, method: str) -> None:
            body = self._body()
            with state.lock:
                state.requests.append(f"{method} {self.path}")
                if state.drop_next > 0 and self.path.startswith(state.drop_path):
                    state.drop_next -= 1
                    self.close_connection = True
                    self.connection.shutdown(2)  # drop without an answer
                    return
            if method in ("GET", "HEAD") and self._serve_download(method, self.path.split("?")[0]):
                return
            if self._serve_dataset(method, body):
                return
            if method == "PUT" and self.path.startswith("/lfs-upload/"):
                oid = self.path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._send(400, {"error": "sha256 mismatch"})
                state.lfs_objects[oid] = body
                return self._send(200)
            if not self._authorized():
                return
            path = self.path.split("?")[0]
            if method == "POST" and path == "/api/validate-yaml":
                content = json.loads(body)["content"]
                front = content.split("---")[1] if content.startswith("---") else ""
                try:
                    meta = yaml.safe_load(front) or {}
                except yaml.YAMLError as err:
                    return self._send(400, {"errors": [{"message": str(err)}]})
                state.validated.append(meta)
                return self._send(200, {"errors": [], "warnings": []})
            if method == "POST" and path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req.get('organization') or 'me'}/{req['name']}" if "/" not in req["name"] else req["name"]
                if repo_id in state.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": repo_id})
                state.repos[repo_id] = req
                state.branches[repo_id] = {"main"}
                return self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(branch|preupload|commit)/(.+))?", path)
            if match is None:
                match_lfs = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
                if match_lfs and method == "POST":
                    req = json.loads(body)
                    host = self.headers["Host"]
                    objects = [{"oid": o["oid"], "size": o["size"],
                                "actions": {"upload": {"href": f"http://{host}/lfs-upload/{o['oid']}"}}}
                               for o in req["objects"]]
                    return self._send(200, {"transfer": "basic", "objects": objects})
                return self._send(404, {"error": f"no route {method} {path}"})
            repo_id, action, rev = match.groups()
            if repo_id not in state.repos:
                return self._send(404, {"error": "Repository not found"})
            if action is None:
                return self._send(200, {"id": repo_id, "sha": "0" * 40, "private": state.repos[repo_id].get("private")})
            if action == "branch":
                state.branches[repo_id].add(rev)
                return self._send(200)
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(200, {"files": [
                    {"path": f["path"], "uploadMode": "lfs" if f["size"] >= state.lfs_threshold else "regular",
                     "shouldIgnore": False, "oid": None} for f in files], "commitOid": "0" * 40})
            if action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                commit = {"repo_id": repo_id, "revision": rev, "header": lines[0]["value"], "files": {}, "lfs": {}}
                for line in lines[1:]:
                    value = line["value"]
                    if line["key"] == "file":
                        commit["files"][value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        commit["lfs"][value["path"]] = value["oid"]
                state.commits.append(commit)
                oid = hashlib.sha1(body).hexdigest()
                host = self.headers["Host"]
                return self._send(200, {"commitUrl": f"http://{host}/{repo_id}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": None})
            return self._send(404, {"error": "unknown"})

        def _refuse(self, status: int, code: str, head: bool) -> bool:
            data = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            return True

        def _serve_download(self, method: str, path: str) -> bool:
            """Answer the download routes (True), or leave the request to the upload routes (False)."""
            head = method == "HEAD"
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if api is None and resolve is None:
                return False
            repo_id, rev = (api.group(1), api.group(3)) if api else (resolve.group(1), resolve.group(2))
            rev = unquote(rev)
            model = state.models.get(repo_id)
            if model is None and repo_id in state.repos:
                return False  # a repo created by an upload: its routes answer
            auth = self.headers.get("Authorization", "")
            state.auth_headers.append(auth)
            if model is None or (model.private and auth != f"Bearer {state.token}"):
                return self._refuse(401 if auth == "" else 404, "RepoNotFound", head)
            if model.gated:
                return self._refuse(403, "GatedRepo", head)
            if rev not in model.revisions and rev != model.sha:
                return self._refuse(404, "RevisionNotFound", head)
            if api is not None and api.group(2) == "revision":
                self._send(200, {"id": repo_id, "sha": model.sha, "private": model.private,
                                 "siblings": [{"rfilename": name} for name in sorted(model.files)]})
                return True
            if api is not None:
                self.send_response(200)
                data = json.dumps([{"type": "file", "path": name, "size": len(body), "oid": model.oid(body)}
                                   for name, body in sorted(model.files.items())]).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return True
            name = unquote(resolve.group(3))
            if name not in model.files:
                return self._refuse(404, "EntryNotFound", head)
            body = model.files[name]
            start = 0
            rng = self.headers.get("Range")
            if not head:
                state.ranges.append(rng or "")
            if rng:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            self.send_response(206 if rng else 200)
            self.send_header("X-Repo-Commit", model.sha)
            self.send_header("ETag", f'"{model.oid(body)}"')
            self.send_header("Content-Length", str(len(body) - start))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            if head:
                return True
            with state.lock:
                cut = state.cut_next > 0 and state.cut_file == f"{repo_id}/{name}"
                state.cut_next -= cut
            if cut:
                self.wfile.write(body[start:start + (len(body) - start) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the rest never comes
                return True
            self.wfile.write(body[start:])
            return True

        def _send_json(self, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve_dataset(self, method: str, body: bytes) -> bool:
            """The dataset-repo routes (True when answered): repo info, tree, paths-info, file downloads."""
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            api = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?", path)
            resolve = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if api is None and resolve is None:
                return False
            head = method == "HEAD"
            repo_id, rev = (api.group(1), api.group(3) or "main") if api else (resolve.group(1), resolve.group(2))
            repo = state.datasets.get(repo_id)
            auth = self.headers.get("Authorization", "")
            if repo is None or (repo.private and auth != f"Bearer {state.token}"):
                return self._refuse(401 if auth == "" else 404, "RepoNotFound", head)
            if rev not in repo.revisions and rev != repo.sha:
                return self._refuse(404, "RevisionNotFound", head)
            folders = sorted({str(parent) for name in repo.files for parent in PurePosixPath(name).parents} - {"."})

            def entry(name: str) -> dict:
                if name in repo.files:
                    return {"type": "file", "path": name, "size": len(repo.files[name]), "oid": repo.oid(repo.files[name])}
                return {"type": "directory", "path": name, "oid": "0" * 40}

            if api is not None and api.group(2) in (None, "revision"):
                self._send_json({"id": repo_id, "sha": repo.sha, "private": repo.private,
                                 "siblings": [{"rfilename": name} for name in sorted(repo.files)]})
            elif api is not None and api.group(2) == "tree":
                under = (api.group(4) or "").strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                names = [n for n in [*folders, *sorted(repo.files)] if not under or n.startswith(under + "/")]
                if not recursive:
                    names = [n for n in names if str(PurePosixPath(n).parent) == (under or ".")]
                self._send_json([entry(n) for n in names])
            elif api is not None and method == "POST":  # paths-info
                wanted = parse_qs(body.decode()).get("paths", [])
                self._send_json([entry(n) for n in wanted if n in repo.files or n in folders])
            elif resolve is not None:
                name = resolve.group(3)
                if name not in repo.files:
                    return self._refuse(404, "EntryNotFound", head)
                data = repo.files[name]
                self.send_response(200)
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{repo.oid(data)}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
            else:
                return False
            return True

        def do_HEAD(self) -> None:  # noqa: N802
            self._handle("HEAD")

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._handle("PUT")

    return Handler


class HubStandIn:
    """``with HubStandIn(token) as hub:`` serves on ``hub.url`` until the block ends."""

    def __init__(self, token: str) -> None:
        self.state = HubState(token)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
