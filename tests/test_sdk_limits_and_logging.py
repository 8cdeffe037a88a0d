"""The client refuses a payload over the servers' packet size limit before sending it, and
both SDKs log a server they cannot resolve or reach (WARNING, rate-limited) and its return
(INFO)."""

from __future__ import annotations

import logging

import anyio
import pytest
from test_client_sdk_support import nothing_listening

from client_sdk import Client, PayloadError, ServerError
from worker_sdk import Worker

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

TEST_TIMEOUT = 30.0

SERVER_LIMIT = 8192
"""The server's --max-packet-size in these tests, as in the issue's report."""

UNRESOLVABLE = "nonexistent.invalid:4730"
""".invalid never resolves (RFC 2606)."""

MAX_SUBMITS_UNTIL_TRIED = 100
"""Submits, each trying the two servers in a random order, before one must have tried the
unresolvable server first: all 100 missing it has odds of 2^-100."""


async def test_oversized_payload_raises_payload_error_and_spares_other_jobs(start_jobserver):
    server = start_jobserver("--max-packet-size", str(SERVER_LIMIT))
    worker = Worker([server.address], codec="raw")
    release = anyio.Event()

    @worker.function("wait")
    async def wait(job):
        await release.wait()
        return b"done"

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.serve)
            async with Client(
                [server.address], codec="raw", max_packet_size=SERVER_LIMIT
            ) as client:
                results = []

                async def in_flight() -> None:
                    results.append(await client.submit("wait", b"x"))

                tasks.start_soon(in_flight)
                with pytest.raises(PayloadError) as raised:
                    await client.submit("wait", b"y" * 20_000)
                assert "20" in str(raised.value) and str(SERVER_LIMIT) in str(raised.value)
                with pytest.raises(PayloadError):
                    await client.submit_background("wait", b"y" * 20_000)
                release.set()
                while not results:
                    await anyio.sleep(0.02)
                assert results == [b"done"]
            worker.stop()


async def test_a_server_refusing_one_oversized_job_fails_that_job_only(start_jobserver):
    # The client was told a larger limit than the server's: the server answers that packet
    # with ERROR ARGUMENT_TOO_LARGE, skips its body and goes on, so the job in flight on the
    # same connection completes and the connection serves the next submit.
    server = start_jobserver("--max-packet-size", str(SERVER_LIMIT))
    worker = Worker([server.address], codec="raw")
    release = anyio.Event()

    @worker.function("wait")
    async def wait(job):
        await release.wait()
        return b"done " + job.payload

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.serve)
            async with Client([server.address], codec="raw") as client:  # default: 64 MiB
                results = []

                async def in_flight() -> None:
                    results.append(await client.submit("wait", b"first"))

                tasks.start_soon(in_flight)
                with pytest.raises(ServerError) as raised:
                    await client.submit("wait", b"y" * 20_000)
                assert raised.value.code == "ARGUMENT_TOO_LARGE"
                release.set()
                assert await client.submit("wait", b"after") == b"done after"
                while not results:
                    await anyio.sleep(0.02)
                assert results == [b"done first"]
            worker.stop()


async def test_client_logs_an_unresolvable_server_once_and_still_serves(jobserver, caplog):
    caplog.set_level(logging.DEBUG, logger="client_sdk")

    def warnings() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.levelno == logging.WARNING and UNRESOLVABLE in r.getMessage()
        ]

    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([UNRESOLVABLE, jobserver.address], codec="raw") as client:
            # Each background submit gets a random unique id, and the unique picks the order
            # of the servers it tries, so any given submit tries the unresolvable one first
            # only by chance: a fixed 6 submits all went to the live server 1 run in 64 and
            # failed a CI run. Submit until one has tried it.
            for _ in range(MAX_SUBMITS_UNTIL_TRIED):
                await client.submit_background("nobody", b"")
                if warnings():
                    break
            assert warnings(), f"no submit tried {UNRESOLVABLE} in {MAX_SUBMITS_UNTIL_TRIED}"
            for _ in range(6):
                await client.submit_background("nobody", b"")
    # the first failure; repeats within a minute are DEBUG
    assert len(warnings()) == 1, [(r.levelname, r.getMessage()) for r in caplog.records]


async def test_worker_logs_an_unreachable_server_and_its_return(start_jobserver, caplog):
    port_holder = nothing_listening()
    caplog.set_level(logging.DEBUG, logger="worker_sdk")
    worker = Worker([UNRESOLVABLE, port_holder], codec="raw")

    @worker.function("f")
    async def f(job):
        return b""

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.serve)
            messages = lambda: [r.getMessage() for r in caplog.records]  # noqa: E731
            while not any(UNRESOLVABLE in m and "unreachable" in m for m in messages()):
                await anyio.sleep(0.05)
            while not any(port_holder in m and "unreachable" in m for m in messages()):
                await anyio.sleep(0.05)
            port = int(port_holder.rpartition(":")[2])
            start_jobserver(port=port)  # the server comes up on the port the worker retries
            while not any(m.startswith(f"{port_holder} is back") for m in messages()):
                await anyio.sleep(0.05)
            worker.stop()
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and UNRESOLVABLE in r.getMessage()
    ]
    assert len(warnings) == 1
