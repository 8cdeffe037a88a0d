"""GET /api/status: the state of the server as one JSON document, for the status page and for
scripts; and the recent throughput it reports, sampled from the engine's counts.

Names (functions, unique ids, client ids, handles, error texts) are bytes from clients; they are
given as text decoded with backslash escapes for what is not UTF-8. The lists are capped
(metrics_snapshot.MAX_LISTED_*), the totals beside them count everything.
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from typing import Any

from .engine.counters import OTHER, FunctionCounters
from .metrics_snapshot import (
    MAX_LISTED_FUNCTIONS,
    CountsCopy,
    FunctionState,
    Snapshot,
    name_text,
)

THROUGHPUT_WINDOW = 60.0
"""Seconds over which recent throughput is measured ("completed per minute")."""

THROUGHPUT_SAMPLE_INTERVAL = 5.0
"""Seconds between samples of the counts: the window is known to within this, at the cost of
WINDOW / INTERVAL copies of at most MAX_COUNTED_FUNCTIONS numbers kept."""


class Throughput:
    """Jobs completed and failed per minute, per function counted on its own: the difference
    between the counts now and a sample taken about THROUGHPUT_WINDOW ago, over that window.
    In the server's first minute it is what was done since the start, not scaled up: two jobs
    in the first 10 ms are two a minute so far, not 12,000."""

    def __init__(self) -> None:
        # (monotonic time, {name: (completed, failed)}), oldest first.
        self._samples: deque[tuple[float, dict[bytes, tuple[int, int]]]] = deque()

    def sample(self, now: float, counters: FunctionCounters) -> None:
        self._samples.append(
            (now, {counts.name: (counts.completed, counts.failed) for counts in counters.all()})
        )
        # Keep the newest sample at least a window old, and everything after it.
        while len(self._samples) > 1 and self._samples[1][0] <= now - THROUGHPUT_WINDOW:
            self._samples.popleft()

    def per_minute(
        self, now: float, name: bytes, completed: int, failed: int
    ) -> tuple[float, float] | None:
        """(completed, failed) per minute for `name`, or None before the first sample."""
        if not self._samples:
            return None
        then, counts = self._samples[0]
        elapsed = now - then
        was_completed, was_failed = counts.get(name, (0, 0))
        scale = 60.0 / max(elapsed, THROUGHPUT_WINDOW)
        return (completed - was_completed) * scale, (failed - was_failed) * scale


def _round(seconds: float) -> float:
    return round(seconds, 3)


def status_document(snapshot: Snapshot, throughput: Throughput) -> dict[str, Any]:
    """The /api/status document of `snapshot` (see the README for its fields)."""
    facts = snapshot.server
    now = snapshot.monotonic_now
    counts_by_name = {counts.name: counts for counts in snapshot.counts}
    rates = {
        name: throughput.per_minute(now, name, counts.completed, counts.failed)
        for name, counts in counts_by_name.items()
    }
    functions = snapshot.functions
    if len(functions) > MAX_LISTED_FUNCTIONS:
        functions = heapq.nlargest(
            MAX_LISTED_FUNCTIONS, functions, key=lambda state: (state.busy, state.workers)
        )
    listed = sorted(functions, key=lambda state: state.name)
    total_rate = [0.0, 0.0]
    for rate in rates.values():
        if rate is not None:
            total_rate[0] += rate[0]
            total_rate[1] += rate[1]
    return {
        "server": {
            "version": facts.version,
            "pid": facts.pid,
            "started": facts.started,
            "uptime_seconds": _round(facts.now - facts.started),
            "now": facts.now,
            "store": facts.store,
            "node_id": facts.node_id,
            "port": facts.port,
            "connections": facts.connections,
            "max_connections": facts.max_connections,
        },
        "totals": {
            "functions": snapshot.function_count,
            "queued": sum(sum(state.queued) for state in snapshot.functions),
            "waiting": sum(state.waiting + state.pending for state in snapshot.functions),
            "running": sum(state.running for state in snapshot.functions),
            "workers": snapshot.workers_total,
            "dead": snapshot.dead_total,
            "retrying": snapshot.retrying_total,
            "completed_per_minute": round(total_rate[0], 1),
            "failed_per_minute": round(total_rate[1], 1),
        },
        "functions": [_function(state, counts_by_name, rates, now) for state in listed],
        # Rows there are to list: known functions and forgotten ones with dead jobs.
        "functions_total": len(snapshot.functions),
        "workers": [
            {
                "id": worker.id,
                "address": worker.address,
                "client_id": name_text(worker.client_id),
                "functions": [name_text(name) for name in worker.functions],
                "functions_total": worker.function_count,
                "running": worker.running,
            }
            for worker in snapshot.workers
        ],
        "running_jobs": [
            {
                "handle": name_text(job.handle),
                "function": name_text(job.function),
                "unique": name_text(job.unique),
                "worker_id": job.worker_id,
                "worker_address": job.worker_address,
                "age_seconds": _round(now - job.since),
            }
            for job in snapshot.running
        ],
        "running_total": snapshot.running_total,
        "dead_jobs": [
            {
                "handle": name_text(dead.handle),
                "function": name_text(dead.function),
                "unique": name_text(dead.unique),
                "attempts": dead.attempts,
                "first_failure": dead.first_failed_ms / 1000,
                "last_failure": dead.last_failed_ms / 1000,
                "error": name_text(dead.error),
            }
            for dead in snapshot.dead
        ],
        "dead_total": snapshot.dead_total,
    }


def _function(
    state: FunctionState,
    counts_by_name: dict[bytes, CountsCopy],
    rates: dict[bytes, tuple[float, float] | None],
    now: float,
) -> dict[str, Any]:
    high, normal, low = state.queued
    row: dict[str, Any] = {
        "name": name_text(state.name),
        "queued": {"high": high, "normal": normal, "low": low},
        "queued_total": high + normal + low,
        "waiting": state.waiting + state.pending,
        "running": state.running,
        "workers": state.workers,
        "oldest_queued_age_seconds": (
            None if state.oldest_queued_since is None else _round(now - state.oldest_queued_since)
        ),
        "dead": state.dead,
        "retrying": state.retrying,
    }
    # Names past the counting cap share OTHER's counts: no figures of their own.
    counts = counts_by_name.get(state.name) if state.name != OTHER else None
    rate = rates.get(state.name) if counts is not None else None
    row["submitted"] = (
        None
        if counts is None
        else {"foreground": counts.submitted_foreground, "background": counts.submitted_background}
    )
    row["completed_total"] = None if counts is None else counts.completed
    row["failed_total"] = None if counts is None else counts.failed
    row["completed_per_minute"] = None if rate is None else round(rate[0], 1)
    row["failed_per_minute"] = None if rate is None else round(rate[1], 1)
    return row


def render(snapshot: Snapshot, throughput: Throughput) -> bytes:
    return json.dumps(status_document(snapshot, throughput), separators=(",", ":")).encode()
