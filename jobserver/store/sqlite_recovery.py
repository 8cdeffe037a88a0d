"""The SQLite store's recovery: a data file deleted or replaced while in use, and a full disk.
A mixin of SqliteStore (sqlite.py).

After each commit (and once a second when idle) the store checks, with one stat, that its path
still names the file it has open: a data file deleted or replaced while the server runs would
otherwise take every later commit into a file no restart finds. When it does not, the store
reads its live jobs back through the connection it still has on the old file and writes them,
the batch just committed included, into a new file (files.py), before the batch's submits are
acknowledged: nothing is acknowledged into a deleted file. A write that fails for want of
space releases a reserve (reserve.py) so that removes can go on, refuses submits meanwhile,
and gives the pages of drained jobs back to the file system (VACUUM) so the reserve can be
allocated again and submits accepted, without a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.journal import StoredJob, StoreExtras
from . import StoreError
from .database import (
    connect,
    read_dead,
    read_policies,
    segment_chunks,
    with_extras,
    write_new_database,
)
from .files import journal, move_aside, remove_files, rewrite_path, sidecars, sync_directory
from .lock import StoreLock
from .reserve import SpaceReserve
from .segments import Segment, SegmentIndex

log = logging.getLogger("jobserver.store.sqlite")  # as sqlite.py's lines

SPACE_TO_RESUME = 2
"""Submits are accepted again once the free space is this many reserves: one to allocate the
reserve again, one for jobs, so that the first commits after it do not fill the disk again at
once."""

VACUUM_SPACE_FACTOR = 2
"""VACUUM writes every live page into the WAL before the file shrinks: it is tried only when
the free space is this many times the live data, so it does not fill the disk itself."""

VACUUM_RETRY_INTERVAL = 10.0
"""Seconds before a VACUUM that failed is tried again (it costs as much as the live data)."""


class FileRecovery:
    """SqliteStore's recovery; the attributes below are SqliteStore's."""

    path: Path
    _db: sqlite3.Connection | None
    _identity: tuple[int, int]
    _lock: StoreLock
    _reserve: SpaceReserve
    _low_space: bool
    _next_vacuum: float
    _dropped: set[int]
    _gone: str | None
    _index: SegmentIndex
    _sparse: list[Segment]

    if TYPE_CHECKING:

        def _connection(self) -> sqlite3.Connection: ...

        def _read(
            self, db: sqlite3.Connection, dropped: Collection[int] = ()
        ) -> tuple[list[tuple[Segment, list[StoredJob]]], list[int], list[int]]: ...

    # ------------------------------------------------------------------ a deleted file

    def _file_changed(self) -> str | None:
        """ "deleted" or "replaced" if the path no longer names the file open, else None. One
        stat: cheap enough for every commit, and a commit is where it matters."""
        try:
            now = file_identity(self.path)
        except FileNotFoundError:
            return "deleted"
        except OSError:
            return None  # cannot tell (the directory is unreadable): the commit will say
        if now == self._identity:
            return None
        return "replaced"

    def _rewrite(
        self,
        what: str,
        adds: list[StoredJob],
        removes: list[int],
        extras: StoreExtras | None = None,
    ) -> None:
        """Write the live jobs, the dead set and the policies of the file open (deleted or
        replaced, but still readable through the connection), with `adds`, without `removes`
        and with the `extras` changes made, into a new file at the path, and continue with
        that. StoreError, with nothing changed, if the new file cannot be written; a file
        found at the path (a replacement) is moved aside, never overwritten."""
        # Whatever deleted the file may have taken the lock file with it (a data directory
        # emptied): the lock is taken again first, before another server can start on the
        # new file.
        self._lock.check()
        db = self._connection()
        segments, _, _ = self._read(db, self._dropped)
        dead, policies = with_extras(read_dead(db, self.path), read_policies(db, self.path), extras)
        finished = set(removes)
        kept: list[tuple[Segment, list[StoredJob]]] = []
        for segment, live in segments:
            if finished:
                live = [r for r in live if r.record_id not in finished]
            if live:
                kept.append((Segment(segment.start, segment.end, len(live), len(live)), live))
        for chunk in segment_chunks([r for r in adds if r.record_id not in finished]):
            start, end = chunk[0].record_id, chunk[-1].record_id + 1
            kept.append((Segment(start, end, len(chunk), len(chunk)), chunk))
        temp = rewrite_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_new_database(temp, kept, dead, policies)
            aside = move_aside(self.path)
        except (OSError, sqlite3.Error) as error:
            with contextlib.suppress(OSError):  # what is there may be what failed
                remove_files(temp, journal(temp))
            detail = getattr(error, "strerror", None) or error
            self._gone = what
            raise StoreError(
                f"job database {self.path} was {what} while in use, and its {count_jobs(kept)} "
                f"jobs cannot be written to a new file: {detail}"
            ) from None
        # The new file is complete and synced. The old file's -wal and -shm must be gone
        # before the new file takes the name, or SQLite would apply the old WAL to it. SQLite
        # leaves them when it closes a file that was unlinked or moved (it skips the
        # checkpoint), so they are deleted here, once the connection using them is closed.
        db.close()
        self._db = None
        remove_files(*sidecars(self.path))
        os.replace(temp, self.path)
        sync_directory(self.path.parent)
        index = SegmentIndex()
        for segment, _ in kept:
            index.add(segment)
        self._index, self._sparse, self._dropped, self._gone = index, [], set(), None
        self._identity = file_identity(self.path)
        log.warning(
            "job database %s was %s while in use; its %d live jobs were written to a new file%s%s",
            self.path,
            what,
            count_jobs(kept),
            f", with {len(dead)} dead jobs and {len(policies)} retry policies"
            if dead or policies
            else "",
            f" (the file found in its place was moved to {aside})" if aside else "",
        )
        if self._reserve.held and not self._reserve.path.exists():
            self._reserve.claim()  # the data directory was cleared, reserve and all
        try:
            self._db = connect(self.path, self._reserve)
        except StoreError as error:
            # The batch is in the new file all the same: the next commit opens it again.
            log.error("%s", error)

    def _rewrite_after_commit(self, what: str, new: list[Segment]) -> None:
        """The file went while a batch was committed into it: rewrite now (the batch is among
        the live jobs read back). If the new file cannot be written, the batch's submits are
        refused instead: its segments leave the index and the next rewrite leaves them out.
        Its removes are written either way (StoreError.removes_written)."""
        try:
            self._rewrite(what, [], [])
        except StoreError as error:
            for segment in new:
                if segment.live:  # else all its records finished in that commit: gone already
                    self._index.remove(segment)
                self._dropped.add(segment.start)
            raise StoreError(str(error), removes_written=True) from None

    # ------------------------------------------------------------------ a full disk

    def _space_ran_out(self) -> None:
        if self._reserve.held:
            self._reserve.release()
            log.warning(
                "job database %s: the disk is full; released the %d-byte reserve so finished "
                "jobs can still be removed; submits are refused until space is back",
                self.path,
                self._reserve.size,
            )
        self._low_space = True
        self._regain_space()

    def _regain_space(self) -> None:
        """Accept submits again if the reserve can be allocated with room to spare: give the
        WAL's space back, and the pages of drained jobs (VACUUM) when that would make the
        room and the copy fits."""
        db = self._connection()
        # An emptied WAL gives its size back; it fails while the pages it holds do not fit.
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        needed = self._reserve.size * SPACE_TO_RESUME
        free = self._reserve.free_bytes()
        if free < needed and self._vacuum_would_make_room(db, free, needed):
            try:
                db.execute("VACUUM")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as error:
                self._next_vacuum = time.monotonic() + VACUUM_RETRY_INTERVAL
                log.error("job database %s: cannot give space back: %s", self.path, error)
            free = self._reserve.free_bytes()
        if free >= needed and self._reserve.claim():
            self._low_space = False
            log.warning("job database %s: disk space is back; accepting submits", self.path)

    def _vacuum_would_make_room(self, db: sqlite3.Connection, free: int, needed: int) -> bool:
        if time.monotonic() < self._next_vacuum:
            return False
        try:
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            unused = db.execute("PRAGMA freelist_count").fetchone()[0]
        except sqlite3.Error:
            return False
        live = (pages - unused) * page_size
        return free + unused * page_size >= needed and live * VACUUM_SPACE_FACTOR <= free


def file_identity(path: Path) -> tuple[int, int]:
    """What tells one file from another at the same path: a deleted file's inode stays ours
    while we hold it open, so a new file cannot reuse it."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def count_jobs(segments: list[tuple[Segment, list[StoredJob]]]) -> int:
    return sum(len(live) for _, live in segments)
