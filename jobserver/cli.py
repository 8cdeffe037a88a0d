"""`jobserver`: run a job server (typer CLI)."""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Annotated

import trio
import typer

from . import __version__, gc_policy, logs
from .acl import AclError, load_acl
from .admin import ServerFacts
from .admin_failures import MAX_BASE_DELAY, MAX_RETRIES
from .daemon import PidFile, Readiness, detach
from .engine.dead_set import DEFAULT_DEAD_TTL, DEFAULT_MAX_DEAD
from .engine.failures import DEFAULT_RETRY_DELAY
from .engine.handles import MAX_PREFIX_SIZE
from .logs import NOTICE, Verbosity
from .protocol import DEFAULT_MAX_PACKET_SIZE, MAX_ARGUMENTS_SIZE
from .server import DEFAULT_BACKLOG, DEFAULT_READ_TIMEOUT, Server, ServerConfig, StartError
from .store import STORE_KINDS, StoreError, is_postgresql_uri
from .store.lease import DEFAULT_LEASE, MIN_LEASE
from .store.location import default_data_dir

log = logging.getLogger("jobserver")

DEFAULT_DATA_DIR = default_data_dir()
"""Absolute and independent of the current directory, so a restart from anywhere finds the
same jobs (the old ./jobserver-data default did not); see jobserver/store/location.py."""


class LogFormat(enum.StrEnum):
    text = "text"
    json = "json"


def _http_address(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _check_http(text: str | None) -> str | None:
    if text is None:
        return None
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"{text!r} is not ADDR:PORT (e.g. 127.0.0.1:8730)")
    return text


def _check_store(store: str) -> str:
    if store.lower() in STORE_KINDS:
        return store.lower()
    if is_postgresql_uri(store):
        return store
    raise typer.BadParameter(
        f"{store!r} is not one of {', '.join(STORE_KINDS)} nor a postgresql:// URI"
    )


def _check_prefix(prefix: str | None) -> str | None:
    if prefix is None:
        return None
    if not prefix or len(prefix.encode()) > MAX_PREFIX_SIZE:
        raise typer.BadParameter(f"must be 1 to {MAX_PREFIX_SIZE} bytes (handles are <= 63 bytes)")
    if any(ch.isspace() or ch == "\0" for ch in prefix):
        raise typer.BadParameter("must not contain spaces or NUL (admin commands split on spaces)")
    return prefix


def _check_tls_options(
    cert: Path | None, key: Path | None, ca: Path | None, tls_port: int | None, port: int
) -> None:
    """Combinations that cannot mean anything, refused before anything starts."""
    if cert is None:
        for name, value in (("--tls-key", key), ("--tls-ca", ca), ("--tls-port", tls_port)):
            if value is not None:
                raise typer.BadParameter("needs --tls-cert", param_hint=name)
    elif tls_port is not None and tls_port == port and port != 0:
        raise typer.BadParameter(
            f"is the Gearman port too ({port}); leave --tls-port out to serve TLS on it",
            param_hint="--tls-port",
        )


def _version(value: bool) -> None:
    if value:
        print(f"jobserver {__version__}")
        raise typer.Exit()


