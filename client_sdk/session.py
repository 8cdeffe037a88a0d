"""One client connection to one server, shared by every concurrent call and pipelined.

Requests (SUBMIT_*, GET_STATUS, OPTION_REQ) go out through one writer task, which appends each
request's `Reply` to a FIFO at the moment it writes the bytes; the server answers requests in
order (shared doc §1), so the reader task matches JOB_CREATED / STATUS_RES / OPTION_RES /
ECHO_RES / ERROR to that FIFO. WORK_* packets arrive unsolicited and are routed by handle to the
waiting calls. `status` also sends jobserver's admin text command `show job <handle>` on the
same connection: servers answer text commands in order with packets, so its one-line answer
takes its place in the same FIFO (gearmand answers it with an ERR line, after which this
connection stops asking). When the connection ends, every request still waiting for its reply
fails with ConnectionLost (the caller may submit elsewhere: the job was never accepted here),
and every job already accepted fails with JobLost.

A server can also hang without closing anything (a stopped or wedged process still accepts
connections into its backlog and its kernel still acknowledges bytes). A watchdog task sends
ECHO_REQ while calls wait here or after a quiet spell, and a session whose oldest request has
had no answer for `unresponsive_after` seconds is *unresponsive*: the pool sends it no new
work, and requests it has not answered (submits with no JOB_CREATED yet) fail with
ServerUnresponsive, so that their callers go to another server. Jobs it already accepted keep
waiting (or time out), as with any slow server. It is responsive again with its next answer.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from jobserver.protocol import AdminLine, Packet, PacketType, encode_request
from jobserver.sdk.admin import is_admin_word
from jobserver.sdk.connection import ConnectionLost, ServerConnection
from jobserver.sdk.errors import (
    GearmanError,
    JobException,
    JobFailed,
    JobLost,
    ProtocolViolation,
    ServerError,
)
from jobserver.sdk.retry import parse_retry_after

from .jobs import (
    Data,
    JobHandle,
    JobStatus,
    JobWaiter,
    Listeners,
    Status,
    Warning,
    job_status,
    status_number,
)
from .submission import Submission

log = logging.getLogger("client_sdk")

MAX_QUEUED_REQUESTS = 1024
"""Requests accepted for writing but not yet written. Beyond this, callers wait for the writer
(back-pressure) instead of queueing without bound behind a slow or stalled server."""

UNRESPONSIVE_AFTER = 2.0
"""Default seconds a request may go unanswered before the server counts as hung. Servers answer
SUBMIT / GET_STATUS / ECHO at once (shared doc §1), in microseconds when healthy and within
milliseconds under load; 2 s is far beyond both, and with PROBE_INTERVAL keeps detection within
about 3 s, so a frozen server costs a cluster seconds of calls, not the length of the freeze."""

PROBE_INTERVAL = 0.5
"""How often the watchdog checks the oldest unanswered request and, when needed, sends a probe."""

IDLE_PROBE_AFTER = 5.0
"""A connection that has heard nothing for this long is probed (ECHO_REQ) even with no call
waiting, so a server that hung while idle is known before the next call is sent to it."""

_PROBE = b"liveness"

MAX_WRITE_BATCH = 256 * 1024
"""Queued requests are written together up to about this many bytes: one send for many
pipelined submits, without building one huge buffer out of large payloads."""

_T = PacketType
_TEXT_LINE = 0
"""`Reply.expects` of an admin text command: one text line (packet types are 1..42)."""
_REPLY_TYPES = frozenset({_T.JOB_CREATED, _T.STATUS_RES, _T.OPTION_RES, _T.ECHO_RES, _T.ERROR})
_JOB_UPDATE_TYPES = frozenset({_T.WORK_STATUS, _T.WORK_DATA, _T.WORK_WARNING})
_JOB_END_TYPES = frozenset({_T.WORK_COMPLETE, _T.WORK_FAIL, _T.WORK_EXCEPTION})


class ClientClosed(ConnectionLost):
    """The client was closed while this connection still had work in progress."""


class ServerUnresponsive(ConnectionLost):
    """The server did not answer this request in time and other servers are available: the
    caller goes on to the next one. (The server may still process it when it wakes up; a
    foreground job's late result is then dropped, a background job may exist twice.)"""


class Reply:
    """The one answer a request on this connection is owed."""

    __slots__ = ("_error", "_event", "_packet", "expects", "sent_at", "waiter")

    def __init__(self, expects: int, waiter: JobWaiter | None = None) -> None:
        self.expects = expects
        self.waiter = waiter  # a foreground submit's waiter, attached on JOB_CREATED
        self.sent_at = math.inf  # when the writer put it on the wire
        self._event = anyio.Event()
        self._packet: Packet | AdminLine | None = None
        self._error: GearmanError | None = None

    def resolve(self, packet: Packet | AdminLine) -> None:
        self._packet = packet
        self._event.set()

    @property
    def answered(self) -> bool:
        return self._event.is_set()

    def reject(self, error: GearmanError) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    async def wait(self) -> Packet:
        """The reply packet (for a request that expects one)."""
        reply = await self._wait()
        assert isinstance(reply, Packet)
        return reply

    async def wait_line(self) -> bytes:
        """The reply line (for an admin text command)."""
        reply = await self._wait()
        assert isinstance(reply, AdminLine)
        return reply.text

    async def _wait(self) -> Packet | AdminLine:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        assert self._packet is not None
        return self._packet


class Session:
    """One pipelined connection: start `run` in a nursery, then call `submit` / `status` from
    any number of tasks. After it closes (`closed`), open a new one."""

    def __init__(
        self,
        connection: ServerConnection,
        on_close: Callable[[Session, GearmanError], None] | None = None,
        *,
        unresponsive_after: float = UNRESPONSIVE_AFTER,
        on_health: Callable[[Session, bool], None] | None = None,
        may_fail_over: Callable[[], bool] = lambda: False,
    ) -> None:
        self.server = str(connection.address)
        self.closed = False
        self.unresponsive = False
        """No answer to the oldest request for `unresponsive_after` s (see the module doc)."""
        self.unresponsive_after = unresponsive_after
        self._on_health = on_health
        self._may_fail_over = may_fail_over
        self._probe_outstanding = False
        self.reason: GearmanError | None = None
        self._connection = connection
        self._on_close = on_close
        self._outbox_in: MemoryObjectSendStream[tuple[bytes, Reply]]
        self._outbox_out: MemoryObjectReceiveStream[tuple[bytes, Reply]]
        self._outbox_in, self._outbox_out = anyio.create_memory_object_stream[tuple[bytes, Reply]](
            MAX_QUEUED_REQUESTS
        )
        self._replies: deque[Reply] = deque()
        self._text_replies = 0  # text commands written and not yet answered
        self.knows_show_job: bool | None = None
        """Whether the server answers `show job` (None: not asked yet on this connection)."""
        self._listeners: dict[bytes, Listeners] = {}
        self._cancel_scope: anyio.CancelScope | None = None

    # --- what calls use --------------------------------------------------------------------

    async def submit(self, submission: Submission, waiter: JobWaiter | None) -> JobHandle:
        """Send one SUBMIT_* and wait for its JOB_CREATED. A foreground job's `waiter` is
        attached to the handle before any later packet is read, so it misses nothing.

        Raises ConnectionLost if the connection ends first (the job was not accepted here),
        ServerError for an ERROR reply."""
        reply = Reply(_T.JOB_CREATED, waiter)
        try:
            packet = await self._request(submission.packet, reply)
        except BaseException:
            if waiter is not None:
                self.forget(waiter)
            raise
        return JobHandle(_text(packet.args[0]), self.server)

    async def status(self, handle: bytes) -> JobStatus:
        """GET_STATUS → STATUS_RES (shared doc §3.10), pipelined with `show job <handle>` for
        the job's failures, unless this server answered that with ERR before (gearmand) or
        the handle cannot be one word of a text command (then GET_STATUS alone)."""
        get_status = Reply(_T.STATUS_RES)
        await self._queue(encode_request(_T.GET_STATUS, handle), get_status)
        show_job: Reply | None = None
        if self.knows_show_job is not False and is_admin_word(handle):
            show_job = Reply(_TEXT_LINE)
            await self._queue(b"show job " + handle + b"\n", show_job)
        packet = await get_status.wait()
        _, known, running, numerator, denominator = packet.args
        line = None
        if show_job is not None:
            line = await show_job.wait_line()
            if self.knows_show_job is None:
                self.knows_show_job = line.startswith(b"OK ")
                if not self.knows_show_job:
                    log.debug(
                        "%s does not know `show job` (%r): job states from GET_STATUS only",
                        self.server,
                        line,
                    )
        return job_status(
            known == b"1",
            running == b"1",
            status_number(numerator),
            status_number(denominator),
            line,
        )

    def request_exceptions(self) -> None:
        """Queue OPTION_REQ "exceptions" as the first request, without waiting for its answer:
        later requests are processed after it, so every job submitted here gets WORK_EXCEPTION
        (§3.8). A server that refuses it (ERROR UNKNOWN_OPTION) sends WORK_FAIL instead, which
        we accept too. Synchronous (the queue is empty), so a caller's cancellation cannot
        leave a new connection without it."""
        reply = Reply(_T.OPTION_RES)
        self._outbox_in.send_nowait((encode_request(_T.OPTION_REQ, b"exceptions"), reply))

    def forget(self, waiter: JobWaiter) -> None:
        """The caller stopped waiting: drop its updates and outcome from now on. The server
        still sends this listener's copies of the job's packets; `Listeners` absorbs them."""
        waiter.abandoned = True
        waiter.stop_updates()
        if waiter.handle:
            listeners = self._listeners.get(waiter.handle.encode("utf-8", "surrogateescape"))
            if listeners is not None:
                listeners.detach(waiter)

    @property
    def waiting_calls(self) -> int:
        """Calls with a request or a job in progress here (for tests and monitoring)."""
        jobs = sum(len(listeners.waiters()) for listeners in self._listeners.values())
        return len(self._replies) + jobs

    @property
    def tracked_jobs(self) -> int:
        """Handles this connection is attached to, including ones whose caller gave up."""
        return len(self._listeners)

    # --- lifecycle -------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Read and write until the connection ends or `close` is called; then fail whatever
        is still waiting and close the socket."""
        try:
            async with anyio.create_task_group() as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._until_error, self._write_loop)
                nursery.start_soon(self._until_error, self._read_loop)
                nursery.start_soon(self._watchdog)
                task_status.started()
        finally:
            self._shutdown(self.reason or ClientClosed(f"{self.server}: the client was closed"))
            with anyio.CancelScope(shield=True):
                await self._connection.aclose()

    def close(self, reason: GearmanError) -> None:
        if self.reason is None:
            self.reason = reason
        self.closed = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def probe(self) -> None:
        """Ask the server for a sign of life now (ECHO_REQ), e.g. after a call timed out here:
        if no answer comes within `unresponsive_after`, the session becomes unresponsive."""
        if self._probe_outstanding or self.closed:
            return
        try:
            self._outbox_in.send_nowait((encode_request(_T.ECHO_REQ, _PROBE), Reply(_T.ECHO_RES)))
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # a full outbox has requests of its own waiting: they serve as the probe
        self._probe_outstanding = True

    # --- internals -------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Probe when something waits here or after a quiet spell; judge the oldest request."""
        while True:
            await anyio.sleep(PROBE_INTERVAL)
            now = anyio.current_time()
            quiet = now - self._connection.last_received
            if self._listeners or self._replies or quiet >= IDLE_PROBE_AFTER:
                self.probe()
            self._judge(now)

    def _judge(self, now: float) -> None:
        oldest = self._replies[0].sent_at if self._replies else math.inf
        if now - oldest < self.unresponsive_after:
            return
        if not self.unresponsive:
            self.unresponsive = True
            if self._on_health is not None:
                self._on_health(self, False)
        if not self._may_fail_over():
            return  # no better server: the requests wait here
        reason = (
            f"{self.server}: no answer in {now - oldest:.1f} s (unresponsive_after="
            f"{self.unresponsive_after:g}); sent to another server"
        )
        for reply in self._replies:
            if reply.expects == _T.JOB_CREATED and not reply.answered:
                # It keeps its place in the FIFO: the server may answer it when it wakes up.
                reply.reject(ServerUnresponsive(reason))

    def _answered(self) -> None:
        if self.unresponsive:
            self.unresponsive = False
            if self._on_health is not None:
                self._on_health(self, True)

    async def _request(self, data: bytes, reply: Reply) -> Packet:
        await self._queue(data, reply)
        return await reply.wait()

    async def _queue(self, data: bytes, reply: Reply) -> None:
        if self.closed:
            raise self._lost()
        try:
            await self._outbox_in.send((data, reply))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise self._lost() from None

    def _lost(self) -> ConnectionLost:
        return ConnectionLost(str(self.reason or f"{self.server}: connection closed"))

    async def _until_error(self, loop: Callable[[], Awaitable[None]]) -> None:
        try:
            await loop()
        except GearmanError as error:  # ConnectionLost, ProtocolViolation
            self.close(error)

    async def _write_loop(self) -> None:
        # The only task that writes, so the FIFO order of `_replies` is the order on the wire.
        while True:
            data, reply = await self._outbox_out.receive()
            batch = [data]
            size = len(data)
            now = anyio.current_time()
            self._expect(reply, now)
            while size < MAX_WRITE_BATCH:
                try:
                    data, reply = self._outbox_out.receive_nowait()
                except anyio.WouldBlock:
                    break
                batch.append(data)
                size += len(data)
                self._expect(reply, now)
            await self._connection.send_bytes(b"".join(batch))

    def _expect(self, reply: Reply, now: float) -> None:
        """`reply` is owed from now on; before its request is written, so that the reader is
        ready for a text line by the time one can come."""
        reply.sent_at = now
        self._replies.append(reply)
        if reply.expects == _TEXT_LINE:
            self._text_replies += 1
            self._connection.accept_text = True

    async def _read_loop(self) -> None:
        while True:
            packet = await self._connection.receive()
            if isinstance(packet, AdminLine) or packet.type in _REPLY_TYPES:
                self._on_reply(packet)
            elif packet.type in _JOB_UPDATE_TYPES or packet.type in _JOB_END_TYPES:
                await self._on_job_packet(packet)
            else:
                raise ProtocolViolation(
                    f"{self.server}: unexpected {_T(packet.type).name} on a client connection"
                )

    def _on_reply(self, packet: Packet | AdminLine) -> None:
        if not self._replies:
            raise ProtocolViolation(f"{self.server}: {_describe(packet)} without a request")
        reply = self._replies.popleft()
        self._answered()
        if isinstance(packet, AdminLine) or reply.expects == _TEXT_LINE:
            if not isinstance(packet, AdminLine) or reply.expects != _TEXT_LINE:
                self._replies.appendleft(reply)  # failed with the others when the session closes
                raise ProtocolViolation(
                    f"{self.server}: {_describe(packet)} in answer to a request expecting "
                    f"{_describe_expected(reply.expects)}"
                )
            self._text_replies -= 1
            if not self._text_replies:
                self._connection.accept_text = False
            reply.resolve(packet)
            return
        if reply.expects == _T.ECHO_RES:
            self._probe_outstanding = False
        if packet.type == _T.ERROR:
            code, text = packet.args
            reply.reject(ServerError(_text(code), _text(text)))
            return
        if packet.type != reply.expects:
            self._replies.appendleft(reply)  # failed with the others when the session closes
            raise ProtocolViolation(
                f"{self.server}: {_T(packet.type).name} in answer to a request expecting "
                f"{_T(reply.expects).name}"
            )
        if packet.type == _T.JOB_CREATED and reply.waiter is not None:
            self._attach(packet.args[0], reply.waiter)
        reply.resolve(packet)

    def _attach(self, handle: bytes, waiter: JobWaiter) -> None:
        waiter.handle = JobHandle(_text(handle), self.server)
        listeners = self._listeners.get(handle)
        if listeners is None:
            listeners = self._listeners[handle] = Listeners()
        # The server attached a listener even if the caller has already given up (timeout):
        # keep its place so that its copies of the packets are absorbed.
        listeners.attach(None if waiter.abandoned else waiter)

    async def _on_job_packet(self, packet: Packet) -> None:
        handle = packet.args[0]
        if packet.type == _T.WORK_FAIL and handle.endswith(b"\0"):
            # gearmand's stand-in for WORK_EXCEPTION to clients without the exceptions option
            # is WORK_FAIL with the handle plus one NUL (shared doc §3.8, §6.2).
            handle = handle[:-1]
        listeners = self._listeners.get(handle)
        if listeners is None:
            return  # a late packet for a call that gave up, or for a job already ended
        ends_job = packet.type in _JOB_END_TYPES
        waiter = listeners.take(terminal=ends_job)
        if ends_job and listeners.finished:
            del self._listeners[handle]
        if waiter is None:
            return
        kind = packet.type
        if kind == _T.WORK_STATUS:
            numerator, denominator = packet.args[1], packet.args[2]
            await waiter.deliver(Status(status_number(numerator), status_number(denominator)))
        elif kind == _T.WORK_DATA:
            await waiter.deliver(Data(packet.args[1]))
        elif kind == _T.WORK_WARNING:
            await waiter.deliver(Warning(packet.args[1]))
        elif kind == _T.WORK_COMPLETE:
            waiter.complete(packet.args[1])
        elif kind == _T.WORK_EXCEPTION:
            # A worker's retry request (worker_sdk.Retry) carries a marker line the caller of a
            # foreground job has no use for: it gets the exception text alone.
            text = _text(parse_retry_after(packet.args[1])[1])
            waiter.fail(
                JobException(
                    f"{waiter.function!r} job {waiter.handle} on {self.server} raised: {text}",
                    text,
                    function=waiter.function,
                    handle=str(waiter.handle),
                )
            )
        else:
            waiter.fail(
                JobFailed(
                    f"{waiter.function!r} job {waiter.handle} on {self.server} failed",
                    function=waiter.function,
                    handle=str(waiter.handle),
                )
            )

    def _shutdown(self, reason: GearmanError) -> None:
        self.closed = True
        if self.reason is None:
            self.reason = reason
        while True:  # requests never written: not accepted anywhere, the caller may go on
            try:
                _, reply = self._outbox_out.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            reply.reject(ConnectionLost(str(reason)))
        self._outbox_out.close()
        for reply in self._replies:
            reply.reject(ConnectionLost(str(reason)))
        self._replies.clear()
        for listeners in self._listeners.values():
            for waiter in listeners.waiters():
                waiter.fail(
                    JobLost(
                        f"{waiter.function!r} job {waiter.handle} was accepted by {self.server}, "
                        f"then the connection was lost ({reason}); whether it ran is unknown. "
                        "Submit with retry=True to have it resubmitted to another server.",
                        function=waiter.function,
                        handle=str(waiter.handle),
                    )
                )
        self._listeners.clear()
        if self._on_close is not None:
            self._on_close(self, reason)


def _describe(event: Packet | AdminLine) -> str:
    if isinstance(event, AdminLine):
        return f"text line {event.text[:80]!r}"
    return _T(event.type).name


def _describe_expected(expects: int) -> str:
    return "a text line" if expects == _TEXT_LINE else _T(expects).name


def _text(data: bytes) -> str:
    """Handles and ERROR texts as str; undecodable bytes survive a round trip."""
    return data.decode("utf-8", "surrogateescape")
