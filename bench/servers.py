"""The servers under test: how to start each one on a free 127.0.0.1 port, and measure it.

Every server runs in the foreground as our child, with its output in a work directory of its
own, and is stopped by its own PID (SIGTERM, then SIGKILL). Memory is VmRSS from
/proc/PID/status, open connections are counted in /proc/PID/fd.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jobserver.protocol import Decoder, encode_request
from jobserver.protocol import PacketType as T

from .tls import ClientTls, RunCertificates

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
GEARMAND = "/usr/sbin/gearmand"
RATE_SCENARIOS = "abcd"
"""The rate scenarios, the only ones the instruments (the ceiling and the floors) run in."""
FLOOR = "trio-floor"
"""The column of bench/trio_floor.py (`--floor`)."""
STORE_WAITS = {"jobserver-wait-0ms": 0.0, "jobserver-wait-0.3ms": 0.0003}
"""The columns of bench/waiting_store.py (`--floor`), in (b) only: jobserver's durable path
with a store whose commit costs nothing, and one that only waits about this machine's
fdatasync (0.2-0.3 ms alone; bench/RESULTS.md)."""

GEARMAND_THREADS = 1
"""gearmand's --threads on this 2-core machine. With N > 0 gearmand runs N I/O threads plus
one processing thread that owns the queues; 0 does everything on one thread. 1 gives two busy
threads for two cores, which the load generator shares. Measured here (four runs each of (b)
and (d)), medians: --threads=1 about 90k submits/s and 22k foreground jobs/s, --threads=0
about 81k and 20k, --threads=2 about 50k and 20k; Debian's default of 4 was slower still
(more threads than cores only adds hand-offs). Override with `--gearmand-threads`."""

GEAR_VERSION = "0.16.0"
"""The `gear` release we compare with (the Python peer named in issue 5)."""

START_TIMEOUT = 20.0
STOP_TIMEOUT = 3.0
"""SIGTERM, then SIGKILL after this: the run's figures are taken by then, and gearmand can take
seconds to stop its threads."""

GEARD_LOG_CONFIG = """\
[loggers]
keys=root
[handlers]
keys=stderr
[formatters]
keys=plain
[logger_root]
level=WARNING
handlers=stderr
[handler_stderr]
class=StreamHandler
level=WARNING
formatter=plain
args=(sys.stderr,)
[formatter_plain]
format=%(asctime)s %(levelname)s %(name)s: %(message)s
"""
"""geard in the foreground (-d) logs at DEBUG unless given a logging config; every packet would
then be formatted and written. WARNING is what the other servers log at by default (ERROR)."""


class ServerStartError(RuntimeError):
    """The server exited or did not answer within START_TIMEOUT."""


@dataclass(frozen=True)
class ServerSpec:
    """One column of the table."""

    name: str
    argv: Callable[[int, Path], list[str]]
    answers_echo: bool = True
    """False for gear: it ignores ECHO_REQ, so probes use GET_STATUS instead."""
    is_job_server: bool = True
    """A real job server: routes jobs to workers and answers the admin `status` command (used
    to check queue counts). False for the canned server and the trio floor."""
    scenarios: str = "abcdef"
    """The scenarios this column runs: the instruments (ceiling, floors) only the rates."""
    routes_jobs: bool = True
    """Hands jobs to workers and their results back to clients; False for the canned server,
    which completes foreground jobs itself."""
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""
    database_counters: Callable[[int], dict[str, int]] | None = None
    """For a store in a database server (PostgreSQL): given the server's port, running totals
    of its database's `commits` and `statements`, read once the server's own counts settled."""
    tls: ClientTls | None = None
    """The server speaks TLS on its port and requires this client certificate: every
    connection to it (load processes, readiness checks, admin `status`) is wrapped."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@functools.cache
