"""The client for code without an event loop: scripts, threads, WSGI web apps.

A SyncClient runs a trio loop with an ordinary `Client` in one background thread and hands
every call to it with `trio.from_thread.run`, so any number of plain threads can share one
SyncClient (and its pipelined connections). Exceptions come back unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import trio

from jobserver.sdk.addresses import ServerSpec
from jobserver.sdk.tls import TlsSettings

from .client import Client
from .jobs import JobHandle, JobStatus, Update
from .session import UNRESPONSIVE_AFTER
from .stream import JobStream
from .submission import MAX_PACKET_SIZE, Priority

P = ParamSpec("P")
T = TypeVar("T")


class SyncClient:
    """`Client` without async: the same methods, blocking, safe to call from many threads.

    Use it with `with` (or `open()` / `close()`); the background loop thread starts on enter
    and stops on exit. `tls` is as for `Client`: a `TlsFiles` or an `ssl.SSLContext`.

    Example (with a server on 127.0.0.1:4730 and a worker for "resize")::

        with SyncClient(["127.0.0.1:4730"]) as client:
            print(client.submit("resize", {"path": "a.png"}))
            with client.stream("resize", {"path": "b.png"}) as job:
                for update in job:
                    print(update)
                print(job.result())

    Over TLS::

        with SyncClient(["jobs.example:4730"], tls=TlsFiles(ca="ca.pem")) as client:
            client.submit("resize", {"path": "a.png"})
    """

    def __init__(
        self,
        servers: Iterable[ServerSpec] | str,
        codec: str = "msgpack",
        *,
        unresponsive_after: float = UNRESPONSIVE_AFTER,
        max_packet_size: int = MAX_PACKET_SIZE,
        tls: TlsSettings = None,
    ) -> None:
        # The Client checks the arguments now, in the caller.
        self._client = Client(
            servers,
            codec,
            unresponsive_after=unresponsive_after,
            max_packet_size=max_packet_size,
            tls=tls,
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> SyncClient:
        """Start the background loop thread (what `with` does)."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("this SyncClient is already open")
            started = threading.Event()
            failure: list[BaseException] = []

            def run_loop() -> None:
                try:
                    trio.run(self._serve, started)
                except BaseException as error:
                    failure.append(error)
                finally:
                    started.set()

            thread = threading.Thread(target=run_loop, name="client_sdk.SyncClient", daemon=True)
            thread.start()
            started.wait()
            if failure:
                thread.join()
                raise failure[0]
            self._thread = thread
        return self

    def close(self) -> None:
        """Close the connections and stop the loop thread; calls in progress fail."""
        with self._lock:
            thread, token, stop = self._thread, self._token, self._stop
            self._thread = self._token = self._stop = None
        if thread is None or token is None or stop is None:
            return
        with contextlib.suppress(trio.RunFinishedError):  # the loop may have ended already
            trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join()

    def __enter__(self) -> SyncClient:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def _serve(self, started: threading.Event) -> None:
        self._stop = trio.Event()
        async with self._client:
            self._token = trio.lowlevel.current_trio_token()
            started.set()
            await self._stop.wait()

    # --- the Client's API, blocking --------------------------------------------------------

    def submit(
        self,
        function: str,
        arg: Any = None,
        *,
        unique: str | bytes | None = None,
        priority: Priority = "normal",
        timeout: float | None = None,
        retry: bool = False,
    ) -> Any:
        """Run a foreground job and return its result; see `Client.submit`.

        Example::

            with SyncClient(["127.0.0.1:4730"]) as client:
                thumbnail = client.submit("resize", {"path": "a.png"}, timeout=30)
        """
        return self._call(
            self._client.submit,
            function,
            arg,
            unique=unique,
            priority=priority,
            timeout=timeout,
            retry=retry,
        )

    def submit_background(
        self,
        function: str,
        arg: Any = None,
        *,
        unique: str | bytes | None = None,
        priority: Priority = "normal",
        timeout: float | None = None,
        run_at: datetime | None = None,
    ) -> JobHandle:
        """Queue a background job and return its handle; see `Client.submit_background`.

        Example::

            with SyncClient(["127.0.0.1:4730"]) as client:
                handle = client.submit_background("resize", {"path": "a.png"}, priority="low")
        """
        return self._call(
            self._client.submit_background,
            function,
            arg,
            unique=unique,
            priority=priority,
            timeout=timeout,
            run_at=run_at,
        )

    def stream(
        self,
        function: str,
        arg: Any = None,
        *,
        unique: str | bytes | None = None,
        priority: Priority = "normal",
        timeout: float | None = None,
    ) -> SyncJobStream:
        """A foreground job whose progress updates you iterate; see `Client.stream`.

        Example::

            with client.stream("resize", {"path": "a.png"}) as job:
                for update in job:
                    print(update)
                print(job.result())
        """
        self._require_open()
        stream = self._client.stream(
            function, arg, unique=unique, priority=priority, timeout=timeout
        )
        return SyncJobStream(stream, self)

    def status(self, handle: str) -> JobStatus:
        """Where a job is (queued, running, retrying, dead, gone) and its progress; see
        `Client.status`.

        Example::

            print(client.status(client.submit_background("resize", {"path": "a.png"})).state)
        """
        return self._call(self._client.status, handle)

    # --- internals -------------------------------------------------------------------------

    def _require_open(self) -> trio.lowlevel.TrioToken:
        token = self._token
        if token is None:
            raise RuntimeError("the SyncClient is not open: use `with SyncClient(...) as client`")
        return token

    def _call(self, function: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        token = self._require_open()
        return trio.from_thread.run(functools.partial(function, *args, **kwargs), trio_token=token)


class SyncJobStream:
    """`JobStream` for threads: a context manager you iterate with a plain `for`.

    Example::

        with client.stream("resize", {"path": "a.png"}) as job:
            for update in job:  # Status(...), Data(...), Warning(...)
                print(update)
            print(job.result())
    """

    def __init__(self, stream: JobStream, client: SyncClient) -> None:
        self._stream = stream
        self._call = client._call

    @property
    def handle(self) -> JobHandle:
        return self._stream.handle

    def __enter__(self) -> SyncJobStream:
        self._call(self._stream.__aenter__)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._call(self._stream.__aexit__, exc_type, exc, traceback)

    def __iter__(self) -> SyncJobStream:
        return self

    def __next__(self) -> Update:
        update = self._call(_next_update, self._stream)
        if update is None:
            raise StopIteration
        return update

    def result(self) -> Any:
        """The job's decoded result; raises the job's failure."""
        return self._call(self._stream.result)


async def _next_update(stream: JobStream) -> Update | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
