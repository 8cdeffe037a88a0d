"""The trio layer around the engine: sockets in, bytes out, nothing decided here.

Each connection is one reader task and one writer task. The reader decodes every packet of a
read, applies them all to the engine, then wakes the writer of every connection that got output
(write coalescing: one send per connection per batch, however many packets). No task, lock or
syscall per packet.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .admin import AdminProtocol, ServerFacts
from .commits import Committer, write
from .engine import Engine, Peer
from .engine.handles import default_prefix
from .protocol import DEFAULT_MAX_PACKET_SIZE, AdminLine, Decoder, Packet, ProtocolError
from .store import JobStore, open_store
from .tcp import enable_keepalive

log = logging.getLogger("jobserver")

RECEIVE_SIZE = 65536
"""Bytes asked of the kernel per read: big enough to take a burst of pipelined packets at once."""

OUTBOX_HIGH_WATER = 4 * 1024 * 1024
"""A connection whose own unsent replies exceed this stops being read until they drain, so a
client that pipelines requests but never reads cannot make us buffer without bound."""

MAX_OUTBOX = 256 * 1024 * 1024
"""Unsent output (mostly forwarded WORK_DATA) at which a connection that does not read is
dropped. Far above any sane backlog; only a stuck peer reaches it."""

CLOSE_DRAIN_TIMEOUT = 10.0
"""After a peer half-closes (e.g. `echo status | nc`), how long we keep sending it its replies."""

MAX_TIMER_SLEEP = 60.0
"""The timer task re-reads the clocks at least this often, so a wall-clock step cannot leave an
epoch job waiting far past its time."""

KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 5
"""TCP keepalive: a peer that vanished without FIN is noticed after about 60 + 10 * 5 = 110 s, and
its jobs are requeued. gearmand leaves keepalive off by default, so a dead worker holds its jobs
until the kernel gives up on the socket, often hours (§3.6, §6.16)."""

REMOVES_PER_COMMIT = 256
REMOVES_MAX_DELAY = 0.05
"""A batch holding only removes (jobs that finished) waits until it has REMOVES_PER_COMMIT of
them or is REMOVES_MAX_DELAY seconds old. Nobody waits for a remove, and a commit per finished
job would cost a sync each: draining a queue, the store would spend more than the jobs. The
price: if the server is killed meanwhile, those few jobs run again after the restart (at least
once, never lost). A batch with any add goes at once: its submitters wait for it."""

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
    store: str = "sqlite"  # or "memory"
    data_dir: Path = field(default_factory=lambda: Path("jobserver-data"))
    facts: ServerFacts = field(default_factory=ServerFacts)


class Connection:
    """The I/O side of one peer: its stream, and getting the peer's outbox onto it.

    Output is written straight from `flush` with one non-blocking write when the socket takes
    it, which is nearly always: no task switch between a request and its reply. Only what the
    kernel does not take at once is left to the writer task, which waits for the socket to be
    writable. Whoever writes takes bytes from the front of the one outbox, and `flush` never
    writes while the writer is sending, so bytes leave in order.
    """

    __slots__ = (
        "_fd",
        "_has_output",
        "_output_drained",
        "_writer_busy",
        "closing",
        "peer",
        "stream",
    )

    def __init__(self, stream: trio.SocketStream, peer: Peer) -> None:
        self.stream = stream
        self.peer = peer
        self.closing = False
        self._fd = stream.socket.fileno()
        self._writer_busy = False
        self._has_output = trio.lowlevel.ParkingLot()
        self._output_drained = trio.lowlevel.ParkingLot()

    def flush(self) -> None:
        outbox = self.peer.outbox
        if not self._writer_busy:
            try:
                sent = os.write(self._fd, outbox)
            except OSError:
                sent = 0  # full (EAGAIN), or broken: the writer's send finds out and reports
            if sent == len(outbox):
                outbox.clear()
                if self._output_drained:
                    self._output_drained.unpark_all()
                return
            del outbox[:sent]
        self._has_output.unpark_all()

    async def write_loop(self) -> None:
        peer = self.peer
        while True:
            while not peer.outbox:
                if self.closing:
                    return
                await self._has_output.park()
            self._writer_busy = True
            try:
                await self.stream.send_all(peer.take_output())
            finally:
                self._writer_busy = False
            self._output_drained.unpark_all()

    async def wait_output_below(self, limit: int) -> None:
        while len(self.peer.outbox) > limit:
            await self._output_drained.park()

    def finish(self) -> None:
        """Let the writer send what is queued, then stop."""
        self.closing = True
        self._has_output.unpark_all()


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.admin: AdminProtocol | None = None
        self.store: JobStore | None = None
        self.port: int | None = None
        self._timer_changed = trio.lowlevel.ParkingLot()
        self._timer_due: float | None = None
        self._committer: Committer | None = None
        self._commit_wakeup = trio.lowlevel.ParkingLot()
        self._removes_due: float | None = None  # when removes waiting for company must go

    async def bind(self) -> list[trio.SocketListener]:
        """Open the store, the listening sockets and the engine, and load the stored jobs.
        Raises StoreError (bad database) or OSError (port busy, bad address) before serving
        anything, so the CLI can report it plainly."""
        config = self.config
        if config.port:  # a bad database should fail before we take the port
            self.store = open_store(config.store, config.data_dir, config.port)
        try:
            listeners = await trio.open_tcp_listeners(
                config.port, host=config.listen, backlog=config.backlog
            )
            self.port = listeners[0].socket.getsockname()[1]
            if not config.port:
                self.store = open_store(config.store, config.data_dir, self.port)
        except BaseException:
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
        )
        if self.store is not None:
            # Before the first connection is served: reloaded jobs coalesce and run as before.
            stored = self.store.load()
            count = self.engine.restore(stored, self.store.next_record_id)
            log.info("loaded %d stored jobs from %s", count, getattr(self.store, "path", "?"))
        self.admin = AdminProtocol(self.engine, config.facts)
        for listener in listeners:
            address = listener.socket.getsockname()
            log.info("listening on %s port %d", address[0], address[1])
        return listeners

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
                self.store, lambda: token.run_sync_soon(self._commit_wakeup.unpark_all)
            )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_timers)
                if self._committer is not None:
                    nursery.start_soon(self._pace_commits)
                task_status.started(listeners)
                await trio.serve_listeners(
                    self._serve_connection, listeners, handler_nursery=nursery
                )
        finally:
            self._final_commit()
            self.close_store()

    # ------------------------------------------------------------------ connections

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        engine = self.engine
        assert engine is not None
        sock = stream.socket
        try:
            address = sock.getpeername()[0]
        except OSError:
            await stream.aclose()
            return  # gone before we looked at it
        if self.config.keepalive:
            enable_keepalive(
                sock, idle=KEEPALIVE_IDLE, interval=KEEPALIVE_INTERVAL, count=KEEPALIVE_COUNT
            )
        peer = engine.connect(sock.fileno(), address)
        connection = Connection(stream, peer)
        peer.transport = connection
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, connection, nursery.cancel_scope)
                if await self._read(connection):
                    connection.finish()
                    nursery.cancel_scope.deadline = trio.current_time() + CLOSE_DRAIN_TIMEOUT
                else:
                    nursery.cancel_scope.cancel()
        finally:
            engine.disconnect(peer)
            self._flush()
            # A closed peer is never dirty again, so nothing needs its transport: drop the
            # peer <-> connection cycle, and both go by reference counting, not by a full
            # collection (which jobserver.gc_policy keeps from looking at old objects).
            peer.transport = None
            await trio.aclose_forcefully(stream)

    async def _write(self, connection: Connection, scope: trio.CancelScope) -> None:
        try:
            await connection.write_loop()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()  # the peer is gone: stop reading too

    async def _read(self, connection: Connection) -> bool:
        """Serve requests until the peer closes (True) or must be dropped (False)."""
        engine = self.engine
        admin = self.admin
        assert engine is not None and admin is not None
        peer = connection.peer
        fd = connection.stream.socket.fileno()
        decoder = Decoder(max_packet_size=self.config.max_packet_size)
        more_waiting = False
        while True:
            # Reads go straight to the fd. After a short read the next one would almost
            # always find nothing (request/response traffic), so wait for readability first
            # instead of paying for a failed recv; after a full read a pipelining peer has
            # more queued, so read again at once, letting other tasks run in between.
            try:
                if more_waiting:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(fd)
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                more_waiting = False
                continue
            except (OSError, trio.ClosedResourceError):
                return False
            if not data:
                return True
            more_waiting = len(data) == RECEIVE_SIZE
            try:
                events = decoder.feed(data)
            except ProtocolError as error:
                log.error("closing connection from %s (fd %d): %s", peer.address, peer.id, error)
                return False
            try:
                for event in events:
                    if type(event) is Packet:
                        engine.handle_packet(peer, event)
                    elif type(event) is AdminLine:
                        peer.send(admin.execute(event.text))
                    else:
                        log.error(
                            "malformed packet type %d from %s (fd %d): %s",
                            event.type,
                            peer.address,
                            peer.id,
                            event.text.decode(),
                        )
                        engine.handle_bad_packet(peer, event)
            except Exception:
                # A bug of ours must cost one connection, never the server.
                log.exception(
                    "internal error serving %s (fd %d); closing it", peer.address, peer.id
                )
                return False
            self._flush()
            if len(peer.outbox) > OUTBOX_HIGH_WATER:
                await connection.wait_output_below(OUTBOX_HIGH_WATER)

    def _flush(self) -> None:
        """Send every connection's new output (once per batch, however many packets), after
        taking in a written commit and handing the store the next one; wake the timer task if
        the batch gave it something to do."""
        engine = self.engine
        assert engine is not None
        if self._committer is not None:
            self._advance_commits()
        for peer in engine.take_dirty():
            if len(peer.outbox) > MAX_OUTBOX:
                log.error("dropping %s (fd %d): it stopped reading", peer.address, peer.id)
                engine.disconnect(peer)
                peer.transport.stream.socket.close()
                continue
            peer.transport.flush()
        delay = engine.seconds_until_next_timer()
        if delay is not None:
            due = trio.current_time() + delay
            if self._timer_due is None or due < self._timer_due:
                self._timer_changed.unpark_all()

    # ------------------------------------------------------------------ store

    def _advance_commits(self) -> None:
        """Group commit: report the batch the store has written (its replies go out), and hand
        it everything journalled since, as the next batch."""
        engine, committer = self.engine, self._committer
        assert engine is not None and engine.journal is not None and committer is not None
        written = committer.take_written()
        if written is not None:
            engine.commit_finished(
                written.batch, failed=written.failed, removes_failed=written.removes_failed
            )
        journal = engine.journal
        if committer.busy or not journal.has_work:
            return
        if not journal.has_adds and journal.removes_waiting < REMOVES_PER_COMMIT:
            # Only finished jobs to forget: nobody waits on that, so let a few gather.
            now = trio.current_time()
            if self._removes_due is None:
                self._removes_due = now + REMOVES_MAX_DELAY
                self._commit_wakeup.unpark_all()  # so that the pacer sleeps until then
                return
            if now < self._removes_due:
                return
        self._removes_due = None
        committer.hand_over(journal.take_batch())

    async def _pace_commits(self) -> None:
        """Calls _flush when a batch has been written or removes are due and nothing else
        would (the server is idle)."""
        while True:
            due = math.inf if self._removes_due is None else self._removes_due
            with trio.move_on_at(due):
                await self._commit_wakeup.park()
            self._flush()

    def _final_commit(self) -> None:
        """At shutdown: report the batch in flight, then write what is journalled, so jobs
        finished just before do not run again at the next start."""
        engine, committer = self.engine, self._committer
        if engine is None or committer is None or engine.journal is None:
            return
        self._committer = None
        written = committer.wait_written()
        committer.stop()
        if written is not None:
            engine.commit_finished(
                written.batch, failed=written.failed, removes_failed=written.removes_failed
            )
        if engine.journal.has_work:
            write(self.store, engine.journal.take_batch())  # type: ignore[arg-type]

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
            engine.run_timers()
            self._flush()
