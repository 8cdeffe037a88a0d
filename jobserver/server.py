"""The trio layer around the engine: sockets in, bytes out, nothing decided here.

This file holds the server's configuration and lifecycle: opening the store, the listeners
and the engine (`bind`), the server-wide tasks (`serve`: the flush task, the timers, the
commit pacer, the lease watch, HTTP), and shutdown. Serving each connection is in
server_connections.py, the server's side of the store in server_store.py (both mixins of
Server).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .access import DenialLog
from .acl import AccessList
from .admin import AdminProtocol, ServerFacts
from .commits import Committer
from .engine import Engine
from .engine.counters import StoreCommits
from .engine.dead_set import DEFAULT_DEAD_TTL, DEFAULT_MAX_DEAD
from .engine.failures import DEFAULT_RETRY_DELAY
from .engine.handles import default_prefix
from .listener import ConnectionGate, default_max_connections
from .memory_budget import MemoryBudget, default_memory_budget
from .ownership import Ownership
from .protocol import DEFAULT_MAX_PACKET_SIZE
from .server_connections import ConnectionDuties
from .server_store import StoreDuties
from .store import JobStore, open_store
from .store.location import default_data_dir
from .tls import HandshakeFailures, TlsConfigError, server_context

log = logging.getLogger("jobserver")

DEFAULT_READ_TIMEOUT = 30.0
"""Seconds a connection may sit inside a packet (part of a header, body or admin line received,
the rest not coming) before it is closed; idle connections between packets are never closed
(sleeping workers are idle for hours). Without it, 2,000 connections sending a header and then
a byte a second were held open forever."""

INTERNAL_ERROR_PAUSE = 0.1
"""After an unexpected exception in the timer task or the commit pacer (logged), how long it
waits before going on, so a persistent fault is a slow trickle of log lines, not a spin."""

MAX_TIMER_SLEEP = 60.0
"""The timer task re-reads the clocks at least this often, so a wall-clock step cannot leave an
epoch job waiting far past its time."""

DEFAULT_BACKLOG = 1024
"""Listen backlog; gearmand's 32 overflows when thousands of workers reconnect at once."""


@dataclass
class ServerConfig:
    port: int = 4730
    listen: str | None = None  # None: every address, IPv4 and IPv6
    job_retries: int = 0
    worker_wakeup: int = 0
    handle_prefix: str | None = None  # default: H:<hostname>:<port>
    exceptions: bool = False
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    keepalive: bool = True
    backlog: int = DEFAULT_BACKLOG
    store: str = "sqlite"  # or "memory", or a postgresql:// URI (a cluster's shared store)
    node_id: str | None = None  # with postgresql: this server's name; None: <hostname>:<port>
    lease: float | None = None  # with postgresql: seconds; None: store/postgresql.DEFAULT_LEASE
    http: tuple[str, int] | None = None  # --http: metrics, status JSON and page (http_status.py)
    bg_retries: int = 0  # failed background jobs: attempts after the first (engine/failures.py)
    bg_retry_delay: float = DEFAULT_RETRY_DELAY
    dead_max: int = DEFAULT_MAX_DEAD
    dead_ttl: float = DEFAULT_DEAD_TTL
    data_dir: Path = field(default_factory=default_data_dir)
    facts: ServerFacts = field(default_factory=ServerFacts)
    max_connections: int | None = None  # None: RLIMIT_NOFILE less a reserve (listener.py)
    read_timeout: float = DEFAULT_READ_TIMEOUT  # 0: never close a connection stalled mid-packet
    memory_budget: int | None = None  # bytes; None: from the machine and limits (memory_budget.py)
    tls_cert: Path | None = None  # serve TLS (tls.py): on tls_port, or on port if that is None
    tls_key: Path | None = None  # None: the key is in tls_cert's file
    tls_ca: Path | None = None  # require client certificates signed by this CA (mTLS)
    tls_port: int | None = None  # a TLS listener beside the plaintext one on `port`
    acl: AccessList | None = None  # --acl: who may submit, register, administer (acl.py)
    loopback_identity: str | None = None  # the ACL identity of plaintext loopback peers


