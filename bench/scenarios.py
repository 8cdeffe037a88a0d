"""The six scenarios of issue 5, each run against one freshly started server.

A scenario returns its figures as {metric key: value}; METRICS says what each one means. The
load always comes from bench/load.py processes (several at once), never from this process;
this process only starts them, reads the clocks they report, and reads the server's memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import load
from .loadproc import LoadGroup
from .servers import HOST, RunningServer


@dataclass(frozen=True)
class Sizes:
    payload: int = 100
    """Bytes of every job payload and ECHO payload."""
    connections: int = 4
    """Connections (one process each) for (a), (b) and the submits of (c) and (e)."""
    echo_per_connection: int = 250_000
    echo_window: int = 100
    submit_per_connection: int = 50_000
    submit_window: int = 100
    drain_jobs: int = 50_000
    drain_workers: int = 4
    fg_clients: int = 4
    fg_window: int = 4
    """SUBMIT_JOBs each client keeps outstanding."""
    fg_per_client: int = 20_000
    measure_s: float = 5.0
    """Rate scenarios (a)-(d) stop sending after this long even if their count is not reached:
    a slow server is measured over this much time instead of taking minutes."""
    fg_workers: int = 4
    memory_jobs: int = 100_000
    idle_connections: int = 10_000
    idle_probes: int = 2_000
    probe_warmup: int = 50
    settle_s: float = 1.0
    """Pause before each RSS reading, so the server finishes what the load left it."""
    deadline_s: float = 240.0
    """No load process runs longer than this; a server that slow fails the scenario."""


FULL = Sizes()
QUICK = Sizes(
    echo_per_connection=500,
    submit_per_connection=250,
    drain_jobs=1_000,
    fg_per_client=100,
    memory_jobs=2_000,
    idle_connections=200,
    idle_probes=100,
    probe_warmup=5,
    settle_s=0.1,
    deadline_s=30.0,
)


@dataclass(frozen=True)
class Metric:
    key: str
    scenario: str
    label: str
    higher_is_better: bool
    throughput: bool = False
    """A rate the load generator must produce: compared with its ceiling."""
    probe: bool = False
    """Measured with ECHO_REQ round trips (GET_STATUS for servers that ignore ECHO_REQ)."""


METRICS = [
    Metric("echo_rps", "a", "ECHO round trips/s, pipelined", True, throughput=True, probe=True),
    Metric("submit_rps", "b", "background submits/s (JOB_CREATED), pipelined", True, True),
    Metric("drain_rps", "c", "queued background jobs drained/s", True, throughput=True),
    Metric("fg_rps", "d", "foreground jobs/s (SUBMIT_JOB to WORK_COMPLETE)", True, True),
    Metric("fg_p50_ms", "d", "foreground latency p50, ms", False),
    Metric("fg_p99_ms", "d", "foreground latency p99, ms", False),
    Metric("mem_per_job_bytes", "e", "RSS per queued background job, bytes", False),
    Metric("idle_rss_mib", "f", "RSS with the idle connections open, MiB", False),
    Metric("idle_per_conn_kib", "f", "RSS per idle connection, KiB", False),
    Metric("idle_p50_ms", "f", "ECHO latency p50 while they are open, ms", False, probe=True),
    Metric("idle_p99_ms", "f", "ECHO latency p99 while they are open, ms", False, probe=True),
]


class ScenarioError(RuntimeError):
    """The server answered wrongly (e.g. lost jobs) or too slowly."""


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    run: Callable[[RunningServer, Sizes, Path], dict[str, float]]


def describe(sizes: Sizes) -> dict[str, str]:
    """One line per scenario saying exactly what was run (for the report)."""
    s = sizes
    capped = f"; stops after {s.measure_s:g} s if not done"
    return {
        "a": f"{s.connections} connections x {s.echo_per_connection:,} ECHO_REQ of "
        f"{s.payload} B, {s.echo_window} in flight per connection{capped}",
        "b": f"{s.connections} connections x {s.submit_per_connection:,} SUBMIT_JOB_BG of "
        f"{s.payload} B with distinct uniques, {s.submit_window} in flight per connection{capped}",
        "c": f"{s.drain_jobs:,} background jobs queued first, then {s.drain_workers} workers "
        f"doing GRAB_JOB_UNIQ / WORK_COMPLETE until NO_JOB{capped}",
        "d": f"{s.fg_clients} clients x {s.fg_per_client:,} SUBMIT_JOB of {s.payload} B, "
        f"{s.fg_window} outstanding per client; {s.fg_workers} workers echo the payload{capped}",
        "e": f"RSS after {s.memory_jobs:,} queued background jobs of {s.payload} B minus RSS "
        f"before, divided by {s.memory_jobs:,} ({s.settle_s} s settle before each reading)",
        "f": f"{s.idle_connections:,} idle connections; RSS once the server holds them all, "
        f"then {s.idle_probes:,} sequential ECHO round trips on another connection",
    }


def _base_spec(server: RunningServer, sizes: Sizes) -> dict:
    spec = {
        "host": HOST,
        "port": server.port,
        "deadline_s": sizes.deadline_s,
        "max_seconds": sizes.measure_s,
    }
    if server.spec.tls is not None:
        spec["tls"] = server.spec.tls.as_spec()
    return spec


def _result_timeout(sizes: Sizes) -> float:
    return sizes.deadline_s + 30.0


def _rate(results: list[dict]) -> float:
    """Jobs (or round trips) per second over the whole group: first start to last end."""
    total = sum(r["count"] for r in results)
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    return total / elapsed if elapsed > 0 else math.inf


def _run_timed(
    group: LoadGroup, servers: list[RunningServer], role: str, specs: list[dict], sizes: Sizes
) -> tuple[list[dict], float]:
    """`group.run`, and the CPU seconds the servers used (together) from just before the
    processes' `go` until their last result (their connects and TLS handshakes come before)."""
    processes = group.start(role, specs)
    cpu_before = sum(server.cpu_seconds() for server in servers)
    group.go(processes)
    results = group.results(processes, _result_timeout(sizes))
    return results, sum(server.cpu_seconds() for server in servers) - cpu_before


