"""Jobs by unique id, for coalescing (function, unique) and for GET_STATUS_UNIQUE (unique only).

One dict keyed by the unique bytes serves both lookups. A unique used under one function (the
common case) maps straight to its job; only a unique used under several functions at once maps
to a small dict by function. This keeps a queued job to one index entry instead of a tuple key
plus a second index.
"""

from __future__ import annotations

from collections.abc import Callable

from .job import Job


class UniqueIndex:
    __slots__ = ("_by_unique",)

    def __init__(self) -> None:
        self._by_unique: dict[bytes, Job | dict[bytes, Job]] = {}

    def find(self, function: bytes, unique: bytes) -> Job | None:
        entry = self._by_unique.get(unique)
        if entry is None:
            return None
        if isinstance(entry, Job):
            return entry if entry.function.name == function else None
        return entry.get(function)

    def find_any(self, unique: bytes, visible: Callable[[bytes], bool] | None = None) -> Job | None:
        """A job with this unique under any function (GET_STATUS_UNIQUE ignores the function),
        the first one added; with `visible`, the first whose function name it accepts."""
        entry = self._by_unique.get(unique)
        if entry is None:
            return None
        jobs = (entry,) if isinstance(entry, Job) else entry.values()
        for job in jobs:
            if visible is None or visible(job.function.name):
                return job
        return None

    def add(self, job: Job) -> None:
        unique = job.unique
        entry = self._by_unique.get(unique)
        if entry is None:
            self._by_unique[unique] = job
        elif isinstance(entry, Job):
            self._by_unique[unique] = {entry.function.name: entry, job.function.name: job}
        else:
            entry[job.function.name] = job

    def remove(self, job: Job) -> None:
        unique = job.unique
        entry = self._by_unique.get(unique)
        if entry is job:
            del self._by_unique[unique]
        elif isinstance(entry, dict) and entry.get(job.function.name) is job:
            del entry[job.function.name]
            if len(entry) == 1:
                self._by_unique[unique] = next(iter(entry.values()))

    def __len__(self) -> int:
        return sum(1 if isinstance(e, Job) else len(e) for e in self._by_unique.values())
