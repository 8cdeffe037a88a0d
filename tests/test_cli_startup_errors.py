"""A server that cannot start says why in one line naming the file or port and the cause, and
exits non-zero: in the foreground on its own stderr, as a daemon through its parent (which
prints the daemon's reason, not "exited before it was ready").

Permission cases run the server without root's capabilities when the tests run as root (root
may write anywhere); see test_cli_support.unprivileged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import HOST, free_port
from test_cli_support import (
    ForegroundServer,
    one_line,
    read_only_dir,
    run_jobserver,
    unprivileged,
)

modes = pytest.mark.parametrize("mode", [[], ["-d"]], ids=["foreground", "daemon"])

pytest_plugins = ["test_cli_support"]  # its fixtures: busy_port, daemon_pids, ...


def start(mode: list[str], *args: str, cwd: Path, prefix: list[str] | None = None):
    return run_jobserver(*mode, "-L", HOST, "-p", str(free_port()), *args, cwd=cwd, prefix=prefix)


# --- the port and the address ---------------------------------------------------------------


@modes
def test_a_busy_port_is_one_line_naming_the_port(mode, busy_port, tmp_path):
    result = run_jobserver(
        *mode, "-L", HOST, "-p", str(busy_port), "--store", "memory", cwd=tmp_path
    )

    line = one_line(result)
    assert f"port {busy_port}" in line
    assert "in use" in line


@modes
@pytest.mark.parametrize("address", ["192.0.2.1", "no-such-host.invalid"])
def test_an_address_we_cannot_listen_on_is_one_line_naming_it(mode, address, tmp_path):
    result = start(mode, "-L", address, "--store", "memory", cwd=tmp_path)

    line = one_line(result)
    assert f"cannot listen on {address} port" in line


# --- the log file ------------------------------------------------------------------------------


@modes
@pytest.mark.parametrize(
    ("where", "cause"),
    [("missing/jobserver.log", "No such file or directory"), ("a-directory", "Is a directory")],
)
def test_a_log_file_that_cannot_be_opened_is_one_line_naming_it(mode, where, cause, tmp_path):
    (tmp_path / "a-directory").mkdir()
    log_file = tmp_path / where

    result = start(mode, "--log-file", str(log_file), "--store", "memory", cwd=tmp_path)

    assert one_line(result) == f"jobserver: cannot open log file {log_file}: {cause}"


@modes
def test_an_unwritable_log_file_is_one_line_naming_it(mode, tmp_path):
    log_file = read_only_dir(tmp_path) / "jobserver.log"

    result = start(
        mode, "--log-file", str(log_file), "--store", "memory", cwd=tmp_path, prefix=unprivileged()
    )

    assert one_line(result) == f"jobserver: cannot open log file {log_file}: Permission denied"


# --- the pid file ------------------------------------------------------------------------------


@modes
@pytest.mark.parametrize(
    ("where", "cause"),
    [("missing/jobserver.pid", "No such file or directory"), ("a-directory", "Is a directory")],
)
def test_a_bad_pid_file_is_one_line_naming_it(mode, where, cause, tmp_path):
    (tmp_path / "a-directory").mkdir()
    pid_file = tmp_path / where

    result = start(mode, "--pid-file", str(pid_file), "--store", "memory", cwd=tmp_path)

    assert one_line(result) == f"jobserver: cannot write pid file {pid_file}: {cause}"
    assert (tmp_path / "a-directory").is_dir()  # not replaced, not removed


@modes
def test_an_unwritable_pid_file_is_one_line_naming_it(mode, tmp_path):
    pid_file = read_only_dir(tmp_path) / "jobserver.pid"

    result = start(
        mode, "--pid-file", str(pid_file), "--store", "memory", cwd=tmp_path, prefix=unprivileged()
    )

    assert one_line(result) == f"jobserver: cannot write pid file {pid_file}: Permission denied"


@modes
def test_a_pid_file_is_checked_before_the_port_is_taken(mode, busy_port, tmp_path):
    # Both are wrong: the pid file is reported, so it is checked first (before binding).
    pid_file = tmp_path / "missing" / "jobserver.pid"
    result = run_jobserver(
        *mode, "-L", HOST, "-p", str(busy_port), "--pid-file", str(pid_file), cwd=tmp_path
    )

    assert "cannot write pid file" in one_line(result)


@modes
def test_a_failed_start_leaves_an_existing_pid_file_alone(mode, busy_port, tmp_path):
    """A second server started by mistake with the pid file of a running one must not
    overwrite it, nor remove it when it fails."""
    pid_file = tmp_path / "jobserver.pid"
    pid_file.write_text("12345\n")

    result = run_jobserver(
        *mode, "-L", HOST, "-p", str(busy_port), "--pid-file", str(pid_file), cwd=tmp_path
    )

    assert f"port {busy_port}" in one_line(result)
    assert pid_file.read_text() == "12345\n"


@modes
def test_a_failed_start_removes_the_pid_file_it_created(mode, busy_port, tmp_path):
    pid_file = tmp_path / "jobserver.pid"

    result = run_jobserver(
        *mode, "-L", HOST, "-p", str(busy_port), "--pid-file", str(pid_file), cwd=tmp_path
    )

    assert f"port {busy_port}" in one_line(result)
    assert not pid_file.exists()


# --- the data directory ------------------------------------------------------------------------


@modes
@pytest.mark.parametrize("where", ["a-file", "a-file/below-it"])
def test_a_data_dir_that_is_not_a_directory_is_one_line_naming_it(mode, where, tmp_path):
    (tmp_path / "a-file").write_text("not a directory\n")
    data_dir = tmp_path / where

    result = start(mode, "--data-dir", str(data_dir), cwd=tmp_path)

    line = one_line(result)
    assert str(data_dir) in line
    assert "directory" in line


@modes
def test_an_unwritable_data_dir_is_one_line_naming_it(mode, tmp_path):
    data_dir = read_only_dir(tmp_path)

    result = start(mode, "--data-dir", str(data_dir), cwd=tmp_path, prefix=unprivileged())

    line = one_line(result)
    assert str(data_dir) in line
    assert "ermission" in line  # "Permission denied", "permission", ...


@modes
def test_a_store_held_by_a_running_server_is_one_line_naming_the_file_and_holder(
    mode,
    tmp_path,
    foreground_servers,
):
    data_dir = tmp_path / "data"
    holder = ForegroundServer("--data-dir", str(data_dir), workdir=tmp_path)
    foreground_servers.append(holder)

    result = run_jobserver(
        *mode, "-L", HOST, "-p", str(holder.port), "--data-dir", str(data_dir), cwd=tmp_path
    )

    line = one_line(result)
    assert f"jobserver-{holder.port}.sqlite3" in line
    assert str(holder.pid) in line
