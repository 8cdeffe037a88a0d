"""`jobserver dead list|retry|purge`: the dead jobs of a whole cluster (issue 13).

Each server keeps the background jobs that failed every attempt in its own dead set; this
command asks every server given with `--servers` at once, over the admin text protocol
(`show dead jobs`, `retry dead job(s)`, `purge dead jobs`: jobserver/admin_failures.py), and
prints one answer for the cluster: a table of dead jobs with a server column, or each server's
count and the total. A server that cannot be reached, does not answer in time or does not
know the commands (gearmand) is reported, and the exit status is then 1.

    jobserver dead list --servers 10.0.0.1:4730,10.0.0.2:4730 [FUNCTION]
    jobserver dead retry --servers ... FUNCTION | --all | --handle H
    jobserver dead purge --servers ... FUNCTION | --all
    jobserver dead list --servers ... --tls-ca ca.pem [--tls-cert me.pem --tls-key me.key]
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Annotated

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
from .sdk.admin import ADMIN_TIMEOUT, check_admin_word, is_error
from .sdk.names import check_function_name

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="The dead jobs (background jobs that failed every attempt) of a cluster of servers.",
)

LIST_COLUMNS = ("SERVER", "HANDLE", "FUNCTION", "UNIQUE", "ATTEMPTS", "LAST FAILURE", "ERROR")


def dead_rows(answers: Sequence[Answer]) -> tuple[list[tuple[str, ...]], list[Answer]]:
    """The table rows of `show dead jobs` answers, and the answers that failed (including
    one whose lines are not six tab-separated fields)."""
    rows: list[tuple[str, ...]] = []
    failed: list[Answer] = []
    for answer in answers:
        if answer.failure or (answer.lines and is_error(answer.lines[0])):
            failed.append(_refused(answer))
            continue
        server_rows = []
        for line in answer.lines:
            fields = line.split(b"\t")
            if len(fields) != 6:
                failed.append(Answer(answer.server, [], f"unexpected line {text(line)!r}"))
                break
            server_rows.append((str(answer.server), *map(text, fields)))
        else:
            rows.extend(server_rows)
    return rows, failed


def counted(answer: Answer) -> int | None:
    """The count in an `OK <n>` answer; 0 for `ERR UNKNOWN_JOB` (`retry dead job <handle>`
    on a server without that job: handles are unique per server only); None otherwise."""
    words = answer.lines[0].split() if answer.lines and not answer.failure else []
    if len(words) == 2 and words[0] == b"OK" and words[1].isdigit():
        return int(words[1])
    if words[:2] == [b"ERR", b"UNKNOWN_JOB"]:
        return 0
    return None


# --- commands ----------------------------------------------------------------------------------

FunctionArgument = Annotated[
    str | None,
    typer.Argument(metavar="FUNCTION", help="Only this function's dead jobs.", show_default=False),
]
AllOption = Annotated[bool, typer.Option("--all", help="Every function's dead jobs.")]


@app.command("list", help="One table of every server's dead jobs, with a server column.")
def list_dead(
    function: FunctionArgument = None,
    every: AllOption = False,
    servers: ServersOption = DEFAULT_SERVERS,
    timeout: AdminTimeoutOption = ADMIN_TIMEOUT,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    addresses = parse_servers(servers)
    tls = tls_context(tls_ca, tls_cert, tls_key, command="jobserver dead")
    target = _target(function, every, required=False)
    command = b"show dead jobs" + (b" " + target if target != b"all" else b"") + b"\n"
    answers = _run(addresses, command, listing=True, timeout=timeout, tls=tls)
    rows, failed = dead_rows(answers)
    if rows:
        typer.echo(table(LIST_COLUMNS, rows))
    elif len(failed) < len(addresses):
        typer.echo("no dead jobs")
    _exit_for(failed, len(addresses))


@app.command(
    "retry",
    help="Queue dead jobs again (each gets its function's retries anew): a FUNCTION's, --all, "
    "or the one --handle names.",
)
def retry_dead(
    function: FunctionArgument = None,
    every: AllOption = False,
    handle: Annotated[
        str | None,
        typer.Option("--handle", help="The one dead job with this handle.", show_default=False),
    ] = None,
    servers: ServersOption = DEFAULT_SERVERS,
    timeout: AdminTimeoutOption = ADMIN_TIMEOUT,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    addresses = parse_servers(servers)
    tls = tls_context(tls_ca, tls_cert, tls_key, command="jobserver dead")
    if handle is not None:
        if function is not None or every:
            raise typer.BadParameter(
                "give either --handle or FUNCTION / --all", param_hint="--handle"
            )
        word = _word(handle, "handle", "--handle")
        answers = _run(
            addresses, b"retry dead job " + word + b"\n", listing=False, timeout=timeout, tls=tls
        )
        if _report_counts("RETRIED", answers, len(addresses)) == 0:
            typer.echo(f"jobserver dead: no server has a dead job {handle!r}", err=True)
            raise typer.Exit(1)
        return
    target = _target(function, every, required=True)
    answers = _run(
        addresses, b"retry dead jobs " + target + b"\n", listing=False, timeout=timeout, tls=tls
    )
    _report_counts("RETRIED", answers, len(addresses))


@app.command("purge", help="Delete dead jobs for good: a FUNCTION's, or --all.")
def purge_dead(
    function: FunctionArgument = None,
    every: AllOption = False,
    servers: ServersOption = DEFAULT_SERVERS,
    timeout: AdminTimeoutOption = ADMIN_TIMEOUT,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    addresses = parse_servers(servers)
    tls = tls_context(tls_ca, tls_cert, tls_key, command="jobserver dead")
    target = _target(function, every, required=True)
    answers = _run(
        addresses, b"purge dead jobs " + target + b"\n", listing=False, timeout=timeout, tls=tls
    )
    _report_counts("PURGED", answers, len(addresses))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `jobserver dead ...` (argv without the `dead` word)."""
    app(args=argv, prog_name="jobserver dead")


