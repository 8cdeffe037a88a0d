"""Failed background jobs (issue 13): retried with backoff per their function's policy, then
kept in the dead set, from where an operator re-runs or purges them.

Every Gearman worker in any language gets this, since it is the server that decides: a
background job whose run ends in WORK_FAIL or WORK_EXCEPTION (or, for a function with retries,
whose worker is lost or times out) counts a failed attempt. While the policy allows another,
the job waits `retry_delay` and is queued again, durably and keeping its unique id, so
coalescing still applies and GET_STATUS still knows it. Once the attempts run out it goes to
the dead set with its last error. Foreground jobs are unchanged: their clients get
WORK_FAIL / WORK_EXCEPTION and decide for themselves.

With a function's retries at 0 (the default), a failed run goes straight to the dead set, and
a lost worker's job is queued again at once as gearmand does (bounded by --job-retries, after
which it goes to the dead set instead of vanishing).

Part of `Engine` (a mixin), like durability.py.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..protocol import PacketType as T
from ..protocol import encode
from .dead_set import DeadSet
from .job import Job, JobState, Priority
from .journal import DeadJob, RetryPolicy

if TYPE_CHECKING:
    from .function import Function
    from .journal import Journal

DEFAULT_RETRY_DELAY = 5.0
"""Seconds before a failed background job's first retry (--bg-retry-delay); each later retry
waits twice as long as the one before."""

RETRY_DELAY_CAP = 3600.0
"""The longest wait between two attempts: past an hour, a job that keeps failing is better in
the dead set than retried ever more rarely."""

JITTER = (1.0, 1.5)
"""Each delay is multiplied by a random factor in this range, so that jobs failing together
(a dependency down) do not all retry in the same instant."""

WORKER_LOST = b"worker lost"
TIMED_OUT = b"timed out"
FAILED = b"failed"
GIVEN_BACK = b"given back"  # CANT_DO or RESET_ABILITIES past --job-retries


def retry_delay(base: float, attempt: int, rng: random.Random) -> float:
    """Seconds before the retry that follows failed attempt number `attempt` (1 = the first):
    base * 2^(attempt-1) * U(1, 1.5), at most RETRY_DELAY_CAP."""
    exponent = min(attempt - 1, 64)  # 2^64 s is past any cap; keeps the float finite
    return min(RETRY_DELAY_CAP, base * 2.0**exponent * rng.uniform(*JITTER))


class FailedJobs:
    """The failure-facing half of `Engine`; see the module docstring."""

    # Provided by Engine.
    journal: Journal | None
    jobs: dict[bytes, Job]
    wall_clock: Callable[[], float]
    _epoch_heap: list[tuple[float, int, Job]]
    _timer_sequence: int
    _function: Callable[[bytes], Function]
    _forget_if_unused: Callable[[Function], None]
    _take_from_worker: Callable[[Job], None]
    _unindex: Callable[[Job], None]
    _detach_listeners: Callable[[Job], None]
    _finish: Callable[[Job], None]
    _find_duplicate: Callable[[bytes, bytes, bytes], Job | None]
    _create_job: Callable[..., Job]
    _activate: Callable[[Job], None]
    _notify: Callable[[Job, bytes], None]

    def _init_failures(
        self,
        retry_policy: RetryPolicy,
        dead: DeadSet,
        rng: random.Random | None,
    ) -> None:
        self.retry_policy = retry_policy  # for functions without a policy of their own
        self.policies: dict[bytes, RetryPolicy] = {}  # set by the `retries` admin command
        self.dead = dead
        self._random = rng or random.Random()
        # Jobs that failed and wait for their next attempt, or run it: (failed attempts, first
        # failure in unix ms, the last error). Counted apart from job.retries, gearmand's count
        # of give-backs and lost workers for --job-retries: a worker that stops gracefully
        # (CANT_DO) must not use up a job's retries.
        self._failures: dict[Job, tuple[int, int, bytes]] = {}
        # Dead jobs re-run by an operator, whose dead record is removed once the new job's
        # record is committed (durability.py), so a refused commit loses neither.
        self._reviving: dict[Job, DeadJob] = {}
        # What failed since the server last looked, for its log (the engine does no I/O):
        # (handle, function, failed attempts, retries allowed, error, seconds until the next
        # attempt, or None when the job went to the dead set).
        self.failure_log: list[tuple[bytes, bytes, int, int, bytes, float | None]] = []

    def policy_of(self, function: bytes) -> RetryPolicy:
        return self.policies.get(function, self.retry_policy)

    def failed_jobs(self) -> list[Job]:
        """The jobs that have failed before and are not over: waiting for their next attempt,
        or running it."""
        return list(self._failures)

    def failure_of(self, job: Job) -> tuple[int, int, bytes] | None:
        """(failed attempts, first failure in unix ms, last error) of a job that has failed
        before, else None."""
        return self._failures.get(job)

    # ------------------------------------------------------------------ a run failed

    def _failed(
        self, job: Job, error: bytes, *, told: bool, requested_delay: float | None = None
    ) -> None:
        """A background job's run failed. Foreground clients coalesced onto it were `told`
        (WORK_FAIL or WORK_EXCEPTION) and are done with it; else (worker lost) they wait for
        the next attempt, or get WORK_FAIL if there is none. The worker may have asked for
        its next attempt after `requested_delay` seconds instead of the policy's backoff; it
        counts as a failed attempt all the same, so a job that always asks still ends."""
        if job.worker is not None:
            self._take_from_worker(job)
        if job.state == JobState.DETACHED:  # cancelled while it ran: nothing more to do
            self._finish(job)
            return
        if told:
            self._detach_listeners(job)
        job.numerator = job.denominator = 0
        now = self.wall_clock()
        now_ms = int(now * 1000)
        attempts, first_ms, _last = self._failures.get(job, (0, now_ms, b""))
        attempts += 1
        policy = self.policy_of(job.function.name)
        if attempts <= policy.retries:
            self._failures[job] = (attempts, first_ms, error)
            if requested_delay is None:
                delay = retry_delay(policy.base_delay, attempts, self._random)
            else:
                delay = requested_delay
            self.failure_log.append(
                (job.handle, job.function.name, attempts, policy.retries, error, delay)
            )
            self._retry_later(job, now + delay)
        else:
            self._bury(job, attempts, first_ms, now_ms, error)

    def _retry_later(self, job: Job, at: float) -> None:
        """Queue `job` again at unix time `at`, durably if it is stored."""
        job.run_at = math.ceil(at)
        journal = self.journal
        if job.record_id and journal is not None:
            attempts, first_ms, error = self._failures[job]
            journal.remove(job.record_id)
            journal.add_retry(job, attempts, first_ms, error)
        job.state = JobState.WAITING
        job.function.waiting += 1
        self._timer_sequence += 1
        heapq.heappush(self._epoch_heap, (at, self._timer_sequence, job))

    def _bury(self, job: Job, attempts: int, first_ms: int, now_ms: int, error: bytes) -> None:
        """Out of attempts: into the dead set; the job itself is over."""
        retries = self.policy_of(job.function.name).retries
        self.failure_log.append((job.handle, job.function.name, attempts, retries, error, None))
        if job.listeners:
            self._notify(job, encode(T.WORK_FAIL, job.handle))
        dead = DeadJob(
            self.dead.next_id,
            job.handle,
            job.function.name,
            job.unique,
            int(job.priority),
            job.reducer,
            job.payload,
            attempts,
            first_ms,
            now_ms,
            error,
        )
        self._keep_dead(dead)
        self._unindex(job)
        self._detach_listeners(job)
        job.state = JobState.GONE
        self._forget_if_unused(job.function)

    def _keep_dead(self, dead: DeadJob) -> None:
        dropped = self.dead.add(dead)
        journal = self.journal
        if journal is not None:
            journal.add_dead(dead)
            for dead_id in dropped:
                journal.remove_dead(dead_id)

    # ------------------------------------------------------------------ operators

    def set_retry_policy(self, function: bytes, policy: RetryPolicy | None) -> None:
        """`retries <function> <n> [<base>]`: the function's policy (None: the default)."""
        if policy is None:
            self.policies.pop(function, None)
        else:
            self.policies[function] = policy
        if self.journal is not None:
            self.journal.set_policy(function, policy)

    def retry_dead(self, function: bytes | None = None, handle: bytes | None = None) -> int:
        """Run dead jobs again, as new background jobs with their attempts reset: the one with
        `handle`, or those of `function`, or all. Returns how many."""
        if handle is not None:
            found = self.dead.find(handle)
            chosen = [found] if found is not None else []
        else:
            chosen = self.dead.of_function(function)
        for dead in chosen:
            self._revive(dead)
        return len(chosen)

    def _revive(self, dead: DeadJob) -> None:
        journal = self.journal
        known = self._find_duplicate(dead.function, dead.unique, dead.payload)
        if known is not None:  # the same job was submitted again meanwhile: it stands for both
            self.dead.remove(dead.dead_id)
            if journal is not None:
                journal.remove_dead(dead.dead_id)
            return
        job = self._create_job(
            self._function(dead.function),
            dead.unique,
            dead.payload,
            Priority(dead.priority),
            True,
            dead.reducer,
            0,
            journal is not None,  # pending its record's commit
        )
        self.dead.remove(dead.dead_id)
        if journal is None:
            return
        journal.add(job)
        self._reviving[job] = dead

    def _revived(self, job: Job, stored: bool) -> None:
        """The record of a re-run dead job was committed: its dead record goes. Or it was
        refused: the dead job is back in the set (durability.py calls this)."""
        dead = self._reviving.pop(job)
        if stored:
            assert self.journal is not None
            self.journal.remove_dead(dead.dead_id)
        else:  # its dead record was never removed from the store; only memory lost it
            for dead_id in self.dead.put_back(dead):
                self.journal.remove_dead(dead_id)  # type: ignore[union-attr]

    def purge_dead(self, function: bytes | None = None) -> int:
        """Forget the dead jobs of `function`, or all. Returns how many."""
        chosen = self.dead.of_function(function)
        for dead in chosen:
            self.dead.remove(dead.dead_id)
            if self.journal is not None:
                self.journal.remove_dead(dead.dead_id)
        return len(chosen)

    def expire_dead(self) -> None:
        """Drop dead jobs past their time to live (from the timer task, now and then)."""
        for dead_id in self.dead.expire(int(self.wall_clock() * 1000)):
            if self.journal is not None:
                self.journal.remove_dead(dead_id)

    def restore_dead(self, dead_jobs: Iterable[DeadJob]) -> None:
        """The store's dead set at start, or a dead peer's (adopted): kept as it was, each in
        its place by age among ours, the oldest dropped past --dead-max."""
        dropped = self.dead.restore(dead_jobs)
        if self.journal is not None:
            for dead_id in dropped:
                self.journal.remove_dead(dead_id)

    def restore_policies(self, policies: Iterable[tuple[bytes, RetryPolicy]]) -> None:
        self.policies.update(policies)
