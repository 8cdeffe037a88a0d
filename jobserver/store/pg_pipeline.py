"""Batches written back to back on the store's one connection, in libpq's pipeline mode.

Written one at a time, each batch left the database idle while its result travelled back, the
store's thread handed it over, and the serving thread took the next batch and passed it down
(under the submit benchmark's load the statement ran 0.5 ms of the 2.4 ms a batch took). A
database on another machine adds its network round trip to every batch. In pipeline mode the
next batch's statement is sent while the database is still executing the one before, so the
database goes from one to the next at once. Each statement is followed by its own Sync, so each
is its own transaction: the database runs them one after another, in the order sent, as if they
had been sent one at a time, and one that fails does not abort the ones behind it.

psycopg's own pipeline waits for results whenever it syncs, so this drives libpq directly
(psycopg.pq) with the statement in its numbered form; it never blocks: the store's thread waits
for the connection's socket itself (commits.py), or, while the store is lent to the serving
thread, trio does (commit_loan.py).
"""

from __future__ import annotations

import re
import select
from collections.abc import Mapping

import psycopg
from psycopg import pq

from . import pg_schema as sql
from .pg_arrays import ARRAY_TYPES

_NAMES: list[str] = []


def _number(match: re.Match[str]) -> str:
    name = match.group(1)
    if name not in _NAMES:
        _NAMES.append(name)
    return f"${_NAMES.index(name) + 1}"


STATEMENT = re.sub(r"%\((\w+)\)s", _number, sql.APPLY).encode()
"""APPLY with $1, $2, ... in place of its named parameters, in the order of _NAMES."""

_TEXT, _BINARY = 0, 1
_ARRAY_OIDS = {array_type: array_type.oid for array_type in ARRAY_TYPES}


class ApplyPipeline:
    """APPLY statements in flight on one connection, and their outcomes in the order sent."""

    def __init__(self, connection: psycopg.Connection) -> None:
        self.connection = connection
        self._pgconn = connection.pgconn
        self._pgconn.nonblocking = 1
        self._pgconn.enter_pipeline_mode()
        # Kept: once libpq finds the connection lost it closes the socket and will not say
        # which it was, and a trio task waiting on it must still be told (commit_loan.py).
        self._socket = self._pgconn.socket
        self.in_flight = 0
        self.unsent = False  # libpq holds bytes the socket did not take (send without waiting)
        self._written = False  # by the statement whose Sync has not come yet

    def fileno(self) -> int:
        return self._socket

    def send(self, parameters: Mapping[str, object], timeout: float | None) -> None:
        """Queue one APPLY with its Sync and send it. Raises psycopg.OperationalError when the
        connection fails, TimeoutError when the socket takes nothing for `timeout` seconds.
        With no timeout it never waits: what the socket does not take is left in libpq
        (`unsent`), for `flush` once the socket is writable."""
        values: list[bytes | None] = []
        types: list[int] = []
        formats: list[int] = []
        for name in _NAMES:
            value = parameters[name]
            oid = _ARRAY_OIDS.get(type(value))
            if oid is None:
                values.append(str(value).encode())  # node, term, lease: as text
                types.append(0)  # the statement's casts decide
                formats.append(_TEXT)
            else:
                values.append(value.data)  # type: ignore[attr-defined]
                types.append(oid)
                formats.append(_BINARY)
        self._pgconn.send_query_params(STATEMENT, values, types, formats, _TEXT)
        self._pgconn.pipeline_sync()
        self.in_flight += 1
        if timeout is None:
            self.flush()
        else:
            self._flush(timeout)

    def flush(self) -> None:
        """Send what libpq holds, without waiting; `unsent` says whether some is left. Takes
        the database's results in too, so that it is never stuck writing them to us."""
        pgconn = self._pgconn
        self.unsent = pgconn.flush() == 1
        if self.unsent:
            pgconn.consume_input()

    def _flush(self, timeout: float) -> None:
        """Send what libpq holds. While the socket is full, read too: the database may be
        waiting for us to take its results before it reads more."""
        pgconn = self._pgconn
        while pgconn.flush() == 1:
            readable, writable, _ = select.select([pgconn.socket], [pgconn.socket], [], timeout)
            if not readable and not writable:
                raise TimeoutError("the database took no data")
            if readable:
                pgconn.consume_input()

    def collect(self) -> list[bool]:
        """Whether each batch completed since the last call was written, oldest first (after
        the socket was readable; [] if nothing has completed). A batch was not written when
        the term has changed (APPLY answers 0) or its statement failed: either way `apply`
        writes it again and says why. Raises psycopg.OperationalError when the connection
        fails."""
        pgconn = self._pgconn
        pgconn.consume_input()
        outcomes: list[bool] = []
        while self.in_flight and not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                continue  # the end of one statement's results
            status = result.status
            if status == pq.ExecStatus.PIPELINE_SYNC:
                outcomes.append(self._written)
                self._written = False
                self.in_flight -= 1
            elif status == pq.ExecStatus.TUPLES_OK:
                self._written = result.get_value(0, 0) == b"1"
        return outcomes

    def close(self) -> None:
        """Leave pipeline mode (nothing may be in flight), so the connection serves ordinary
        statements again."""
        assert self.in_flight == 0
        self._pgconn.exit_pipeline_mode()
        self._pgconn.nonblocking = 0
