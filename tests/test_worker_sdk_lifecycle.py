"""Worker SDK life cycle against real servers: concurrency, several servers, a server killed and
restarted, graceful stop (jobs in flight finish; past the grace period they are cancelled and
requeued), stop from other threads.

Overlap is measured with events and the servers' own `status` counts, never with timing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest
import servers
from worker_sdk_helpers import (
    TEST_TIMEOUT,
    Client,
    admin,
    serving,
    status,
    submit_background,
    wait_for_status,
    wait_for_workers,
)

from jobserver.protocol import PacketType as T
from worker_sdk import Worker, server_session

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)


@pytest.fixture(params=["jobserver", "gearmand"])
def start_server(request):
    """A factory for servers of one kind, so a test can run several (and restart them)."""
    return request.getfixturevalue(f"start_{request.param}")


class Overlap:
    """Counts jobs running at once; `reached` is set when `target` run together."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.running = 0
        self.peak = 0
        self.finished = 0
        self.reached = anyio.Event()
        self.release = anyio.Event()

    async def hold(self, job) -> bytes:
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self.running == self.target:
            self.reached.set()
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        self.finished += 1
        return b"ok"


async def test_concurrency_three_runs_three_jobs_at_once_and_never_more(any_server):
    worker = Worker([any_server.address], concurrency=3, codec="raw")
    overlap = Overlap(3)
    worker.function("hold")(overlap.hold)
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "hold")
            for n in range(7):
                await submit_background(any_server, "hold", b"%d" % n)
            await overlap.reached.wait()
            # The worker holds 3 and has not grabbed a 4th: it takes a slot before each GRAB.
            assert (await status(any_server))["hold"] == (7, 3, 1)
            overlap.release.set()
            await wait_for_status(any_server, "hold", (0, 0, 1))
    assert overlap.finished == 7
    assert overlap.peak == 3


async def test_sleeping_worker_is_woken_by_noop(any_server, monkeypatch, caplog):
    """PRE_SLEEP, then NOOP when a job arrives (§3.4): with the poll safety net pushed out of
    reach, only the NOOP can get the job served."""
    monkeypatch.setattr(server_session, "POLL_INTERVAL", 3600)
    worker = Worker([any_server.address], codec="raw")

    @worker.function("wake")
    async def wake(job):
        return b"awake"

    caplog.set_level(logging.DEBUG, logger="worker_sdk")
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            while not any("asleep until a NOOP" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.02)
            client = await Client.connect(any_server)
            done = await client.run("wake")
    assert done.args[1] == b"awake"


async def test_epoch_job_coming_due_is_run_without_a_wake_up(any_server):
    """gearmand 1.1.x never wakes a sleeping worker when an epoch job comes due (§3.11): the
    worker's poll safety net (server_session.POLL_INTERVAL) grabs it anyway."""
    worker = Worker([any_server.address], codec="raw")
    ran = anyio.Event()

    @worker.function("later")
    async def later(job):
        ran.set()
        return b""

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "later")
            client = await Client.connect(any_server)
            due = str(int(time.time()) + 2).encode()
            await client.call(client.wire.send, T.SUBMIT_JOB_EPOCH, b"later", b"e-1", due, b"")
            await client.call(client.wire.expect, T.JOB_CREATED)
            await ran.wait()


async def test_concurrency_is_shared_by_all_servers(start_server):
    first, second = start_server(), start_server()
    worker = Worker([first.address, second.address], concurrency=2, codec="raw")
    overlap = Overlap(2)
    worker.function("hold")(overlap.hold)
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(first, "hold")
            await wait_for_workers(second, "hold")
            for server in (first, second, first, second):
                await submit_background(server, "hold")
            await overlap.reached.wait()
            running = (await status(first))["hold"][1] + (await status(second))["hold"][1]
            # Two run; a GRAB holds no slot, so the other server may have assigned one more
            # that waits for a slot (server_session.py); never more than one per extra server.
            assert 2 <= running <= 3
            overlap.release.set()
            await wait_for_status(first, "hold", (0, 0, 1))
            await wait_for_status(second, "hold", (0, 0, 1))
    assert overlap.finished == 4
    assert overlap.peak == 2


async def test_jobs_from_every_server_are_served(start_server):
    cluster = [start_server(), start_server(), start_server()]
    worker = Worker([server.address for server in cluster], codec="raw")

    @worker.function("whoami")
    async def whoami(job):
        return job.payload

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            results = []
            for server in cluster:
                await wait_for_workers(server, "whoami")
                client = await Client.connect(server)
                results.append(await client.run("whoami", server.address.encode()))
    assert [(r.type, r.args[1]) for r in results] == [
        (T.WORK_COMPLETE, server.address.encode()) for server in cluster
    ]


