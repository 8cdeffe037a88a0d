"""Job handles that never repeat, across restarts and across servers.

gearmand numbers handles `H:<host>:<n>` from 1 at every start (§3.1, §6.15), so a client that
keeps a handle across a server restart, or talks to several servers, can mix up two jobs. Ours
carry the server's identity (host and port) and a start stamp before the counter.
"""

from __future__ import annotations

MAX_HANDLE_SIZE = 63
"""Longest handle clients accept: libgearman keeps handles in a 64-byte NUL-terminated array."""

MAX_COUNTER_DIGITS = 20
"""Digits of the largest 64-bit counter, reserved so a handle never outgrows MAX_HANDLE_SIZE."""

STAMP_DIGITS = 9
"""A start time in milliseconds, base 36: nine digits last until the year 5188."""

MAX_PREFIX_SIZE = MAX_HANDLE_SIZE - (1 + STAMP_DIGITS + 1 + MAX_COUNTER_DIGITS)
"""Room left for the operator's prefix (33 bytes)."""

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def base36(number: int) -> str:
    digits = []
    while True:
        number, digit = divmod(number, 36)
        digits.append(_BASE36[digit])
        if not number:
            return "".join(reversed(digits))


def default_prefix(hostname: str, port: int) -> str:
    """`H:<host>:<port>`, the host cut short enough to fit MAX_PREFIX_SIZE."""
    tail = f":{port}"
    room = MAX_PREFIX_SIZE - len("H:") - len(tail)
    return f"H:{hostname[:room]}{tail}"


class HandleGenerator:
    """Makes `<prefix>:<stamp>:<n>` with n counting from 1."""

    __slots__ = ("_base", "_counter")

    def __init__(self, prefix: str, start_time_ms: int) -> None:
        if start_time_ms < 0:
            raise ValueError("the start time must not be before 1970")
        encoded = prefix.encode()
        if len(encoded) > MAX_PREFIX_SIZE:
            raise ValueError(f"job handle prefix must be at most {MAX_PREFIX_SIZE} bytes")
        if b"\0" in encoded:
            raise ValueError("job handle prefix must not contain NUL")
        self._base = encoded + b":" + base36(start_time_ms).encode() + b":"
        self._counter = 0

    def next_handle(self) -> bytes:
        self._counter += 1
        return self._base + str(self._counter).encode()
