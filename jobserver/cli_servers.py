"""What the cluster commands (`jobserver dead`, `status`, `submit`) share: the `--servers`
option, one admin text command asked of every server at once, and plain-text tables.

A server that cannot be reached, closes, or stays silent past the timeout is an `Answer` with a
`failure` saying why, never an exception: each command decides how to show it.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import anyio
import typer

from .sdk.addresses import ServerAddress, parse_addresses
from .sdk.admin import admin_request
from .sdk.errors import GearmanError

DEFAULT_SERVERS = "127.0.0.1:4730"

ServersOption = Annotated[
    str,
    typer.Option(
        "--servers",
        "-s",
        help="Comma-separated host:port list of the cluster's servers (port 4730 if omitted).",
    ),
]
AdminTimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout", min=0.1, help="Seconds each server may take to answer, connect included."
    ),
]


@dataclass(frozen=True)
class Answer:
    """One server's reply lines, or why there are none (unreachable, silent, or a reply that
    is not one of these commands' answers)."""

    server: ServerAddress
    lines: list[bytes]
    failure: str = ""


async def ask_all(
    servers: Sequence[ServerAddress],
    command: bytes,
    *,
    listing: bool,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> list[Answer]:
    """Send `command` to every server at once (over TLS with a context: cli_tls.py); the
    answers in the servers' order."""
    answers: dict[ServerAddress, Answer] = {}

    async def ask(server: ServerAddress) -> None:
        try:
            lines = await admin_request(server, command, listing=listing, timeout=timeout, tls=tls)
        except GearmanError as error:  # ConnectionLost (unreachable, silent), ProtocolViolation
            answers[server] = Answer(server, [], _without_server(str(error), server))
            return
        answers[server] = Answer(server, lines)

    async with anyio.create_task_group() as tasks:
        for server in servers:
            tasks.start_soon(ask, server)
    return [answers[server] for server in servers]


def parse_servers(servers: str) -> list[ServerAddress]:
    """The `--servers` option's addresses; a usage error (exit 2) naming what is wrong."""
    try:
        return parse_addresses(servers)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--servers") from None


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned with two spaces between them; the last column is not padded.

    >>> print(table(("A", "BB"), [("xyz", "1")]))
    A    BB
    xyz  1
    """
    widths = [max(len(row[index]) for row in (header, *rows)) for index in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if index < len(widths) - 1 else cell
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in (header, *rows)
    )


def text(data: bytes) -> str:
    """A reply field as text; the servers escape control bytes, bad UTF-8 shows as \\xNN."""
    return data.decode("utf-8", "backslashreplace")


def _without_server(reason: str, server: ServerAddress) -> str:
    prefix = f"{server}: "
    return reason[len(prefix) :] if reason.startswith(prefix) else reason
