"""`jobserver submit`: one job from the command line, with its progress (issue 14).

Built on client_sdk's Client. DATA is the job's argument: with `--codec raw` its bytes as they
are, with `json` or `msgpack` (the SDKs' default) JSON text turned into the value the codec
encodes; `-` reads it from stdin; without DATA the argument is None (raw: empty).

A foreground job's WORK_DATA chunks go to stdout as they arrive, then its result: raw bytes
with `--codec raw`, else the decoded value as one line of JSON. Its progress goes to stderr:
on a terminal a bar driven by WORK_STATUS (numerator/denominator), otherwise plain lines
(`job H accepted by S`, `progress: 1/4 25%`, `warning: ...`) that a log or a test can read.
`--background` prints the job's handle on stdout (and where it is queued on stderr).

Exit status: 0 when the job completed (or was queued), 1 when it failed (WORK_FAIL, WORK_EXCEPTION
with its text, the server lost, `--timeout` passed, no server available), with the reason on
stderr; 2 for bad usage; 130 on Ctrl-C.

    jobserver submit resize '{"path": "a.png"}' --servers 10.0.0.1:4730,10.0.0.2:4730
    echo hello | jobserver submit reverse - --codec raw --timeout 10
    jobserver submit resize '{"path": "b.png"}' --background --priority high --unique b.png
    jobserver submit resize '{"path": "c.png"}' --servers jobs.example:4730 --tls-ca ca.pem
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import anyio
import typer

from client_sdk import Client, Data, GearmanError, JobHandle, Status, Update

from .cli_servers import DEFAULT_SERVERS, ServersOption, parse_servers, text
from .cli_tls import TlsCaOption, TlsCertOption, TlsKeyOption, tls_context
from .sdk.names import check_function_name

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

STDIN = "-"

INTERRUPTED = 130
"""Exit status after Ctrl-C: 128 + SIGINT, as shells report it."""


class Codec(enum.StrEnum):
    raw = "raw"
    json = "json"
    msgpack = "msgpack"


class Priority(enum.StrEnum):
    high = "high"
    normal = "normal"
    low = "low"


def job_argument(data: str | None, codec: Codec) -> Any:
    """The job's argument from DATA: bytes for raw, the JSON value for json and msgpack.

    >>> job_argument('{"a": [1, 2]}', Codec.msgpack), job_argument("x y", Codec.raw)
    ({'a': [1, 2]}, b'x y')
    """
    if data is None:
        return None
    # os.fsencode: the argument's bytes as the shell passed them, even if not UTF-8.
    raw = sys.stdin.buffer.read() if data == STDIN else os.fsencode(data)
    if codec is Codec.raw:
        return raw
    try:
        return json.loads(raw)
    except ValueError as error:
        raise typer.BadParameter(
            f"with --codec {codec} DATA is JSON text ({error}); --codec raw sends bytes as they "
            "are",
            param_hint="DATA",
        ) from None


def result_bytes(result: Any, codec: Codec) -> bytes:
    """What stdout gets for a result: raw bytes as they are, any other value as one JSON line
    (bytes inside a msgpack value as text, invalid UTF-8 as \\xNN escapes).

    >>> result_bytes({"ok": True, "path": b"a.png"}, Codec.msgpack)
    b'{"ok": true, "path": "a.png"}\\n'
    """
    if codec is Codec.raw:
        return bytes(result)

    def bytes_as_text(value: object) -> str:
        if isinstance(value, bytes | bytearray):
            return bytes(value).decode("utf-8", "backslashreplace")
        return repr(value)

    try:
        encoded = json.dumps(result, ensure_ascii=False, default=bytes_as_text)
    except (TypeError, ValueError):  # e.g. a msgpack map with bytes keys
        encoded = repr(result)
    return encoded.encode("utf-8", "backslashreplace") + b"\n"


# --- progress ----------------------------------------------------------------------------------


class ProgressView(Protocol):
    """Where a foreground job's progress goes while it runs."""

    def accepted(self, handle: JobHandle) -> None: ...

    def update(self, update: Update) -> None: ...

    def close(self, *, done: bool) -> None:
        """The job ended (done: it completed); stop drawing before anything else is printed."""


class PlainProgress:
    """Progress as lines on stderr and WORK_DATA as raw bytes on stdout, flushed at once:
    what a pipe, a log file or a test gets."""

    def accepted(self, handle: JobHandle) -> None:
        _say(f"job {handle} accepted by {handle.server}")

    def update(self, update: Update) -> None:
        if isinstance(update, Status):
            _say(f"progress: {_fraction(update)}")
        elif isinstance(update, Data):
            _write(update.data)
        else:
            _say(f"warning: {text(update.data)}")

    def close(self, *, done: bool) -> None:
        pass


class TerminalProgress:
    """A rich progress bar on stderr (a terminal): pulsing until the first WORK_STATUS, then
    numerator of denominator. WORK_DATA goes to stdout; when stdout is the terminal too, each
    chunk is printed above the bar instead of through it."""

    def __init__(self, function: str, progress: Progress) -> None:
        self._function = function
        self._progress = progress
        self._data_on_terminal = sys.stdout.isatty()
        self._description = f"{function}: submitting"
        progress.start()
        self._task: TaskID = progress.add_task(self._description, total=None)

    @classmethod
    def on_stderr(cls, function: str) -> TerminalProgress | None:
        """The bar, when stderr is a terminal that can redraw in place; else None."""
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        if not console.is_terminal or console.is_dumb_terminal:
            return None
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        return cls(function, progress)

    def accepted(self, handle: JobHandle) -> None:
        self._description = f"{self._function} {handle}"
        self._progress.update(self._task, description=self._description)

    def update(self, update: Update) -> None:
        if isinstance(update, Status):
            total = update.denominator if update.denominator > 0 else None
            self._progress.update(self._task, completed=update.numerator, total=total)
        elif isinstance(update, Data):
            if self._data_on_terminal:
                self._print(text(update.data).removesuffix("\n"), style=None)
            else:
                _write(update.data)
        else:
            self._print(f"warning: {text(update.data)}", style="yellow")

    def close(self, *, done: bool) -> None:
        outcome = "done" if done else "failed"
        self._progress.update(self._task, description=f"{self._description}: {outcome}")
        self._progress.stop()

    def _print(self, line: str, style: str | None) -> None:
        from rich.text import Text

        self._progress.console.print(Text(line, style=style or ""), soft_wrap=True)


