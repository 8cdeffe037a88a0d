"""`jobserver`: run a job server (typer CLI)."""

from __future__ import annotations

import enum
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import trio
import typer

from . import __version__, gc_policy
from .admin import ServerFacts
from .daemon import Readiness, detach
from .engine.handles import MAX_PREFIX_SIZE
from .protocol import DEFAULT_MAX_PACKET_SIZE, MAX_ARGUMENTS_SIZE
from .server import DEFAULT_BACKLOG, Server, ServerConfig
from .store import StoreError

log = logging.getLogger("jobserver")

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")


class StoreKind(enum.StrEnum):
    sqlite = "sqlite"
    memory = "memory"


class Verbosity(enum.StrEnum):
    """gearmand's level names (§5); FATAL, ALERT and CRITICAL all mean Python's CRITICAL."""

    FATAL = "FATAL"
    ALERT = "ALERT"
    CRITICAL = "CRITICAL"
    ERROR = "ERROR"
    WARNING = "WARNING"
    NOTICE = "NOTICE"
    INFO = "INFO"
    DEBUG = "DEBUG"


_LOG_LEVELS = {
    Verbosity.FATAL: logging.CRITICAL,
    Verbosity.ALERT: logging.CRITICAL,
    Verbosity.CRITICAL: logging.CRITICAL,
    Verbosity.ERROR: logging.ERROR,
    Verbosity.WARNING: logging.WARNING,
    Verbosity.NOTICE: NOTICE,
    Verbosity.INFO: logging.INFO,
    Verbosity.DEBUG: logging.DEBUG,
}


def _check_prefix(prefix: str | None) -> str | None:
    if prefix is None:
        return None
    if not prefix or len(prefix.encode()) > MAX_PREFIX_SIZE:
        raise typer.BadParameter(f"must be 1 to {MAX_PREFIX_SIZE} bytes (handles are <= 63 bytes)")
    if any(ch.isspace() or ch == "\0" for ch in prefix):
        raise typer.BadParameter("must not contain spaces or NUL (admin commands split on spaces)")
    return prefix


def _version(value: bool) -> None:
    if value:
        print(f"jobserver {__version__}")
        raise typer.Exit()


app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(
    help="Run a Gearman-compatible job server. Listens on PORT (default 4730) for the Gearman "
    "binary protocol and the admin text protocol. Stop it with SIGTERM or SIGINT (a daemon: "
    "kill $(cat PIDFILE), or kill the pid `gearadmin -p PORT --getpid` prints).",
    epilog="Subcommand: `jobserver worker MODULE:ATTRIBUTE [OPTIONS]` serves the functions of a "
    "worker_sdk Worker (see `jobserver worker --help`).",
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
        typer.Option("--pid-file", help="Write the server's pid here; removed at exit."),
    ] = None,
    log_file: Annotated[
        str | None,
        typer.Option(
            "--log-file",
            help="Append the log here. 'stderr' (the default in the foreground) or 'none'. "
            "A daemon without --log-file logs nowhere.",
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
            help="Log level (gearmand's names). Each misbehaving peer is logged at ERROR.",
        ),
    ] = Verbosity.ERROR,
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
        StoreKind,
        typer.Option(
            "--store",
            case_sensitive=False,
            help="Where background jobs are kept: 'sqlite' (a database in --data-dir; jobs "
            "survive crashes and restarts) or 'memory' (lost on restart).",
        ),
    ] = StoreKind.sqlite,
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            help="Directory of the sqlite store, created if absent; one database file per "
            "port (jobserver-<port>.sqlite3), so several servers can share it.",
        ),
    ] = Path("jobserver-data"),
    backlog: Annotated[
        int, typer.Option("--backlog", min=1, help="Listen backlog.")
    ] = DEFAULT_BACKLOG,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    prefix = _check_prefix(job_handle_prefix)
    if port_argument is not None:
        port = port_argument
    data_dir = data_dir.resolve()  # a daemon changes directory to /
    if pid_file is not None:
        pid_file = pid_file.resolve()
    if log_file not in (None, "stderr", "none"):
        log_file = str(Path(log_file).resolve())

    readiness = detach() if daemon else Readiness()
    if daemon and log_file is None:
        log_file = "none"
    try:
        _configure_logging(log_file, _LOG_LEVELS[verbose])
    except OSError as error:
        message = f"cannot open log file {log_file}: {error.strerror}"
        readiness.failed(message)
        print(f"jobserver: {message}", file=sys.stderr)
        raise typer.Exit(1) from None
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
        store=store.value,
        data_dir=data_dir,
        facts=ServerFacts(verbose=verbose.value),
    )
    gc_policy.install()
    try:
        trio.run(_run, config, pid_file, readiness)
    except StartupError as error:
        log.error("%s", error)
        readiness.failed(str(error))
        if not daemon:
            print(f"jobserver: {error}", file=sys.stderr)
        raise typer.Exit(1) from None


class StartupError(Exception):
    pass


async def _run(config: ServerConfig, pid_file: Path | None, readiness: Readiness) -> None:
    server = Server(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            listeners = await server.bind()
        except StoreError as error:
            raise StartupError(str(error)) from None
        except OSError as error:
            where = config.listen or "all addresses"
            raise StartupError(
                f"cannot listen on {where} port {config.port}: {error.strerror or error}"
            ) from None
        try:
            if pid_file is not None:
                try:
                    pid_file.write_text(f"{os.getpid()}\n")
                except OSError as error:
                    raise StartupError(
                        f"cannot write pid file {pid_file}: {error.strerror}"
                    ) from None
            log.log(NOTICE, "jobserver %s serving on port %d", __version__, server.port)
            readiness.ready()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve, listeners)
                async for signum in signals:
                    log.log(NOTICE, "%s received: shutting down", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
        finally:
            if pid_file is not None:
                pid_file.unlink(missing_ok=True)


def _configure_logging(log_file: str | None, level: int) -> None:
    handler: logging.Handler
    if log_file == "none":
        handler = logging.NullHandler()
    elif log_file in (None, "stderr"):
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("jobserver")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main() -> None:
    if sys.argv[1:2] == ["worker"]:  # `jobserver worker MODULE:ATTRIBUTE`: the worker SDK's CLI
        from worker_sdk.cli import main as worker_main

        worker_main(sys.argv[2:])
        return
    app()
