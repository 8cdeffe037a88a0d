"""A function name's queues, counters, workers and limits."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .job import Job, JobState, Priority

if TYPE_CHECKING:
    from .abilities import Registration
    from .counters import FunctionCounts
    from .peer import Peer

COMPACT_MIN_STALE = 1024
"""Stale entries (cancelled or abandoned jobs) a queue tolerates before it is rebuilt.

Removing a job from the middle of a queue is O(n), so removal only marks the job GONE and the
entry is skipped when it reaches the head. A queue that no worker drains would keep those
entries forever, so once they are both numerous and the majority we rebuild it: amortised O(1).
"""

COMPACT_MIN_TAKEN = 64
"""Entries taken from the front of a queue before its list is shifted down (see JobQueue)."""

NO_LIMITS = (0, 0, 0)
"""`limits` of a function without `maxqueue`: shared, so an unlimited function stores none."""


class JobQueue(list[Job]):
    """The FIFO queue of one function and priority: a list and the index of its first entry.

    A deque would be the obvious choice, but even empty it costs 760 bytes, and a function
    queue often holds one job (100,000 names with a job each would cost 76 MB in deques).
    Taking from the front only moves `first`; the list is shifted down once the taken part is
    both numerous and the larger part, so taking is amortised O(1).
    """

    __slots__ = ("first", "stale")

    def __init__(self) -> None:
        super().__init__()
        self.first = 0
        self.stale = 0  # GONE entries still queued after `first`

    def live_entries(self) -> Iterator[Job]:
        """The entries from `first` on, stale ones included."""
        return itertools.islice(self, self.first, None)

    @property
    def length(self) -> int:
        return len(self) - self.first

    def popleft(self) -> Job:
        first = self.first
        job = self[first]
        first += 1
        if first >= COMPACT_MIN_TAKEN and first * 2 >= len(self):
            del self[:first]
            first = 0
        self.first = first
        return job

    def keep_only(self, jobs: list[Job]) -> None:
        self[:] = jobs
        self.first = 0
        self.stale = 0


class Function:
    """One function name. Kept small (a few hundred bytes while idle): clients create one per
    name they mention, and the engine forgets it once nothing uses it (`in_use`).
    """

    __slots__ = (
        "_workers",
        "counts",
        "explicit",
        "limits",
        "name",
        "pending",
        "queued",
        "queues",
        "registrations",
        "running",
        "sleepers",
        "waiting",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        # Per priority, a queue while it holds entries; None while no priority does.
        self.queues: list[JobQueue | None] | None = None
        self.queued = [0, 0, 0]  # live queued jobs per priority
        self.waiting = 0  # epoch jobs not yet due (NORMAL priority, §3.11)
        self.pending = 0  # new durable jobs waiting for their store commit
        self.running = 0
        # Registered workers: None, the one Registration, or a dict by peer once there are
        # several (a dict costs 224 bytes; most functions have one worker or none). See
        # `workers`. A worker's duplicate CAN_DOs count twice in `status`, as in gearmand;
        # `registrations` is the sum of their counts.
        self._workers: Registration | dict[Peer, Registration] | None = None
        self.registrations = 0
        # While the function has runnable jobs: the registrations whose workers were asleep when
        # it got them and were not woken yet (--worker-wakeup), longest asleep first. Entries
        # whose worker has been woken or unregistered since are skipped when reached.
        self.sleepers: deque[Registration] | None = None
        # maxqueue per priority; 0 = unlimited (§4 maxqueue).
        self.limits: tuple[int, ...] | list[int] = NO_LIMITS
        # Made by `create function` or `maxqueue`: kept while idle, until `drop function`.
        self.explicit = False
        # Its totals for metrics (counters.py), looked up by name when first needed: they
        # outlive this object, which goes when the function is idle.
        self.counts: FunctionCounts | None = None

    @property
    def total(self) -> int:
        """Queued (epoch jobs not due and jobs being committed included) plus running, as
        `status` reports it."""
        queued = self.queued
        return queued[0] + queued[1] + queued[2] + self.waiting + self.pending + self.running

    @property
    def has_runnable(self) -> bool:
        return bool(self.queued[0] or self.queued[1] or self.queued[2])

    @property
    def in_use(self) -> bool:
        """Whether anything still needs this function: workers, jobs in any state, or an
        operator's setting. One that is not is forgotten (its name may come back any time)."""
        return bool(self._workers is not None or self.total or self.explicit)

    # ------------------------------------------------------------------ workers

    def workers(self) -> list[Registration]:
        """The registrations of this function, one per worker."""
        workers = self._workers
        if workers is None:
            return []
        if isinstance(workers, dict):
            return list(workers.values())
        return [workers]

    def add_worker(self, registration: Registration) -> None:
        workers = self._workers
        if workers is None:
            self._workers = registration
        elif isinstance(workers, dict):
            workers[registration.peer] = registration
        else:
            self._workers = {workers.peer: workers, registration.peer: registration}
        self.registrations += registration.count

    def remove_worker(self, registration: Registration) -> None:
        workers = self._workers
        if isinstance(workers, dict):
            del workers[registration.peer]
            if len(workers) == 1:
                self._workers = next(iter(workers.values()))
        else:
            assert workers is registration
            self._workers = None
        self.registrations -= registration.count

    # ------------------------------------------------------------------ queues

    def is_full_for(self, priority: Priority) -> bool:
        limit = self.limits[priority]
        return limit > 0 and self.total >= limit

    def enqueue(self, job: Job) -> None:
        job.state = JobState.QUEUED
        priority = job.priority
        queues = self.queues
        if queues is None:
            queues = self.queues = [None, None, None]
        queue = queues[priority]
        if queue is None:
            queue = queues[priority] = JobQueue()
        queue.append(job)
        self.queued[priority] += 1

    def head(self, priority: int) -> Job | None:
        """The next live job of this priority, dropping stale entries on the way."""
        if not self.queued[priority]:
            return None
        queue = self.queues[priority]  # type: ignore[index]
        assert queue is not None
        while True:  # a live job is queued, so the loop ends at it
            job = queue[queue.first]
            if job.state == JobState.QUEUED:
                return job
            queue.popleft()
            queue.stale -= 1

    def pop_head(self, priority: int) -> Job:
        """Take the job `head(priority)` just returned."""
        queue = self.queues[priority]  # type: ignore[index]
        assert queue is not None
        job = queue.popleft()
        self.queued[priority] -= 1
        if not self.queued[priority]:
            self._release_queue(priority)
        return job

    def forget_queued(self, job: Job) -> None:
        """Account for a queued job that was marked GONE where it stands in its queue."""
        priority = job.priority
        queue = self.queues[priority]  # type: ignore[index]
        assert queue is not None
        self.queued[priority] -= 1
        if not self.queued[priority]:
            self._release_queue(priority)
            return
        queue.stale += 1
        if queue.stale >= COMPACT_MIN_STALE and queue.stale * 2 > queue.length:
            queue.keep_only([j for j in queue.live_entries() if j.state == JobState.QUEUED])

    def _release_queue(self, priority: int) -> None:
        """No live job of this priority is left: drop its queue (stale entries included)."""
        queues = self.queues
        assert queues is not None
        queues[priority] = None
        if not self.has_runnable:
            self.queues = None
            self.sleepers = None

    def __repr__(self) -> str:
        return f"<Function {self.name!r}>"