async def test_killed_server_is_rejoined_after_restart_while_the_others_keep_serving(
    start_server, caplog
):
    doomed, steady = start_server(), start_server()
    worker = Worker([doomed.address, steady.address], codec="raw", client_id="phoenix")

    @worker.function("echo", timeout=60)
    async def echo(job):
        return job.payload

    @worker.function("other")
    async def other(job):
        return b""

    caplog.set_level(logging.INFO, logger="worker_sdk")
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(doomed, "echo")
            await wait_for_workers(steady, "echo")
            os.kill(doomed.pid, signal.SIGKILL)
            await anyio.to_thread.run_sync(doomed.proc.wait)

            client = await Client.connect(steady)
            during = await client.run("echo", b"while one is down")

            reborn = start_server(port=doomed.port)
            await wait_for_workers(reborn, "echo")  # the worker came back by itself
            await wait_for_workers(reborn, "other")
            workers = await admin(reborn, "workers")
            client = await Client.connect(reborn)
            after = await client.run("echo", b"after the restart")
    assert during.args[1] == b"while one is down"
    assert after.args[1] == b"after the restart"
    assert any(r.getMessage() == f"re-joined {doomed.address}" for r in caplog.records)
    (line,) = [line for line in workers.splitlines() if " phoenix :" in line]
    assert sorted(line.split(" : ")[1].split()) == ["echo", "other"]


async def test_server_down_at_start_is_joined_when_it_comes_up(start_server):
    up = start_server()
    later_port = servers.free_port()
    worker = Worker([f"127.0.0.1:{later_port}", up.address], codec="raw")

    @worker.function("echo")
    async def echo(job):
        return job.payload

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(up, "echo")
            client = await Client.connect(up)
            first = await client.run("echo", b"one server is enough")
            later = start_server(port=later_port)
            await wait_for_workers(later, "echo")
            client = await Client.connect(later)
            second = await client.run("echo", b"the other joined")
    assert first.args[1] == b"one server is enough"
    assert second.args[1] == b"the other joined"


async def test_job_whose_server_died_finishes_and_its_result_is_dropped(start_server, caplog):
    doomed, steady = start_server(), start_server()
    worker = Worker([doomed.address, steady.address], concurrency=2, codec="raw")
    started, release = anyio.Event(), anyio.Event()
    finished = []

    @worker.function("long")
    async def long(job):
        started.set()
        await release.wait()
        finished.append(job.handle)
        return b"too late"

    @worker.function("echo")
    async def echo(job):
        return job.payload

    caplog.set_level(logging.INFO, logger="worker_sdk")
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(doomed, "long")
            await wait_for_workers(steady, "echo")
            await submit_background(doomed, "long")
            await started.wait()
            os.kill(doomed.pid, signal.SIGKILL)
            while not any("retrying in" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.02)  # the session noticed the loss
            release.set()
            while not any("result are dropped" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.02)
            client = await Client.connect(steady)
            still = await client.run("echo", b"still serving")
    assert len(finished) == 1
    assert still.args[1] == b"still serving"


async def test_graceful_stop_finishes_the_job_in_flight_and_grabs_nothing_more(any_server, caplog):
    worker = Worker([any_server.address], concurrency=2, codec="raw")
    started, release = anyio.Event(), anyio.Event()
    calls = []

    @worker.function("work")
    async def work(job):
        calls.append(job.payload)
        started.set()
        await release.wait()
        return b"finished after stop"

    def naps() -> int:
        return sum("asleep until a NOOP" in r.getMessage() for r in caplog.records)

    caplog.set_level(logging.DEBUG, logger="worker_sdk")
    with anyio.fail_after(TEST_TIMEOUT):
        client = await Client.connect(any_server)
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(worker.serve)
            await wait_for_workers(any_server, "work")
            handle = await client.submit("work", b"first")
            await started.wait()
            # With its second slot free the worker grabs again at once; a job assigned to
            # that GRAB must run, stop or not. Stop once it was answered (NO_JOB, then asleep).
            asleep = naps()
            while naps() == asleep:
                await anyio.sleep(0.02)
            worker.stop()
            # A free slot, a queued job, and still no GRAB: the worker is stopping.
            await submit_background(any_server, "work", b"second")
            release.set()
            packets = await client.until_done(handle)
        # serve() returned: the job finished and the worker disconnected.
        assert (await status(any_server))["work"] == (1, 0, 0)
    assert [(p.type, p.args[1:]) for p in packets] == [(T.WORK_COMPLETE, (b"finished after stop",))]
    assert calls == [b"first"]


