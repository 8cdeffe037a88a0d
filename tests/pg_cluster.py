"""A private PostgreSQL cluster for tests and the benchmark: Debian's binaries, a temp dir, a
free 127.0.0.1 port, password auth, stopped by its own PID. No mocks (issue 12).

    with PgCluster.start(tmp_dir) as cluster:
        uri = cluster.create_database("jobs")   # postgresql://postgres:...@127.0.0.1:PORT/jobs

- initdb makes the cluster; the postmaster then runs in the foreground as our own child
  process rather than daemonised by `pg_ctl start`, so stop() waits for it by PID and reaps
  it. A daemonised postmaster is re-parented to PID 1, which in some containers reaps late or
  never: its zombie then looks alive to a PID check, and to the next postmaster's check of
  the stale postmaster.pid after a kill().
- PostgreSQL refuses to run as root: as root, initdb and the server run as the `postgres`
  account (Debian's package makes it); otherwise as ourselves.
- Durability is what the store tests check, so fsync and synchronous_commit stay on; only
  initdb skips its final sync (`--no-sync`: the fresh cluster's files would be lost by an OS
  crash only, which no test simulates).
- Every wait is bounded; a failure raises PgClusterError with the tail of the server's log.

Plain Python on purpose (no pytest): bench/ imports it as `tests.pg_cluster`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

HOST = "127.0.0.1"
SUPERUSER = "postgres"
PASSWORD = "jobserver-test"
"""The superuser's password; TCP connections must give it (scram-sha-256)."""

SERVER_ACCOUNT = "postgres"
"""The account initdb and the server run as when we are root (Debian's package makes it)."""

MAX_NAME_BYTES = 63
"""PostgreSQL's identifier limit (NAMEDATALEN - 1); it silently truncates longer names."""

MIN_VERSION = 14
"""pg_terminate_backend(pid, timeout) (waits for the backend to exit) is new in 14."""

DEBIAN_BINARIES = Path("/usr/lib/postgresql")
"""Debian installs each major version's binaries in /usr/lib/postgresql/<major>/bin, off PATH;
`pg_config --bindir` may name another version's (or the client-only package's) directory."""

PG_CONFIG_TIMEOUT = 10.0  # seconds for `pg_config --bindir` / `postgres --version`: instant
INITDB_TIMEOUT = 120.0  # seconds for initdb: ~1 s here; slow CI disks and small VMs vary a lot
START_TIMEOUT = 60.0  # seconds until the server accepts connections (crash recovery included)
STOP_TIMEOUT = 30.0  # seconds after SIGINT (fast shutdown: a checkpoint, fsynced) before SIGKILL
KILL_TIMEOUT = 10.0  # seconds for SIGKILLed processes to be gone (the kernel frees their memory)
CONNECT_TIMEOUT = 5  # libpq's connect_timeout: whole seconds, at least 2
STATEMENT_TIMEOUT_MS = 60_000  # our own admin statements (CREATE DATABASE copies a template)
TERMINATE_WAIT_MS = 5_000  # pg_terminate_backend waits this long for each backend to exit
START_ATTEMPTS = 3  # new free ports tried when another process takes ours before the bind
POLL_INTERVAL = 0.02  # seconds between checks while waiting for a process or a file
LOG_TAIL_LINES = 40  # lines of the server's log quoted in an error

MAX_SOCKET_DIR_LENGTH = 107 - len("/.s.PGSQL.65535")
"""A unix socket's path must fit sun_path (108 bytes with the NUL); PostgreSQL appends this."""

PORT_IN_USE = re.compile(r"could not bind IPv4 address .*: Address already in use")

TEST_SETTINGS = """
# --- jobserver tests (tests/pg_cluster.py) ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '{socket_dir}'
max_connections = 100  # a few jobserver processes with small pools, plus the tests' own
shared_buffers = 16MB  # test databases are tiny; keeps several clusters cheap
fsync = on  # durability is what the store tests check
synchronous_commit = on
full_page_writes = on
logging_collector = off  # everything goes to stderr, which is the log file we opened
log_line_prefix = '%m [%p] %q%u@%d '
"""


