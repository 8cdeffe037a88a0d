"""`jobserver status`: the queues of a whole cluster in one table (issue 14).

Every server given with `--servers` is asked at once, over the admin text protocol, for
`status` (per function: jobs, running, workers) and `prioritystatus` (queued jobs per
priority), so gearmand answers as well as jobserver. The table has, per function, a `total`
row summing the servers and one row per server that knows the function; then one row per
server with its state: `up`, `unreachable` (refused, closed, or silent past `--timeout`) or
`failed` (an answer that is not a status listing). A server that does not know
`prioritystatus` (a gearmand too old for it) still counts: its HIGH/NORMAL/LOW show `-`.

    jobserver status --servers 10.0.0.1:4730,10.0.0.2:4730          # one table
    jobserver status --servers ... --watch                          # redrawn every second
    jobserver status --servers ... --json                           # one JSON document
    jobserver status --servers ... --tls-ca ca.pem                  # over TLS (cli_tls.py)

The exit status is 1 when some server did not answer (the table is then incomplete, as with
`jobserver dead`), 2 for bad usage; `--watch` runs until Ctrl-C or SIGTERM and exits 0.
"""

from __future__ import annotations

import json
import signal
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import typer

from .cli_servers import (
    DEFAULT_SERVERS,
    AdminTimeoutOption,
    Answer,
    ServersOption,
    ask_all,
    parse_servers,
    table,
    text,
)
from .cli_tls import TlsCaOption, TlsCertOption, TlsKeyOption, tls_context
from .sdk.addresses import ServerAddress
from .sdk.admin import ADMIN_TIMEOUT, is_error

if TYPE_CHECKING:
    from rich.live import Live

WATCH_INTERVAL = 1.0
"""Seconds between two redraws of `--watch`: fresh enough to follow a queue draining, and two
short admin connections per server per second, which no server notices."""

FUNCTION_COLUMNS = ("FUNCTION", "SERVER", "QUEUED", "HIGH", "NORMAL", "LOW", "RUNNING", "WORKERS")
SERVER_COLUMNS = ("SERVER", "STATE", "FUNCTIONS", "QUEUED", "RUNNING", "NOTE")

UP, UNREACHABLE, FAILED = "up", "unreachable", "failed"

Line = tuple[str, str]
"""One line of output and its style on a terminal ("" for none, else a rich style)."""


@dataclass(frozen=True)
class Counts:
    """One function's numbers on one server, or summed over several.

    `queued` is `status`'s jobs less its running ones (jobs waiting for a retry included);
    `priorities` is `prioritystatus`'s (high, normal, low) split of the jobs waiting for a
    worker, None where a server did not give it. `workers` counts worker connections, so a
    worker connected to three servers counts three times in a sum.

    >>> Counts(3, 1, 2, (1, 2, 0)) + Counts(1, 0, 1, None)
    Counts(queued=4, running=1, workers=3, priorities=None)
    """

    queued: int = 0
    running: int = 0
    workers: int = 0
    priorities: tuple[int, int, int] | None = (0, 0, 0)

    def __add__(self, other: Counts) -> Counts:
        priorities = None
        if self.priorities is not None and other.priorities is not None:
            priorities = (
                self.priorities[0] + other.priorities[0],
                self.priorities[1] + other.priorities[1],
                self.priorities[2] + other.priorities[2],
            )
        return Counts(
            self.queued + other.queued,
            self.running + other.running,
            self.workers + other.workers,
            priorities,
        )

    def as_json(self) -> dict[str, int | None]:
        high, normal, low = self.priorities or (None, None, None)
        return {
            "queued": self.queued,
            "running": self.running,
            "workers": self.workers,
            "high": high,
            "normal": normal,
            "low": low,
        }


@dataclass(frozen=True)
class ServerStatus:
    """What one server said: its functions when `up`; otherwise `note` says why not. An up
    server's note tells what it left out (no `prioritystatus`)."""

    server: ServerAddress
    state: str
    functions: dict[str, Counts]
    note: str = ""

    def total(self) -> Counts:
        return sum(self.functions.values(), Counts())


@dataclass(frozen=True)
class ClusterStatus:
    """Every server's status, in the order `--servers` gave them."""

    servers: list[ServerStatus]

    def functions(self) -> list[str]:
        return sorted({name for server in self.servers for name in server.functions})

    def total(self, function: str) -> Counts:
        return sum(
            (server.functions[function] for server in self.servers if function in server.functions),
            Counts(),
        )

    def failed(self) -> list[ServerStatus]:
        return [server for server in self.servers if server.state != UP]


# --- asking the servers ------------------------------------------------------------------------


