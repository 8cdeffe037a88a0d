"""Background jobs in an SQLite database (stdlib sqlite3, WAL journal, synchronous=FULL).

Layout: each group commit writes its records as one row of `segments` (a msgpack array, see
encoding.py), not one row per job. SQLite's cost is per row and per statement far more than
per byte, so a commit of hundreds of submits costs little more than a commit of one, which is
what lets durable submits keep up with memory ones (issue 4). A finished job is recorded by
appending its id to its segment's row in `finished`; when a segment's last record finishes,
both rows are deleted in the same transaction. Segments left holding few live records (a
long-delayed epoch job among thousands that ran) are rewritten with only those records, so a
straggler does not keep its whole commit on disk.

Records are keyed by a record id the server assigns, not by (unique, function) as gearmand's
libsqlite3 queue does: there, two background jobs with an empty unique overwrite each other and
one is lost on restart (shared doc §3.15). Here every acknowledged job has its own record.

A database written by the first version of this store (one `jobs` row per job) is converted
to segments when it is opened, in one transaction (database.py).

The dead set and the retry policies (issue 13) are a row each (database.py), changed in the
same transaction as the batch that carries the change (StoreExtras): a job's move from the
queue to the dead set is its record's remove and its dead row's insert, both or neither.

Safety (issue: hardening): the database is locked for this server alone (lock.py); a data file
deleted or replaced while in use, and a full disk, are recovered from in sqlite_recovery.py.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from ..engine.journal import DeadJob, RetryPolicy, StoredJob, StoreExtras
from . import StoreError
from .database import (
    INSERT_SEGMENT,
    check_writable,
    connect,
    extras_statements,
    read_dead,
    read_policies,
    segment_chunks,
)
from .database import (
    MAX_SEGMENT_RECORDS as MAX_SEGMENT_RECORDS,  # a limit of the layout, read by tests
)
from .encoding import (
    DamagedSegment,
    pack_record_ids,
    pack_segment,
    unpack_record_ids,
    unpack_segment,
)
from .files import (
    adopt_unfinished_rewrite,
    rewrite_path,
)
from .lock import StoreLock
from .reserve import SpaceReserve
from .segments import Segment, SegmentIndex
from .sqlite_recovery import FileRecovery, file_identity

log = logging.getLogger(__name__)

DELETE_SEGMENT = "DELETE FROM segments WHERE first_record_id = ?"
DELETE_FINISHED = "DELETE FROM finished WHERE first_record_id = ?"
APPEND_FINISHED = (
    "INSERT INTO finished VALUES (?, ?) ON CONFLICT (first_record_id) "
    # (SQL's || makes TEXT even of two blobs: cast back, or the list reads back as str)
    "DO UPDATE SET record_ids = CAST(record_ids || excluded.record_ids AS BLOB)"
)
REWRITE_SEGMENT = "UPDATE segments SET records = ? WHERE first_record_id = ?"

COMPACTION_INTERVAL = 60.0
"""Seconds between looks for sparse segments. Jobs usually finish in the order they came, so a
segment is sparse only for a moment before its row goes; looking now and then (instead of at
every finish) finds the segments kept by a few long-lived jobs without rewriting every
segment of a queue that is draining."""

SPARSE_FRACTION = 4
"""A segment whose live records are at most 1/SPARSE_FRACTION of what its row holds is
rewritten: the disk kept for finished jobs stays under 4x the live data, and each record is
rewritten a bounded number of times."""

MIN_COMPACTED_RECORDS = 8
"""Rows holding fewer records than this are not worth rewriting."""


class SqliteStore(FileRecovery):
    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        lock: StoreLock,
        reserve: SpaceReserve,
        compaction_interval: float = COMPACTION_INTERVAL,
        *,
        low_space: bool = False,
    ) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = connection
        self._identity = file_identity(path)
        self._lock = lock
        self._reserve = reserve
        self._low_space = low_space  # submits refused until the reserve is back
        self._next_vacuum = 0.0
        # Segments committed into a file found deleted right after, whose rewrite failed:
        # their submits were refused, so the next rewrite must leave them out.
        self._dropped: set[int] = set()
        self._gone: str | None = None  # "deleted"/"replaced": a rewrite failed, try again
        self._last_problem = ""  # of the idle check, logged once
        self._index = SegmentIndex()
        self._compaction_interval = compaction_interval
        self._next_compaction = time.monotonic() + compaction_interval
        self._sparse: list[Segment] = []  # found at the last look, rewritten one per commit

    @classmethod
    def open(
        cls, data_dir: Path, path: Path, compaction_interval: float = COMPACTION_INTERVAL
    ) -> SqliteStore:
        """Create the directory and the database if absent, lock the database for this
        process and check they are usable. Raises StoreError naming the file and the problem
        (in use by another server, corrupt, read-only, ...)."""
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create data directory {data_dir}: {error.strerror}") from None
        lock = StoreLock.acquire(path)  # before anything reads or writes the database
        reserve = SpaceReserve.beside(path)
        try:
            check_writable(data_dir, path)
            try:
                adopt_unfinished_rewrite(path)
            except OSError as error:
                raise StoreError(
                    f"job database {path}: cannot put in place the new file of an interrupted "
                    f"rewrite ({rewrite_path(path)}): {error.strerror}"
                ) from None
            db = connect(path, reserve, check=True)
        except BaseException:
            lock.release()
            raise
        low_space = not reserve.claim()
        if low_space:
            log.warning(
                "no room for the %d-byte space reserve %s: submits are refused until there is",
                reserve.size,
                reserve.path,
            )
        return cls(path, db, lock, reserve, compaction_interval, low_space=low_space)

    # ------------------------------------------------------------------ start

    def load(self) -> list[StoredJob]:
        """Every stored job not finished, oldest first; also rebuilds the segment index from
        the file. A segment that cannot be ours is refused with StoreError naming it."""
        segments, empty, orphans = self._read(self._connection())
        index = SegmentIndex()
        jobs: list[StoredJob] = []
        for segment, live in segments:
            index.add(segment)
            jobs.extend(live)
        # Rows no commit of ours leaves behind (the finish of a segment's last record deletes
        # both of its rows at once), cleared all the same: an orphaned finished list must not
        # be inherited by a later segment with the same first id.
        if empty or orphans:
            self._clear(empty, orphans)
        self._index = index
        self._sparse = []  # segments of the index just replaced
        return jobs

    def _read(
        self, db: sqlite3.Connection, dropped: Collection[int] = ()
    ) -> tuple[list[tuple[Segment, list[StoredJob]]], list[int], list[int]]:
        """The segments with live records and those records; the first ids of segments with
        none, and of finished lists with no segment. Segments starting at a `dropped` id are
        left out. StoreError if the file cannot be read or a segment cannot be ours."""
        try:
            rows = db.execute(
                "SELECT first_record_id, end_record_id, CAST(records AS BLOB) FROM segments "
                "ORDER BY first_record_id"
            ).fetchall()
            finished_rows = db.execute(
                "SELECT first_record_id, CAST(record_ids AS BLOB) FROM finished"
            ).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"cannot read job database {self.path}: {error}") from None
        finished = dict(finished_rows)
        segments: list[tuple[Segment, list[StoredJob]]] = []
        empty: list[int] = []
        for start, end, blob in rows:
            try:
                segment, live = _load_segment(start, end, blob, finished.pop(start, b""))
            except (DamagedSegment, ValueError) as error:
                raise StoreError(
                    f"job database {self.path} is damaged: segment {start!r}: {error}"
                ) from None
            if start in dropped:
                continue
            if live:
                segments.append((segment, live))
            else:
                empty.append(start)
        return segments, empty, list(finished)

    def load_dead(self) -> list[DeadJob]:
        """The dead set, oldest (lowest dead id) first. StoreError naming the file and the
        dead id of a row that cannot be ours."""
        return read_dead(self._connection(), self.path)

    def load_policies(self) -> list[tuple[bytes, RetryPolicy]]:
        """The retry policies set by the `retries` admin command, by function."""
        return read_policies(self._connection(), self.path)

    @property
    def next_record_id(self) -> int:
        """The lowest record id a new job may use (after load): above every stored id."""
        return self._index.next_record_id

    def _clear(self, segments: list[int], finished: list[int]) -> None:
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(DELETE_SEGMENT, _rows(segments))
            db.executemany(DELETE_FINISHED, _rows(segments + finished))
            db.execute("COMMIT")
        except sqlite3.Error as error:
            _rollback(db)
            raise StoreError(f"job database {self.path}: {error}") from None

    # ------------------------------------------------------------------ commits

    def apply(
        self, adds: list[StoredJob], removes: list[int], extras: StoreExtras | None = None
    ) -> None:
        """Write `adds` as new segments, then finish `removes`, and make the `extras` changes
        (dead set, policies), in one synced transaction, in the file the database's path
        names when it returns. The index changes only once the commit succeeded. (On a full
        disk the removes go first, in a transaction of their own: see
        StoreError.removes_written.)"""
        if self._gone:
            # The file went and writing the new one failed: this batch goes into the new
            # file with the jobs of the old one, or nowhere.
            self._rewrite(self._gone, adds, removes, extras)
            return
        removes_written = False
        if self._low_space:
            # A dead job added is refused like a submit: it holds a payload, and the space the
            # reserve gave back is for what frees space. Dead jobs removed free space and a
            # policy is a few bytes: they go with the removes. (A dead job refused with the
            # removes written is not retried: it stays in the server's memory only.)
            dead_adds = extras.dead_adds if extras is not None else []
            others = _without_dead_adds(extras)
            if (adds or dead_adds) and (removes or others):
                # They may free what the adds need: write them first.
                self._write([], removes, removes_written, others)
                removes, removes_written = [], True
                extras = StoreExtras(dead_adds, [], []) if dead_adds else None
            self._regain_space()
            if self._low_space and (adds or dead_adds):
                raise StoreError(
                    f"job database {self.path}: no space left on its file system "
                    f"({self._reserve.free_bytes()} bytes free); submits"
                    f"{' and failed jobs for the dead set' if dead_adds else ''} are refused "
                    "until finished jobs free some",
                    low_space=True,
                    removes_written=removes_written,
                )
        new = self._write(adds, removes, removes_written, extras)
        # Looked at after the commit, not before: a file that went at any moment up to now
        # took this batch with it, and is rewritten (batch included) before the batch's
        # submits are acknowledged. One stat per commit; the lock file is looked at by
        # `check`, once a second.
        changed = self._file_changed()
        if changed:
            self._rewrite_after_commit(changed, new)
        if self._low_space:
            self._regain_space()

    def _write(
        self,
        adds: list[StoredJob],
        removes: list[int],
        removes_written: bool,
        extras: StoreExtras | None = None,
    ) -> list[Segment]:
        """_commit, its failure a StoreError (a full disk noted)."""
        try:
            if extras is None:  # the two-argument call, as before (tests' subclasses hook it)
                return self._commit(adds, removes)
            return self._commit(adds, removes, extras)
        except sqlite3.Error as error:
            if _is_full(error):
                self._space_ran_out()
            raise StoreError(
                f"job database {self.path}: {error}",
                busy=_is_busy(error),
                low_space=self._low_space,
                removes_written=removes_written,
            ) from None

    def _commit(
        self, adds: list[StoredJob], removes: list[int], extras: StoreExtras | None = None
    ) -> list[Segment]:
        """The commit itself, into the file open now; returns the segments it added. Raises
        sqlite3.Error with the index as it was."""
        index = self._index
        kept = len(index)
        new: list[tuple[Segment, Sequence[StoredJob]]] = []
        try:
            for chunk in segment_chunks(adds):
                segment = Segment(
                    chunk[0].record_id, chunk[-1].record_id + 1, len(chunk), len(chunk)
                )
                index.add(segment)
                new.append((segment, chunk))
            groups = index.group(removes)
            ended = [s for s, ids in groups.items() if len(ids) >= s.live]
            compacted = None
            if self._sparse or self._compaction_due():
                compacted = self._compact_one(groups)
            statements: list[tuple[str, tuple[object, ...]]] = [
                (INSERT_SEGMENT, (segment.start, segment.end, pack_segment(chunk)))
                for segment, chunk in new
            ]
            for segment, ids in groups.items():
                if segment in ended:
                    statements.append((DELETE_SEGMENT, (segment.start,)))
                    statements.append((DELETE_FINISHED, (segment.start,)))
                else:
                    statements.append((APPEND_FINISHED, (segment.start, pack_record_ids(ids))))
            if compacted is not None:
                segment, records = compacted
                statements.append((REWRITE_SEGMENT, (pack_segment(records), segment.start)))
                statements.append((DELETE_FINISHED, (segment.start,)))
            if extras is not None:
                statements.extend(extras_statements(extras))
            self._execute(statements)
        except BaseException:
            index.discard_from(kept)
            raise
        for segment, ids in groups.items():
            segment.live -= len(ids)
        for segment in ended:
            index.remove(segment)
        if compacted is not None:
            compacted[0].held = len(compacted[1])
        return [segment for segment, _ in new]

    def _execute(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        """Run the statements as one synced transaction. A single statement runs as its own
        (autocommit) transaction: one call into SQLite instead of three, and each call is a
        point where this thread must win the GIL back from the serving thread."""
        db = self._connection()
        if len(statements) == 1:
            db.execute(*statements[0])
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                db.execute(*statement)
            db.execute("COMMIT")
        except sqlite3.Error:
            _rollback(db)
            raise

    def check(self) -> None:
        """Called by the store thread once a second, busy or idle: a deleted lock file is
        taken again; and, for a server with nothing to commit, a deleted or replaced file is
        rewritten and space given back. Problems are logged (once each), not raised."""
        try:
            self._lock.check()
            changed = self._gone or self._file_changed()
            if changed:
                self._rewrite(changed, [], [])
            if self._low_space:
                self._regain_space()
        except StoreError as error:
            if str(error) != self._last_problem:
                log.error("%s", error)
            self._last_problem = str(error)
        else:
            self._last_problem = ""

    def _connection(self) -> sqlite3.Connection:
        """The open connection, opened again if a rewrite could not (the new file is there)."""
        if self._db is None:
            self._db = connect(self.path, self._reserve)
        return self._db

    # ------------------------------------------------------------------ compaction

    def _compaction_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_compaction:
            return False
        self._next_compaction = now + self._compaction_interval
        self._sparse = [s for s in self._index if _is_sparse(s.held, s.live)]
        return bool(self._sparse)

    def _compact_one(self, groups: dict[Segment, list[int]]) -> tuple[Segment, list] | None:
        """The next sparse segment and the records it keeps once this commit's finishes are
        counted; None if none is still sparse. Reads the database (inside the store thread)."""
        while self._sparse:
            segment = self._sparse.pop()
            finishing = groups.get(segment, ())
            live = segment.live - len(finishing)
            if live <= 0 or not _is_sparse(segment.held, live):
                continue  # its row goes in this commit, or it filled up: nothing to do
            try:
                blob, finished = (
                    self._connection()
                    .execute(
                        "SELECT CAST(s.records AS BLOB), CAST(f.record_ids AS BLOB) "
                        "FROM segments AS s LEFT JOIN finished AS f "
                        "USING (first_record_id) WHERE s.first_record_id = ?",
                        (segment.start,),
                    )
                    .fetchone()
                )
                done = unpack_record_ids(finished or b"")
                done.update(finishing)
                records = [r for r in unpack_segment(blob) if r.record_id not in done]
                if len(records) != live:
                    raise DamagedSegment(f"{len(records)} unfinished records, expected {live}")
            except (sqlite3.Error, DamagedSegment) as error:
                # Compacting only saves space: it must never cost a commit its submits.
                log.error(
                    "job database %s: not compacting segment %d: %s",
                    self.path,
                    segment.start,
                    error,
                )
                continue
            return segment, records
        return None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._lock.release()


def _is_full(error: sqlite3.Error) -> bool:
    """SQLITE_FULL: SQLite's word for ENOSPC from a write."""
    return getattr(error, "sqlite_errorname", None) == "SQLITE_FULL"