class PgClusterError(RuntimeError):
    """The cluster could not be made, started or stopped; the message quotes its log."""


class PostgresNotInstalled(PgClusterError):
    """No PostgreSQL server binaries (initdb, postgres) on this machine."""


def find_bindir() -> Path:
    """The directory of initdb and postgres: the newest /usr/lib/postgresql/<major>/bin, else
    `pg_config --bindir`, else the directory of an initdb on PATH."""
    versions = []
    for initdb in DEBIAN_BINARIES.glob("*/bin/initdb"):
        major = initdb.parent.parent.name
        if major.isdigit() and int(major) >= MIN_VERSION:
            versions.append((int(major), initdb.parent))
    if versions:
        return max(versions)[1]
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            candidates.append(Path(output_of([pg_config, "--bindir"])))
    initdb_on_path = shutil.which("initdb")
    if initdb_on_path is not None:
        candidates.append(Path(initdb_on_path).parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and major_version(bindir) >= MIN_VERSION:
            return bindir
    raise PostgresNotInstalled(
        f"PostgreSQL {MIN_VERSION}+ server binaries (initdb, postgres) not found in "
        f"{DEBIAN_BINARIES}/*/bin, `pg_config --bindir` or PATH: install Debian's "
        "`postgresql` package (scripts/test does this)"
    )


def output_of(argv: list[str]) -> str:
    return subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=PG_CONFIG_TIMEOUT
    ).stdout.strip()


def major_version(bindir: Path) -> int:
    """The major version of bindir's postgres ("postgres (PostgreSQL) 15.18" is 15); 0 when
    there is none or it does not say."""
    try:
        version = output_of([str(bindir / "postgres"), "--version"])
    except (OSError, subprocess.SubprocessError):
        return 0
    found = re.search(r"\) (\d+)", version)
    return int(found[1]) if found else 0