# --- internals ---------------------------------------------------------------------------------


def _run(
    servers: Sequence[ServerAddress],
    command: bytes,
    *,
    listing: bool,
    timeout: float,
    tls: ssl.SSLContext | None,
) -> list[Answer]:
    async def run() -> list[Answer]:
        return await ask_all(servers, command, listing=listing, timeout=timeout, tls=tls)

    return anyio.run(run, backend="trio")


def _report_counts(title: str, answers: Sequence[Answer], server_count: int) -> int:
    """Each server's count (or its failure) and the total; exit 1 if any server failed."""
    rows: list[tuple[str, str]] = []
    failed: list[Answer] = []
    total = 0
    for answer in answers:
        count = counted(answer)
        if count is None:
            refused = _refused(answer)
            failed.append(refused)
            rows.append((str(answer.server), f"failed: {refused.failure}"))
            continue
        total += count
        rows.append((str(answer.server), str(count)))
    rows.append(("total", str(total)))
    typer.echo(table(("SERVER", title), rows))
    _exit_for(failed, server_count, quiet=True)
    return total


def _exit_for(failed: Sequence[Answer], server_count: int, *, quiet: bool = False) -> None:
    if not failed:
        return
    if not quiet:
        for answer in failed:
            typer.echo(f"jobserver dead: {answer.server}: {answer.failure}", err=True)
    typer.echo(f"jobserver dead: {len(failed)} of {server_count} servers failed", err=True)
    raise typer.Exit(1)


def _refused(answer: Answer) -> Answer:
    """`answer` as a failure saying why: its own, or the server's ERR line (gearmand's for
    commands it does not know), or the unexpected line."""
    if answer.failure:
        return answer
    line = text(answer.lines[0]) if answer.lines else "(nothing)"
    if line.startswith(("ERR UNKNOWN_COMMAND", "ERR UNKNOWN_SHOW_ARGUMENTS")):
        failure = f"does not know dead jobs ({line})"
    elif line.startswith("ERR"):
        failure = f"refused: {line}"
    else:
        failure = f"unexpected answer {line!r}"
    return Answer(answer.server, [], failure)


def _target(function: str | None, every: bool, *, required: bool) -> bytes:
    """The function word of a command, b"all" for every function."""
    if function is not None and every:
        raise typer.BadParameter("give either FUNCTION or --all, not both", param_hint="--all")
    if function is None:
        if required and not every:
            raise typer.BadParameter("name a FUNCTION, or --all for every function")
        return b"all"
    if function == "all":
        # The servers read a function named "all" as every function.
        raise typer.BadParameter("for every function write --all", param_hint="FUNCTION")
    try:
        check_function_name(function)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="FUNCTION") from None
    return _word(function, "function", "FUNCTION")


def _word(value: str, what: str, hint: str) -> bytes:
    try:
        return check_admin_word(value, what)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint=hint) from None