def _cpu_per_job(
    prefix: str, jobs: int, server_cpu_s: float, results: list[dict]
) -> dict[str, float]:
    """CPU µs per job (or round trip) of the server and of all the load processes together,
    over the timed part: what each side pays per job, e.g. for TLS (issue 15). The load
    processes count from their `go`, the server from just before it, so its figure also
    holds what it did meanwhile for nobody (timers), which is little."""
    if not jobs:
        return {}
    return {
        f"{prefix}_server_cpu_us": server_cpu_s / jobs * 1e6,
        f"{prefix}_load_cpu_us": sum(r["cpu_s"] for r in results) / jobs * 1e6,
    }


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile of unsorted samples."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _probe_kind(server: RunningServer) -> str:
    return "echo" if server.spec.answers_echo else "get_status"


def _submit_specs(
    servers: list[RunningServer], sizes: Sizes, per_connection: int, max_seconds: float
) -> list[dict]:
    """One spec per connection; connection i goes to servers[i % len(servers)]."""
    return [
        {
            **_base_spec(servers[i % len(servers)], sizes),
            "max_seconds": max_seconds,
            "kind": "submit_bg",
            "count": per_connection,
            "window": sizes.submit_window,
            "payload_size": sizes.payload,
            "unique_prefix": f"c{i}-",
        }
        for i in range(sizes.connections)
    ]


def _submit(
    servers: list[RunningServer], sizes: Sizes, logs: Path, total: int, *, timed: bool
) -> tuple[int, float, dict[str, float]]:
    """Queue `total` background jobs from `sizes.connections` connections, spread round robin
    over `servers`; returns how many were queued (in all), jobs/s and the CPU per job
    (_cpu_per_job). `timed`: stop after sizes.measure_s like every rate scenario; else queue
    them all."""
    per_connection = math.ceil(total / sizes.connections)
    max_seconds = sizes.measure_s if timed else sizes.deadline_s
    specs = _submit_specs(servers, sizes, per_connection, max_seconds)
    with LoadGroup(logs) as group:
        results, server_cpu = _run_timed(group, servers, "pipelined", specs, sizes)
    for index, server in enumerate(servers):
        _expect_queued(server, sum(r["count"] for r in results[index :: len(servers)]))
    queued = sum(r["count"] for r in results)
    return queued, _rate(results), _cpu_per_job("submit", queued, server_cpu, results)


