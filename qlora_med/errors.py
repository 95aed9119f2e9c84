"""Errors the CLI reports as one clear message instead of a traceback."""


class QloraMedError(Exception):
    """Base class: the message names the file, the record or key, and the fix."""


class ConfigError(QloraMedError):
    """A recipe key, value or combination is invalid."""


class DataError(QloraMedError):
    """A dataset file or record is unusable."""


def describe_failure(err: BaseException) -> str:
    """One line for an unexpected failure: what the OS or library said, named plainly, and what to do."""
    import errno
    import shutil

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {err.filename}" if err.filename else ""
        return (f"no space left on device{where}: free some space and run the same command again (files are "
                "written atomically, so earlier checkpoints and outputs are intact)")
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{err.strerror}: {err.filename or 'a file'}: choose a writable output folder or fix its permissions"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, RuntimeError) and ("PytorchStreamWriter failed writing" in text or "file write failed" in text):
        free = shutil.disk_usage(".").free / 2**30
        return (f"could not write a file ({text[:160]}): the disk is probably full ({free:.1f} GiB free here); "
                "free some space and run again (earlier checkpoints are intact)")
    return f"{type(err).__name__}: {text[:300]} (run with -v for the traceback)"
