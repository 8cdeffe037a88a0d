"""The I/O side of one peer: its socket, its decoder, its unsent output, and how it closes.

Nothing here decides anything: the server applies decoded packets to the engine and calls
`flush` for every peer the engine gave output. What this module owns is getting bytes onto the
socket in order without copying them, and keeping the memory budget told of every byte held
for the peer (partial input in the decoder, unsent output in `pending`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

import trio

from .acl import Permissions
from .engine import Peer
from .memory_budget import MemoryBudget
from .protocol import Decoder
from .tls import TlsSession

RECEIVE_SIZE = 65536
"""Bytes asked of the kernel per read: big enough to take a burst of pipelined packets at once."""

SHUTDOWN_DRAIN_TIMEOUT = 2.0
"""At shutdown, how long a connection that has been sent FIN is read (and what it sends
dropped) while we wait for the peer's own FIN. Closing a socket with unread input makes the
kernel send RST instead of FIN; some workers (abraxas) treat a reset as fatal and never
reconnect, where gearmand's FIN makes them reconnect to the next server. Peers answer FIN
within milliseconds; the bound only stops a silent one from delaying the exit."""

SHUTDOWN_DISCARD_LIMIT = 16
"""Reads of RECEIVE_SIZE taken at most, after the drain, to empty what is still queued before
close(); more than a megabyte in flight at that point means the peer is not stopping."""


class Connection:
    """One peer's socket and what is held for it.

    Output is written straight from `flush` with one non-blocking write when the socket takes
    it, which is nearly always: no task switch between a request and its reply. What the
    kernel does not take moves to `pending`, and a writer task, started then and ending once
    `pending` is empty, sends it as the socket becomes writable. While anything is pending, new
    output queues behind it, so bytes leave in order. So an idle connection is one task (its
    reader) and a few small objects: fleets of idle workers are the normal case.

    Moving the rest out of the engine's `peer.outbox` (instead of leaving it there) gives the
    peer an empty outbox again, so the engine lists it as dirty on its next reply and the
    server sees every addition: the per-connection cap and the budget hold whatever was
    already waiting.
    """

    __slots__ = (
        "_output_drained",
        "_writing",
        "budget",
        "closing",
        "decoder",
        "fd",
        "held",
        "input_held",
        "peer",
        "pending",
        "scope",
        "sock",
        "start_writer",
        "who",
    )

    def __init__(
        self, sock: trio.socket.SocketType, peer: Peer, decoder: Decoder, budget: MemoryBudget
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.decoder = decoder
        self.budget = budget
        self.fd = sock.fileno()
        self.pending = bytearray()  # output the kernel has not taken yet, oldest first
        self.held = 0  # bytes this connection holds, as last told to the budget
        self.input_held = 0  # the part of `held` that is partial input in the decoder
        self.closing = False
        # Cancels the reader: set by the server, with the read timeout as its deadline.
        self.scope: trio.CancelScope | None = None
        self.who: Permissions | None = None  # with --acl: what this peer may do (acl.py)
        # Starts a task running `write_loop` (the server's, in its nursery).
        self.start_writer: Callable[[Connection], None] | None = None
        self._writing = False  # a writer task is running
        self._output_drained: trio.lowlevel.ParkingLot | None = None  # made when waited on

    # ------------------------------------------------------------------ accounting

    def account_input(self) -> None:
        """Tell the budget what the decoder holds now (after each read)."""
        buffered = self.decoder.buffered
        if buffered != self.input_held:
            delta = buffered - self.input_held
            self.input_held = buffered
            self.budget.change(self, delta)

    def release(self) -> None:
        """Drop everything held for this peer at once (it is being closed), so the memory is
        free before the connection's tasks have even woken up to finish."""
        self.closing = True
        self.pending = bytearray()
        self.decoder.clear()
        self.input_held = 0
        self.budget.release(self)
        if self.scope is not None:
            self.scope.cancel()

    # ------------------------------------------------------------------ output

    def flush(self) -> None:
        """Send the peer's new output, or queue it behind what is pending."""
        outbox = self.peer.outbox
        pending = self.pending
        if not pending:
            try:
                sent = os.write(self.fd, outbox)
            except OSError:
                sent = 0  # full (EAGAIN), or broken: the writer's write finds out and reports
            if sent == len(outbox):
                outbox.clear()
                return
            del outbox[:sent]
            self.pending = outbox
            self.peer.outbox = bytearray()
            self.budget.change(self, len(outbox))
            self._wake_writer()
        else:
            size = len(outbox)
            pending += outbox
            outbox.clear()
            self.budget.change(self, size)

    def _wake_writer(self) -> None:
        """`pending` just stopped being empty: have a writer task send it."""
        if not self._writing and self.start_writer is not None:
            self._writing = True
            self.start_writer(self)

    async def write_loop(self) -> None:
        """The writer task: send `pending` as the socket takes it, and end once it is empty.
        Raises OSError (or trio.ClosedResourceError) when the peer is gone."""
        fd = self.fd
        sock = self.sock
        try:
            while self.pending:
                await trio.lowlevel.wait_writable(fd)
                if sock.fileno() != fd:
                    # Closed by the reader since this task was woken: the number may belong
                    # to a newer connection already. (No await between here and the write.)
                    return
                pending = self.pending
                try:
                    sent = os.write(fd, pending)  # straight from the buffer: no copy of it
                except BlockingIOError:
                    continue
                del pending[:sent]  # cheap: CPython moves a bytearray's start, not its contents
                self.budget.change(self, -sent)
                if self._output_drained is not None:
                    self._output_drained.unpark_all()
        finally:
            self._writing = False

    async def wait_output_below(self, limit: int) -> None:
        """Wait until at most `limit` bytes are pending (the writer sends them)."""
        while len(self.pending) > limit:
            if self._output_drained is None:
                self._output_drained = trio.lowlevel.ParkingLot()
            await self._output_drained.park()

    def finish(self) -> None:
        """The peer closed its side: what is pending still goes out (`wait_output_below(0)`)."""
        self.closing = True

    # ------------------------------------------------------------------ closing

    async def close_gracefully(self) -> None:
        """At shutdown: send what the socket takes at once, then FIN, and read and drop what
        the peer still sends until its FIN (or SHUTDOWN_DRAIN_TIMEOUT), so the close is a FIN
        and never a reset. Runs shielded: the server is being cancelled as this runs."""
        fd = self.fd
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + SHUTDOWN_DRAIN_TIMEOUT
            with contextlib.suppress(OSError):
                pending, self.pending = self.pending, bytearray()  # a writer task stops
                if pending:
                    os.write(fd, pending)
                self.sock.shutdown(socket.SHUT_WR)
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        if not os.read(fd, RECEIVE_SIZE):
                            break
                    except BlockingIOError:
                        continue
            # Whatever arrived after the deadline: read it now, or close() resets.
            with contextlib.suppress(OSError):
                for _ in range(SHUTDOWN_DISCARD_LIMIT):
                    if not os.read(fd, RECEIVE_SIZE):
                        break
            self.pending = bytearray()
            self.sock.close()