def _database_counters(server: RunningServer) -> dict[str, int] | None:
    """What the server's store did in its database so far, for stores that can tell (else
    None): `commits` and `statements`. Takes a few seconds (bench/postgres.py)."""
    read = server.spec.database_counters
    return None if read is None else read(server.port)


def _per_commit(
    jobs: int, before: dict[str, int] | None, after: dict[str, int] | None
) -> dict[str, float]:
    """jobs, commits and statements between two readings; {} without readings. They include
    the store's lease renewals, one commit of a few statements about every second."""
    if before is None or after is None:
        return {}
    return {"jobs": jobs, **{key: after[key] - before[key] for key in before}}


def _expect_queued(server: RunningServer, expected: int) -> None:
    if not server.spec.is_job_server:
        return
    queued = server.admin_status().get(load.FUNCTION.decode(), 0)
    if queued != expected:
        raise ScenarioError(f"admin status shows {queued} jobs queued, expected {expected}")


def echo_round_trips(server: RunningServer, sizes: Sizes, logs: Path) -> dict[str, float]:
    specs = [
        {
            **_base_spec(server, sizes),
            "kind": _probe_kind(server),
            "count": sizes.echo_per_connection,
            "window": sizes.echo_window,
            "payload_size": sizes.payload,
        }
        for _ in range(sizes.connections)
    ]
    with LoadGroup(logs) as group:
        results, server_cpu = _run_timed(group, [server], "pipelined", specs, sizes)
    done = sum(r["count"] for r in results)
    return {"echo_rps": _rate(results), **_cpu_per_job("echo", done, server_cpu, results)}


def submit_rate(server: RunningServer, sizes: Sizes, logs: Path) -> dict[str, float]:
    total = sizes.submit_per_connection * sizes.connections
    before = _database_counters(server)
    queued, rate, cpu = _submit([server], sizes, logs, total, timed=True)
    counted = _per_commit(queued, before, _database_counters(server))
    return {"submit_rps": rate, **cpu, **{f"submit_{k}": v for k, v in counted.items()}}


def submit_spread(servers: list[RunningServer], sizes: Sizes, logs: Path) -> dict[str, float]:
    """(b) over several servers of one kind: connection i submits to servers[i % len(servers)];
    the rate and the CPU are totals over the servers."""
    total = sizes.submit_per_connection * sizes.connections
    _queued, rate, cpu = _submit(servers, sizes, logs, total, timed=True)
    return {"submit_rps": rate, **cpu}


def drain_rate(server: RunningServer, sizes: Sizes, logs: Path) -> dict[str, float]:
    per_connection = math.ceil(sizes.drain_jobs / sizes.connections)
    queued = per_connection * sizes.connections
    _submit([server], sizes, logs, queued, timed=False)
    spec = _base_spec(server, sizes)
    before = _database_counters(server)
    with LoadGroup(logs) as group:
        specs = [spec] * sizes.drain_workers
        results, server_cpu = _run_timed(group, [server], "drain-worker", specs, sizes)
    done = sum(r["count"] for r in results)
    if not any(r["capped"] for r in results):
        if done != queued:
            raise ScenarioError(f"workers got NO_JOB after {done} jobs of {queued} queued")
        _expect_queued(server, 0)
    counted = _per_commit(done, before, _database_counters(server))
    return {
        "drain_rps": _rate(results),
        **_cpu_per_job("drain", done, server_cpu, results),
        **{f"drain_{k}": v for k, v in counted.items()},
    }


def foreground(server: RunningServer, sizes: Sizes, logs: Path) -> dict[str, float]:
    return foreground_spread([server], sizes, logs)


