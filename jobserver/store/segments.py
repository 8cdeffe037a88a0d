"""Which stored records live in which segment, and how many of them are still unfinished.

The sqlite store writes each group commit's records as one row (a segment) instead of one row
per job: a commit then costs about the same for one job as for hundreds. A job that finishes is
not deleted from its segment; its id is added to the segment's finished list, and the segment's
row goes when its last record is finished. This index, kept in memory by the store, says which
segment a record id belongs to and how many of its records are live, so a finish costs a
bisect and a counter, and the database is only read at start (and when compacting).

Record ids are handed out in increasing order and a commit's records have consecutive ids, so
a segment covers the id range [start, end); segments never overlap and are created in order of
their start.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


class Segment:
    __slots__ = ("end", "held", "live", "start")

    def __init__(self, start: int, end: int, held: int, live: int) -> None:
        self.start = start
        self.end = end  # one past the last record id it may hold
        self.held = held  # records in its row (finished ones included, until compacted)
        self.live = live  # records not finished

    def __repr__(self) -> str:
        return f"<Segment [{self.start}, {self.end}) live {self.live} of {self.held}>"


class SegmentIndex:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._segments: list[Segment] = []

    def __len__(self) -> int:
        return len(self._segments)

    def __iter__(self):
        return iter(list(self._segments))

    @property
    def next_record_id(self) -> int:
        """An id above every id any segment covers (1 when there are none)."""
        return self._segments[-1].end if self._segments else 1

    def add(self, segment: Segment) -> None:
        if self._segments and segment.start < self._segments[-1].end:
            raise ValueError(f"{segment!r} overlaps {self._segments[-1]!r}")
        self._starts.append(segment.start)
        self._segments.append(segment)

    def discard_from(self, count: int) -> None:
        """Forget the segments added after the first `count` (a commit that failed)."""
        del self._starts[count:]
        del self._segments[count:]

    def group(self, record_ids: Iterable[int]) -> dict[Segment, list[int]]:
        """The ids by the segment holding them. Ids no segment covers are left out: a record
        the store refused (its job was never acknowledged) has nothing to remove. Finishes
        are counted, not remembered, so each record must be finished once (the engine removes
        a record once; a repeat within one call is dropped here)."""
        groups: dict[Segment, list[int]] = {}
        starts, segments = self._starts, self._segments
        for record_id in dict.fromkeys(record_ids):
            position = bisect.bisect_right(starts, record_id) - 1
            if position < 0:
                continue
            segment = segments[position]
            if record_id >= segment.end:
                continue
            ids = groups.get(segment)
            if ids is None:
                groups[segment] = [record_id]
            else:
                ids.append(record_id)
        return groups

    def remove(self, segment: Segment) -> None:
        position = bisect.bisect_left(self._starts, segment.start)
        assert self._segments[position] is segment
        del self._starts[position]
        del self._segments[position]
