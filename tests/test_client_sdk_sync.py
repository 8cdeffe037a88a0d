"""SyncClient: the client SDK from plain threads, sharing one background trio loop.

The test workers run in the test's trio loop; every SyncClient call is made from threads
started with trio.to_thread / threading, as a script or a web app would.
"""

from __future__ import annotations

import threading

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest
from test_client_sdk_support import RawWorker, WorkerJob, echo, nothing_listening, workers_running

from client_sdk import (
    Data,
    JobFailed,
    JobStatus,
    JobTimeout,
    NoServerAvailable,
    Status,
    SyncClient,
)

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

TEST_TIMEOUT = 30
THREADS = 8
CALLS_PER_THREAD = 25


async def progress(job: WorkerJob) -> bytes:
    await job.status(1, 2)
    await job.data(b"half")
    await job.status(2, 2)
    return job.payload


async def failing(job: WorkerJob) -> None:
    await job.fail()


async def test_eight_threads_share_one_sync_client(any_server):
    def eight_threads() -> dict[int, list]:
        results: dict[int, list] = {}
        errors: list[BaseException] = []
        with SyncClient([any_server.address]) as client:

            def run(n: int) -> None:
                try:
                    results[n] = [
                        client.submit("echo", {"thread": n, "call": call})
                        for call in range(CALLS_PER_THREAD)
                    ]
                except BaseException as error:
                    errors.append(error)

            threads = [threading.Thread(target=run, args=(n,)) for n in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert errors == []
        return results

    with anyio.fail_after(TEST_TIMEOUT):
        workers = [RawWorker(any_server, {"echo": echo}) for _ in range(2)]
        async with workers_running(*workers):
            results = await anyio.to_thread.run_sync(eight_threads)
    assert results == {
        n: [{"thread": n, "call": call} for call in range(CALLS_PER_THREAD)] for n in range(THREADS)
    }


async def test_sync_client_background_status_and_stream(any_server):
    def use() -> tuple:
        with SyncClient([any_server.address], codec="raw") as client:
            handle = client.submit_background("nobody", b"queued")
            status = client.status(handle)
            with client.stream("progress", b"streamed") as job:
                updates = list(job)
                result = job.result()
        return handle, status, updates, result

    with anyio.fail_after(TEST_TIMEOUT):
        async with workers_running(RawWorker(any_server, {"progress": progress})):
            handle, status, updates, result = await anyio.to_thread.run_sync(use)
    assert handle.server == any_server.address
    assert status == JobStatus(True, False, 0, 0)
    assert updates == [Status(1, 2), Data(b"half"), Status(2, 2)]
    assert result == b"streamed"


async def test_sync_client_raises_the_same_exceptions(any_server):
    def use() -> list[type]:
        raised = []
        with SyncClient([any_server.address]) as client:
            for call in (
                lambda: client.submit("fail", 1),
                lambda: client.submit("nobody", 1, timeout=0.1),
                lambda: client.submit("echo", 1, priority="urgent"),
            ):
                try:
                    call()
                except Exception as error:
                    raised.append(type(error))
            assert client.submit("echo", "still fine") == "still fine"
        return raised

    with anyio.fail_after(TEST_TIMEOUT):
        async with workers_running(RawWorker(any_server, {"fail": failing, "echo": echo})):
            raised = await anyio.to_thread.run_sync(use)
    assert raised == [JobFailed, JobTimeout, ValueError]


def test_sync_client_with_no_server_up_raises_no_server_available():
    with SyncClient([nothing_listening()]) as client, pytest.raises(NoServerAvailable):
        client.submit("echo", 1)


def test_sync_client_must_be_opened_and_can_be_reopened():
    client = SyncClient([nothing_listening()])
    with pytest.raises(RuntimeError, match="not open"):
        client.submit("echo", 1)
    for _ in range(2):
        client.open()
        with pytest.raises(NoServerAvailable):
            client.submit_background("echo", 1)
        client.close()
    client.close()  # closing twice is harmless
