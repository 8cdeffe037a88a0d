"""Worker-side requests: CAN_DO, CAN_DO_TIMEOUT, CANT_DO, RESET_ABILITIES, PRE_SLEEP and
GRAB_JOB*; which job a worker gets, who is woken when a job is queued, and the CAN_DO_TIMEOUT
timer of an assignment (shared doc §3.3, §3.4, §3.9).

Part of `Engine` (a mixin: the engine's other half handles clients, results and the job
lifecycle). Every request here costs O(log n) at most in the functions the worker registered
(see abilities.py); waking sleepers costs O(workers of the function) when its queue gets its
first job, and O(1) per worker woken after that.
"""

from __future__ import annotations

import heapq
import re
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..protocol import PacketType as T
from ..protocol import encode
from .abilities import Abilities, Registration
from .counters import JOB_SECONDS_BUCKETS
from .job import Job, JobState

if TYPE_CHECKING:
    from .counters import FunctionCounts
    from .function import Function
    from .functions import FunctionTable
    from .peer import Peer

MIN_CAN_DO_TIMEOUT_MS = 1000
"""gearmand 1.1.19+ raises CAN_DO_TIMEOUT values of 1..999 ms to one second (§3.9)."""

MAX_TIMEOUT_DIGITS = 18
"""Digits of a CAN_DO_TIMEOUT read as they are; a longer number means "longer than anyone
waits" and is clamped to 10**18 ms (31 million years), as gearmand's strtol clamps to
LONG_MAX. Keeps int() off attacker-sized digit strings."""

COMPACT_MIN_TIMERS = 1024
"""Timer entries tolerated before stale ones are swept. A CAN_DO_TIMEOUT timer stays in the heap
until its deadline even when its job finished long before; with long timeouts and many short
jobs the heap would grow without bound, so once it holds this many entries and twice as many as
after the last sweep, it is rebuilt with the live ones: amortised O(1) per timer."""

_STRTOL_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]*)")
_NOOP = encode(T.NOOP)
_NO_JOB = encode(T.NO_JOB)
_GRAB_JOB = int(T.GRAB_JOB)
_GRAB_JOB_ALL = int(T.GRAB_JOB_ALL)


def parse_can_do_timeout(text: bytes) -> int:
    """The CAN_DO_TIMEOUT value in milliseconds, read as gearmand reads it (strtol, base 10):
    leading whitespace, a sign, then the leading decimal digits; whatever follows is ignored
    (`2.5` is 2, `30000 ` is 30000). No digits (empty, or node `gearman`'s binary integer) or a
    value <= 0 means no timeout (0); 1..999 is raised to MIN_CAN_DO_TIMEOUT_MS (§3.9)."""
    match = _STRTOL_NUMBER.match(text)
    assert match is not None  # every part of the pattern may be empty
    sign, digits = match.groups()
    digits = digits.lstrip(b"0")
    if not digits or sign == b"-":
        return 0
    value = int(digits) if len(digits) <= MAX_TIMEOUT_DIGITS else 10**MAX_TIMEOUT_DIGITS
    return max(value, MIN_CAN_DO_TIMEOUT_MS)


