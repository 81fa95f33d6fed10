"""One process at a time in a folder: an exclusive ``flock`` on ``<folder>/.lock``, held while
the process works there, with its pid inside for the message another process gets."""

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmstrain.errors import RunError, UserError

LOCK = ".lock"


@contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock; raise :class:`UserError` naming the holder's pid when another
    process holds it (``what`` names that process in the message, e.g. "sweep"), and
    :class:`RunError` when the lock file cannot be created (a read-only or full disk)."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode().strip() or "unknown"
            raise UserError(f"{folder} is in use by another {what} (pid {holder}); wait for it "
                            "to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
