"""Admin text commands as the SDKs and the `jobserver dead` command send them.

A text command is one line of words separated by spaces (shared doc §4), so a function name or
job handle can only go into one if it is a single word: no space, no control byte. Replies are
one line (`OK ...`, `ERR <code> <text>`) or, for listings, lines ending in a `.` line; an error
to a listing is a single `ERR` line. gearmand answers the commands it does not know with
`ERR UNKNOWN_COMMAND ...` or, for unknown `show` arguments, `ERR UNKNOWN_SHOW_ARGUMENTS`.
"""

from __future__ import annotations

import re
import ssl

import anyio

from ..protocol import AdminLine, Packet
from .addresses import ServerAddress
from .connection import CONNECT_TIMEOUT, ConnectionLost, ServerConnection
from .errors import ProtocolViolation

_NOT_A_WORD = re.compile(rb"[\x00-\x20\x7f]")
"""Bytes that would split a word or end the line: space and every ASCII control byte."""

LIST_END = b"."

ADMIN_TIMEOUT = 5.0
"""Seconds a server may take to answer one admin command, connect included: servers answer at
once, so a server this slow is reported as failing rather than waited for."""


def is_admin_word(value: bytes) -> bool:
    """Whether `value` can be sent as one word of a text command.

    >>> is_admin_word(b"H:host:4730:1"), is_admin_word(b"two words")
    (True, False)
    """
    return bool(value) and _NOT_A_WORD.search(value) is None


def check_admin_word(value: str, what: str) -> bytes:
    """`value` as UTF-8 bytes, or ValueError when it cannot be one word of a text command.

    >>> check_admin_word("resize", "function")
    b'resize'
    """
    data = value.encode("utf-8", "surrogateescape")
    if not is_admin_word(data):
        raise ValueError(
            f"{what} {value!r} cannot go into an admin text command "
            "(it must be one word: no spaces or control characters)"
        )
    return data


def is_error(line: bytes) -> bool:
    """An `ERR ...` reply (gearmand's and ours)."""
    return line == b"ERR" or line.startswith(b"ERR ")


async def admin_request(
    address: ServerAddress,
    command: bytes,
    *,
    listing: bool,
    timeout: float = ADMIN_TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> list[bytes]:
    """Send one text command on a connection of its own and return the reply's lines: the
    one line, or a listing's lines without the final `.` (an error to a listing: its one
    `ERR` line). Raises ConnectionLost when the server cannot be reached, closes, or does not
    answer within `timeout` (a TLS handshake that fails: ConnectionLost with its cause),
    ProtocolViolation when it answers with something else. `tls`: a context from
    tls.client_context, for a server that serves TLS.

    Example::

        lines = await admin_request(parse_address("127.0.0.1:4730"), b"show dead jobs\\n",
                                    listing=True, tls=client_context(TlsFiles(ca="ca.pem")))
    """
    lines: list[bytes] = []
    with anyio.move_on_after(timeout) as waited:
        connection = await ServerConnection.open(
            address, timeout=min(timeout, CONNECT_TIMEOUT), tls=tls
        )
        try:
            connection.accept_text = True
            await connection.send_bytes(command)
            while True:
                event = await connection.receive()
                if isinstance(event, Packet):
                    raise ProtocolViolation(f"{address}: a packet in answer to a text command")
                assert isinstance(event, AdminLine)
                if listing and event.text == LIST_END:
                    return lines
                lines.append(event.text)
                if not listing or (len(lines) == 1 and is_error(event.text)):
                    return lines
        finally:
            with anyio.CancelScope(shield=True):
                await connection.aclose()
    assert waited.cancelled_caught
    raise ConnectionLost(f"{address}: no answer within {timeout:g} s")
