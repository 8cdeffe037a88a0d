"""Failed background jobs (issue 13) through the SDKs: `client.status()` follows a job from
queued through running and retrying to dead and gone; `@worker.function(retries=...)` sets the
policy on every server; `raise Retry(...)` asks for another attempt; and gearmand, which knows
none of this, keeps working with both SDKs.

Servers run with `--store memory`; every wait is bounded by the test's deadline only.
"""

from __future__ import annotations

import logging
import math
import socket
import time

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest
import servers
from worker_sdk_helpers import TEST_TIMEOUT, admin, serving, wait_for_workers

from client_sdk import Client, JobException, JobStatus, SyncClient
from client_sdk.jobs import job_status
from jobserver.sdk.retry import RETRY_AFTER_MARKER, parse_retry_after
from worker_sdk import Retry, Worker
from worker_sdk.functions import WorkerFunction

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

POLL = 0.02

MEMORY = ("--store", "memory")

LONGER_RETRY_DELAY = 1.5
"""Seconds a function asks to wait with Retry(delay=...), fifteen times its policy's base delay:
far enough apart to tell which one the server used, short enough for a quick test."""

RETRY_LATENESS = 3.0
"""Seconds a retry may come after the delay asked for, on a loaded machine: loose, yet it
catches a retry that waits the default --bg-retry-delay (5 s) instead."""


def dead_jobs(server: servers.Server) -> list[list[bytes]]:
    """`show dead jobs` as fields per line, read up to the final "." line."""
    reply = b""
    with socket.create_connection((server.host, server.port), timeout=servers.IO_TIMEOUT) as sock:
        sock.sendall(b"show dead jobs\n")
        while not (reply == b".\n" or reply.endswith(b"\n.\n")):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {reply!r}"
            reply += chunk
    return [line.split(b"\t") for line in reply.splitlines()[:-1]]


async def status_when(client: Client, handle: str, state: str) -> JobStatus:
    """Poll client.status(handle) until its state is `state` (the test's deadline bounds it)."""
    while (status := await client.status(handle)).state != state:
        await anyio.sleep(POLL)
    return status


# --- the wire form, without a server ----------------------------------------------------------


def test_retry_goes_on_the_wire_as_an_exception_text_after_a_marker_line():
    request = Retry("rate limited", delay=1.5)
    assert str(request) == "rate limited"
    data = request.exception_data()
    assert data == b"jobserver-retry-after:1.5\nRetry: rate limited"
    assert data.startswith(RETRY_AFTER_MARKER)
    assert parse_retry_after(data) == (1.5, b"Retry: rate limited")
    assert Retry("soon", delay=0).exception_data() == b"jobserver-retry-after:0\nRetry: soon"
    # Without a delay the policy's backoff applies: an ordinary exception text.
    assert Retry("whenever").exception_data() == b"Retry: whenever"
    assert parse_retry_after(b"Retry: whenever") == (None, b"Retry: whenever")


@pytest.mark.parametrize(
    "data",
    [
        b"jobserver-retry-after:30",  # no newline: not a marker line
        b"jobserver-retry-after:soon\nRetry: x",
        b"jobserver-retry-after:-1\nRetry: x",
        b"jobserver-retry-after:nan\nRetry: x",
        b"jobserver-retry-after:86401\nRetry: x",
    ],
)
def test_a_malformed_marker_is_an_ordinary_exception_text(data):
    assert parse_retry_after(data) == (None, data)


@pytest.mark.parametrize(
    ("delay", "error"),
    [
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (86_401, ValueError),
        ("30", TypeError),
        (True, TypeError),
    ],
)
def test_retry_refuses_a_delay_it_cannot_send(delay, error):
    with pytest.raises(error):
        Retry("x", delay=delay)


@pytest.mark.parametrize(
    ("name", "kwargs", "error"),
    [
        ("f", {"retries": -1}, ValueError),
        ("f", {"retries": 1001}, ValueError),
        ("f", {"retries": True}, TypeError),
        ("f", {"retries": 2, "retry_delay": 0}, ValueError),
        ("f", {"retries": 2, "retry_delay": math.inf}, ValueError),
        ("f", {"retry_delay": 1.0}, ValueError),  # a delay for no retries
        ("two words", {"retries": 2}, ValueError),  # cannot go into `retries <name> <n>`
        ("tab\tname", {"retries": 2}, ValueError),
    ],
)
def test_bad_retry_policies_are_refused_at_registration(name, kwargs, error):
    worker = Worker(["127.0.0.1:4730"])
    with pytest.raises(error):
        worker.function(name, **kwargs)


