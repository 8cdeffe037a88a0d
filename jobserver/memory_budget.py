"""The memory budget: one total for the bytes held on behalf of peers, over all connections.

What a peer makes us hold is its partial input (a packet or admin line not yet complete) and
its unsent output (replies and forwarded WORK_DATA it has not read). Either can be made huge by
one unauthenticated peer: a header announcing 60 MiB and a body that never ends, a client that
never reads. Per-connection caps alone do not help: forty such connections under a 2 GiB
address-space limit once ended the whole server with MemoryError. So every connection reports
what it holds when that changes, the budget keeps the sum (O(1) per change, never a scan of
every connection: 10,000 idle ones are normal), and when the sum passes the limit the server
closes the connections holding most, one at a time, until it is back under.
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path
from typing import Protocol

MEMORY_BUDGET_FRACTION = 0.25
"""Share of the memory available to the process that peers may hold. The rest is for what the
budget does not count: the jobs themselves (payloads in the queue), the transient copies made
while a large packet is decoded (a 64 MiB packet briefly costs about three times that), the
interpreter, and allocator slack. A quarter keeps a 2 GiB address-space limit survivable with
every connection full."""

MIN_MEMORY_BUDGET = 32 * 1024 * 1024
"""Floor of the derived budget, so a tiny limit still lets a few normal peers through."""

UNLIMITED = 1 << 62
"""Stands for "no limit" when comparing limits (RLIM_INFINITY, cgroup "max")."""

CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
"""A container's memory limit (cgroup v2): the kernel kills the process past it."""


class Holder(Protocol):
    """Anything whose held bytes are accounted: the budget keeps `held` up to date."""

    held: int


class MemoryBudget:
    """The running total of held bytes, and who holds them.

    `change(holder, delta)` is the only way a holder's count moves; `over` says whether the
    total passed the limit, and `largest_first()` lists who to close. Holders at zero are not
    tracked, so the cost follows the connections that hold something, not all of them.
    """

    __slots__ = ("_holders", "limit", "total")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the memory budget must be positive")
        self.limit = limit
        self.total = 0
        self._holders: set[Holder] = set()

    @property
    def over(self) -> bool:
        return self.total > self.limit

    def change(self, holder: Holder, delta: int) -> None:
        held = holder.held + delta
        holder.held = held
        self.total += delta
        if held:
            self._holders.add(holder)
        else:
            self._holders.discard(holder)

    def release(self, holder: Holder) -> None:
        """Forget everything `holder` held (its connection is closed)."""
        if holder.held:
            self.change(holder, -holder.held)

    def largest_first(self) -> list[Holder]:
        """Holders by bytes held, most first. Sorting only holders that hold something, and
        only when over budget (every close frees at least what it held), keeps this rare."""
        return sorted(self._holders, key=_held, reverse=True)


def _held(holder: Holder) -> int:
    return holder.held


def default_memory_budget() -> int:
    """MEMORY_BUDGET_FRACTION of the memory this process may use: the least of the machine's
    memory, the address-space and data-segment limits (`prlimit --as=2G`, `ulimit -v`) less
    what the process already uses, and a cgroup v2 memory limit."""
    available = min(
        _machine_memory(),
        _rlimit_room(resource.RLIMIT_AS, "VmSize"),
        _rlimit_room(resource.RLIMIT_DATA, "VmData"),
        _cgroup_memory(),
    )
    if available >= UNLIMITED:
        available = 4 * 1024**3  # no figure at all (not Linux): assume a small machine
    return max(MIN_MEMORY_BUDGET, int(available * MEMORY_BUDGET_FRACTION))


def _machine_memory() -> int:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return UNLIMITED


def _rlimit_room(limit: int, status_field: str) -> int:
    """The soft limit less what the process already uses of it (from /proc/self/status)."""
    soft, _hard = resource.getrlimit(limit)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return UNLIMITED
    return max(0, soft - _process_status_bytes(status_field))


def _process_status_bytes(field: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # "VmSize:   123456 kB"
    return 0


def _cgroup_memory() -> int:
    with contextlib.suppress(OSError, ValueError):
        text = CGROUP_MEMORY_MAX.read_text().strip()
        if text != "max":
            return int(text)
    return UNLIMITED
