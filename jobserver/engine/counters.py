"""What the engine counts for metrics (issue 14): per function name, jobs submitted, completed
and failed, and how long jobs waited in their queue and ran. Plain ints and lists, no locks,
no metrics library: the engine only adds to them, and the HTTP side (jobserver/metrics.py)
reads them when it is asked, so a job pays a few additions and a bisect, not the microseconds
of prometheus_client's locked Counter and Histogram.

Totals survive the engine forgetting an idle function (functions.py): they are kept here by
name, for at most MAX_COUNTED_FUNCTIONS names, the first ones seen; every later name is counted
under OTHER, so a client that mentions a million names cannot grow this table or a
Prometheus server's series without bound.
"""

from __future__ import annotations

from bisect import bisect_left

MAX_COUNTED_FUNCTIONS = 500
"""Function names counted (and labelled in /metrics) on their own; the rest fold into OTHER.
Prometheus' own guidance is to keep a metric's label values in the hundreds at most, and each
name costs about 25 series here; a deployment with more functions than this is better watched
by totals anyway. Names keep their place once they have it, so a counter never moves between
series."""

OTHER = b"_other"
"""The name every function past MAX_COUNTED_FUNCTIONS is counted under."""

JOB_SECONDS_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
"""Upper bounds of the wait and run time histograms, in seconds: Gearman jobs range from a
millisecond (a cache fill) to an hour (a video); 14 buckets cover that with about a factor of
three between bounds, where a Prometheus histogram of 10-20 buckets is the usual trade of
resolution for series."""


class Histogram:
    """Counts of observations per bucket (bucket i: bounds[i-1] < value <= bounds[i], the last
    one past every bound) and their sum; made cumulative only when exported."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = JOB_SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class FunctionCounts:
    """The totals of one function name (or of OTHER) since the server started."""

    __slots__ = (
        "completed",
        "failed",
        "name",
        "run",
        "submitted_background",
        "submitted_foreground",
        "wait",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.submitted_foreground = 0  # jobs created by a foreground SUBMIT_JOB*
        self.submitted_background = 0  # ... by a background one (epoch jobs included)
        self.completed = 0  # runs that ended in WORK_COMPLETE
        self.failed = 0  # runs that ended in WORK_FAIL or WORK_EXCEPTION
        # Made at the first observation: a name that never had a job run (most of those a
        # careless client sprays) costs 150 bytes here, not 600.
        self.wait: Histogram | None = None  # seconds from queued to assigned to a worker
        self.run: Histogram | None = None  # seconds from assigned to the worker's result

    # The engine observes inline (`(counts.wait or counts.new_wait()).counts[bisect...]`):
    # two method calls a job would cost more than the observation itself.

    def new_wait(self) -> Histogram:
        wait = self.wait = Histogram()
        return wait

    def new_run(self) -> Histogram:
        run = self.run = Histogram()
        return run


class FunctionCounters:
    """FunctionCounts by name: at most MAX_COUNTED_FUNCTIONS of their own, then OTHER."""

    def __init__(self, limit: int = MAX_COUNTED_FUNCTIONS) -> None:
        self.limit = limit
        self.by_name: dict[bytes, FunctionCounts] = {}
        self.other = FunctionCounts(OTHER)

    def of(self, name: bytes) -> FunctionCounts:
        """The counts `name` adds to: its own, taken now if there is room, else OTHER's."""
        counts = self.by_name.get(name)
        if counts is None:
            # A function really named "_other" shares OTHER's series rather than repeat it.
            if len(self.by_name) >= self.limit or name == OTHER:
                return self.other
            counts = self.by_name[name] = FunctionCounts(name)
        return counts

    def all(self) -> list[FunctionCounts]:
        """Every function's counts, OTHER's last."""
        return [*self.by_name.values(), self.other]


STORE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
"""Upper bounds of the store commit histogram, in seconds: a sqlite commit with its sync takes
0.5-5 ms on a local disk, a PostgreSQL one a round trip or two; past a second something is
wrong (a stalled disk, a database failing over), which the top buckets show."""


class StoreCommits:
    """The store's batches as the server sees them come back from its store thread: how long
    each took, and how many were refused in whole or in part. Filled by the server, not the
    engine (which knows nothing of timing or the store); kept here beside Histogram so that
    server.py needs no metrics library."""

    __slots__ = ("errors", "seconds")

    def __init__(self) -> None:
        self.seconds = Histogram(STORE_SECONDS_BUCKETS)
        self.errors = 0  # batches with records or removes the store refused

    def record(self, seconds: float, refused: bool) -> None:
        self.seconds.observe(seconds)
        if refused:
            self.errors += 1
