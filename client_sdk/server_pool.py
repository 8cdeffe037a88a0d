"""Which server a job goes to, and going on to the next one when it is down.

A job with a unique id goes to the server chosen by rendezvous (highest-random-weight) hashing
of (function, unique): every client that lists the same servers picks the same one, so
duplicate submits coalesce across a cluster (shared doc §3.2), and when that server is down all
clients agree on the same fallback. Other jobs are spread round-robin. Each server has at most
one connection (a `Session`), opened on first use and reopened after it is lost.

A server whose session is unresponsive (hung: see session.py) is treated like one that just
failed: it goes last in every order until it answers again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
import anyio.abc

from jobserver.sdk.addresses import ServerAddress
from jobserver.sdk.backoff import Backoff
from jobserver.sdk.connection import ConnectionLost, ServerConnection
from jobserver.sdk.errors import GearmanError, NoServerAvailable
from jobserver.sdk.health import ServerHealthLog

from .session import UNRESPONSIVE_AFTER, ClientClosed, Session

log = logging.getLogger("client_sdk")

SKIP_FAILED_SERVER_INITIAL = 0.5
"""After a server fails (refused, timed out, connection lost) it is tried last for about this
long, so calls do not each pay for a dead server's connect. Short, because while a server is
skipped its uniques are sent to the fallback and no longer coalesce with other clients'."""

SKIP_FAILED_SERVER_MAX = 5.0
"""The skip doubles (with jitter) while the server keeps failing, up to this: a restarted server
gets its share of work again within seconds."""

T = TypeVar("T")


def rendezvous_order(function: bytes, unique: bytes, servers: Sequence[str]) -> list[str]:
    """Servers in the order a job with this (function, unique) tries them.

    Each server's weight is a stable hash of (function, unique, server); the order does not
    depend on the order the servers are listed in, and removing a server only moves the jobs
    that were on it.

    >>> rendezvous_order(b"resize", b"a.png", ["10.0.0.1:4730", "10.0.0.2:4730"]) in (
    ...     ["10.0.0.1:4730", "10.0.0.2:4730"], ["10.0.0.2:4730", "10.0.0.1:4730"])
    True
    """

    def weight(server: str) -> bytes:
        # Function and unique never contain NUL (checked in submission.py): the key is unambiguous.
        key = b"\0".join((function, unique, server.encode()))
        return hashlib.blake2b(key, digest_size=8).digest()

    return sorted(servers, key=weight, reverse=True)