class WorkerRequests:
    """The worker-side half of `Engine`; see the module docstring."""

    # Provided by Engine.
    functions: FunctionTable
    worker_wakeup: int
    monotonic_clock: Callable[[], float]
    _timeout_heap: list[tuple[float, int, Job, int]]
    _timeout_sweep_at: int
    _timer_sequence: int
    _stamp: int
    _function: Callable[[bytes], Function]
    _release: Callable[[Job], None]
    _forget_if_unused: Callable[[Function], None]
    _counts_of: Callable[[Function], FunctionCounts]

    # ------------------------------------------------------------------ registrations

    def _can_do(self, peer: Peer, packet_type: int, args: tuple[bytes, ...]) -> None:
        # gearmand registers whatever the timeout says and never replies (§3.9): a worker that
        # sends `2.5` or a binary integer (node `gearman`) still gets its jobs.
        timeout_ms = parse_can_do_timeout(args[1]) if packet_type == T.CAN_DO_TIMEOUT else 0
        function = self._function(args[0])
        abilities = peer.abilities
        if abilities is None:
            abilities = peer.abilities = Abilities()
        self._stamp += 1
        registration = abilities.registrations.get(function)
        if registration is not None:
            registration.timeout = timeout_ms / 1000  # the latest registration's timeout rules
            if registration.add_duplicate(self._stamp):
                function.registrations += 1
            return
        registration = Registration(peer, function, timeout_ms / 1000, self._stamp)
        abilities.registrations[function] = registration
        function.add_worker(registration)
        if function.has_runnable:
            abilities.offer_queued(registration)
            if peer.sleeping and not peer.noop_sent:
                # A sleeping worker that takes on a function with queued work must hear about
                # it; gearmand only checks at the next PRE_SLEEP.
                self._wake(peer)

    def _cant_do(self, peer: Peer, _type: int, args: tuple[bytes, ...]) -> None:
        function = self.functions.get(args[0])
        abilities = peer.abilities
        if function is None or abilities is None:
            return
        registration = abilities.registrations.get(function)
        if registration is None:
            return
        self._unregister(peer, registration)
        for job in list(registration.held or ()):
            self._release(job)
        self._forget_if_unused(function)

    def _reset_abilities(self, peer: Peer, _type: int, _args: tuple[bytes, ...]) -> None:
        functions = self._unregister_all(peer)
        for job in list(peer.held.values()):
            self._release(job)
        for function in functions:
            self._forget_if_unused(function)

    def _unregister(self, peer: Peer, registration: Registration) -> None:
        assert peer.abilities is not None
        peer.abilities.withdraw(registration)
        registration.function.remove_worker(registration)

    def _unregister_all(self, peer: Peer) -> list[Function]:
        """Withdraw every registration; returns the functions, for the caller to forget once
        it has released the worker's jobs. Unregistering first keeps a departing worker from
        taking the wake-up meant for a live one when its jobs are requeued."""
        abilities = peer.abilities
        if abilities is None:
            return []
        functions = list(abilities.registrations)
        for function, registration in abilities.registrations.items():
            function.remove_worker(registration)
        abilities.clear()
        return functions

    # ------------------------------------------------------------------ sleep and wake-up

    def _pre_sleep(self, peer: Peer, _type: int, _args: tuple[bytes, ...]) -> None:
        # gearmand clears the noop-sent flag only on GRAB_JOB, so a worker that answers a NOOP
        # with PRE_SLEEP is never woken again (§3.4 rule 5, issue #343). PRE_SLEEP means "I am
        # going to sleep now", so it re-arms the wake-up here.
        peer.noop_sent = False
        abilities = peer.abilities
        if abilities is not None and abilities.pick() is not None:
            peer.sleeping = False
            self._wake(peer)
            return
        if not peer.sleeping:  # a repeated PRE_SLEEP keeps its place in the wake-up order
            peer.sleeping = True
            self._stamp += 1
            peer.sleep_stamp = self._stamp

    def _wake(self, peer: Peer) -> None:
        peer.noop_sent = True
        peer.send(_NOOP)

    def _job_queued(self, job: Job) -> None:
        """`job` was just put in its function's queue: tell the workers' ready heaps if its
        queue was empty, and wake sleeping workers (§3.4), longest asleep first."""
        function = job.function
        priority = job.priority
        queued = function.queued
        if queued[priority] == 1:
            # The first job of this priority: every registered worker's heap must know.
            became_runnable = queued[0] + queued[1] + queued[2] == 1
            asleep = []
            for registration in function.workers():
                peer = registration.peer
                peer.abilities.offer(registration, priority, job.sequence)  # type: ignore[union-attr]
                if became_runnable and peer.sleeping and not peer.noop_sent:
                    asleep.append(registration)
            if asleep:
                # Until the function runs dry, a registered worker that goes to sleep is woken
                # at once (PRE_SLEEP and CAN_DO look for runnable jobs), so the ones asleep now
                # are the only ones later jobs may have to wake.
                if 0 < self.worker_wakeup < len(asleep):
                    asleep.sort(key=_longest_asleep_first)
                function.sleepers = deque(asleep)
        sleepers = function.sleepers
        if sleepers:
            budget = self.worker_wakeup or len(sleepers)
            while budget and sleepers:
                registration = sleepers.popleft()
                peer = registration.peer
                # Skip those woken through another function, or unregistered, since.
                if registration.active and peer.sleeping and not peer.noop_sent:
                    self._wake(peer)
                    budget -= 1

    # ------------------------------------------------------------------ grabbing a job

    def _grab(self, peer: Peer, packet_type: int, _args: tuple[bytes, ...]) -> None:
        peer.sleeping = False
        peer.noop_sent = False
        abilities = peer.abilities
        job = abilities.pick() if abilities is not None else None
        if job is None:
            peer.send(_NO_JOB)
            return
        assert abilities is not None
        function = job.function
        function.pop_head(job.priority)
        function.running += 1
        now = self.monotonic_clock()
        waited = now - job.since
        counts = function.counts or self._counts_of(function)
        wait = counts.wait or counts.new_wait()  # inline Histogram.observe: see counters.py
        wait.counts[bisect_left(JOB_SECONDS_BUCKETS, waited)] += 1
        wait.total += waited
        job.since = now
        job.state = JobState.RUNNING
        job.worker = peer
        job.attempt += 1
        peer.held[job.handle] = job
        registration = abilities.registrations[function]
        if registration.held is None:
            registration.held = {}
        registration.held[job] = None
        if registration.timeout:
            self._arm_timeout(job, registration.timeout)
        if packet_type == _GRAB_JOB:
            peer.send(encode(T.JOB_ASSIGN, job.handle, function.name, job.payload))
        elif packet_type == _GRAB_JOB_ALL and job.reducer:
            peer.send(
                encode(
                    T.JOB_ASSIGN_ALL,
                    job.handle,
                    function.name,
                    job.unique,
                    job.reducer,
                    job.payload,
                )
            )
        else:
            peer.send(encode(T.JOB_ASSIGN_UNIQ, job.handle, function.name, job.unique, job.payload))

    def _pick_job(self, peer: Peer) -> Job | None:
        """The highest-priority runnable job across all the worker's functions, oldest first
        within a priority. gearmand 1.1.x instead takes the first function (latest registered)
        that has any job, whatever its priority (§3.3, §6.12)."""
        return peer.abilities.pick() if peer.abilities is not None else None

    def _arm_timeout(self, job: Job, timeout: float) -> None:
        # The timer belongs to this assignment and runs until the job ends. gearmand cancels it
        # at the worker's next PRE_SLEEP (§3.9), which a worker running several jobs at once
        # sends while a timed job is still in flight; we do not.
        self._timer_sequence += 1
        deadline = self.monotonic_clock() + timeout
        heap = self._timeout_heap
        heapq.heappush(heap, (deadline, self._timer_sequence, job, job.attempt))
        if len(heap) >= self._timeout_sweep_at:
            heap[:] = [entry for entry in heap if timer_is_live(entry)]
            heapq.heapify(heap)
            self._timeout_sweep_at = max(COMPACT_MIN_TIMERS, 2 * len(heap))


def timer_is_live(entry: tuple[float, int, Job, int]) -> bool:
    job, attempt = entry[2], entry[3]
    return job.attempt == attempt and job.state in (JobState.RUNNING, JobState.DETACHED)


def _longest_asleep_first(registration: Registration) -> int:
    return registration.peer.sleep_stamp
