"""Download LLaVA-Med figures from PubMed Central open-access packages.

Input is ``llava_med_image_urls.jsonl`` (records ``pair_id``, ``pmc_tar_url``, ``image_file_path``).
Records are grouped by package so each ``.tar.gz`` is fetched once; the package is streamed to a temp
file, the needed members are checked (safe path, regular file, decodable image) and written to
``<out>/<pair_id>.jpg`` atomically. Runs are resumable: valid existing outputs are skipped.
"""

from __future__ import annotations

import ftplib
import http.client
import io
import json
import logging
import os
import random
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from qlora_med import __version__
from qlora_med.errors import DataError

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "TIFF", "GIF", "BMP", "WEBP")  # the JPEG plugin also yields MPO
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error)
PARTIAL_DIR = ".partial"
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """One figure to fetch: save member ``member`` of package ``url`` as ``<pair_id>.jpg``."""

    pair_id: str
    url: str
    member: str


@dataclass(frozen=True, slots=True)
class Failure:
    """A figure that could not be saved, and why (one line of the failure report)."""

    pair_id: str
    url: str
    reason: str


@dataclass
class DownloadConfig:
    """How to fetch: parallelism, retry policy and limits."""

    workers: int = 4  # packages fetched in parallel
    retries: int = 3  # extra attempts after the first, for transient errors only
    timeout: float = 60.0  # seconds per socket operation (connect / each read)
    backoff: float = 2.0  # first retry waits ~backoff s, then doubles (with jitter), capped at 60 s
    max_member_bytes: int = 256 << 20  # refuse larger archive members
    jpeg_quality: int = 95
    progress: bool | None = None  # tqdm bar; None = only on a terminal

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise DataError(f"workers must be >= 1, got {self.workers}")
        if self.retries < 0:
            raise DataError(f"retries must be >= 0, got {self.retries}")
        if self.timeout <= 0:
            raise DataError(f"timeout must be > 0, got {self.timeout}")


@dataclass
class DownloadSummary:
    """Counts per figure (``done`` + ``skipped`` + ``failed`` = requested) and the failures."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    packages_fetched: int = 0
    bad_lines: int = 0
    wall_time_s: float = 0.0
    failures: list[Failure] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"done {self.done} / skipped {self.skipped} / failed {self.failed} "
            f"({self.packages_fetched} packages fetched, {self.bad_lines} bad lines skipped, "
            f"{self.wall_time_s:.1f}s)"
        )


class _FetchError(Exception):
    """A package could not be fetched; ``retryable`` says whether trying again may help."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


def _is_safe_relpath(path: str) -> bool:
    if not path or "\x00" in path or path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return False
    return ".." not in PurePosixPath(path.replace("\\", "/")).parts


