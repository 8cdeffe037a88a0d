"""TCP socket options shared by the server and the SDKs."""

from __future__ import annotations

import socket

import trio


def enable_keepalive(
    sock: socket.socket | trio.socket.SocketType, *, idle: int, interval: int, count: int
) -> None:
    """Probe an idle peer after `idle` s, every `interval` s, giving up after `count` misses,
    so a peer that vanished without FIN is noticed in idle + interval * count seconds."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
    ):
        if hasattr(socket, option):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
