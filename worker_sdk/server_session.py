"""One job server, for the whole life of a worker: connect, register, grab jobs, reconnect.

A worker runs one ServerSession per configured server. Each keeps its server connected
(retrying with jittered exponential backoff while it is down, so the other sessions keep
serving), registers every function on each new connection (and sets the retry policy of those
that have one, with the admin command `retries`), and runs two tasks per connection:

- the reader, the only task that receives: it wakes the grab loop on NOOP, hands NO_JOB and
  JOB_ASSIGN* to the GRAB waiting for them, logs ERROR packets and the answers to `retries`;
- the grab loop: wait until a job slot is free, GRAB_JOB_UNIQ, and when a job is assigned take
  a slot for it and start it (on NO_JOB: PRE_SLEEP and wait for a NOOP), and again.

No slot is held while a GRAB waits for its answer: a slow or frozen server must not keep the
slots that the healthy servers could fill (with concurrency=1 one frozen server would otherwise
stall the whole worker). The price: two servers may assign a job at the same moment when one
slot is free; the second job then waits for a slot (it is ours, so nobody else runs it).

Jobs run in the worker's job nursery, not here, so a job outlives a connection that dies
under it; its result is then dropped (the server has requeued the job).
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from jobserver.protocol import AdminLine, Packet, PacketType, encode_request
from jobserver.sdk.addresses import ServerAddress
from jobserver.sdk.admin import is_error
from jobserver.sdk.backoff import Backoff
from jobserver.sdk.connection import ConnectionLost, ServerConnection
from jobserver.sdk.errors import GearmanError, ProtocolViolation
from jobserver.sdk.health import ServerHealthLog

from .functions import WorkerFunction

log = logging.getLogger("worker_sdk")

POLL_INTERVAL = 5.0
"""Longest sleep after PRE_SLEEP before grabbing again without a NOOP. A NOOP can be lost (a
worker that once answered a NOOP with PRE_SLEEP is never woken by gearmand again, and a NOOP
sent on a half-dead link blocks later ones), and gearmand 1.1.x never wakes anyone when an
epoch job comes due (shared doc §3.4, §3.11, §6.5; gearmand issues #343, #101). Polling every
5 s bounds the delay those cases add, at the cost of one GRAB per idle connection per 5 s."""

GRAB_REPLY_TIMEOUT = 30.0
"""A server answers every GRAB at once (NO_JOB or a job). One that has not answered in 30 s is
hung: the connection is dropped and reopened (with backoff), and any job it held is requeued by
the server. Waiting costs no job slot, so this only bounds how long a wedged connection is kept."""

UNRESPONSIVE_AFTER = 2.0
"""Default seconds without an answer to a GRAB after which the server is logged as not
responding (it gets no work meanwhile: no GRAB goes out while one waits). Servers answer a GRAB
in microseconds; see client_sdk.session.UNRESPONSIVE_AFTER for the same choice."""

_ASSIGNMENTS = frozenset(
    {PacketType.JOB_ASSIGN, PacketType.JOB_ASSIGN_UNIQ, PacketType.JOB_ASSIGN_ALL}
)
_GRAB_REPLIES = _ASSIGNMENTS | {PacketType.NO_JOB}

_GRAB = encode_request(PacketType.GRAB_JOB_UNIQ)
_PRE_SLEEP = encode_request(PacketType.PRE_SLEEP)


class Assignment(NamedTuple):
    """A job the server assigned: the fields of JOB_ASSIGN_UNIQ (§2, type 31)."""

    handle: bytes
    function: bytes
    unique: bytes
    payload: bytes

    @classmethod
    def from_packet(cls, packet: Packet) -> Assignment:
        """Any of JOB_ASSIGN, JOB_ASSIGN_UNIQ and JOB_ASSIGN_ALL (the reducer is not used)."""
        args = packet.args
        if packet.type == PacketType.JOB_ASSIGN:
            return cls(args[0], args[1], b"", args[2])
        return cls(args[0], args[1], args[2], args[-1])


class ServerLink:
    """One live connection of a session, shared with the jobs it assigned (their results must go
    back on the connection that assigned them, §3.5)."""

    __slots__ = ("address", "connection", "policies_unanswered", "stale_results_expected")

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        self.address = connection.address
        self.stale_results_expected = 0
        """ERROR JOB_NOT_FOUND replies we caused on purpose (the WORK_FAIL that follows a
        WORK_EXCEPTION) and so do not warn about."""
        self.policies_unanswered: deque[str] = deque()
        """Functions whose `retries` command awaits its answer, in the order sent."""


StartJob = Callable[[Assignment, ServerLink, object], None]
"""Called with an assignment, the link it came on, and the job slot it holds (the job releases
the slot when it ends)."""


class ServerSession:
    """Keeps one server connected and feeds its jobs to the worker until the worker stops.

        Example (what Worker.serve does for each server):
            >>> import anyio
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
            >>> from jobserver.sdk.addresses import parse_address
            >>> slots, stopping = trio.CapacityLimiter(1), trio.Event()
            >>> session = ServerSession(parse_address("127.0.0.1:4730"), [], "me", slots,
            ...                         stopping, start_job=lambda assignment, link, slot: None)
    """

    def __init__(
        self,
        address: ServerAddress,
        functions: Sequence[WorkerFunction],
        client_id: str,
        slots: anyio.CapacityLimiter,
        stopping: anyio.Event,
        start_job: StartJob,
        *,
        unresponsive_after: float = UNRESPONSIVE_AFTER,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self._tls = tls
        self.health = ServerHealthLog(log, str(address))
        self._unresponsive_after = unresponsive_after
        self._registration = encode_request(
            PacketType.SET_CLIENT_ID, client_id.encode(errors="replace")
        ) + b"".join(function.registration() for function in functions)
        self._policies = [
            (function.name, command)
            for function in functions
            if (command := function.policy_command()) is not None
        ]
        self._slots = slots
        self._stopping = stopping
        self._start_job = start_job
        self._backoff = Backoff()
        self._wakeup = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._loss: GearmanError | None = None

    async def run(self) -> None:
        """Serve this server until the worker stops; returns only by cancellation (the worker
        disconnects once its jobs are done) or when the worker stops while disconnected."""
        joined_before = False
        while not self._stopping.is_set():
            try:
                connection = await ServerConnection.open(self.address, tls=self._tls)
            except ConnectionLost as error:
                reason: GearmanError = error
            else:
                log.info("%s %s", "re-joined" if joined_before else "joined", self.address)
                joined_before = True
                try:
                    reason = await self._serve_connection(connection)
                finally:
                    with anyio.CancelScope(shield=True):
                        await connection.aclose()
            if self._stopping.is_set():
                return
            delay = self._backoff.next_delay()
            self.health.failed(f"{reason}; retrying in {delay:.1f} s")
            with anyio.move_on_after(delay):
                await self._stopping.wait()

    async def _serve_connection(self, connection: ServerConnection) -> GearmanError:
        """Register, then read and grab until the connection fails; returns why it did."""
        link = ServerLink(connection)
        self._loss = None
        reply_sender, reply_receiver = anyio.create_memory_object_stream[Packet](
            1
        )  # one GRAB at a time
        async with anyio.create_task_group() as nursery:
            self._scope = nursery.cancel_scope
            link.policies_unanswered.extend(name for name, _ in self._policies)
            connection.accept_text = bool(self._policies)
            try:
                await connection.send_bytes(
                    self._registration + b"".join(command for _, command in self._policies)
                )
            except ConnectionLost as error:
                return error
            nursery.start_soon(self._read, link, reply_sender)
            nursery.start_soon(self._grab_until_stopped, link, reply_receiver)
        assert self._loss is not None  # the nursery ends only through _lost() or cancellation
        return self._loss

    def _lost(self, reason: GearmanError) -> None:
        if self._loss is None:
            self._loss = reason
        if self._scope is not None:
            self._scope.cancel()

    # ------------------------------------------------------------------ reader

    async def _read(self, link: ServerLink, replies: MemoryObjectSendStream[Packet]) -> None:
        async with replies:  # closing it tells a GRAB in flight that no reply will come
            try:
                while True:
                    packet = await link.connection.receive()
                    self._dispatch(link, packet, replies)
            except (ConnectionLost, ProtocolViolation) as error:
                self._lost(error)

    def _dispatch(
        self,
        link: ServerLink,
        packet: Packet | AdminLine,
        replies: MemoryObjectSendStream[Packet],
    ) -> None:
        if isinstance(packet, AdminLine):
            self._policy_answered(link, packet.text)
            return
        kind = packet.type
        if kind == PacketType.NOOP:
            self._wakeup.set()
        elif kind in _GRAB_REPLIES:
            try:
                replies.send_nowait(packet)
            except anyio.WouldBlock:
                log.warning("%s: ignoring %s that answers no GRAB", self.address, _name(kind))
        elif kind == PacketType.ERROR:
            self._log_error(link, packet)
        else:
            log.warning("%s: ignoring unexpected %s %r", self.address, _name(kind), packet.args)

    def _policy_answered(self, link: ServerLink, line: bytes) -> None:
        """The answer to a `retries` command: OK, or ERR from a server that does not know it
        (gearmand: UNKNOWN_COMMAND) or refused the values. The jobs are served either way."""
        if not link.policies_unanswered:
            raise ProtocolViolation(f"{link.address}: unexpected text line {line[:80]!r}")
        name = link.policies_unanswered.popleft()
        if not link.policies_unanswered:
            link.connection.accept_text = False
        if not is_error(line):
            log.debug("%s: retry policy of %r set (%r)", link.address, name, line)
        elif line.startswith(b"ERR UNKNOWN_COMMAND"):
            log.debug(
                "%s does not know retry policies (%r); %r keeps the server's behaviour",
                link.address,
                line,
                name,
            )
        else:
            log.warning(
                "%s refused the retry policy of %r: %s",
                link.address,
                name,
                line.decode(errors="replace"),
            )

    def _log_error(self, link: ServerLink, packet: Packet) -> None:
        code = packet.args[0].decode(errors="replace")
        text = packet.args[1].decode(errors="replace")
        if code == "JOB_NOT_FOUND" and link.stale_results_expected:
            link.stale_results_expected -= 1
            log.debug(
                "%s: ERROR %s (%s) for the WORK_FAIL after a WORK_EXCEPTION",
                link.address,
                code,
                text,
            )
        elif code == "JOB_NOT_FOUND":
            log.warning(
                "%s: the server no longer knows a job we reported on (%s: %s); it took the job "
                "back (CAN_DO timeout, or cancelled) and our result was ignored",
                link.address,
                code,
                text,
            )
        else:
            log.warning("%s: server error %s: %s", link.address, code, text)

    # ------------------------------------------------------------------ grabbing

    async def _grab_until_stopped(
        self, link: ServerLink, replies: MemoryObjectReceiveStream[Packet]
    ) -> None:
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(self._grab_loop, link, replies)
            await self._stopping.wait()
            nursery.cancel_scope.cancel()  # stop grabbing; a GRAB in flight still completes

    async def _grab_loop(
        self, link: ServerLink, replies: MemoryObjectReceiveStream[Packet]
    ) -> None:
        while True:
            # Grab only when a job could start now, but hold no slot while GRAB waits.
            probe = object()
            await self._slots.acquire_on_behalf_of(probe)
            self._slots.release_on_behalf_of(probe)
            reply = await self._grab(link, replies)
            if reply is None:
                return  # the connection ended; the reader recorded why
            if reply.type == PacketType.NO_JOB:
                await self._sleep(link)
                continue
            slot = object()
            # The job is ours: wait for a slot even if the worker is stopping (it must run, or
            # wait for the disconnect to be requeued).
            with anyio.CancelScope(shield=True):
                await self._slots.acquire_on_behalf_of(slot)
            self._start_job(Assignment.from_packet(reply), link, slot)

    async def _grab(
        self, link: ServerLink, replies: MemoryObjectReceiveStream[Packet]
    ) -> Packet | None:
        """GRAB_JOB_UNIQ and its reply; None if the connection ended first.

        Shielded from the worker's stop: once GRAB is sent the server may assign us a job, and
        a job assigned to us must run (or wait for the disconnect to be requeued). Bounded by
        GRAB_REPLY_TIMEOUT and by the reader closing the channel when the connection ends.
        """
        with anyio.CancelScope(shield=True), anyio.move_on_after(GRAB_REPLY_TIMEOUT) as waited:
            try:
                await link.connection.send_bytes(_GRAB)
                with anyio.move_on_after(self._unresponsive_after):
                    reply = await replies.receive()
                    self._answered()
                    return reply
                self.health.failed(
                    f"no answer to GRAB_JOB_UNIQ for {self._unresponsive_after:g} s; "
                    "no jobs taken from it until it answers",
                    what="not responding",
                )
                reply = await replies.receive()
            except ConnectionLost as error:
                self._lost(error)
                return None
            except anyio.EndOfStream:
                return None
            self._answered()
            return reply
        assert waited.cancelled_caught
        self._lost(
            ConnectionLost(f"{link.address}: no reply to GRAB_JOB_UNIQ in {GRAB_REPLY_TIMEOUT:g} s")
        )
        return None

    def _answered(self) -> None:
        self._backoff.reset()  # the server answers: a healthy connection
        self.health.recovered()

    async def _sleep(self, link: ServerLink) -> None:
        """PRE_SLEEP, then wait for a NOOP, at most POLL_INTERVAL (§3.4, §6.5)."""
        self._wakeup = wakeup = anyio.Event()
        try:
            await link.connection.send_bytes(_PRE_SLEEP)
        except ConnectionLost as error:
            self._lost(error)
            await anyio.sleep_forever()  # cancelled by _lost
        log.debug("%s: no job; asleep until a NOOP, at most %g s", link.address, POLL_INTERVAL)
        with anyio.move_on_after(POLL_INTERVAL):
            await wakeup.wait()


def _name(packet_type: int) -> str:
    try:
        return PacketType(packet_type).name
    except ValueError:
        return str(packet_type)
