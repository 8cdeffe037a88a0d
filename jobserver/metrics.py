"""GET /metrics: the Prometheus exposition of a Snapshot (metrics_snapshot.py), written by
prometheus_client from metric families built at scrape time.

The engine only keeps plain counts (engine/counters.py); prometheus_client's Counter and
Histogram objects take a lock per update, which would cost every job microseconds, so they are
not used. A custom collector turns the snapshot into families instead, and generate_latest
writes them in whichever text format the installed prometheus_client speaks.

Label values are bounded: names the engine counts on their own (the first
MAX_COUNTED_FUNCTIONS seen) are labelled by name, every other function as "_other", so a
client spraying function names cannot grow a Prometheus server's series without bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .engine.counters import OTHER, STORE_SECONDS_BUCKETS
from .metrics_snapshot import HistogramCopy, Snapshot, name_text

PRIORITIES = ("high", "normal", "low")
"""Label values of jobserver_queued_jobs' priority, in the engine's order (job.Priority)."""


@dataclass
class _Row:
    """Everything exported under one function label."""

    queued: list[int] = field(default_factory=lambda: [0, 0, 0])
    waiting: int = 0
    running: int = 0
    workers: int = 0
    oldest_since: float | None = None
    dead: int = 0
    retrying: int = 0
    submitted_foreground: int = 0
    submitted_background: int = 0
    completed: int = 0
    failed: int = 0
    wait: HistogramCopy | None = None
    run: HistogramCopy | None = None


def _add(into: HistogramCopy | None, more: HistogramCopy) -> HistogramCopy:
    if into is None:
        return HistogramCopy(list(more.counts), more.total, more.bounds)
    into.counts = [a + b for a, b in zip(into.counts, more.counts, strict=True)]
    into.total += more.total
    return into


def rows_by_label(snapshot: Snapshot) -> dict[str, _Row]:
    """The snapshot folded by function label: names counted on their own keep theirs, the rest
    are summed as "_other" (two names that read the same as text are summed too, so no label
    set is ever exported twice)."""
    own = {counts.name for counts in snapshot.counts if counts.name != OTHER}
    other = name_text(OTHER)

    def label(name: bytes) -> str:
        return name_text(name) if name in own else other

    rows: dict[str, _Row] = {}
    for state in snapshot.functions:
        row = rows.setdefault(label(state.name), _Row())
        for priority in range(3):
            row.queued[priority] += state.queued[priority]
        row.waiting += state.waiting + state.pending
        row.running += state.running
        row.workers += state.workers
        row.dead += state.dead
        row.retrying += state.retrying
        since = state.oldest_queued_since
        if since is not None and (row.oldest_since is None or since < row.oldest_since):
            row.oldest_since = since
    for counts in snapshot.counts:
        row = rows.setdefault(label(counts.name), _Row())
        row.submitted_foreground += counts.submitted_foreground
        row.submitted_background += counts.submitted_background
        row.completed += counts.completed
        row.failed += counts.failed
        row.wait = _add(row.wait, counts.wait)
        row.run = _add(row.run, counts.run)
    return rows


def _buckets(histogram: HistogramCopy) -> list[tuple[str, float]]:
    """Cumulative buckets as prometheus_client wants them, +Inf last."""
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
        cumulative += count
        le: str = floatToGoString(bound)  # type: ignore[no-untyped-call]  # as its own Histogram
        buckets.append((le, cumulative))
    buckets.append(("+Inf", cumulative + histogram.counts[-1]))
    return buckets


class SnapshotCollector(Collector):
    """The jobserver_* families of one snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        rows = rows_by_label(snapshot)
        now = snapshot.monotonic_now
        fn = ["function"]
        queued = GaugeMetricFamily(
            "jobserver_queued_jobs",
            "Jobs queued and runnable now.",
            labels=["function", "priority"],
        )
        waiting = GaugeMetricFamily(
            "jobserver_waiting_jobs",
            "Jobs not runnable yet: epoch jobs not due, failed jobs waiting for their retry, new "
            "durable jobs being committed.",
            labels=fn,
        )
        running = GaugeMetricFamily("jobserver_running_jobs", "Jobs held by workers.", labels=fn)
        workers = GaugeMetricFamily(
            "jobserver_workers",
            "Worker registrations (CAN_DO), as admin status counts them.",
            labels=fn,
        )
        oldest = GaugeMetricFamily(
            "jobserver_oldest_queued_job_age_seconds",
            "Seconds the oldest runnable job has been queued; 0 with none queued.",
            labels=fn,
        )
        dead = GaugeMetricFamily(
            "jobserver_dead_jobs", "Background jobs in the dead set (out of retries).", labels=fn
        )
        retrying = GaugeMetricFamily(
            "jobserver_retrying_jobs",
            "Background jobs that failed and wait for, or run, another attempt.",
            labels=fn,
        )
        submitted = CounterMetricFamily(
            "jobserver_jobs_submitted",
            "Jobs created by a submit (coalesced submits not counted), by kind.",
            labels=["function", "kind"],
        )
        completed = CounterMetricFamily(
            "jobserver_jobs_completed", "Runs that ended in WORK_COMPLETE.", labels=fn
        )
        failed = CounterMetricFamily(
            "jobserver_jobs_failed", "Runs that ended in WORK_FAIL or WORK_EXCEPTION.", labels=fn
        )
        wait = HistogramMetricFamily(
            "jobserver_job_wait_seconds",
            "Seconds from queued to assigned to a worker.",
            labels=fn,
        )
        run = HistogramMetricFamily(
            "jobserver_job_run_seconds",
            "Seconds from assigned to the worker's WORK_COMPLETE, WORK_FAIL or WORK_EXCEPTION.",
            labels=fn,
        )
        for label, row in sorted(rows.items()):
            labels = [label]
            for priority, count in zip(PRIORITIES, row.queued, strict=True):
                queued.add_metric([label, priority], count)
            waiting.add_metric(labels, row.waiting)
            running.add_metric(labels, row.running)
            workers.add_metric(labels, row.workers)
            oldest.add_metric(labels, 0.0 if row.oldest_since is None else now - row.oldest_since)
            dead.add_metric(labels, row.dead)
            retrying.add_metric(labels, row.retrying)
            submitted.add_metric([label, "foreground"], row.submitted_foreground)
            submitted.add_metric([label, "background"], row.submitted_background)
            completed.add_metric(labels, row.completed)
            failed.add_metric(labels, row.failed)
            for family, histogram in ((wait, row.wait), (run, row.run)):
                # Only names that have had a job run: two thirds of the text a function costs
                # are its histograms' buckets, and rendering is the dearest part of a scrape.
                if histogram is not None and any(histogram.counts):
                    family.add_metric(labels, _buckets(histogram), histogram.total)
        yield from (queued, waiting, running, workers, oldest, dead, retrying)
        yield from (submitted, completed, failed, wait, run)
        yield from self._server_families()

    def _server_families(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        facts = snapshot.server
        info = GaugeMetricFamily(
            "jobserver_info",
            "Always 1; the labels say which server this is.",
            labels=["version", "store", "node_id"],
        )
        info.add_metric([facts.version, facts.store.split(" ", 1)[0], facts.node_id or ""], 1)
        yield info
        yield GaugeMetricFamily(
            "jobserver_start_time_seconds", "When the server started, in unix time.", facts.started
        )
        yield GaugeMetricFamily(
            "jobserver_connections", "Open Gearman connections.", facts.connections
        )
        yield GaugeMetricFamily(
            "jobserver_max_connections",
            "Gearman connections served at most at once (max_connections).",
            facts.max_connections,
        )
        yield GaugeMetricFamily(
            "jobserver_functions", "Function names the engine knows now.", snapshot.function_count
        )
        commits = snapshot.store_commits
        commit_family = HistogramMetricFamily(
            "jobserver_store_commit_seconds",
            "Seconds the store took to write one batch of job records (group commit); none "
            "with --store memory.",
        )
        if commits is None:
            commits = HistogramCopy.of(None, STORE_SECONDS_BUCKETS)
        commit_family.add_metric([], _buckets(commits), commits.total)
        yield commit_family
        yield CounterMetricFamily(
            "jobserver_store_errors",
            "Batches the store refused in whole or in part (their submits got an ERROR).",
            snapshot.store_errors,
        )
        yield CounterMetricFamily(
            "jobserver_tls_handshake_failures",
            "TLS connections closed before their handshake finished (no or a rejected client "
            "certificate, not TLS, timed out).",
            facts.tls_handshake_failures,
        )
        yield CounterMetricFamily(
            "jobserver_acl_denials",
            "Requests refused by --acl (submits, registrations, admin changes).",
            facts.acl_denials,
        )


def render(snapshot: Snapshot) -> bytes:
    """The exposition text of `snapshot`, with the process' own figures (CPU, memory, open
    descriptors) from prometheus_client's ProcessCollector. Safe in a worker thread: it reads
    only the snapshot and /proc."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    ProcessCollector(registry=registry)
    return generate_latest(registry)
