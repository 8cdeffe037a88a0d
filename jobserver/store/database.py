"""Opening and creating the sqlite store's database files: the tables, the connection
settings every connection gets (WAL, synced commits, checkpoints within the space reserve),
the checks at start, the conversion of the first layout, and the fresh file a rewrite writes.
Also the dead set and the retry policies, which are one row each: their statements and their
checks when read. The store itself (what goes in which row, and when) is sqlite.py.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..engine.journal import DeadJob, RetryPolicy, StoredJob, StoreExtras
from . import StoreError
from .encoding import (
    DamagedDeadJob,
    DamagedSegment,
    check_record,
    pack_dead,
    pack_segment,
    unpack_dead,
)
from .files import journal, remove_files
from .reserve import SpaceReserve
from .segments import Segment

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
    # The dead set (engine/failures.py), a row per job (encoding.py): dead jobs come and go
    # one by one, not in the hundreds a commit of submits holds. Created in a database of an
    # earlier version too, when it is opened: it simply has no dead jobs.
    """CREATE TABLE IF NOT EXISTS dead (
        dead_id INTEGER PRIMARY KEY,
        record  BLOB    NOT NULL
    )""",
    # The `retries` admin command's policies; a function without a row has the server's.
    """CREATE TABLE IF NOT EXISTS policies (
        function   BLOB    PRIMARY KEY,
        retries    INTEGER NOT NULL,
        base_delay REAL    NOT NULL
    )""",
)

INSERT_SEGMENT = "INSERT INTO segments VALUES (?, ?, ?)"

# A dead job or policy written again is the same one (the engine retries the dead-set and policy
# changes of a commit that failed): replaced, never a constraint error that would fail every
# batch it is retried in. Removing one that is not there does nothing, as for records.
INSERT_DEAD = "INSERT OR REPLACE INTO dead VALUES (?, ?)"
DELETE_DEAD = "DELETE FROM dead WHERE dead_id = ?"
SET_POLICY = "INSERT OR REPLACE INTO policies VALUES (?, ?, ?)"
CLEAR_POLICY = "DELETE FROM policies WHERE function = ?"

CHECKPOINT_PAGES = 1000
"""SQLite's own wal_autocheckpoint, kept wherever the space reserve allows it."""

WAL_SHARE_OF_RESERVE = 2
"""The WAL checkpoints once it holds 1/2 of the reserve, if that is less than CHECKPOINT_PAGES
(a small disk). When the disk fills, the pages waiting in the WAL must still go into the
database file, which grows by them, before the WAL can be reused; the reserve must hold them
and leave room for the removes' own WAL frames."""

BUSY_TIMEOUT_MS = 5000
"""How long a statement waits on a lock before failing. Only this server writes its file, so
contention means someone else opened it (a backup, an operator's sqlite3 shell)."""


MAX_SEGMENT_RECORDS = 1024
"""Records per segment row. Commits are rarely bigger (only when the disk is slow and submits
pile up meanwhile); the cap bounds what one row holds in memory at load and what compacting
one segment rewrites."""


