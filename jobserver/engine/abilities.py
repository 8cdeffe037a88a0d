"""What one worker can do, and which of its functions has the job it should get next.

A worker may register thousands of functions (one attack registered 20,000 and pipelined
GRAB_JOBs), so nothing a worker does may cost O(its functions). `Abilities.pick` finds the job
for GRAB_JOB and PRE_SLEEP in O(log n): per priority, a heap of the worker's functions that have
queued jobs of that priority, keyed by the sequence number of their oldest one.

The heaps are kept lazily, as the only thing that can move cheaply is a function's own queue:

- A key is a lower bound of the function's current head: heads only move forward (a queue is
  FIFO and a requeued job gets a new sequence number), so a key can only become stale low.
  When the smallest key is stale it is raised to the true head and the heap re-sifted; when it
  is exact it is the oldest job overall.
- A function entering the heap must be announced: when a function's queue of one priority goes
  from empty to non-empty, the engine calls `offer` for every registration of that function.
  A function that emptied keeps its entry (marked in `Registration.flags`) until a pick finds
  it empty, so an offer never duplicates an entry.
- Entries of registrations withdrawn since (CANT_DO) are dropped when they surface, and a heap
  holding many of them is rebuilt, so a worker cycling CAN_DO/CANT_DO cannot grow it.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .function import Function
    from .job import Job
    from .peer import Peer

MAX_DUPLICATE_REGISTRATIONS = 64
"""CAN_DOs of one function by one worker that count. gearmand keeps a record per CAN_DO, so
duplicates count again in `status` and are listed again in `workers`; we do too, up to this
many. Past it, further duplicates are ignored silently (CAN_DO has no reply in the protocol,
so an ERROR would desynchronise a client matching replies in order): otherwise one worker
repeating a CAN_DO could inflate the counts and the `workers` listing without bound. No library
registers a function more than a few times on one connection."""

STALE_HEAP_ENTRIES = 32
"""Entries a ready heap may hold beyond twice its worker's registrations before it is rebuilt:
stale entries of withdrawn registrations surface only when they reach the top."""

_BITS = (1, 2, 4)  # Registration.flags: the ready heap of that priority has an entry
_WITHDRAWN = 8  # Registration.flags: withdrawn (CANT_DO, ...); entries left in heaps are stale


class Registration:
    """One worker's registration of one function (CAN_DO or CAN_DO_TIMEOUT)."""

    # One is kept per worker and function (100,000 functions, 100,000 of these): few slots.
    __slots__ = ("flags", "function", "held", "peer", "stamps", "timeout")

    def __init__(self, peer: Peer, function: Function, timeout: float, stamp: int) -> None:
        self.peer = peer
        self.function = function
        self.timeout = timeout  # CAN_DO_TIMEOUT in seconds; 0 = none
        # When each CAN_DO was made (engine-wide order), for the `workers` listing: one int, or
        # a list once there are duplicates.
        self.stamps: int | list[int] = stamp
        self.flags = 0  # _BITS and _WITHDRAWN
        self.held: dict[Job, None] | None = None  # this worker's running jobs of the function

    @property
    def active(self) -> bool:
        return not self.flags & _WITHDRAWN

    @property
    def count(self) -> int:
        """CAN_DOs made, duplicates included (bounded)."""
        stamps = self.stamps
        return 1 if isinstance(stamps, int) else len(stamps)

    def add_duplicate(self, stamp: int) -> bool:
        """Count one more CAN_DO of the same function; False past the bound (ignored)."""
        if self.count >= MAX_DUPLICATE_REGISTRATIONS:
            return False
        stamps = self.stamps
        if isinstance(stamps, int):
            self.stamps = [stamps, stamp]
        else:
            stamps.append(stamp)
        return True

    def stamp_list(self) -> list[int]:
        stamps = self.stamps
        return [stamps] if isinstance(stamps, int) else stamps


class Abilities:
    """A worker's registrations and its per-priority heaps of functions with queued jobs."""

    __slots__ = ("ready", "registrations")

    def __init__(self) -> None:
        # In order of first registration.
        self.registrations: dict[Function, Registration] = {}
        # Per priority: (lower bound of the head job's sequence, id of the registration, reg).
        self.ready: tuple[list[tuple[int, int, Registration]], ...] = ([], [], [])

    def offer(self, registration: Registration, priority: int, sequence: int) -> None:
        """The registration's function now has a job of `priority` whose sequence is
        `sequence` or later: make sure the heap of that priority knows it."""
        bit = _BITS[priority]
        if registration.flags & bit:
            return
        registration.flags |= bit
        heap = self.ready[priority]
        heapq.heappush(heap, (sequence, id(registration), registration))
        if len(heap) > 2 * len(self.registrations) + STALE_HEAP_ENTRIES:
            self._rebuild(priority)

    def offer_queued(self, registration: Registration) -> None:
        """A new registration: enter its function in every heap where it has jobs."""
        function = registration.function
        for priority in (0, 1, 2):
            head = function.head(priority)
            if head is not None:
                self.offer(registration, priority, head.sequence)

    def pick(self) -> Job | None:
        """The highest-priority queued job across the worker's functions, oldest first within
        a priority; None when there is none. Amortised O(log n) in the functions."""
        for priority, heap in enumerate(self.ready):
            while heap:
                sequence, key, registration = heap[0]
                if registration.flags & _WITHDRAWN:
                    heapq.heappop(heap)
                    continue
                head = registration.function.head(priority)
                if head is None:
                    heapq.heappop(heap)
                    registration.flags &= ~_BITS[priority]
                elif head.sequence != sequence:
                    # Stale (other workers took jobs): raise the key to the real head. Still on
                    # top means exact and smallest, the common case with one function.
                    heapq.heapreplace(heap, (head.sequence, key, registration))
                    if heap[0][2] is registration:
                        return head
                else:
                    return head
        return None

    def withdraw(self, registration: Registration) -> None:
        registration.flags |= _WITHDRAWN
        del self.registrations[registration.function]

    def clear(self) -> None:
        for registration in self.registrations.values():
            registration.flags |= _WITHDRAWN
        self.registrations.clear()
        for heap in self.ready:
            heap.clear()

    def _rebuild(self, priority: int) -> None:
        bit = _BITS[priority]
        heap = []
        for registration in self.registrations.values():
            head = registration.function.head(priority)
            if head is None:
                registration.flags &= ~bit
            else:
                registration.flags |= bit
                heap.append((head.sequence, id(registration), registration))
        heapq.heapify(heap)
        self.ready[priority][:] = heap