def test_a_policy_becomes_one_retries_command():
    worker = Worker(["127.0.0.1:4730"])

    @worker.function("resize", retries=2, retry_delay=0.25)
    async def resize(job):
        return None

    @worker.function("plain")
    async def plain(job):
        return None

    @worker.function("two words")  # without a policy any function name is fine
    async def spaced(job):
        return None

    functions: dict[str, WorkerFunction] = dict(worker.functions)
    assert functions["resize"].policy_command() == b"retries resize 2 0.25\n"
    assert functions["plain"].policy_command() is None
    assert functions["two words"].policy_command() is None
    assert "retries=2 retry_delay=0.25" in repr(functions["resize"])


@pytest.mark.parametrize(
    ("get_status", "show_job", "expected"),
    [
        # The two answers agree: as GET_STATUS said, with the failures added.
        ((True, True, 1, 4), b"OK running 1 3 0", JobStatus(True, True, 1, 4, "running", 1, 3)),
        (
            (True, False, 0, 0),
            b"OK retrying 1 3 17",
            JobStatus(True, False, 0, 0, "retrying", 1, 3, 17.0),
        ),
        ((False, False, 0, 0), b"OK dead 4 3 0", JobStatus(False, False, 0, 0, "dead", 4, 3)),
        ((False, False, 0, 0), b"OK unknown 0 0 0", JobStatus(False, False, 0, 0, "gone")),
        # A worker reported in between: the later answer, the state, wins.
        (
            (True, True, 3, 4),
            b"OK retrying 1 3 17",
            JobStatus(True, False, 0, 0, "retrying", 1, 3, 17.0),
        ),
        ((True, True, 3, 4), b"OK dead 4 3 0", JobStatus(False, False, 0, 0, "dead", 4, 3)),
        ((True, False, 0, 0), b"OK running 0 3 0", JobStatus(True, True, 0, 0, "running", 0, 3)),
        # gearmand, or a reply this SDK does not understand: GET_STATUS alone.
        ((True, True, 1, 4), b"ERR UNKNOWN_SHOW_ARGUMENTS", JobStatus(True, True, 1, 4)),
        ((True, False, 0, 0), b"OK sleeping 0 0 0", JobStatus(True, False, 0, 0, "queued")),
        ((False, False, 0, 0), None, JobStatus(False, False, 0, 0, "gone")),
    ],
)
def test_a_status_is_one_consistent_view_of_both_answers(get_status, show_job, expected):
    assert job_status(*get_status, show_job) == expected


# --- client.status() through a job's life ------------------------------------------------------


async def test_status_follows_a_failing_background_job_from_queued_to_dead_and_gone(
    start_jobserver,
):
    server = start_jobserver(*MEMORY, "--bg-retries", "1", "--bg-retry-delay", "0.5")
    first_run, second_run = anyio.Event(), anyio.Event()
    runs = []
    worker = Worker([server.address])

    @worker.function("flaky")
    async def flaky(job):
        runs.append(job.handle)
        await (first_run if len(runs) == 1 else second_run).wait()
        raise RuntimeError("boom")

    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([server.address]) as client:
            handle = await client.submit_background("flaky", {"n": 1}, unique="flaky-1")
            queued = await client.status(handle)
            assert queued == JobStatus(True, False, 0, 0, "queued", 0, 1, None)

            async with serving(worker):
                running = await status_when(client, handle, "running")
                assert (running.known, running.running, running.attempts) == (True, True, 0)

                first_run.set()  # the first attempt fails
                retrying = await status_when(client, handle, "retrying")
                assert (retrying.known, retrying.running) == (True, False)
                assert (retrying.attempts, retrying.retries) == (1, 1)  # retry 1 of 1
                assert retrying.next_attempt is not None
                assert time.time() - 5 < retrying.next_attempt < time.time() + 60

                again = await status_when(client, handle, "running")  # the retry runs
                assert (again.attempts, again.retries) == (1, 1)
                second_run.set()  # and fails too: no retries left
                dead = await status_when(client, handle, "dead")
            assert dead == JobStatus(False, False, 0, 0, "dead", 2, 1, None)
            assert runs == [str(handle), str(handle)]  # the same job, same handle, twice
            # A plain str asks the servers in turn and stops at the one that has it, dead.
            assert (await client.status(str(handle))).state == "dead"
            [(dead_handle, function, unique, attempts, _when, error)] = dead_jobs(server)
            assert (dead_handle, function, unique, attempts) == (
                str(handle).encode(),
                b"flaky",
                b"flaky-1",
                b"2",
            )
            assert b"RuntimeError: boom" in error

            assert await admin(server, "purge dead jobs flaky") == "OK 1\n"
            gone = await client.status(handle)
            assert gone == JobStatus(False, False, 0, 0, "gone", 0, 0, None)
            assert gone == JobStatus(False, False, 0, 0)  # what GET_STATUS alone gives


