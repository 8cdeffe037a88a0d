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
to segments when it is opened, in one transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from ..engine.journal import StoredJob
from . import StoreError
from .encoding import (
    DamagedSegment,
    check_record,
    pack_record_ids,
    pack_segment,
    unpack_record_ids,
    unpack_segment,
)
from .segments import Segment, SegmentIndex

log = logging.getLogger(__name__)

SCHEMA = (
    # end_record_id: one past the last record id the segment may hold, kept so that ids stay
    # unique after a restart even when the segment's last records have finished.
    """CREATE TABLE IF NOT EXISTS segments (
        first_record_id INTEGER PRIMARY KEY,
        end_record_id   INTEGER NOT NULL,
        records         BLOB    NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS finished (
        first_record_id INTEGER PRIMARY KEY,
        record_ids      BLOB    NOT NULL
    )""",
)

INSERT_SEGMENT = "INSERT INTO segments VALUES (?, ?, ?)"
DELETE_SEGMENT = "DELETE FROM segments WHERE first_record_id = ?"
DELETE_FINISHED = "DELETE FROM finished WHERE first_record_id = ?"
APPEND_FINISHED = (
    "INSERT INTO finished VALUES (?, ?) ON CONFLICT (first_record_id) "
    # (SQL's || makes TEXT even of two blobs: cast back, or the list reads back as str)
    "DO UPDATE SET record_ids = CAST(record_ids || excluded.record_ids AS BLOB)"
)
REWRITE_SEGMENT = "UPDATE segments SET records = ? WHERE first_record_id = ?"

BUSY_TIMEOUT_MS = 5000
"""How long a statement waits on a lock before failing. Only this server writes its file, so
contention means someone else opened it (a backup, an operator's sqlite3 shell)."""

MAX_SEGMENT_RECORDS = 1024
"""Records per segment row. Commits are rarely bigger (only when the disk is slow and submits
pile up meanwhile); the cap bounds what one row holds in memory at load and what compacting
one segment rewrites."""

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


