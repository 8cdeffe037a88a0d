"""The Gearman wire protocol, sans-IO: bytes in, packets out; packets in, bytes out.

This module is the only place in the project that knows the framing (shared doc §1, §2).
The server, the worker SDK and the client SDK all use it; nothing else slices headers or
splits payloads on NUL.

A binary packet is a 12-byte header (magic, type, length; big-endian) followed by `length`
bytes of arguments separated by single NUL bytes, with no NUL after the last one. Each type
has a fixed argument count; the last argument runs to the end of the payload and is the only
one that may contain NUL bytes. An admin text line (first byte non-zero) may appear wherever a
binary packet could start, on the same connection.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

REQ = b"\0REQ"
"""Magic of every packet sent to a server."""
RES = b"\0RES"
"""Magic of every packet sent by a server."""

HEADER = struct.Struct(">4sII")
HEADER_SIZE = HEADER.size  # 12

MAX_ARGUMENTS_SIZE = 8192
"""Header plus every argument except an opaque data tail must fit in 8 KiB.

gearmand reads the non-data part of a packet into an 8192-byte buffer and closes the
connection when it does not fit (§1 "Size limits"); we keep the same bound so that a peer
cannot make us hold a huge function name or handle, and so that what works against us also
works against gearmand."""

DEFAULT_MAX_PACKET_SIZE = 64 * 1024 * 1024
"""Largest whole packet (header included) a decoder accepts unless configured otherwise.

The length field allows 4 GiB; gearmand has no cap on the data tail and will buffer whatever a
peer announces. 64 MiB is far above any sane job payload and keeps one connection from
exhausting memory."""

MAX_ADMIN_LINE = 8192
"""Longest admin text line, newline included; gearmand closes on longer lines (§4)."""


LARGE_PAYLOAD = 65536
"""Payloads longer than this are copied out of the decoder's buffer through a memoryview (one
copy); shorter ones by slicing, which is faster for small payloads but copies twice."""


class PacketType(enum.IntEnum):
    CAN_DO = 1
    CANT_DO = 2
    RESET_ABILITIES = 3
    PRE_SLEEP = 4
    UNUSED = 5
    NOOP = 6
    SUBMIT_JOB = 7
    JOB_CREATED = 8
    GRAB_JOB = 9
    NO_JOB = 10
    JOB_ASSIGN = 11
    WORK_STATUS = 12
    WORK_COMPLETE = 13
    WORK_FAIL = 14
    GET_STATUS = 15
    ECHO_REQ = 16
    ECHO_RES = 17
    SUBMIT_JOB_BG = 18
    ERROR = 19
    STATUS_RES = 20
    SUBMIT_JOB_HIGH = 21
    SET_CLIENT_ID = 22
    CAN_DO_TIMEOUT = 23
    ALL_YOURS = 24
    WORK_EXCEPTION = 25
    OPTION_REQ = 26
    OPTION_RES = 27
    WORK_DATA = 28
    WORK_WARNING = 29
    GRAB_JOB_UNIQ = 30
    JOB_ASSIGN_UNIQ = 31
    SUBMIT_JOB_HIGH_BG = 32
    SUBMIT_JOB_LOW = 33
    SUBMIT_JOB_LOW_BG = 34
    SUBMIT_JOB_SCHED = 35
    SUBMIT_JOB_EPOCH = 36
    SUBMIT_REDUCE_JOB = 37
    SUBMIT_REDUCE_JOB_BACKGROUND = 38
    GRAB_JOB_ALL = 39
    JOB_ASSIGN_ALL = 40
    GET_STATUS_UNIQUE = 41
    STATUS_RES_UNIQUE = 42


T = PacketType

ARGUMENT_COUNT: dict[int, int] = {
    T.CAN_DO: 1,
    T.CANT_DO: 1,
    T.RESET_ABILITIES: 0,
    T.PRE_SLEEP: 0,
    T.UNUSED: 0,
    T.NOOP: 0,
    T.SUBMIT_JOB: 3,
    T.JOB_CREATED: 1,
    T.GRAB_JOB: 0,
    T.NO_JOB: 0,
    T.JOB_ASSIGN: 3,
    T.WORK_STATUS: 3,
    T.WORK_COMPLETE: 2,
    T.WORK_FAIL: 1,
    T.GET_STATUS: 1,
    T.ECHO_REQ: 1,
    T.ECHO_RES: 1,
    T.SUBMIT_JOB_BG: 3,
    T.ERROR: 2,
    T.STATUS_RES: 5,
    T.SUBMIT_JOB_HIGH: 3,
    T.SET_CLIENT_ID: 1,
    T.CAN_DO_TIMEOUT: 2,
    T.ALL_YOURS: 0,
    T.WORK_EXCEPTION: 2,
    T.OPTION_REQ: 1,
    T.OPTION_RES: 1,
    T.WORK_DATA: 2,
    T.WORK_WARNING: 2,
    T.GRAB_JOB_UNIQ: 0,
    T.JOB_ASSIGN_UNIQ: 4,
    T.SUBMIT_JOB_HIGH_BG: 3,
    T.SUBMIT_JOB_LOW: 3,
    T.SUBMIT_JOB_LOW_BG: 3,
    T.SUBMIT_JOB_SCHED: 8,
    T.SUBMIT_JOB_EPOCH: 4,
    T.SUBMIT_REDUCE_JOB: 5,
    T.SUBMIT_REDUCE_JOB_BACKGROUND: 5,
    T.GRAB_JOB_ALL: 0,
    T.JOB_ASSIGN_ALL: 5,
    T.GET_STATUS_UNIQUE: 1,
    T.STATUS_RES_UNIQUE: 6,
}
"""Fixed number of arguments of every packet type (§2)."""

SUBMIT_TYPES: frozenset[int] = frozenset(
    {
        T.SUBMIT_JOB,
        T.SUBMIT_JOB_BG,
        T.SUBMIT_JOB_HIGH,
        T.SUBMIT_JOB_HIGH_BG,
        T.SUBMIT_JOB_LOW,
        T.SUBMIT_JOB_LOW_BG,
        T.SUBMIT_JOB_SCHED,
        T.SUBMIT_JOB_EPOCH,
        T.SUBMIT_REDUCE_JOB,
        T.SUBMIT_REDUCE_JOB_BACKGROUND,
    }
)
"""Every packet type that submits a job; its first argument is the function name."""

HAS_DATA_TAIL: frozenset[int] = SUBMIT_TYPES | frozenset(
    {
        T.JOB_ASSIGN,
        T.JOB_ASSIGN_UNIQ,
        T.JOB_ASSIGN_ALL,
        T.WORK_COMPLETE,
        T.WORK_DATA,
        T.WORK_WARNING,
        T.WORK_EXCEPTION,
        T.ECHO_REQ,
        T.ECHO_RES,
    }
)
"""Types whose last argument is an opaque data tail (workload, result, echo bytes).

