"""`jobserver worker MODULE:ATTRIBUTE`: runs a Worker from user code as a process, serves jobs,
exits 0 on SIGTERM/SIGINT, and refuses a bad target with a one-line message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest
from servers import REPO_ROOT, stop_process
from worker_sdk_helpers import (
    TEST_TIMEOUT,
    Client,
    submit_background,
    wait_for_status,
    wait_for_workers,
)

from jobserver.protocol import PacketType as T

CLI_TIMEOUT = 30
"""Seconds a CLI process may take to exit (it exits at once on a bad target, and within its
grace period after a signal)."""

TASKS = textwrap.dedent(
    """
    from worker_sdk import Worker

    worker = Worker(["127.0.0.1:9"], codec="raw", concurrency=1)
    not_a_worker = 42

    @worker.function("cli_reverse")
    def reverse(job):
        return job.payload[::-1]

    @worker.function("cli_hang")
    async def hang(job):
        import sys

        import anyio

        print("cli_hang started", file=sys.stderr, flush=True)  # the test waits for it
        await anyio.sleep_forever()
    """
)

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)


@pytest.fixture
def tasks_dir(tmp_path):
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(TASKS)
    return tmp_path


def cli_env(tasks_dir) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tasks_dir), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def jobserver_worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobserver", "worker", *args]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_cli_runs_the_named_worker_on_the_given_servers_and_exits_0_on_signal(
    any_server, tasks_dir, signum
):
    argv = jobserver_worker(
        "myapp.tasks:worker", "--servers", any_server.address, "--concurrency", "2"
    )
    proc = subprocess.Popen(
        argv,
        env=cli_env(tasks_dir),
        cwd=tasks_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with anyio.fail_after(TEST_TIMEOUT):
            await wait_for_workers(any_server, "cli_reverse")
            client = await Client.connect(any_server)
            done = await client.run("cli_reverse", b"from the cli")
            proc.send_signal(signum)
            returncode = await anyio.to_thread.run_sync(proc.wait, CLI_TIMEOUT)
            await wait_for_status(any_server, "cli_reverse", (0, 0, 0))
    finally:
        stop_process(proc)
    stderr = proc.stderr.read().decode()
    assert (done.type, done.args[1]) == (T.WORK_COMPLETE, b"ilc eht morf")
    assert returncode == 0, stderr
    assert "worker" in stderr and "stopped" in stderr  # it logs at INFO by default


async def test_cli_second_signal_cancels_the_jobs_still_running(any_server, tasks_dir):
    proc = subprocess.Popen(
        # A grace period far past the test's deadline: only the second signal can end it.
        jobserver_worker(
            "myapp.tasks:worker", "--servers", any_server.address, "--grace-period", "3600"
        ),
        env=cli_env(tasks_dir),
        cwd=tasks_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with anyio.fail_after(TEST_TIMEOUT):
            await wait_for_workers(any_server, "cli_hang")
            await submit_background(any_server, "cli_hang")
            await wait_for_status(any_server, "cli_hang", (1, 1, 1))
            # The server counts the job running once it is assigned; the worker may not have
            # read the assignment yet, and a worker stopped before that has nothing to cancel
            # (it exits at the first signal, and the second finds no handler: -15). Wait
            # until the job runs in the worker.
            while b"cli_hang started" not in await anyio.to_thread.run_sync(proc.stderr.readline):
                pass
            proc.send_signal(signal.SIGTERM)
            # trio merges a signal repeated before it is read: wait until the first is taken.
            while b"SIGTERM: stopping" not in await anyio.to_thread.run_sync(proc.stderr.readline):
                pass
            proc.send_signal(signal.SIGTERM)
            returncode = await anyio.to_thread.run_sync(proc.wait, CLI_TIMEOUT)
            # The job was cancelled and the disconnect gave it back to the server.
            await wait_for_status(any_server, "cli_hang", (1, 0, 0))
    finally:
        stop_process(proc)
    assert returncode == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchapp.tasks:worker", "cannot import module 'nosuchapp.tasks'"),
        ("myapp.tasks:wrker", "module 'myapp.tasks' has no attribute 'wrker'"),
        (
            "myapp.tasks:not_a_worker",
            "myapp.tasks:not_a_worker is not a worker_sdk.Worker (its type is int)",
        ),
        ("myapp.tasks", "'myapp.tasks' is not MODULE:ATTRIBUTE"),
    ],
)
def test_cli_bad_target_exits_non_zero_with_a_message_and_no_traceback(tasks_dir, target, message):
    result = subprocess.run(
        jobserver_worker(target, "--servers", "127.0.0.1:9"),
        env=cli_env(tasks_dir),
        cwd=tasks_dir,
        capture_output=True,
        timeout=CLI_TIMEOUT,
    )
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert message in stderr
    assert "Traceback" not in stderr


def test_cli_bad_servers_option_is_a_usage_error(tasks_dir):
    result = subprocess.run(
        jobserver_worker("myapp.tasks:worker", "--servers", "host:notaport"),
        env=cli_env(tasks_dir),
        cwd=tasks_dir,
        capture_output=True,
        timeout=CLI_TIMEOUT,
    )
    assert result.returncode == 2
    assert "bad port" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_plain_jobserver_command_still_runs_the_server_cli():
    result = subprocess.run(
        [sys.executable, "-m", "jobserver", "--version"],
        capture_output=True,
        timeout=CLI_TIMEOUT,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0
    assert result.stdout.startswith(b"jobserver ")
