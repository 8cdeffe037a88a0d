"""Reconnect delays: exponential, capped, with full jitter.

Jitter matters when a server restarts: hundreds of workers that lost it at the same moment
would otherwise reconnect in lockstep, every round."""

from __future__ import annotations

import random

INITIAL_DELAY = 0.1
"""First retry soon: most drops are a server restart that is back within a second."""

MAX_DELAY = 10.0
"""Never wait longer than this between attempts, so a recovered server is rejoined quickly."""


class Backoff:
    def __init__(
        self,
        initial: float = INITIAL_DELAY,
        maximum: float = MAX_DELAY,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._ceiling = initial
        self._random = rng or random.Random()

    def next_delay(self) -> float:
        """A random delay up to the current ceiling, which then doubles (up to the maximum)."""
        delay = self._random.uniform(self._ceiling / 2, self._ceiling)
        self._ceiling = min(self._ceiling * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._ceiling = self.initial