def foreground_spread(servers: list[RunningServer], sizes: Sizes, logs: Path) -> dict[str, float]:
    """(d) over several servers of one kind: client i submits to servers[i % len(servers)],
    and every worker process holds a connection to each server and takes jobs from all of
    them, as the worker SDK does. With one server, this is (d)."""
    client_specs = [
        {
            **_base_spec(servers[i % len(servers)], sizes),
            "count": sizes.fg_per_client,
            "window": sizes.fg_window,
            "payload_size": sizes.payload,
            "unique_prefix": f"fg{i}-",
        }
        for i in range(sizes.fg_clients)
    ]
    worker_spec = {**_base_spec(servers[0], sizes), "ports": [s.port for s in servers]}
    with LoadGroup(logs) as group:
        workers = group.start("fg-worker", [worker_spec] * sizes.fg_workers)
        group.go(workers)  # they grab, get NO_JOB and sleep until the first submit wakes them
        results, server_cpu = _run_timed(group, servers, "fg-client", client_specs, sizes)
        for worker in workers:
            worker.tell("stop")
        worker_results = group.results(workers, _result_timeout(sizes))
    worked = sum(r["count"] for r in worker_results)
    done = sum(r["count"] for r in results)
    # The canned server completes jobs itself: no worker is involved there.
    if servers[0].spec.routes_jobs and worked != done:
        raise ScenarioError(f"workers ran {worked} jobs, clients got {done} results")
    latencies = [x / 1000 for r in results for x in r["latencies_us"]]
    return {
        "fg_rps": _rate(results),
        "fg_p50_ms": percentile(latencies, 0.50),
        "fg_p99_ms": percentile(latencies, 0.99),
        **_cpu_per_job("fg", done, server_cpu, results + worker_results),
    }


def memory_per_job(server: RunningServer, sizes: Sizes, logs: Path) -> dict[str, float]:
    per_connection = math.ceil(sizes.memory_jobs / sizes.connections)
    total = per_connection * sizes.connections
    time.sleep(sizes.settle_s)
    before = server.rss_bytes()
    _submit([server], sizes, logs, total, timed=False)
    time.sleep(sizes.settle_s)
    after = server.rss_bytes()
    return {"mem_per_job_bytes": (after - before) / total}


IDLE_ACCEPT_TIMEOUT = 120.0
"""Seconds for the server to accept every idle connection the load process opened."""


def idle_connections(server: RunningServer, sizes: Sizes, logs: Path) -> dict[str, float]:
    count = sizes.idle_connections
    base = _base_spec(server, sizes)
    time.sleep(sizes.settle_s)
    fds_before = server.fd_count()
    rss_before = server.rss_bytes()
    with LoadGroup(logs) as group:
        (holder,) = group.start(
            "idle", [{**base, "connections": count}], ready_timeout=sizes.deadline_s + 10
        )
        group.go([holder])
        # connect() returns once the kernel queued the connection; wait until the server has
        # really accepted each one (one descriptor per connection in every server we run).
        deadline = time.monotonic() + IDLE_ACCEPT_TIMEOUT
        while (held := server.fd_count() - fds_before) < count:
            if time.monotonic() > deadline:
                raise ScenarioError(f"server accepted {held} of {count} connections")
            time.sleep(0.05)
        time.sleep(sizes.settle_s)
        rss_open = server.rss_bytes()
        probe_spec = {
            **base,
            "kind": _probe_kind(server),
            "count": sizes.idle_probes,
            "warmup": sizes.probe_warmup,
            "payload_size": sizes.payload,
        }
        (probe,) = group.run("probe", [probe_spec], _result_timeout(sizes))
        holder.tell("stop")
        group.results([holder], _result_timeout(sizes))
    latencies = [x / 1000 for x in probe["latencies_us"]]
    return {
        "idle_rss_mib": rss_open / 2**20,
        "idle_per_conn_kib": (rss_open - rss_before) / count / 1024,
        "idle_p50_ms": percentile(latencies, 0.50),
        "idle_p99_ms": percentile(latencies, 0.99),
    }


SCENARIOS = [
    Scenario("a", "ECHO round trips, pipelined", echo_round_trips),
    Scenario("b", "background submit rate, pipelined", submit_rate),
    Scenario("c", "drain rate of queued background jobs", drain_rate),
    Scenario("d", "foreground round trips and latency", foreground),
    Scenario("e", "memory per queued background job", memory_per_job),
    Scenario("f", "idle connections: RSS and ECHO latency", idle_connections),
]
