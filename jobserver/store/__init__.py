"""Where background jobs are kept so they survive a crash (issue: durable background jobs).

A store records a job, removes it, and loads them all at start; it is locked for one server
and keeps working when its file is deleted or its disk fills (sqlite.py). The engine never calls it:
it journals what must be stored (jobserver.engine.journal) and the server commits that in
batches off the trio thread (jobserver.server). Two stores: `sqlite` (the default; stdlib
sqlite3 in WAL mode, one database file per server port) and `memory` (nothing is kept: a
restart loses queued jobs, as with gearmand's builtin queue). A third, for clusters:
`postgresql://...`, one database shared by every server, with takeover when a server dies
(postgresql.py).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Protocol

from ..engine.journal import DeadJob, RetryPolicy, StoredJob, StoreExtras

STORE_KINDS = ("sqlite", "memory")
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")  # libpq's URI forms


def is_postgresql_uri(text: str) -> bool:
    return text.startswith(POSTGRESQL_SCHEMES)


class StoreError(Exception):
    """The store cannot do what was asked; the message names the file and the problem.

    `busy`: someone else held the database's lock for longer than the store waits. Trying
    again at once (say, record by record) would only wait for it again.

    `low_space`: the disk is full; the store refuses every record until finished jobs free
    space, so record by record would be refused too. Removes alone are still written.

    `removes_written`: the records were refused but the removes of the same call were
    written (the file went while they were committed, see SqliteStore._rewrite_after_commit);
    they must not be written again."""

    def __init__(
        self,
        message: str,
        *,
        busy: bool = False,
        low_space: bool = False,
        removes_written: bool = False,
    ) -> None:
        super().__init__(message)
        self.busy = busy
        self.low_space = low_space
        self.removes_written = removes_written


class JobStore(Protocol):
    def load(self) -> list[StoredJob]:
        """Every stored job, oldest first."""
        ...

    @property
    def next_record_id(self) -> int:
        """After load: the lowest id a new record may have (above every id stored)."""
        ...

    def load_dead(self) -> list[DeadJob]:
        """The dead set (engine/failures.py), oldest first; after load."""
        ...

    def load_policies(self) -> list[tuple[bytes, RetryPolicy]]:
        """Retry policies set by the `retries` admin command, by function."""
        ...

    def apply(
        self, adds: list[StoredJob], removes: list[int], extras: StoreExtras | None = None
    ) -> None:
        """Record `adds`, then delete the records `removes`, and make the `extras` changes
        (dead jobs added and removed, policies set), atomically and durably (synced to disk
        when it returns). Raises StoreError and changes nothing on failure. Record ids only
        increase from call to call, as do dead ids added; a record or dead job is removed
        once (unknown ids are ignored)."""
        ...

    def check(self) -> None:
        """While nothing is committed: do what each commit does besides writing (notice a
        deleted data file, give disk space back). Logs problems; never raises."""
        ...

    def close(self) -> None: ...


def database_path(data_dir: Path, port: int) -> Path:
    """One file per port, so several servers can share a data directory."""
    return data_dir / f"jobserver-{port}.sqlite3"


def open_store(
    kind: str,
    data_dir: Path,
    port: int,
    *,
    node_id: str | None = None,
    lease: float | None = None,
) -> JobStore | None:
    """The store of that kind, ready to load; None for `memory` (nothing to keep). `kind` may
    be a postgresql:// URI: the store shared by a cluster, where this server is `node_id`
    (default <hostname>:<port>) holding a lease of `lease` seconds. Raises StoreError naming
    the file or database and the problem."""
    if kind == "memory":
        return None
    if is_postgresql_uri(kind):
        from .lease import DEFAULT_LEASE
        from .postgresql import PostgresStore  # imports psycopg: only for clusters

        node = node_id or f"{socket.gethostname()}:{port}"
        return PostgresStore.open(kind, node, DEFAULT_LEASE if lease is None else lease)
    if kind != "sqlite":
        raise StoreError(
            f"unknown store {kind!r}; choose one of {', '.join(STORE_KINDS)} or a postgresql:// URI"
        )
    from .sqlite import SqliteStore

    return SqliteStore.open(data_dir, database_path(data_dir, port))