Only the arguments before the tail count towards MAX_ARGUMENTS_SIZE. For the other types the
last argument is still the whole remainder of the payload (so `CAN_DO "fn\\0"` names a function
`fn\\0`, as in gearmand), but it counts towards the limit."""

# Plain ints for the hot path: dict lookups keyed by int are cheaper than enum hashing.
_ARGC_BY_TYPE: list[int] = [-1] * (max(ARGUMENT_COUNT) + 1)
for _type, _count in ARGUMENT_COUNT.items():
    _ARGC_BY_TYPE[_type] = _count
_TAIL_BY_TYPE: list[bool] = [t in HAS_DATA_TAIL for t in range(len(_ARGC_BY_TYPE))]
MAX_PACKET_TYPE = len(_ARGC_BY_TYPE) - 1  # 42


class Packet(NamedTuple):
    """One decoded binary packet. `args` has exactly ARGUMENT_COUNT[type] items."""

    type: int
    args: tuple[bytes, ...]
    magic: bytes = REQ


class AdminLine(NamedTuple):
    """One admin text line, without its `\\n` and one optional `\\r` before it."""

    text: bytes


class BadPacket(NamedTuple):
    """A packet whose framing was intact but whose arguments were not.

    The stream is still in sync (the length field said where the packet ends), so the peer
    gets an ERROR reply and the connection carries on; gearmand instead scans past the packet
    for the missing NUL separators and hangs or closes (§1).
    """

    type: int
    magic: bytes
    code: bytes
    text: bytes


class OversizedPacket(NamedTuple):
    """A packet whose header announces more than the decoder's max_packet_size.

    Given only by a decoder made with `skip_oversized=True` (the server's): it comes as soon as
    the header is read, and the decoder then drops the `size - HEADER_SIZE` body bytes as they
    arrive, without buffering them, so the stream stays in sync and the connection goes on.
    `size` includes the header.
    """

    type: int
    magic: bytes
    size: int


Event = Packet | AdminLine | BadPacket | OversizedPacket


class ProtocolError(Exception):
    """The byte stream cannot be resynchronised; the connection must be closed."""


def encode(packet_type: int, *args: bytes, magic: bytes = RES) -> bytes:
    """Encode one packet. Raises ValueError when the argument count is wrong, or when an
    argument other than the last contains a NUL (it would shift every later argument)."""
    if magic != REQ and magic != RES:
        raise ValueError(f"magic must be REQ or RES, not {magic!r}")
    expected = _ARGC_BY_TYPE[packet_type] if 0 < packet_type <= MAX_PACKET_TYPE else -1
    if expected != len(args):
        raise ValueError(f"packet type {packet_type} takes {expected} arguments, got {len(args)}")
    for arg in args[:-1]:
        if b"\0" in arg:
            raise ValueError(f"argument {arg!r} of packet type {packet_type} contains NUL")
    payload = b"\0".join(args)
    return HEADER.pack(magic, packet_type, len(payload)) + payload


def encode_request(packet_type: int, *args: bytes) -> bytes:
    """Encode a packet sent to a server (REQ magic)."""
    return encode(packet_type, *args, magic=REQ)


def encode_response(packet_type: int, *args: bytes) -> bytes:
    """Encode a packet sent by a server (RES magic)."""
    return encode(packet_type, *args, magic=RES)


def split_arguments(packet_type: int, payload: bytes) -> tuple[bytes, ...] | None:
    """Split a payload into exactly the type's argument count, or None if separators are
    missing. The first N-1 arguments are NUL-terminated; the last is the whole remainder."""
    argc = _ARGC_BY_TYPE[packet_type]
    if argc == 0:
        return ()  # a body on an argument-less type is read and ignored, as in gearmand
    if argc == 1:
        return (payload,)
    parts = payload.split(b"\0", argc - 1)
    if len(parts) != argc:
        return None
    return tuple(parts)


class Decoder:
    """Incremental decoder: feed it any chunks of bytes, get every complete event back.

    `accept_admin` lets admin text lines through (a server's view of the stream); SDKs
    decoding server replies turn it off, so a stray non-zero byte is a protocol error.

    `skip_oversized` turns a packet over `max_packet_size` from a ProtocolError into an
    OversizedPacket event followed by skipping its body (the server answers it with ERROR and
    carries on). Off by default: a client SDK cannot answer a server, so for it an oversized
    reply stays a broken stream.
    """

    __slots__ = (
        "_buffer",
        "_offset",
        "_skipping",
        "accept_admin",
        "max_packet_size",
        "skip_oversized",
    )

    def __init__(
        self,
        *,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        accept_admin: bool = True,
        skip_oversized: bool = False,
    ) -> None:
        if max_packet_size < MAX_ARGUMENTS_SIZE:
            raise ValueError(f"max_packet_size must be at least {MAX_ARGUMENTS_SIZE} bytes")
        self.max_packet_size = max_packet_size
        self.accept_admin = accept_admin
        self.skip_oversized = skip_oversized
        self._buffer = bytearray()
        self._offset = 0
        self._skipping = 0  # body bytes of an oversized packet still to drop

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete event."""
        return len(self._buffer) - self._offset

    @property
    def in_packet(self) -> bool:
        """True while the stream is inside an event: part of a header, body or admin line is
        buffered, or an oversized body is being skipped. False between events."""
        return self._skipping > 0 or len(self._buffer) > self._offset

    def clear(self) -> None:
        """Drop everything buffered (the connection is being closed): frees the memory at once,
        whoever still holds the decoder."""
        self._buffer = bytearray()
        self._offset = 0
        self._skipping = 0

    def feed(self, data: bytes) -> list[Event]:
        """Add `data` and return every event now complete, in stream order.

        Raises ProtocolError for a stream that cannot be resynchronised (bad magic, unknown
        type, oversize line, oversize packet unless skip_oversized); events decoded before the
        fault are lost with it, which is fine because the connection is closed anyway.
        """
        if self._skipping:
            if len(data) <= self._skipping:
                self._skipping -= len(data)
                return []
            skipped = self._skipping
            self._skipping = 0
            self._buffer += memoryview(data)[skipped:]  # the rest, without copying it twice
        else:
            self._buffer += data
        buffer = self._buffer
        events: list[Event] = []
        offset = self._offset
        end = len(buffer)
        while offset < end:
            if buffer[offset] != 0:
                newline = buffer.find(b"\n", offset, offset + MAX_ADMIN_LINE)
                if newline < 0:
                    if not self.accept_admin:
                        raise ProtocolError(
                            f"unexpected byte {buffer[offset]:#04x}; expected a packet"
                        )
                    if end - offset >= MAX_ADMIN_LINE:
                        raise ProtocolError(f"admin line longer than {MAX_ADMIN_LINE} bytes")
                    break
                if not self.accept_admin:
                    raise ProtocolError("admin text where a packet was expected")
                line_end = newline
                if line_end > offset and buffer[line_end - 1] == 0x0D:
                    line_end -= 1
                events.append(AdminLine(bytes(buffer[offset:line_end])))
                offset = newline + 1
                continue
            if end - offset < HEADER_SIZE:
                break
            magic, packet_type, length = HEADER.unpack_from(buffer, offset)
            if magic != REQ and magic != RES:
                raise ProtocolError(f"bad magic {bytes(magic)!r}")
            if not 0 < packet_type <= MAX_PACKET_TYPE:
                raise ProtocolError(f"unknown packet type {packet_type}")
            if not _TAIL_BY_TYPE[packet_type] and length > MAX_ARGUMENTS_SIZE - HEADER_SIZE:
                # Checked from the header alone, so the verdict does not depend on how the bytes
                # were split across reads, and we never buffer a name that cannot be accepted.
                # Before the size limit: a huge name or handle is garbage, not a big payload.
                raise ProtocolError(_arguments_too_large(packet_type))
            body_start = offset + HEADER_SIZE
            if HEADER_SIZE + length > self.max_packet_size:
                if not self.skip_oversized:
                    raise ProtocolError(
                        f"packet of {HEADER_SIZE + length} bytes exceeds the limit of "
                        f"{self.max_packet_size} bytes"
                    )
                events.append(OversizedPacket(packet_type, magic, HEADER_SIZE + length))
                if end - body_start >= length:  # the whole body is already here
                    offset = body_start + length
                    continue
                self._skipping = length - (end - body_start)
                offset = end
                break
            body_end = body_start + length
            if body_end > end:
                break
            if length > LARGE_PAYLOAD:
                # One copy instead of two (slice, then bytes): a 64 MiB payload must not
                # briefly cost three times its size.
                with memoryview(buffer) as view:
                    payload = bytes(view[body_start:body_end])
            else:
                payload = bytes(buffer[body_start:body_end])
            offset = body_end
            args = split_arguments(packet_type, payload)
            if args is None:
                events.append(
                    BadPacket(
                        packet_type,
                        magic,
                        b"INVALID_PACKET",
                        b"Packet has fewer arguments than its type requires",
                    )
                )
                continue
            if (
                _TAIL_BY_TYPE[packet_type]
                and HEADER_SIZE + len(payload) - len(args[-1]) > MAX_ARGUMENTS_SIZE
            ):
                raise ProtocolError(_arguments_too_large(packet_type))
            events.append(Packet(packet_type, args, magic))
        if offset == end:
            buffer.clear()
            offset = 0
        elif offset > 65536 and offset * 2 > end:
            # Drop consumed bytes now and then, not on every call: slicing the front of a
            # bytearray is a copy, so doing it per call would make pipelined reads quadratic.
            del buffer[:offset]
            offset = 0
        self._offset = offset
        return events


def _arguments_too_large(packet_type: int) -> str:
    return f"packet type {packet_type}: header and arguments exceed {MAX_ARGUMENTS_SIZE} bytes"
