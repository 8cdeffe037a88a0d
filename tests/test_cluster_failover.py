"""A cluster of real `jobserver` processes, one worker_sdk Worker serving all of them and a
client_sdk Client submitting to all of them, while one server is killed with SIGKILL and later
restarted on the same port.

What must hold (issue 3, "Tests"):
- every foreground call returns the right result, or raises a clear SDK error (JobLost,
  NoServerAvailable, ServerError); nothing else, never a wrong result;
- every background job accepted by a server that was not killed (a survivor, or the restarted
  server) runs at least once. Jobs the killed server had accepted and not yet handed out went
  with its memory (durable queues are a later issue): they are counted, not lost;
- the worker re-joins the restarted server by itself;
- duplicates (same function and unique) coalesce across the cluster, whatever order each client
  lists the servers in;
- with retry=True every foreground job gets its right result despite the kill.

The figures of the big run are printed (`pytest -s`) and written to a JSON file in tmp_path.
"""

from __future__ import annotations

import collections
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest
import servers
from test_client_sdk_support import eventually, kill, listeners_of_unique

from client_sdk import Client, JobHandle, JobLost, NoServerAvailable, ServerError
from client_sdk.server_pool import rendezvous_order
from worker_sdk import Worker

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

CLEAR_ERRORS = (JobLost, NoServerAvailable, ServerError)
"""What a call may raise when its server dies under it; any other exception fails the test."""

FOREGROUND_JOBS = 2000
BACKGROUND_JOBS = 2000
IN_FLIGHT = 50
"""Calls in progress at once (bounded parallelism of the load)."""

WORKER_CONCURRENCY = 8

CALLS_PER_SECOND = 300
"""The load's pace (at most; a slow machine goes slower): about 13 s for the 4,000 calls, so
that well after the restart there are still calls for the client to send to the restarted
server (a client tries a server that failed last for up to 5 s)."""

KILL_AT = 0.3
"""Fraction of the calls finished when the doomed server is killed."""

DOWNTIME = 2.0
"""Seconds from the kill to the restart (the restart itself then takes about a second)."""

BACKLOG_AT_KILL = 15
"""Jobs we wait for (at most BACKLOG_WAIT seconds) on the doomed server before the kill, with
the worker paused: the kill then certainly takes queued and running jobs with it."""

BACKLOG_WAIT = 2.0

CLUSTER_TIMEOUT = 120
REJOIN_TIMEOUT = 30
"""The worker's reconnect backoff is capped at 10 s; 30 s is plenty even on a loaded machine."""

TEST_TIMEOUT = 60

TRANSFORM = "failover_transform"
RECORD = "failover_record"


def expected_result(n: int) -> dict[str, Any]:
    """What the foreground function returns for argument {"n": n}."""
    return {"n": n, "square": n * n, "text": f"job-{n}"[::-1]}