def jobserver_help() -> str:
    """`python -m jobserver --help`: which options this checkout's jobserver has."""
    return subprocess.run(
        [sys.executable, "-m", "jobserver", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout


def jobserver_has_store() -> bool:
    """Whether this checkout's jobserver has `--store` (added by the durable-store issue)."""
    return "--store" in jobserver_help()


def jobserver_has_tls() -> bool:
    """Whether this checkout's jobserver serves TLS (`--tls-cert`, issue 15)."""
    return "--tls-cert" in jobserver_help()


def jobserver_specs() -> list[ServerSpec]:
    base = [sys.executable, "-m", "jobserver", "-L", HOST]
    if not jobserver_has_store():
        return [
            ServerSpec(
                "jobserver",
                lambda port, _dir: [*base, "-p", str(port)],
                note="this jobserver has no --store option: memory only",
            )
        ]
    return [
        ServerSpec(
            "jobserver-memory",
            lambda port, _dir: [*base, "-p", str(port), "--store", "memory"],
        ),
        ServerSpec(
            "jobserver-sqlite",
            lambda port, workdir: [
                *base,
                "-p",
                str(port),
                "--store",
                "sqlite",
                "--data-dir",
                str(workdir / "data"),  # a fresh, empty store for every run
            ],
        ),
    ]


def jobserver_tls_spec(certificates: RunCertificates) -> ServerSpec:
    """jobserver-memory with TLS on its Gearman port and client certificates required."""

    def argv(port: int, _dir: Path) -> list[str]:
        return [
            *[sys.executable, "-m", "jobserver", "-L", HOST, "-p", str(port)],
            *["--store", "memory"],
            *["--tls-cert", str(certificates.server_cert)],
            *["--tls-key", str(certificates.server_key), "--tls-ca", str(certificates.ca)],
        ]

    return ServerSpec(
        "jobserver-tls",
        argv,
        tls=certificates.client,
        note="`python -m jobserver --store memory --tls-cert --tls-key --tls-ca`: TLS on its "
        "Gearman port, client certificates required (mTLS); ECDSA P-256 certificates made for "
        "the run by trustme; every load process connects through the SDKs' client context "
        "(jobserver.sdk.tls.client_context) and does TLS in Python's ssl, on the same 2 cores",
    )


def gearmand_spec(threads: int, fd_limit: int) -> ServerSpec:
    def argv(port: int, workdir: Path) -> list[str]:
        config = workdir / "gearmand.conf"
        config.write_text("")
        return [
            GEARMAND,
            "-L",
            HOST,
            "-p",
            str(port),
            "--log-file=stderr",
            f"--pid-file={workdir / 'gearmand.pid'}",
            f"--config-file={config}",  # not /etc/gearmand.conf: the host's settings stay out
            f"--threads={threads}",
            f"--file-descriptors={fd_limit}",
        ]

    return ServerSpec("gearmand", argv)


GEARD_MAIN = "from gear.cmd.geard import main; main()"

GEARD_NODELAY_MAIN = """\
import socket, gear
accepted = gear.ServerConnection.__init__
def with_nodelay(self, addr, conn, *args, **kwargs):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    accepted(self, addr, conn, *args, **kwargs)
gear.ServerConnection.__init__ = with_nodelay
from gear.cmd.geard import main; main()
"""
"""geard as shipped leaves Nagle on: its JOB_CREATED and WORK_COMPLETE to one client are two
small writes, and the second waits for the client's delayed ACK (about 40 ms), which caps (d)
at about 90 jobs/s per client. `--geard-nodelay` adds a column with TCP_NODELAY set on every
accepted connection, to compare with gear's server minus that one setting."""


def gear_spec(pythonpath: str | None, *, nodelay: bool = False) -> ServerSpec:
    def argv(port: int, workdir: Path) -> list[str]:
        log_config = workdir / "geard-logging.ini"
        log_config.write_text(GEARD_LOG_CONFIG)
        # `python -c` runs geard's own entry point with this interpreter; its argparse sees the
        # options after the code string.
        return [
            sys.executable,
            "-c",
            GEARD_NODELAY_MAIN if nodelay else GEARD_MAIN,
            "-d",  # do not daemonise
            "-p",
            str(port),
            "--listen-address",
            HOST,
            "--log-config",
            str(log_config),
        ]

    env = {"PYTHONPATH": pythonpath} if pythonpath else {}
    name = "geard-nodelay" if nodelay else "geard"
    return ServerSpec(name, argv, answers_echo=False, env=env)


def trio_floor_spec() -> ServerSpec:
    """bench/trio_floor.py: the scenarios' job routing on trio and nothing else (issue 16)."""
    return ServerSpec(
        FLOOR,
        lambda port, _dir: [sys.executable, "-m", "bench.trio_floor", "--port", str(port)],
        is_job_server=False,
        scenarios=RATE_SCENARIOS,
        note="bench/trio_floor.py: the scenarios' job routing on trio, nothing else",
    )


def waiting_store_specs() -> list[ServerSpec]:
    """jobserver whose store only waits (bench/waiting_store.py), one column per wait."""

    def spec(name: str, wait: float) -> ServerSpec:
        module = [sys.executable, "-m", "bench.waiting_store", "--wait", str(wait), "--"]
        return ServerSpec(
            name,
            lambda port, _dir: [*module, "-L", HOST, "-p", str(port)],
            scenarios="b",
            note=f"bench/waiting_store.py: jobserver, its store's commit a {wait * 1e3:g} ms wait",
        )

    return [spec(name, wait) for name, wait in STORE_WAITS.items()]


def canned_spec(payload_size: int) -> ServerSpec:
    return ServerSpec(
        "ceiling",
        lambda port, _dir: [
            sys.executable,
            "-m",
            "bench.canned_server",
            "--port",
            str(port),
            "--payload-size",
            str(payload_size),
        ],
        is_job_server=False,
        scenarios=RATE_SCENARIOS,
        routes_jobs=False,
        note="bench/canned_server.py: canned replies, measures the load generator itself",
    )


def gear_cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "jobserver-bench" / f"gear-{GEAR_VERSION}"


def provide_gear() -> tuple[str | None, str | None, str]:
    """Make `gear` importable for geard: (PYTHONPATH to use or None, version or None, note).

    An installed gear is used as it is. Otherwise pip installs gear==GEAR_VERSION into a cache
    directory (not into the project's environment, which may be externally managed), and geard
    runs with that directory on PYTHONPATH. When pip cannot, the geard column is left out and
    the note says why.
    """
    version = _gear_version(None)
    if version:
        return None, version, ""
    target = gear_cache_dir()
    if not _gear_version(str(target)):
        print(f"bench: installing gear=={GEAR_VERSION} into {target} with pip", flush=True)
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
                str(target),
                f"gear=={GEAR_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if completed.returncode != 0:
            reason = (completed.stderr.strip().splitlines() or ["no output"])[-1]
            return None, None, f"gear is not installed and pip could not install it: {reason}"
    version = _gear_version(str(target))
    if not version:
        return None, None, f"gear was installed into {target} but does not import"
    return str(target), version, ""


def _gear_version(pythonpath: str | None) -> str | None:
    env = {**os.environ}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.metadata as m, gear.cmd.geard; print(m.version('gear'))",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return completed.stdout.strip() if completed.returncode == 0 else None


def gearmand_version() -> str:
    try:
        out = subprocess.run([GEARMAND, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as error:
        return f"unavailable ({error.strerror})"
    match = re.search(r"gearmand (\S+)", out.stdout + out.stderr)
    return match.group(1) if match else (out.stdout + out.stderr).strip()


class RunningServer:
    """One server process on a free port, started for one scenario of one round."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{spec.name}-{self.port}-"))
        self.log_path = self.workdir / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            spec.argv(self.port, self.workdir),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=REPO_ROOT,
            env={**os.environ, **spec.env},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, size: int = 2000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-size:]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Ready means: answers ECHO (or, for gear, the admin `status` command)."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.spec.name} exited with status {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                if self.spec.answers_echo:
                    self.echo(b"ready?")
                else:
                    self.admin_status()
                return
            except (OSError, ValueError) as error:
                last_error = error
            time.sleep(0.05)
        raise ServerStartError(
            f"{self.spec.name} not ready within {timeout} s ({last_error!r}): {self.log_tail()}"
        )

    def connect(self, timeout: float) -> socket.socket:
        """A connection to the server, TLS (handshake done) when the spec says so."""
        sock = socket.create_connection((HOST, self.port), timeout=timeout)
        if self.spec.tls is None:
            return sock
        try:
            return self.spec.tls.wrap(sock, HOST)
        except BaseException:
            sock.close()
            raise

    def echo(self, data: bytes) -> None:
        with self.connect(timeout=1.0) as sock:
            sock.sendall(encode_request(T.ECHO_REQ, data))
            decoder = Decoder(accept_admin=False)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed before ECHO_RES")
                for packet in decoder.feed(chunk):
                    if packet.type == T.ECHO_RES and packet.args == (data,):
                        return
                    raise ValueError(f"unexpected reply to ECHO_REQ: {packet!r}")

    def admin_status(self) -> dict[str, int]:
        """The admin `status` reply: function -> queued jobs (total, running included)."""
        reply = b""
        with self.connect(timeout=5.0) as sock:
            sock.sendall(b"status\n")
            while not (reply == b".\n" or reply.endswith(b"\n.\n")):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {reply!r}")
                reply += chunk
        table = {}
        for line in reply.decode().splitlines()[:-1]:
            name, total, *_ = line.split("\t")
            table[name] = int(total)
        return table

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if not match:
            raise RuntimeError(f"no VmRSS for pid {self.pid}")
        return int(match.group(1)) * 1024

    def cpu_seconds(self) -> float:
        """CPU time the server used so far, user and system, all its threads."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        # After the command name: state is field 3 of proc(5), utime 14 and stime 15.
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._log.close()

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(spec: ServerSpec, attempts: int = 3) -> RunningServer:
    """Start `spec` on a free port and wait until it answers; retry when the port was taken."""
    (server,) = start_many(spec, 1, attempts)
    return server


def start_many(spec: ServerSpec, count: int, attempts: int = 3) -> list[RunningServer]:
    """`count` servers of `spec`, each on a free port of its own, all answering. They are
    launched together and then waited for, so their start-ups overlap (a jobserver takes about
    a second to import). When one fails to start, all are stopped; the group is started again
    when a port was taken meanwhile."""
    for attempt in range(attempts):
        group = [RunningServer(spec) for _ in range(count)]
        try:
            for server in group:
                server.wait_ready()
            return group
        except ServerStartError:
            for server in group:
                server.stop()
            taken = any("in use" in server.log_tail().lower() for server in group)
            for server in group:
                server.remove_workdir()
            if not taken or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
