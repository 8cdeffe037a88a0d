"""Real job servers as subprocesses, for tests that talk to them over TCP.

Everything here is synchronous and bounded in time: a server that does not answer an ECHO
within its start timeout is killed and reported with its stderr, and `stop()` escalates from
SIGTERM to SIGKILL. Processes are only ever stopped by their own PID.

The Gearman framing is built by hand here on purpose: these helpers check the servers,
so they must not depend on the code under test (jobserver/protocol.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
GEARMAND = "/usr/sbin/gearmand"
GEARMAN = "/usr/bin/gearman"
GEARADMIN = "/usr/bin/gearadmin"
REPO_ROOT = Path(__file__).resolve().parent.parent

START_TIMEOUT = 15.0  # seconds until the server must answer ECHO
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL (gearmand takes 1-4 s)
IO_TIMEOUT = 5.0  # seconds for any single socket exchange

REQ = b"\0REQ"
RES = b"\0RES"

# Packet type numbers (protocol reference §2), only those the tests send or expect.
CAN_DO = 1
PRE_SLEEP = 4
NOOP = 6
SUBMIT_JOB = 7
JOB_CREATED = 8
GRAB_JOB = 9
JOB_ASSIGN = 11
WORK_FAIL = 14
ECHO_REQ = 16
ECHO_RES = 17
SUBMIT_JOB_BG = 18
SET_CLIENT_ID = 22
WORK_EXCEPTION = 25
GRAB_JOB_UNIQ = 30
JOB_ASSIGN_UNIQ = 31
SUBMIT_JOB_HIGH_BG = 32
SUBMIT_JOB_LOW_BG = 34

# Admin commands whose reply is a list ending in a "." line (protocol reference §4).
LIST_COMMANDS = {
    ("workers",),
    ("status",),
    ("prioritystatus",),
    ("show", "jobs"),
    ("show", "unique"),
    ("show", "dead"),
}


class ServerStartError(RuntimeError):
    """The server process exited or did not become ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def pack_request(packet_type: int, *args: bytes) -> bytes:
    """One binary request packet: arguments joined by NUL, no NUL after the last."""
    data = b"\0".join(args)
    return REQ + struct.pack(">II", packet_type, len(data)) + data


