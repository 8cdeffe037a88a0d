"""A small raw-socket Gearman client for tests that talk to a live server.

Packets are encoded with jobserver.protocol.encode_request and replies decoded with its
Decoder(accept_admin=False), one reply at a time, so binary replies and admin text replies
can be read from the same connection in whatever order the test expects them. Every read has
a deadline: a missing reply fails the test within seconds instead of hanging it.
"""

from __future__ import annotations

import socket
import time

import pytest

from jobserver.protocol import (
    HEADER,
    HEADER_SIZE,
    RES,
    Decoder,
    Packet,
    ProtocolError,
    encode_request,
)
from jobserver.protocol import PacketType as T

TIMEOUT = 5.0
"""Seconds any single expected reply may take."""

QUIET = 0.3
"""Seconds of silence taken as "the server sent nothing" by expect_nothing()."""

_LIST_COMMANDS = {b"workers", b"status", b"prioritystatus", b"show"}


class Wire:
    """One TCP connection to a Gearman server, speaking raw packets and admin lines."""

    def __init__(self, address: tuple[str, int] | str, timeout: float = TIMEOUT) -> None:
        if isinstance(address, str):
            host, _, port = address.rpartition(":")
            address = (host.strip("[]"), int(port))
        self.address = address
        self.timeout = timeout
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        self._eof = False

    @classmethod
    def to(cls, server, timeout: float = TIMEOUT) -> Wire:
        """Connect to a servers.Server."""
        return cls((server.host, server.port), timeout)

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # ------------------------------------------------------------------ sending

    def send(self, packet_type: int, *args: bytes) -> None:
        self.sock.sendall(encode_request(packet_type, *args))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_line(self, line: bytes | str) -> None:
        """Send one admin text line; LF is appended unless it already ends in one."""
        if isinstance(line, str):
            line = line.encode()
        if not line.endswith(b"\n"):
            line += b"\n"
        self.sock.sendall(line)

    # ------------------------------------------------------------------ receiving

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False on EOF. Raises TimeoutError at the deadline."""
        if self._eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete reply within the deadline; buffered {self._peek()}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            raise TimeoutError(
                f"no complete reply within the deadline; buffered {self._peek()}"
            ) from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    def _peek(self) -> str:
        return f"{len(self._buffer)} bytes {bytes(self._buffer[:80])!r}"

    def read_packet(self, timeout: float | None = None) -> Packet:
        """The next binary reply. Raises TimeoutError if none arrives in time and
        ConnectionError if the server closes the connection first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self._buffer) < HEADER_SIZE:
            if not self._fill(deadline):
                raise ConnectionError(f"server closed the connection; buffered {self._peek()}")
        magic, _type, length = HEADER.unpack_from(self._buffer)
        assert magic == RES, f"expected a binary reply, got {self._peek()}"
        while len(self._buffer) < HEADER_SIZE + length:
            if not self._fill(deadline):
                raise ConnectionError(f"server closed the connection; buffered {self._peek()}")
        raw = bytes(self._buffer[: HEADER_SIZE + length])
        del self._buffer[: HEADER_SIZE + length]
        try:
            events = Decoder(accept_admin=False).feed(raw)
        except ProtocolError as error:
            raise AssertionError(f"undecodable packet {raw[:80]!r}: {error}") from None
        assert len(events) == 1, f"decoding {raw[:80]!r} gave {events!r}"
        packet = events[0]
        assert type(packet) is Packet, f"server sent a malformed packet {raw[:80]!r}"
        return packet

    def expect(self, packet_type: int, *args: bytes, timeout: float | None = None):
        """Read the next packet, assert its type (and its arguments, if given); return args."""
        packet = self.read_packet(timeout)
        assert packet.type == packet_type, (
            f"expected {T(packet_type).name}, got {_name(packet.type)} {packet.args!r}"
        )
        if args:
            assert packet.args == args, (
                f"{T(packet_type).name}: expected {args!r}, got {packet.args!r}"
            )
        return packet.args

    def expect_error(self, code: bytes, text: bytes | None = None) -> bytes:
        """Read the next packet, assert it is ERROR with that code (and text); return text."""
        got_code, got_text = self.expect(T.ERROR)
        assert got_code == code, f"expected ERROR {code!r}, got {got_code!r} {got_text!r}"
        if text is not None:
            assert got_text == text, f"ERROR {code!r}: expected text {text!r}, got {got_text!r}"
        return got_text

    def expect_nothing(self, wait: float = QUIET) -> None:
        """Assert that the server sends nothing for `wait` seconds (and keeps the connection)."""
        deadline = time.monotonic() + wait
        try:
            while True:
                if self._buffer:
                    raise AssertionError(f"unexpected bytes from the server: {self._peek()}")
                if not self._fill(deadline):
                    raise AssertionError("server closed the connection")
        except TimeoutError:
            if self._buffer:
                raise AssertionError(f"unexpected bytes from the server: {self._peek()}") from None

    def read_until_closed(self, timeout: float | None = None) -> bytes:
        """Everything the server sends until it closes the connection."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self._fill(deadline):
            pass
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def assert_closed(self, timeout: float | None = None) -> None:
        """Assert the server closes the connection without sending anything (more)."""
        data = self.read_until_closed(timeout)
        assert data == b"", f"expected a silent close, got {data[:80]!r}"

    def read_text(self, complete, timeout: float | None = None) -> bytes:
        """Raw bytes until `complete(buffer)` holds; those bytes are consumed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            end = complete(bytes(self._buffer))
            if end:
                text = bytes(self._buffer[:end])
                del self._buffer[:end]
                return text
            if not self._fill(deadline):
                raise ConnectionError(f"server closed the connection; buffered {self._peek()}")

    def read_admin_reply(self, is_list: bool, timeout: float | None = None) -> bytes:
        """One admin reply: a single line, or (for lists) lines up to the `.` line. A list
        command answered with one ERR line is complete at that line."""
        return self.read_text(lambda data: admin_reply_end(data, is_list), timeout)

    def admin(self, line: bytes | str, timeout: float | None = None) -> bytes:
        """Send one admin line and return its complete reply."""
        if isinstance(line, str):
            line = line.encode()
        self.send_line(line)
        return self.read_admin_reply(is_list_command(line), timeout)

    # ------------------------------------------------------------------ conveniences

    def echo(self, data: bytes = b"ping") -> None:
        """ECHO round trip: proves every earlier request on this connection was processed."""
        self.send(T.ECHO_REQ, data)
        self.expect(T.ECHO_RES, data)

    def submit(
        self,
        function: bytes,
        data: bytes = b"",
        unique: bytes = b"",
        packet_type: int = T.SUBMIT_JOB,
    ) -> bytes:
        """Submit a job, assert JOB_CREATED, return the handle."""
        self.send(packet_type, function, unique, data)
        (handle,) = self.expect(T.JOB_CREATED)
        return handle

    def can_do(self, *functions: bytes) -> None:
        """Register functions and wait until the server has processed the registrations."""
        for function in functions:
            self.send(T.CAN_DO, function)
        self.echo(b"registered")


def is_list_command(line: bytes) -> bool:
    words = [word.lower() for word in line.split()]
    if words[:2] == [b"show", b"job"]:  # one job's state: a single line
        return False
    return bool(words) and words[0] in _LIST_COMMANDS


def admin_reply_end(data: bytes, is_list: bool) -> int:
    """Length of the complete admin reply at the start of `data`, or 0 if incomplete."""
    first = data.find(b"\n")
    if first < 0:
        return 0
    if not is_list or data.startswith(b"ERR "):
        return first + 1
    if data.startswith(b".\n"):
        return 2
    end = data.find(b"\n.\n")
    return end + 3 if end >= 0 else 0


def _name(packet_type: int) -> str:
    try:
        return T(packet_type).name
    except ValueError:
        return str(packet_type)


@pytest.fixture
def connect():
    """`connect(server)` opens a Wire to a servers.Server; every Wire is closed at teardown."""
    opened: list[Wire] = []

    def factory(server, timeout: float = TIMEOUT) -> Wire:
        wire = Wire.to(server, timeout)
        opened.append(wire)
        return wire

    yield factory
    for wire in opened:
        wire.close()
