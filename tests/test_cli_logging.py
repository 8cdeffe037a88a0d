"""The server's log: what reaches it at the default level, and SIGHUP (logrotate).

logrotate renames the log file away and sends SIGHUP; the server must keep serving, keep its
pid file, and write its next lines to a new file at the configured path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import pytest
from servers import HOST, admin, echo, free_port, wait_until
from test_cli_support import (
    ForegroundServer,
    log_lines,
    pid_alive,
    run_jobserver,
    stop_daemon,
    wait_for_log,
)

pytest_plugins = ["test_cli_support"]  # its fixtures: daemon_pids, foreground_servers, ...


def start_logging_server(mode: str, tmp_path: Path, started, *args: str) -> tuple[int, int]:
    """A server logging to tmp_path/jobserver.log with its pid in tmp_path/jobserver.pid, in
    the foreground or as a daemon; returns (pid, port) once it serves."""
    log_file, pid_file = tmp_path / "jobserver.log", tmp_path / "jobserver.pid"
    options = ["--log-file", str(log_file), "--pid-file", str(pid_file), *args]
    options += ["--data-dir", str(tmp_path / "data")]
    if mode == "foreground":
        server = ForegroundServer(*options, workdir=tmp_path)
        started["foreground"].append(server)
        return server.pid, server.port
    port = free_port()
    result = run_jobserver("-d", "-L", HOST, "-p", str(port), *options, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, ""), result
    pid = int(pid_file.read_text())
    started["daemons"].append(pid)
    return pid, port


@pytest.fixture
def started(foreground_servers, daemon_pids):
    return {"foreground": foreground_servers, "daemons": daemon_pids}


modes = pytest.mark.parametrize("mode", ["foreground", "daemon"])


# --- SIGHUP -------------------------------------------------------------------------------------


@modes
def test_sighup_reopens_a_log_file_renamed_away_and_keeps_serving(mode, tmp_path, started):
    pid, port = start_logging_server(mode, tmp_path, started)
    log_file, rotated = tmp_path / "jobserver.log", tmp_path / "jobserver.log.1"
    wait_for_log(log_file, f"port {port}")
    log_file.rename(rotated)  # what logrotate does before it sends SIGHUP

    os.kill(pid, signal.SIGHUP)

    assert f"log file {log_file} reopened" in wait_for_log(log_file, "SIGHUP received")
    assert echo(HOST, port, b"after SIGHUP") == b"after SIGHUP"
    assert pid_alive(pid)
    assert (tmp_path / "jobserver.pid").read_text() == f"{pid}\n"
    assert not any("SIGHUP" in line for line in log_lines(rotated))  # new lines, new file

    os.kill(pid, signal.SIGTERM)

    wait_for_log(log_file, "SIGTERM received: shutting down")
    wait_until(lambda: not pid_alive(pid), timeout=10, what="the server to exit")
    assert not (tmp_path / "jobserver.pid").exists()


def test_sighup_twice_keeps_writing_to_the_file_at_the_path(tmp_path, started):
    pid, port = start_logging_server("foreground", tmp_path, started)
    log_file = tmp_path / "jobserver.log"
    wait_for_log(log_file, f"port {port}")

    for rotation in (1, 2):
        log_file.rename(tmp_path / f"jobserver.log.{rotation}")
        os.kill(pid, signal.SIGHUP)
        wait_for_log(log_file, "reopened", what=f"the log reopened after rotation {rotation}")

    assert echo(HOST, port) == b"ping"
    assert [sum("reopened" in line for line in log_lines(tmp_path / name)) for name in
            ("jobserver.log.1", "jobserver.log.2", "jobserver.log")] == [0, 1, 1]  # fmt: skip


def test_sighup_when_the_log_cannot_be_reopened_keeps_the_old_file(tmp_path, started):
    logs = tmp_path / "logs"
    logs.mkdir()
    log_file = logs / "jobserver.log"
    server = ForegroundServer(
        *["--log-file", str(log_file), "--data-dir", str(tmp_path / "data")], workdir=tmp_path
    )
    started["foreground"].append(server)
    wait_for_log(log_file, f"port {server.port}")
    logs.rename(tmp_path / "moved")  # the path's directory is gone: nothing to reopen into

    server.proc.send_signal(signal.SIGHUP)

    line = wait_for_log(tmp_path / "moved" / "jobserver.log", "SIGHUP received")
    assert f"cannot reopen log file {log_file}" in line
    assert echo(HOST, server.port) == b"ping"
    assert server.stop() == 0


def test_sighup_with_the_log_on_stderr_is_logged_and_ignored(tmp_path, started):
    pid_file = tmp_path / "jobserver.pid"
    server = ForegroundServer(
        *["--pid-file", str(pid_file), "--data-dir", str(tmp_path / "data")], workdir=tmp_path
    )
    started["foreground"].append(server)

    server.proc.send_signal(signal.SIGHUP)

    wait_until(lambda: "SIGHUP received" in server.stderr_text(), what="SIGHUP logged")
    assert echo(HOST, server.port) == b"ping"
    assert pid_file.read_text() == f"{server.pid}\n"
    assert server.stop() == 0
    assert "Traceback" not in server.stderr_text()


def test_a_daemon_without_a_log_file_ignores_sighup(tmp_path, daemon_pids):
    pid_file = tmp_path / "jobserver.pid"
    port = free_port()
    result = run_jobserver(
        "-d", "-L", HOST, "-p", str(port), "--pid-file", str(pid_file), cwd=tmp_path
    )
    assert (result.returncode, result.stderr) == (0, ""), result
    pid = int(pid_file.read_text())
    daemon_pids.append(pid)

    os.kill(pid, signal.SIGHUP)

    assert echo(HOST, port) == b"ping"  # answered after the signal was handled (or queued)
    assert pid_alive(pid)
    assert pid_file.read_text() == f"{pid}\n"
    stop_daemon(pid)
    assert not pid_file.exists()


# --- what the log file gets at the default level -----------------------------------------------


@modes
def test_lifecycle_events_reach_the_log_file_at_the_default_level(mode, tmp_path, started):
    pid, port = start_logging_server(mode, tmp_path, started)
    log_file = tmp_path / "jobserver.log"

    assert f"(pid {pid}) listening on 127.0.0.1 port {port}" in wait_for_log(
        log_file, "NOTICE jobserver"
    )
    database = tmp_path / "data" / f"jobserver-{port}.sqlite3"
    assert f"NOTICE store opened: {database} (background jobs loaded: 0)" in wait_for_log(
        log_file, "store opened"
    )
    assert admin(f"{HOST}:{port}", "verbose") == b"OK NOTICE\n"

    os.kill(pid, signal.SIGTERM)

    wait_for_log(log_file, "NOTICE SIGTERM received: shutting down")
    wait_for_log(log_file, "NOTICE stopped")
    wait_until(lambda: not pid_alive(pid), timeout=10, what="the server to exit")


def test_a_misbehaving_peer_reaches_the_log_file_at_the_default_level(tmp_path, started):
    _, port = start_logging_server("foreground", tmp_path, started)
    log_file = tmp_path / "jobserver.log"

    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"\0RXQ" + b"\0" * 8)  # bad magic: the server drops the connection
        sock.recv(1)

    wait_for_log(log_file, " ERROR ", what="the bad peer logged at ERROR")


def test_verbose_error_keeps_lifecycle_lines_out_of_the_log(tmp_path):
    log_file = tmp_path / "jobserver.log"
    server = ForegroundServer(
        *["--log-file", str(log_file), "--verbose", "ERROR"],
        *["--data-dir", str(tmp_path / "data")],
        workdir=tmp_path,
    )
    assert server.stop() == 0

    assert log_lines(log_file) == []  # the level is what keeps them out: it can fail


def test_a_limit_hit_reaches_the_log_file_at_the_default_level(tmp_path, started):
    _, port = start_logging_server("foreground", tmp_path, started, "--max-connections", "1")
    log_file = tmp_path / "jobserver.log"

    # The readiness probe's connection may still hold the slot for a moment: retry (bounded).
    admitted = wait_until(lambda: admitted_connection(port), what="a connection admitted")
    with (
        admitted,
        socket.create_connection((HOST, port), timeout=5) as refused,
        contextlib.suppress(ConnectionResetError),  # a reset is a close, too
    ):
        assert refused.recv(1) == b""  # closed at once, never served

    line = wait_for_log(log_file, "refused")  # rate-limited: one line for a burst
    assert line.split()[2] in ("WARNING", "ERROR")


def admitted_connection(port: int) -> socket.socket | None:
    """A connection the server answers (so it holds a slot), or None if it was refused."""
    sock = socket.create_connection((HOST, port), timeout=5)
    try:
        sock.sendall(b"version\n")
        if sock.recv(100).startswith(b"OK"):
            return sock
    except ConnectionError:
        pass
    sock.close()
    return None


def test_the_limits_options_reach_the_server_and_its_log(tmp_path, started):
    limits = ["--max-connections", "7", "--memory-budget", "1000000", "--read-timeout", "0"]
    start_logging_server("foreground", tmp_path, started, *limits)

    line = wait_for_log(tmp_path / "jobserver.log", "NOTICE limits:")

    assert line.endswith("limits: 7 connections, memory budget 1000000 bytes, read timeout off")


def test_the_default_limits_are_derived_and_logged(tmp_path, started):
    start_logging_server("foreground", tmp_path, started)

    line = wait_for_log(tmp_path / "jobserver.log", "NOTICE limits:")

    assert line.endswith(" s") and "read timeout 30 s" in line
