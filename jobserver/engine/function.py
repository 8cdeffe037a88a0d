"""A function name's queues, counters, workers and limits."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .job import Job, JobState, Priority

if TYPE_CHECKING:
    from .peer import Peer

COMPACT_MIN_STALE = 1024
"""Stale entries (cancelled or abandoned jobs) a queue tolerates before it is rebuilt.

Removing a job from the middle of a deque is O(n), so removal only marks the job GONE and the
entry is skipped when it reaches the head. A queue that no worker drains would keep those
entries forever, so once they are both numerous and the majority we rebuild it: amortised O(1).
"""


class Function:
    __slots__ = (
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
        self.queues: tuple[deque[Job], deque[Job], deque[Job]] = (deque(), deque(), deque())
        self.queued = [0, 0, 0]  # live queued jobs per priority
        self.stale = [0, 0, 0]  # GONE entries still sitting in each queue
        self.waiting = 0  # epoch jobs not yet due (NORMAL priority, §3.11)
        self.pending = 0  # new durable jobs waiting for their store commit
        self.running = 0
        # Registered workers -> how many CAN_DO registrations each made. Duplicates count twice
        # in `status`, as in gearmand; `registrations` is that sum.
        self.workers: dict[Peer, int] = {}
        self.registrations = 0
        # Workers asleep after PRE_SLEEP and not yet sent a NOOP, longest asleep first: waking
        # them in this order rotates wake-ups fairly, like gearmand's rotating cursor (§3.4).
        self.sleepers: dict[Peer, None] = {}
        # maxqueue per priority; 0 = unlimited (§4 maxqueue).
        self.limits = [0, 0, 0]

    @property
    def total(self) -> int:
        """Queued (epoch jobs not due and jobs being committed included) plus running, as
        `status` reports it."""
        queued = self.queued
        return queued[0] + queued[1] + queued[2] + self.waiting + self.pending + self.running

    @property
    def has_runnable(self) -> bool:
        return bool(self.queued[0] or self.queued[1] or self.queued[2])

    def is_full_for(self, priority: Priority) -> bool:
        limit = self.limits[priority]
        return limit > 0 and self.total >= limit

    def enqueue(self, job: Job) -> None:
        job.state = JobState.QUEUED
        self.queues[job.priority].append(job)
        self.queued[job.priority] += 1

    def head(self, priority: int) -> Job | None:
        """The next live job of this priority, dropping stale entries on the way."""
        queue = self.queues[priority]
        while queue:
            job = queue[0]
            if job.state == JobState.QUEUED:
                return job
            queue.popleft()
            self.stale[priority] -= 1
        return None

    def pop_head(self, priority: int) -> Job:
        job = self.queues[priority].popleft()
        self.queued[priority] -= 1
        return job

    def forget_queued(self, job: Job) -> None:
        """Account for a queued job that was marked GONE where it stands in its queue."""
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

    def __repr__(self) -> str:
        return f"<Function {self.name!r}>"
