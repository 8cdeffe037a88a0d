"""The dead set: background jobs that failed every attempt their retry policy allowed.

Kept in memory for the admin commands and in the store (through the journal) across restarts;
bounded in count (`max_jobs`, the oldest dropped first) and in age (`ttl`, by last failure).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .journal import DeadJob

DEFAULT_MAX_DEAD = 100_000
"""Dead jobs kept (--dead-max): each holds its payload, so the set is bounded like a queue."""

DEFAULT_DEAD_TTL = 30 * 24 * 3600.0
"""Seconds a dead job is kept after its last failure (--dead-ttl): long enough for an operator
to notice and re-run it after a holiday, not forever."""


class DeadSet:
    def __init__(self, max_jobs: int = DEFAULT_MAX_DEAD, ttl: float = DEFAULT_DEAD_TTL) -> None:
        self.max_jobs = max_jobs
        self.ttl = ttl
        # Oldest first (by last failure, then dead id), so that trimming drops the oldest and
        # `show dead jobs` lists them in that order. A new dead job failed just now, so it goes
        # last; restored and adopted ones are sorted in (restore).
        self._jobs: dict[int, DeadJob] = {}
        self._by_handle: dict[bytes, int] = {}
        self.next_id = 1
        self.dropped = 0  # dropped for room or age since the server last logged it

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[DeadJob]:
        return iter(self._jobs.values())

    def add(self, dead: DeadJob) -> list[int]:
        """Keep `dead`, which failed just now (so it is the newest); returns the ids dropped to
        stay within max_jobs (oldest first)."""
        self._keep(dead)
        return self._drop_excess()

    def restore(self, dead_jobs: Iterable[DeadJob]) -> list[int]:
        """Keep dead jobs from elsewhere, each in its place by age: the store's at start, a dead
        peer's adopted at a takeover (older or newer than ours, ids negative), or one taken out
        whose re-run was refused. Returns the ids dropped to stay within max_jobs, which are the
        oldest of all, not the last restored."""
        for dead in dead_jobs:
            self._keep(dead)
        ordered = sorted(self._jobs.values(), key=_age_order)
        self._jobs = {entry.dead_id: entry for entry in ordered}
        return self._drop_excess()

    def _keep(self, dead: DeadJob) -> None:
        self._jobs[dead.dead_id] = dead
        self._by_handle[dead.handle] = dead.dead_id
        self.next_id = max(self.next_id, dead.dead_id + 1)

    def put_back(self, dead: DeadJob) -> list[int]:
        """Keep again a dead job taken out (its re-run was refused), in its place by age;
        returns the ids dropped to stay within max_jobs."""
        return self.restore([dead])

    def expire(self, now_ms: int) -> list[int]:
        """Drop the dead jobs whose last failure is older than the ttl; returns their ids."""
        limit = now_ms - int(self.ttl * 1000)
        dropped = []
        # A full scan rather than a stop at the first young one: the set is in age order only
        # as far as the wall clock never stepped back between two failures.
        for dead_id, dead in list(self._jobs.items()):
            if dead.last_failed_ms < limit:
                self.remove(dead_id)
                dropped.append(dead_id)
        self.dropped += len(dropped)
        return dropped

    def find(self, handle: bytes) -> DeadJob | None:
        dead_id = self._by_handle.get(handle)
        return None if dead_id is None else self._jobs[dead_id]

    def remove(self, dead_id: int) -> DeadJob:
        dead = self._jobs.pop(dead_id)
        if self._by_handle.get(dead.handle) == dead_id:
            del self._by_handle[dead.handle]
        return dead

    def of_function(self, function: bytes | None) -> list[DeadJob]:
        """The dead jobs of `function`, or all of them for None, oldest first."""
        if function is None:
            return list(self._jobs.values())
        return [dead for dead in self._jobs.values() if dead.function == function]

    def _drop_excess(self) -> list[int]:
        """Drop the oldest until within max_jobs; returns their ids."""
        dropped = []
        while len(self._jobs) > self.max_jobs:
            dead_id = next(iter(self._jobs))
            self.remove(dead_id)
            dropped.append(dead_id)
        self.dropped += len(dropped)
        return dropped


def _age_order(dead: DeadJob) -> tuple[int, int]:
    return dead.last_failed_ms, dead.dead_id
