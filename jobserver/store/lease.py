"""What a shared store tells the serving thread about which durable jobs are its own.

Servers sharing a database (postgresql.py) each own the jobs they recorded, for as long as their
lease holds. The store's thread renews the lease and takes over dead peers' jobs; the serving
thread must stop handing out its durable jobs before its lease can expire, drop the ones a
peer took over, and queue the ones it took over itself. This object carries that across the
two threads: plain attribute writes and a deque, both atomic in CPython.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from ..engine.journal import DeadJob, StoredJob

DEFAULT_LEASE = 10.0
"""Seconds a server's jobs stay its own after its last renewal (--lease). Takeover waits this
long after a server stops answering, so: long enough that a GC pause, a slow disk or a brief
network blip does not move jobs, short enough that a dead server's jobs wait seconds."""

MIN_LEASE = 1.0
"""Shorter leases would have to be renewed more often than a database round trip is safe."""

TRUSTED_FRACTION = 0.5
"""Once a renewal succeeds, the server trusts its lease for this fraction of the lease's length,
counted from when the renewal was sent: the database counts the full length from later (its
now(), at the statement), so the server stops handing out jobs at least half a lease before any
peer may take them, whatever the drift between the two machines' clocks or a pause of the
serving thread. River's leader trusts its lease for less than its length the same way."""


class Adopted(NamedTuple):
    """Jobs taken over from dead peers, now recorded as this server's (negative record ids)."""

    nodes: list[tuple[str, int]]  # (node id, the term it was fenced at)
    jobs: list[StoredJob]
    dead: list[DeadJob]  # their dead sets, which move with them (negative dead ids)


class Fenced(NamedTuple):
    """A peer took this server's jobs over while it could not renew (frozen, cut off): every
    record with an id below `below` is the peer's now. The server joined again under a new term
    and goes on with newer records."""

    below: int
    old_term: int
    new_term: int


class Lease:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # Monotonic time until which this server may hand out its durable jobs.
        self.trusted_until = 0.0
        self.news: deque[Adopted | Fenced] = deque()

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at monotonic time `sent_at` succeeded (store thread)."""
        self.trusted_until = max(self.trusted_until, sent_at + self.seconds * TRUSTED_FRACTION)

    def distrust(self) -> None:
        """The server is stopping: from now on it hands out nothing it may not own."""
        self.trusted_until = 0.0

    @property
    def trusted(self) -> bool:
        return time.monotonic() < self.trusted_until
