"""What a client knows about one job: its handle, its progress updates and its outcome.

A foreground job is watched by a `JobWaiter`: the connection's reader task hands it the job's
WORK_STATUS / WORK_DATA / WORK_WARNING packets as updates (only when the caller streams them) and
finally one outcome (WORK_COMPLETE, WORK_FAIL, WORK_EXCEPTION, or the connection's loss).
`Listeners` decides which waiter gets which packet when one connection is attached to a job
several times (shared doc §3.2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Literal, NamedTuple, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from jobserver.sdk.errors import GearmanError, JobTimeout

STREAM_BUFFER = 64
"""Updates held for a streaming caller that has not read them yet.

When it is full the connection's reader waits for the caller (explicit back-pressure, which
TCP passes on to the server) instead of buffering without bound. `JobStream.result()` and
leaving the `async with` block both stop the buffering, so only a caller that holds the stream
open without reading it can stall its connection."""

T = TypeVar("T")


class JobHandle(str):
    """A job handle that remembers which server holds the job.

    It is a plain `str` for everything else (printing, storing, comparing), so it can be saved
    and given back to `Client.status()` later; `server` is the "host:port" that accepted it.
    Handles are only unique per server (shared doc §6.15), which is why the server is kept.

    >>> handle = JobHandle("H:vm:12", server="127.0.0.1:4730")
    >>> handle == "H:vm:12", handle.server
    (True, '127.0.0.1:4730')
    """

    server: str

    def __new__(cls, handle: str, server: str = "") -> JobHandle:
        self = super().__new__(cls, handle)
        self.server = server
        return self

    def __reduce__(self) -> tuple[type[JobHandle], tuple[str, str]]:
        return (JobHandle, (str(self), self.server))

    def __repr__(self) -> str:
        return f"JobHandle({str(self)!r}, server={self.server!r})"


JobState = Literal["queued", "running", "retrying", "dead", "gone"]
"""Where a job is in its life (`JobStatus.state`): waiting for a worker; held by one; failed
and waiting for its next attempt (`JobStatus.next_attempt`); failed every attempt and kept in
the server's dead set (`jobserver dead list`); or unknown to the server (finished, purged,
never there)."""


class _JobStatusFields(NamedTuple):
    known: bool
    running: bool
    numerator: int
    denominator: int
    state: JobState
    attempts: int
    retries: int
    next_attempt: float | None


class JobStatus(_JobStatusFields):
    """What a server says about one job: GET_STATUS (shared doc §3.10), and on jobserver its
    failures too (the admin command `show job`).

    `known` is False once the job finished (or never existed there), and for a dead job;
    `running` is True while a worker holds it; numerator/denominator are the worker's last
    WORK_STATUS. `state` is "queued", "running", "retrying", "dead" or "gone"; `attempts` is
    how many runs failed so far and `retries` how many retries its function allows, so a
    retrying job waits for retry `attempts` of `retries`; `next_attempt` is the unix time of
    that retry while it is retrying, else None. gearmand knows none of this: there
    the state follows from GET_STATUS alone (running, queued or gone) and attempts and
    retries are 0, which is also what leaving them out gives.

    >>> JobStatus(known=True, running=True, numerator=1, denominator=4).state
    'running'
    >>> JobStatus(True, False, 0, 0, state="retrying", attempts=1, retries=2).state
    'retrying'
    """

    __slots__ = ()

    def __new__(
        cls,
        known: bool,
        running: bool,
        numerator: int,
        denominator: int,
        state: JobState | None = None,
        attempts: int = 0,
        retries: int = 0,
        next_attempt: float | None = None,
    ) -> JobStatus:
        if state is None:
            state = "running" if running else "queued" if known else "gone"
        return super().__new__(
            cls, known, running, numerator, denominator, state, attempts, retries, next_attempt
        )


_STATES: dict[bytes, JobState] = {
    b"queued": "queued",
    b"running": "running",
    b"retrying": "retrying",
    b"dead": "dead",
    b"unknown": "gone",
}
_KNOWN_STATES = frozenset({"queued", "running", "retrying"})
"""The states in which GET_STATUS knows a job (a dead job is out of the server's queues)."""


def job_status(
    known: bool, running: bool, numerator: int, denominator: int, show_job: bytes | None
) -> JobStatus:
    """A JobStatus from GET_STATUS's fields and jobserver's `show job` reply line, if any:
    `OK <state> <failed attempts> <retries> <next attempt, unix seconds>`. Any other line
    (gearmand's ERR, a reply this SDK does not understand) leaves the GET_STATUS view.

    The two answers are consecutive, not simultaneous: a worker may report in between (a run
    failed, a job started). Then the later one, the state, wins, so that the status is one
    consistent view: `known` and `running` follow the state, and the progress, which belonged
    to the run before, reads 0/0.

    >>> job_status(True, False, 0, 0, b"OK retrying 1 2 1700000000").next_attempt
    1700000000.0
    >>> job_status(True, False, 0, 0, b"ERR UNKNOWN_SHOW_ARGUMENTS").state
    'queued'
    >>> job_status(True, True, 3, 4, b"OK dead 2 1 0")[:5]  # the run failed in between
    (False, False, 0, 0, 'dead')
    """
    words = (show_job or b"").split()
    if len(words) == 5 and words[0] == b"OK" and words[1] in _STATES:
        try:
            attempts, retries, due = int(words[2]), int(words[3]), int(words[4])
        except ValueError:
            pass
        else:
            state = _STATES[words[1]]
            next_attempt = float(due) if state == "retrying" and due > 0 else None
            if (known, running) != (state in _KNOWN_STATES, state == "running"):
                known, running = state in _KNOWN_STATES, state == "running"
                numerator = denominator = 0
            return JobStatus(
                known, running, numerator, denominator, state, attempts, retries, next_attempt
            )
    return JobStatus(known, running, numerator, denominator)


class Status(NamedTuple):
    """A WORK_STATUS update: the worker says it is `numerator` of `denominator` done.

    >>> Status(1, 3)
    Status(numerator=1, denominator=3)
    """

    numerator: int
    denominator: int


class Data(NamedTuple):
    """A WORK_DATA update: a piece of output sent before the result, as the worker sent it.

    >>> Data(b"partial").data
    b'partial'
    """

    data: bytes


class Warning(NamedTuple):  # shadows the builtin on purpose: the SDK's name for WORK_WARNING
    """A WORK_WARNING update: a warning text or blob from the worker, as bytes.

    >>> Warning(b"disk almost full").data
    b'disk almost full'
    """

    data: bytes


Update = Status | Data | Warning


def status_number(text: bytes) -> int:
    """A WORK_STATUS / STATUS_RES number. Servers forward WORK_STATUS verbatim (§3.7), so a
    worker's garbage reaches us as it was sent; read it as gearmand's atoi does (leading digits,
    else 0) rather than failing the job over a progress report."""
    digits = text.strip()
    sign = 1
    if digits[:1] in (b"-", b"+"):
        sign = -1 if digits[:1] == b"-" else 1
        digits = digits[1:]
    end = 0
    while end < len(digits) and 0x30 <= digits[end] <= 0x39:
        end += 1
    return sign * int(digits[:end]) if end else 0


class JobWaiter:
    """One foreground call waiting on one server for its job: updates, then one outcome.

    The connection's reader task calls `deliver`, `complete` and `fail`; the caller awaits
    `next_update` and `outcome`. With `streaming=False` updates are dropped on arrival.
    """

    def __init__(self, function: str, server: str, *, streaming: bool) -> None:
        self.function = function
        self.server = server
        self.handle = JobHandle("", server)
        self.abandoned = False  # the caller stopped waiting (timeout, cancel, error)
        self._done = anyio.Event()
        self._result = b""
        self._error: GearmanError | None = None
        self._updates_in: MemoryObjectSendStream[Update] | None = None
        self._updates_out: MemoryObjectReceiveStream[Update] | None = None
        if streaming:
            self._updates_in, self._updates_out = anyio.create_memory_object_stream[Update](
                STREAM_BUFFER
            )

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # --- reader side -----------------------------------------------------------------------

    async def deliver(self, update: Update) -> None:
        """Pass one progress update to a streaming caller (waits while its buffer is full)."""
        if self._updates_in is None or self.done:
            return
        # If the caller stopped reading updates, this one is dropped; it still gets the outcome.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._updates_in.send(update)

    def complete(self, result: bytes) -> None:
        if not self.done:
            self._result = result
            self._finish()

    def fail(self, error: GearmanError) -> None:
        if not self.done:
            self._error = error
            self._finish()

    def _finish(self) -> None:
        self._done.set()
        if self._updates_in is not None:
            self._updates_in.close()  # ends the caller's iteration after the buffered updates

    # --- caller side -----------------------------------------------------------------------

    async def next_update(self) -> Update | None:
        """The next update in arrival order, or None once the job ended (the outcome is then
        ready). A job's failure is raised by `outcome`, not here."""
        if self._updates_out is None:
            return None
        try:
            return await self._updates_out.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return None

    def stop_updates(self) -> None:
        """Drop updates from now on; a reader waiting to deliver one is released."""
        if self._updates_out is not None:
            self._updates_out.close()

    async def outcome(self) -> bytes:
        """The result bytes, or the job's failure raised."""
        self.stop_updates()
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


class Listeners:
    """The foreground submits one connection made for one job handle, in attach order.

    The server sends each WORK_* packet of a job once per listener record, one copy after the
    other, so a connection that submitted the same unique twice receives everything twice
    (shared doc §3.2). Handing the copies round-robin to the attached waiters gives each waiter
    each packet exactly once. A waiter that stopped waiting (timeout) keeps its place as None:
    the server still sends its copies, which are dropped, until the job ends.
    """

    __slots__ = ("_ended", "_next", "slots")

    def __init__(self) -> None:
        self.slots: list[JobWaiter | None] = []
        self._next = 0
        self._ended = 0

    def attach(self, waiter: JobWaiter | None) -> None:
        self.slots.append(waiter)

    def take(self, *, terminal: bool) -> JobWaiter | None:
        """The waiter this copy of a packet is for; counts job-ending packets."""
        waiter = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        if terminal:
            self._ended += 1
        return waiter

    @property
    def finished(self) -> bool:
        """Every listener record got its job-ending packet: the server forgot the job."""
        return self._ended >= len(self.slots)

    def detach(self, waiter: JobWaiter) -> None:
        for index, slot in enumerate(self.slots):
            if slot is waiter:
                self.slots[index] = None

    def waiters(self) -> list[JobWaiter]:
        return [slot for slot in self.slots if slot is not None]


class CallTimer:
    """The whole-call `timeout` of one submit or stream, shared by its steps (submit, wait for
    updates, wait for the result): past the deadline each step raises JobTimeout."""

    def __init__(self, function: str, timeout: float | None) -> None:
        self.function = function
        self.timeout = timeout
        self.deadline = math.inf if timeout is None else anyio.current_time() + timeout
        self.handle = ""

    async def run(self, step: Callable[[], Awaitable[T]]) -> T:
        with anyio.CancelScope(deadline=self.deadline):
            return await step()
        handle = self.handle or "(not yet accepted by a server)"
        raise JobTimeout(
            f"{self.function!r} job {handle}: no result within {self.timeout:g} s "
            "(it may still run on the server)",
            function=self.function,
            handle=self.handle,
        )
