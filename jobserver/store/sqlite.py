"""Background jobs in an SQLite database (stdlib sqlite3, WAL journal, synchronous=FULL).

Records are keyed by a record id the server assigns, not by (unique, function) as gearmand's
libsqlite3 queue does: there, two background jobs with an empty unique overwrite each other and
one is lost on restart (shared doc §3.15). Here every acknowledged job has its own row.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..engine.journal import StoredJob
from . import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    record_id INTEGER PRIMARY KEY,
    function  BLOB    NOT NULL,
    unique_id BLOB    NOT NULL,
    priority  INTEGER NOT NULL,
    run_at    INTEGER NOT NULL,
    reducer   BLOB    NOT NULL,
    payload   BLOB    NOT NULL
)
"""

MAX_PRIORITY = 2  # 0 HIGH, 1 NORMAL, 2 LOW, as gearmand's queues number them (§5)

BUSY_TIMEOUT_MS = 5000
"""How long a statement waits on a lock before failing. Only this server writes its file, so
contention means someone else opened it (a backup, an operator's sqlite3 shell)."""


class SqliteStore:
    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection

    @classmethod
    def open(cls, data_dir: Path, path: Path) -> SqliteStore:
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
            db.execute(SCHEMA)
            problems = db.execute("PRAGMA quick_check").fetchall()
            if problems != [("ok",)]:
                detail = "; ".join(str(row[0]) for row in problems[:3])
                raise StoreError(f"job database {path} is damaged: {detail}")
        except sqlite3.Error as error:
            db.close()
            raise StoreError(f"cannot use job database {path}: {error}") from None
        except StoreError:
            db.close()
            raise
        return cls(path, db)

    def load(self) -> list[StoredJob]:
        """Every stored job, oldest first. Byte columns are read as bytes whatever type a
        foreign writer gave them; a record that cannot be a job (priority out of range, a time
        that is not an integer) is refused with StoreError rather than guessed at."""
        try:
            rows = self._db.execute(
                "SELECT record_id, CAST(function AS BLOB), CAST(unique_id AS BLOB), priority, "
                "run_at, CAST(reducer AS BLOB), CAST(payload AS BLOB) FROM jobs "
                "ORDER BY record_id"
            ).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"cannot read job database {self.path}: {error}") from None
        for row in rows:
            record_id, _, _, priority, run_at, _, _ = row
            if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
                raise StoreError(
                    f"job database {self.path} is damaged: record {record_id} has priority "
                    f"{priority!r} (must be 0, 1 or 2)"
                )
            if type(run_at) is not int:
                raise StoreError(
                    f"job database {self.path} is damaged: record {record_id} has run_at "
                    f"{run_at!r} (must be an integer unix time)"
                )
        return [StoredJob(*row) for row in rows]

    def apply(self, adds: list[StoredJob], removes: list[int]) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if adds:
                    db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)", adds)
                if removes:
                    db.executemany("DELETE FROM jobs WHERE record_id = ?", ((r,) for r in removes))
                db.execute("COMMIT")
            except sqlite3.Error:
                if db.in_transaction:  # SQLite may have rolled back already (disk full)
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise StoreError(f"job database {self.path}: {error}") from None

    def close(self) -> None:
        self._db.close()


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