class StartError(Exception):
    """The server cannot start (besides the store and the Gearman port); the message says
    what and why, in one line."""


class Server(ConnectionDuties, StoreDuties):
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.admin: AdminProtocol | None = None
        self.store: JobStore | None = None
        self.port: int | None = None
        self._timer_changed = trio.lowlevel.ParkingLot()
        self._timer_due: float | None = None
        self._committer: Committer | None = None
        self._ownership: Ownership | None = None  # with a shared store: its lease
        self._http_listeners: list[trio.SocketListener] = []  # --http (http_status.py)
        self.tls_listeners: list[trio.SocketListener] = []  # served with TLS (tls.py)
        self._nursery: trio.Nursery | None = None  # serve()'s: connections and their writers
        self._flush_wanted = False
        self._flush_lot = trio.lowlevel.ParkingLot()
        self.tls_port: int | None = None
        self.tls_failures = HandshakeFailures()
        self.denials = DenialLog()  # requests refused by --acl: the log's and /metrics' count
        self.store_commits = StoreCommits()  # each batch's time and refusals, for /metrics
        self._commit_wakeup = trio.lowlevel.ParkingLot()
        self._removes_due: float | None = None  # when removes waiting for company must go
        self._removes_failing = False  # the last batch's removes were refused
        self.budget = MemoryBudget(
            config.memory_budget if config.memory_budget is not None else default_memory_budget()
        )
        self.gate = ConnectionGate(
            config.max_connections
            if config.max_connections is not None
            else default_max_connections()
        )

    async def bind(self) -> list[trio.SocketListener]:
        """Open the store, the listening sockets and the engine, and load the stored jobs.
        Raises StoreError (bad database) or OSError (port busy, bad address) before serving
        anything, so the CLI can report it plainly."""
        config = self.config
        self._tls_context = None
        if config.tls_cert is not None:
            try:
                self._tls_context = server_context(config.tls_cert, config.tls_key, config.tls_ca)
            except TlsConfigError as error:
                raise StartError(str(error)) from None
        if config.port:  # a bad database should fail before we take the port
            self.store = self._open_store(config.port)
        listeners: list[trio.SocketListener] = []
        try:
            listeners = await trio.open_tcp_listeners(
                config.port, host=config.listen, backlog=config.backlog
            )
            self.port = listeners[0].socket.getsockname()[1]
            if self._tls_context is not None:
                if config.tls_port is None:
                    self.tls_listeners = list(listeners)
                    self.tls_port = self.port
                else:
                    self.tls_listeners = await self._open_tls_listeners(config.tls_port)
                    listeners += self.tls_listeners
            if not config.port:
                self.store = self._open_store(self.port)
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self.close_store()
            raise
        prefix = config.handle_prefix or default_prefix(socket.gethostname(), self.port)
        self.engine = Engine(
            handle_prefix=prefix,
            job_retries=config.job_retries,
            worker_wakeup=config.worker_wakeup,
            exceptions=config.exceptions,
            start_time_ms=int(time.time() * 1000),
            durable=self.store is not None,
            bg_retries=config.bg_retries,
            bg_retry_delay=config.bg_retry_delay,
            dead_max=config.dead_max,
            dead_ttl=config.dead_ttl,
        )
        if self.store is not None:
            # Before the first connection is served: reloaded jobs coalesce and run as before.
            stored = self.store.load()
            count = self.engine.restore(stored, self.store.next_record_id)
            self.engine.restore_dead(self.store.load_dead())
            self.engine.expire_dead()  # those past --dead-ttl while the server was down
            self._log_dead_dropped()
            self.engine.restore_policies(self.store.load_policies())
            log.info("loaded %d stored jobs from %s", count, getattr(self.store, "path", "?"))
            lease = getattr(self.store, "lease", None)
            if lease is not None:
                self._ownership = Ownership(self.engine, lease)
        self.admin = AdminProtocol(self.engine, config.facts)
        if config.http is not None:
            from .http_status import open_http  # its libraries only when asked for

            host, port = config.http
            try:
                self._http_listeners = await open_http(host, port)
            except OSError as error:
                self.close_store()
                raise StartError(
                    f"cannot listen for HTTP on {host} port {port}: {error.strerror or error}"
                ) from None
        for listener in listeners:
            address = listener.socket.getsockname()
            tls = " (TLS)" if listener in self.tls_listeners else ""
            log.info("listening on %s port %d%s", address[0], address[1], tls)
        return listeners

    async def _open_tls_listeners(self, port: int) -> list[trio.SocketListener]:
        config = self.config
        try:
            tls_listeners = await trio.open_tcp_listeners(
                port, host=config.listen, backlog=config.backlog
            )
        except OSError as error:
            where = config.listen or "all addresses"
            raise StartError(
                f"cannot listen for TLS on {where} port {port}: {error.strerror or error}"
            ) from None
        self.tls_port = tls_listeners[0].socket.getsockname()[1]
        return tls_listeners

    def _open_store(self, port: int) -> JobStore | None:
        config = self.config
        return open_store(
            config.store, config.data_dir, port, node_id=config.node_id, lease=config.lease
        )

    def close_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    async def serve(
        self,
        listeners: list[trio.SocketListener] | None = None,
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; cancelling closes the listeners and every connection."""
        if listeners is None:
            listeners = await self.bind()
        if self.store is not None:
            token = trio.lowlevel.current_trio_token()
            self._committer = Committer(
                self.store, lambda: token.run_sync_soon(self._take_commits), lend=True
            )
        log.info(
            "serving at most %d connections; memory budget %d MiB for peers' buffers",
            self.gate.max_connections,
            self.budget.limit // (1024 * 1024),
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery  # connections' writer tasks start here
                nursery.start_soon(self._flush_after_reads)
                nursery.start_soon(self._run_timers)
                if self._committer is not None:
                    nursery.start_soon(self._pace_commits)
                    if self._committer.lends:
                        nursery.start_soon(self._committer.serve_loan, self._take_commits)
                if self._ownership is not None:
                    nursery.start_soon(self._watch_ownership)
                nursery.start_soon(self._tend_dead_set)
                if self.tls_listeners:
                    nursery.start_soon(self.tls_failures.report_pending)
                if self._http_listeners:
                    from .http_status import serve_http

                    nursery.start_soon(serve_http, self, self._http_listeners)
                for listener in listeners:
                    handler = (
                        self._serve_tls
                        if listener in self.tls_listeners
                        else self._serve_connection
                    )
                    nursery.start_soon(self.gate.serve, listener, handler, nursery)
                task_status.started(listeners)
        finally:
            self.gate.close()
            self._final_commit()
            self.close_store()

    # ------------------------------------------------------------------ timers

    async def _run_timers(self) -> None:
        engine = self.engine
        assert engine is not None
        while True:
            delay = engine.seconds_until_next_timer()
            sleep = MAX_TIMER_SLEEP if delay is None else min(delay, MAX_TIMER_SLEEP)
            self._timer_due = trio.current_time() + sleep
            with trio.move_on_after(sleep):
                await self._timer_changed.park()
            self._timer_due = None
            try:
                engine.run_timers()
                self._flush()
            except Exception:
                await self._internal_error("the timer task")

    async def _internal_error(self, where: str) -> None:
        """A fault in a server-wide task: log it and go on after a pause; the server lives."""
        with contextlib.suppress(Exception):  # out of memory even for the log line
            log.exception("internal error in %s; going on", where)
        await trio.sleep(INTERNAL_ERROR_PAUSE)
