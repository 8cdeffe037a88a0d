"""The job engine: every decision of the server, as pure state (style.md §2).

Packets go in through `handle_packet`; what must be sent to whom comes out as bytes appended to
the peers' outboxes, and the peers that have output are listed in `dirty`. There are no awaits,
no sockets and no threads here, so every rule of shared doc §3 is testable in microseconds.

Time comes from two injected clocks: `wall_clock` (unix seconds, for SUBMIT_JOB_EPOCH) and
`monotonic_clock` (for CAN_DO_TIMEOUT). The I/O layer asks `seconds_until_next_timer()` and calls
`run_timers()` when that time has come.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from bisect import bisect_left
from collections.abc import Callable

from ..protocol import REQ, BadPacket, Packet, encode
from ..protocol import PacketType as T
from ..sdk.retry import parse_retry_after
from . import errors
from .admin_ops import AdminOperations
from .counters import JOB_SECONDS_BUCKETS, FunctionCounters, FunctionCounts
from .dead_set import DEFAULT_DEAD_TTL, DEFAULT_MAX_DEAD, DeadSet
from .durability import DurableJobs
from .errors import ErrorReply
from .failures import (
    DEFAULT_RETRY_DELAY,
    FAILED,
    GIVEN_BACK,
    TIMED_OUT,
    WORKER_LOST,
    FailedJobs,
)
from .function import Function
from .functions import FunctionTable
from .handles import HandleGenerator
from .job import Job, JobState, Priority
from .journal import Journal, RetryPolicy
from .peer import MAX_CLIENT_ID_SIZE, NOT_LISTENING, Peer
from .unique_index import UniqueIndex
from .workers import COMPACT_MIN_TIMERS, WorkerRequests, timer_is_live

MAX_UNIQUE_SIZE = 64
"""Longest unique id accepted; longer gets ARGUMENT_TOO_LARGE (§1, §6.10). gearmand accepts 64
bytes but stores only 63, so a 64-byte unique never coalesces there; here it does."""

MAX_LOOKUP_ARGUMENT_SIZE = 64
"""GET_STATUS / GET_STATUS_UNIQUE arguments this long or longer cannot name a job (handles are
at most 63 bytes; uniques at most 64 are accepted, so GET_STATUS_UNIQUE allows exactly 64)."""

MAX_OPTION_SIZE = 64
"""OPTION_REQ names must be shorter than this (§2 #26)."""

MAX_LISTENERS_PER_JOB = 1024
"""Foreground submits waiting on one job (clients coalesced on its unique id, a client counted
once per submit). Every WORK_* packet of the job is copied to each of them, so this bounds what
one worker packet costs the server; a thousand callers coalescing on one key still fit. Past it
the submit is answered ERROR QUEUE_ERROR (nothing else changes; the client may retry), where
gearmand keeps accepting and the copies grow without bound."""

EPOCH_RANGE = (-(2**63), 2**63 - 1)
"""SUBMIT_JOB_EPOCH times are parsed as a signed 64-bit integer, as gearmand's strtoll does."""

UINT32 = 2**32

QUEUED_AT_RESOLUTION = 0.001
"""Jobs queued within this many seconds of each other share one time object as their `since`
(when they were queued, for the wait histogram): a float is 24 bytes, 4% of a queued job, and
a queue is mostly filled in bursts. A millisecond is the wait histogram's smallest bucket."""

FAIL_AFTER_EXCEPTION_SUFFIX = b""
"""What follows the handle in the WORK_FAIL a client without the `exceptions` option gets in
place of WORK_EXCEPTION (§3.8). gearmand 1.1.20 sends one NUL there (`H\\0`); libgearman's own
client then fails to match the handle and waits forever (verified with `gearman -f` against
gearmand), so we send the plain WORK_FAIL every client understands. Clients that strip the
NUL (§6.2) are unaffected."""

_SUBMIT_KINDS: dict[int, tuple[Priority, bool]] = {
    T.SUBMIT_JOB: (Priority.NORMAL, False),
    T.SUBMIT_JOB_BG: (Priority.NORMAL, True),
    T.SUBMIT_JOB_HIGH: (Priority.HIGH, False),
    T.SUBMIT_JOB_HIGH_BG: (Priority.HIGH, True),
    T.SUBMIT_JOB_LOW: (Priority.LOW, False),
    T.SUBMIT_JOB_LOW_BG: (Priority.LOW, True),
    T.SUBMIT_JOB_EPOCH: (Priority.NORMAL, True),
    T.SUBMIT_REDUCE_JOB: (Priority.NORMAL, False),
    T.SUBMIT_REDUCE_JOB_BACKGROUND: (Priority.NORMAL, True),
}

_NOT_FOR_SERVERS = frozenset(
    {
        T.UNUSED,
        T.NOOP,
        T.JOB_CREATED,
        T.NO_JOB,
        T.JOB_ASSIGN,
        T.ECHO_RES,
        T.ERROR,
        T.STATUS_RES,
        T.ALL_YOURS,  # never implemented by gearmand (§2 #24)
        T.OPTION_RES,
        T.JOB_ASSIGN_UNIQ,
        T.SUBMIT_JOB_SCHED,  # never implemented by gearmand (§2 #35)
        T.JOB_ASSIGN_ALL,
        T.STATUS_RES_UNIQUE,
    }
)
"""Types a server answers with INVALID_COMMAND, keeping the connection (§2)."""

_SUBMIT_JOB_EPOCH = int(T.SUBMIT_JOB_EPOCH)  # plain ints on the hot path: no enum lookups
_JOB_CREATED = int(T.JOB_CREATED)


def parse_atoi_u32(text: bytes) -> int:
    """C atoi() stored in a uint32, as gearmand reads WORK_STATUS numbers (§3.7):
    leading digits count, garbage gives 0, `-1` gives 4294967295."""
    text = text.lstrip(b" \t\n\r\v\f")
    sign = 1
    if text[:1] in (b"-", b"+"):
        sign = -1 if text[:1] == b"-" else 1
        text = text[1:]
    digits = 0
    for byte in text:
        if not 48 <= byte <= 57:
            break
        digits += 1
    value = int(text[:digits]) if digits else 0
    return (sign * value) % UINT32


def _parse_integer(text: bytes, max_length: int) -> int | None:
    """A strict decimal integer with an optional leading minus, at most max_length bytes."""
    body = text[1:] if text[:1] == b"-" else text
    if not body or len(text) > max_length or not body.isdigit():
        return None
    return int(text)


class Engine(WorkerRequests, DurableJobs, FailedJobs, AdminOperations):
    """The job engine. Worker-side requests (registrations, sleep, GRAB_JOB and picking a job)
    are in workers.py, the store's reports in durability.py; connections, clients, results,
    the job lifecycle, timers and admin operations here."""

    def __init__(
        self,
        *,
        handle_prefix: str = "H:localhost:4730",
        job_retries: int = 0,
        worker_wakeup: int = 0,
        exceptions: bool = False,
        wall_clock: Callable[[], float] = time.time,
        monotonic_clock: Callable[[], float] = time.monotonic,
        start_time_ms: int | None = None,
        durable: bool = False,
        bg_retries: int = 0,
        bg_retry_delay: float = DEFAULT_RETRY_DELAY,
        dead_max: int = DEFAULT_MAX_DEAD,
        dead_ttl: float = DEFAULT_DEAD_TTL,
        rng: random.Random | None = None,
    ) -> None:
        if start_time_ms is None:
            start_time_ms = int(wall_clock() * 1000)
        self.handles = HandleGenerator(handle_prefix, start_time_ms)
        self.job_retries = job_retries  # attempts before a job is failed; 0 = unlimited (§3.6)
        self.worker_wakeup = worker_wakeup  # NOOPs per queued job; 0 = every sleeper (§3.4)
        self.exceptions_default = exceptions
        self.wall_clock = wall_clock
        self.monotonic_clock = monotonic_clock

        self.functions = FunctionTable()
        self._function = self.functions.get_or_create
        self._forget_if_unused = self.functions.forget_if_unused
        self.jobs: dict[bytes, Job] = {}  # every known job by handle
        self.peers: dict[int, Peer] = {}
        self.dirty: list[Peer] = []  # peers with output, drained by the I/O layer
        # With a store: background jobs to record before they are acknowledged.
        self.journal: Journal | None = Journal() if durable else None
        # A shared store's lease lapsed (durability.py, `hold_durable`): durable jobs that
        # become runnable wait in `_on_hold` instead of a queue, out of workers' reach.
        self.durable_on_hold = False
        self._on_hold: list[Job] = []
        self._init_failures(
            RetryPolicy(bg_retries, bg_retry_delay), DeadSet(dead_max, dead_ttl), rng
        )
        self._uniques = UniqueIndex()
        self._by_payload: dict[tuple[bytes, bytes], Job] = {}  # unique "-" jobs (§3.2)
        self._sequence = 0
        self._timer_sequence = 0
        self._stamp = 0  # orders CAN_DOs (for `workers`) and sleeps (for wake-up fairness)
        # (run_at unix time, tie-breaker, job) for epoch jobs not yet due.
        self._epoch_heap: list[tuple[float, int, Job]] = []
        # (monotonic deadline, tie-breaker, job, attempt) for CAN_DO_TIMEOUT assignments.
        self._timeout_heap: list[tuple[float, int, Job, int]] = []
        self._timeout_sweep_at = COMPACT_MIN_TIMERS  # heap size that triggers a sweep
        self.counters = FunctionCounters()  # totals for metrics (counters.py)
        self._queued_at = -math.inf  # the `since` of jobs queued now (QUEUED_AT_RESOLUTION)

    # ------------------------------------------------------------------ connections

    def connect(self, peer_id: int, address: str) -> Peer:
        peer = Peer(peer_id, address, self.dirty, self.exceptions_default)
        self.peers[peer_id] = peer
        return peer

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection: requeue what it was running, detach what it waited on (§3.6)."""
        if peer.closed:
            return
        peer.closed = True
        peer.outbox.clear()
        self.peers.pop(peer.id, None)
        # Unregister first: a departing worker must not take the wake-up meant for a live one
        # when its own jobs are requeued below.
        functions = self._unregister_all(peer)
        for job in list(peer.held.values()):
            self._release(job, WORKER_LOST)
        for job in peer.listening:
            assert job.listeners is not None
            job.listeners = [p for p in job.listeners if p is not peer] or None
            if job.listeners is None and not job.background:
                self._abandon(job)
        peer.listening = NOT_LISTENING
        for function in functions:
            self._forget_if_unused(function)

    def take_dirty(self) -> list[Peer]:
        dirty = self.dirty[:]
        self.dirty.clear()
        return dirty

    # ------------------------------------------------------------------ dispatch

    def handle_packet(self, peer: Peer, packet: Packet) -> None:
        if packet.magic != REQ:
            self._error(peer, errors.INVALID_MAGIC)
            return
        handler = _HANDLERS.get(packet.type)
        if handler is None:
            self._error(peer, errors.INVALID_COMMAND)
            return
        handler(self, peer, packet.type, packet.args)

    def handle_bad_packet(self, peer: Peer, bad: BadPacket) -> None:
        if bad.magic != REQ:
            self._error(peer, errors.INVALID_MAGIC)
        elif bad.type in _NOT_FOR_SERVERS:
            self._error(peer, errors.INVALID_COMMAND)
        else:
            self._error(peer, (bad.code, bad.text))

    def _error(self, peer: Peer, error: ErrorReply) -> None:
        peer.send(encode(T.ERROR, *error))

    # ------------------------------------------------------------------ simple requests

    def _echo(self, peer: Peer, _type: int, args: tuple[bytes, ...]) -> None:
        peer.send(encode(T.ECHO_RES, args[0]))

    def _set_client_id(self, peer: Peer, _type: int, args: tuple[bytes, ...]) -> None:
        peer.client_id = args[0][:MAX_CLIENT_ID_SIZE]

    def _option(self, peer: Peer, _type: int, args: tuple[bytes, ...]) -> None:
        option = args[0]
        # gearmand compares the C string case-insensitively, so a trailing NUL is allowed; the
        # reply echoes the request bytes exactly (§2 #27).
        if len(option) < MAX_OPTION_SIZE and option.rstrip(b"\0").lower() == b"exceptions":
            peer.exceptions = True
            peer.send(encode(T.OPTION_RES, option))
        else:
            self._error(peer, errors.UNKNOWN_OPTION)

    def _get_status(self, peer: Peer, _type: int, args: tuple[bytes, ...]) -> None:
        handle = args[0].split(b"\0", 1)[0]
        if len(args[0]) >= MAX_LOOKUP_ARGUMENT_SIZE:
            self._error(peer, errors.HANDLE_TOO_LARGE)  # gearmand: no reply (§3.14)
            return
        job = self.jobs.get(handle)
        if job is None:
            peer.send(encode(T.STATUS_RES, handle, b"0", b"0", b"0", b"0"))
            return
        peer.send(encode(T.STATUS_RES, handle, b"1", *_status_numbers(job)))

    def _get_status_unique(self, peer: Peer, _type: int, args: tuple[bytes, ...]) -> None:
        if len(args[0]) > MAX_LOOKUP_ARGUMENT_SIZE:
            self._error(peer, errors.UNIQUE_LOOKUP_TOO_LARGE)  # gearmand: no reply (§3.14)
            return
        peer.send(self.status_by_unique(args[0]))

    def status_by_unique(
        self, argument: bytes, visible: Callable[[bytes], bool] | None = None
    ) -> bytes:
        """The STATUS_RES_UNIQUE answering GET_STATUS_UNIQUE `argument`; with `visible` (an
        ACL), about the first job with that unique whose function it accepts, or "unknown"."""
        # A unique id never holds a NUL (SUBMIT_* separates on it), and STATUS_RES_UNIQUE
        # could not carry one: look up and echo the part before it, as GET_STATUS does.
        unique = argument.split(b"\0", 1)[0]
        job = self._uniques.find_any(unique, visible) if unique else None
        if job is None:
            return encode(T.STATUS_RES_UNIQUE, unique, b"0", b"0", b"0", b"0", b"0")
        clients = str(len(job.listeners or ())).encode()
        return encode(T.STATUS_RES_UNIQUE, unique, b"1", *_status_numbers(job), clients)

    # ------------------------------------------------------------------ submitting

    def _submit(self, peer: Peer, packet_type: int, args: tuple[bytes, ...]) -> None:
        priority, background = _SUBMIT_KINDS[packet_type]
        function_name, unique = args[0], args[1]
        payload = args[-1]
        reducer = b""
        run_at = 0
        if len(args) > 3:  # the submit types with arguments between unique and payload
            if packet_type == _SUBMIT_JOB_EPOCH:
                epoch = _parse_integer(args[2], max_length=20)
                if epoch is None or not EPOCH_RANGE[0] <= epoch <= EPOCH_RANGE[1]:
                    self._error(peer, errors.BAD_EPOCH)  # gearmand: no reply (§3.11)
                    return
                run_at = epoch
            else:
                reducer = args[2]  # args[3], the aggregator, is ignored as gearmand does (§3.12)
        if len(unique) > MAX_UNIQUE_SIZE:
            self._error(peer, errors.UNIQUE_TOO_LARGE)
            return

        journal = self.journal
        record_id = 0  # the record this submit's reply waits for; 0 = none
        job = self._find_duplicate(function_name, unique, payload)
        if job is None:
            function = self._function(function_name)
            if function.is_full_for(priority):
                self._error(peer, errors.QUEUE_FULL)
                return
            durable = background and journal is not None
            job = self._create_job(
                function, unique, payload, priority, background, reducer, run_at, durable
            )
            if durable:
                record_id = journal.add(job)  # type: ignore[union-attr]
            counts = function.counts or self._counts_of(function)
            if background:
                counts.submitted_background += 1
            else:
                counts.submitted_foreground += 1
        elif (
            not background
            and job.listeners is not None
            and len(job.listeners) >= MAX_LISTENERS_PER_JOB
        ):
            self._error(peer, errors.TOO_MANY_LISTENERS)
            return
        elif journal is not None and journal.in_flight(job):
            # Its record is being committed: this reply waits for the outcome like the first.
            record_id = job.record_id
        elif background and journal is not None and not job.record_id:
            # A foreground job that a background submit now answers for: from here on it must
            # survive a crash, so it is recorded before this submit is acknowledged.
            job.background = True
            record_id = journal.add(job)
            if self.durable_on_hold and job.state is JobState.QUEUED:
                job.function.forget_queued(job)
                self._hold(job)
        elif background:
            job.background = True
        if not background:
            if job.listeners is None:
                job.listeners = [peer]
            else:
                job.listeners.append(peer)
            if peer.listening is NOT_LISTENING:
                peer.listening = set()
            peer.listening.add(job)  # type: ignore[union-attr]
        if record_id:
            peer.defer(record_id, encode(_JOB_CREATED, job.handle))
            journal.holding[peer] = None  # type: ignore[union-attr]
        else:
            peer.send(encode(_JOB_CREATED, job.handle))

    def _find_duplicate(self, function: bytes, unique: bytes, payload: bytes) -> Job | None:
        """The job a submit coalesces onto, per §3.2: by (function, unique); unique `-` means
        by (function, payload); an empty unique, or `-` with an empty payload, never matches."""
        if not unique:
            return None
        if unique == b"-":
            return self._by_payload.get((function, payload)) if payload else None
        return self._uniques.find(function, unique)

    def _create_job(
        self,
        function: Function,
        unique: bytes,
        payload: bytes,
        priority: Priority,
        background: bool,
        reducer: bytes = b"",
        run_at: int = 0,
        pending: bool = False,
    ) -> Job:
        """A new job, indexed; runnable (or scheduled) at once unless it is `pending` a store
        commit, in which case `commit_finished` activates it."""
        job = Job(
            self.handles.next_handle(),
            function,
            unique,
            payload,
            priority,
            background,
            reducer,
            run_at,
        )
        self.jobs[job.handle] = job
        if unique == b"-":
            if payload:
                self._by_payload[(function.name, payload)] = job
        elif unique:
            self._uniques.add(job)
        if pending:
            job.state = JobState.PENDING
            function.pending += 1
        else:
            self._activate(job)
        return job

    def _activate(self, job: Job) -> None:
        """Make a job runnable now, or at its epoch time."""
        if job.run_at and job.run_at > self.wall_clock():
            job.state = JobState.WAITING
            job.function.waiting += 1
            self._timer_sequence += 1
            heapq.heappush(self._epoch_heap, (job.run_at, self._timer_sequence, job))
        else:
            self._enqueue(job)

    def _enqueue(self, job: Job) -> None:
        """Put a job at the tail of its priority queue and wake sleeping workers (§3.4)."""
        if self.durable_on_hold and job.record_id:
            self._hold(job)
            return
        self._sequence += 1
        job.sequence = self._sequence
        now = self.monotonic_clock()
        if now - self._queued_at > QUEUED_AT_RESOLUTION:
            self._queued_at = now
        job.since = self._queued_at
        job.function.enqueue(job)
        self._job_queued(job)

    # ------------------------------------------------------------------ work results

    def _work_update(self, peer: Peer, packet_type: int, args: tuple[bytes, ...]) -> None:
        """WORK_STATUS, WORK_DATA, WORK_WARNING: forwarded verbatim to listeners (§3.7)."""
        job = peer.held.get(args[0])
        if job is None:
            error = (
                errors.RESULT_FOR_UNKNOWN_JOB
                if packet_type == T.WORK_STATUS
                else errors.DATA_FOR_UNKNOWN_JOB
            )
            self._error(peer, error)
            return
        if packet_type == T.WORK_STATUS:
            job.numerator = parse_atoi_u32(args[1])
            job.denominator = parse_atoi_u32(args[2])
        if job.listeners:
            self._notify(job, encode(packet_type, *args))

    def _work_complete(self, peer: Peer, _type: int, args: tuple[bytes, ...]) -> None:
        job = peer.held.get(args[0])
        if job is None:
            self._error(peer, errors.RESULT_FOR_UNKNOWN_JOB)
            return
        if job.listeners:
            self._notify(job, encode(T.WORK_COMPLETE, job.handle, args[1]))
        self._ran(job).completed += 1
        self._finish(job)

    def _work_fail(self, peer: Peer, _type: int, args: tuple[bytes, ...]) -> None:
        job = peer.held.get(args[0])
        if job is None:
            self._error(peer, errors.RESULT_FOR_UNKNOWN_JOB)
            return
        if job.listeners:
            self._notify(job, encode(T.WORK_FAIL, job.handle))
        self._ran(job).failed += 1
        if job.background:
            self._failed(job, FAILED, told=True)
        else:
            self._finish(job)

    def _work_exception(self, peer: Peer, _type: int, args: tuple[bytes, ...]) -> None:
        job = peer.held.get(args[0])
        if job is None:
            self._error(peer, errors.EXCEPTION_FOR_UNKNOWN_JOB)
            return
        if job.listeners:
            exception = encode(T.WORK_EXCEPTION, job.handle, args[1])
            fail = encode(T.WORK_FAIL, job.handle + FAIL_AFTER_EXCEPTION_SUFFIX)
            for listener in job.listeners:
                listener.send(exception if listener.exceptions else fail)
        self._ran(job).failed += 1
        if job.background:
            # A worker SDK's Retry(delay=...) asks for its next attempt at a time of its own.
            delay, text = parse_retry_after(args[1])
            self._failed(job, text or b"exception", told=True, requested_delay=delay)
        else:
            self._finish(job)

    def _ran(self, job: Job) -> FunctionCounts:
        """A run of `job` ended with a worker's result: counts its run time; returns its
        function's counts for the caller to count the outcome."""
        function = job.function
        counts = function.counts or self._counts_of(function)
        seconds = self.monotonic_clock() - job.since
        run = counts.run or counts.new_run()  # inline Histogram.observe: see counters.py
        run.counts[bisect_left(JOB_SECONDS_BUCKETS, seconds)] += 1
        run.total += seconds
        return counts

    def _counts_of(self, function: Function) -> FunctionCounts:
        counts = function.counts = self.counters.of(function.name)
        return counts

    def _notify(self, job: Job, data: bytes) -> None:
        # One copy per listener record: a client that submitted the same unique twice gets
        # every packet twice, as from gearmand (§3.2).
        for listener in job.listeners or ():
            listener.send(data)

    # ------------------------------------------------------------------ job lifecycle

    def _finish(self, job: Job) -> None:
        """A job ended (completed, failed, or given up): forget it everywhere."""
        if job.worker is not None:
            self._take_from_worker(job)
        if job.state != JobState.DETACHED:
            self._unindex(job)
        self._detach_listeners(job)
        job.state = JobState.GONE
        self._forget_if_unused(job.function)

    def _take_from_worker(self, job: Job) -> None:
        worker = job.worker
        assert worker is not None
        del worker.held[job.handle]
        abilities = worker.abilities
        registration = abilities.registrations.get(job.function) if abilities else None
        if registration is not None and registration.held:
            registration.held.pop(job, None)
        job.function.running -= 1
        job.worker = None

    def _release(self, job: Job, failure: bytes | None = None) -> None:
        """Take a running job back from its worker: worker lost or CAN_DO_TIMEOUT expiry (a
        `failure`), CANT_DO or RESET_ABILITIES (given back). Requeued at the tail with its
        status reset, unless it is out of attempts (`--job-retries`, §3.6; a background job
        then goes to the dead set) or nobody wants it any more. A background job whose
        function has retries counts a failure against them instead (failures.py)."""
        if job.state == JobState.DETACHED or not (job.background or job.listeners):
            self._finish(job)  # cancelled, or every client gave up on it: nobody wants it
            return
        if failure is not None and job.background and self.policy_of(job.function.name).retries:
            self._failed(job, failure, told=False)
            return
        self._take_from_worker(job)
        job.numerator = job.denominator = 0
        job.retries += 1  # gearmand counts give-backs too (CANT_DO, RESET_ABILITIES)
        if self.job_retries and job.retries >= self.job_retries:
            if job.background:
                now_ms = int(self.wall_clock() * 1000)
                _attempts, first_ms, _error = self._failures.get(job, (0, now_ms, b""))
                self._bury(job, job.retries, first_ms, now_ms, failure or GIVEN_BACK)
                return
            if job.listeners:
                self._notify(job, encode(T.WORK_FAIL, job.handle))
            self._unindex(job)
            self._detach_listeners(job)
            job.state = JobState.GONE
            self._forget_if_unused(job.function)
            return
        self._enqueue(job)

    def _abandon(self, job: Job) -> None:
        """The last foreground listener of a foreground-only job left. A queued job is dropped
        at once; a running one finishes, its results going nowhere (§3.6)."""
        if job.state == JobState.QUEUED:
            job.function.forget_queued(job)
            self._unindex(job)
            job.state = JobState.GONE
            self._forget_if_unused(job.function)
        elif job.state == JobState.WAITING:
            job.function.waiting -= 1
            self._unindex(job)
            job.state = JobState.GONE
            self._forget_if_unused(job.function)
        elif job.state == JobState.HELD:  # a foreground job whose record was refused
            job.function.pending -= 1
            self._unindex(job)
            job.state = JobState.GONE
            self._forget_if_unused(job.function)

    def _unindex(self, job: Job) -> None:
        """The job is over for clients: forget its handle, unique and stored record."""
        del self.jobs[job.handle]
        if self._failures:
            self._failures.pop(job, None)
        if job.record_id:
            assert self.journal is not None
            self.journal.remove(job.record_id)
            job.record_id = 0
        if job.unique == b"-":
            key = (job.function.name, job.payload)
            if self._by_payload.get(key) is job:
                del self._by_payload[key]
        elif job.unique:
            self._uniques.remove(job)

    def _detach_listeners(self, job: Job) -> None:
        if job.listeners:
            for listener in job.listeners:
                listener.listening.discard(job)
            job.listeners = None

    # ------------------------------------------------------------------ timers

    def seconds_until_next_timer(self) -> float | None:
        """How long until `run_timers` has something to do; None when nothing is scheduled."""
        delays = []
        if self._epoch_heap:
            delays.append(self._epoch_heap[0][0] - self.wall_clock())
        if self._timeout_heap:
            delays.append(self._timeout_heap[0][0] - self.monotonic_clock())
        return max(0.0, min(delays)) if delays else None

    def run_timers(self) -> None:
        """Queue epoch jobs that came due (waking workers: gearmand 1.1.x never does, §3.11)
        and take back jobs whose CAN_DO_TIMEOUT expired (§3.9)."""
        now = self.wall_clock()
        heap = self._epoch_heap
        while heap and heap[0][0] <= now:
            job = heapq.heappop(heap)[2]
            if job.state == JobState.WAITING:
                job.function.waiting -= 1
                self._enqueue(job)
        now = self.monotonic_clock()
        timeouts = self._timeout_heap
        while timeouts and timeouts[0][0] <= now:
            entry = heapq.heappop(timeouts)
            # Per assignment, not per connection: a timer whose job finished or was reassigned
            # since is stale and does nothing (gearmand's fires anyway, §3.9, issue #301).
            if timer_is_live(entry):
                self._release(entry[2], TIMED_OUT)


def _status_numbers(job: Job) -> tuple[bytes, bytes, bytes]:
    return (
        b"1" if job.state in (JobState.RUNNING, JobState.DETACHED) else b"0",
        str(job.numerator).encode(),
        str(job.denominator).encode(),
    )


_Handler = Callable[[Engine, Peer, int, tuple[bytes, ...]], None]

_HANDLERS: dict[int, _Handler] = {
    T.CAN_DO: Engine._can_do,
    T.CAN_DO_TIMEOUT: Engine._can_do,
    T.CANT_DO: Engine._cant_do,
    T.RESET_ABILITIES: Engine._reset_abilities,
    T.PRE_SLEEP: Engine._pre_sleep,
    T.GRAB_JOB: Engine._grab,
    T.GRAB_JOB_UNIQ: Engine._grab,
    T.GRAB_JOB_ALL: Engine._grab,
    T.WORK_STATUS: Engine._work_update,
    T.WORK_DATA: Engine._work_update,
    T.WORK_WARNING: Engine._work_update,
    T.WORK_COMPLETE: Engine._work_complete,
    T.WORK_FAIL: Engine._work_fail,
    T.WORK_EXCEPTION: Engine._work_exception,
    T.GET_STATUS: Engine._get_status,
    T.GET_STATUS_UNIQUE: Engine._get_status_unique,
    T.ECHO_REQ: Engine._echo,
    T.SET_CLIENT_ID: Engine._set_client_id,
    T.OPTION_REQ: Engine._option,
    **{submit_type: Engine._submit for submit_type in _SUBMIT_KINDS},
}
