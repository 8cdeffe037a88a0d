"""The shared store of a cluster: durable background jobs in one PostgreSQL database that every
server of the cluster points at (`--store postgresql://...`, issue 12).

Each server keeps its own queue in memory for dispatch, as with sqlite; the database is the
durable copy, written in batches from the store's thread (jobserver/commits.py), one statement
and one commit per batch. What sqlite cannot give: when a server dies, its jobs are not lost
with its disk nor stranded while it is down. Every server holds a lease on its jobs, renewed
about every second and timed by the database's clock alone; a live peer that finds a lease
expired takes that server's jobs over, in one transaction that also bumps its term (the fencing
token). Every write a server makes carries its node id and term, so a server that was frozen
or cut off writes nothing once it has been taken over; and it stops handing out its jobs well
before its lease can expire (lease.py). The contract is at least once: a job a dead server had
handed to a worker runs again on its new owner.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable

import psycopg

from ..engine.journal import Batch, DeadJob, RetryPolicy, StoredJob, StoreExtras
from ..logs import NOTICE
from . import StoreError
from . import pg_schema as sql
from .lease import DEFAULT_LEASE, MIN_LEASE, Adopted, Fenced, Lease
from .pg_arrays import BigintArray, integers, job_columns
from .pg_arrays import register as register_packed_arrays
from .pg_connection import (
    CALL_DEADLINE,
    RECONNECT_MAX_DELAY,
    PgConnection,
    Unavailable,
    redact,
)
from .pg_pipeline import ApplyPipeline

log = logging.getLogger(__name__)

# For every connection (these array types are ours alone, so the global map is safe).
register_packed_arrays(psycopg.adapters)

PIPELINES = psycopg.Pipeline.is_supported()
"""libpq's pipeline mode (libpq 14 and newer; psycopg's binary wheels bundle one)."""

PIPELINE_DEPTH = 2
"""Batches in flight at once: while the database runs one, the next is on its way, so it never
waits for us. A third gained 4% alone and nothing under load (bench/RESULTS.md)."""

RENEWALS_PER_LEASE = 4
RENEW_INTERVAL_MAX = 1.0
"""The lease is renewed every lease/4 seconds, at most every second: several renewals fit in
the trusted half of a lease (lease.py), so one slow or lost one does not put the jobs on hold."""


class PostgresStore:
    """The JobStore interface (see __init__.py), plus a lease: see the module docstring."""

    def __init__(self, connection: PgConnection, node_id: str, lease: Lease) -> None:
        self._db = connection
        self.node_id = node_id
        self.lease = lease
        self.path = connection.description  # how the server's log names the store
        self.check_interval = min(RENEW_INTERVAL_MAX, lease.seconds / RENEWALS_PER_LEASE)
        self._term = 0
        self._next_record_id = 1
        self._record_ids_end = 1  # one past every record id ever handed to apply
        self._superseded: str | None = None  # why this process may no longer write
        self._outage_logged = False
        self.pipeline_depth = PIPELINE_DEPTH if PIPELINES else 1  # see commits.py
        self._pipeline: ApplyPipeline | None = None
        self._sent: collections.deque[tuple[int, float]] = collections.deque()
        # per batch in flight: its first record id, when it was sent
        # Called with the pipeline's socket just before it is closed: set while the store is
        # lent to the serving thread, whose trio task may be waiting on that socket
        # (commit_loan.py; trio must hear of it first, or the wait would outlive the socket).
        self.on_pipeline_closing: Callable[[int], None] | None = None

    @classmethod
    def open(cls, uri: str, node_id: str, lease_seconds: float = DEFAULT_LEASE) -> PostgresStore:
        """Connect and create or migrate the schema. Raises StoreError naming the database
        (password left out) and the cause."""
        if lease_seconds < MIN_LEASE:
            raise StoreError(f"--lease {lease_seconds:g}: at least {MIN_LEASE:g} s")
        connection = PgConnection(uri, f"jobserver {node_id}"[:63])
        try:
            connection.connect_now()
            with connection.call() as db:
                _migrate(db)
        except StoreError:
            connection.close()
            raise
        except Unavailable as problem:
            connection.close()
            raise StoreError(str(problem)) from None
        except psycopg.Error as problem:
            connection.close()
            text = redact(str(problem).strip().replace("\n", " "), uri)
            raise StoreError(f"database {connection.description}: {text}") from None
        return cls(connection, node_id, Lease(lease_seconds))

    # ------------------------------------------------------------------ JobStore

    @property
    def next_record_id(self) -> int:
        return self._next_record_id

    def load(self) -> list[StoredJob]:
        """Join the cluster under a new term and return this node's jobs, oldest first.
        Jobs a peer took over while this node was down are the peer's and are not loaded."""
        sent_at = time.monotonic()
        try:
            with self._db.call() as db, db.transaction():
                self._term = self._join(db)
                rows = db.execute(sql.LOAD, (self.node_id,)).fetchall()
        except (Unavailable, psycopg.Error) as problem:
            raise StoreError(self._describe_failure(problem)) from None
        self.lease.renewed(sent_at)
        jobs = [StoredJob(*row) for row in rows]
        highest = max((job.record_id for job in jobs), default=0)
        self._next_record_id = self._record_ids_end = max(1, highest + 1)
        log.log(NOTICE, "joined the cluster as %s, term %d", self.node_id, self._term)
        return jobs

    def load_dead(self) -> list[DeadJob]:
        """This node's dead set, oldest first (after load)."""
        return [DeadJob(*row) for row in self._fetch(sql.LOAD_DEAD, (self.node_id,))]

    def load_policies(self) -> list[tuple[bytes, RetryPolicy]]:
        """The cluster's retry policies, set by the `retries` admin command."""
        rows = self._fetch(sql.LOAD_POLICIES, ())
        return [(function, RetryPolicy(retries, delay)) for function, retries, delay in rows]

    def _fetch(self, statement: str, parameters: tuple[object, ...]) -> list[tuple]:
        try:
            with self._db.call() as db:
                return db.execute(statement, parameters).fetchall()
        except (Unavailable, psycopg.Error) as problem:
            raise StoreError(self._describe_failure(problem)) from None

    def apply(
        self, adds: list[StoredJob], removes: list[int], extras: StoreExtras | None = None
    ) -> None:
        self.end_pipeline()
        adds, removes = self._net(adds, removes)
        if not adds and not removes and not extras:
            return
        if self._superseded is not None:
            # The removes and the dead set are the newer server's business now; drop them,
            # refuse the adds.
            if adds:
                raise StoreError(self._superseded, removes_written=True)
            return
        size = sum(len(job.payload) for job in adds)
        for attempt in (1, 2):
            sent_at = time.monotonic()
            try:
                with self._db.call(size) as db:
                    written = self._write(db, adds, removes, extras)
            except Unavailable as problem:
                raise StoreError(str(problem), busy=True) from None
            except psycopg.Error as problem:
                raise StoreError(self._describe_failure(problem)) from None
            if written:
                self.lease.renewed(sent_at)
                return
            if attempt == 1:  # fenced: the jobs recorded so far are a peer's now
                below = adds[0].record_id if adds else self._record_ids_end
                self._rejoin_after_fencing(below)
                if self._superseded is not None:
                    raise StoreError(self._superseded, removes_written=True)
        raise StoreError(f"database {self.path}: fenced again right after joining anew")

    def _net(self, adds: list[StoredJob], removes: list[int]) -> tuple[list[StoredJob], list[int]]:
        """The adds and removes to write. A job added and removed in one batch (it finished
        before its batch was taken) is neither: APPLY's DELETE could not see its INSERT's row
        anyway."""
        if adds:
            self._record_ids_end = max(self._record_ids_end, adds[-1].record_id + 1)
            if removes:
                cancelled = {job.record_id for job in adds}.intersection(removes)
                if cancelled:
                    adds = [job for job in adds if job.record_id not in cancelled]
                    removes = [record_id for record_id in removes if record_id not in cancelled]
        return adds, removes

    # ------------------------------------------------------------------ pipelined batches

    def prepare_pipeline(self) -> bool:
        """Connect if need be and enter pipeline mode, so that `send_batch(wait=False)` neither
        connects nor blocks: for the store's thread, before it lends the store to the serving
        thread (commit_loan.py). False when the database cannot be reached or this node may
        write no more."""
        if self._superseded is not None or not PIPELINES:
            return False
        if self._pipeline is None:
            try:
                self._pipeline = ApplyPipeline(self._db.open_connection())
            except Unavailable:
                return False
            except psycopg.Error as problem:
                self._pipeline_lost(problem)
                return False
        return True

    def send_batch(self, batch: Batch, *, wait: bool = True) -> bool:
        """Send a batch's APPLY behind those in flight (pg_pipeline.py), without waiting; its
        outcome comes from `receive_batches`, in order. False when the batch must be written
        with `apply` instead, once nothing is in flight: it changes the dead set or the
        policies (written in one transaction with it), or this node may write no more. Raises
        StoreError (busy) when the database cannot be reached: whatever was in flight is lost
        with the connection, and `abandon_pipeline` must be called. With `wait` False (the
        serving thread, after `prepare_pipeline`) it never blocks: no connecting, and what the
        socket does not take waits in libpq for `flush_pipeline`."""
        if batch.extras is not None or self._superseded is not None or not PIPELINES:
            return False
        pipeline = self._pipeline
        if pipeline is None and not wait:
            raise StoreError(f"database {self.path}: no pipeline open", busy=True)
        adds, removes = self._net(batch.adds, batch.removes)
        try:
            if pipeline is None:
                pipeline = self._pipeline = ApplyPipeline(self._db.open_connection())
            parameters = {
                "node": self.node_id,
                "term": self._term,
                "lease": self.lease.seconds,
                **job_columns(adds),
                "removes": integers(BigintArray, removes),
            }
            start = adds[0].record_id if adds else batch.end
            self._sent.append((start, time.monotonic()))
            pipeline.send(parameters, CALL_DEADLINE if wait else None)
        except Unavailable as problem:
            raise StoreError(str(problem), busy=True) from None
        except (psycopg.Error, OSError) as problem:  # TimeoutError is an OSError
            raise StoreError(self._pipeline_lost(problem), busy=True) from None
        return True

    @property
    def pipeline_unsent(self) -> bool:
        """Whether part of what was sent without waiting still waits for the socket."""
        return self._pipeline is not None and self._pipeline.unsent

    def flush_pipeline(self) -> None:
        """Send more of what waits for the socket, without waiting (the socket was writable).
        Raises StoreError (busy) when the connection fails."""
        if self._pipeline is None:
            return
        try:
            self._pipeline.flush()
        except psycopg.Error as problem:
            raise StoreError(self._pipeline_lost(problem), busy=True) from None

    @property
    def pipeline_fileno(self) -> int | None:
        """The socket to wait on while batches are in flight."""
        return None if self._pipeline is None else self._pipeline.fileno()

    @property
    def oldest_deadline(self) -> float:
        """When the oldest batch in flight is overdue (monotonic): the database is then taken
        for unreachable (`abandon_pipeline`), as a hung call is (pg_connection.py)."""
        return self._sent[0][1] + CALL_DEADLINE if self._sent else math.inf

    def receive_batches(self) -> list[bool]:
        """Whether each batch completed since the last call was written, in the order sent.
        One that was not (fenced, or its statement failed) is to be written again with
        `apply`, which deals with fencing and failures as for any batch, once every batch in
        flight has come back. Raises StoreError (busy) when the connection fails."""
        pipeline = self._pipeline
        if pipeline is None:
            return []
        try:
            outcomes = pipeline.collect()
        except psycopg.Error as problem:
            raise StoreError(self._pipeline_lost(problem), busy=True) from None
        for written in outcomes:
            start, sent_at = self._sent.popleft()
            if written:
                self.lease.renewed(sent_at)
            else:
                # Nothing of it was written: a fencing found later names its records as never
                # stored (for `apply` to write), not as a peer's.
                self._record_ids_end = min(self._record_ids_end, start)
        return outcomes

    def end_pipeline(self) -> None:
        """Leave pipeline mode once nothing is in flight, so the connection serves ordinary
        statements (apply, check) again."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is None:
            return
        try:
            pipeline.close()
        except psycopg.Error as problem:
            self._pipeline_lost(problem)

    def abandon_pipeline(self, error: BaseException | None = None) -> str:
        """The batches in flight will not be answered: they went unanswered past their
        deadline (no `error`), or a bug of ours broke the exchange. Drop the connection, as
        the watchdog cuts a hung call. Returns why, for the log and the refusals."""
        if error is None:
            error = TimeoutError(f"no answer within {CALL_DEADLINE:g} s")
            log.error("database %s: %s; cutting the connection", self.path, error)
            return self._pipeline_lost(error)
        self._pipeline_lost(error, back_off=False)  # the database is not to blame
        return f"internal error: {error!r} (the connection to {self.path} was closed)"

    def _pipeline_lost(self, problem: BaseException, *, back_off: bool = True) -> str:
        pipeline, self._pipeline = self._pipeline, None
        self._sent.clear()
        if pipeline is None:
            return self._describe_failure(Unavailable(str(problem)))
        if self.on_pipeline_closing is not None:
            self.on_pipeline_closing(pipeline.fileno())
        return str(self._db.lost(pipeline.connection, problem, back_off=back_off))

    # ------------------------------------------------------------------ writing one batch

    def _write(
        self,
        db: psycopg.Connection,
        adds: list[StoredJob],
        removes: list[int],
        extras: StoreExtras | None,
    ) -> bool:
        """Write a batch under this node's term, renewing its lease; False, writing nothing,
        if the term has changed (fenced)."""
        lease = {"node": self.node_id, "term": self._term, "lease": self.lease.seconds}
        if extras is None:
            return self._apply(db, lease, adds, removes)  # committed on its own
        # Dead-set and policy changes (rare) go in the same transaction, after the statement
        # has said the term still holds.
        try:
            with db.transaction():
                if not self._apply(db, lease, adds, removes):
                    raise _FencedError  # rolls the transaction back
                self._write_extras(db, extras)
        except _FencedError:
            return False
        return True

    @staticmethod
    def _apply(
        db: psycopg.Connection, lease: dict[str, object], adds: list[StoredJob], removes: list[int]
    ) -> bool:
        """APPLY: one statement, so one round trip, that renews the lease and, only if the term
        matched, inserts the adds and deletes the removes. Never prepared: a generic plan
        cannot see how few ids `removes` holds and scans the whole table for them (a 200-row
        batch with one remove took 10 ms against 2 ms, 250,000 jobs in the table)."""
        parameters = {**lease, **job_columns(adds), "removes": integers(BigintArray, removes)}
        row = db.cursor(binary=True).execute(sql.APPLY, parameters, prepare=False).fetchone()
        assert row is not None
        return bool(row[0])

    def _write_extras(self, db: psycopg.Connection, extras: StoreExtras) -> None:
        node = self.node_id
        if extras.dead_adds:
            rows = [(node, *dead[:4], int(dead[4]), *dead[5:]) for dead in extras.dead_adds]
            with db.cursor() as cursor:
                cursor.executemany(sql.ADD_DEAD, rows)
        if extras.dead_removes:
            db.execute(sql.REMOVE_DEAD, {"node": node, "ids": extras.dead_removes})
        for function, policy in extras.policies:
            if policy is None:
                db.execute(sql.CLEAR_POLICY, (function,))
            else:
                db.execute(sql.SET_POLICY, (function, policy.retries, policy.base_delay))

    def check(self) -> None:
        """Renew the lease, and take over peers whose lease has expired. Logs problems (an
        outage once, not at every check)."""
        self.end_pipeline()
        if self._superseded is not None:
            return
        sent_at = time.monotonic()
        try:
            with self._db.call() as db:
                adopted = self._renew_and_take_over(db)
        except Unavailable as problem:
            if not self._outage_logged:
                log.error("%s; the lease is not renewed until it is back", problem)
                self._outage_logged = True
            return
        except psycopg.Error as problem:
            log.error("%s; trying again at the next check", self._describe_failure(problem))
            return
        except _FencedError:
            try:
                self._rejoin_after_fencing(self._record_ids_end)
            except StoreError as problem:
                log.error("%s", problem)
            return
        self._outage_logged = False
        if adopted is not None:
            self.lease.news.append(adopted)
        self.lease.renewed(sent_at)

    def close(self) -> None:
        """A clean stop: end the lease now, so that peers take the jobs over at once."""
        if self._pipeline is not None and self._pipeline.in_flight:
            self._pipeline_lost(RuntimeError("closed with batches in flight"))
        self.end_pipeline()
        self.lease.distrust()
        if self._term:
            try:
                with self._db.call() as db:
                    db.execute(sql.RELEASE, {"node": self.node_id, "term": self._term})
            except (Unavailable, psycopg.Error) as problem:
                log.warning("could not end the lease at stop (%s); peers wait for it", problem)
        self._db.close()

    # ------------------------------------------------------------------ leases

    def _join(self, db: psycopg.Connection) -> int:
        row = db.execute(sql.JOIN, {"node": self.node_id, "lease": self.lease.seconds}).fetchone()
        assert row is not None
        return int(row[0])

    def _rejoin_after_fencing(self, below: int) -> None:
        """This node's term changed under it. Every record below `below` is someone else's
        now; the serving thread drops those jobs (Fenced). If a peer took them over, join
        again under a new term. If nobody did, another process has joined under this node id
        (a second server started with the same --node-id, or a restart while the old process
        still ran): the newer one owns the jobs, and this one stores nothing more, rather than
        the two fencing each other in turn."""
        old_term = self._term
        sent_at = time.monotonic()
        try:
            with self._db.call() as db, db.transaction():
                row = db.execute(sql.READ_NODE, (self.node_id,)).fetchone()
                taken_over = row is None or row[1] is not None
                if taken_over:
                    self._term = self._join(db)
        except Unavailable as problem:
            raise StoreError(str(problem), busy=True) from None
        except psycopg.Error as problem:
            raise StoreError(self._describe_failure(problem)) from None
        if not taken_over:
            assert row is not None
            self._superseded = (
                f"node id {self.node_id} was joined by another server (term {row[0]}); node "
                "ids must be unique: this server stores no more background jobs"
            )
            log.critical("%s", self._superseded)
            self.lease.news.append(Fenced(below, old_term, row[0]))
            return
        log.error(
            "node %s was taken over by a peer (term %d): its jobs recorded so far run there; "
            "joined again as term %d",
            self.node_id,
            old_term,
            self._term,
        )
        self.lease.news.append(Fenced(below, old_term, self._term))
        self.lease.renewed(sent_at)  # after the news: the serving thread reads trust first

    def _renew_and_take_over(self, db: psycopg.Connection) -> Adopted | None:
        parameters = {"node": self.node_id, "term": self._term, "lease": self.lease.seconds}
        # A peer's lease may look expired only because the database was down for everyone (or
        # restarted): take nobody over until this server has been connected for a lease plus
        # the longest reconnect backoff, so that every live peer has connected and renewed.
        may_take_over = time.monotonic() >= (
            self._db.connected_at + self.lease.seconds + RECONNECT_MAX_DELAY
        )
        with db.transaction():
            if db.execute(sql.RENEW, parameters).fetchone() is None:
                raise _FencedError
            if not may_take_over:
                return None
            dead = db.execute(sql.TAKE_OVER_NODES, parameters).fetchall()
            if not dead:
                return None
            parameters["dead"] = [node for node, _term in dead]
            rows = db.execute(sql.TAKE_OVER_JOBS, parameters).fetchall()
            dead_rows = db.execute(sql.TAKE_OVER_DEAD, parameters).fetchall()
        rows.sort()  # by seq: the order they were first recorded
        per_node = collections.Counter(row[1] for row in rows)
        for node, term in dead:
            log.warning(
                "took over node %s: its lease expired; fenced at term %d; %d jobs",
                node,
                term,
                per_node[node],
            )
        dead_rows.sort()
        return Adopted(
            [(node, term) for node, term in dead],
            [StoredJob(*row[2:]) for row in rows],
            [DeadJob(*row[1:]) for row in dead_rows],
        )

    def _describe_failure(self, problem: Exception) -> str:
        text = str(problem).strip().replace("\n", " ") or type(problem).__name__
        if isinstance(problem, Unavailable):
            return text
        return f"database {self.path}: {redact(text, self._db.uri)}"


class _FencedError(Exception):
    """The renewal found another term: a peer has taken this node's jobs over."""


def _migrate(db: psycopg.Connection) -> None:
    """Create the schema, or bring it up to SCHEMA_VERSION, once, whoever starts first."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (sql.SCHEMA_LOCK,))
        db.execute(sql.CREATE_VERSION_TABLE)
        row = db.execute(sql.READ_VERSION).fetchone()
        version = row[0] if row and row[0] is not None else 0
        if version > sql.SCHEMA_VERSION:
            raise StoreError(
                f"schema version {version} is newer than this jobserver's "
                f"({sql.SCHEMA_VERSION}); upgrade jobserver"
            )
        for number, statements in sql.MIGRATIONS:
            if number > version:
                db.execute(statements)
                db.execute(sql.WRITE_VERSION, (number,))
                log.info("database schema migrated to version %d", number)
