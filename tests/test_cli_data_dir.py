"""Where the sqlite store goes without --data-dir: an absolute directory that does not depend
on where the server was started (the old default, ./jobserver-data, made a restart from
another directory come up with an empty queue).

As root the default is /var/lib/jobserver, which tests must not write: when root runs them,
the server runs in a user namespace (`unshare --user`), where its euid is not 0 and it
chooses $XDG_STATE_HOME/jobserver like any user, while keeping root's access to our files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servers import HOST, JOB_CREATED, SUBMIT_JOB_BG, Connection, status, wait_until
from test_cli_support import COMMAND_TIMEOUT, JOBSERVER, ForegroundServer

pytest_plugins = ["test_cli_support"]  # its fixtures: foreground_servers, ...


@pytest.fixture
def as_a_user() -> list[str]:
    """The command prefix that runs a child with an euid other than 0."""
    if os.geteuid() != 0:
        return []
    prefix = ["unshare", "--user", "--"]
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare (util-linux) to leave euid 0")
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=COMMAND_TIMEOUT)
    if probe.returncode != 0:
        pytest.skip(f"unshare --user is not permitted here: {probe.stderr.decode().strip()}")
    return prefix


@pytest.fixture
def user_env(tmp_path) -> dict[str, str]:
    """An environment whose XDG state directory (and home) are under tmp_path."""
    return dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), HOME=str(tmp_path / "home"))


def test_help_names_the_default_data_dir_of_the_user(as_a_user, user_env, tmp_path):
    result = subprocess.run(
        [*as_a_user, *JOBSERVER, "--help"],
        env=user_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )

    assert result.returncode == 0, result.stderr
    help_text = "".join(result.stdout.split())  # undo the wrapping (click breaks long paths)
    assert f"[default:{tmp_path / 'state' / 'jobserver'}]" in help_text


def test_help_names_what_default_data_dir_chooses_for_whoever_runs_it(tmp_path):
    """Also as root (/var/lib/jobserver): --help only reads the default, never writes it."""
    chosen = subprocess.run(
        [sys.executable, "-c", "from jobserver.store.location import default_data_dir as d; "
         "print(d())"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True,
    ).stdout.strip()  # fmt: skip
    result = subprocess.run(
        [*JOBSERVER, "--help"], cwd=tmp_path, capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT,
    )  # fmt: skip

    assert Path(chosen).is_absolute()
    assert f"[default:{chosen}]" in "".join(result.stdout.split())


def test_a_restart_from_another_directory_finds_the_same_jobs(
    as_a_user, user_env, tmp_path, foreground_servers
):
    first_cwd, second_cwd = tmp_path / "started-here", tmp_path / "restarted-there"
    first_cwd.mkdir()
    second_cwd.mkdir()
    database = tmp_path / "state" / "jobserver"

    server = ForegroundServer(workdir=tmp_path, cwd=first_cwd, prefix=as_a_user, env=user_env)
    foreground_servers.append(server)
    port = server.port
    with Connection(HOST, port) as client:
        client.request(SUBMIT_JOB_BG, b"kept", b"unique-1", b"payload", expect=JOB_CREATED)
    assert server.stop() == 0
    # The path is printed at start, at the default level (stderr in the foreground).
    assert f"store opened: {database / f'jobserver-{port}.sqlite3'}" in server.stderr_text()

    again = ForegroundServer(
        workdir=tmp_path, cwd=second_cwd, prefix=as_a_user, env=user_env, port=port
    )
    foreground_servers.append(again)

    assert wait_until(lambda: status(f"{HOST}:{port}").get("kept")) == (1, 0, 0)
    assert "(background jobs loaded: 1)" in again.stderr_text()
    assert not any(first_cwd.iterdir()) and not any(second_cwd.iterdir())
