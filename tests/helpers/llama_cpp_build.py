"""A pinned llama.cpp for the GGUF tests, built from the ``llama-cpp-python`` sdist on PyPI.

The sdist vendors llama.cpp under ``vendor/llama.cpp``; only that folder is extracted and only the CLI
tools the tests run are built (CPU, Release, static, ``GGML_NATIVE=OFF`` so a cached build runs on any
x86-64 / arm64 CI machine). The result lives in ``.cache/llama.cpp-<version>/bin/`` with a
``build.json`` stamp (version, sdist sha256, CMake flags, targets, CPU architecture): the build is skipped while the stamp
matches and every binary exists, so changing a flag or a target rebuilds. Run it with::

    make llama-cpp            # or: .venv/bin/python tests/helpers/llama_cpp_build.py [--force]

Tests call :func:`binary`, which skips (naming that command) when the build is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CACHE = ROOT / ".cache" / f"llama.cpp-{VERSION}"
BIN = CACHE / "bin"
STAMP = CACHE / "build.json"
BUILD_COMMAND = "make llama-cpp"
# llama-tokenize: token ids; llama-debug: last-position logits (--save-logits); llama-simple: greedy
# decoding; llama-mtmd-cli: image + prompt through the mmproj
TARGETS = ("llama-tokenize", "llama-debug", "llama-simple", "llama-mtmd-cli")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: bin/ is all the cache needs
    "-DGGML_NATIVE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no downloads (LLAMA_CURL is deprecated in this llama.cpp, OpenSSL replaced it)
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    f"-DLLAMA_BUILD_COMMIT=llama-cpp-python-{VERSION}",
)


def _config() -> dict:
    return {
        "version": VERSION,
        "sdist_sha256": SDIST_SHA256,
        "flags": list(CMAKE_FLAGS),
        "targets": list(TARGETS),
        "machine": platform.machine(),  # a cache restored on another architecture rebuilds
    }


def ready() -> bool:
    """True when the cached build matches this file's version, flags and targets."""
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return {k: stamp.get(k) for k in _config()} == _config() and all((BIN / t).is_file() for t in TARGETS)


def binary(name: str) -> Path:
    """Path of a built llama.cpp tool; skips the calling test when the build is missing."""
    import pytest

    if name not in TARGETS:
        raise ValueError(f"{name} is not one of the built targets {TARGETS}")
    if not ready():
        pytest.skip(f"llama.cpp {VERSION} tools not built in {CACHE} (run `{BUILD_COMMAND}`)")
    return BIN / name


def _log(message: str) -> None:
    sys.stderr.write(f"[llama.cpp {VERSION}] {message}\n")
    sys.stderr.flush()


def _download(work: Path) -> Path:
    requirement = work / "requirements.txt"
    requirement.write_text(f"llama-cpp-python=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--require-hashes",
            "-r",
            str(requirement),
            "-d",
            str(work),
        ],
        check=True,
    )
    (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{sdist.name}: sha256 {digest} != pinned {SDIST_SHA256}")
    return sdist


def _extract(sdist: Path, dest: Path) -> Path:
    """Extract ``vendor/llama.cpp`` only (the sdist's own .git, docs and bindings stay packed)."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len(prefix) :]
        members = [m for m in members if m.name]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
        tar.extractall(dest, members=members, **safe)
    return dest


def _run(cmd: list[str], env: dict, log: Path) -> None:
    """Run a build step, its output appended to ``log``; on failure show the log's tail."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}); full log: {log}")


def build(force: bool = False, jobs: int = 2) -> Path:
    """Download, extract, configure and build :data:`TARGETS` into :data:`BIN` (no-op when :func:`ready`)."""
    if ready() and not force:
        _log(f"cached: {BIN} ({', '.join(TARGETS)})")
        return BIN
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"{tool} not found: install cmake and a C++ compiler (apt-get install cmake g++)"
            )
    CACHE.mkdir(parents=True, exist_ok=True)
    start, log = time.time(), CACHE / "build.log"
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="work-") as tmp:
        work = Path(tmp)
        _log("downloading the llama-cpp-python sdist from PyPI")
        src = _extract(_download(work), work / "src")
        # the source sits inside this repository's work tree: keep build-info.cmake's `git` out of it
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(work)}
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _log(f"configuring ({time.time() - start:.0f} s)")
        _run(["cmake", "-S", str(src), "-B", str(work / "build"), *generator, *CMAKE_FLAGS], env, log)
        _log(f"building {', '.join(TARGETS)} with -j{jobs} ({time.time() - start:.0f} s)")
        _run(
            [
                "cmake",
                "--build",
                str(work / "build"),
                "--config",
                "Release",
                "-j",
                str(jobs),
                "--target",
                *TARGETS,
            ],
            env,
            log,
        )
        shutil.rmtree(BIN, ignore_errors=True)
        BIN.mkdir()
        for target in TARGETS:
            shutil.copy2(work / "build" / "bin" / target, BIN / target)
    STAMP.write_text(
        json.dumps({**_config(), "build_seconds": round(time.time() - start, 1)}, indent=1) + "\n"
    )
    _log(f"built in {time.time() - start:.0f} s: {BIN}")
    return BIN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is complete")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = parser.parse_args(argv)
    build(force=args.force, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
