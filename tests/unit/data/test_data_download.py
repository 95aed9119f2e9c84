"""``qlora-med data download`` against a local HTTP server on 127.0.0.1 serving tar.gz fixtures."""

from __future__ import annotations

import ftplib
import io
import json
import tarfile
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from qlora_med.cli import main as cli_main
from qlora_med.data.download import (
    DownloadConfig,
    ImageRequest,
    _is_retryable,
    download_images,
    read_url_list,
)
from qlora_med.errors import DataError

FAST = DownloadConfig(workers=2, retries=2, timeout=2.0, backoff=0.01, progress=False)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0  # seconds slept before answering


@dataclass
class Server:
    """Routes map a path to replies served in turn (the last one repeats); hits counts requests."""

    base: str = ""
    routes: dict[str, list[Reply]] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            with lock:
                n = state.hits[self.path]
                state.hits[self.path] += 1
            replies = state.routes.get(self.path, [Reply(404, b"not found")])
            reply = replies[min(n, len(replies) - 1)]
            time.sleep(reply.delay)
            try:
                self.send_response(reply.status)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            except OSError:
                pass  # client gave up (timeout test)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.timeout = 5
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def image_bytes(fmt: str, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    color = (200, 30, 60, 128)[: len(mode)] if mode in ("RGB", "RGBA") else 1200 if mode == "I;16" else 120
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def make_tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def write_urls(path: Path, records: list[tuple[str, str, str]]) -> Path:
    with path.open("w") as f:
        for pair_id, url, member in records:
            f.write(json.dumps({"pair_id": pair_id, "pmc_tar_url": url, "image_file_path": member}) + "\n")
    return path


def reqs(*records: tuple[str, str, str]) -> list[ImageRequest]:
    return [ImageRequest(*r) for r in records]


def is_jpeg(path: Path) -> bool:
    with Image.open(path) as im:
        im.load()
        return im.format == "JPEG"


def test_package_with_two_figures_is_fetched_once(server: Server, tmp_path: Path) -> None:
    server.routes["/PMC1.tar.gz"] = [
        Reply(
            body=make_tar_gz(
                {"PMC1/fig1.jpg": image_bytes("JPEG"), "PMC1/fig2.png": image_bytes("PNG", mode="RGBA")}
            )
        )
    ]
    url = server.url("/PMC1.tar.gz")
    summary = download_images(
        reqs(("111_F1", url, "PMC1/fig1.jpg"), ("111_F2", url, "./PMC1/fig2.png")), tmp_path / "img", FAST
    )
    assert (summary.done, summary.skipped, summary.failed, summary.packages_fetched) == (2, 0, 0, 1)
    assert server.hits["/PMC1.tar.gz"] == 1
    assert is_jpeg(tmp_path / "img/111_F1.jpg") and is_jpeg(tmp_path / "img/111_F2.jpg")  # PNG converted
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        "111_F1.jpg",
        "111_F2.jpg",
    ]  # no temp left


def test_tiff_and_gif_are_converted(server: Server, tmp_path: Path) -> None:
    pkg = {"a.tif": image_bytes("TIFF", mode="I;16"), "b.gif": image_bytes("GIF", mode="P")}
    server.routes["/p.tar.gz"] = [Reply(body=make_tar_gz(pkg))]
    url = server.url("/p.tar.gz")
    summary = download_images(reqs(("t", url, "a.tif"), ("g", url, "b.gif")), tmp_path, FAST)
    assert summary.done == 2 and is_jpeg(tmp_path / "t.jpg") and is_jpeg(tmp_path / "g.jpg")