class Gate:
    """Lets the test pause the worker's functions (jobs pile up on the servers) and resume."""

    def __init__(self) -> None:
        self._open = anyio.Event()
        self._open.set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = anyio.Event()

    def open(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


@dataclass
class Executions:
    """What the worker ran: foreground runs per n, background runs per n (and their uniques)."""

    foreground: collections.Counter[int] = field(default_factory=collections.Counter)
    background: collections.Counter[int] = field(default_factory=collections.Counter)
    background_uniques: dict[int, set[str]] = field(
        default_factory=lambda: collections.defaultdict(set)
    )
    background_args: dict[int, Any] = field(default_factory=dict)


def make_worker(addresses: list[str], gate: Gate, executions: Executions) -> Worker:
    worker = Worker(
        addresses,
        concurrency=WORKER_CONCURRENCY,
        client_id="failover-worker",
        grace_period=2,
    )

    @worker.function(TRANSFORM)
    async def transform(job):
        await gate.wait()
        n = job.arg["n"]
        executions.foreground[n] += 1
        await anyio.sleep((n % 3) / 1000)  # a little work time: jobs are running when killed
        return expected_result(n)

    @worker.function(RECORD)
    async def record(job):
        await gate.wait()
        n = job.arg["n"]
        executions.background[n] += 1
        executions.background_uniques[n].add(job.unique)
        executions.background_args[n] = job.arg
        return None

    return worker


async def wait_for_registrations(addresses: list[str], functions: list[str]) -> None:
    """Until every server shows exactly one worker for each function."""

    async def registered() -> bool:
        for address in addresses:
            table = await anyio.to_thread.run_sync(servers.status, address)
            if any(table.get(name, (0, 0, 0))[2] != 1 for name in functions):
                return False
        return True

    await eventually(registered)


async def queued_jobs(address: str, functions: list[str]) -> int:
    """Jobs the server holds (queued or running) for the functions, from admin `status`."""
    try:
        table = await anyio.to_thread.run_sync(servers.status, address)
    except OSError:
        return 0
    return sum(table.get(name, (0, 0, 0))[0] for name in functions)


async def pile_up_then_kill(
    server: servers.Server, gate: Gate, functions: list[str], backlog_wanted: int
) -> int:
    """Pause the worker, wait for `backlog_wanted` jobs on `server` (at most BACKLOG_WAIT s),
    SIGKILL it, resume the worker. Returns the jobs it held just before the kill."""
    gate.close()
    try:
        backlog = 0
        with anyio.move_on_after(BACKLOG_WAIT):
            while (backlog := await queued_jobs(server.address, functions)) < backlog_wanted:
                await anyio.sleep(0.01)
        kill(server)
    finally:
        gate.open()
    return backlog


def incarnation(handle: str) -> str:
    """`H:<host>:<port>:<stamp>` of a jobserver handle: which start of which server made it."""
    return handle.rsplit(":", 1)[0]


@dataclass
class Load:
    """Results of the calls, as the client saw them."""

    foreground_ok: int = 0
    wrong_results: list[str] = field(default_factory=list)
    failures: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter
    )  # ("foreground" or "background", exception type name) -> calls
    unexpected: list[str] = field(default_factory=list)
    handles: dict[int, JobHandle] = field(default_factory=dict)  # background n -> its handle
    finished: int = 0
    progress: anyio.Event | None = None

    def step(self) -> None:
        self.finished += 1
        if self.progress is not None:
            self.progress.set()

    async def until_finished(self, count: int) -> None:
        while self.finished < count:
            self.progress = anyio.Event()
            await self.progress.wait()


async def run_calls(
    calls: list[Callable[[], Awaitable[None]]], in_flight: int, per_second: float = math.inf
) -> None:
    """Run the calls in order, with at most `in_flight` in progress at once and, when given,
    starting at most `per_second` of them per second (no bursts to catch up after a stall)."""
    send, receive = anyio.create_memory_object_stream[Callable[[], Awaitable[None]]](math.inf)
    for call in calls:
        send.send_nowait(call)
    send.close()
    next_start = -math.inf

    async def runner() -> None:
        nonlocal next_start
        async for call in receive:
            due = max(anyio.current_time(), next_start)
            next_start = due + 1 / per_second
            await anyio.sleep_until(due)
            await call()

    async with anyio.create_task_group() as nursery:
        for _ in range(in_flight):
            nursery.start_soon(runner)


def load_calls(client: Client, load: Load) -> list[Callable[[], Awaitable[None]]]:
    """FOREGROUND_JOBS submits and BACKGROUND_JOBS submit_backgrounds, interleaved. Every
    other job has a unique id (server chosen by hashing), the rest spread round-robin."""

    def foreground(n: int) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            try:
                unique = f"fg-{n}" if n % 2 else None
                result = await client.submit(TRANSFORM, {"n": n}, unique=unique)
            except CLEAR_ERRORS as error:
                load.failures["foreground", type(error).__name__] += 1
            except Exception as error:
                load.unexpected.append(f"foreground {n}: {error!r}")
            else:
                if result == expected_result(n):
                    load.foreground_ok += 1
                else:
                    load.wrong_results.append(f"foreground {n}: {result!r}")
            finally:
                load.step()

        return call

    def background(n: int) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            try:
                unique = f"bg-{n}" if n % 2 else None
                priority = ("normal", "high", "low")[n % 3]
                handle = await client.submit_background(
                    RECORD, {"n": n}, unique=unique, priority=priority
                )
            except CLEAR_ERRORS as error:
                load.failures["background", type(error).__name__] += 1
            except Exception as error:
                load.unexpected.append(f"background {n}: {error!r}")
            else:
                load.handles[n] = handle
            finally:
                load.step()

        return call

    calls = [foreground(n) for n in range(FOREGROUND_JOBS)]
    calls += [background(n) for n in range(BACKGROUND_JOBS)]
    random.Random(3).shuffle(calls)
    return calls


