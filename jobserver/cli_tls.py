"""The `--tls-ca`, `--tls-cert` and `--tls-key` options of the commands that connect to servers
(`jobserver worker`, `status`, `submit`, `dead`), and the TLS context they make.

Any of the three turns TLS on; `--tls-cert`/`--tls-key` without `--tls-ca` trust the system's
CAs. A file that cannot be used is one line on stderr naming it, and exit status 2 (usage), so
a typo in a path is told apart from a cluster that is down (exit 1).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .sdk.tls import TlsConfigError, TlsFiles, client_context

USAGE_ERROR = 2
"""click's exit status for bad usage, which the commands use for bad arguments."""

TlsCaOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        metavar="PEM",
        help="Connect with TLS, trusting the CA certificates in this PEM file "
        "(default with --tls-cert: the system's CAs).",
        show_default=False,
    ),
]
TlsCertOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        metavar="PEM",
        help="Connect with TLS, showing this client certificate (servers started with "
        "--tls-ca require one); it may hold the key too.",
        show_default=False,
    ),
]
TlsKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-key",
        metavar="PEM",
        help="The private key of --tls-cert, when not in the same file.",
        show_default=False,
    ),
]


def tls_files(
    ca: Path | None, cert: Path | None, key: Path | None, *, command: str
) -> TlsFiles | None:
    """The options as TlsFiles, or None when none was given (plain TCP). A key without its
    certificate is a one-line usage error."""
    if ca is None and cert is None and key is None:
        return None
    try:
        return TlsFiles(ca=ca, cert=cert, key=key)
    except TlsConfigError as error:
        usage_error(command, f"{error} (--tls-key needs --tls-cert)")


def tls_context(
    ca: Path | None, cert: Path | None, key: Path | None, *, command: str
) -> ssl.SSLContext | None:
    """The TLS context the options ask for, or None when none was given (plain TCP). A file
    that cannot be used is a one-line error naming it, exit status 2.

    Example (in a command taking the three options)::

        tls = tls_context(tls_ca, tls_cert, tls_key, command="jobserver status")
    """
    files = tls_files(ca, cert, key, command=command)
    try:
        return client_context(files)
    except TlsConfigError as error:
        usage_error(command, str(error))


def usage_error(command: str, message: str) -> NoReturn:
    """Print `command: message` on stderr and exit with the usage status: one line, where
    typer's BadParameter would print the usage block around it."""
    typer.echo(f"{command}: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)
