"""Turning one call's arguments into one SUBMIT_* request, checked before anything is sent.

Everything a server would reject, or worse silently mishandle, is refused here with ValueError:
a bad request must never reach a connection that other calls share (a request the server does
not answer desynchronises the FIFO matching of replies, shared doc §3.14).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

from jobserver.protocol import DEFAULT_MAX_PACKET_SIZE, PacketType, encode_request
from jobserver.sdk.errors import PayloadError
from jobserver.sdk.names import check_function_name

MAX_PACKET_SIZE = DEFAULT_MAX_PACKET_SIZE
"""The largest request a Client sends unless told otherwise: jobserver's own default
(`--max-packet-size`). A larger one would only earn an ERROR from the server, after the
whole payload crossed the network; the client refuses it first, naming both sizes."""

MAX_UNIQUE_SIZE = 64
"""gearmand answers ARGUMENT_TOO_LARGE beyond 64 bytes and libgearman refuses them client-side
(§1, §6.10). (gearmand coalesces only up to 63 bytes.)"""

MAX_HANDLE_SIZE = 63
"""gearmand's handles fit in 64 bytes with the NUL, and it never answers a GET_STATUS whose
handle is 64 bytes or longer (§3.10, §3.14): that would desynchronise the connection."""

Priority = Literal["high", "normal", "low"]
"""A job's priority; `mypy` flags any other string (a typo such as "hihg")."""

PRIORITIES: tuple[Priority, ...] = get_args(Priority)

_FOREGROUND = {
    "high": PacketType.SUBMIT_JOB_HIGH,
    "normal": PacketType.SUBMIT_JOB,
    "low": PacketType.SUBMIT_JOB_LOW,
}
_BACKGROUND = {
    "high": PacketType.SUBMIT_JOB_HIGH_BG,
    "normal": PacketType.SUBMIT_JOB_BG,
    "low": PacketType.SUBMIT_JOB_LOW_BG,
}


@dataclass(frozen=True, slots=True)
class Submission:
    """One job as it goes on the wire: which server it belongs to is decided from
    (function, unique); `packet` is the encoded SUBMIT_* request, ready to pipeline."""

    function: str
    function_bytes: bytes
    unique: bytes  # b"": none, the job goes to any server and never coalesces
    background: bool
    packet: bytes


def foreground(function: str, payload: bytes, unique: bytes, priority: str) -> Submission:
    packet_type = _FOREGROUND[priority]
    name = function.encode()
    return Submission(
        function, name, unique, False, encode_request(packet_type, name, unique, payload)
    )


def background(
    function: str, payload: bytes, unique: bytes, priority: str, epoch: int | None
) -> Submission:
    name = function.encode()
    if epoch is None:
        packet = encode_request(_BACKGROUND[priority], name, unique, payload)
    else:
        packet = encode_request(
            PacketType.SUBMIT_JOB_EPOCH, name, unique, str(epoch).encode(), payload
        )
    return Submission(function, name, unique, True, packet)


def check_size(submission: Submission, limit: int) -> Submission:
    """PayloadError unless the encoded request fits the server's packet size limit.

    >>> len(check_size(foreground("f", b"x" * 10, b"", "normal"), 64).packet)
    25
    """
    size = len(submission.packet)
    if size > limit:
        raise PayloadError(
            f"function {submission.function!r}: the request is {size} bytes, over the "
            f"servers' limit of {limit} bytes (Client max_packet_size=, "
            "jobserver --max-packet-size)"
        )
    return submission


def check_max_packet_size(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 64:
        raise ValueError(f"max_packet_size must be an int of at least 64 bytes, not {limit!r}")
    return limit


def check_function(function: object) -> str:
    check_function_name(function)
    return function  # type: ignore[return-value]


def check_unique(unique: object) -> bytes:
    """The unique id as bytes; b"" for None or empty (no unique: never coalesced)."""
    if unique is None:
        return b""
    if isinstance(unique, str):
        data = unique.encode()
    elif isinstance(unique, bytes):
        data = unique
    else:
        raise TypeError(f"unique must be a str or bytes, not {type(unique).__name__}")
    if b"\0" in data:
        raise ValueError(f"unique {unique!r} contains a NUL byte")
    if len(data) > MAX_UNIQUE_SIZE:
        raise ValueError(f"unique of {len(data)} bytes is longer than {MAX_UNIQUE_SIZE}")
    return data


def check_priority(priority: object) -> Priority:
    for known in PRIORITIES:
        if priority == known:
            return known
    raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, not {timeout!r}")
    return float(timeout)


def run_at_epoch(run_at: object, priority: str) -> int | None:
    """Unix time for SUBMIT_JOB_EPOCH. A naive datetime is local time (as datetime.timestamp
    reads it). gearmand's epoch jobs are NORMAL priority only (§3.11), so a caller asking for
    another priority would silently not get it: refused instead."""
    if run_at is None:
        return None
    if not isinstance(run_at, datetime):
        raise TypeError(f"run_at must be a datetime, not {type(run_at).__name__}")
    if priority != "normal":
        raise ValueError(
            f"run_at jobs always run at normal priority (SUBMIT_JOB_EPOCH); got {priority!r}"
        )
    return math.floor(run_at.timestamp())


def check_handle(handle: object) -> bytes:
    if not isinstance(handle, str):
        raise TypeError(f"handle must be a str (or JobHandle), not {type(handle).__name__}")
    data = handle.encode("utf-8", "surrogateescape")
    if not data or b"\0" in data or len(data) > MAX_HANDLE_SIZE:
        raise ValueError(f"{handle!r} is not a job handle (1..{MAX_HANDLE_SIZE} bytes, no NUL)")
    return data
