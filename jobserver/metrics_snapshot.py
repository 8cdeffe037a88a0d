"""A snapshot of the server's state for /metrics and /api/status: plain values copied out of the
engine, so that the output can be rendered in a worker thread while the engine goes on.

Copying walks every function (and, for the status page, every connection and the dead set),
which a busy server may count in the hundred thousands, so the walk gives the event loop a turn
every WALK_CHUNK items: a scrape costs Gearman clients a few short pauses, never one long one.
Between those turns the engine may change; each figure is read from the state of its moment,
which is all a gauge promises.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import trio

from . import __version__
from .engine import Function, Job, JobState
from .engine.counters import JOB_SECONDS_BUCKETS, FunctionCounts, Histogram
from .engine.journal import DeadJob

if TYPE_CHECKING:
    from .server import Server

T = TypeVar("T")

WALK_CHUNK = 1000
"""Items (functions, connections, dead jobs) copied between two turns of the event loop. A
function costs about 3 µs to copy, so a turn stays near 3 ms, the order of one Gearman request
burst: a scrape of 100,000 functions (0.3 s in all) delays no client by more than that at a
time."""

MAX_LISTED_FUNCTIONS = 500
"""Functions listed by /api/status, the busiest first (the page shows that many rows at most;
the totals still count every function)."""

MAX_LISTED_WORKERS = 500
"""Workers listed by /api/status, by connection id."""

MAX_LISTED_WORKER_FUNCTIONS = 50
"""Function names listed per worker (a worker may register thousands; the count is given)."""

MAX_LISTED_RUNNING = 500
"""Running jobs listed by /api/status, the longest running first."""

MAX_LISTED_DEAD = 100
"""Dead jobs listed by /api/status, the newest first."""

MAX_LISTED_ERROR = 300
"""Characters of a dead job's error text listed (the dead set keeps all of it)."""


def name_text(name: bytes) -> str:
    """A client's bytes as text: UTF-8, anything else shown as \\x.. escapes."""
    return name.decode(errors="backslashreplace")


@dataclass(slots=True)
class HistogramCopy:
    counts: list[int]  # per bucket, not cumulative; the last one past every bound
    total: float
    bounds: tuple[float, ...]

    @staticmethod
    def of(
        histogram: Histogram | None, bounds: tuple[float, ...] = JOB_SECONDS_BUCKETS
    ) -> HistogramCopy:
        """A copy; None (a name that never had a job run) is an empty histogram."""
        if histogram is None:
            return HistogramCopy([0] * (len(bounds) + 1), 0.0, bounds)
        return HistogramCopy(list(histogram.counts), histogram.total, histogram.bounds)


@dataclass(slots=True)
class CountsCopy:
    """A FunctionCounts as it was (see engine/counters.py)."""

    name: bytes
    submitted_foreground: int
    submitted_background: int
    completed: int
    failed: int
    wait: HistogramCopy
    run: HistogramCopy

    @staticmethod
    def of(counts: FunctionCounts) -> CountsCopy:
        return CountsCopy(
            counts.name,
            counts.submitted_foreground,
            counts.submitted_background,
            counts.completed,
            counts.failed,
            HistogramCopy.of(counts.wait),
            HistogramCopy.of(counts.run),
        )


@dataclass(slots=True)
class FunctionState:
    """One function as the engine knows it now."""

    name: bytes
    queued: tuple[int, int, int]  # runnable, by priority: high, normal, low
    waiting: int  # epoch jobs not yet due and failed jobs waiting for their retry
    pending: int  # new durable jobs whose record is being committed (or held)
    running: int
    workers: int  # registrations, as the admin `status` counts them
    oldest_queued_since: float | None  # monotonic time the oldest runnable job was queued
    dead: int = 0
    retrying: int = 0  # background jobs that failed and wait for, or run, another attempt

    @property
    def busy(self) -> int:
        return sum(self.queued) + self.waiting + self.pending + self.running


@dataclass(slots=True)
class WorkerState:
    id: int
    address: str
    client_id: bytes
    functions: list[bytes]
    function_count: int
    running: int


@dataclass(slots=True)
class RunningJob:
    since: float  # monotonic time it was assigned
    handle: bytes
    function: bytes
    unique: bytes
    worker_id: int
    worker_address: str


@dataclass(slots=True)
class DeadJobState:
    handle: bytes
    function: bytes
    unique: bytes
    attempts: int
    first_failed_ms: int
    last_failed_ms: int
    error: bytes


@dataclass
class ServerFactsCopy:
    version: str
    pid: int
    started: float  # unix time
    now: float  # unix time of the snapshot
    store: str
    node_id: str | None
    port: int | None
    connections: int
    max_connections: int
    tls_handshake_failures: int = 0
    acl_denials: int = 0


@dataclass
class Snapshot:
    server: ServerFactsCopy
    monotonic_now: float
    functions: list[FunctionState]  # every function the engine knows, then dead jobs' others
    counts: list[CountsCopy]  # every name counted on its own, then OTHER's
    function_count: int = 0  # functions the engine knows
    store_commits: HistogramCopy | None = None
    store_errors: int = 0
    dead_total: int = 0
    retrying_total: int = 0
    # Only for the status page (details=True):
    workers: list[WorkerState] = field(default_factory=list)
    workers_total: int = 0
    running: list[RunningJob] = field(default_factory=list)
    running_total: int = 0
    dead: list[DeadJobState] = field(default_factory=list)