async def test_cluster_survives_a_killed_and_restarted_server(start_jobserver, tmp_path):
    started = time.monotonic()
    cluster = [start_jobserver() for _ in range(3)]
    addresses = [server.address for server in cluster]
    doomed = cluster[1]
    functions = [TRANSFORM, RECORD]
    gate, executions, load = Gate(), Executions(), Load()
    worker = make_worker(addresses, gate, executions)
    total_calls = FOREGROUND_JOBS + BACKGROUND_JOBS
    timeline: dict[str, float] = {}
    killed_incarnations: set[str] = set()
    figures: dict[str, Any] = {}

    async def kill_then_restart() -> None:
        nonlocal doomed
        await load.until_finished(int(total_calls * KILL_AT))
        timeline["backlog_at_kill"] = await pile_up_then_kill(
            doomed, gate, functions, BACKLOG_AT_KILL
        )
        killed_at = time.monotonic()
        timeline["killed_at_calls"] = load.finished
        killed_incarnations.update(
            incarnation(h) for h in load.handles.values() if h.server == doomed.address
        )
        await anyio.sleep_until(anyio.current_time() + killed_at - time.monotonic() + DOWNTIME)
        doomed = await anyio.to_thread.run_sync(lambda: start_jobserver(port=doomed.port))
        timeline["downtime_s"] = round(time.monotonic() - killed_at, 2)
        timeline["restarted_at_calls"] = load.finished

    try:
        with anyio.fail_after(CLUSTER_TIMEOUT):
            async with anyio.create_task_group() as nursery:
                nursery.start_soon(worker.serve)
                await wait_for_registrations(addresses, functions)
                async with Client(addresses) as client, anyio.create_task_group() as chaos:
                    chaos.start_soon(kill_then_restart)
                    await run_calls(load_calls(client, load), IN_FLIGHT, CALLS_PER_SECOND)
                assert "restarted_at_calls" in timeline, "the load ended before the restart"
                assert len(killed_incarnations) == 1, killed_incarnations

                # Background jobs accepted by a server that was not killed must all run.
                must_run = {
                    n
                    for n, handle in load.handles.items()
                    if incarnation(handle) not in killed_incarnations
                }
                with anyio.move_on_after(REJOIN_TIMEOUT):
                    await eventually(lambda: _all_ran(must_run, executions))
                lost = sorted(n for n in must_run if executions.background[n] == 0)

                # The worker re-joined the restarted server by itself: jobs pinned to it run.
                await rejoin_check(doomed, executions)
                await wait_for_registrations(addresses, functions)  # once on each, no more
                worker.stop()

        accepted_by_killed = set(load.handles) - must_run
        by_restarted = {n for n in must_run if load.handles[n].server == doomed.address}
        figures = {
            "submitted": {
                "foreground": FOREGROUND_JOBS,
                "background": BACKGROUND_JOBS,
                "total": total_calls,
            },
            "completed": {
                "foreground": load.foreground_ok,
                "background": sum(1 for n in load.handles if executions.background[n]),
            },
            "failed_with_clear_error": {
                kind: {
                    error.__name__: load.failures[kind, error.__name__] for error in CLEAR_ERRORS
                }
                for kind in ("foreground", "background")
            },
            "background_accepted": {
                "by_survivors": len(must_run) - len(by_restarted),
                "by_the_restarted_server": len(by_restarted),
                "by_the_killed_server": len(accepted_by_killed),
            },
            "dropped_with_killed_server": sum(
                1 for n in accepted_by_killed if executions.background[n] == 0
            ),
            "background_duplicate_runs": sum(
                count - 1 for count in executions.background.values() if count > 1
            ),
            "lost": len(lost),
            "wrong_results": len(load.wrong_results),
            "unexpected_errors": len(load.unexpected),
            **timeline,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        if not figures:  # failed or timed out: show how far it got
            figures = {
                "finished_calls": load.finished,
                "foreground_ok": load.foreground_ok,
                "failures": {" ".join(key): count for key, count in load.failures.items()},
                "unexpected": load.unexpected[:5],
                **timeline,
            }
        print(f"\ncluster failover figures: {json.dumps(figures)}")
        if "lost" in figures:
            print(summary_line(figures))
        (tmp_path / "cluster_failover_figures.json").write_text(json.dumps(figures, indent=2))

    assert load.unexpected == [], load.unexpected[:10]
    assert load.wrong_results == [], load.wrong_results[:10]
    assert lost == [], f"background jobs accepted by a live server never ran: {lost[:20]}"
    assert figures["lost"] == 0
    failed = sum(load.failures.values())
    assert load.foreground_ok + failed + len(load.handles) == total_calls  # every call accounted
    for n in load.handles:  # each background job ran with its own argument and unique id
        if executions.background[n]:
            assert executions.background_args[n] == {"n": n}
            expected_unique = {f"bg-{n}"} if n % 2 else None
            if expected_unique is not None:
                assert executions.background_uniques[n] == expected_unique
            else:
                assert all(len(u) == 32 for u in executions.background_uniques[n]), (
                    "a generated unique id (uuid4 hex)"
                )
    assert timeline["backlog_at_kill"] > 0, "the kill found no jobs on the doomed server"
    # The client went back to the restarted server during the load, by itself.
    assert figures["background_accepted"]["by_the_restarted_server"] > 0


def summary_line(figures: dict[str, Any]) -> str:
    submitted, completed = figures["submitted"], figures["completed"]
    by_kind = figures["failed_with_clear_error"]
    failed = {
        error: by_kind["foreground"][error] + by_kind["background"][error]
        for error in by_kind["foreground"]
    }
    return (
        f"cluster failover: submitted {submitted['total']} "
        f"({submitted['foreground']} foreground + {submitted['background']} background), "
        f"completed {completed['foreground'] + completed['background']} "
        f"({completed['foreground']} + {completed['background']}), "
        f"failed with a clear error {sum(failed.values())} "
        f"({', '.join(f'{name} {count}' for name, count in failed.items())}), "
        f"dropped with the killed server's memory {figures['dropped_with_killed_server']}, "
        f"lost {figures['lost']}"
    )


async def _all_ran(numbers: set[int], executions: Executions) -> bool:
    return all(executions.background[n] for n in numbers)


async def rejoin_check(restarted: servers.Server, executions: Executions) -> None:
    """Foreground and background jobs submitted to the restarted server alone complete: the
    worker connected to it again and registered its functions without any help."""
    with anyio.fail_after(REJOIN_TIMEOUT):
        async with Client([restarted.address]) as pinned:
            results: dict[int, Any] = {}
            first = FOREGROUND_JOBS + BACKGROUND_JOBS  # numbers the load never used

            async def one(n: int) -> None:
                results[n] = await pinned.submit(TRANSFORM, {"n": n})

            async with anyio.create_task_group() as nursery:
                for n in range(first, first + 20):
                    nursery.start_soon(one, n)
            assert results == {n: expected_result(n) for n in range(first, first + 20)}
            handles = [
                await pinned.submit_background(RECORD, {"n": n}, unique=f"rejoin-{n}")
                for n in range(first, first + 5)
            ]
            assert {handle.server for handle in handles} == {restarted.address}
            await eventually(lambda: _all_ran(set(range(first, first + 5)), executions))


# --- coalescing across the cluster ------------------------------------------------------------


@pytest.mark.parametrize("first_choice_down", [False, True], ids=["all-up", "first-choice-down"])
async def test_duplicates_coalesce_across_the_cluster(start_jobserver, first_choice_down):
    """Three clients, each listing the servers in a different order, submit the same uniques;
    every unique runs once and every caller gets its result. With one server down, the uniques
    that hash to it all move to the same fallback, and still coalesce there."""
    with anyio.fail_after(TEST_TIMEOUT):
        cluster = [start_jobserver() for _ in range(3)]
        addresses = [server.address for server in cluster]
        by_address = {server.address: server for server in cluster}
        uniques = [f"report-{n}" for n in range(12)]
        down = None
        if first_choice_down:
            # The first choice of the first unique goes down, so that unique must fall back.
            down = rendezvous_order(b"coalesced", uniques[0].encode(), addresses)[0]
            kill(by_address[down])
        live = [address for address in addresses if address != down]
        holder = {
            unique: next(
                address
                for address in rendezvous_order(b"coalesced", unique.encode(), addresses)
                if address != down
            )
            for unique in uniques
        }

        release = anyio.Event()
        runs: collections.Counter[str] = collections.Counter()
        worker = Worker(addresses, concurrency=4, client_id="coalescing-worker")

        @worker.function("coalesced")
        async def coalesced(job):
            runs[job.unique] += 1
            await release.wait()
            return {"unique": job.unique, "arg": job.arg}

        orders = [addresses, addresses[::-1], [addresses[1], addresses[2], addresses[0]]]
        results: dict[tuple[int, str], Any] = {}
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(worker.serve)
            await wait_for_registrations(live, ["coalesced"])
            async with Client(orders[0]) as a, Client(orders[1]) as b, Client(orders[2]) as c:

                async def submit(index: int, client: Client, unique: str) -> None:
                    results[index, unique] = await client.submit(
                        "coalesced", {"from": index}, unique=unique
                    )

                async with anyio.create_task_group() as submits:
                    for index, client in enumerate((a, b, c)):
                        for unique in uniques:
                            submits.start_soon(submit, index, client, unique)

                    async def all_attached() -> bool:
                        for unique in uniques:
                            server = by_address[holder[unique]]
                            if await listeners_of_unique(server, unique.encode()) != 3:
                                return False
                        return True

                    await eventually(all_attached)
                    release.set()
            worker.stop()

        assert runs == {unique: 1 for unique in uniques}
        assert len(results) == 3 * len(uniques)
        for (_, unique), result in results.items():
            # All three callers got the one execution's result (its argument is the first
            # submitter's, whichever client that was).
            assert result["unique"] == unique
            assert result["arg"]["from"] in (0, 1, 2)
            assert len({results[i, unique]["arg"]["from"] for i in range(3)}) == 1


# --- retry=True through a kill ----------------------------------------------------------------

RETRY_JOBS = 300


async def test_retry_gives_every_foreground_job_its_result_through_a_kill(start_jobserver):
    with anyio.fail_after(TEST_TIMEOUT):
        cluster = [start_jobserver() for _ in range(3)]
        addresses = [server.address for server in cluster]
        doomed = cluster[0]
        gate, executions, load = Gate(), Executions(), Load()
        worker = make_worker(addresses, gate, executions)
        results: dict[int, Any] = {}
        backlog_at_kill = 0

        def call(n: int) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                unique = f"retry-{n}" if n % 2 else None
                results[n] = await client.submit(TRANSFORM, {"n": n}, unique=unique, retry=True)
                load.step()

            return run

        async def kill_midway() -> None:
            nonlocal backlog_at_kill
            await load.until_finished(RETRY_JOBS // 2)
            backlog_at_kill = await pile_up_then_kill(doomed, gate, [TRANSFORM], 5)

        async with anyio.create_task_group() as nursery:
            nursery.start_soon(worker.serve)
            await wait_for_registrations(addresses, [TRANSFORM])
            async with Client(addresses) as client, anyio.create_task_group() as chaos:
                chaos.start_soon(kill_midway)
                await run_calls([call(n) for n in range(RETRY_JOBS)], IN_FLIGHT)
            worker.stop()

        assert results == {n: expected_result(n) for n in range(RETRY_JOBS)}
        # The kill took jobs with it (the worker was paused, so they were still queued or
        # running there): those are the ones retry=True resubmitted.
        assert backlog_at_kill > 0
        assert sum(executions.foreground.values()) >= RETRY_JOBS
        print(
            f"\nretry run: {RETRY_JOBS} foreground jobs, all right; {backlog_at_kill} held by the "
            f"killed server; {sum(executions.foreground.values())} executions"
        )
