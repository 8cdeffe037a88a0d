"""--http ADDR:PORT: the status page (GET /), its JSON (GET /api/status) and Prometheus metrics
(GET /metrics), served from the server's own event loop beside the Gearman port.

HTTP/1.1 is spoken by h11 (python-hyper's sans-IO parser and state machine, style.md §1), on
trio streams here: a small dependency and no second event loop, where hypercorn would bring an
ASGI stack and its own task structure for three GET routes. Nothing here parses HTTP.

Everything is bounded so that the side door can never hurt the Gearman port: connections
(MAX_HTTP_CONNECTIONS), the request head (MAX_REQUEST_HEAD, MAX_HEADERS), the time to send a
request and to take a response (REQUEST_TIMEOUT, SEND_TIMEOUT), and the work: the engine is
walked at most once per SNAPSHOT_MAX_AGE whoever asks, in chunks with turns for the event loop
between (metrics_snapshot.py), and the Prometheus text is written in a worker thread. Bad
requests get a 4xx; an internal error gets a 500 and a log line, never the server's end.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11
import trio

from . import __version__
from .http_api import THROUGHPUT_SAMPLE_INTERVAL, Throughput
from .http_api import render as render_status
from .listener import (
    ACCEPT_RETRY_DELAY,
    CAPACITY_ERRNOS,
    IGNORABLE_ERRNOS,
    RateLimitedLog,
)
from .logs import NOTICE
from .metrics import render as render_metrics
from .metrics_snapshot import Snapshot, take_snapshot

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("jobserver")

MAX_HTTP_CONNECTIONS = 32
"""HTTP connections served at once; more are closed as soon as accepted. A browser opens up to
six per server, a Prometheus server one per scrape: 32 is room for a few people and scrapers,
and caps what idle or slow HTTP clients can hold (a descriptor and a 16 KiB buffer each)."""

MAX_REQUEST_HEAD = 16 * 1024
"""Bytes of a request line and headers still incomplete at which the request is answered 431
(h11's max_incomplete_event_size, its own default; a head that completes within the read that
crosses it passes, so at most this plus RECEIVE_SIZE is ever buffered). nginx allows 1 KiB plus
4 x 8 KiB, Apache 8 KiB per line: plenty for a browser's GET with cookies."""

MAX_HEADERS = 100
"""Header fields in one request; more is answered 431 (Apache's LimitRequestFields default).
A browser sends about 15."""

REQUEST_TIMEOUT = 10.0
"""Seconds a connection has to send a complete request, from when it opened or its previous
response was sent; then it is closed (408 if it had started one). Closes slowloris clients and
idle keep-alive connections alike; a page that polls every 2 s reuses its connection."""

SEND_TIMEOUT = 10.0
"""Seconds a response may take to be accepted by the peer's socket before the connection is
dropped: a client that requests and never reads holds nothing longer."""

RECEIVE_SIZE = 16 * 1024
"""Bytes read from a connection at a time."""

LINGER_TIMEOUT = 2.0
LINGER_MAX_BYTES = 256 * 1024
"""Closing after an error response (400, 413, 431...), the peer may still be sending the
request we refused: closing a socket with unread input makes the kernel send a reset, which
can destroy the response before the peer reads it. So we shut our side down and read and drop
what comes, for at most LINGER_TIMEOUT seconds and LINGER_MAX_BYTES (Apache's lingering close
waits 2 s too)."""

SNAPSHOT_MAX_AGE = 1.0
"""Seconds a snapshot of the engine serves later requests: however many pages and scrapers
ask, the engine is walked at most once a second for each kind of snapshot."""

ALLOWED_METHODS = (b"GET", b"HEAD")

STATIC_FILES = {
    b"/": ("index.html", "text/html; charset=utf-8"),
    b"/index.html": ("index.html", "text/html; charset=utf-8"),
    b"/static/status.css": ("status.css", "text/css; charset=utf-8"),
    b"/static/status.js": ("status.js", "text/javascript; charset=utf-8"),
}
"""The page's files (jobserver/static/, package data), read once at start."""

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Content-Security-Policy of the page: its own script, style and API only, no inline code
and no other origin, so that nothing a client named a job or function can ever run in it."""

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format, which every Prometheus reads. Newer prometheus_client releases
call their output version 1.0.0; for names like ours (no UTF-8 in metric or label names) the
text is the same."""


async def open_http(host: str, port: int) -> list[trio.SocketListener]:
    """Listen on `host` (every address it resolves to) and `port`, nowhere else. OSError if
    that cannot be done (port busy, no such address)."""
    return await trio.open_tcp_listeners(port, host=host)