async def test_sync_client_status_tells_a_dead_job(start_jobserver):
    server = start_jobserver(*MEMORY)  # --bg-retries 0: the first failure is final
    worker = Worker([server.address])

    @worker.function("doomed")
    def doomed(job):
        raise ValueError("no such file")

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker), Client([server.address]) as client:
            handle = await client.submit_background("doomed")
            await status_when(client, handle, "dead")

        def from_a_thread() -> JobStatus:
            with SyncClient([server.address]) as sync_client:
                return sync_client.status(handle)

        status = await anyio.to_thread.run_sync(from_a_thread)
    assert status == JobStatus(False, False, 0, 0, "dead", 1, 0, None)


async def test_status_calls_pipelined_with_submits_each_get_their_own_answer(start_jobserver):
    server = start_jobserver(*MEMORY, "--bg-retries", "3")
    statuses: dict[str, JobStatus] = {}

    async def submit_and_ask(client: Client, n: int) -> None:
        handle = await client.submit_background("nobody", n)
        statuses[handle] = await client.status(handle)
        statuses[handle + "?"] = await client.status(handle + "x")  # unknown there

    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([server.address]) as client, anyio.create_task_group() as tasks:
            for n in range(200):
                tasks.start_soon(submit_and_ask, client, n)
    assert len(statuses) == 400
    for handle, status in statuses.items():
        if handle.endswith("?"):
            assert status == JobStatus(False, False, 0, 0, "gone", 0, 0, None)
        else:
            assert status == JobStatus(True, False, 0, 0, "queued", 0, 3, None)


async def test_a_handle_that_is_not_one_word_gets_get_status_alone(start_jobserver):
    server = start_jobserver(*MEMORY, "--bg-retries", "2")
    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([server.address]) as client:
            assert await client.status("H:no such handle") == JobStatus(False, False, 0, 0)
            # The connection still asks `show job` for handles that fit in one.
            handle = await client.submit_background("nobody")
            assert (await client.status(handle)).retries == 2


async def test_status_on_gearmand_comes_from_get_status_alone(start_gearmand):
    server = start_gearmand()
    release = anyio.Event()
    worker = Worker([server.address])

    @worker.function("slow")
    async def slow(job):
        await release.wait()
        return "done"

    @worker.function("echo")
    async def echo(job):
        return job.arg

    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([server.address]) as client:
            handle = await client.submit_background("slow", 1)
            for _ in range(3):  # the first asks `show job` (ERR), the others no longer do
                status = await client.status(handle)
                assert status == JobStatus(True, False, 0, 0, "queued", 0, 0, None)
            async with serving(worker):
                running = await status_when(client, handle, "running")
                assert running == JobStatus(True, True, 0, 0, "running", 0, 0, None)
                release.set()
                gone = await status_when(client, handle, "gone")
                assert gone == JobStatus(False, False, 0, 0, "gone", 0, 0, None)
                assert await client.submit("echo", {"still": "fine"}) == {"still": "fine"}


# --- @worker.function(retries=...) --------------------------------------------------------------


async def test_function_retries_set_the_policy_on_every_server_at_each_connect(start_jobserver):
    first, second = start_jobserver(*MEMORY), start_jobserver(*MEMORY)
    worker = Worker([first.address, second.address])

    @worker.function("fetch", retries=2, retry_delay=0.2)
    async def fetch(job):
        return None

    @worker.function("plain")
    async def plain(job):
        return None

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            for server in (first, second):
                await wait_for_workers(server, "fetch")
                assert await admin(server, "retries fetch") == "OK 2 0.2\n"
                assert await admin(server, "retries plain") == "OK 0 5\n"  # the server's own
            # A restarted server (memory store: it forgot the policy) gets it again.
            port = second.port
            second.stop()
            second = start_jobserver(*MEMORY, port=port)
            await wait_for_workers(second, "fetch")
            while await admin(second, "retries fetch") != "OK 2 0.2\n":
                await anyio.sleep(POLL)  # the reply to `retries` may trail the CAN_DO