def connect(path: Path, reserve: SpaceReserve, *, check: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode, synced at each commit, checkpointing within what `reserve`
    can hold. `check` (at start): check the file, create the tables, convert a database of
    the first layout. StoreError naming the file."""
    try:
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE in apply). The
        # connection is used from one thread at a time, never two at once.
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
        # Debian's SQLite is built with secure_delete on: each page a finished job frees is
        # written again, as zeros, through the WAL, so a remove costs as much I/O as the
        # submit did, and on a full disk the removes that would free space need more of it.
        # FAST zeroes deleted data only where that costs no extra writes.
        db.execute("PRAGMA secure_delete = FAST")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = min(CHECKPOINT_PAGES, reserve.size // WAL_SHARE_OF_RESERVE // page_size)
        db.execute(f"PRAGMA wal_autocheckpoint = {max(1, pages)}")
        if check:
            problems = db.execute("PRAGMA quick_check").fetchall()
            if problems != [("ok",)]:
                detail = "; ".join(str(row[0]) for row in problems[:3])
                raise StoreError(f"job database {path} is damaged: {detail}")
            db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                db.execute(statement)
            convert_first_layout(db, path)
            db.execute("COMMIT")
    except sqlite3.Error as error:
        db.close()
        raise StoreError(f"cannot use job database {path}: {error}") from None
    except StoreError:
        db.close()
        raise
    return db


def write_new_database(
    path: Path,
    segments: list[tuple[Segment, list[StoredJob]]],
    dead: Iterable[DeadJob] = (),
    policies: Iterable[tuple[bytes, RetryPolicy]] = (),
) -> None:
    """A database at `path` holding `segments` (their live records only), the dead set and
    the retry policies, written in one transaction and synced; in rollback-journal mode, so
    that no -wal is left beside it when it is renamed (it turns to WAL mode when opened)."""
    remove_files(path, journal(path))  # of an earlier rewrite that failed
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = FULL")
        db.execute("BEGIN IMMEDIATE")
        for statement in SCHEMA:
            db.execute(statement)
        db.executemany(
            INSERT_SEGMENT,
            ((segment.start, segment.end, pack_segment(live)) for segment, live in segments),
        )
        db.executemany(INSERT_DEAD, (_dead_row(job) for job in dead))
        db.executemany(SET_POLICY, (_policy_row(f, policy) for f, policy in policies))
        db.execute("COMMIT")
    finally:
        db.close()


def convert_first_layout(db: sqlite3.Connection, path: Path) -> None:
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
    for chunk in segment_chunks(jobs):
        db.execute(
            INSERT_SEGMENT, (chunk[0].record_id, chunk[-1].record_id + 1, pack_segment(chunk))
        )
    db.execute("DROP TABLE jobs")


def extras_statements(extras: StoreExtras) -> list[tuple[str, tuple[object, ...]]]:
    """The statements that make the `extras` changes, to run in the batch's transaction: dead
    jobs added before those removed (one added and dropped again in the same batch ends
    removed), policies in the order they were set (the last one wins)."""
    statements: list[tuple[str, tuple[object, ...]]] = [
        (INSERT_DEAD, _dead_row(job)) for job in extras.dead_adds
    ]
    statements.extend((DELETE_DEAD, (dead_id,)) for dead_id in extras.dead_removes)
    for function, policy in extras.policies:
        if policy is None:
            statements.append((CLEAR_POLICY, (function,)))
        else:
            statements.append((SET_POLICY, _policy_row(function, policy)))
    return statements


def with_extras(
    dead: list[DeadJob], policies: list[tuple[bytes, RetryPolicy]], extras: StoreExtras | None
) -> tuple[list[DeadJob], list[tuple[bytes, RetryPolicy]]]:
    """The dead set and the policies as they are once `extras` is made (what its statements
    would leave in the database): for a rewrite that takes the batch into a new file."""
    if extras is None:
        return dead, policies
    by_id = {job.dead_id: job for job in dead}
    by_id.update((job.dead_id, job) for job in extras.dead_adds)
    for dead_id in extras.dead_removes:
        by_id.pop(dead_id, None)
    by_function = dict(policies)
    for function, policy in extras.policies:
        if policy is None:
            by_function.pop(function, None)
        else:
            by_function[function] = policy
    return list(by_id.values()), list(by_function.items())


def read_dead(db: sqlite3.Connection, path: Path) -> list[DeadJob]:
    """The dead set, oldest (lowest dead id) first. StoreError naming the file, and the dead
    id of a row this store cannot have written."""
    rows = _select(db, path, "SELECT dead_id, CAST(record AS BLOB) FROM dead ORDER BY dead_id")
    dead = []
    for dead_id, record in rows:
        try:
            dead.append(unpack_dead(dead_id, record))
        except DamagedDeadJob as error:
            raise StoreError(
                f"job database {path} is damaged: dead job {dead_id}: {error}"
            ) from None
    return dead


def read_policies(db: sqlite3.Connection, path: Path) -> list[tuple[bytes, RetryPolicy]]:
    """The retry policies by function. StoreError naming the file, and the function of a row
    this store cannot have written."""
    rows = _select(
        db, path, "SELECT CAST(function AS BLOB), retries, base_delay FROM policies ORDER BY 1"
    )
    for function, retries, base_delay in rows:
        if (
            type(retries) is not int
            or retries < 0
            or type(base_delay) is not float
            or not 0 <= base_delay < math.inf
        ):
            raise StoreError(
                f"job database {path} is damaged: the retry policy of function {function!r} "
                f"has retries {retries!r} and base delay {base_delay!r} (must be a count and "
                "seconds)"
            )
    return [(function, RetryPolicy(retries, base_delay)) for function, retries, base_delay in rows]


def _select(db: sqlite3.Connection, path: Path, query: str) -> list[Any]:
    try:
        return db.execute(query).fetchall()
    except sqlite3.Error as error:
        raise StoreError(f"cannot read job database {path}: {error}") from None


def _dead_row(job: DeadJob) -> tuple[int, bytes]:
    return job.dead_id, pack_dead(job)


def _policy_row(function: bytes, policy: RetryPolicy) -> tuple[bytes, int, float]:
    return function, policy.retries, float(policy.base_delay)


def segment_chunks(jobs: list[StoredJob]) -> list[list[StoredJob]]:
    """Consecutive runs of at most MAX_SEGMENT_RECORDS records: one segment row each."""
    return [jobs[i : i + MAX_SEGMENT_RECORDS] for i in range(0, len(jobs), MAX_SEGMENT_RECORDS)]


def check_writable(data_dir: Path, path: Path) -> None:
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
