"""Our client with Debian's `gearman -w` workers (libgearman 1.1.20), codec "raw".

A libgearman worker feeds the workload to a shell command on stdin and returns its stdout, so
these prove the client speaks the protocol as libgearman expects, against both servers.
"""

from __future__ import annotations

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest
from servers import GearmanCLI
from test_client_sdk_support import eventually

from client_sdk import Client, Data, JobFailed

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("gearman_tools"), pytest.mark.anyio]

TEST_TIMEOUT = 30


@pytest.fixture
def gearman(any_server):
    with GearmanCLI(any_server) as cli:
        yield cli


async def start_worker(gearman: GearmanCLI, function: str, *command: str, options=()) -> None:
    await anyio.to_thread.run_sync(
        lambda: gearman.worker(function, *command, options=tuple(options))
    )


async def test_foreground_job_gets_the_gearman_worker_result(gearman):
    with anyio.fail_after(TEST_TIMEOUT):
        await start_worker(gearman, "rev", "rev")
        await start_worker(gearman, "upper", "tr", "a-z", "A-Z")
        async with Client([gearman.server.address], codec="raw") as client:
            assert await client.submit("rev", b"hello world") == b"dlrow olleh"
            assert await client.submit("upper", "two\nlines\0nul\n") == b"TWO\nLINES\0NUL\n"
            assert await client.submit("rev", b"high", priority="high") == b"hgih"
            assert await client.submit("rev", b"low", priority="low", unique="low-1") == b"wol"


async def test_many_concurrent_jobs_through_gearman_workers(gearman):
    with anyio.fail_after(TEST_TIMEOUT):
        for _ in range(3):
            await start_worker(gearman, "upper", "tr", "a-z", "A-Z")
        results = {}
        async with Client([gearman.server.address], codec="raw") as client:

            async def submit(n: int) -> None:
                results[n] = await client.submit("upper", f"job {n}")

            async with anyio.create_task_group() as nursery:
                for n in range(30):
                    nursery.start_soon(submit, n)
        assert results == {n: f"JOB {n}".encode() for n in range(30)}


async def test_gearman_worker_line_mode_arrives_as_data_updates(gearman):
    # `gearman -w -n` sends WORK_DATA per output line (libgearman 1.1.20 resends the output so
    # far each time, see test_interop_gearman_tools) and then an empty WORK_COMPLETE.
    with anyio.fail_after(TEST_TIMEOUT):
        await start_worker(gearman, "lines", "printf", r"a\nb\nc\n", options=("-n",))
        async with (
            Client([gearman.server.address], codec="raw") as client,
            client.stream("lines", b"x") as job,
        ):
            updates = [update async for update in job]
            result = await job.result()
        assert updates == [Data(b"a\n"), Data(b"a\nb\n"), Data(b"a\nb\nc\n")]
        assert result == b""


async def test_failing_gearman_worker_raises_job_failed(gearman):
    with anyio.fail_after(TEST_TIMEOUT):
        await start_worker(gearman, "broken", "false")
        async with Client([gearman.server.address], codec="raw") as client:
            with pytest.raises(JobFailed):
                await client.submit("broken", b"x")


async def test_background_job_runs_on_a_gearman_worker(gearman, tmp_path):
    log = tmp_path / "log"
    with anyio.fail_after(TEST_TIMEOUT):
        await start_worker(gearman, "record", "sh", "-c", f"cat >> {log}")
        async with Client([gearman.server.address], codec="raw") as client:
            for n in range(3):
                await client.submit_background("record", f"{n};")
            await eventually(lambda: _log_has(log, b"0;1;2;"))


async def _log_has(log, expected: bytes) -> bool:
    return log.exists() and log.read_bytes() == expected