class Connection:
    """A blocking binary-protocol connection with a deadline on every read."""

    def __init__(self, host: str, port: int, timeout: float = IO_TIMEOUT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self._buffer = bytearray()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, packet_type: int, *args: bytes) -> None:
        self.sock.sendall(pack_request(packet_type, *args))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next response packet as (type, payload). ConnectionError on EOF, TimeoutError
        when none is complete within `timeout` (default: the connection's)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self._buffer) >= 12:
                magic, packet_type, length = struct.unpack_from(">4sII", self._buffer)
                if magic != RES:
                    raise ValueError(f"bad response magic {bytes(self._buffer[:12])!r}")
                if len(self._buffer) >= 12 + length:
                    payload = bytes(self._buffer[12 : 12 + length])
                    del self._buffer[: 12 + length]
                    return packet_type, payload
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply in time; buffered {bytes(self._buffer[:60])!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise TimeoutError(
                    f"no reply in time; buffered {bytes(self._buffer[:60])!r}"
                ) from None
            if not chunk:
                raise ConnectionError("server closed the connection")
            self._buffer += chunk

    def request(self, packet_type: int, *args: bytes, expect: int) -> bytes:
        """Send one request and return the payload of its reply of type `expect`."""
        self.send(packet_type, *args)
        reply_type, payload = self.recv()
        if reply_type != expect:
            raise ValueError(f"expected packet type {expect}, got {reply_type}: {payload!r}")
        return payload


def echo(host: str, port: int, data: bytes = b"ping", timeout: float = IO_TIMEOUT) -> bytes:
    """One ECHO_REQ round trip on a fresh connection; returns the echoed bytes."""
    with Connection(host, port, timeout) as conn:
        return conn.request(ECHO_REQ, data, expect=ECHO_RES)


def port_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def admin(address: str, line: str | bytes, timeout: float = IO_TIMEOUT) -> bytes:
    """Send one admin text line (LF added if missing) and return the complete reply.

    List commands (status, workers, show ...) reply with lines ending in a "." line, or with
    a single ERR line; every other command replies with one line.
    """
    host, _, port = address.rpartition(":")
    if isinstance(line, str):
        line = line.encode()
    if not line.endswith(b"\n"):
        line += b"\n"
    words = tuple(line.decode(errors="replace").lower().split())
    is_list = words[:1] in LIST_COMMANDS or words[:2] in LIST_COMMANDS
    deadline = time.monotonic() + timeout
    reply = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(line)
        while not _admin_reply_complete(reply, is_list):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection after {reply!r}")
            reply += chunk
    return reply


def _admin_reply_complete(reply: bytes, is_list: bool) -> bool:
    if not reply.endswith(b"\n"):
        return False
    if not is_list or reply == b".\n" or reply.endswith(b"\n.\n"):
        return True
    return reply.startswith(b"ERR ") and reply.count(b"\n") == 1


class Server:
    """A job server subprocess listening on host:port."""

    def __init__(self, name: str, argv: list[str], host: str, port: int, workdir: Path):
        self.name = name
        self.argv = argv
        self.host = host
        self.port = port
        self.workdir = workdir
        self.stderr_path = workdir / "stderr.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            cwd=REPO_ROOT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} at {self.address}>"

    def connect(self, timeout: float = IO_TIMEOUT) -> Connection:
        return Connection(self.host, self.port, timeout)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the server answers ECHO; raise ServerStartError otherwise."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {self.proc.returncode} before it was "
                    f"ready; argv={self.argv}\nstderr:\n{self.stderr_text()}"
                )
            try:
                if echo(self.host, self.port, b"ready?", timeout=1.0) == b"ready?":
                    return
            except (OSError, ValueError) as exc:
                last_error = exc
            time.sleep(0.05)
        self.stop()
        raise ServerStartError(
            f"{self.name} did not answer ECHO within {timeout}s ({last_error!r}); "
            f"argv={self.argv}\nstderr:\n{self.stderr_text()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        stop_process(self.proc, timeout)
        self._stderr.close()
        return self.proc.returncode

    def remove_workdir(self) -> None:
        """Delete the stderr log and other files; call after the last stderr_text()."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def _start(name: str, make_argv, port: int | None, attempts: int = 3) -> Server:
    """Start a server on a free port; retry on a new port if another process took it."""
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{chosen}-"))
        server = Server(name, make_argv(chosen, workdir), HOST, chosen, workdir)
        try:
            server.wait_ready()
            return server
        except ServerStartError:
            server.stop()
            in_use = "in use" in server.stderr_text().lower()
            server.remove_workdir()
            if port is not None or not in_use or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def jobserver_argv(port: int, *extra_args: str, data_dir: Path | None = None) -> list[str]:
    """The command line of a test jobserver. Its sqlite store goes to `data_dir` (never the
    repository) unless the arguments choose a store or a directory themselves."""
    argv = [sys.executable, "-m", "jobserver", "-L", HOST, "-p", str(port), *extra_args]
    chooses_store = any(arg.startswith(("--data-dir", "--store")) for arg in extra_args)
    if data_dir is not None and not chooses_store:
        argv += ["--data-dir", str(data_dir)]
    return argv


def start_jobserver(
    *extra_args: str,
    port: int | None = None,
    data_dir: Path | None = None,
    prlimit: tuple[str, ...] = (),
) -> Server:
    """Run `python -m jobserver` in the foreground on 127.0.0.1. Its jobs are stored in
    `data_dir` if given (pass the same one to a restart to reload them), else in a fresh
    directory of its own. `prlimit` options (e.g. "--as=1073741824", "--nofile=64") run it
    under util-linux's prlimit, so resource tests stay small."""

    def argv(chosen: int, workdir: Path) -> list[str]:
        command = jobserver_argv(chosen, *extra_args, data_dir=data_dir or workdir / "data")
        return (
            [shutil.which("prlimit") or "prlimit", *prlimit, "--", *command] if prlimit else command
        )

    return _start("jobserver", argv, port)


def start_gearmand(*extra_args: str, port: int | None = None) -> Server:
    """Run Debian's gearmand in the foreground on 127.0.0.1 (never daemonised)."""

    def argv(p: int, workdir: Path) -> list[str]:
        config = workdir / "gearmand.conf"
        config.write_text("")
        return [
            GEARMAND,
            "-L",
            HOST,
            "-p",
            str(p),
            "--log-file=stderr",
            f"--pid-file={workdir / 'gearmand.pid'}",
            # Do not read /etc/gearmand.conf: the test server must not depend on the host.
            f"--config-file={config}",
            "--threads=2",
            *extra_args,
        ]

    return _start("gearmand", argv, port)


def missing_gearman_binaries() -> list[str]:
    return [path for path in (GEARMAND, GEARMAN, GEARADMIN) if shutil.which(path) is None]


def gearman_tool_env() -> dict[str, str]:
    """Environment for gearman/gearadmin runs: no inherited GEARMAN_* surprises."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GEARMAN")}


def status(address: str) -> dict[str, tuple[int, int, int]]:
    """The admin `status` table: function -> (total, running, workers)."""
    table = {}
    for line in admin(address, "status").decode().splitlines():
        if line == ".":
            break
        name, total, running, workers = line.split("\t")
        table[name] = (int(total), int(running), int(workers))
    return table


def wait_until(predicate, timeout: float = IO_TIMEOUT, interval: float = 0.02, what: str = ""):
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class GearmanCLI:
    """Debian's `gearman` command pointed at one server; every process it starts is bounded.

    Use as a context manager: workers and clients still running at exit are stopped by PID.
    """

    def __init__(self, server: Server, timeout: float = 30.0):
        self.server = server
        self.timeout = timeout
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> GearmanCLI:
        return self

    def __exit__(self, *exc_info) -> None:
        for proc in self.processes:
            stop_process(proc)

    def argv(self, *args: str) -> list[str]:
        return [GEARMAN, "-h", self.server.host, "-p", str(self.server.port), *args]

    def run(self, *args: str, input: bytes = b"") -> subprocess.CompletedProcess:
        """Run a client to completion (fails the test if it outlives the timeout)."""
        return subprocess.run(
            self.argv(*args),
            input=input,
            capture_output=True,
            timeout=self.timeout,
            env=gearman_tool_env(),
        )

    def spawn(self, *args: str, input: bytes | None = None) -> subprocess.Popen:
        """Start a client or worker in the background; collect it with `finish`."""
        proc = subprocess.Popen(
            self.argv(*args),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=gearman_tool_env(),
        )
        self.processes.append(proc)
        if input is not None:
            proc.stdin.write(input)
            proc.stdin.close()
        return proc

    def finish(self, proc: subprocess.Popen) -> tuple[int, bytes, bytes]:
        """Wait for a spawned process; returns (exit status, stdout, stderr)."""
        stdout, stderr = proc.communicate(timeout=self.timeout)
        return proc.returncode, stdout, stderr

    def worker(self, function: str, *command: str, options: tuple[str, ...] = ()):
        """Start `gearman -w -f FUNCTION -- COMMAND...` and wait until it is registered."""
        before = status(self.server.address).get(function, (0, 0, 0))[2]
        proc = self.spawn("-w", *options, "-f", function, "--", *command)
        wait_until(
            lambda: (
                proc.poll() is not None
                or status(self.server.address).get(function, (0, 0, 0))[2] > before
            ),
            what=f"a worker for {function!r} to register",
        )
        # A worker with `-c N` may legitimately finish queued jobs and exit before we look.
        if proc.poll():
            raise RuntimeError(f"gearman worker failed: {proc.communicate()}")
        return proc
