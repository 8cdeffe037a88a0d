"""The `jobserver` command line: daemon mode, pid file, signals, options and their errors.

Servers are real processes on free 127.0.0.1 ports. Options that gearmand also has
(--exceptions, --job-retries, --worker-wakeup) are checked against both servers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import (
    CAN_DO,
    ECHO_REQ,
    ECHO_RES,
    GRAB_JOB,
    HOST,
    JOB_ASSIGN,
    JOB_CREATED,
    NOOP,
    PRE_SLEEP,
    SUBMIT_JOB,
    SUBMIT_JOB_BG,
    WORK_EXCEPTION,
    WORK_FAIL,
    Connection,
    Server,
    admin,
    echo,
    free_port,
    jobserver_argv,
    port_accepts,
    status,
    wait_until,
)
from test_cli_support import (
    COMMAND_TIMEOUT,
    pid_alive,
    run_jobserver,
)

ERROR = 19  # packet type (protocol reference §2); servers.py does not name it
LEVELS = ["FATAL", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFO", "DEBUG"]

pytest_plugins = ["test_cli_support"]  # its fixtures: busy_port, daemon_pids, ...


# --- daemon mode ------------------------------------------------------------------------


def test_daemon_returns_once_the_port_serves_and_stops_on_sigterm(tmp_path, daemon_pids):
    port = free_port()
    pid_file, log_file = tmp_path / "jobserver.pid", tmp_path / "jobserver.log"

    started = time.monotonic()
    result = run_jobserver(
        "-L",
        HOST,
        "-d",
        str(port),
        "--pid-file",
        str(pid_file),
        "--log-file",
        str(log_file),
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - started

    assert (result.returncode, result.stderr) == (0, "")
    assert elapsed < 10
    assert echo(HOST, port, b"hello daemon") == b"hello daemon"  # no waiting needed
    pid = int(pid_file.read_text())
    daemon_pids.append(pid)
    assert admin(f"{HOST}:{port}", "getpid") == f"OK {pid}\n".encode()
    assert log_file.exists()

    os.kill(pid, signal.SIGTERM)

    wait_until(lambda: not pid_alive(pid), timeout=10, what="the daemon to exit")
    assert not pid_file.exists()
    assert not port_accepts(HOST, port)


def test_daemon_on_a_busy_port_fails_naming_the_port(busy_port, tmp_path):
    pid_file = tmp_path / "jobserver.pid"

    result = run_jobserver(
        "-L", HOST, "-d", str(busy_port), "--pid-file", str(pid_file), cwd=tmp_path
    )

    assert result.returncode != 0
    assert str(busy_port) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not pid_file.exists()


def test_daemon_on_the_port_of_a_running_jobserver_fails(jobserver, tmp_path):
    result = run_jobserver("-L", HOST, "-d", str(jobserver.port), "--store", "memory", cwd=tmp_path)

    assert result.returncode != 0
    assert str(jobserver.port) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert echo(HOST, jobserver.port) == b"ping"  # the running one is unharmed


def test_foreground_server_on_a_busy_port_fails_naming_the_port(busy_port, tmp_path):
    result = run_jobserver("-L", HOST, "-p", str(busy_port), cwd=tmp_path)

    assert result.returncode != 0
    assert str(busy_port) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- foreground mode and signals -----------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_foreground_server_exits_zero_on_signal(start_jobserver, tmp_path, signum):
    pid_file = tmp_path / "jobserver.pid"
    server = start_jobserver("--pid-file", str(pid_file))
    assert int(pid_file.read_text()) == server.pid
    idle_client = server.connect()
    assert idle_client.request(ECHO_REQ, b"x", expect=ECHO_RES) == b"x"

    server.proc.send_signal(signum)

    assert server.proc.wait(timeout=10) == 0
    assert idle_client.sock.recv(1) == b""  # its connection was closed
    idle_client.close()
    assert not pid_file.exists()
    assert not port_accepts(HOST, server.port)
    assert "Traceback" not in server.stderr_text()


def test_positional_port_wins_over_the_port_option(tmp_path):
    option_port, positional_port = free_port(), free_port()
    argv = jobserver_argv(option_port, str(positional_port), data_dir=tmp_path / "data")
    server = Server("jobserver", argv, HOST, positional_port, tmp_path)
    try:
        server.wait_ready()
        assert not port_accepts(HOST, option_port)
    finally:
        server.stop()


# --- --help and bad values ----------------------------------------------------------------


def test_help_lists_every_option(tmp_path):
    result = run_jobserver("--help", cwd=tmp_path)

    assert result.returncode == 0
    for option in [
        "PORT",
        "-p, --port",
        "-L, --listen",
        "-d, --daemon",
        "--pid-file",
        "--log-file",
        "-j, --job-retries",
        "-w, --worker-wakeup",
        "--job-handle-prefix",
        "--exceptions",
        "--verbose",
        "--max-packet-size",
        "--store",
        "--data-dir",
        "--max-connections",
        "--read-timeout",
        "--memory-budget",
        "--backlog",
    ]:
        assert option in result.stdout, option
    assert "jobserver worker MODULE:ATTRIBUTE" in result.stdout  # the subcommand is discoverable


def test_console_script_is_installed():
    # The README's quick start runs `jobserver`; scripts/test installs it with pip.
    beside_python = Path(sys.executable).with_name("jobserver")  # e.g. .venv/bin/jobserver
    script = str(beside_python) if beside_python.exists() else shutil.which("jobserver")
    if script is None:
        pytest.skip("the jobserver console script is not installed (pip install -e .)")
    result = subprocess.run([script, "--help"], capture_output=True, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--verbose", "LOUD"], ["--verbose", "LOUD"]),
        (["-p", "70000"], ["--port", "65535"]),
        (["70000"], ["PORT", "65535"]),
        (["--job-retries", "-1"], ["--job-retries"]),
        (["--worker-wakeup", "-1"], ["--worker-wakeup"]),
        (["--max-packet-size", "0"], ["--max-packet-size"]),
        (["--max-connections", "0"], ["--max-connections"]),
        (["--read-timeout", "-1"], ["--read-timeout"]),
        (["--read-timeout", "soon"], ["--read-timeout"]),
        (["--memory-budget", "0"], ["--memory-budget"]),
        (["--port", "many"], ["--port", "integer"]),
        (["--no-such-option"], ["--no-such-option"]),
    ],
)
def test_bad_option_values_fail_with_a_clear_message(args, mentions, tmp_path):
    result = run_jobserver("-L", HOST, *args, cwd=tmp_path)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert "Error:" in result.stderr
    for word in mentions:
        assert word in result.stderr


# --- the failed background jobs' options (issue 13) -----------------------------------------


@pytest.mark.parametrize(
    ("option", "default_and_bounds"),
    [
        ("--bg-retries", "0; 0<=x<=1000"),  # today's behaviour: no retry, but a dead set
        ("--bg-retry-delay", "5.0; 0.001<=x<=86400.0"),
        ("--dead-max", "100000; x>=1"),
        ("--dead-ttl", "2592000.0; x>=1"),  # 30 days
    ],
)
def test_failed_job_options_have_the_issue_s_defaults_and_bounds(
    option, default_and_bounds, tmp_path
):
    result = run_jobserver("--help", cwd=tmp_path)

    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # help wraps between any two words
    # The first "[default: ...]" after the option's name is its own: each of these has one.
    # click 8.2+ shows "<int range>", click 8.1 "INTEGER RANGE" and escapes the bracket.
    metavar = r"(?:<\w+ range>|[A-Z]+ RANGE)"
    shown = re.search(rf"{option} {metavar} .*?\\?\[default: ([^\]]*)\]", text)
    assert shown is not None, option
    assert shown.group(1) == default_and_bounds


@pytest.mark.parametrize(
    ("option", "value", "bound"),
    [
        ("--bg-retries", "-1", "0"),
        ("--bg-retries", "1001", "1000"),
        ("--bg-retry-delay", "0", "0.001"),
        ("--bg-retry-delay", "-5", "0.001"),
        ("--bg-retry-delay", "86401", "86400"),
        ("--dead-max", "0", "1"),
        ("--dead-ttl", "0", "1"),
        ("--dead-ttl", "-1", "1"),
    ],
)
def test_failed_job_options_out_of_bounds_are_refused_naming_the_option_and_bound(
    option, value, bound, tmp_path
):
    result = run_jobserver("-L", HOST, "--store", "memory", option, value, cwd=tmp_path)

    assert result.returncode == 2, result.stderr  # a usage error, before anything starts
    assert "Traceback" not in result.stderr + result.stdout
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert option in message
    # The bound as a number of its own: "1" in "x>=1." but not in "1001" (click 8.1 ends the
    # sentence with a period, and shows a float bound as "86400.0").
    assert re.search(rf"(?<![\w.]){re.escape(bound)}(?!\d)", message), message


# --- options at work -------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_verbose_accepts_every_gearmand_level(start_jobserver, level):
    server = start_jobserver("--verbose", level)

    assert admin(server.address, "verbose") == f"OK {level}\n".encode()


def test_log_file_receives_the_log(start_jobserver, tmp_path):
    log_file = tmp_path / "jobserver.log"
    server = start_jobserver("--log-file", str(log_file), "--verbose", "DEBUG")

    wait_until(lambda: log_file.exists() and log_file.stat().st_size > 0, what="a log line")
    assert str(server.port) in log_file.read_text()


def test_job_handle_prefix_starts_every_handle(start_jobserver):
    server = start_jobserver("--job-handle-prefix", "J:test")

    with server.connect() as client:
        handle = client.request(SUBMIT_JOB_BG, b"fn", b"", b"data", expect=JOB_CREATED)

    assert handle.startswith(b"J:test:")


def test_max_packet_size_closes_connections_sending_larger_packets(start_jobserver):
    server = start_jobserver("--max-packet-size", "10000")

    assert echo(server.host, server.port, b"x" * 9000) == b"x" * 9000
    with server.connect() as conn:
        with contextlib.suppress(OSError):  # reset while we still send: closed, as expected
            conn.send(ECHO_REQ, b"x" * 20000)
        with pytest.raises(OSError):  # ConnectionError once closed, or reset
            # The server may say why first (ERROR ARGUMENT_TOO_LARGE), never echo it.
            for _ in range(2):
                packet_type, payload = conn.recv()
                assert (packet_type, payload.split(b"\0")[0]) == (ERROR, b"ARGUMENT_TOO_LARGE")


# --- options shared with gearmand: same effect on both ------------------------------------

both_servers = pytest.mark.parametrize(
    "kind", ["jobserver", pytest.param("gearmand", marks=pytest.mark.interop)]
)


@pytest.fixture
def start_server(request, kind):
    return request.getfixturevalue(f"start_{kind}")


def assign_to(worker: Connection, function: bytes) -> bytes:
    """Register `function` on `worker`, grab its job and return the job handle."""
    worker.send(CAN_DO, function)
    return worker.request(GRAB_JOB, expect=JOB_ASSIGN).split(b"\0")[0]


@both_servers
def test_exceptions_option_forwards_work_exception_to_every_client(start_server):
    server = start_server("--exceptions")

    with server.connect() as client, server.connect() as worker:
        handle = client.request(SUBMIT_JOB, b"fn", b"", b"data", expect=JOB_CREATED)
        assert assign_to(worker, b"fn") == handle
        worker.send(WORK_EXCEPTION, handle, b"it broke")

        assert client.recv() == (WORK_EXCEPTION, handle + b"\0it broke")


@both_servers
def test_without_exceptions_option_work_exception_reaches_clients_as_work_fail(start_server):
    server = start_server()

    with server.connect() as client, server.connect() as worker:
        handle = client.request(SUBMIT_JOB, b"fn", b"", b"data", expect=JOB_CREATED)
        assert assign_to(worker, b"fn") == handle
        worker.send(WORK_EXCEPTION, handle, b"it broke")

        # gearmand appends a NUL to the handle (§3.8), which hangs libgearman's client; we
        # deliberately send the plain form.
        expected = handle + b"\0" if server.name == "gearmand" else handle
        assert client.recv() == (WORK_FAIL, expected)


@both_servers
def test_job_retries_fails_the_job_after_that_many_lost_workers(start_server):
    server = start_server("--job-retries", "2")

    with server.connect() as client:
        handle = client.request(SUBMIT_JOB, b"fn", b"", b"data", expect=JOB_CREATED)
        for attempt in range(2):
            wait_until(lambda: status(server.address).get("fn", (0,))[0:2] == (1, 0))
            with server.connect() as worker:
                assert assign_to(worker, b"fn") == handle, f"attempt {attempt + 1}"
            # Losing the worker requeues the job; losing the second one fails it.

        assert client.recv() == (WORK_FAIL, handle)


@both_servers
@pytest.mark.parametrize(("wakeup", "woken"), [("1", 1), ("0", 3)])
def test_worker_wakeup_limits_noops_per_job(start_server, wakeup, woken):
    server = start_server("--worker-wakeup", wakeup)
    workers = [server.connect(timeout=0.5) for _ in range(3)]
    try:
        for worker in workers:
            worker.send(CAN_DO, b"fn")
            worker.send(PRE_SLEEP)
            # Replies come in request order: once ECHO answers, the worker is asleep.
            assert worker.request(ECHO_REQ, b"asleep?", expect=ECHO_RES) == b"asleep?"

        with server.connect() as client:
            client.request(SUBMIT_JOB_BG, b"fn", b"", b"data", expect=JOB_CREATED)

            woken_up = 0
            for worker in workers:
                try:
                    assert worker.recv() == (NOOP, b"")
                    woken_up += 1
                except TimeoutError:
                    pass
    finally:
        for worker in workers:
            worker.close()

    assert woken_up == woken
