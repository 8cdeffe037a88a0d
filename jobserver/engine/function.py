"""A function name's queues, counters, workers and limits."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .job import Job, JobState, Priority

if TYPE_CHECKING:
    from .abilities import Registration
    from .peer import Peer

COMPACT_MIN_STALE = 1024
"""Stale entries (cancelled or abandoned jobs) a queue tolerates before it is rebuilt.

Removing a job from the middle of a deque is O(n), so removal only marks the job GONE and the
entry is skipped when it reaches the head. A queue that no worker drains would keep those
entries forever, so once they are both numerous and the majority we rebuild it: amortised O(1).
"""

NO_LIMITS = (0, 0, 0)
"""`limits` of a function without `maxqueue`: shared, so an unlimited function stores none."""


class Function:
    """One function name. Kept small (a few hundred bytes while idle): clients create one per
    name they mention, and the engine forgets it once nothing uses it (`in_use`).

    Queues are created when a job arrives and dropped when the function has none left, since a
    deque costs about 600 bytes even empty.
    """

    __slots__ = (
        "explicit",
        "limits",
        "name",
        "pending",
        "queued",
        "queues",
        "registrations",
        "running",
        "sleepers",
        "stale",
        "waiting",
        "workers",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        # Per priority; None while the function has no queued job of any priority.
        self.queues: list[deque[Job]] | None = None
        self.queued = [0, 0, 0]  # live queued jobs per priority
        self.stale: list[int] | None = None  # GONE entries still in each queue; with queues
        self.waiting = 0  # epoch jobs not yet due (NORMAL priority, §3.11)
        self.pending = 0  # new durable jobs waiting for their store commit
        self.running = 0
        # Registered workers -> their registration. A worker's duplicate CAN_DOs count twice in
        # `status`, as in gearmand; `registrations` is the sum of their counts.
        self.workers: dict[Peer, Registration] = {}
        self.registrations = 0
        # While the function has runnable jobs: the registrations whose workers were asleep when
        # it got them and were not woken yet (--worker-wakeup), longest asleep first. Entries
        # whose worker has been woken or unregistered since are skipped when reached.
        self.sleepers: deque[Registration] | None = None
        # maxqueue per priority; 0 = unlimited (§4 maxqueue).
        self.limits: tuple[int, ...] | list[int] = NO_LIMITS
        # Made by `create function` or `maxqueue`: kept while idle, until `drop function`.
        self.explicit = False

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
        return bool(self.workers or self.total or self.explicit)

    def is_full_for(self, priority: Priority) -> bool:
        limit = self.limits[priority]
        return limit > 0 and self.total >= limit

    def enqueue(self, job: Job) -> None:
        job.state = JobState.QUEUED
        queues = self.queues
        if queues is None:
            queues = self.queues = [deque(), deque(), deque()]
            self.stale = [0, 0, 0]
        queues[job.priority].append(job)
        self.queued[job.priority] += 1

    def head(self, priority: int) -> Job | None:
        """The next live job of this priority, dropping stale entries on the way."""
        if not self.queued[priority]:
            return None
        assert self.queues is not None and self.stale is not None
        queue = self.queues[priority]
        while queue:
            job = queue[0]
            if job.state == JobState.QUEUED:
                return job
            queue.popleft()
            self.stale[priority] -= 1
        return None

    def pop_head(self, priority: int) -> Job:
        assert self.queues is not None
        job = self.queues[priority].popleft()
        self.queued[priority] -= 1
        self._release_queues_if_empty()
        return job

    def forget_queued(self, job: Job) -> None:
        """Account for a queued job that was marked GONE where it stands in its queue."""
        assert self.queues is not None and self.stale is not None
        priority = job.priority
        self.queued[priority] -= 1
        self.stale[priority] += 1
        stale = self.stale[priority]
        queue = self.queues[priority]
        if stale >= COMPACT_MIN_STALE and stale * 2 > len(queue):
            live = [j for j in queue if j.state == JobState.QUEUED]
            queue.clear()
            queue.extend(live)
            self.stale[priority] = 0
        self._release_queues_if_empty()

    def _release_queues_if_empty(self) -> None:
        if not self.has_runnable:
            # Stale entries left go with the deques; nothing else refers to them.
            self.queues = self.stale = None
            self.sleepers = None

    def __repr__(self) -> str:
        return f"<Function {self.name!r}>"
