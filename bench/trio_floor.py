"""The trio floor: the least a Gearman job server on trio can do for scenarios (a)-(d).

    python -m bench.trio_floor --port PORT [--per-pass]

Issue 16 asks, where a speed target is missed, for what remains and why it cannot be removed
in Python with trio. This server answers that by measurement: it does the scenarios' real
work (jobs are queued, handed to the workers that grab them, and their results routed back to
the waiting client) with nothing else a job server needs, in the I/O style jobserver uses
(one trio task per connection: wait until readable, one os.read, serve every packet of it,
one write to each peer it produced output for; with --per-pass, jobserver's one write per peer
per scheduler pass, from a flush task woken by the pass's first reader):

- ECHO_REQ -> ECHO_RES, each packet on its own (no shortcut for repeated requests).
- SUBMIT_JOB / SUBMIT_JOB_BG -> a job in a FIFO per function, JOB_CREATED, and NOOP to one
  sleeping worker that can do it. Unique ids, priorities, epochs, options are ignored.
- CAN_DO, PRE_SLEEP, GRAB_JOB_UNIQ -> JOB_ASSIGN_UNIQ or NO_JOB, WORK_COMPLETE -> to the
  foreground job's client. The rest of the protocol is not there.

It has no limits, no validation, no timeouts, no admin protocol, no metrics, no store: what
jobserver adds to this figure is what those and its engine cost; what gearmand has over this
figure is Python and trio themselves. A benchmark instrument only; it trusts its peers.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket

import trio

from jobserver.protocol import HEADER, HEADER_SIZE, RES, split_arguments
from jobserver.protocol import PacketType as T

RECEIVE_SIZE = 64 * 1024
"""As jobserver's: one read takes a window of the scenarios' pipelined requests."""


def packet(packet_type: int, *args: bytes) -> bytes:
    """A reply's bytes, framed with the protocol module's HEADER. Not `protocol.encode`: that
    one also checks our own arguments (count, no NUL inside), which a floor leaves out."""
    payload = b"\0".join(args)
    return HEADER.pack(RES, packet_type, len(payload)) + payload


NOOP = packet(T.NOOP)
NO_JOB = packet(T.NO_JOB)


class Peer:
    __slots__ = ("closed", "fd", "functions", "inbox", "outbox", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbox = b""
        self.outbox: list[bytes] = []
        self.functions: list[bytes] = []
        self.closed = False
        self.writing = False  # a flush is waiting for the socket: it sends what comes meanwhile


class Job:
    __slots__ = ("client", "data", "function", "handle", "unique")

    def __init__(
        self, handle: bytes, function: bytes, unique: bytes, data: bytes, client: Peer | None
    ) -> None:
        self.handle = handle
        self.function = function
        self.unique = unique
        self.data = data
        self.client = client


class FloorServer:
    def __init__(self, per_pass: bool = False) -> None:
        self.per_pass = per_pass
        self.dirty: list[Peer] = []
        self.flush_lot = trio.lowlevel.ParkingLot()
        self.queues: dict[bytes, collections.deque[Job]] = {}
        self.running: dict[bytes, Job] = {}
        self.sleepers: dict[bytes, dict[Peer, None]] = {}  # by function, latest last
        self.next_handle = 0

    async def serve(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            if self.per_pass:
                nursery.start_soon(self.flush_after_reads)
            while True:
                stream = await listener.accept()
                nursery.start_soon(self.serve_peer, Peer(stream.socket))  # type: ignore[attr-defined]

    async def serve_peer(self, peer: Peer) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(peer.fd)
                try:
                    data = os.read(peer.fd, RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                if not data:
                    return
                if self.per_pass:
                    if not self.dirty:
                        self.flush_lot.unpark_all()
                    self.take(peer, peer.inbox + data if peer.inbox else data, self.dirty)
                    continue
                touched: list[Peer] = []
                self.take(peer, peer.inbox + data if peer.inbox else data, touched)
                for other in touched:
                    if not other.closed:
                        await self.flush(other)
        except OSError:
            return
        finally:
            peer.closed = True
            for sleepers in self.sleepers.values():
                sleepers.pop(peer, None)
            peer.sock.close()

    async def flush_after_reads(self) -> None:
        while True:
            if not self.dirty:  # readers that came while it was writing need no wake-up
                await self.flush_lot.park()
            dirty, self.dirty = self.dirty, []
            for peer in dirty:
                if not peer.closed:
                    await self.flush(peer)

    async def flush(self, peer: Peer) -> None:
        """Write the peer's output; while the socket is full, what other readers add for it
        goes out behind it, in order, from here."""
        if peer.writing:
            return
        peer.writing = True
        try:
            while peer.outbox:
                data = b"".join(peer.outbox)
                peer.outbox.clear()
                while data:
                    try:
                        data = data[os.write(peer.fd, data) :]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(peer.fd)
        finally:
            peer.writing = False

    def send(self, peer: Peer, data: bytes, touched: list[Peer]) -> None:
        if not peer.outbox:
            touched.append(peer)
        peer.outbox.append(data)

    def take(self, peer: Peer, buffer: bytes, touched: list[Peer]) -> None:
        """Serve every complete packet of `buffer`, framed with HEADER here (as the canned
        server does) rather than by protocol.Decoder, whose checks and Packet objects are what
        a floor leaves out; keep the rest for the next read."""
        offset, end = 0, len(buffer)
        while end - offset >= HEADER_SIZE:
            _magic, packet_type, length = HEADER.unpack_from(buffer, offset)
            body = offset + HEADER_SIZE
            if body + length > end:
                break
            offset = body + length
            self.serve_packet(peer, packet_type, buffer[body:offset], touched)
        peer.inbox = buffer[offset:]

    def serve_packet(self, peer: Peer, packet_type: int, body: bytes, touched: list[Peer]) -> None:
        if packet_type == T.SUBMIT_JOB or packet_type == T.SUBMIT_JOB_BG:
            function, unique, data = split_arguments(packet_type, body)  # type: ignore[misc]
            self.next_handle += 1
            handle = b"H:floor:%d" % self.next_handle
            client = peer if packet_type == T.SUBMIT_JOB else None
            queue = self.queues.get(function)
            if queue is None:
                queue = self.queues[function] = collections.deque()
            queue.append(Job(handle, function, unique, data, client))
            self.send(peer, packet(T.JOB_CREATED, handle), touched)
            sleepers = self.sleepers.get(function)
            if sleepers:
                worker, _ = sleepers.popitem()
                self.send(worker, NOOP, touched)
        elif packet_type == T.GRAB_JOB_UNIQ:
            for function in peer.functions:
                queue = self.queues.get(function)
                if queue:
                    job = queue.popleft()
                    self.running[job.handle] = job
                    assign = packet(T.JOB_ASSIGN_UNIQ, job.handle, function, job.unique, job.data)
                    self.send(peer, assign, touched)
                    return
            self.send(peer, NO_JOB, touched)
        elif packet_type == T.WORK_COMPLETE:
            handle, result = split_arguments(packet_type, body)  # type: ignore[misc]
            job = self.running.pop(handle, None)
            if job is not None and job.client is not None and not job.client.closed:
                self.send(job.client, packet(T.WORK_COMPLETE, handle, result), touched)
        elif packet_type == T.PRE_SLEEP:
            if any(self.queues.get(function) for function in peer.functions):
                self.send(peer, NOOP, touched)
                return
            for function in peer.functions:
                self.sleepers.setdefault(function, {})[peer] = None
        elif packet_type == T.CAN_DO:
            peer.functions.append(body)
        elif packet_type == T.ECHO_REQ:
            self.send(peer, packet(T.ECHO_RES, body), touched)
        # Anything else (SET_CLIENT_ID, OPTION_REQ, ...) gets no reply.


async def main_async(host: str, port: int, per_pass: bool) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
    for listener in listeners:
        listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await FloorServer(per_pass).serve(listeners[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--per-pass", action="store_true", help="one write per peer per pass, not per read"
    )
    args = parser.parse_args()
    trio.run(main_async, args.host, args.port, args.per_pass)


if __name__ == "__main__":
    main()
