"""README blocks that are verbatim copies of a bench output file, so that the README's numbers are what the bench
printed.

A block is the text between ``<!-- copy of PATH -->`` and ``<!-- end of PATH -->`` lines, PATH relative to the
README's folder. ``qlora-med bench --readme README.md`` refreshes the blocks of the files that run wrote; a test checks
every block of the project's README against its file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qlora_med.errors import ConfigError
from qlora_med.io import atomic_write_text

BLOCK = re.compile(r"^<!-- copy of (?P<path>\S+) -->\n(?P<body>.*?)^<!-- end of (?P=path) -->$", re.M | re.S)


def blocks(text: str) -> dict[str, str]:
    """PATH -> the block's text, for every copied block in a README's ``text``."""
    return {m["path"]: m["body"] for m in BLOCK.finditer(text)}


def _matching(readme: Path, sources: list[Path]) -> tuple[str, dict[str, Path]]:
    """The README's text and PATH -> source for the sources it has blocks for; ConfigError (one line) if none."""
    try:
        text = readme.read_text()
    except OSError as err:
        raise ConfigError(f"bench --readme {readme}: cannot read it ({err.strerror})") from None
    relative = {os.path.relpath(s.resolve(), readme.resolve().parent): s for s in sources}
    found = {p: relative[p] for p in blocks(text) if p in relative}
    if not found:
        markers = " or ".join(f"'<!-- copy of {p} -->'" for p in relative)
        raise ConfigError(f"bench --readme {readme}: no block to refresh; add {markers} and a matching "
                          "'<!-- end of PATH -->' line where the table belongs")  # fmt: skip
    return text, found


def check(readme: Path, sources: list[Path]) -> None:
    """Before a long run: raise ConfigError unless ``readme`` has a block for one of ``sources``."""
    _matching(readme, sources)


def refresh(readme: Path, sources: list[Path]) -> list[str]:
    """Replace the README blocks of ``sources`` with their files' text (atomically); returns the refreshed PATHs."""
    text, found = _matching(readme, sources)

    def body(match: re.Match) -> str:
        if match["path"] not in found:
            return match[0]
        new = found[match["path"]].read_text().rstrip("\n")
        return f"<!-- copy of {match['path']} -->\n{new}\n<!-- end of {match['path']} -->"

    atomic_write_text(readme, BLOCK.sub(body, text))
    return list(found)
