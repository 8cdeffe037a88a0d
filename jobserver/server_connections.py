"""Serving connections: a mixin of Server (server.py), its reader, writer and flush.

Each connection is one reader task, and a writer task only while its output waits for the
socket. The reader decodes a read, applies its packets to the engine, then the pass's flush
task sends the output of every connection that got some (write coalescing: one send per
connection per pass, however many packets or readers produced it). No task, lock or syscall
per packet. The per-connection I/O is in connection.py, accepting in listener.py, the memory
budget in memory_budget.py.

Whatever one peer does costs at most that peer's connection: a read's packets are applied a
bounded number at a time (PACKETS_PER_TURN), the reader waits whenever its peer's unread
replies pass OUTBOX_HIGH_WATER (checked as replies are produced, not once per read), every byte
held for a peer is counted against the memory budget, and any exception while serving a
connection, MemoryError included, closes that connection and is logged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from typing import TYPE_CHECKING

import trio

from .access import SCREENED_TYPES, DenialLog, screen
from .acl import Permissions
from .admin import PERMISSION_DENIED_REPLY, AdminProtocol
from .admin_text import listed
from .commits import Committer
from .connection import RECEIVE_SIZE, Connection, TlsConnection
from .engine import Engine
from .listener import ConnectionGate
from .memory_budget import MemoryBudget
from .ownership import Ownership
from .protocol import (
    AdminLine,
    BadPacket,
    Decoder,
    Event,
    OversizedPacket,
    Packet,
    ProtocolError,
)
from .tcp import enable_keepalive
from .tls import HandshakeFailures, TlsSession, handshake

if TYPE_CHECKING:
    import ssl

    from .server import ServerConfig

log = logging.getLogger("jobserver")  # as server.py: one logger for the server's lines

OUTBOX_HIGH_WATER = 4 * 1024 * 1024
"""A connection whose own unsent replies exceed this stops being served until they drain, so a
client that pipelines requests but never reads cannot make us buffer without bound. Checked
after every packet: one pipelined read of 6,000 `show jobs` once grew the server by 3.6 GiB
when the check ran once per read."""

OUTBOX_LOW_WATER = OUTBOX_HIGH_WATER // 2
"""Where a connection stopped at OUTBOX_HIGH_WATER is served again: halfway, so a reader
that drains slowly is not woken for every packet's worth of room."""

MAX_OUTBOX = 256 * 1024 * 1024
"""Unsent output (mostly forwarded WORK_DATA) at which a connection that does not read is
dropped. Far above any sane backlog; only a stuck peer reaches it."""

PACKETS_PER_TURN = 256
"""Packets applied from one read before the output is sent and other connections get a turn.
A 64 KiB read holds up to 5,461 GRAB_JOBs; applied in one go they froze every other connection.
256 keeps a turn well under a millisecond for cheap packets, and the flush between turns is one
write per dirty connection, so pipelined throughput does not notice."""

CLOSE_DRAIN_TIMEOUT = 10.0
"""After a peer half-closes (e.g. `echo status | nc`), how long we keep sending it its replies."""

MIN_READ_RATE = 1024
"""Bytes per second that count as progress inside a packet: each byte received pushes the read
deadline back by 1/MIN_READ_RATE s (never past read_timeout from now), as Apache's
mod_reqtimeout does. A large packet on a slow link keeps going; a byte a second does not."""

KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 5
"""TCP keepalive: a peer that vanished without FIN is noticed after about 60 + 10 * 5 = 110 s, and
its jobs are requeued. gearmand leaves keepalive off by default, so a dead worker holds its jobs
until the kernel gives up on the socket, often hours (§3.6, §6.16)."""

TLS_HANDSHAKE_RECORD = b"\x16\x03"
"""How every TLS ClientHello starts (a handshake record, protocol version 3.x): met where a
Gearman magic should be, the log says what it is rather than "bad magic"."""

OVERSIZED_ERROR = b"ARGUMENT_TOO_LARGE"
"""ERROR code for a packet over max_packet_size (libgearman's GEARMAN_ARGUMENT_TOO_LARGE).
gearmand has no size limit to answer for; it buffers whatever a header announces."""