# --- running the job ---------------------------------------------------------------------------


async def run_foreground(
    client: Client,
    function: str,
    arg: Any,
    *,
    unique: str | None,
    priority: Priority,
    timeout: float | None,
    view: ProgressView,
) -> Any:
    """Submit one foreground job, show its updates, return its decoded result."""
    async with client.stream(
        function, arg, unique=unique, priority=priority.value, timeout=timeout
    ) as job:
        view.accepted(job.handle)
        async for update in job:
            view.update(update)
    return await job.result()


app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Submit one job to a cluster and wait for its result, showing its progress "
    "(WORK_STATUS) and printing its data (WORK_DATA) as it comes; or queue it (--background) "
    "and print its handle. Exit status 1 when the job fails, with the reason on stderr.",
)


@app.command()
def submit(
    function: Annotated[
        str, typer.Argument(metavar="FUNCTION", help="The job's function.", show_default=False)
    ],
    data: Annotated[
        str | None,
        typer.Argument(
            metavar="DATA",
            help="The job's argument: JSON text (--codec json, msgpack) or bytes (raw); "
            "'-' reads it from stdin. Default: none.",
            show_default=False,
        ),
    ] = None,
    servers: ServersOption = DEFAULT_SERVERS,
    background: Annotated[
        bool, typer.Option("--background", "-b", help="Queue the job and print its handle.")
    ] = False,
    codec: Annotated[
        Codec,
        typer.Option(
            "--codec",
            "-c",
            help="How the argument and result are encoded: msgpack (the SDKs' default), json, "
            "or raw bytes (gearman -f, workers in other languages).",
        ),
    ] = Codec.msgpack,
    unique: Annotated[
        str | None,
        typer.Option(
            "--unique",
            "-u",
            help="Unique id: jobs with the same one coalesce (and go to the same server).",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[
        Priority, typer.Option("--priority", "-p", help="Which jobs workers get first.")
    ] = Priority.normal,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            "-t",
            min=0.001,
            help="Seconds the whole call may take (background: until a server queued it). "
            "Default: wait as long as the job runs.",
            show_default=False,
        ),
    ] = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    addresses = parse_servers(servers)
    tls = tls_context(tls_ca, tls_cert, tls_key, command="jobserver submit")
    try:
        check_function_name(function)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="FUNCTION") from None
    arg = job_argument(data, codec)
    # The SDK logs unreachable servers at WARNING for long-running programs; here the one
    # error that matters is reported below, so the log would only say it twice.
    logging.getLogger("client_sdk").addHandler(logging.NullHandler())

    async def queue() -> JobHandle:
        async with Client(addresses, codec=codec.value, tls=tls) as client:
            return await client.submit_background(
                function, arg, unique=unique, priority=priority.value, timeout=timeout
            )

    async def wait(view: ProgressView) -> Any:
        async with Client(addresses, codec=codec.value, tls=tls) as client:
            return await run_foreground(
                client,
                function,
                arg,
                unique=unique,
                priority=priority,
                timeout=timeout,
                view=view,
            )

    if background:
        with _exit_on_failure():
            handle = anyio.run(queue, backend="trio")
        typer.echo(handle)
        _say(f"job {handle} queued on {handle.server}")
        return
    view: ProgressView = TerminalProgress.on_stderr(function) or PlainProgress()
    with _exit_on_failure():
        try:
            result = anyio.run(wait, view, backend="trio")
        except BaseException:
            view.close(done=False)
            raise
        view.close(done=True)
    output = result_bytes(result, codec)
    if sys.stdout.isatty() and not output.endswith(b"\n"):
        output += b"\n"  # a terminal's prompt on a line of its own; pipes get the exact bytes
    _write(output)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `jobserver submit ...` (argv without the `submit` word)."""
    app(args=argv, prog_name="jobserver submit")


# --- internals ---------------------------------------------------------------------------------


@contextmanager
def _exit_on_failure() -> Iterator[None]:
    """The SDK's errors become exit 1 with the reason on stderr, an argument the SDK refuses
    (a unique over 64 bytes) exit 2, Ctrl-C exit 130."""
    try:
        yield
    except GearmanError as error:
        _say(f"jobserver submit: {error}")
        raise typer.Exit(1) from None
    except ValueError as error:
        _say(f"jobserver submit: {error}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _say("jobserver submit: interrupted")
        raise typer.Exit(INTERRUPTED) from None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write(data: bytes) -> None:
    """Bytes to stdout as they are, at once (a reader sees each WORK_DATA as it arrives)."""
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def _fraction(status: Status) -> str:
    """`1/4 25%`; without a denominator (0) just the numerator's fraction."""
    fraction = f"{status.numerator}/{status.denominator}"
    if status.denominator > 0:
        return f"{fraction} {100 * status.numerator // status.denominator}%"
    return fraction
