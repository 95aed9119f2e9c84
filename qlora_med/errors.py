"""Errors the CLI reports as one clear message instead of a traceback."""


class QloraMedError(Exception):
    """Base class: the message names the file, the record or key, and the fix."""


class ConfigError(QloraMedError):
    """A recipe key, value or combination is invalid."""


class DataError(QloraMedError):
    """A dataset file or record is unusable."""