async def poll(
    servers: Sequence[ServerAddress], timeout: float, tls: ssl.SSLContext | None = None
) -> ClusterStatus:
    """Ask every server for `status` and `prioritystatus`, all at once, each bounded by
    `timeout` (connect and TLS handshake included): the whole poll takes at most about
    `timeout` seconds."""
    answers: dict[bytes, list[Answer]] = {}

    async def ask(command: bytes) -> None:
        answers[command] = await ask_all(servers, command, listing=True, timeout=timeout, tls=tls)

    async with anyio.create_task_group() as tasks:
        for command in (b"status\n", b"prioritystatus\n"):
            tasks.start_soon(ask, command)
    return ClusterStatus(
        [
            server_status(status, priorities)
            for status, priorities in zip(
                answers[b"status\n"], answers[b"prioritystatus\n"], strict=True
            )
        ]
    )


def server_status(status: Answer, priorities: Answer) -> ServerStatus:
    """One server's ServerStatus from its answers to `status` and `prioritystatus`.

    >>> from jobserver.sdk.addresses import parse_address
    >>> here = parse_address("127.0.0.1:4730")
    >>> up = server_status(Answer(here, [b"f\\t5\\t1\\t2"]), Answer(here, [b"f\\t1\\t3\\t0\\t2"]))
    >>> up.state, up.functions["f"]
    ('up', Counts(queued=4, running=1, workers=2, priorities=(1, 3, 0)))
    """
    if status.failure:
        return ServerStatus(status.server, UNREACHABLE, {}, status.failure)
    try:
        listed = _rows(status.lines, 3)
    except ValueError as error:
        return ServerStatus(status.server, FAILED, {}, f"status: {error}")
    note = ""
    split: dict[str, tuple[int, ...]] = {}
    if priorities.failure:
        note = f"no priorities: {priorities.failure}"
    else:
        try:
            split = _rows(priorities.lines, 4)
        except ValueError as error:  # gearmand without prioritystatus: ERR UNKNOWN_COMMAND
            note = f"no priorities: {error}"
    functions = {}
    for name, (jobs, running, workers) in listed.items():
        found = split.get(name)
        functions[name] = Counts(
            max(jobs - running, 0),
            running,
            workers,
            (found[0], found[1], found[2]) if found is not None else None,
        )
    return ServerStatus(status.server, UP, functions, note)


def _rows(lines: Sequence[bytes], numbers: int) -> dict[str, tuple[int, ...]]:
    """`<function>\\t<n>...` listing lines by function; ValueError for an `ERR` answer or a
    line that is not a function and `numbers` counts."""
    if lines and is_error(lines[0]):
        raise ValueError(text(lines[0]))
    rows = {}
    for line in lines:
        fields = line.split(b"\t")
        if len(fields) != numbers + 1 or not all(field.isdigit() for field in fields[1:]):
            raise ValueError(f"unexpected line {text(line)!r}")
        rows[text(fields[0])] = tuple(int(field) for field in fields[1:])
    return rows


# --- output ------------------------------------------------------------------------------------


def status_lines(cluster: ClusterStatus) -> list[Line]:
    """The two tables (functions, then servers) as styled lines."""
    lines: list[Line] = []
    functions = cluster.functions()
    if functions:
        rows: list[tuple[str, ...]] = []
        styles = [""]
        for function in functions:
            rows.append((function, "total", *_cells(cluster.total(function))))
            styles.append("bold")
            for server in cluster.servers:
                if function in server.functions:
                    rows.append((function, str(server.server), *_cells(server.functions[function])))
                    styles.append("")
        lines.extend(zip(table(FUNCTION_COLUMNS, rows).split("\n"), styles, strict=True))
    else:
        lines.append(("no functions", ""))
    lines.append(("", ""))
    rows = []
    styles = [""]
    for server in cluster.servers:
        if server.state == UP:
            total = server.total()
            counts = (str(len(server.functions)), str(total.queued), str(total.running))
            styles.append("")
        else:
            counts = ("-", "-", "-")
            styles.append("red")
        rows.append((str(server.server), server.state, *counts, server.note))
    up = len(cluster.servers) - len(cluster.failed())
    total = sum((server.total() for server in cluster.servers), Counts())
    rows.append(
        (
            "total",
            f"{up}/{len(cluster.servers)} up",
            str(len(functions)),
            str(total.queued),
            str(total.running),
            "",
        )
    )
    styles.append("bold")
    lines.extend(zip(table(SERVER_COLUMNS, rows).split("\n"), styles, strict=True))
    return lines


def _cells(counts: Counts) -> tuple[str, ...]:
    """QUEUED HIGH NORMAL LOW RUNNING WORKERS; `-` for priorities a server did not give."""
    high, normal, low = (str(n) for n in counts.priorities) if counts.priorities else "---"
    return (str(counts.queued), high, normal, low, str(counts.running), str(counts.workers))


