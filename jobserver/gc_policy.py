"""Keep Python's full garbage collections short when the server holds many jobs.

CPython's cycle collector scans every tracked object in a full (generation 2) collection, and
every queued job is one. Filling a server with 1,000,000 background jobs caused 9 full
collections, the longest stopping every connection for 497 ms (bench/RESULTS.md).

The policy: after each full collection, the survivors are frozen (gc.freeze): moved where the
collector no longer looks, so the next full collection only scans what came since. Frozen
objects are still freed by reference counting the moment nothing refers to them, which is how
finished jobs go; what freezing delays is the collection of *cycles* among them, which the
server's own objects do not form once their connection has gone (see Server._serve_connection).
So that a cycle made by someone else's code cannot pile up for ever, everything is unfrozen
every UNFREEZE_INTERVAL: the full collection after that scans it all once, and freezing resumes.

Installed by the `jobserver` command only: a program that embeds the server keeps its own
collector settings.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

UNFREEZE_INTERVAL = 3600.0
"""Seconds between unfreezes, i.e. between full collections that scan every object: one long
pause an hour at most, against one every few seconds while a large queue grows."""


class FreezeSurvivors:
    """A gc callback: freeze after each full collection, unfreeze every `interval` seconds."""

    def __init__(
        self, interval: float = UNFREEZE_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._next_unfreeze = clock() + interval

    def __call__(self, phase: str, info: dict) -> None:
        if phase != "stop" or info.get("generation") != 2:
            return
        now = self._clock()
        if now >= self._next_unfreeze:
            self._next_unfreeze = now + self._interval
            gc.unfreeze()  # the next full collection looks at everything again
        else:
            gc.freeze()


def install(interval: float = UNFREEZE_INTERVAL) -> FreezeSurvivors:
    policy = FreezeSurvivors(interval)
    gc.callbacks.append(policy)
    return policy