def _normalize(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def read_url_list(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[ImageRequest], int]:
    """Parse the URL list; returns the requests (first occurrence of each pair_id) and bad-line count.

    A malformed line raises :class:`DataError` naming the file and line, unless ``skip_bad_lines``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: URL list not found")
    requests: list[ImageRequest] = []
    seen: set[str] = set()
    bad = duplicates = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                pair_id, url, member = (rec.get(k) for k in ("pair_id", "pmc_tar_url", "image_file_path"))
                for key, value in (("pair_id", pair_id), ("pmc_tar_url", url), ("image_file_path", member)):
                    if not isinstance(value, str) or not value:
                        raise ValueError(f"missing or empty {key!r}")
                if "/" in pair_id or "\\" in pair_id or pair_id in (".", "..") or "\x00" in pair_id:
                    raise ValueError(f"pair_id {pair_id!r} is not a plain file name")
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                if not skip_bad_lines:
                    raise DataError(
                        f"{path}:{lineno}: bad record ({err}); expected "
                        '{"pair_id", "pmc_tar_url", "image_file_path"} (or pass --skip-bad-lines)'
                    ) from None
                logger.warning("%s:%d: skipping bad record (%s)", path, lineno, err)
                bad += 1
                continue
            if pair_id in seen:
                duplicates += 1
                continue
            seen.add(pair_id)
            requests.append(ImageRequest(pair_id, url, member))
    if duplicates:
        logger.warning("%s: %d duplicate pair_id lines ignored (first one kept)", path, duplicates)
    return requests, bad


def group_by_package(requests: Iterable[ImageRequest]) -> dict[str, list[ImageRequest]]:
    """Group requests by package URL, keeping input order."""
    groups: dict[str, list[ImageRequest]] = {}
    for req in requests:
        groups.setdefault(req.url, []).append(req)
    return groups


def is_valid_image(path: Path) -> bool:
    """True if ``path`` exists and PIL can open and verify it."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _is_retryable(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code in (408, 429)
    if isinstance(err, urllib.error.URLError):
        cause = err.__cause__ if err.__cause__ is not None else err.reason
        if isinstance(cause, ftplib.error_perm):  # FTP 5xx: no such file, permission denied
            return False
        if isinstance(cause, BaseException):
            return _is_retryable(cause)
        return False  # e.g. "unknown url type"
    if isinstance(err, ftplib.error_temp | EOFError | http.client.HTTPException | TimeoutError):
        return True
    if isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    return isinstance(err, OSError)  # connection reset / refused, network unreachable, DNS


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return (
            f"{type(err.reason).__name__}: {err.reason}"
            if isinstance(err.reason, BaseException)
            else str(err.reason)
        )
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def fetch_to_file(url: str, dest: Path, timeout: float) -> int:
    """Stream ``url`` (http, https, ftp or file) into ``dest``; returns bytes written."""
    req = urllib.request.Request(url, headers={"User-Agent": f"qlora-med/{__version__}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, dest.open("wb") as out:
        shutil.copyfileobj(resp, out, _CHUNK)
        written = out.tell()
        expected = resp.headers.get("Content-Length") if resp.headers else None
    if expected is not None and expected.isdigit() and int(expected) != written:
        raise http.client.IncompleteRead(b"", int(expected) - written)
    return written


def fetch_with_retries(
    url: str, dest: Path, cfg: DownloadConfig, sleep: Callable[[float], None] = time.sleep
) -> int:
    """:func:`fetch_to_file` with exponential backoff on transient errors; raises :class:`_FetchError`."""
    for attempt in range(cfg.retries + 1):
        try:
            return fetch_to_file(url, dest, cfg.timeout)
        except Exception as err:  # classified below
            reason, retryable = _describe(err), _is_retryable(err)
            if not retryable or attempt == cfg.retries:
                suffix = f" after {attempt + 1} attempts" if attempt else ""
                raise _FetchError(reason + suffix, retryable) from err
            delay = min(60.0, cfg.backoff * 2**attempt) * (0.5 + random.random() / 2)
            logger.debug("%s: %s; retry %d/%d in %.2fs", url, reason, attempt + 1, cfg.retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def _find_member(members: dict[str, tarfile.TarInfo], wanted: str) -> tarfile.TarInfo | None:
    member = members.get(wanted)
    if member is None:  # tolerate a missing/extra top-level folder: unique suffix match
        hits = [m for n, m in members.items() if n.endswith("/" + wanted) or wanted.endswith("/" + n)]
        member = hits[0] if len(hits) == 1 else None
    return member


def _to_jpeg_bytes(data: bytes, quality: int) -> bytes:
    """Check that ``data`` is a decodable image; return JPEG bytes (JPEG input is kept as is)."""
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
        im.verify()
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
        im.load()  # full decode: catches truncated files that verify() lets through
        if im.format in ("JPEG", "MPO"):
            return data
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float TIFF: rescale to 8 bit
            im = im.convert("F")
            lo, hi = im.getextrema()
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            im = im.point(lambda v: (v - lo) * scale).convert("L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        elif im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _write_atomic(data: bytes, dest: Path, partial_dir: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{dest.stem}.", suffix=".tmp", dir=partial_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def extract_figures(
    archive: Path, requests: list[ImageRequest], out_dir: Path, cfg: DownloadConfig
) -> list[Failure]:
    """Write each requested member of ``archive`` to ``<out_dir>/<pair_id>.jpg``; returns failures."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (*_ARCHIVE_ERRORS, OSError) as err:
        return [Failure(r.pair_id, r.url, f"broken archive: {_describe(err)}") for r in requests]
    with tar:
        try:
            members = {_normalize(m.name): m for m in tar.getmembers()}
        except (*_ARCHIVE_ERRORS, OSError) as err:
            return [Failure(r.pair_id, r.url, f"broken archive: {_describe(err)}") for r in requests]
        failures = []
        for req in requests:
            reason = _extract_one(tar, members, req, out_dir, cfg)
            if reason is not None:
                failures.append(Failure(req.pair_id, req.url, reason))
        return failures


def _extract_one(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    req: ImageRequest,
    out_dir: Path,
    cfg: DownloadConfig,
) -> str | None:
    """Save one member; returns the failure reason, or None on success."""
    wanted = _normalize(req.member)
    if not _is_safe_relpath(wanted):
        return f"unsafe member path {req.member!r} (absolute or '..')"
    member = _find_member(members, wanted)
    if member is None:
        return f"member {req.member!r} not in package"
    if not _is_safe_relpath(_normalize(member.name)):
        return f"unsafe member path {member.name!r} (absolute or '..')"
    if not member.isreg():
        kind = "link" if member.issym() or member.islnk() else "device, fifo or directory"
        return f"member {member.name!r} is a {kind}, not a regular file"
    if member.size > cfg.max_member_bytes:
        return f"member {member.name!r} too large ({member.size} bytes)"
    try:
        fobj = tar.extractfile(member)
        data = fobj.read() if fobj is not None else b""
    except (*_ARCHIVE_ERRORS, OSError) as err:
        return f"broken archive: {_describe(err)}"
    try:
        jpeg = _to_jpeg_bytes(data, cfg.jpeg_quality)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"not an image: {member.name!r} ({_describe(err)})"
    try:
        _write_atomic(jpeg, out_dir / f"{req.pair_id}.jpg", out_dir / PARTIAL_DIR)
    except OSError as err:
        return f"cannot write output: {_describe(err)}"
    return None


def _process_package(
    url: str, requests: list[ImageRequest], out_dir: Path, cfg: DownloadConfig
) -> tuple[int, int, list[Failure], bool]:
    """Fetch one package if any of its figures is missing; returns (done, skipped, failures, fetched)."""
    todo = [r for r in requests if not is_valid_image(out_dir / f"{r.pair_id}.jpg")]
    skipped = len(requests) - len(todo)
    if not todo:
        return 0, skipped, [], False
    fd, tmp_name = tempfile.mkstemp(suffix=".tar.gz", dir=out_dir / PARTIAL_DIR)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            size = fetch_with_retries(url, tmp, cfg)
        except _FetchError as err:
            return 0, skipped, [Failure(r.pair_id, url, str(err)) for r in todo], False
        logger.debug("%s: %d bytes", url, size)
        failures = extract_figures(tmp, todo, out_dir, cfg)
        return len(todo) - len(failures), skipped, failures, True
    finally:
        tmp.unlink(missing_ok=True)


def download_images(
    requests: list[ImageRequest],
    out_dir: str | Path,
    cfg: DownloadConfig | None = None,
    failures_path: str | Path | None = None,
) -> DownloadSummary:
    """Download all ``requests`` into ``out_dir``; writes the failure report (JSONL) if a path is given."""
    cfg = cfg or DownloadConfig()
    out_dir = Path(out_dir)
    (out_dir / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    groups = group_by_package(requests)
    logger.info("%d figures from %d packages -> %s", len(requests), len(groups), out_dir)
    summary = DownloadSummary()
    start = time.perf_counter()
    report = Path(failures_path).open("w", encoding="utf-8") if failures_path else None
    try:
        with (
            ThreadPoolExecutor(max_workers=cfg.workers) as pool,
            tqdm(
                total=len(requests), unit="fig", disable=None if cfg.progress is None else not cfg.progress
            ) as bar,
        ):
            futures = {
                pool.submit(_process_package, url, reqs, out_dir, cfg): url for url, reqs in groups.items()
            }
            for fut in as_completed(futures):
                done, skipped, failures, fetched = fut.result()
                summary.done += done
                summary.skipped += skipped
                summary.failed += len(failures)
                summary.packages_fetched += int(fetched)
                summary.failures.extend(failures)
                for failure in failures:
                    logger.debug("failed %s: %s", failure.pair_id, failure.reason)
                    if report is not None:
                        report.write(json.dumps(asdict(failure), ensure_ascii=False) + "\n")
                if report is not None and failures:
                    report.flush()
                bar.update(done + skipped + len(failures))
                bar.set_postfix(
                    done=summary.done, skipped=summary.skipped, failed=summary.failed, refresh=False
                )
    finally:
        if report is not None:
            report.close()
        try:
            (out_dir / PARTIAL_DIR).rmdir()
        except OSError:
            pass  # not empty: another run is using it
    summary.wall_time_s = time.perf_counter() - start
    return summary