def status_document(cluster: ClusterStatus, at: float) -> dict[str, Any]:
    """The `--json` document: the same facts as the tables, keyed for scripts."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
        "servers": [
            {
                "server": str(server.server),
                "state": server.state,
                "note": server.note or None,
                "functions": len(server.functions) if server.state == UP else None,
                "queued": server.total().queued if server.state == UP else None,
                "running": server.total().running if server.state == UP else None,
            }
            for server in cluster.servers
        ],
        "functions": {
            function: {
                **cluster.total(function).as_json(),
                "servers": {
                    str(server.server): server.functions[function].as_json()
                    for server in cluster.servers
                    if function in server.functions
                },
            }
            for function in cluster.functions()
        },
    }


def title(cluster: ClusterStatus, at: float) -> str:
    failed = cluster.failed()
    down = f", {len(failed)} not answering" if failed else ""
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    count = len(cluster.servers)
    return f"jobserver status: {count} server{'s' if count != 1 else ''}{down}, {clock}"


# --- command -----------------------------------------------------------------------------------

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="One table of a cluster's queues: per function, queued (by priority), running and "
    "workers, summed over the servers and per server, and each server's state. Works "
    "against gearmand too (admin protocol). Exit status 1 when a server did not answer.",
)


@app.command()
def status(
    servers: ServersOption = DEFAULT_SERVERS,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", "-w", help=f"Redraw every {WATCH_INTERVAL:g} s until Ctrl-C or SIGTERM."
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON document (with --watch: one per line, per redraw)."
        ),
    ] = False,
    timeout: AdminTimeoutOption = ADMIN_TIMEOUT,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    addresses = parse_servers(servers)
    tls = tls_context(tls_ca, tls_cert, tls_key, command="jobserver status")
    if watch:
        anyio.run(_watch, addresses, timeout, as_json, tls, backend="trio")
        return
    cluster = anyio.run(poll, addresses, timeout, tls, backend="trio")
    if as_json:
        typer.echo(json.dumps(status_document(cluster, time.time()), indent=2))
    else:
        typer.echo("\n".join(line for line, _ in status_lines(cluster)))
    failed = cluster.failed()
    if failed:
        typer.echo(
            f"jobserver status: {len(failed)} of {len(addresses)} servers did not answer", err=True
        )
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `jobserver status ...` (argv without the `status` word)."""
    app(args=argv, prog_name="jobserver status")


# --- watching ----------------------------------------------------------------------------------

Show = Callable[[ClusterStatus, float], None]


async def _watch(
    servers: Sequence[ServerAddress], timeout: float, as_json: bool, tls: ssl.SSLContext | None
) -> None:
    """Poll and show every WATCH_INTERVAL until SIGINT or SIGTERM. On a terminal the table is
    redrawn in place (rich's Live); otherwise each poll is printed after the last, so that a
    log or a pipe gets every snapshot, and --json prints one document per line."""
    live = None if as_json else _live_display()
    show: Show = (
        _print_document if as_json else _print_snapshot if live is None else partial(_draw, live)
    )
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tasks:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    tasks.cancel_scope.cancel()  # leaves Live's block: the cursor comes back
                    return

            tasks.start_soon(stop_on_signal)
            with live if live is not None else nullcontext():
                while True:
                    started = anyio.current_time()
                    cluster = await poll(servers, timeout, tls)
                    show(cluster, time.time())
                    await anyio.sleep_until(started + WATCH_INTERVAL)


def _live_display() -> Live | None:
    """rich's Live on stdout when it is a terminal that can redraw in place, else None."""
    if not sys.stdout.isatty():
        return None
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not console.is_terminal or console.is_dumb_terminal:
        return None
    return Live(console=console, auto_refresh=False, transient=False)


def _draw(live: Live, cluster: ClusterStatus, at: float) -> None:
    from rich.text import Text

    rendered = Text()
    for index, (line, style) in enumerate(_snapshot(cluster, at)):
        if index:
            rendered.append("\n")
        rendered.append(line, style=style or None)
    live.update(rendered, refresh=True)


def _print_snapshot(cluster: ClusterStatus, at: float) -> None:
    print("\n".join(line for line, _ in _snapshot(cluster, at)) + "\n", flush=True)


def _print_document(cluster: ClusterStatus, at: float) -> None:
    print(json.dumps(status_document(cluster, at)), flush=True)


def _snapshot(cluster: ClusterStatus, at: float) -> list[Line]:
    return [(title(cluster, at), "bold"), ("", ""), *status_lines(cluster)]