class Server:
    """One configured server: its connection (if open) and its recent failures."""

    def __init__(
        self,
        address: ServerAddress,
        *,
        unresponsive_after: float = UNRESPONSIVE_AFTER,
        may_fail_over: Callable[[Server], bool] = lambda server: False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self._tls = tls
        self.name = str(address)
        self.session: Session | None = None
        self.health = ServerHealthLog(log, self.name)
        self._unresponsive_after = unresponsive_after
        self._may_fail_over = may_fail_over
        self.skip_until = -float("inf")
        self._backoff = Backoff(SKIP_FAILED_SERVER_INITIAL, SKIP_FAILED_SERVER_MAX)
        self._open_lock = anyio.Lock()
        self._failures = 0
        self._last_error: GearmanError | None = None

    def failed(self, error: GearmanError) -> None:
        self._failures += 1
        self._last_error = error
        self.skip_until = anyio.current_time() + self._backoff.next_delay()
        self.health.failed(error)

    def succeeded(self) -> None:
        self._backoff.reset()
        self.skip_until = -float("inf")
        if not self.unresponsive:
            self.health.recovered()

    @property
    def unresponsive(self) -> bool:
        return self.session is not None and self.session.unresponsive

    def usable(self, now: float) -> bool:
        """Neither failed recently nor hung: it gets new work."""
        return self.skip_until <= now and not self.unresponsive

    def _health_changed(self, session: Session, responsive: bool) -> None:
        if responsive:
            self.health.recovered()
        else:
            self.health.failed(
                f"no answer for {session.unresponsive_after:g} s; no new work goes to it "
                "until it answers",
                what="not responding",
            )

    async def open_session(self, nursery: anyio.abc.TaskGroup) -> Session:
        """The open session, connecting first if needed. Concurrent callers share one connect
        attempt: if it fails, they all get its error instead of each trying again."""
        if self.session is not None and not self.session.closed:
            return self.session
        failures_seen = self._failures
        async with self._open_lock:
            if self.session is not None and not self.session.closed:
                return self.session
            if self._failures != failures_seen and self._last_error is not None:
                raise ConnectionLost(str(self._last_error))
            try:
                connection = await ServerConnection.open(self.address, tls=self._tls)
            except ConnectionLost as error:
                self.failed(error)
                raise
            session = Session(
                connection,
                on_close=self._session_closed,
                unresponsive_after=self._unresponsive_after,
                on_health=self._health_changed,
                may_fail_over=lambda: self._may_fail_over(self),
            )
            session.request_exceptions()
            try:
                await nursery.start(session.run)
            except BaseException:  # cancelled before the session took the connection over
                with anyio.CancelScope(shield=True):
                    await connection.aclose()
                raise
            self.session = session
            return session

    def _session_closed(self, session: Session, reason: GearmanError) -> None:
        if self.session is session:
            self.session = None
        if isinstance(reason, ClientClosed):
            return
        self.failed(reason)


class ServerPool:
    """The configured servers, their connections, and the choice between them."""

    def __init__(
        self,
        addresses: Sequence[ServerAddress],
        nursery: anyio.abc.TaskGroup,
        *,
        unresponsive_after: float = UNRESPONSIVE_AFTER,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.servers = [
            Server(
                address,
                unresponsive_after=unresponsive_after,
                may_fail_over=self._has_other,
                tls=tls,
            )
            for address in addresses
        ]
        self._by_name = {server.name: server for server in self.servers}
        self._nursery = nursery
        self._round_robin = itertools.count()

    def order(self, function: bytes, unique: bytes) -> list[Server]:
        """The servers a job tries, best first (before skipping failed ones)."""
        if unique:
            names = rendezvous_order(function, unique, list(self._by_name))
            return [self._by_name[name] for name in names]
        start = next(self._round_robin) % len(self.servers)
        return self.servers[start:] + self.servers[:start]

    def _has_other(self, server: Server) -> bool:
        """Whether another server may take work that `server` does not answer."""
        now = anyio.current_time()
        return any(other.usable(now) for other in self.servers if other is not server)

    def server(self, name: str) -> Server:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(
                f"{name!r} is not one of this client's servers ({', '.join(self._by_name)})"
            ) from None

    async def first_available(
        self,
        servers: Sequence[Server],
        operation: Callable[[Session], Awaitable[T]],
        what: str,
    ) -> T:
        """Run `operation` on the first server that is up, in the given order; servers that
        failed recently go last. ConnectionLost (connect refused or timed out, connection lost
        before the reply) moves on to the next server; any other error is the caller's.
        Raises NoServerAvailable naming each server's error when all fail."""
        now = anyio.current_time()
        ready = [server for server in servers if server.usable(now)]
        skipped = [server for server in servers if not server.usable(now)]
        errors: list[str] = []
        for server in ready + skipped:
            try:
                session = await server.open_session(self._nursery)
                result = await operation(session)
            except ConnectionLost as error:
                # Already counted as the server's failure where it happened: in open_session,
                # or when its session closed.
                errors.append(_reason(server, error))
                continue
            server.succeeded()
            return result
        raise NoServerAvailable(f"no server available for {what}: {'; '.join(errors)}")

    def close(self) -> None:
        for server in self.servers:
            if server.session is not None:
                server.session.close(ClientClosed(f"{server.name}: the client was closed"))


def _reason(server: Server, error: GearmanError) -> str:
    text = str(error)
    return text if text.startswith(server.name) else f"{server.name}: {text}"