class ConnectionDuties:
    """Server's work for each connection; the attributes below are Server's."""

    config: ServerConfig
    engine: Engine | None
    admin: AdminProtocol | None
    budget: MemoryBudget
    gate: ConnectionGate
    denials: DenialLog
    tls_failures: HandshakeFailures
    tls_port: int | None
    _tls_context: ssl.SSLContext | None
    _nursery: trio.Nursery | None
    _ownership: Ownership | None
    _committer: Committer | None
    _flush_wanted: bool
    _flush_lot: trio.lowlevel.ParkingLot
    _timer_due: float | None
    _timer_changed: trio.lowlevel.ParkingLot

    if TYPE_CHECKING:

        def _advance_commits(self) -> None: ...

        def _log_failures(self) -> None: ...

        async def _internal_error(self, where: str) -> None: ...

    async def _serve_tls(self, sock: trio.socket.SocketType) -> None:
        try:
            address = sock.getpeername()[0]
        except OSError:
            sock.close()
            self.gate.closed()
            return
        stream = trio.SocketStream(sock)  # for the handshake only
        assert self._tls_context is not None
        try:
            tls, cause = await handshake(stream, self._tls_context)
        except BaseException:  # the server is stopping
            sock.close()
            self.gate.closed()
            raise
        if tls is None:
            self.tls_failures.note(address, cause)
            sock.close()
            self.gate.closed()
            return
        del stream
        await self._serve_connection(sock, tls)

    async def _serve_connection(
        self, sock: trio.socket.SocketType, tls: TlsSession | None = None
    ) -> None:
        """Serve one peer until it closes, is dropped, or the server stops. A connection is
        this one task (its reader), and a writer task only while output waits for the socket:
        for an idle connection, that is the least memory trio allows."""
        engine = self.engine
        assert engine is not None
        try:
            address = sock.getpeername()[0]
        except OSError:
            sock.close()
            self.gate.closed()
            return  # gone before we looked at it
        who = self._permissions(address, tls)
        with contextlib.suppress(OSError):
            # Replies go out at once: each is a whole batch already (trio.SocketStream, not
            # used here, would set this too).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.config.keepalive:
            enable_keepalive(
                sock, idle=KEEPALIVE_IDLE, interval=KEEPALIVE_INTERVAL, count=KEEPALIVE_COUNT
            )
        peer = engine.connect(sock.fileno(), address)
        decoder = Decoder(max_packet_size=self.config.max_packet_size, skip_oversized=True)
        connection: Connection
        if tls is None:
            connection = Connection(sock, peer, decoder, self.budget)
        else:
            connection = TlsConnection(sock, tls, peer, decoder, self.budget)
        connection.who = who
        connection.start_writer = self._start_writer
        peer.transport = connection
        try:
            with trio.CancelScope() as scope:
                # Cancelled to drop the peer (connection.release); its deadline is the read
                # timeout while a packet is incomplete, then the drain after a clean close.
                connection.scope = scope
                if await self._read(connection):
                    # The replies to its last reads may still wait for the pass's flush task,
                    # which can run after this reader: send them before the wait below looks.
                    self._flush()
                    connection.finish()
                    scope.deadline = trio.current_time() + CLOSE_DRAIN_TIMEOUT
                    await connection.wait_output_below(0)
            if scope.cancelled_caught and not connection.closing:
                log.error(
                    "closing connection from %s (fd %d): inside a packet with no progress for "
                    "%g s (read timeout)",
                    peer.address,
                    peer.id,
                    self.config.read_timeout,
                )
        finally:
            # Cancelled from outside (only the server stopping does that): close with FIN.
            stopping = trio.current_effective_deadline() == -math.inf
            try:
                # Replies produced this pass (the flush task may not have run yet) go out
                # before the close: at shutdown, and before a protocol error ends the peer.
                self._flush()
                engine.disconnect(peer)
                self._flush()
            except Exception:
                self._log_internal_error(peer)
            # A closed peer is never dirty again, so nothing needs its transport: drop the
            # peer <-> connection cycle, and both go by reference counting, not by a full
            # collection (which jobserver.gc_policy keeps from looking at old objects).
            peer.transport = None
            try:
                if stopping:
                    await connection.close_gracefully()  # sends what is pending first
                else:
                    sock.close()  # abortive: the peer is gone or dropped
            finally:
                connection.release()
                self.gate.closed()

    def _permissions(self, address: str, tls: TlsSession | None) -> Permissions | None:
        """With --acl, what a new connection may do: its certificate's identity (TLS), the
        --loopback-identity (plaintext from loopback), or anonymous."""
        acl = self.config.acl
        if acl is None:
            return None
        if tls is not None:
            who = acl.permissions(tls.identity)
            log.debug("TLS connection from %s: identity %s", address, who.name)
            return who
        loopback = self.config.loopback_identity is not None and _is_loopback(address)
        return acl.permissions(self.config.loopback_identity if loopback else None)

    def _start_writer(self, connection: Connection) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._write, connection)

    async def _write(self, connection: Connection) -> None:
        """A connection's writer task: runs while its output waits for the socket."""
        try:
            await connection.write_loop()
        except (OSError, trio.ClosedResourceError):
            pass  # the peer is gone
        except Exception:
            self._log_internal_error(connection.peer)
        else:
            return
        if connection.scope is not None:
            connection.scope.cancel()  # stop reading too

    async def _read(self, connection: Connection) -> bool:
        """Serve requests until the peer closes (True) or must be dropped (False)."""
        assert connection.scope is not None
        try:
            return await self._read_loop(connection, connection.scope)
        except Exception:
            # A bug of ours, or MemoryError, must cost one connection, never the server.
            self._log_internal_error(connection.peer)
            return False

    async def _read_loop(self, connection: Connection, stalled: trio.CancelScope) -> bool:
        fd = connection.fd
        more_waiting = False
        decrypt = connection.decrypt if isinstance(connection, TlsConnection) else None
        if decrypt is not None:
            # What the client sent right behind its handshake is decrypted already: serve it
            # before waiting for more, or both sides would wait.
            try:
                data, closed = decrypt(b"")
            except OSError:
                return False
            if data and not await self._take(connection, data, stalled):
                return False
            if closed:
                return True
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
            if decrypt is not None:
                try:
                    data, closed = decrypt(data)
                except OSError:  # ssl.SSLError: a corrupt or forged record
                    return False
                if closed:  # close_notify: serve what came before it, then end as at EOF
                    return not data or await self._take(connection, data, stalled)
                if not data:
                    continue  # part of a record
            if not await self._take(connection, data, stalled):
                return False

    async def _take(self, connection: Connection, data: bytes, stalled: trio.CancelScope) -> bool:
        """Decode one read and serve its requests; False when the peer must be dropped."""
        peer = connection.peer
        decoder = connection.decoder
        read_timeout = self.config.read_timeout
        try:
            events = decoder.feed(data)
        except ProtocolError as error:
            reason = str(error)
            if data.startswith(TLS_HANDSHAKE_RECORD) and not isinstance(connection, TlsConnection):
                tls_port = f" (TLS is on port {self.tls_port})" if self.tls_port else ""
                reason = f"a TLS client on this plaintext port{tls_port}"
            log.error("closing connection from %s (fd %d): %s", peer.address, peer.id, reason)
            return False
        connection.account_input()
        if self.budget.total > self.budget.limit:
            self._enforce_budget()
            if peer.closed:
                return False
        if read_timeout:
            if decoder.in_packet:
                now = trio.current_time()
                if stalled.deadline == math.inf:
                    stalled.deadline = now + read_timeout
                else:
                    stalled.deadline = min(
                        now + read_timeout, stalled.deadline + len(data) / MIN_READ_RATE
                    )
            elif stalled.deadline != math.inf:
                stalled.deadline = math.inf
        return not events or await self._apply(connection, events, stalled)

    async def _apply(
        self, connection: Connection, events: list[Event], stalled: trio.CancelScope
    ) -> bool:
        """Apply a read's events to the engine, sending output and letting other connections
        in every PACKETS_PER_TURN packets, and waiting whenever this peer's unsent replies pass
        OUTBOX_HIGH_WATER. False when the peer was closed meanwhile."""
        engine = self.engine
        admin = self.admin
        assert engine is not None and admin is not None
        peer = connection.peer
        if self._ownership is not None and self._ownership.check():
            self._flush()  # before this read's GRAB_JOBs, which may not get held jobs
        who = connection.who
        room = OUTBOX_HIGH_WATER - len(connection.pending)
        turn = 0
        for event in events:
            kind = type(event)
            if kind is Packet:
                if who is not None and event.type in SCREENED_TYPES:  # type: ignore[union-attr]
                    denial = screen(who, event, engine)  # type: ignore[arg-type]
                    if denial is not None:
                        peer.send(denial.reply)
                        if denial.reason is not None:
                            self._log_denial(peer, denial.reason)
                    else:
                        engine.handle_packet(peer, event)  # type: ignore[arg-type]
                else:
                    engine.handle_packet(peer, event)  # type: ignore[arg-type]
            elif kind is AdminLine:
                reply = admin.execute(event.text, who)  # type: ignore[union-attr]
                peer.send(reply)
                if reply is PERMISSION_DENIED_REPLY:
                    assert who is not None
                    command = listed(event.text.split(b" ", 1)[0])  # type: ignore[union-attr]
                    name = command.decode("utf-8", "backslashreplace")
                    self._log_denial(peer, f"identity {who.name} may not run admin command {name}")
            else:
                self._bad_packet(peer, event)  # type: ignore[arg-type]
            turn += 1
            if turn == PACKETS_PER_TURN or len(peer.outbox) > room:
                self._flush()
                if peer.closed:
                    return False
                if len(connection.pending) > OUTBOX_HIGH_WATER:
                    # Not the peer's stall on input: the read timeout starts again next read.
                    stalled.deadline = math.inf
                    await connection.wait_output_below(OUTBOX_LOW_WATER)
                else:
                    await trio.lowlevel.checkpoint()
                if peer.closed:
                    return False
                room = OUTBOX_HIGH_WATER - len(connection.pending)
                turn = 0
        self._flush_soon()
        return not peer.closed

    def _flush_soon(self) -> None:
        """Send the output of this read once the other connections that are readable now
        have been served too (`_flush_after_reads`)."""
        if not self._flush_wanted:
            self._flush_wanted = True
            self._flush_lot.unpark_all()

    async def _flush_after_reads(self) -> None:
        """The end-of-read flush, run once per scheduler pass for every reader in it. A worker's
        WORK_COMPLETE and the next client's submit often arrive in the same pass; flushed per
        read, each reader's turn wrote to the peers it touched, so a client waiting on several
        jobs got a write per completion; flushed here, each peer gets one write per pass
        whatever number of readers produced for it. trio runs a task woken during a pass in
        the next pass, after the readers woken with it."""
        while True:
            await self._flush_lot.park()
            self._flush_wanted = False
            try:
                self._flush()
            except Exception:
                await self._internal_error("the flush task")

    def _log_denial(self, peer, reason: str) -> None:
        level, repeats = self.denials.note(reason)
        more = f" ({repeats} more times since the last report)" if repeats else ""
        log.log(level, "denied %s (fd %d): %s%s", peer.address, peer.id, reason, more)

    def _bad_packet(self, peer, event: BadPacket | OversizedPacket) -> None:
        engine = self.engine
        assert engine is not None
        if type(event) is OversizedPacket:
            # The decoder skips its body as it arrives; the connection goes on.
            log.error(
                "packet type %d of %d bytes from %s (fd %d) exceeds max packet size %d; "
                "answered ERROR, skipping its body",
                event.type,
                event.size,
                peer.address,
                peer.id,
                self.config.max_packet_size,
            )
            text = (
                f"Packet of {event.size} bytes exceeds the limit of "
                f"{self.config.max_packet_size} bytes"
            )
            event = BadPacket(event.type, event.magic, OVERSIZED_ERROR, text.encode())
        else:
            log.error(
                "malformed packet type %d from %s (fd %d): %s",
                event.type,
                peer.address,
                peer.id,
                event.text.decode(),
            )
        engine.handle_bad_packet(peer, event)

    def _flush(self) -> None:
        """Send every connection's new output (once per turn, however many packets), after
        taking in a written commit and handing the store the next one; enforce the outbox cap
        and the memory budget; wake the timer task if the turn gave it something to do."""
        engine = self.engine
        assert engine is not None
        if self._committer is not None:
            self._advance_commits()
        if engine.failure_log:
            self._log_failures()
        budget = self.budget
        dirty = engine.take_dirty()
        while dirty:
            for peer in dirty:
                if peer.closed:
                    continue
                connection = peer.transport
                unsent = len(connection.pending) + len(peer.outbox)
                if unsent > MAX_OUTBOX:  # checked before joining the two: no copy of either
                    log.error(
                        "closing connection from %s (fd %d): %d bytes unsent, it stopped reading",
                        peer.address,
                        peer.id,
                        unsent,
                    )
                    self._drop(connection)
                    continue
                try:
                    connection.flush()
                except Exception:
                    self._log_internal_error(peer)
                    self._drop(connection)
            if budget.total > budget.limit:
                self._enforce_budget()
            dirty = engine.take_dirty()  # closing a peer requeues its jobs: wake-ups to send
        delay = engine.seconds_until_next_timer()
        if delay is not None:
            due = trio.current_time() + delay
            if self._timer_due is None or due < self._timer_due:
                self._timer_changed.unpark_all()

    def _drop(self, connection: Connection) -> None:
        """Close a connection now, from whichever task noticed: it is forgotten by the engine
        and its buffers freed at once; its own tasks wake up cancelled and finish the close."""
        engine = self.engine
        assert engine is not None
        engine.disconnect(connection.peer)
        connection.release()

    def _enforce_budget(self) -> None:
        """Over the memory budget: close the connections holding most until back under it."""
        budget = self.budget
        for connection in budget.largest_first():
            if budget.total <= budget.limit:
                break
            peer = connection.peer  # type: ignore[attr-defined]
            log.error(
                "closing connection from %s (fd %d): it holds %d bytes of partial input and "
                "unsent output, the most of any, and all connections hold %d, over the memory "
                "budget of %d",
                peer.address,
                peer.id,
                connection.held,
                budget.total,
                budget.limit,
            )
            self._drop(connection)  # type: ignore[arg-type]

    def _log_internal_error(self, peer) -> None:
        # Out of memory even for the log line: still close just this connection.
        with contextlib.suppress(Exception):
            log.exception("internal error serving %s (fd %d); closing it", peer.address, peer.id)


def _is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4 loopback mapped into IPv6 (a dual-stack listener's view)."""
    return address.startswith("127.") or address == "::1" or address.startswith("::ffff:127.")