async def test_a_policy_sent_to_gearmand_does_not_disturb_the_worker(
    start_jobserver, start_gearmand, caplog
):
    ours, gearmand = start_jobserver(*MEMORY), start_gearmand()
    worker = Worker([gearmand.address, ours.address], concurrency=2)

    @worker.function("fetch", retries=2, retry_delay=0.2)
    async def fetch(job):
        return job.arg

    caplog.set_level(logging.DEBUG, logger="worker_sdk")
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            for server in (gearmand, ours):
                await wait_for_workers(server, "fetch")
                async with Client([server.address]) as client:
                    for n in range(5):
                        assert await client.submit("fetch", n) == n
            assert await admin(ours, "retries fetch") == "OK 2 0.2\n"
    said = [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "worker_sdk"
    ]
    assert not [text for level, text in said if level >= logging.WARNING and "retr" in text]
    assert any(
        level == logging.DEBUG
        and "does not know retry policies" in text
        and gearmand.address in text
        for level, text in said
    ), said


# --- raise Retry(...) -----------------------------------------------------------------------------


async def test_retry_raised_by_a_function_gets_the_job_another_attempt(start_jobserver):
    server = start_jobserver(*MEMORY)
    runs = []
    worker = Worker([server.address])

    @worker.function("fetch", retries=1, retry_delay=0.2)
    async def fetch(job):
        runs.append(job.handle)
        if len(runs) == 1:
            raise Retry("the API says later", delay=0.1)
        return "fetched"

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker), Client([server.address]) as client:
            await wait_for_workers(server, "fetch")
            handle = await client.submit_background("fetch", unique="page-1")
            gone = await status_when(client, handle, "gone")
    assert runs == [str(handle), str(handle)]
    assert gone.attempts == 0
    assert dead_jobs(server) == []


async def test_retry_raised_with_a_delay_longer_than_the_policy_s_waits_that_long(
    start_jobserver,
):
    """The policy's 0.1 s (at most 0.15 with its jitter) is not used for this attempt: the
    retry comes after the delay asked for, and not much later."""
    server = start_jobserver(*MEMORY)
    runs: list[float] = []  # time.monotonic() at each run's start
    worker = Worker([server.address])

    @worker.function("fetch", retries=1, retry_delay=0.1)
    async def fetch(job):
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise Retry("the API says in a while", delay=LONGER_RETRY_DELAY)
        return "fetched"

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker), Client([server.address]) as client:
            await wait_for_workers(server, "fetch")
            handle = await client.submit_background("fetch", unique="page-1")
            retrying = await status_when(client, handle, "retrying")
            assert (retrying.attempts, retrying.retries) == (1, 1)
            await status_when(client, handle, "gone")
    first, second = runs
    # The server starts the wait when WORK_EXCEPTION arrives, after `first`: only the two
    # processes' clocks may make it look a little shorter.
    assert LONGER_RETRY_DELAY - 0.1 <= second - first <= LONGER_RETRY_DELAY + RETRY_LATENESS
    assert dead_jobs(server) == []


async def test_retries_asked_for_run_out_into_the_dead_set_with_the_message(start_jobserver):
    server = start_jobserver(*MEMORY)
    runs = []
    worker = Worker([server.address])

    @worker.function("fetch", retries=1, retry_delay=0.2)
    def fetch(job):  # a plain def raises it from its thread the same way
        runs.append(job.handle)
        raise Retry("still busy", delay=0.1)

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker), Client([server.address]) as client:
            await wait_for_workers(server, "fetch")
            handle = await client.submit_background("fetch")
            dead = await status_when(client, handle, "dead")
    assert len(runs) == 2
    assert (dead.attempts, dead.retries) == (2, 1)
    [(_handle, _function, _unique, attempts, _when, error)] = dead_jobs(server)
    assert attempts == b"2"
    assert b"Retry: still busy" in error


async def test_a_foreground_caller_gets_the_retry_message_without_the_marker(any_server):
    worker = Worker([any_server.address])

    @worker.function("busy")
    async def busy(job):
        raise Retry("try again in a minute", delay=60)

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker), Client([any_server.address]) as client:
            await wait_for_workers(any_server, "busy")
            with pytest.raises(JobException) as raised:
                await client.submit("busy")
    assert raised.value.exception == "Retry: try again in a minute"
    assert "jobserver-retry-after" not in str(raised.value)