async def serve_http(server: Server, listeners: list[trio.SocketListener]) -> None:
    """Serve the status page, /api/status and /metrics until cancelled."""
    status = HttpStatus(server)
    for listener in listeners:
        address = listener.socket.getsockname()
        log.log(NOTICE, "HTTP: status page and /metrics on %s port %d", address[0], address[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(status.sample_throughput)
        for listener in listeners:
            nursery.start_soon(status.accept, listener, nursery)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False  # Connection: close, then a lingering close


def _error(status: int, text: str, *, close: bool = False, **headers: str) -> Response:
    return Response(status, text.encode() + b"\n", headers=list(headers.items()), close=close)


class HttpStatus:
    """The HTTP side of one server: its connections, snapshots and throughput samples."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.started = time.time()
        self.open = 0  # connections being served
        self.throughput = Throughput()
        self._files = _read_static_files()
        self._snapshot_lock = trio.Lock()
        self._snapshots: dict[bool, tuple[float, Snapshot]] = {}
        self._render_limiter = trio.CapacityLimiter(1)
        self._rendered: dict[object, tuple[Snapshot, bytes]] = {}  # by render function
        self._refused = RateLimitedLog(
            "HTTP: refused %d connection(s) in the last %g s: %d open, the limit "
            "(MAX_HTTP_CONNECTIONS)"
        )
        self._accept_failed = RateLimitedLog("HTTP: accept failed %d time(s) in the last %g s: %s")
        self._internal_errors = RateLimitedLog(
            "HTTP: %d internal error(s) in the last %g s, the last: %s"
        )

    # ------------------------------------------------------------------ connections

    async def accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept connections until cancelled, MAX_HTTP_CONNECTIONS at a time. A listener
        that breaks stops HTTP on that address, logged; the Gearman port goes on."""
        sock = listener.socket
        async with listener:
            while True:
                try:
                    client, _ = await sock.accept()
                except OSError as error:
                    if error.errno in IGNORABLE_ERRNOS:
                        continue
                    if error.errno in CAPACITY_ERRNOS:
                        self._accept_failed.note(os.strerror(error.errno))
                        await trio.sleep(ACCEPT_RETRY_DELAY)
                        continue
                    log.error("HTTP: stopped listening: %s", error)
                    return
                if self.open >= MAX_HTTP_CONNECTIONS:
                    client.close()  # nothing read: the peer gets FIN
                    self._refused.note(self.open)
                    continue
                self.open += 1
                nursery.start_soon(self._serve, trio.SocketStream(client))

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve_requests(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        except Exception as error:  # a bug of ours: this connection only
            self._internal_errors.note(repr(error))
            log.debug("HTTP: internal error", exc_info=True)
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_requests(self, stream: trio.SocketStream) -> None:
        connection = _Connection(stream)
        while True:
            request: h11.Request | None = None
            response: Response | None = None
            connection.received = False
            with trio.move_on_after(REQUEST_TIMEOUT) as waiting:
                try:
                    request = await connection.receive_request()
                    if request is not None:
                        response = await _refusal(connection, request)
                except h11.RemoteProtocolError as error:
                    response = _error(error.error_status_hint, f"Bad request: {error}", close=True)
            if waiting.cancelled_caught:
                if not connection.received:
                    return  # idle: close quietly
                response = _error(408, "Request timeout", close=True)
            if response is None:
                if request is None:
                    return  # the peer closed
                response = await self._respond(request)
            if not connection.can_respond:
                return
            with trio.move_on_after(SEND_TIMEOUT) as sending:
                await connection.send(
                    response, head_only=request is not None and request.method == b"HEAD"
                )
            if sending.cancelled_caught:
                return
            if not connection.next_cycle():
                await connection.linger()
                return

    async def _respond(self, request: h11.Request) -> Response:
        path = request.target.split(b"?", 1)[0]
        try:
            return await self._route(path)
        except Exception as error:  # a bug of ours: this request only
            self._internal_errors.note(repr(error))
            log.debug("HTTP: internal error for %r", path, exc_info=True)
            return _error(500, "Internal server error", close=True)

    async def _route(self, path: bytes) -> Response:
        if path == b"/metrics":
            body = await self._render(render_metrics, details=False)
            return Response(200, body, PROMETHEUS_CONTENT_TYPE, [("Cache-Control", "no-store")])
        if path == b"/api/status":
            body = await self._render(self._render_status, details=True)
            return Response(200, body, "application/json", [("Cache-Control", "no-store")])
        static = self._files.get(path)
        if static is not None:
            body, content_type = static
            headers = [("Cache-Control", "no-cache")]
            if content_type.startswith("text/html"):
                headers += [
                    ("Content-Security-Policy", PAGE_POLICY),
                    ("Referrer-Policy", "no-referrer"),
                ]
            return Response(200, body, content_type, headers)
        return _error(404, "Not found")

    async def _render(self, render: Callable[[Snapshot], bytes], *, details: bool) -> bytes:
        """`render` of a recent snapshot, in a worker thread (the Prometheus text of 500
        functions takes 0.2 s to write; the event loop goes on meanwhile, sharing the GIL).
        Requests served by the same snapshot share its rendering too."""
        snapshot = await self._snapshot(details=details)
        cached = self._rendered.get(render)
        if cached is not None and cached[0] is snapshot:
            return cached[1]
        body = await trio.to_thread.run_sync(render, snapshot, limiter=self._render_limiter)
        self._rendered[render] = (snapshot, body)
        return body

    def _render_status(self, snapshot: Snapshot) -> bytes:
        return render_status(snapshot, self.throughput)

    async def _snapshot(self, *, details: bool) -> Snapshot:
        """A snapshot at most SNAPSHOT_MAX_AGE old; one with details serves either kind."""
        async with self._snapshot_lock:
            now = trio.current_time()
            for kind in (details, True):
                cached = self._snapshots.get(kind)
                if cached is not None and now - cached[0] < SNAPSHOT_MAX_AGE:
                    return cached[1]
            snapshot = await take_snapshot(self.server, self.started, details=details)
            self._snapshots[details] = (trio.current_time(), snapshot)
            return snapshot

    # ------------------------------------------------------------------ throughput

    async def sample_throughput(self) -> None:
        """Sample the engine's counts for "per minute" figures, every few seconds."""
        engine = self.server.engine
        assert engine is not None
        while True:
            try:
                self.throughput.sample(engine.monotonic_clock(), engine.counters)
            except Exception as error:  # a bug of ours: the figures go stale, nothing else
                self._internal_errors.note(repr(error))
            await trio.sleep(THROUGHPUT_SAMPLE_INTERVAL)


async def _refusal(connection: _Connection, request: h11.Request) -> Response | None:
    """The 4xx for a request we do not serve, or None once its (empty) body is read."""
    if len(request.headers) > MAX_HEADERS:
        return _error(431, f"More than {MAX_HEADERS} header fields", close=True)
    if request.method not in ALLOWED_METHODS:
        return _error(405, "Method not allowed", close=True, Allow="GET, HEAD")
    # A body announced is refused at once, unread: a client that sent `Expect: 100-continue`
    # waits for our answer before sending it, and would otherwise wait REQUEST_TIMEOUT for a
    # 408 instead of this 413. What it sends anyway is dropped by the lingering close.
    if _announces_body(request) or not await connection.body_is_empty():
        return _error(413, "A GET request has no body here", close=True)
    return None


def _announces_body(request: h11.Request) -> bool:
    """Whether the head says a body follows: Content-Length above 0 or any Transfer-Encoding
    (h11 has already refused a malformed Content-Length and codings other than chunked)."""
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and int(value) > 0):
            return True
    return False


class _Connection:
    """One HTTP connection: h11's state machine fed from, and writing to, a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.received = False  # whether any byte of the next request came

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # not NEED_DATA, as just checked
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError:
                data = b""
            self.received = self.received or bool(data)
            self.h11.receive_data(data)

    async def receive_request(self) -> h11.Request | None:
        """The next request's head, or None if the peer closed between requests. Raises
        h11.RemoteProtocolError for a malformed or oversized one."""
        event = await self._next_event()
        return event if isinstance(event, h11.Request) else None

    async def body_is_empty(self) -> bool:
        """Read to the end of the request: False if it has a body."""
        return isinstance(await self._next_event(), h11.EndOfMessage)

    @property
    def can_respond(self) -> bool:
        return self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    async def send(self, response: Response, *, head_only: bool) -> None:
        headers = [
            ("Server", f"jobserver/{__version__}"),
            ("Date", formatdate(usegmt=True)),
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("X-Content-Type-Options", "nosniff"),
            *response.headers,
        ]
        if response.close:
            headers.append(("Connection", "close"))
        reason = HTTPStatus(response.status).phrase.encode()
        data = self.h11.send(
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        )
        if not head_only and response.body:
            data += self.h11.send(h11.Data(data=response.body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def linger(self) -> None:
        """Close our side, then drop what the peer still sends, bounded (LINGER_TIMEOUT)."""
        with trio.move_on_after(LINGER_TIMEOUT):
            await self.stream.send_eof()
            dropped = 0
            while dropped < LINGER_MAX_BYTES:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                dropped += len(data)

    def next_cycle(self) -> bool:
        """Ready for the next request on this connection (keep-alive); False: close it."""
        if self.h11.states != {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            return False
        self.h11.start_next_cycle()
        return True


def _read_static_files() -> dict[bytes, tuple[bytes, str]]:
    """The page's files by path. A missing one (a broken install) is logged and answers 404;
    the metrics and JSON still work."""
    folder = importlib.resources.files(__package__) / "static"
    files = {}
    for path, (name, content_type) in STATIC_FILES.items():
        try:
            files[path] = ((folder / name).read_bytes(), content_type)
        except OSError as error:
            log.error("HTTP: the status page's %s is missing: %s", name, error)
    return files
