"""Helpers for the `jobserver` command-line tests: running it to completion, running it as a
real foreground or daemon server (optionally as an unprivileged user), and reading its log.

Nothing here is a test. Every wait is bounded; processes are stopped by their own PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import HOST, STOP_TIMEOUT, echo, free_port, stop_process, wait_until

COMMAND_TIMEOUT = 30.0
"""Seconds for any jobserver invocation that should exit by itself (a daemon's parent waits
for the daemon to listen, which takes well under a second)."""

START_TIMEOUT = 15.0
"""Seconds until a foreground server must answer ECHO (as tests/servers.py)."""

JOBSERVER = [sys.executable, "-m", "jobserver"]

WITHOUT_CAPABILITIES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
"""What runs a child of root without the capabilities that let root write anywhere: it stays
uid 0, so it is only the owner of our files, and a 0555 directory stops it."""


def chooses_store(args: tuple[str, ...] | list[str]) -> bool:
    return any(arg.startswith(("--data-dir", "--store")) for arg in args)


def unprivileged() -> list[str]:
    """The command prefix that runs a child without the power to write where the mode bits
    forbid it: setpriv dropping every capability when we are root (root may write anywhere;
    util-linux's setpriv), nothing otherwise."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux) to drop capabilities")
    return WITHOUT_CAPABILITIES


def read_only_dir(parent: Path) -> Path:
    """A directory we may enter but not write, once our capabilities are dropped (0555)."""
    path = parent / "read-only"
    path.mkdir()
    path.chmod(0o555)
    return path


def run_jobserver(
    *args: str, cwd: Path, data_dir: Path | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Run `jobserver ARGS` until it exits (a daemon's parent exits once the daemon listens),
    after the command `prefix` if any. Its store goes to `data_dir`, or to cwd/data, never to
    the default directory."""
    argv = [*(prefix or []), *JOBSERVER, *args]
    if not chooses_store(args):
        argv += ["--data-dir", str(data_dir or cwd / "data")]
    return subprocess.run(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_daemon(pid: int) -> None:
    """SIGTERM a daemon we started, then SIGKILL if it has not gone within STOP_TIMEOUT."""
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not pid_alive(pid), timeout=STOP_TIMEOUT, what=f"daemon {pid} to exit")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemon_pids() -> Iterator[list[int]]:
    """Daemons we started (they are not our children): stopped by PID if a test leaves one."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        stop_daemon(pid)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port with a plain listening socket on it, so nothing else can bind there."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        yield sock.getsockname()[1]


class ForegroundServer:
    """`jobserver ARGS -L 127.0.0.1 -p PORT` in the foreground, its stderr in a file; started
    after the command `prefix` if any, in `env` if given."""

    def __init__(
        self,
        *args: str,
        workdir: Path,
        cwd: Path | None = None,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.argv = [*(prefix or []), *JOBSERVER, "-L", HOST, "-p", str(self.port), *args]
        self.stderr_path = workdir / f"stderr-{self.port}.log"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=cwd or workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"jobserver exited with {self.proc.returncode}: {self.stderr_text()}"
                )
            try:
                if echo(HOST, self.port, b"ready?", timeout=1.0) == b"ready?":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"jobserver did not answer ECHO: {self.stderr_text()}")

    def stop(self) -> int:
        stop_process(self.proc)
        return self.proc.returncode


@pytest.fixture
def foreground_servers() -> Iterator[list[ForegroundServer]]:
    """Append ForegroundServers here; each is stopped by its PID when the test ends."""
    started: list[ForegroundServer] = []
    yield started
    for server in started:
        server.stop()


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single line a failed start prints on stderr, after checking it is exactly one."""
    assert result.returncode != 0, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jobserver: "), result.stderr
    return lines[0]


def log_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def wait_for_log(path: Path, text: str, what: str = "") -> str:
    """The first line of the file at `path` that contains `text`, waiting for it (bounded)."""

    def found() -> str | None:
        return next((line for line in log_lines(path) if text in line), None)

    return wait_until(found, timeout=START_TIMEOUT, what=what or f"{text!r} in {path}")