async def test_cancelling_serve_is_a_graceful_stop(any_server):
    worker = Worker([any_server.address], codec="raw")
    started, release = anyio.Event(), anyio.Event()

    @worker.function("work")
    async def work(job):
        started.set()
        await release.wait()
        return b"finished after cancel"

    async def serve_in_own_scope(task_status=anyio.TASK_STATUS_IGNORED):
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            await worker.serve()

    with anyio.fail_after(TEST_TIMEOUT):
        client = await Client.connect(any_server)
        async with anyio.create_task_group() as nursery:
            serve_scope = await nursery.start(serve_in_own_scope)
            await wait_for_workers(any_server, "work")
            handle = await client.submit("work")
            await started.wait()
            serve_scope.cancel()
            release.set()
            packets = await client.until_done(handle)
        await wait_for_status(any_server, "work", (0, 0, 0))
    assert [(p.type, p.args[1:]) for p in packets] == [
        (T.WORK_COMPLETE, (b"finished after cancel",))
    ]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_stop_past_the_grace_period_cancels_the_job_and_the_server_requeues_it(
    any_server, kind
):
    stopping = Worker([any_server.address], codec="raw", grace_period=0.2)
    started = anyio.Event()
    cancelled = []
    thread_release = threading.Event()

    if kind == "async":

        @stopping.function("stuck")
        async def stuck(job):
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.append(job.handle)
    else:

        @stopping.function("stuck")
        def stuck_sync(job):
            anyio.from_thread.run_sync(started.set)
            thread_release.wait(TEST_TIMEOUT)  # a thread cannot be cancelled; it is abandoned
            return b"never delivered"

    rescuer = Worker([any_server.address], codec="raw")

    @rescuer.function("stuck")
    async def unstuck(job):
        return b"done by the second worker"

    try:
        with anyio.fail_after(TEST_TIMEOUT):
            client = await Client.connect(any_server)
            async with anyio.create_task_group() as nursery:
                nursery.start_soon(stopping.serve)
                await wait_for_workers(any_server, "stuck")
                handle = await client.submit("stuck", b"x")
                await started.wait()
                stopping.stop()
            # serve() returned although the job never finished by itself.
            if kind == "async":
                assert cancelled == [handle.decode()]
            async with serving(rescuer):
                packets = await client.until_done(handle)
    finally:
        thread_release.set()
    assert [(p.type, p.args[1:]) for p in packets] == [
        (T.WORK_COMPLETE, (b"done by the second worker",))
    ]


async def test_stop_from_another_thread_ends_run(any_server):
    worker = Worker([any_server.address], codec="raw")

    @worker.function("echo")
    def echo(job):
        return job.payload

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as nursery:
            # run() in its own thread (its own trio run); stop() from this thread.
            nursery.start_soon(anyio.to_thread.run_sync, worker.run)
            await wait_for_workers(any_server, "echo")
            client = await Client.connect(any_server)
            done = await client.run("echo", b"threaded")
            await anyio.to_thread.run_sync(worker.stop)
        await wait_for_status(any_server, "echo", (0, 0, 0))
    assert done.args[1] == b"threaded"


async def test_stop_requested_before_serve_makes_serve_return_at_once(jobserver):
    worker = Worker([jobserver.address])

    @worker.function("noop")
    async def noop(job):
        return None

    worker.stop()
    with anyio.fail_after(TEST_TIMEOUT):
        await worker.serve()


def test_bad_configuration_is_refused_at_once():
    with pytest.raises(ValueError, match="port"):
        Worker(["127.0.0.1:0"])
    with pytest.raises(ValueError, match="concurrency"):
        Worker(["127.0.0.1:4730"], concurrency=0)
    with pytest.raises(ValueError, match="unknown codec"):
        Worker(["127.0.0.1:4730"], codec="pickle")
    worker = Worker(["127.0.0.1:4730"])
    with pytest.raises(ValueError, match="timeout"):
        worker.function("f", timeout=0)
    with pytest.raises(ValueError, match="NUL"):
        worker.function("a\0b")(lambda job: None)
    worker.function("f")(lambda job: None)
    with pytest.raises(ValueError, match="already registered"):
        worker.function("f")(lambda job: None)


async def test_serve_without_functions_is_an_error(jobserver):
    with pytest.raises(ValueError, match="no functions registered"):
        await Worker([jobserver.address]).serve()
