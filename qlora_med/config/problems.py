"""How recipe problems are reported: every problem found, at once, one per line.

Checks append messages to a list and call :func:`raise_problems` at the end, so a recipe with three
mistakes names all three. A single problem reads as a plain message (``<where>: <message>``).
"""

from __future__ import annotations

from collections.abc import Sequence

from qlora_med.errors import ConfigError


class RecipeProblems(ConfigError):
    """One or more independent recipe problems; ``problems`` holds each message."""

    def __init__(self, problems: Sequence[str], where: str | None = None) -> None:
        self.problems = list(problems)
        head = f"{where}: " if where else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            message = f"{head}{len(self.problems)} problems:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


def problems_of(err: ConfigError) -> list[str]:
    """The separate messages an error carries (one for a plain ConfigError)."""
    return list(err.problems) if isinstance(err, RecipeProblems) else [str(err)]


def raise_problems(problems: Sequence[str], where: str | None = None) -> None:
    """Raise one :class:`RecipeProblems` listing ``problems``, if there are any."""
    if problems:
        raise RecipeProblems(problems, where)
