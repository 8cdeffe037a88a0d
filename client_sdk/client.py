"""The asynchronous client (trio or asyncio, through anyio): submit jobs to a cluster and get
their results."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from contextlib import AsyncExitStack
from datetime import datetime
from types import TracebackType
from typing import Any

from jobserver.sdk.addresses import ServerSpec, parse_addresses
from jobserver.sdk.errors import JobLost, JobTimeout, NoServerAvailable
from jobserver.sdk.payload import decode_payload, encode_payload, get_codec
from jobserver.sdk.tasks import background_nursery
from jobserver.sdk.tls import TlsSettings, client_context

from . import submission as checks
from .jobs import CallTimer, JobHandle, JobStatus, JobWaiter
from .server_pool import ServerPool
from .session import UNRESPONSIVE_AFTER, Session
from .stream import JobStream
from .submission import MAX_PACKET_SIZE, Priority, Submission

MAX_RESUBMITS = 2
"""How often `retry=True` resubmits a job whose server was lost after accepting it. One loss is
bad luck and two a bad day; a job whose servers keep dying may well be what kills them, and
must not be handed to every server of the cluster in turn."""


class Client:
    """A connection to a cluster of job servers for submitting jobs, used with `async with`.

    `servers` are "host:port" strings (or (host, port) tuples); `codec` ("msgpack", "json" or
    "raw") encodes arguments and decodes results. One connection per server is opened on first
    use and shared, pipelined, by every concurrent call. A server that leaves a request
    unanswered for `unresponsive_after` seconds gets no new work until it answers again.
    `max_packet_size` is the servers' `--max-packet-size`: a larger request raises
    PayloadError before anything is sent. `tls` connects with TLS: a `TlsFiles` (the CA that
    signs the servers' certificates, and this client's certificate and key for servers that
    require one) or an `ssl.SSLContext` of your own; a server whose certificate or host name
    does not check out is an unreachable one, with the cause in NoServerAvailable's message.
    Bad TLS files raise TlsConfigError here, naming the file.

    Example (with a server on 127.0.0.1:4730 and a worker for "resize")::

        async def main():
            async with Client(["127.0.0.1:4730", "127.0.0.1:4731"]) as client:
                result = await client.submit("resize", {"path": "a.png"})
                handle = await client.submit_background("resize", {"path": "b.png"})
                print(result, await client.status(handle))

        asyncio.run(main())  # or trio.run(main)

    Over TLS, with this client's certificate for a server started with --tls-ca::

        tls = TlsFiles(ca="ca.pem", cert="client.pem", key="client.key")
        async with Client(["jobs.example:4730"], tls=tls) as client:
            await client.submit("resize", {"path": "a.png"})
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
        self._addresses = parse_addresses(servers)
        self._tls = client_context(tls)  # once, here: bad files fail the constructor
        self._codec = get_codec(codec)
        timeout = checks.check_timeout(unresponsive_after)
        if not timeout:
            raise ValueError(f"unresponsive_after must be > 0 seconds, not {unresponsive_after!r}")
        self._unresponsive_after = timeout
        self._max_packet_size = checks.check_max_packet_size(max_packet_size)
        self._pool: ServerPool | None = None
        self._exit_stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Client:
        if self._pool is not None:
            raise RuntimeError("this Client is already open")
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(background_nursery())
            self._pool = ServerPool(
                self._addresses,
                nursery,
                unresponsive_after=self._unresponsive_after,
                tls=self._tls,
            )
            self._exit_stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        pool, stack = self._pool, self._exit_stack
        self._pool = self._exit_stack = None
        assert pool is not None and stack is not None
        pool.close()
        # The caller's exception comes back out as itself (background_nursery): `except
        # NoServerAvailable:` around the `async with` block catches it.
        return await stack.__aexit__(exc_type, exc, traceback)

    # --- public API ------------------------------------------------------------------------

    async def submit(
        self,
        function: str,
        arg: Any = None,
        *,
        unique: str | bytes | None = None,
        priority: Priority = "normal",
        timeout: float | None = None,
        retry: bool = False,
    ) -> Any:
        """Run a foreground job and return its result, decoded with the client's codec.

        `unique` makes duplicates coalesce (one execution, every caller gets the result) and
        picks the server by hashing; `priority` is "high", "normal" or "low"; `timeout` bounds
        the whole call (JobTimeout). If the server is lost after accepting the job, JobLost is
        raised, or with `retry=True` the job is submitted again to another server (so it may
        run twice). Raises JobFailed, JobException (the worker's text in `.exception`),
        ServerError, NoServerAvailable.

        Example::

            async with Client(["127.0.0.1:4730"]) as client:
                thumbnail = await client.submit("resize", {"path": "a.png"}, timeout=30)
        """
        submission = self._foreground(function, arg, unique, priority)
        timer = CallTimer(function, checks.check_timeout(timeout))
        resubmits = MAX_RESUBMITS if retry else 0
        while True:
            session, waiter = await timer.run(lambda: self._start(submission, streaming=False))
            timer.handle = str(waiter.handle)
            try:
                result = await timer.run(waiter.outcome)
            except JobTimeout:
                session.probe()  # a timeout counts against the server until it shows life
                raise
            except JobLost:
                if resubmits == 0:
                    raise
                resubmits -= 1
                continue
            finally:
                if not waiter.done:
                    session.forget(waiter)  # timed out or cancelled: a late result is dropped
            return decode_payload(self._codec, result, function=function, what="result")

    async def submit_background(
        self,
        function: str,
        arg: Any = None,
        *,
        unique: str | bytes | None = None,
        priority: Priority = "normal",
        timeout: float | None = None,
        run_at: datetime | None = None,
    ) -> JobHandle:
        """Queue a background job and return its handle once a server accepted it.

        Without `unique` a random one is generated, so that persistent queues keep every job
        (shared doc §3.15). `run_at` (a datetime; naive means local time) delays the job
        (SUBMIT_JOB_EPOCH, normal priority only). The handle remembers its server, for
        `status()`. `timeout` bounds the wait for the server's acceptance.

        A server lost before it answered did not report the job as accepted, so the job is
        sent to the next server; if that server had in fact queued it before the connection
        broke, the job exists twice (at least once, never zero times, while any server is up).

        Example::

            async with Client(["127.0.0.1:4730"]) as client:
                handle = await client.submit_background("resize", {"path": "a.png"},
                                                        priority="high", unique="a.png")
        """
        function = checks.check_function(function)
        unique_bytes = checks.check_unique(unique) or uuid.uuid4().hex.encode()
        priority = checks.check_priority(priority)
        epoch = checks.run_at_epoch(run_at, priority)
        timer = CallTimer(function, checks.check_timeout(timeout))
        payload = encode_payload(self._codec, arg, function=function)
        job = checks.check_size(
            checks.background(function, payload, unique_bytes, priority, epoch),
            self._max_packet_size,
        )
        pool = self._require_pool()

        async def submit_to(session: Session) -> JobHandle:
            return await session.submit(job, None)

        servers = pool.order(job.function_bytes, job.unique)
        return await timer.run(lambda: pool.first_available(servers, submit_to, repr(function)))

    def stream(
        self,
        function: str,
        arg: Any = None,
        *,
        unique: str | bytes | None = None,
        priority: Priority = "normal",
        timeout: float | None = None,
    ) -> JobStream:
        """A foreground job whose progress updates you iterate; see JobStream.

        Example::

            async with client.stream("resize", {"path": "a.png"}) as job:
                async for update in job:  # Status(...), Data(...), Warning(...)
                    print(update)
            print(await job.result())
        """
        submission = self._foreground(function, arg, unique, priority)
        timeout = checks.check_timeout(timeout)
        self._require_pool()
        return JobStream(
            lambda: self._start(submission, streaming=True),
            lambda data: decode_payload(self._codec, data, function=function, what="result"),
            function,
            timeout,
        )

    async def status(self, handle: str) -> JobStatus:
        """Where a job is: queued, running, retrying after a failure, dead (failed every
        attempt) or gone, with its failed attempts so far, the retries its function allows,
        whether the server knows it (GET_STATUS), whether a worker runs it, and the worker's
        last progress. A JobHandle from `submit_background` asks the server that holds the
        job; a plain str asks each server in turn (handles are only unique per server, so the
        first server that has the job answers). On gearmand, which keeps no failed jobs, the
        state comes from GET_STATUS alone: running, queued or gone.

        Example::

            handle = await client.submit_background("resize", {"path": "a.png"})
            status = await client.status(handle)
            print(status.state)  # "queued"
            if status.state == "retrying":
                print(f"retry {status.attempts} of {status.retries} at {status.next_attempt}")
        """
        wire_handle = checks.check_handle(handle)
        pool = self._require_pool()

        async def ask(session: Session) -> JobStatus:
            return await session.status(wire_handle)

        holder = getattr(handle, "server", "")
        if holder:
            return await pool.first_available([pool.server(holder)], ask, f"status of {handle}")
        errors = []
        answered = False
        for server in pool.servers:
            try:
                status = await pool.first_available([server], ask, f"status of {handle}")
            except NoServerAvailable as error:
                errors.append(str(error))
                continue
            if status.state != "gone":
                return status
            answered = True
        if not answered:
            raise NoServerAvailable("; ".join(errors))
        return JobStatus(known=False, running=False, numerator=0, denominator=0)

    # --- internals -------------------------------------------------------------------------

    def _require_pool(self) -> ServerPool:
        if self._pool is None:
            raise RuntimeError("the Client is not open: use `async with Client(...) as client`")
        return self._pool

    def _foreground(
        self, function: str, arg: Any, unique: object, priority: Priority
    ) -> Submission:
        """Check everything and encode the request before anything is sent."""
        function = checks.check_function(function)
        unique_bytes = checks.check_unique(unique)
        priority = checks.check_priority(priority)
        payload = encode_payload(self._codec, arg, function=function)
        return checks.check_size(
            checks.foreground(function, payload, unique_bytes, priority), self._max_packet_size
        )

    async def _start(self, job: Submission, *, streaming: bool) -> tuple[Session, JobWaiter]:
        """Submit a foreground job to the first server up, in the job's server order, and
        return once one accepted it. A server lost before its JOB_CREATED did not accept the
        job (shared doc §3.6: its listener went with the connection), so the next is tried."""
        pool = self._require_pool()

        async def submit_to(session: Session) -> tuple[Session, JobWaiter]:
            waiter = JobWaiter(job.function, session.server, streaming=streaming)
            await session.submit(job, waiter)
            return session, waiter

        servers = pool.order(job.function_bytes, job.unique)
        return await pool.first_available(servers, submit_to, repr(job.function))