def server_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: None for ourselves, the postgres account as root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        raise PgClusterError(
            f"running as root, PostgreSQL must run as another user, but there is no "
            f"`{SERVER_ACCOUNT}` account (Debian's postgresql package creates it)"
        ) from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def reachable_by(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether `account` may search every directory from / down to `path`."""
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for directory in [path, *path.parents]:
        status = directory.stat()
        if status.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif status.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not status.st_mode & bit:
            return False
    return True


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited. An exited process nobody reaped (a zombie: its parent is a
    PID 1 that reaps nothing) counts as gone; it holds no memory, sockets or files."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return fields[0] in ("Z", "X")


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (a postmaster's backends and helpers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                children.append(int(entry.name))
    return children


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` for every PID to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    while True:
        running = [pid for pid in pids if not process_gone(pid)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(POLL_INTERVAL)


class PgCluster:
    """One PostgreSQL cluster of our own on 127.0.0.1:`port`; see the module docstring."""

    def __init__(self, base_dir: Path, directory: Path, bindir: Path, account) -> None:
        self.base_dir = base_dir
        self.directory = directory
        """Holds data/ and socket/: base_dir/postgresql, or (when the server's account
        cannot reach base_dir) a directory of ours in the system temp dir linked from there."""
        self.bindir = bindir
        self.account: pwd.struct_passwd | None = account
        self.data_dir = directory / "data"
        self.socket_dir = directory / "socket"
        self.log_path = base_dir / "postgres.log"
        """The server's stderr: opened by us, so it lives in base_dir whoever runs the server."""
        self.port = 0
        self._process: subprocess.Popen | None = None
        self._log_offset = 0  # where the current start's lines begin in the log

    # --- making and starting ------------------------------------------------------------

    @classmethod
    def start(cls, base_dir: Path) -> PgCluster:
        """initdb a new cluster under `base_dir` (an existing directory of ours) and start it
        on a free port. Raises PostgresNotInstalled when the binaries are missing."""
        bindir = find_bindir()
        account = server_account()
        base_dir = Path(base_dir).resolve()
        directory = base_dir / "postgresql"
        usable = account is None or reachable_by(base_dir, account)
        if len(str(directory / "socket")) > MAX_SOCKET_DIR_LENGTH or not usable:
            directory.symlink_to(tempfile.mkdtemp(prefix="jobserver-pg-"))
            directory = directory.resolve()
        else:
            directory.mkdir(mode=0o700)
        cluster = cls(base_dir, directory, bindir, account)
        cluster._initdb()
        cluster._start_on_free_port()
        return cluster

    def _initdb(self) -> None:
        self.socket_dir.mkdir(mode=0o700)
        password_file = self.directory / "initdb-password"
        password_file.write_text(PASSWORD + "\n")
        password_file.chmod(0o600)
        if self.account is not None:
            for path in (self.directory, self.socket_dir, password_file):
                os.chown(path, self.account.pw_uid, self.account.pw_gid)
        argv = [
            str(self.bindir / "initdb"),
            f"--pgdata={self.data_dir}",
            f"--username={SUPERUSER}",
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",  # always installed; the tests compare bytes, not collations
            "--no-sync",
        ]
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=INITDB_TIMEOUT,
                **self._run_as_server(),
            )
        except subprocess.TimeoutExpired as error:
            raise PgClusterError(f"initdb took over {INITDB_TIMEOUT}s: {error}") from None
        finally:
            password_file.unlink()
        if result.returncode != 0:
            raise PgClusterError(
                f"initdb exited with {result.returncode}; argv={argv}\n"
                f"{result.stdout}{result.stderr}"
            )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(TEST_SETTINGS.format(socket_dir=self.socket_dir))

    def _run_as_server(self) -> dict[str, Any]:
        """subprocess options that run a PostgreSQL binary as the server's account, in the
        cluster's directory (the account may not be allowed into ours), with no PG* settings
        of ours and English messages (start() recognises "Address already in use")."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        options: dict[str, Any] = {"cwd": self.directory, "env": env}
        if self.account is not None:
            options.update(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
            env.update(HOME=str(self.directory), USER=self.account.pw_name)
        return options

    def _start_on_free_port(self) -> None:
        for attempt in range(START_ATTEMPTS):
            self.port = free_port()
            try:
                self._start_server()
                return
            except PgClusterError:
                clash = PORT_IN_USE.search(self._log_since_start())
                if not clash or attempt == START_ATTEMPTS - 1:
                    raise

    def start_again(self) -> None:
        """Start the stopped (or killed) cluster on the same port; returns once it accepts
        connections (after crash recovery if it was killed)."""
        if self.running:
            raise PgClusterError(f"{self!r} is already running")
        self._start_server()

    def _start_server(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # In our process group on purpose: a Ctrl-C that interrupts a test run reaches
                # the server too (a fast shutdown), so it does not outlive the run.
                **self._run_as_server(),
            )
        self._wait_ready(argv)

    def _wait_ready(self, argv: list[str]) -> None:
        """Wait until postmaster.pid names our process and says "ready" (PostgreSQL 10+ writes
        its status there, as `pg_ctl start -w` reads it), then prove a password login."""
        assert self._process is not None
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            status = self._process.poll()
            if status is not None:
                self._process = None
                raise self._error(f"postgres exited with status {status}; argv={argv}")
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[0] == str(self.pid) and lines[7].strip() == "ready":
                    break
            if time.monotonic() >= deadline:
                self.kill()
                raise self._error(f"postgres was not ready within {START_TIMEOUT}s; argv={argv}")
            time.sleep(POLL_INTERVAL)
        try:
            self.query("SELECT 1")
        except psycopg.Error as error:
            self.stop()
            raise self._error(f"postgres is ready but refuses our login: {error}") from None

    # --- state --------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The postmaster's PID (the first line of its postmaster.pid)."""
        if self._process is None:
            raise PgClusterError(f"{self!r} is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        state = f"pid={self._process.pid}" if self._process is not None else "stopped"
        return f"<PgCluster {state} at {HOST}:{self.port} in {self.directory}>"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server's log (every start appends to it)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def _log_since_start(self) -> str:
        with contextlib.suppress(OSError), self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")
        return ""

    def _error(self, message: str) -> PgClusterError:
        return PgClusterError(f"{message}\n--- {self.log_path} (last lines) ---\n{self.log_tail()}")

    # --- using it -----------------------------------------------------------------------

    def uri(
        self,
        database: str = "postgres",
        *,
        user: str = SUPERUSER,
        password: str = PASSWORD,
        host: str = HOST,
        port: int | None = None,
    ) -> str:
        """A postgresql:// URI of `database`; `port` points it elsewhere (a TcpProxy)."""
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"postgresql://{credentials}@{host}:{port or self.port}/{quote(database, safe='')}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        """An autocommit superuser connection whose statements time out (nothing hangs)."""
        return psycopg.connect(
            self.uri(database),
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        )

    def execute(self, statement: str | sql.Composable, database: str = "postgres") -> None:
        with self.connect(database) as connection:
            connection.execute(statement)

    def query(
        self,
        statement: str | sql.Composable,
        params: tuple | dict = (),
        database: str = "postgres",
    ) -> list[tuple]:
        with self.connect(database) as connection:
            cursor = connection.execute(statement, params)
            return cursor.fetchall() if cursor.description is not None else []

    def create_database(self, name: str) -> str:
        """A new empty database (an old one of that name is dropped first); returns its URI."""
        if len(name.encode()) > MAX_NAME_BYTES:
            # PostgreSQL would truncate it, and the URI would name another database.
            raise ValueError(f"database name over {MAX_NAME_BYTES} bytes: {name!r}")
        self.drop_database(name)
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.uri(name)

    def drop_database(self, name: str) -> None:
        """Drop `name` if it exists, disconnecting whoever is still connected to it."""
        self.terminate_backends(name)
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def terminate_backends(self, database: str) -> int:
        """Disconnect every session on `database` but our own, waiting for each to end;
        returns how many there were (a server-side cut, as a DBA or a failover does)."""
        rows = self.query(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, %s))"
            " FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (TERMINATE_WAIT_MS, database),
        )
        return int(rows[0][0])

    # --- stopping -----------------------------------------------------------------------

    def restart(self) -> None:
        """Fast shutdown, then start on the same port; connections made before it are gone."""
        self.stop()
        self.start_again()

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster's PID: sessions are disconnected, a
        checkpoint is written); SIGKILL if it has not exited within STOP_TIMEOUT.
        Does nothing when already stopped."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._process = None

    def kill(self) -> None:
        """SIGKILL the postmaster and every process it started, as a crash of the server's
        machine would end them (committed transactions survive, through WAL replay, at the
        next start_again()). Does nothing when already stopped."""
        process = self._process
        if process is None:
            return
        # Stopped first, the postmaster cannot start a process we would not know to kill.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGSTOP)
        children = child_pids(process.pid)
        for pid in [process.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            process.wait(KILL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise self._error(f"postgres (pid {process.pid}) outlived SIGKILL") from None
        self._process = None
        # Its orphaned backends must be gone before a new postmaster starts: it refuses to
        # while processes are still attached to the old shared memory.
        survivors = wait_gone(children, KILL_TIMEOUT)
        if survivors:
            raise self._error(f"postgres backends {survivors} outlived SIGKILL")

    def remove_files(self) -> None:
        """Stop the server and delete its data (the log in base_dir stays)."""
        self.stop()
        link = self.base_dir / "postgresql"
        if link.is_symlink():
            link.unlink()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove_files()
