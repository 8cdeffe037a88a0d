"""Accepting connections: the connection limit, and running out of file descriptors.

trio.serve_listeners logs a traceback on stderr for every failed accept and leaves the
connections waiting in the backlog unanswered when the process has no descriptor left. Here a
connection past `max_connections` is accepted and closed at once (the peer sees FIN and can
try another server), running out of descriptors anyway (EMFILE, ENFILE) answers the oldest
waiting connection the same way through a descriptor kept in reserve, and either is logged
once per LIMIT_LOG_INTERVAL with a count, never a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("jobserver")

FD_RESERVE = 64
"""Descriptors left out of the default max_connections: the store (database, WAL, shared
memory), the log file, listeners, trio's epoll and wake-up sockets, the reserve below, and
slack for whatever a library opens."""

DEFAULT_MAX_CONNECTIONS_UNLIMITED = 1_000_000
"""max_connections when RLIMIT_NOFILE is unlimited: the memory budget is the real bound then."""

LIMIT_LOG_INTERVAL = 10.0
"""Seconds between log lines about refused connections: a flood of them is one line per
interval with a count, not one line (or traceback) each."""

ACCEPT_RETRY_DELAY = 0.1
"""After an accept failed for lack of descriptors or memory, how long to wait before trying
again (trio's own value): long enough not to spin, short enough to serve again at once."""

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept() errors that mean "no room right now", not "this listener is broken"."""

IGNORABLE_ERRNOS = frozenset({errno.EAGAIN, errno.ECONNABORTED, errno.EPERM, errno.EPROTO})
"""accept() errors about one connection that went away while queued (as trio ignores them)."""


def default_max_connections() -> int:
    """RLIMIT_NOFILE's soft limit less FD_RESERVE: every connection is one descriptor."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return DEFAULT_MAX_CONNECTIONS_UNLIMITED
    return max(1, soft - FD_RESERVE, soft // 2)


class RateLimitedLog:
    """Counts occurrences of one condition and logs at most once per LIMIT_LOG_INTERVAL."""

    def __init__(self, message: str) -> None:
        self.message = message  # formatted with (count, interval, *args)
        self._count = 0
        self._next_log = -float("inf")

    def note(self, *args: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now >= self._next_log:
            log.error(self.message, self._count, LIMIT_LOG_INTERVAL, *args)
            self._count = 0
            self._next_log = now + LIMIT_LOG_INTERVAL


class ConnectionGate:
    """Admits connections up to `max_connections` and runs a handler for each."""

    def __init__(self, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.open = 0
        self._refused = RateLimitedLog(
            "refused %d connection(s) in the last %g s: %d open, the limit (max_connections)"
        )
        self._exhausted = RateLimitedLog(
            "accept failed %d time(s) in the last %g s: %s; closing waiting connections "
            "until descriptors are free (raise the open files limit or lower max_connections)"
        )
        self._reserve: int | None = _open_reserve()

    def close(self) -> None:
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    async def serve(
        self,
        listener: trio.SocketListener,
        handler: Callable[[trio.socket.SocketType], Awaitable[None]],
        nursery: trio.Nursery,
    ) -> None:
        """Accept on `listener` until cancelled, starting `handler` in `nursery` for each
        connection admitted, with its socket (no trio.SocketStream: its two conflict
        detectors are memory every idle connection would carry for nothing). The handler
        calls `closed()` when it is done with the connection, however it ends: no wrapper
        task frame per connection to count them."""
        sock = listener.socket
        async with listener:
            while True:
                try:
                    client, _ = await sock.accept()
                except OSError as error:
                    if error.errno in IGNORABLE_ERRNOS:
                        continue
                    if error.errno not in CAPACITY_ERRNOS:
                        raise
                    self._exhausted.note(os.strerror(error.errno))
                    await self._refuse_without_descriptors(sock)
                    continue
                if self.open >= self.max_connections:
                    client.close()  # nothing was read: the peer gets FIN, not a reset
                    self._refused.note(self.open)
                    continue
                self.open += 1
                nursery.start_soon(handler, client)

    def closed(self) -> None:
        """A connection admitted by `serve` is over (its handler's last act)."""
        self.open -= 1

    async def _refuse_without_descriptors(self, sock: trio.socket.SocketType) -> None:
        """Out of descriptors: give the reserve up for a moment to accept the oldest waiting
        connection and close it, so it is answered instead of left hanging; if none is
        waiting (or there is no reserve), this is the back-off before the next try."""
        if self._reserve is None:
            self._reserve = _open_reserve()  # freed meanwhile by a closed connection?
            await trio.sleep(ACCEPT_RETRY_DELAY)
            return
        os.close(self._reserve)
        self._reserve = None
        try:
            with trio.move_on_after(ACCEPT_RETRY_DELAY):
                client, _ = await sock.accept()
                client.close()
        except OSError:
            await trio.sleep(ACCEPT_RETRY_DELAY)
        finally:
            self._reserve = _open_reserve()


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