class SqliteStore:
    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        compaction_interval: float = COMPACTION_INTERVAL,
    ) -> None:
        self.path = path
        self._db = connection
        self._index = SegmentIndex()
        self._compaction_interval = compaction_interval
        self._next_compaction = time.monotonic() + compaction_interval
        self._sparse: list[Segment] = []  # found at the last look, rewritten one per commit

    @classmethod
    def open(
        cls, data_dir: Path, path: Path, compaction_interval: float = COMPACTION_INTERVAL
    ) -> SqliteStore:
        """Create the directory and the database if absent and check they are usable.
        Raises StoreError naming the file and the problem (corrupt, read-only, ...)."""
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create data directory {data_dir}: {error.strerror}") from None
        _check_writable(data_dir, path)
        try:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE in apply). The
            # connection is used from one worker thread at a time, never two at once.
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open job database {path}: {error}") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"job database {path}: cannot use WAL mode (got {mode})")
            # FULL: each commit is synced before it returns, so an acknowledged job survives
            # a power loss as well as a crash of this process.
            db.execute("PRAGMA synchronous = FULL")
            problems = db.execute("PRAGMA quick_check").fetchall()
            if problems != [("ok",)]:
                detail = "; ".join(str(row[0]) for row in problems[:3])
                raise StoreError(f"job database {path} is damaged: {detail}")
            db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                db.execute(statement)
            _convert_first_layout(db, path)
            db.execute("COMMIT")
        except sqlite3.Error as error:
            db.close()
            raise StoreError(f"cannot use job database {path}: {error}") from None
        except StoreError:
            db.close()
            raise
        return cls(path, db, compaction_interval)

    # ------------------------------------------------------------------ start

    def load(self) -> list[StoredJob]:
        """Every stored job not finished, oldest first; also rebuilds the segment index from
        the file. A segment that cannot be ours is refused with StoreError naming it."""
        db = self._db
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
        index = SegmentIndex()
        jobs: list[StoredJob] = []
        empty: list[int] = []
        for start, end, blob in rows:
            try:
                segment, live = _load_segment(start, end, blob, finished.pop(start, b""))
                if live:
                    index.add(segment)
            except (DamagedSegment, ValueError) as error:
                raise StoreError(
                    f"job database {self.path} is damaged: segment {start!r}: {error}"
                ) from None
            if live:
                jobs.extend(live)
            else:
                empty.append(start)
        # Rows no commit of ours leaves behind (the finish of a segment's last record deletes
        # both of its rows at once), cleared all the same: an orphaned finished list must not
        # be inherited by a later segment with the same first id.
        if empty or finished:
            self._clear(empty, list(finished))
        self._index = index
        self._sparse = []  # segments of the index just replaced
        return jobs

    @property
    def next_record_id(self) -> int:
        """The lowest record id a new job may use (after load): above every stored id."""
        return self._index.next_record_id

    def _clear(self, segments: list[int], finished: list[int]) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(DELETE_SEGMENT, _rows(segments))
            db.executemany(DELETE_FINISHED, _rows(segments + finished))
            db.execute("COMMIT")
        except sqlite3.Error as error:
            _rollback(db)
            raise StoreError(f"job database {self.path}: {error}") from None

    # ------------------------------------------------------------------ commits

    def apply(self, adds: list[StoredJob], removes: list[int]) -> None:
        """Write `adds` as new segments, then finish `removes`, in one synced transaction.
        The index changes only once the commit succeeded."""
        index = self._index
        kept = len(index)
        new: list[tuple[Segment, Sequence[StoredJob]]] = []
        try:
            for chunk in _segment_chunks(adds):
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
            statements = [
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
            self._execute(statements)
        except sqlite3.Error as error:
            index.discard_from(kept)
            raise StoreError(f"job database {self.path}: {error}", busy=_is_busy(error)) from None
        except BaseException:
            index.discard_from(kept)
            raise
        for segment, ids in groups.items():
            segment.live -= len(ids)
        for segment in ended:
            index.remove(segment)
        if compacted is not None:
            compacted[0].held = len(compacted[1])

    def _execute(self, statements: list[tuple[str, tuple]]) -> None:
        """Run the statements as one synced transaction. A single statement runs as its own
        (autocommit) transaction: one call into SQLite instead of three, and each call is a
        point where this thread must win the GIL back from the serving thread."""
        db = self._db
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
                blob, finished = self._db.execute(
                    "SELECT CAST(s.records AS BLOB), CAST(f.record_ids AS BLOB) "
                    "FROM segments AS s LEFT JOIN finished AS f "
                    "USING (first_record_id) WHERE s.first_record_id = ?",
                    (segment.start,),
                ).fetchone()
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
        self._db.close()


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


def _convert_first_layout(db: sqlite3.Connection, path: Path) -> None:
    """A database of the first layout (a `jobs` table, one row per job) becomes segments,
    inside the caller's transaction, so a crash half-way leaves the old layout whole."""
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
    ).fetchone()
    if not exists:
        return
    rows = db.execute(
        "SELECT record_id, CAST(function AS BLOB), CAST(unique_id AS BLOB), priority, "
        "run_at, CAST(reducer AS BLOB), CAST(payload AS BLOB) FROM jobs ORDER BY record_id"
    ).fetchall()
    try:
        jobs = [check_record(row) for row in rows]
    except DamagedSegment as error:
        raise StoreError(f"job database {path} is damaged: {error}") from None
    for chunk in _segment_chunks(jobs):
        db.execute(
            INSERT_SEGMENT, (chunk[0].record_id, chunk[-1].record_id + 1, pack_segment(chunk))
        )
    db.execute("DROP TABLE jobs")


def _segment_chunks(jobs: list[StoredJob]) -> list[list[StoredJob]]:
    """Consecutive runs of at most MAX_SEGMENT_RECORDS records: one segment row each."""
    return [jobs[i : i + MAX_SEGMENT_RECORDS] for i in range(0, len(jobs), MAX_SEGMENT_RECORDS)]


def _is_busy(error: sqlite3.Error) -> bool:
    name = getattr(error, "sqlite_errorname", None) or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _rows(values) -> list[tuple[int]]:
    return [(value,) for value in values]


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:  # SQLite may have rolled back already (disk full)
        db.execute("ROLLBACK")


def _check_writable(data_dir: Path, path: Path) -> None:
    """SQLite reports a read-only directory as "unable to open database file"; try a write
    ourselves first, so the message says what is wrong (read-only file system, permission).
    The directory must be writable too: WAL mode keeps two files beside the database."""
    if path.exists():
        try:
            with path.open("r+b"):
                pass
        except OSError as error:
            raise StoreError(f"cannot write job database {path}: {error.strerror}") from None
    probe = data_dir / f".{path.name}.write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise StoreError(
            f"cannot write job database {path}: its directory is not writable: {error.strerror}"
        ) from None
