"""Disk space set aside so that finished jobs can always be removed from a full disk.

Removing a job writes too: WAL frames, and at the next checkpoint the pages the WAL holds. On a
disk filled by queued jobs, SQLite could then neither checkpoint nor append to the WAL, so
removes failed, the queue drained in memory but not on disk, no submit was accepted again, and
every drained job came back at the next start. So the store keeps a preallocated file,
`jobserver-<port>.reserve`, beside its database. When a write fails for want of space the file
is deleted (its blocks are free at once), submits are refused, and removes go on in the space
it held. Once enough space is free again (removes free pages; the store gives them back to the
file system, sqlite.py) the file is allocated again and submits are accepted: the server
recovers by itself, without a restart.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

RESERVE_BYTES = 8 * 1024 * 1024
"""The reserve on a file system of 128 MiB or more. Removes need room for the pages that were
waiting in the WAL when the disk filled (SQLite checkpoints its WAL at 1000 pages, about 4 MiB)
and for the few pages each remove commit changes; twice that leaves a margin."""

RESERVE_FRACTION = 16
"""On a smaller file system the reserve is 1/16 of it: a reserve that would take a large share
of a small disk (a 1 MiB tmpfs) would leave no room for jobs, and there the WAL cannot grow to
4 MiB anyway."""

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def reserve_path(database: Path) -> Path:
    """`jobserver-<port>.reserve` beside `jobserver-<port>.sqlite3`."""
    return database.with_suffix(".reserve")


class SpaceReserve:
    """A file of `size` preallocated bytes, held (claimed) or given back (released)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.held = False
        self._complained = False  # of a reserve that cannot be had for want of anything but space

    @classmethod
    def beside(cls, database: Path) -> SpaceReserve:
        """The reserve for `database`, sized for the file system it is on (not yet claimed)."""
        try:
            stat = os.statvfs(database.parent)
            total = stat.f_blocks * stat.f_frsize
        except OSError:
            total = RESERVE_BYTES * RESERVE_FRACTION
        return cls(reserve_path(database), min(RESERVE_BYTES, total // RESERVE_FRACTION))

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the file system (root may use a few
        more: that margin is left alone). One statvfs."""
        stat = os.statvfs(self.path.parent)
        return stat.f_bavail * stat.f_frsize

    def claim(self) -> bool:
        """Allocate the file (kept if it is whole already); False if there is not the space.
        A file that cannot be allocated for another reason (a file size limit, a file system
        that refuses) is logged once and counts as claimed: the server goes on as it would
        without a reserve rather than refuse submits for it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            return self._failed("create", error)
        try:
            # Blocks allocated, not a sparse file: the space is really taken (glibc writes
            # the blocks itself on file systems without fallocate).
            os.posix_fallocate(fd, 0, self.size)
        except OSError as error:
            self._unlink()
            return self._failed("allocate", error)
        finally:
            os.close(fd)
        self.held = True
        return True

    def _failed(self, what: str, error: OSError) -> bool:
        if error.errno in NO_SPACE:
            return False
        if not self._complained:
            log.error("cannot %s the space reserve %s: %s", what, self.path, error.strerror)
            self._complained = True
        return True

    def release(self) -> None:
        """Delete the file: its blocks are free for the database at once."""
        self._unlink()
        self.held = False

    def _unlink(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            log.error("cannot delete the space reserve %s: %s", self.path, error.strerror)
