"""`jobserver worker MODULE:ATTRIBUTE`: run a Worker defined in your code (typer CLI)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Annotated

import typer

from jobserver.cli_tls import TlsCaOption, TlsCertOption, TlsKeyOption, tls_files, usage_error
from jobserver.sdk.tls import TlsConfigError

from .worker import MAX_CONCURRENCY, Worker

app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


class LoadError(Exception):
    """The MODULE:ATTRIBUTE target does not name a Worker; the message says why."""


def load_worker(target: str) -> Worker:
    """Import `module.path:attribute` and return the Worker it names.

    The current directory is importable, as with `python -m`. Raises LoadError with a
    one-line reason for a malformed target, a module that does not exist, a missing
    attribute or an object that is not a Worker; errors raised by the module's own code
    propagate unchanged (their traceback is what you need then).

    Example:
        >>> load_worker("no.such.module:worker")
        Traceback (most recent call last):
        ...
        worker_sdk.cli.LoadError: cannot import module 'no.such.module': No module named 'no'
    """
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise LoadError(f"{target!r} is not MODULE:ATTRIBUTE (e.g. myapp.tasks:worker)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise LoadError(f"cannot import module {module_name!r}: {error}") from None
        raise  # the module exists but its own imports fail: show the traceback
    value: object = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise LoadError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(value, Worker):
        raise LoadError(
            f"{target} is not a worker_sdk.Worker (its type is {type(value).__name__}); "
            "name the Worker instance, e.g. worker = Worker([...])"
        )
    return value


@app.command(
    help="Run the worker_sdk.Worker named by MODULE:ATTRIBUTE (e.g. myapp.tasks:worker) until "
    "SIGTERM or SIGINT: jobs in flight get the grace period, a second signal cancels them."
)
def worker(
    target: Annotated[str, typer.Argument(metavar="MODULE:ATTRIBUTE", show_default=False)],
    servers: Annotated[
        str | None,
        typer.Option(
            "--servers",
            "-s",
            help="Comma-separated host:port list; replaces the servers given in the code.",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            min=1,
            max=MAX_CONCURRENCY,
            help="Jobs at once over all servers; replaces the code's value.",
            show_default=False,
        ),
    ] = None,
    grace_period: Annotated[
        float | None,
        typer.Option(
            "--grace-period",
            min=0,
            help="Seconds jobs in flight may take after a stop; replaces the code's value.",
            show_default=False,
        ),
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option("--client-id", help="Id shown by `gearadmin --workers`.", show_default=False),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown level {log_level!r}", param_hint="--log-level")
    try:
        chosen = load_worker(target)
    except LoadError as error:
        typer.echo(f"jobserver worker: {error}", err=True)
        raise typer.Exit(2) from None
    try:
        if servers is not None:
            chosen.servers = servers  # the setter parses
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--servers") from None
    if concurrency is not None:
        chosen.concurrency = concurrency
    if grace_period is not None:
        chosen.grace_period = grace_period
    if client_id is not None:
        chosen.client_id = client_id
    # Any --tls-* option replaces the code's TLS settings; none leaves them as they are.
    files = tls_files(tls_ca, tls_cert, tls_key, command="jobserver worker")
    if files is not None:
        try:
            chosen.tls = files  # the setter loads the files
        except TlsConfigError as error:
            usage_error("jobserver worker", str(error))
    if not chosen.functions:
        typer.echo(f"jobserver worker: {target} has no functions registered", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chosen.run()


def main(argv: list[str] | None = None) -> None:
    """Entry point of `jobserver worker ...` (argv without the `worker` word)."""
    app(args=argv, prog_name="jobserver worker")
