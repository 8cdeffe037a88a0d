"""One job and its priority. Kept small: a queued job is a few hundred bytes plus its payload."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .function import Function
    from .peer import Peer


class Priority(enum.IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2


class JobState(enum.IntEnum):
    WAITING = 0  # an epoch job not yet due; not in any queue
    QUEUED = 1  # in its function's queue for its priority
    RUNNING = 2  # held by a worker
    DETACHED = 3  # still held by a worker, but cancelled or abandoned: results go nowhere
    GONE = 4  # finished or removed; a stale queue entry for it is skipped
    PENDING = 5  # a new durable job whose record is not committed yet; not runnable
    HELD = 6  # a durable job kept from workers while a shared store's lease is in doubt


class Job:
    __slots__ = (
        "attempt",
        "background",
        "denominator",
        "function",
        "handle",
        "listeners",
        "numerator",
        "payload",
        "priority",
        "record_id",
        "reducer",
        "retries",
        "run_at",
        "sequence",
        "since",
        "state",
        "unique",
        "worker",
    )

    def __init__(
        self,
        handle: bytes,
        function: Function,
        unique: bytes,
        payload: bytes,
        priority: Priority,
        background: bool,
        reducer: bytes = b"",
        run_at: int = 0,
    ) -> None:
        self.handle = handle
        self.function = function
        self.unique = unique
        self.payload = payload
        self.priority = priority
        # True once any background submit was answered with this handle: the job then runs
        # even if every foreground listener leaves (gearmand drops it, §3.2 "Hazard").
        self.background = background
        self.reducer = reducer
        self.run_at = run_at  # unix time before which it must not run; 0 = no constraint
        self.state = JobState.QUEUED
        self.listeners: list[Peer] | None = None  # one entry per foreground submit
        self.worker: Peer | None = None
        self.numerator = 0
        self.denominator = 0
        self.retries = 0
        self.sequence = 0  # enqueue order, for FIFO across a worker's functions
        self.attempt = 0  # bumped at each assignment; stale timeouts compare against it
        self.record_id = 0  # the store's key for this job; 0 = not stored
        # Monotonic time it was queued, then assigned: its wait and run for metrics.
        self.since = 0.0

    def __repr__(self) -> str:
        return f"<Job {self.handle!r} {self.function.name!r} {self.state.name}>"
