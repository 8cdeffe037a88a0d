"""Client SDK against one real server: results, updates, failures, uniques, timeouts, priorities.

Every test runs against jobserver and gearmand 1.1.20 (`any_server`), with the small raw worker
of test_client_sdk_support (no dependency on worker_sdk).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import msgpack
import pytest
from test_client_sdk_support import (
    RawWorker,
    WorkerJob,
    admin,
    echo,
    eventually,
    listeners_of_unique,
    server_status,
    workers_running,
)

from client_sdk import (
    Client,
    Data,
    JobException,
    JobFailed,
    JobHandle,
    JobStatus,
    JobTimeout,
    PayloadError,
    ServerError,
    Status,
    Warning,
)

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

TEST_TIMEOUT = 20


async def progress(job: WorkerJob) -> bytes:
    await job.status(1, 3)
    await job.data(b"first")
    await job.warning(b"careful")
    await job.status(2, 3)
    await job.data(b"second\0with NUL")
    await job.status(3, 3)
    return job.payload


async def failing(job: WorkerJob) -> None:
    await job.fail()


async def raising(job: WorkerJob) -> None:
    await job.exception(b"ValueError: path 'a.png' does not exist")


@pytest.mark.parametrize(
    ("codec", "arg"),
    [
        ("msgpack", {"path": "a.png", "sizes": [1, 2.5, None, True], "blob": b"\0\xff"}),
        ("json", {"path": "a.png", "sizes": [1, 2.5, None, True], "name": "ünïcode"}),
        ("raw", b"bytes \0 with NUL \xff"),
    ],
)
async def test_foreground_result_round_trips_with_each_codec(any_server, codec, arg):
    with anyio.fail_after(TEST_TIMEOUT):
        worker = RawWorker(any_server, {"echo": echo})
        async with workers_running(worker), Client([any_server.address], codec=codec) as client:
            assert await client.submit("echo", arg) == arg


async def test_raw_codec_sends_str_as_utf8_and_returns_bytes(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with (
            workers_running(RawWorker(any_server, {"echo": echo})),
            Client([any_server.address], codec="raw") as client,
        ):
            assert await client.submit("echo", "héllo") == "héllo".encode()
            assert await client.submit("echo") == b""


@pytest.mark.parametrize("priority", ["high", "normal", "low"])
async def test_foreground_job_of_each_priority_returns_its_result(any_server, priority):
    with anyio.fail_after(TEST_TIMEOUT):
        async with (
            workers_running(RawWorker(any_server, {"echo": echo})),
            Client([any_server.address]) as client,
        ):
            assert await client.submit("echo", priority, priority=priority) == priority


async def test_background_jobs_run_by_priority_high_normal_low(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([any_server.address], codec="raw") as client:
            for n in (1, 2):  # interleaved, as in shared doc §3.3
                for priority in ("low", "normal", "high"):
                    await client.submit_background("order", f"{priority}{n}", priority=priority)
            worker = RawWorker(any_server, {"order": echo})
            async with workers_running(worker):
                await eventually(lambda: _done(worker, 6))
            assert [job.payload for job in worker.executed] == [
                b"high1",
                b"high2",
                b"normal1",
                b"normal2",
                b"low1",
                b"low2",
            ]


async def _done(worker: RawWorker, count: int) -> bool:
    return len(worker.executed) >= count


async def test_background_job_status_follows_it_from_queued_to_finished(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        release = anyio.Event()

        async def slow(job: WorkerJob) -> bytes:
            await job.status(1, 4)
            await release.wait()
            return b"done"

        async with Client([any_server.address]) as client:
            handle = await client.submit_background("slow", {"n": 1})
            assert isinstance(handle, JobHandle)
            assert handle.server == any_server.address
            assert await client.status(handle) == JobStatus(True, False, 0, 0)

            worker = RawWorker(any_server, {"slow": slow})
            async with workers_running(worker):
                running = await eventually(lambda: _status_if(client, handle, numerator=1))
                assert running == JobStatus(True, True, 1, 4)
                # A plain str asks the servers in turn.
                assert await client.status(str(handle)) == JobStatus(True, True, 1, 4)
                release.set()
                await eventually(lambda: _status_if(client, handle, known=False))
            assert await client.status(handle) == JobStatus(False, False, 0, 0)


async def _status_if(client: Client, handle: str, **expected: object) -> JobStatus | None:
    status = await client.status(handle)
    return status if all(getattr(status, k) == v for k, v in expected.items()) else None


async def test_background_job_without_unique_gets_a_generated_one(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        worker = RawWorker(any_server, {"echo": echo})
        async with workers_running(worker), Client([any_server.address]) as client:
            await client.submit_background("echo", 1)
            await client.submit_background("echo", 2)
            await client.submit_background("echo", 3, unique="mine")
            await eventually(lambda: _done(worker, 3))
        generated = [job.unique for job in worker.executed[:2]]
        assert all(len(unique) == 32 and int(unique, 16) >= 0 for unique in generated)
        assert generated[0] != generated[1]
        assert worker.executed[2].unique == b"mine"


async def test_stream_yields_every_update_in_order_then_the_result(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with (
            workers_running(RawWorker(any_server, {"progress": progress})),
            Client([any_server.address]) as client,
        ):
            async with client.stream("progress", {"path": "a.png"}) as job:
                assert job.handle and job.handle.server == any_server.address
                updates = [update async for update in job]
            assert await job.result() == {"path": "a.png"}
        assert updates == [
            Status(1, 3),
            Data(b"first"),
            Warning(b"careful"),
            Status(2, 3),
            Data(b"second\0with NUL"),
            Status(3, 3),
        ]


async def test_stream_result_without_reading_updates(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with (
            workers_running(RawWorker(any_server, {"progress": progress})),
            Client([any_server.address], codec="raw") as client,
            client.stream("progress", b"x") as job,
        ):
            assert await job.result() == b"x"


async def test_plain_submit_ignores_updates_and_returns_the_result(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with (
            workers_running(RawWorker(any_server, {"progress": progress})),
            Client([any_server.address]) as client,
        ):
            assert await client.submit("progress", [1, 2]) == [1, 2]


async def test_work_fail_raises_job_failed(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with (
            workers_running(RawWorker(any_server, {"fail": failing})),
            Client([any_server.address]) as client,
        ):
            with pytest.raises(JobFailed) as caught:
                await client.submit("fail", 1)
        assert type(caught.value) is JobFailed
        assert caught.value.function == "fail"
        assert caught.value.handle in str(caught.value)


async def test_work_exception_raises_job_exception_with_the_worker_text(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with (
            workers_running(RawWorker(any_server, {"raise": raising})),
            Client([any_server.address]) as client,
        ):
            with pytest.raises(JobException) as caught:
                await client.submit("raise", 1)
            # The connection stays usable after the worker's extra WORK_FAIL.
            with pytest.raises(JobException):
                async with client.stream("raise", 2) as job:
                    assert [update async for update in job] == []
                    await job.result()
        assert caught.value.exception == "ValueError: path 'a.png' does not exist"
        assert "ValueError: path 'a.png' does not exist" in str(caught.value)


async def test_full_queue_raises_server_error_with_code_and_text(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([any_server.address]) as client:
            await client.submit_background("limited", 1)  # creates the function
            assert await admin(any_server, "maxqueue limited 1") == b"OK\r\n"
            with pytest.raises(ServerError) as caught:
                await client.submit_background("limited", 2)
            with pytest.raises(ServerError):
                await client.submit("limited", 3)
            # The ERROR replies were matched to their requests: the connection still works.
            handle = await client.submit_background("other", 4)
            assert (await client.status(handle)).known
        assert (caught.value.code, caught.value.text) == ("QUEUE_ERROR", "Job queue is full")


async def test_timeout_raises_job_timeout_and_a_late_result_is_dropped(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([any_server.address], codec="raw") as client:
            with pytest.raises(JobTimeout) as caught:
                await client.submit("late", b"first", timeout=0.2)
            assert caught.value.handle and caught.value.handle in str(caught.value)
            session = client._pool.servers[0].session
            assert session.waiting_calls == 0

            # A worker now runs the abandoned job; its result has nobody to go to.
            worker = RawWorker(any_server, {"late": echo})
            async with workers_running(worker):
                assert await client.submit("late", b"second") == b"second"
                await eventually(lambda: _done(worker, 2))
                await eventually(lambda: _no_jobs_tracked(session))
            assert [job.payload for job in worker.executed] == [b"first", b"second"]
            assert client._pool.servers[0].session is session  # the same connection throughout


async def _no_jobs_tracked(session) -> bool:
    await anyio.sleep(0)
    return session.tracked_jobs == 0 and session.waiting_calls == 0


async def test_stream_timeout_raises_job_timeout(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([any_server.address]) as client:
            with pytest.raises(JobTimeout):
                async with client.stream("nobody", 1, timeout=0.2) as job:
                    async for _ in job:
                        pass
            assert client._pool.servers[0].session.waiting_calls == 0


async def test_background_timeout_covers_only_the_acceptance(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([any_server.address]) as client:
            handle = await client.submit_background("nobody", 1, timeout=5)
            assert (await client.status(handle)).known


async def test_concurrent_submits_with_one_unique_run_once_and_all_get_the_result(any_server):
    with anyio.fail_after(TEST_TIMEOUT):
        results = []
        async with Client([any_server.address]) as client:

            async def submit(arg: str) -> None:
                results.append(await client.submit("once", arg, unique="same"))

            async with anyio.create_task_group() as nursery:
                nursery.start_soon(submit, "from the first")
                nursery.start_soon(submit, "from the second")
                # Both submits are attached to one queued job before a worker appears.
                await eventually(lambda: _listeners_are(any_server, b"same", 2))
                worker = RawWorker(any_server, {"once": echo})
                await nursery.start(worker.run)
                await eventually(lambda: _count_is(results, 2))
                nursery.cancel_scope.cancel()
        assert len(worker.executed) == 1
        # One job ran, with the payload of whichever submit reached the server first.
        assert results[0] == results[1] == msgpack.unpackb(worker.executed[0].payload)


async def _listeners_are(server, unique: bytes, count: int) -> bool:
    return await listeners_of_unique(server, unique) == count


async def _count_is(items: list, count: int) -> bool:
    return len(items) >= count


async def test_coalesced_streams_on_one_connection_each_see_every_update_once(any_server):
    # The server sends each packet once per submit on the connection (§3.2); the client must
    # hand one copy to each waiting call, not two to one.
    with anyio.fail_after(TEST_TIMEOUT):
        seen: dict[int, list] = {}
        async with Client([any_server.address], codec="raw") as client:

            async def watch(n: int) -> None:
                async with client.stream("steps", b"x", unique="shared") as job:
                    seen[n] = [update async for update in job]
                seen[n].append(await job.result())

            async with anyio.create_task_group() as nursery:
                nursery.start_soon(watch, 1)
                nursery.start_soon(watch, 2)
                await eventually(lambda: _listeners_are(any_server, b"shared", 2))
                worker = RawWorker(any_server, {"steps": progress})
                await nursery.start(worker.run)
                await eventually(lambda: _count_is(list(seen.values()), 2))
                await eventually(lambda: _all_done(seen))
                nursery.cancel_scope.cancel()
        expected = [
            Status(1, 3),
            Data(b"first"),
            Warning(b"careful"),
            Status(2, 3),
            Data(b"second\0with NUL"),
            Status(3, 3),
            b"x",
        ]
        assert seen == {1: expected, 2: expected}
        assert len(worker.executed) == 1


async def _all_done(seen: dict) -> bool:
    await anyio.sleep(0)
    return all(items and isinstance(items[-1], bytes) for items in seen.values())


async def test_200_concurrent_submits_pipeline_over_one_connection(any_server):
    with anyio.fail_after(TEST_TIMEOUT * 2):
        workers = [RawWorker(any_server, {"echo": echo}) for _ in range(4)]
        results: dict[int, object] = {}
        async with workers_running(*workers), Client([any_server.address]) as client:

            async def submit(n: int) -> None:
                results[n] = await client.submit("echo", {"n": n, "pad": "x" * n})

            async with anyio.create_task_group() as nursery:
                for n in range(200):
                    nursery.start_soon(submit, n)
            session = client._pool.servers[0].session
            assert session.waiting_calls == 0
            client_connections = await _client_connections(any_server)
        assert results == {n: {"n": n, "pad": "x" * n} for n in range(200)}
        assert sum(len(worker.executed) for worker in workers) == 200
        assert client_connections == 1


async def _client_connections(server) -> int:
    """Connections other than the test workers and the admin connection asking."""
    lines = (await admin(server, "workers")).decode().splitlines()
    others = [line for line in lines if line != "." and "client-sdk-test-worker" not in line]
    return len(others) - 1


async def test_result_that_is_not_valid_for_the_codec_raises_payload_error(any_server):
    async def garbage(job: WorkerJob) -> bytes:
        return b"\xc1 is never valid msgpack"

    with anyio.fail_after(TEST_TIMEOUT):
        async with (
            workers_running(RawWorker(any_server, {"garbage": garbage})),
            Client([any_server.address]) as client,
        ):
            with pytest.raises(PayloadError, match=r"'garbage'.*msgpack"):
                await client.submit("garbage", 1)
            assert await client.submit_background("garbage", 2)  # connection unaffected


async def test_run_at_job_runs_once_due(any_server):
    # gearmand 1.1.x never wakes workers when an epoch job comes due (§3.11): the raw worker
    # polls there. jobserver wakes the sleeping worker itself (next test).
    with anyio.fail_after(TEST_TIMEOUT):
        worker = RawWorker(any_server, {"later": echo})
        run_at = datetime.now(UTC) + timedelta(seconds=1.5)
        async with workers_running(worker), Client([any_server.address], codec="raw") as client:
            handle = await client.submit_background("later", b"due", run_at=run_at)
            assert (await client.status(handle)).known
            await eventually(lambda: _done(worker, 1))
            ran_at = datetime.now(UTC)
        assert worker.executed[0].payload == b"due"
        # The epoch has whole seconds: the job may run up to 1 s before run_at, never earlier.
        assert ran_at >= run_at - timedelta(seconds=1)


async def test_run_at_wakes_a_sleeping_worker_on_jobserver(jobserver):
    with anyio.fail_after(TEST_TIMEOUT):
        worker = RawWorker(jobserver, {"later": echo}, poll=None)  # sleeps until NOOP
        run_at = datetime.now() + timedelta(seconds=1.5)  # naive: local time
        async with workers_running(worker), Client([jobserver.address], codec="raw") as client:
            await client.submit_background("later", b"due", run_at=run_at)
            assert await server_status(jobserver) == {"later": (1, 0, 1)}
            await eventually(lambda: _done(worker, 1))
            ran_at = datetime.now()
        assert ran_at >= run_at - timedelta(seconds=1)