def test_broken_archive_and_404_fail_without_retry(server: Server, tmp_path: Path) -> None:
    good = make_tar_gz({"x.jpg": image_bytes("JPEG")})
    server.routes["/broken.tar.gz"] = [Reply(body=good[: len(good) // 2])]
    server.routes["/garbage.tar.gz"] = [Reply(body=b"<html>not a tarball</html>")]
    failures = tmp_path / "failures.jsonl"
    summary = download_images(
        reqs(
            ("b", server.url("/broken.tar.gz"), "x.jpg"),
            ("g", server.url("/garbage.tar.gz"), "x.jpg"),
            ("m", server.url("/missing.tar.gz"), "x.jpg"),
        ),
        tmp_path / "img",
        FAST,
        failures_path=failures,
    )
    assert (summary.done, summary.failed) == (0, 3)
    assert server.hits == Counter({"/broken.tar.gz": 1, "/garbage.tar.gz": 1, "/missing.tar.gz": 1})
    report = {r["pair_id"]: r for r in map(json.loads, failures.read_text().splitlines())}
    assert set(report) == {"b", "g", "m"} and set(report["m"]) == {"pair_id", "url", "reason"}
    assert "broken archive" in report["b"]["reason"] and "broken archive" in report["g"]["reason"]
    assert "404" in report["m"]["reason"] and report["m"]["url"] == server.url("/missing.tar.gz")


def test_slow_response_and_5xx_are_retried(server: Server, tmp_path: Path) -> None:
    body = make_tar_gz({"f.jpg": image_bytes("JPEG")})
    server.routes["/slow.tar.gz"] = [Reply(body=body, delay=0.6), Reply(body=body)]
    server.routes["/flaky.tar.gz"] = [Reply(503), Reply(502), Reply(body=body)]
    cfg = DownloadConfig(workers=2, retries=2, timeout=0.2, backoff=0.01, progress=False)
    summary = download_images(
        reqs(("s", server.url("/slow.tar.gz"), "f.jpg"), ("f", server.url("/flaky.tar.gz"), "f.jpg")),
        tmp_path,
        cfg,
    )
    assert (summary.done, summary.failed) == (2, 0), summary.failures
    assert server.hits["/slow.tar.gz"] == 2 and server.hits["/flaky.tar.gz"] == 3


def test_retries_are_bounded(server: Server, tmp_path: Path) -> None:
    server.routes["/down.tar.gz"] = [Reply(500)]
    summary = download_images(reqs(("d", server.url("/down.tar.gz"), "f.jpg")), tmp_path, FAST)
    assert summary.failed == 1 and "HTTP 500" in summary.failures[0].reason
    assert server.hits["/down.tar.gz"] == FAST.retries + 1


def test_unsafe_and_non_image_members_are_refused(server: Server, tmp_path: Path) -> None:
    pkg = make_tar_gz(
        {
            "../evil.jpg": image_bytes("JPEG"),
            "/abs.jpg": image_bytes("JPEG"),
            "PMC2/notes.jpg": b"this is a text file, not a JPEG\n",
            "PMC2/good.jpg": image_bytes("JPEG"),
        },
        links={"PMC2/link.jpg": "../../../etc/passwd"},
    )
    server.routes["/PMC2.tar.gz"] = [Reply(body=pkg)]
    url = server.url("/PMC2.tar.gz")
    out = tmp_path / "a" / "img"
    summary = download_images(
        reqs(
            ("trav", url, "../evil.jpg"),
            ("abs", url, "/abs.jpg"),
            ("text", url, "PMC2/notes.jpg"),
            ("link", url, "PMC2/link.jpg"),
            ("gone", url, "PMC2/nope.jpg"),
            ("good", url, "PMC2/good.jpg"),
        ),
        out,
        FAST,
    )
    reasons = {f.pair_id: f.reason for f in summary.failures}
    assert summary.done == 1 and (out / "good.jpg").exists()
    assert "unsafe" in reasons["trav"] and "unsafe" in reasons["abs"]
    assert (
        "not an image" in reasons["text"]
        and "link" in reasons["link"]
        and "not in package" in reasons["gone"]
    )
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["good.jpg"]


def test_resume_skips_everything(server: Server, tmp_path: Path) -> None:
    server.routes["/PMC3.tar.gz"] = [
        Reply(body=make_tar_gz({"a.jpg": image_bytes("JPEG"), "b.jpg": image_bytes("JPEG")}))
    ]
    url = server.url("/PMC3.tar.gz")
    urls = write_urls(tmp_path / "urls.jsonl", [("p1", url, "a.jpg"), ("p2", url, "b.jpg")])
    out = tmp_path / "img"
    args = ["data", "download", "--urls", str(urls), "--out", str(out), "--backoff", "0.01", "--no-progress"]
    assert cli_main(args) == 0
    assert server.hits["/PMC3.tar.gz"] == 1
    requests, _ = read_url_list(urls)
    summary = download_images(requests, out, FAST)
    assert (summary.done, summary.skipped, summary.packages_fetched) == (0, 2, 0)
    assert server.hits["/PMC3.tar.gz"] == 1
    (out / "p2.jpg").write_bytes(b"truncated")  # a corrupt output is fetched again
    summary = download_images(requests, out, FAST)
    assert (
        (summary.done, summary.skipped) == (1, 1)
        and server.hits["/PMC3.tar.gz"] == 2
        and is_jpeg(out / "p2.jpg")
    )


def test_cli_exit_code_summary_and_file_url(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = tmp_path / "mirror" / "PMC4.tar.gz"
    local.parent.mkdir()
    local.write_bytes(make_tar_gz({"PMC4/f.png": image_bytes("PNG")}))
    urls = write_urls(
        tmp_path / "urls.jsonl",
        [("ok", local.as_uri(), "PMC4/f.png"), ("bad", server.url("/nothing.tar.gz"), "f.jpg")],
    )
    out = tmp_path / "img"
    with caplog.at_level("INFO"):
        rc = cli_main(["data", "download", "--urls", str(urls), "--out", str(out), "--no-progress"])
    assert rc == 1
    assert "done 1 / skipped 0 / failed 1" in caplog.text
    assert [json.loads(x)["pair_id"] for x in (out / "failures.jsonl").read_text().splitlines()] == ["bad"]
    assert is_jpeg(out / "ok.jpg")


def test_bad_lines(tmp_path: Path) -> None:
    urls = tmp_path / "urls.jsonl"
    good = json.dumps({"pair_id": "a", "pmc_tar_url": "http://127.0.0.1/x", "image_file_path": "f.jpg"})
    urls.write_text(
        good
        + "\n\n{not json\n"
        + json.dumps({"pair_id": "../x", "pmc_tar_url": "u", "image_file_path": "f"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"urls\.jsonl:3: bad record"):
        read_url_list(urls)
    requests, bad = read_url_list(urls, skip_bad_lines=True)
    assert [r.pair_id for r in requests] == ["a"] and bad == 2
    assert cli_main(["data", "download", "--urls", str(urls), "--out", str(tmp_path / "o")]) == 1  # DataError


def test_retry_classification() -> None:
    assert _is_retryable(TimeoutError()) and _is_retryable(ConnectionResetError())
    assert _is_retryable(urllib.error.URLError(TimeoutError("timed out")))
    assert not _is_retryable(urllib.error.URLError(FileNotFoundError(2, "no such file")))
    assert not _is_retryable(urllib.error.URLError("unknown url type: gopher"))
    perm = urllib.error.URLError("ftp error")
    perm.__cause__ = ftplib.error_perm("550 No such file")
    temp = urllib.error.URLError("ftp error")
    temp.__cause__ = ftplib.error_temp("421 Too many users")
    assert not _is_retryable(perm) and _is_retryable(temp)
    for code, expected in ((404, False), (403, False), (429, True), (500, True), (503, True)):
        assert _is_retryable(urllib.error.HTTPError("u", code, "x", None, None)) is expected  # type: ignore[arg-type]