def _without_dead_adds(extras: StoreExtras | None) -> StoreExtras | None:
    """The dead-set removes and policy changes of `extras`; None if it has none."""
    if extras is None or not (extras.dead_removes or extras.policies):
        return None
    return StoreExtras([], extras.dead_removes, extras.policies)


def _is_sparse(held: int, live: int) -> bool:
    return held >= MIN_COMPACTED_RECORDS and live * SPARSE_FRACTION <= held


def _load_segment(
    start: object, end: object, blob: bytes, finished_blob: bytes
) -> tuple[Segment, list[StoredJob]]:
    if type(start) is not int or type(end) is not int or not 0 < start < end:
        raise DamagedSegment(f"id range [{start!r}, {end!r}) is not a range of record ids")
    records = unpack_segment(blob)
    previous = start - 1
    for record in records:
        if not previous < record.record_id < end:
            raise DamagedSegment(
                f"record id {record.record_id} out of order or outside [{start}, {end})"
            )
        previous = record.record_id
    done = unpack_record_ids(finished_blob)
    live = [r for r in records if r.record_id not in done]
    return Segment(start, end, len(records), len(live)), live


def _is_busy(error: sqlite3.Error) -> bool:
    name = getattr(error, "sqlite_errorname", None) or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _rows(values) -> list[tuple[int]]:
    return [(value,) for value in values]


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:  # SQLite may have rolled back already (disk full)
        db.execute("ROLLBACK")