app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(
    help="Run a Gearman-compatible job server. Listens on PORT (default 4730) for the Gearman "
    "binary protocol and the admin text protocol. Stop it with SIGTERM or SIGINT (a daemon: "
    "kill $(cat PIDFILE), or kill the pid `gearadmin -p PORT --getpid` prints). SIGHUP reopens "
    "the log file (for logrotate) and keeps serving.",
    epilog="Subcommands (each with --help): `jobserver worker MODULE:ATTRIBUTE` serves the "
    "functions of a worker_sdk Worker; `jobserver status --servers H:P,...` shows a cluster's "
    "queues; `jobserver submit FUNCTION [DATA]` runs one job; `jobserver dead list|retry|purge` "
    "handles failed background jobs.",
)
def serve(
    port_argument: Annotated[
        int | None,
        typer.Argument(
            metavar="[PORT]",
            min=0,
            max=65535,
            help="Port to listen on; same as --port, and wins over it.",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int, typer.Option("-p", "--port", min=0, max=65535, help="Port to listen on.")
    ] = 4730,
    listen: Annotated[
        str | None,
        typer.Option(
            "-L",
            "--listen",
            help="Address to bind, e.g. 127.0.0.1 or ::1. Default: every IPv4 and IPv6 address.",
        ),
    ] = None,
    daemon: Annotated[
        bool,
        typer.Option(
            "-d",
            "--daemon",
            help="Detach into the background. Returns 0 once the port accepts connections, "
            "non-zero with the reason if the server cannot start.",
        ),
    ] = False,
    pid_file: Annotated[
        Path | None,
        typer.Option(
            "--pid-file",
            help="Write the server's pid here once it listens; removed at exit. Checked "
            "before anything else: a path that cannot be written fails the start.",
        ),
    ] = None,
    log_file: Annotated[
        str | None,
        typer.Option(
            "--log-file",
            help="Append the log here; SIGHUP reopens it (logrotate). 'stderr' (the default "
            "in the foreground) or 'none'. A daemon without --log-file logs nowhere.",
        ),
    ] = None,
    job_retries: Annotated[
        int,
        typer.Option(
            "-j",
            "--job-retries",
            min=0,
            help="Attempts a job gets when its worker dies or times out before it is failed "
            "(WORK_FAIL to its clients). 0 = unlimited.",
        ),
    ] = 0,
    worker_wakeup: Annotated[
        int,
        typer.Option(
            "-w",
            "--worker-wakeup",
            min=0,
            help="Sleeping workers woken (NOOP) per queued job, in rotation. 0 = all of them.",
        ),
    ] = 0,
    job_handle_prefix: Annotated[
        str | None,
        typer.Option(
            "--job-handle-prefix",
            help="Replaces H:<host>:<port> at the start of job handles. A start stamp and a "
            "counter always follow, so handles never repeat across restarts.",
        ),
    ] = None,
    exceptions: Annotated[
        bool,
        typer.Option(
            "--exceptions",
            help="Forward WORK_EXCEPTION to every client, as if each had sent OPTION_REQ "
            "'exceptions'.",
        ),
    ] = False,
    verbose: Annotated[
        Verbosity,
        typer.Option(
            "--verbose",
            case_sensitive=False,
            help="Log level (gearmand's names). NOTICE: starts, stops, where the store is, "
            "SIGHUP; WARNING: limits hit (connections refused, memory budget, slow readers); "
            "ERROR: misbehaving peers, store failures. gearmand's default is ERROR.",
        ),
    ] = logs.DEFAULT_VERBOSITY,
    max_packet_size: Annotated[
        int,
        typer.Option(
            "--max-packet-size",
            min=MAX_ARGUMENTS_SIZE,
            help="Largest packet accepted, in bytes; a larger one closes its connection.",
        ),
    ] = DEFAULT_MAX_PACKET_SIZE,
    keepalive: Annotated[
        bool,
        typer.Option(
            "--keepalive/--no-keepalive",
            help="TCP keepalive on client connections, so dead workers release their jobs.",
        ),
    ] = True,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            callback=_check_store,
            help="Where background jobs are kept: 'sqlite' (a database in --data-dir; jobs "
            "survive crashes and restarts), 'memory' (lost on restart), or a "
            "postgresql://user:password@host:port/database URI: one database shared by "
            "every server of a cluster, where a live server takes over the jobs of one that "
            "died (see --node-id, --lease).",
        ),
    ] = "sqlite",
    node_id: Annotated[
        str | None,
        typer.Option(
            "--node-id",
            help="With a postgresql store: this server's name in the cluster, unique and "
            "stable across restarts (a restarted server gets back the jobs no peer took "
            "over). Default: <hostname>:<port>.",
            show_default=False,
        ),
    ] = None,
    lease: Annotated[
        float,
        typer.Option(
            "--lease",
            min=MIN_LEASE,
            help="With a postgresql store: seconds after a server stops renewing its lease "
            "(it died, froze or lost the database) before a peer takes its jobs over. It "
            "stops handing them out after half of that.",
        ),
    ] = DEFAULT_LEASE,
    bg_retries: Annotated[
        int,
        typer.Option(
            "--bg-retries",
            min=0,
            max=MAX_RETRIES,
            help="Times a failed background job (WORK_FAIL, WORK_EXCEPTION, its worker lost "
            "or timed out) is tried again before it goes to the dead set; per function at run "
            "time with the admin command `retries <function> <n> [<base>]`. 0: straight to "
            "the dead set (a lost worker's job is still queued again at once, as gearmand "
            "does). Foreground jobs are never retried: their client decides.",
        ),
    ] = 0,
    bg_retry_delay: Annotated[
        float,
        typer.Option(
            "--bg-retry-delay",
            min=0.001,
            max=MAX_BASE_DELAY,
            help="Seconds before a failed background job's first retry; retry n waits "
            "base * 2^(n-1) * a random factor in [1, 1.5), at most an hour.",
        ),
    ] = DEFAULT_RETRY_DELAY,
    dead_max: Annotated[
        int,
        typer.Option(
            "--dead-max",
            min=1,
            help="Dead jobs kept (failed every attempt); the oldest are dropped first, "
            "with a log line.",
        ),
    ] = DEFAULT_MAX_DEAD,
    dead_ttl: Annotated[
        float,
        typer.Option(
            "--dead-ttl",
            min=1,
            help="Seconds a dead job is kept after its last failure (default: 30 days).",
        ),
    ] = DEFAULT_DEAD_TTL,
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            metavar="ADDR:PORT",
            callback=_check_http,
            help="Serve /metrics (Prometheus), /api/status (JSON) and a live status page at "
            "/ on this address, e.g. 127.0.0.1:8730. Off by default.",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        LogFormat,
        typer.Option("--log-format", help="Log lines as text, or as one JSON object each."),
    ] = LogFormat.text,
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            help="Directory of the sqlite store, created if absent; one database file per "
            "port (jobserver-<port>.sqlite3), so several servers can share it. The default "
            "does not depend on the current directory: /var/lib/jobserver as root, "
            "$XDG_STATE_HOME/jobserver (~/.local/state/jobserver) for other users.",
        ),
    ] = DEFAULT_DATA_DIR,
    max_connections: Annotated[
        int | None,
        typer.Option(
            "--max-connections",
            min=1,
            help="Connections served at once; more are refused (and logged) until some "
            "close. Default: derived from the open-file limit (ulimit -n).",
            show_default=False,
        ),
    ] = None,
    read_timeout: Annotated[
        float,
        typer.Option(
            "--read-timeout",
            min=0,
            help="Seconds a connection may stall in the middle of a packet before it is "
            "closed; 0 = never. Idle connections between packets are never closed.",
        ),
    ] = DEFAULT_READ_TIMEOUT,
    memory_budget: Annotated[
        int | None,
        typer.Option(
            "--memory-budget",
            min=1,
            metavar="BYTES",
            help="Bytes held in all for peers' partial packets and unsent replies; beyond it "
            "the greediest peers are slowed or dropped (and logged). Default: derived from "
            "the machine's memory.",
            show_default=False,
        ),
    ] = None,
    backlog: Annotated[
        int, typer.Option("--backlog", min=1, help="Listen backlog.")
    ] = DEFAULT_BACKLOG,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert",
            metavar="PEM",
            help="Serve TLS with this certificate (chain): on --tls-port, or on the Gearman "
            "port itself if --tls-port is not given.",
            show_default=False,
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            "--tls-key",
            metavar="PEM",
            help="The certificate's private key (default: inside the --tls-cert file).",
            show_default=False,
        ),
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            metavar="PEM",
            help="Require TLS clients to present a certificate signed by this CA (mTLS); "
            "its subject CN is the client's identity for --acl.",
            show_default=False,
        ),
    ] = None,
    tls_port: Annotated[
        int | None,
        typer.Option(
            "--tls-port",
            min=0,
            max=65535,
            help="Serve TLS on this port, beside plaintext on the Gearman port (e.g. TLS for "
            "remote workers, plaintext on --listen 127.0.0.1).",
            show_default=False,
        ),
    ] = None,
    acl: Annotated[
        Path | None,
        typer.Option(
            "--acl",
            metavar="TOML",
            help="Who may submit (invoke), register and administer, per client-certificate "
            "identity; see deploy/tls.md. Without it everyone may do everything.",
            show_default=False,
        ),
    ] = None,
    loopback_identity: Annotated[
        str | None,
        typer.Option(
            "--loopback-identity",
            metavar="NAME",
            help="With --acl: plaintext connections from 127.0.0.1/::1 get the rights of "
            "this identity of the ACL file (e.g. an admin one for local gearadmin).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    prefix = _check_prefix(job_handle_prefix)
    _check_tls_options(
        tls_cert, tls_key, tls_ca, tls_port, port if port_argument is None else port_argument
    )
    if loopback_identity is not None and acl is None:
        raise typer.BadParameter("needs --acl", param_hint="--loopback-identity")
    tls_cert, tls_key, tls_ca, acl = (
        None if path is None else path.resolve() for path in (tls_cert, tls_key, tls_ca, acl)
    )  # a daemon changes directory to /
    if port_argument is not None:
        port = port_argument
    data_dir = data_dir.resolve()  # a daemon changes directory to /
    if pid_file is not None:
        pid_file = pid_file.resolve()
    if log_file is None:
        log_file = logs.NOWHERE if daemon else logs.STDERR
    elif log_file not in (logs.STDERR, logs.NOWHERE):
        log_file = str(Path(log_file).resolve())
    # SIGHUP's default action is to exit. Ignore it until the server listens for it (a
    # logrotate run during startup must not kill the server and leave its pid file).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    readiness = detach() if daemon else Readiness()
    startup = _Startup(readiness, daemon)
    try:
        startup.log_handler = logs.configure(log_file, verbose.level, log_format.value)
    except OSError as error:
        startup.fail(f"cannot open log file {log_file}: {error.strerror or error}")
    claimed: PidFile | None = None
    if pid_file is not None:
        try:
            claimed = PidFile.claim(pid_file)
        except OSError as error:
            startup.fail(f"cannot write pid file {pid_file}: {error.strerror or error}")
    # Built in the daemon, not before detaching: ServerFacts records the pid (admin getpid).
    config = ServerConfig(
        port=port,
        listen=listen,
        job_retries=job_retries,
        worker_wakeup=worker_wakeup,
        handle_prefix=prefix,
        exceptions=exceptions,
        max_packet_size=max_packet_size,
        keepalive=keepalive,
        backlog=backlog,
        store=store,
        node_id=node_id,
        lease=lease,
        http=_http_address(http),
        bg_retries=bg_retries,
        bg_retry_delay=bg_retry_delay,
        dead_max=dead_max,
        dead_ttl=dead_ttl,
        data_dir=data_dir,
        max_connections=max_connections,
        read_timeout=read_timeout,
        memory_budget=memory_budget,
        facts=ServerFacts(verbose=verbose.value),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        tls_port=tls_port,
        loopback_identity=loopback_identity,
    )
    if acl is not None:
        try:
            config.acl = load_acl(acl)
        except AclError as error:
            startup.fail(str(error))
        if loopback_identity is not None and not config.acl.knows(loopback_identity):
            startup.fail(f"--loopback-identity {loopback_identity!r} is not an identity in {acl}")
    gc_policy.install()
    try:
        trio.run(_run, config, claimed, startup)
    except StartupError as error:
        startup.fail(str(error))
    except Exception as error:
        startup.crash(error)
    finally:
        if claimed is not None:
            claimed.release()


class StartupError(Exception):
    """The server cannot start; the message is the one line the user sees."""


class _Startup:
    """Reports how starting went: to the waiting parent of a daemon (which prints it), on
    stderr in the foreground, and in the log file. A failure is one line naming the file or
    port and the cause; a bug is one line too, with its traceback in the log."""

    def __init__(self, readiness: Readiness, daemon: bool) -> None:
        self.readiness = readiness
        self.daemon = daemon
        self.log_handler: logging.Handler | None = None
        self.serving = False

    def ready(self) -> None:
        self.serving = True
        self.readiness.ready()

    def fail(self, message: str) -> typing.NoReturn:
        if self.log_handler is not None and not logs.logs_to_stderr(self.log_handler):
            log.error("%s", message)  # the log file says why the server is not running
        self._tell(message)
        raise typer.Exit(1)

    def crash(self, error: Exception) -> typing.NoReturn:
        """An unexpected exception, at startup or while serving: a bug."""
        log.critical("stopped by an unexpected error", exc_info=error)
        handler = self.log_handler
        if handler is not None and logs.logs_to_stderr(handler):
            raise typer.Exit(1)  # the traceback just went to stderr
        if isinstance(handler, logs.ReopenableFileHandler):
            where = f"traceback in {handler.baseFilename}"
        else:
            where = "--log-file PATH keeps its traceback"
        self._tell(f"unexpected {type(error).__name__}: {error} ({where})")
        raise typer.Exit(1)

    def _tell(self, message: str) -> None:
        if self.daemon:
            self.readiness.failed(message)  # the parent prints it; ignored once serving
        else:
            print(f"jobserver: {message}", file=sys.stderr)


async def _run(config: ServerConfig, pid_file: PidFile | None, startup: _Startup) -> None:
    server = Server(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        try:
            listeners = await server.bind()
        except (StoreError, StartError) as error:
            raise StartupError(str(error)) from None
        except OSError as error:
            where = config.listen or "all addresses"
            raise StartupError(
                f"cannot listen on {where} port {config.port}: {error.strerror or error}"
            ) from None
        try:
            if pid_file is not None:
                try:
                    pid_file.write(os.getpid())
                except OSError as error:
                    raise StartupError(
                        f"cannot write pid file {pid_file.path}: {error.strerror or error}"
                    ) from None
        except BaseException:
            server.close_store()
            raise
        _log_started(server, listeners)
        startup.ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, listeners)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    assert startup.log_handler is not None
                    logs.reopen(startup.log_handler)
                    continue
                log.log(NOTICE, "%s received: shutting down", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
        log.log(NOTICE, "stopped")


def _log_started(server: Server, listeners: list[trio.SocketListener]) -> None:
    """The lifecycle lines an operator looks for, at NOTICE (shown by default)."""
    config = server.config
    plaintext = [listener for listener in listeners if listener not in server.tls_listeners]
    addresses = ", ".join(
        str(listener.socket.getsockname()[0]) for listener in plaintext or listeners
    )
    log.log(
        NOTICE,
        "jobserver %s (pid %d) listening on %s port %d",
        __version__,
        os.getpid(),
        addresses,
        server.port,
    )
    log.log(
        NOTICE,
        "limits: %d connections, memory budget %d bytes, read timeout %s",
        server.gate.max_connections,
        server.budget.limit,
        f"{config.read_timeout:g} s" if config.read_timeout else "off",
    )
    if server.tls_port is not None:
        log.log(
            NOTICE,
            "TLS on port %d%s",
            server.tls_port,
            "; client certificates required (mTLS)" if config.tls_ca is not None else "",
        )
    if config.acl is not None:
        log.log(
            NOTICE,
            "ACL %s: %d identities%s",
            config.acl.path,
            len(config.acl.identities),
            f"; plaintext loopback peers are {config.loopback_identity!r}"
            if config.loopback_identity
            else "",
        )
    if config.acl is not None and config.http is not None and not _is_loopback(config.http[0]):
        # The HTTP side answers anyone who reaches it (issue 14); --acl covers the Gearman port.
        log.warning(
            "--http %s port %d: the status page, /api/status and /metrics need no identity "
            "and show every function, whatever --acl allows; bind them to a loopback or "
            "firewalled address",
            *config.http,
        )
    if server.store is None:
        log.log(NOTICE, "store: memory only (--store memory): background jobs are lost on exit")
    else:
        jobs = len(server.engine.jobs) if server.engine is not None else 0
        path = getattr(server.store, "path", config.data_dir)
        log.log(NOTICE, "store opened: %s (background jobs loaded: %d)", path, jobs)


def _is_loopback(host: str) -> bool:
    """Whether a --http host is a loopback address or "localhost" (names are not resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main() -> None:
    if sys.argv[1:2] == ["worker"]:  # `jobserver worker MODULE:ATTRIBUTE`: the worker SDK's CLI
        from worker_sdk.cli import main as worker_main

        worker_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["dead"]:  # `jobserver dead list|retry|purge`: a cluster's dead jobs
        from .dead_cli import main as dead_main

        dead_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["status"]:  # `jobserver status --servers ...`: the cluster's queues
        from .status_cli import main as status_main

        status_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["submit"]:  # `jobserver submit FUNCTION [DATA]`: a client CLI
        from .submit_cli import main as submit_main

        submit_main(sys.argv[2:])
        return
    app()