def oldest_queued_since(function: Function) -> float | None:
    """When the oldest runnable job of `function` was queued: the earliest head of its
    priority queues (each queue is in queueing order). Reads only; stale entries (cancelled
    jobs the engine skips when it reaches them) are stepped over, at most a bounded few
    (function.py COMPACT_MIN_STALE)."""
    queues = function.queues
    if queues is None:
        return None
    oldest: float | None = None
    for priority, queue in enumerate(queues):
        if queue is None or not function.queued[priority]:
            continue
        for job in queue.live_entries():
            if job.state is JobState.QUEUED:
                if oldest is None or job.since < oldest:
                    oldest = job.since
                break
    return oldest


def _function_state(function: Function) -> FunctionState:
    queued = function.queued
    return FunctionState(
        function.name,
        (queued[0], queued[1], queued[2]),
        function.waiting,
        function.pending,
        function.running,
        function.registrations,
        oldest_queued_since(function),
    )


def store_description(server: Server) -> tuple[str, str | None]:
    """(what the store is, this node's id in a cluster or None); never a password: a
    PostgreSQL store describes itself without it, as in the log."""
    store = server.store
    if store is None:
        return "memory", None
    kind = type(store).__name__.removesuffix("Store").lower() or "store"
    return f"{kind} {getattr(store, 'path', '')}".strip(), getattr(store, "node_id", None)


async def take_snapshot(server: Server, started: float, *, details: bool) -> Snapshot:
    """Copy what /metrics (details=False) or /api/status (details=True) shows."""
    engine = server.engine
    assert engine is not None
    clock = engine.monotonic_clock
    store, node_id = store_description(server)
    facts = ServerFactsCopy(
        version=__version__,
        pid=server.config.facts.pid,
        started=started,
        now=time.time(),
        store=store,
        node_id=node_id,
        port=server.port,
        connections=server.gate.open,
        max_connections=server.gate.max_connections,
        tls_handshake_failures=server.tls_failures.total,
        acl_denials=server.denials.total,
    )
    store_commits = server.store_commits  # filled by the server as batches come back
    snapshot = Snapshot(
        server=facts,
        monotonic_now=clock(),
        functions=[],
        counts=[],
        store_commits=HistogramCopy.of(store_commits.seconds),
        store_errors=store_commits.errors,
    )
    by_name: dict[bytes, FunctionState] = {}
    counters = engine.counters
    async for function in walk(list(engine.functions.values())):
        state = _function_state(function)
        snapshot.functions.append(state)
        by_name[state.name] = state
        # A name gets its own label (if there is room) when first seen, by a job or by this.
        counters.of(state.name)
    snapshot.counts = [CountsCopy.of(entry) for entry in counters.all()]
    dead_jobs = list(engine.dead)  # oldest first
    snapshot.function_count = len(snapshot.functions)
    async for dead in walk(dead_jobs):
        of_dead = by_name.get(dead.function)
        if of_dead is None:  # forgotten once idle; its dead jobs still show under its name
            of_dead = by_name[dead.function] = FunctionState(
                dead.function, (0, 0, 0), 0, 0, 0, 0, None
            )
            snapshot.functions.append(of_dead)
        of_dead.dead += 1
        snapshot.dead_total += 1
    async for job in walk(engine.failed_jobs()):  # failed jobs between attempts (failures.py)
        of_retry = by_name.get(job.function.name)
        if of_retry is not None:
            of_retry.retrying += 1
        snapshot.retrying_total += 1
    snapshot.monotonic_now = clock()
    if details:
        await _take_details(server, snapshot)
        snapshot.dead = [_dead(dead) for dead in reversed(dead_jobs[-MAX_LISTED_DEAD:])]
    return snapshot


async def _take_details(server: Server, snapshot: Snapshot) -> None:
    engine = server.engine
    assert engine is not None
    workers: list[WorkerState] = []
    running: list[tuple[Job, int, str]] = []
    async for peer in walk(list(engine.peers.values())):
        abilities = peer.abilities
        if abilities is not None and abilities.registrations:
            snapshot.workers_total += 1
            if len(workers) < MAX_LISTED_WORKERS:
                names = [function.name for function in abilities.registrations]
                workers.append(
                    WorkerState(
                        peer.id,
                        peer.address,
                        peer.client_id,
                        names[:MAX_LISTED_WORKER_FUNCTIONS],
                        len(names),
                        len(peer.held),
                    )
                )
        running.extend((job, peer.id, peer.address) for job in peer.held.values())
    snapshot.workers = sorted(workers, key=lambda worker: worker.id)
    snapshot.running_total = len(running)
    snapshot.running = [
        RunningJob(job.since, job.handle, job.function.name, job.unique, worker_id, address)
        for job, worker_id, address in heapq.nsmallest(
            MAX_LISTED_RUNNING, running, key=lambda entry: entry[0].since
        )
    ]


def _dead(dead: DeadJob) -> DeadJobState:
    return DeadJobState(
        dead.handle,
        dead.function,
        dead.unique,
        dead.attempts,
        dead.first_failed_ms,
        dead.last_failed_ms,
        dead.error[:MAX_LISTED_ERROR],
    )


async def walk(items: list[T]) -> AsyncIterator[T]:
    """Yield `items`, giving the event loop a turn every WALK_CHUNK of them."""
    for start in range(0, len(items), WALK_CHUNK):
        for item in items[start : start + WALK_CHUNK]:
            yield item
        await trio.lowlevel.checkpoint()
