"""One server per job database: an exclusive flock on a side file holding the owner's pid.

SQLite's own locks are taken per transaction, so two servers on one database (say `-L
127.0.0.1 4740` and `-L ::1 4740` started from one directory) both open it, take turns writing
and then fail on each other's record ids (`UNIQUE constraint failed`), and a job finished on
one server runs again after a restart of the other. The lock is an flock(2) held for the life
of the store on `jobserver-<port>.lock` beside the database, not on the database itself:
the database file is replaced when the server rewrites it after it was deleted (sqlite.py),
and a lock on a file that is replaced would lock nothing. flock is released by the kernel when
the process dies, so a SIGKILLed server leaves no stale lock, only a stale pid in the file,
which is read only while someone holds the lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from . import StoreError

log = logging.getLogger(__name__)

LOCK_ATTEMPTS = 3
"""Tries to take a lock whose file is deleted or replaced between our open and our flock (an
owner unlinks it as it stops). More than one such race in a row means the file keeps
changing under us; we say so rather than loop."""


def lock_path(database: Path) -> Path:
    """`jobserver-<port>.lock` beside `jobserver-<port>.sqlite3`."""
    return database.with_suffix(".lock")


class StoreLock:
    """An exclusive lock on a database, held from `acquire` to `release`."""

    def __init__(self, path: Path, database: Path, fd: int) -> None:
        self.path = path
        self.database = database
        self._fd = fd
        self._identity = _identity(os.fstat(fd))

    @classmethod
    def acquire(cls, database: Path) -> StoreLock:
        """Lock `database` for this process, or raise StoreError naming the database and the
        pid of the server that holds it."""
        path = lock_path(database)
        for _ in range(LOCK_ATTEMPTS):
            fd = _open_and_lock(path, database)
            if fd is not None:
                return cls(path, database, fd)
        raise StoreError(
            f"cannot lock job database {database}: its lock file {path} keeps changing"
        )

    def check(self) -> None:
        """Take the lock again if its file was deleted or replaced (say, by clearing the data
        directory): otherwise a second server could start on the database. One stat; called
        once per commit."""
        try:
            if _identity(os.stat(self.path)) == self._identity:
                return
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("cannot check lock file %s: %s", self.path, error.strerror)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = _open_and_lock(self.path, self.database)
        except (OSError, StoreError) as error:
            # Someone started on the database since its lock file went: we cannot stop them
            # from here, but the operator must hear of it.
            log.error("lock file %s was deleted and cannot be taken again: %s", self.path, error)
            return
        if fd is None:
            return  # changed again under us: the next commit looks again
        os.close(self._fd)
        self._fd = fd
        self._identity = _identity(os.fstat(fd))
        log.warning("lock file %s was deleted or replaced; locked it again", self.path)

    def release(self) -> None:
        """Unlink the lock file, then unlock. Unlinking while still holding it is safe: a
        server that opened the old file and then locks it sees that the path no longer names
        it, and tries again (`_open_and_lock`)."""
        if self._fd < 0:
            return
        try:
            if _identity(os.stat(self.path)) == self._identity:
                self.path.unlink()
        except OSError:
            pass  # gone already, or the directory is read-only now: the flock goes anyway
        os.close(self._fd)
        self._fd = -1


def _open_and_lock(path: Path, database: Path) -> int | None:
    """The locked file descriptor with our pid written in it; None if the file was replaced
    while we locked it (try again); StoreError if another process holds the lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise StoreError(
            f"cannot write job database {database}: cannot open its lock file {path}: "
            f"{error.strerror}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            raise StoreError(
                f"job database {database} is in use by another jobserver (pid {holder}, "
                f"which holds {path}); stop it, or give this one another port or --data-dir"
            ) from None
        try:
            same = _identity(os.stat(path)) == _identity(os.fstat(fd))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_pid(fd: int) -> str:
    """The holder's pid as it wrote it, or "unknown" (it has locked but not yet written)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino
