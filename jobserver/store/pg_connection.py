"""The store's one connection to PostgreSQL: opened with timeouts, named without its password,
cut when a statement hangs, and opened again with backoff after a failure.

psycopg's synchronous calls have no timeout of their own. A database behind a cut network
answers nothing and the kernel keeps the socket open for many minutes; libpq's keepalives and
tcp_user_timeout do not fire while the peer's kernel still acknowledges (a frozen proxy, a
stopped host). So a watchdog thread shuts the socket down once a call has run past its
deadline: libpq sees the end of the stream at once and the call fails like any lost
connection. The store's thread never blocks for longer than that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
from psycopg import conninfo

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5
"""Seconds libpq may take to connect (TCP, TLS, authentication); libpq's own minimum is 2."""

CALL_DEADLINE = 5.0
"""Seconds a statement or transaction may run before its connection is cut and the call fails.
A healthy database commits a batch in milliseconds; a stall this long means the network or
the database is gone, and the submits waiting on it are better refused (QUEUE_ERROR, the
client may retry elsewhere) than held."""

DEADLINE_PER_BYTE = 1 / (20 * 1024 * 1024)
"""More time for big batches: a second per 20 MiB written, far below any disk or network a
database runs on, so a batch of large payloads is never cut for its size."""

WATCHDOG_TICK = 0.25
"""How often the watchdog looks at the deadline: a hung call is cut at most this late."""

RECONNECT_FIRST_DELAY = 0.2
RECONNECT_MAX_DELAY = 2.0
"""Backoff between attempts to connect again: from 0.2 s, doubling, at most 2 s, so a restarted
database is found again within 2 s by every server (a peer may take over only once each has
had that long to come back, see postgresql.py), while a dead one costs one attempt per 2 s."""

LOCK_TIMEOUT_MS = 2000
"""A statement waits this long for a row lock, then fails and is tried again later: takeover
and renewal lock node rows and must not queue behind each other indefinitely."""

IDLE_IN_TRANSACTION_TIMEOUT_MS = 5000
"""The database ends a session of ours that sits idle inside a transaction this long: a server
frozen mid-transaction (SIGSTOP) must not hold its row locks, and so block its own takeover."""


def describe(uri: str) -> str:
    """The database as logs and errors name it: user, host, port and database, no password."""
    try:
        parts = conninfo.conninfo_to_dict(uri)
    except psycopg.Error:
        return "postgresql://(unparsable URI)"
    user = parts.get("user")
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    database = parts.get("dbname") or user or ""
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{database}"


def redact(text: str, uri: str) -> str:
    """`text` (a driver's error message, say) with the URI's password taken out."""
    with contextlib.suppress(psycopg.Error):
        password = conninfo.conninfo_to_dict(uri).get("password")
        if password:
            text = text.replace(str(password), "***")
    return text


class Unavailable(Exception):
    """The database cannot be reached now; the message names it and says why."""


class PgConnection:
    """One autocommit connection, reopened on demand after failures (with backoff)."""

    def __init__(self, uri: str, application_name: str) -> None:
        self.uri = uri
        self.description = describe(uri)
        self._application_name = application_name
        self._connection: psycopg.Connection | None = None
        self._retry_at = 0.0
        self._delay = RECONNECT_FIRST_DELAY
        self._last_problem = ""
        self.connected_at = 0.0  # monotonic time of the last (re)connection
        self._deadline: float | None = None
        self._lock = threading.Lock()  # the connection against the watchdog's cut
        self._closed = False
        self._watchdog = threading.Thread(
            target=self._watch, name="jobserver-store-watchdog", daemon=True
        )
        self._watchdog.start()

    def connect_now(self) -> None:
        """Connect at start; raises Unavailable naming the database and the cause."""
        self._connection = self._open()
        self.connected_at = time.monotonic()

    @contextlib.contextmanager
    def call(self, size: int = 0) -> Iterator[psycopg.Connection]:
        """The connection, for one statement or transaction that must finish within the
        deadline (longer by `size` bytes written). A failure of the connection closes it and
        raises Unavailable; the next call connects again once the backoff allows."""
        connection = self.open_connection()
        self._deadline = time.monotonic() + CALL_DEADLINE + size * DEADLINE_PER_BYTE
        try:
            yield connection
        except (psycopg.OperationalError, psycopg.InterfaceError) as problem:
            if not connection.closed and not _connection_lost(connection):
                raise  # the statement failed (a lock timeout, say); the connection is fine
            raise self.lost(connection, problem) from None
        finally:
            self._deadline = None

    def open_connection(self) -> psycopg.Connection:
        """The connection, opened again if it was lost and the backoff allows; raises
        Unavailable. For a caller that keeps its own deadlines (the pipeline); `call` for
        the rest."""
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        now = time.monotonic()
        if now < self._retry_at:
            raise Unavailable(
                f"database {self.description} unreachable ({self._last_problem}); "
                f"next attempt in {self._retry_at - now:.1f} s"
            )
        try:
            connection = self._open()
        except Unavailable as problem:
            self._back_off(str(problem))
            raise
        self._connection = connection
        self.connected_at = time.monotonic()
        self._delay = RECONNECT_FIRST_DELAY
        log.warning("database %s reachable again", self.description)
        return connection

    def lost(
        self, connection: psycopg.Connection, problem: BaseException, *, back_off: bool = True
    ) -> Unavailable:
        """Close a connection that failed (or stopped answering), start the backoff (unless
        the database is not to blame), and return the Unavailable that says so."""
        self._drop(connection)
        cause = redact(str(problem).strip().splitlines()[0] if str(problem) else "", self.uri)
        cause = cause or type(problem).__name__
        if back_off:
            self._back_off(cause, first=True)
        return Unavailable(f"database {self.description} unreachable: {cause}")

    def close(self) -> None:
        self._closed = True
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def _open(self) -> psycopg.Connection:
        try:
            connection = psycopg.connect(
                self.uri,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                application_name=self._application_name,
                # A dead peer is noticed by the kernel too, not only by the watchdog.
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                tcp_user_timeout=int(CALL_DEADLINE * 1000),
            )
            connection.execute(
                f"SET lock_timeout = {LOCK_TIMEOUT_MS};"
                f" SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_TIMEOUT_MS}"
            )
        except psycopg.Error as problem:
            text = str(problem).strip().replace("\n", " ") or type(problem).__name__
            raise Unavailable(
                f"cannot connect to database {self.description}: {redact(text, self.uri)}"
            ) from None
        return connection

    def _back_off(self, problem: str, *, first: bool = False) -> None:
        if first:
            self._delay = RECONNECT_FIRST_DELAY
        self._last_problem = problem
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, RECONNECT_MAX_DELAY)

    def _drop(self, connection: psycopg.Connection) -> None:
        with self._lock:
            if self._connection is connection:
                self._connection = None
        with contextlib.suppress(Exception):
            connection.close()

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(WATCHDOG_TICK)
            deadline = self._deadline
            if deadline is None or time.monotonic() < deadline:
                continue
            with self._lock:
                connection = self._connection
                if connection is None or self._deadline is None:
                    continue
                log.error(
                    "database %s did not answer within %.1f s; cutting the connection",
                    self.description,
                    CALL_DEADLINE,
                )
                self._deadline = None
                _shut_down(connection)


def _connection_lost(connection: psycopg.Connection) -> bool:
    return connection.broken or connection.pgconn.status != psycopg.pq.ConnStatus.OK


def _shut_down(connection: psycopg.Connection) -> None:
    """End the socket's stream under libpq's feet without closing its descriptor (closing it
    would let the number be reused while libpq still holds it)."""
    with contextlib.suppress(OSError):
        duplicate = socket.socket(fileno=os.dup(connection.fileno()))
        try:
            duplicate.shutdown(socket.SHUT_RDWR)
        finally:
            duplicate.close()
