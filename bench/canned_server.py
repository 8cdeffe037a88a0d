"""A trivial Gearman responder, to measure the load generator's own ceiling.

    python -m bench.canned_server --port PORT

It answers every request the scenarios send with a canned reply and keeps no state beyond a
counter of queued background jobs: ECHO_REQ -> ECHO_RES, GET_STATUS -> STATUS_RES (unknown),
SUBMIT_JOB_BG -> JOB_CREATED (and one more job to hand out), SUBMIT_JOB -> JOB_CREATED plus an
immediate WORK_COMPLETE (no worker involved), GRAB_JOB_UNIQ -> JOB_ASSIGN_UNIQ while queued jobs
remain, else NO_JOB. Everything else gets no reply.

Its cost per packet is a header unpack and a list append, far below any real server's, so a
scenario run against it shows how fast the load generator itself can go on this machine. It
trusts its peer (our own load generator): no validation, no admin protocol, no limits.
"""

from __future__ import annotations

import argparse
import selectors
import socket

from jobserver.protocol import HEADER, HEADER_SIZE, encode_response, split_arguments
from jobserver.protocol import PacketType as T

RECEIVE_SIZE = 256 * 1024

JOB_CREATED_BG = encode_response(T.JOB_CREATED, b"H:canned:0")
STATUS_UNKNOWN = encode_response(T.STATUS_RES, b"H:bench:0", b"0", b"0", b"0", b"0")
NO_JOB = encode_response(T.NO_JOB)
SILENT = frozenset({T.CAN_DO, T.PRE_SLEEP, T.WORK_COMPLETE, T.SET_CLIENT_ID, T.OPTION_REQ})


class CannedServer:
    def __init__(self, host: str, port: int, payload_size: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.listener = socket.create_server((host, port), backlog=1024)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.queued = 0
        self.handles = 0
        self.job_assign = encode_response(
            T.JOB_ASSIGN_UNIQ, b"H:canned:0", b"bench", b"", b"x" * payload_size
        )
        self.inbox: dict[socket.socket, bytearray] = {}
        self.outbox: dict[socket.socket, bytes] = {}
        self.waiting_to_write: set[socket.socket] = set()

    def serve_forever(self) -> None:
        while True:
            for key, events in self.selector.select():
                sock = key.fileobj
                if sock is self.listener:
                    self.accept()
                    continue
                if events & selectors.EVENT_WRITE:
                    self.flush(sock)
                if events & selectors.EVENT_READ:
                    self.read(sock)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.inbox[sock] = bytearray()
            self.selector.register(sock, selectors.EVENT_READ)

    def close(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        self.inbox.pop(sock, None)
        self.outbox.pop(sock, None)
        self.waiting_to_write.discard(sock)
        sock.close()

    def read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(RECEIVE_SIZE)
        except ConnectionError:
            data = b""
        if not data:
            self.close(sock)
            return
        buffer = self.inbox[sock]
        buffer += data
        replies = self.answer(buffer)
        if replies:
            self.outbox[sock] = self.outbox.get(sock, b"") + b"".join(replies)
            self.flush(sock)

    def answer(self, buffer: bytearray) -> list[bytes]:
        replies = []
        offset, end = 0, len(buffer)
        while end - offset >= HEADER_SIZE:
            _magic, packet_type, length = HEADER.unpack_from(buffer, offset)
            body = offset + HEADER_SIZE
            if body + length > end:
                break
            packet_end = body + length
            if packet_type == T.ECHO_REQ:
                reply = encode_response(T.ECHO_RES, bytes(buffer[body:packet_end]))
                # Fast path: a window of identical ECHO_REQs (what scenario (a) sends) gets
                # the same number of identical replies without looking at each one.
                size = packet_end - offset
                repeats = (end - offset) // size
                if (
                    repeats > 1
                    and buffer[offset : offset + repeats * size]
                    == bytes(buffer[offset:packet_end]) * repeats
                ):
                    replies.append(reply * repeats)
                    offset += repeats * size
                    continue
                replies.append(reply)
            elif packet_type == T.SUBMIT_JOB_BG:
                replies.append(JOB_CREATED_BG)
                self.queued += 1
            elif packet_type == T.GRAB_JOB_UNIQ:
                if self.queued:
                    self.queued -= 1
                    replies.append(self.job_assign)
                else:
                    replies.append(NO_JOB)
            elif packet_type == T.SUBMIT_JOB:
                args = split_arguments(T.SUBMIT_JOB, bytes(buffer[body:packet_end]))
                self.handles += 1
                handle = b"H:canned:%d" % self.handles
                replies.append(encode_response(T.JOB_CREATED, handle))
                replies.append(encode_response(T.WORK_COMPLETE, handle, args[2] if args else b""))
            elif packet_type == T.GET_STATUS:
                replies.append(STATUS_UNKNOWN)
            elif packet_type not in SILENT:
                raise ValueError(f"canned server has no reply for packet type {packet_type}")
            offset = packet_end
        del buffer[:offset]
        return replies

    def flush(self, sock: socket.socket) -> None:
        pending = self.outbox.get(sock)
        if not pending:
            return
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            sent = 0
        except ConnectionError:
            self.close(sock)
            return
        rest = pending[sent:]
        if rest:
            self.outbox[sock] = rest
            if sock not in self.waiting_to_write:
                self.waiting_to_write.add(sock)
                self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        else:
            del self.outbox[sock]
            if sock in self.waiting_to_write:
                self.waiting_to_write.discard(sock)
                self.selector.modify(sock, selectors.EVENT_READ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--payload-size", type=int, default=100)
    args = parser.parse_args()
    CannedServer(args.host, args.port, args.payload_size).serve_forever()


if __name__ == "__main__":
    main()
