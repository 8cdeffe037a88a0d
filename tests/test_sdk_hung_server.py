"""A server that hangs (SIGSTOP: it still accepts connections and its kernel acknowledges bytes,
but it answers nothing) must not stall the cluster: the SDKs notice it within seconds and send
new work elsewhere; when it wakes up (SIGCONT) it gets work again.

Three real jobservers; one is frozen by pid for FREEZE_SECONDS and always thawed in `finally`.
Nothing here asserts a duration (the machine is shared and noisy): the tests assert behaviour
(calls complete on the healthy servers during the freeze, none is lost, every caller gets its own
result) and print the figures (`pytest -s`): throughput before, during and after the freeze,
and how long detection took.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.abc
import pytest
import servers

from client_sdk import Client
from worker_sdk import Worker

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

CALLERS = 20
"""Concurrent foreground callers, as in the issue's measurement."""

PHASE_SECONDS = 3.0
"""Length of each measured window (before, during, after)."""

SETTLE_SECONDS = 5.0
"""The 'during' window starts this long after the freeze: the issue's bound for detection."""

TEST_TIMEOUT = 90.0
"""Whole-test bound: the phases take about 15 s; the rest is slack for a loaded machine."""

MAX_CALLS_PER_CALLER = 1_000_000
"""Loop guard for a caller; the phases end it long before."""


@contextmanager
def frozen(server: servers.Server) -> Iterator[None]:
    """SIGSTOP the server's process (ours, by pid) for the block; SIGCONT whatever happens."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def three_servers(start_jobserver) -> list[servers.Server]:
    return [start_jobserver() for _ in range(3)]


async def test_client_sends_new_calls_past_a_frozen_server(start_jobserver):
    cluster = three_servers(start_jobserver)
    addresses = [server.address for server in cluster]
    worker = Worker(addresses, concurrency=64, codec="raw")

    @worker.function("echo")
    async def echo(job):
        return job.payload

    completed: list[float] = []  # completion times of every call
    wrong: list[tuple[bytes, bytes]] = []
    issued = 0
    stop_calling = anyio.Event()

    async def caller(client: Client, number: int) -> None:
        nonlocal issued
        for count in range(MAX_CALLS_PER_CALLER):
            if stop_calling.is_set():
                return
            payload = f"{number}:{count}".encode()
            issued += 1
            result = await client.submit("echo", payload)
            if result != payload:
                wrong.append((payload, result))
            completed.append(anyio.current_time())

    def rate(start: float, end: float) -> float:
        return sum(1 for t in completed if start <= t < end) / (end - start)

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.serve)
            async with Client(addresses, codec="raw") as client, anyio.create_task_group() as calls:
                for number in range(CALLERS):
                    calls.start_soon(caller, client, number)
                await anyio.sleep(1.0)  # warm up: connections open, worker registered
                before_start = anyio.current_time()
                await anyio.sleep(PHASE_SECONDS)
                frozen_server = client._pool.server(str(cluster[0].address))
                with frozen(cluster[0]):
                    freeze_at = anyio.current_time()
                    detected_at = None
                    while anyio.current_time() - freeze_at < SETTLE_SECONDS + PHASE_SECONDS:
                        if detected_at is None and frozen_server.unresponsive:
                            detected_at = anyio.current_time()
                        await anyio.sleep(0.05)
                    during_done = len(completed)
                thaw_at = anyio.current_time()
                await anyio.sleep(1.0 + PHASE_SECONDS)
                stop_calling.set()
            worker.stop()
    before = rate(before_start, freeze_at)
    during = rate(freeze_at + SETTLE_SECONDS, freeze_at + SETTLE_SECONDS + PHASE_SECONDS)
    after = rate(thaw_at + 1.0, thaw_at + 1.0 + PHASE_SECONDS)
    detection = "never" if detected_at is None else f"{detected_at - freeze_at:.2f} s"
    print(
        f"\nclient, {CALLERS} callers, 1 of 3 servers frozen: before {before:.0f}/s, "
        f"during (from {SETTLE_SECONDS:g} s after the freeze) {during:.0f}/s "
        f"({during / before:.0%}), after {after:.0f}/s; detection {detection}"
    )
    assert detected_at is not None
    assert during > 0 and during_done > 0  # new calls completed on the healthy servers
    assert not wrong
    assert len(completed) == issued  # none lost: every call returned once the server thawed


async def test_worker_keeps_serving_healthy_servers_while_an_idle_one_is_frozen(
    start_jobserver, caplog
):
    cluster = three_servers(start_jobserver)
    worker = Worker([server.address for server in cluster], concurrency=1, codec="raw")
    done: list[float] = []

    @worker.function("work")
    async def work(job):
        await anyio.sleep(0.005)
        done.append(anyio.current_time())
        return b""

    def rate(start: float, end: float) -> float:
        return sum(1 for t in done if start <= t < end) / (end - start)

    healthy = [server.address for server in cluster[1:]]  # the frozen one gets no jobs
    stop_calling = anyio.Event()

    async def caller(client: Client) -> None:
        for _ in range(MAX_CALLS_PER_CALLER):
            if stop_calling.is_set():
                return
            await client.submit("work", b"")

    caplog.set_level("INFO", logger="worker_sdk")
    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.serve)
            async with Client(healthy, codec="raw") as client, anyio.create_task_group() as calls:
                for _ in range(4):
                    calls.start_soon(caller, client)
                await anyio.sleep(1.0)
                before_start = anyio.current_time()
                await anyio.sleep(PHASE_SECONDS)
                with frozen(cluster[0]):
                    freeze_at = anyio.current_time()
                    await anyio.sleep(SETTLE_SECONDS + PHASE_SECONDS)
                    during_done = sum(1 for t in done if t >= freeze_at)
                thaw_at = anyio.current_time()
                await anyio.sleep(1.0 + PHASE_SECONDS)
                stop_calling.set()
            worker.stop()
    before = rate(before_start, freeze_at)
    during = rate(freeze_at + SETTLE_SECONDS, freeze_at + SETTLE_SECONDS + PHASE_SECONDS)
    during_all = rate(freeze_at, thaw_at)
    after = rate(thaw_at + 1.0, thaw_at + 1.0 + PHASE_SECONDS)
    print(
        f"\nworker, concurrency=1, 1 of 3 servers frozen (idle): before {before:.0f}/s, "
        f"during the whole freeze {during_all:.0f}/s ({during_all / before:.0%}), "
        f"from {SETTLE_SECONDS:g} s in {during:.0f}/s ({during / before:.0%}), "
        f"after {after:.0f}/s"
    )
    assert during_done > 0
    messages = [record.getMessage() for record in caplog.records]
    frozen_name = str(cluster[0].address)
    assert any("not responding" in m and frozen_name in m for m in messages)
    assert any(m.startswith(f"{frozen_name} is back") for m in messages)