class TlsConnection(Connection):
    """A peer on the TLS listener: the same bookkeeping, reads and writes as Connection, with
    the bytes passing through its TlsSession (tls.py). `pending` holds records, already
    encrypted; the reader decrypts each read with `decrypt` before decoding it."""

    __slots__ = ("tls",)

    def __init__(
        self,
        sock: trio.socket.SocketType,
        tls: TlsSession,
        peer: Peer,
        decoder: Decoder,
        budget: MemoryBudget,
    ) -> None:
        super().__init__(sock, peer, decoder, budget)
        self.tls = tls

    def flush(self) -> None:
        outbox = self.peer.outbox
        records = self.tls.encrypt(outbox)
        outbox.clear()
        self._send(records)

    def decrypt(self, data: bytes) -> tuple[bytes, bool]:
        """The plaintext of one read, and whether the peer ended the TLS stream. Raises
        ssl.SSLError (an OSError) for a corrupt record."""
        plaintext, closed = self.tls.decrypt(data)
        answer = self.tls.encrypt(b"")  # rare: what reading made OpenSSL send (KeyUpdate)
        if answer:
            self._send(answer)
        return plaintext, closed

    def _send(self, records: bytes) -> None:
        """As Connection.flush, for bytes already encrypted: one write when nothing is
        pending, the rest (or all of it) queued for the writer task."""
        if not records:
            return
        if self.pending:
            self.pending += records
            self.budget.change(self, len(records))
            return
        try:
            sent = os.write(self.fd, records)
        except OSError:
            sent = 0  # full (EAGAIN), or broken: the writer's write finds out and reports
        if sent == len(records):
            return
        self.pending = bytearray(memoryview(records)[sent:])
        self.budget.change(self, len(self.pending))
        self._wake_writer()

    async def close_gracefully(self) -> None:
        """At shutdown: close_notify after what is pending, then as a plaintext peer."""
        with contextlib.suppress(OSError):
            self._send(self.tls.close_notify())
        await super().close_gracefully()
