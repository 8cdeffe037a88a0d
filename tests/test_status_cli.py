"""`jobserver status`: one table of a cluster's queues, summed and per server, over the admin
protocol, against jobserver and gearmand alike; servers that are down or silent shown as such;
`--json` for scripts; `--watch` redrawing (plain snapshots into a pipe, in place on a
terminal).

Queues are made with raw packets (tests/servers.py): background jobs, and workers that
register or hold a job while the command runs. Every wait has a generous deadline; nothing
asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import servers
from servers import (
    CAN_DO,
    GRAB_JOB_UNIQ,
    JOB_ASSIGN_UNIQ,
    JOB_CREATED,
    SUBMIT_JOB_BG,
    SUBMIT_JOB_HIGH_BG,
    SUBMIT_JOB_LOW_BG,
)

CLI_TIMEOUT = 60.0
"""Seconds one `jobserver status` or `submit` run may take (they answer in about a second)."""

OUTPUT_DEADLINE = 60.0
"""Seconds to wait for a running command to print what a test waits for."""

JOBSERVER = [sys.executable, "-m", "jobserver"]

MEMORY = ("--store", "memory")

TERMINAL_ENV = {"TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
"""A terminal rich can draw on: a pty has no size until someone sets one."""

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def jobserver(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `jobserver ARGS...` to completion, stdout and stderr captured."""
    return subprocess.run(
        [*JOBSERVER, *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=CLI_TIMEOUT,
        cwd=servers.REPO_ROOT,
    )


class Output:
    """Everything a running process writes to one pipe or pty, read by a thread, so a test
    can wait for what it expects with a deadline instead of blocking on a read."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._data = bytearray()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:  # EIO: a pty whose other side closed
                chunk = b""
            with self._changed:
                if not chunk:
                    self._closed = True
                    self._changed.notify_all()
                    return
                self._data += chunk
                self._changed.notify_all()

    @property
    def data(self) -> bytes:
        with self._changed:
            return bytes(self._data)

    def wait_for(self, holds: Callable[[bytes], object], what: str) -> bytes:
        """The output once `holds(output)` is true; fails after OUTPUT_DEADLINE."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: holds(bytes(self._data)) or self._closed, timeout=OUTPUT_DEADLINE
            )
            data = bytes(self._data)
        if not done or not holds(data):
            raise AssertionError(f"never saw {what}; output so far: {data[-3000:]!r}")
        return data

    def wait_closed(self) -> bytes:
        self._thread.join(OUTPUT_DEADLINE)
        assert not self._thread.is_alive(), "the output was never closed"
        return self.data


@contextlib.contextmanager
def running(
    *args: str, terminal: str = "", stdin: int = subprocess.DEVNULL
) -> Iterator[tuple[subprocess.Popen[bytes], Output, Output]]:
    """`jobserver ARGS...` started in the background; (process, stdout, stderr). With
    terminal="stdout" or "stderr" that stream is a pty, with "both" the two are one pty (the
    same Output twice), as when a person runs it. The process is stopped by its PID at the
    end if it is still running."""
    env = dict(os.environ)
    child_ends: dict[str, int] = {}
    parent_ends: dict[str, int] = {}
    if terminal == "both":
        parent_ends["stdout"], child_ends["stdout"] = pty.openpty()
        child_ends["stderr"] = child_ends["stdout"]
    for name in ("stdout", "stderr"):
        if name in child_ends:
            continue
        if name == terminal:
            parent_ends[name], child_ends[name] = pty.openpty()
        else:
            parent_ends[name], child_ends[name] = os.pipe()
    if terminal:
        env.update(TERMINAL_ENV)
    process = subprocess.Popen(
        [*JOBSERVER, *args],
        stdin=stdin,
        stdout=child_ends["stdout"],
        stderr=child_ends["stderr"],
        cwd=servers.REPO_ROOT,
        env=env,
    )
    for fd in set(child_ends.values()):
        os.close(fd)
    outputs = {name: Output(fd) for name, fd in parent_ends.items()}
    stdout = outputs["stdout"]
    stderr = outputs.get("stderr", stdout)
    try:
        yield process, stdout, stderr
    finally:
        servers.stop_process(process)
        for output in outputs.values():
            output.wait_closed()
        for fd in parent_ends.values():
            os.close(fd)


def plain(data: bytes) -> str:
    """Terminal output without its escape sequences."""
    return ANSI.sub(b"", data).decode(errors="replace")


def rows(output: bytes | str) -> list[list[str]]:
    """The lines of a table, split on runs of spaces (blank lines dropped)."""
    text = output.decode() if isinstance(output, bytes) else output
    return [line.split() for line in text.splitlines() if line.strip()]


def queue(
    server: servers.Server, function: str, count: int, kind: int = SUBMIT_JOB_BG, tag: str = ""
) -> None:
    """Queue `count` background jobs of `function` (distinct uniques, so none coalesce)."""
    with server.connect() as client:
        for n in range(count):
            unique = f"{function}-{tag}{kind}-{n}".encode()
            client.request(kind, function.encode(), unique, b"arg", expect=JOB_CREATED)


def worker(server: servers.Server, function: str, *, grab: bool) -> servers.Connection:
    """A worker connection that can do `function` and, with grab=True, holds one of its jobs
    (running) until closed. Registration is proven processed by the server's answer to the
    grab, or by an ECHO."""
    connection = server.connect()
    connection.send(CAN_DO, function.encode())
    if grab:
        connection.request(GRAB_JOB_UNIQ, expect=JOB_ASSIGN_UNIQ)
    else:
        connection.request(servers.ECHO_REQ, b"registered", expect=servers.ECHO_RES)
    return connection


@pytest.fixture
def cluster(start_jobserver, start_gearmand) -> Iterator[list[servers.Server]]:
    """Two jobservers and a gearmand with known queues:

    | server    | resize                                    | mail             |
    |-----------|-------------------------------------------|------------------|
    | first     | 3 normal + 1 high, the high one running    | 2 low            |
    | second    | 2 normal, a worker registered              |                  |
    | gearmand  | 1 normal + 1 high                          | 1 normal         |
    """
    first, second, gearmand = start_jobserver(*MEMORY), start_jobserver(*MEMORY), start_gearmand()
    queue(first, "resize", 3)
    queue(first, "resize", 1, SUBMIT_JOB_HIGH_BG)
    queue(first, "mail", 2, SUBMIT_JOB_LOW_BG)
    queue(second, "resize", 2)
    queue(gearmand, "resize", 1)
    queue(gearmand, "resize", 1, SUBMIT_JOB_HIGH_BG)
    queue(gearmand, "mail", 1)
    workers = [worker(first, "resize", grab=True), worker(second, "resize", grab=False)]
    yield [first, second, gearmand]
    for connection in workers:
        connection.close()


def addresses(*running_servers: servers.Server | str) -> str:
    return ",".join(
        server if isinstance(server, str) else server.address for server in running_servers
    )


def nowhere() -> str:
    """An address nothing listens on."""
    return f"{servers.HOST}:{servers.free_port()}"


# --- one table, one document -------------------------------------------------------------------


def test_json_sums_every_servers_queues_and_keeps_each_servers_numbers(cluster):
    first, second, gearmand = cluster
    result = jobserver("status", "--json", "--servers", addresses(*cluster))
    assert (result.returncode, result.stderr) == (0, b"")
    document = json.loads(result.stdout)

    resize = document["functions"]["resize"]
    per_server = resize.pop("servers")
    assert resize == {"queued": 7, "running": 1, "workers": 2, "high": 1, "normal": 6, "low": 0}
    assert per_server == {
        first.address: {"queued": 3, "running": 1, "workers": 1, "high": 0, "normal": 3, "low": 0},
        second.address: {"queued": 2, "running": 0, "workers": 1, "high": 0, "normal": 2, "low": 0},
        gearmand.address: {
            "queued": 2,
            "running": 0,
            "workers": 0,
            "high": 1,
            "normal": 1,
            "low": 0,
        },
    }
    mail = document["functions"]["mail"]
    assert set(mail.pop("servers")) == {first.address, gearmand.address}
    assert mail == {"queued": 3, "running": 0, "workers": 0, "high": 0, "normal": 1, "low": 2}

    assert [(s["server"], s["state"], s["note"]) for s in document["servers"]] == [
        (first.address, "up", None),
        (second.address, "up", None),
        (gearmand.address, "up", None),
    ]
    assert [(s["functions"], s["queued"], s["running"]) for s in document["servers"]] == [
        (2, 5, 1),
        (1, 2, 0),
        (2, 3, 0),
    ]


def test_table_has_a_total_row_and_a_row_per_server_for_each_function(cluster):
    first, second, gearmand = cluster
    result = jobserver("status", "--servers", addresses(*cluster))
    assert (result.returncode, result.stderr) == (0, b"")
    functions, servers_table = result.stdout.decode().split("\n\n")
    assert rows(functions) == [
        ["FUNCTION", "SERVER", "QUEUED", "HIGH", "NORMAL", "LOW", "RUNNING", "WORKERS"],
        ["mail", "total", "3", "0", "1", "2", "0", "0"],
        ["mail", first.address, "2", "0", "0", "2", "0", "0"],
        ["mail", gearmand.address, "1", "0", "1", "0", "0", "0"],
        ["resize", "total", "7", "1", "6", "0", "1", "2"],
        ["resize", first.address, "3", "0", "3", "0", "1", "1"],
        ["resize", second.address, "2", "0", "2", "0", "0", "1"],
        ["resize", gearmand.address, "2", "1", "1", "0", "0", "0"],
    ]
    assert rows(servers_table) == [
        ["SERVER", "STATE", "FUNCTIONS", "QUEUED", "RUNNING", "NOTE"],
        [first.address, "up", "2", "5", "1"],
        [second.address, "up", "1", "2", "0"],
        [gearmand.address, "up", "2", "3", "0"],
        ["total", "3/3", "up", "2", "10", "1"],
    ]


def test_a_server_that_is_down_is_shown_unreachable_and_the_rest_still_summed(start_jobserver):
    up, stopped = start_jobserver(*MEMORY), start_jobserver(*MEMORY)
    queue(up, "resize", 2)
    stopped.stop()

    result = jobserver("status", "--servers", addresses(up, stopped))
    assert result.returncode == 1
    assert b"1 of 2 servers did not answer" in result.stderr
    functions, servers_table = result.stdout.decode().split("\n\n")
    assert rows(functions)[1:] == [
        ["resize", "total", "2", "0", "2", "0", "0", "0"],
        ["resize", up.address, "2", "0", "2", "0", "0", "0"],
    ]
    assert rows(servers_table)[1:] == [
        [up.address, "up", "1", "2", "0"],
        [stopped.address, "unreachable", "-", "-", "-", "Connection", "refused"],
        ["total", "1/2", "up", "1", "2", "0"],
    ]

    document = json.loads(jobserver("status", "--json", "-s", addresses(up, stopped)).stdout)
    assert document["servers"][1] == {
        "server": stopped.address,
        "state": "unreachable",
        "note": "Connection refused",
        "functions": None,
        "queued": None,
        "running": None,
    }
    assert document["functions"]["resize"]["queued"] == 2


def test_every_server_down_still_prints_the_table_and_exits_1():
    first, second = nowhere(), nowhere()
    result = jobserver("status", "--servers", addresses(first, second))
    assert result.returncode == 1
    assert rows(result.stdout)[0] == ["no", "functions"]
    assert [row[:2] for row in rows(result.stdout)[2:4]] == [
        [first, "unreachable"],
        [second, "unreachable"],
    ]
    assert b"2 of 2 servers did not answer" in result.stderr


def test_a_silent_server_is_given_up_on_after_the_timeout(start_jobserver):
    up = start_jobserver(*MEMORY)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind((servers.HOST, 0))
        silent.listen()
        hung = f"{servers.HOST}:{silent.getsockname()[1]}"
        result = jobserver("status", "--timeout", "0.5", "--json", "--servers", addresses(up, hung))
    assert result.returncode == 1
    states = {s["server"]: (s["state"], s["note"]) for s in json.loads(result.stdout)["servers"]}
    assert states == {up.address: ("up", None), hung: ("unreachable", "no answer within 0.5 s")}


@contextlib.contextmanager
def fake_admin_server(replies: dict[bytes, bytes]) -> Iterator[str]:
    """A server on a free port that answers each admin line with `replies[line]` (and
    anything else with nothing), one connection at a time, in a thread; its address."""
    listener = socket.create_server((servers.HOST, 0))
    listener.settimeout(0.1)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection, contextlib.suppress(OSError):
                connection.settimeout(servers.IO_TIMEOUT)
                received = b""
                while b"\n" not in received:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                connection.sendall(replies.get(received.split(b"\n")[0].strip(), b""))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"{servers.HOST}:{listener.getsockname()[1]}"
    finally:
        stopping.set()
        thread.join(servers.IO_TIMEOUT)
        listener.close()


def test_a_server_without_prioritystatus_counts_and_a_garbled_one_is_failed(start_jobserver):
    ours = start_jobserver(*MEMORY)
    queue(ours, "resize", 1)
    old_gearmand = {  # a gearmand too old to know prioritystatus
        b"status": b"resize\t2\t0\t1\n.\n",
        b"prioritystatus": b"ERR UNKNOWN_COMMAND Unknown+server+commandprioritystatus\r\n",
    }
    garbled = {b"status": b"hello there\n.\n", b"prioritystatus": b".\n"}
    with fake_admin_server(old_gearmand) as old, fake_admin_server(garbled) as wrong:
        cluster = addresses(ours, old, wrong)
        result = jobserver("status", "--json", "--servers", cluster)
        table_result = jobserver("status", "--servers", cluster)
    assert result.returncode == table_result.returncode == 1
    document = json.loads(result.stdout)
    assert [(s["state"], s["note"]) for s in document["servers"]] == [
        ("up", None),
        ("up", "no priorities: ERR UNKNOWN_COMMAND Unknown+server+commandprioritystatus"),
        ("failed", "status: unexpected line 'hello there'"),
    ]
    resize = document["functions"]["resize"]
    assert resize["servers"][old] == {
        "queued": 2,
        "running": 0,
        "workers": 1,
        "high": None,
        "normal": None,
        "low": None,
    }
    assert (resize["queued"], resize["workers"], resize["normal"]) == (3, 1, None)
    assert ["resize", "total", "3", "-", "-", "-", "0", "1"] in rows(table_result.stdout)
    assert ["resize", ours.address, "1", "0", "1", "0", "0", "0"] in rows(table_result.stdout)


@pytest.mark.parametrize(
    "args", [["--servers", "host:notaport"], ["--servers", ""], ["--timeout", "0"], ["extra"]]
)
def test_bad_usage_exits_2(args):
    result = jobserver("status", *args)
    assert result.returncode == 2, result
    assert b"Usage: jobserver status" in result.stderr


# --- --watch -----------------------------------------------------------------------------------

TITLE = "jobserver status: "


def snapshots(output: bytes) -> list[str]:
    """The complete snapshots a piped `--watch` printed: each starts with its title line and
    ends with a blank line."""
    text = output.decode()
    parts = text.split(TITLE)[1:]
    return [TITLE + part for part in parts if part.endswith("\n\n")]


def queued(snapshot: str, function: str) -> str | None:
    for row in rows(snapshot):
        if row[:2] == [function, "total"]:
            return row[2]
    return None


def test_watch_into_a_pipe_prints_a_new_snapshot_each_second_until_sigterm(start_jobserver):
    server = start_jobserver(*MEMORY)
    queue(server, "resize", 1)
    with running("status", "--watch", "--servers", server.address) as (process, stdout, stderr):
        stdout.wait_for(lambda out: len(snapshots(out)) >= 1, "a first snapshot")
        queue(server, "resize", 2, tag="more")
        # A later snapshot sees the jobs queued after the first: each redraw asks again.
        output = stdout.wait_for(
            lambda out: queued(snapshots(out)[-1], "resize") == "3", "a snapshot with 3 queued"
        )
        assert queued(snapshots(output)[0], "resize") == "1"
        assert snapshots(output)[0].startswith(f"{TITLE}1 server, ")
        process.send_signal(signal.SIGTERM)
        assert process.wait(CLI_TIMEOUT) == 0
    assert stderr.data == b""


def test_watch_json_prints_one_document_per_line(start_jobserver):
    server = start_jobserver(*MEMORY)
    queue(server, "mail", 1)
    with running("status", "--watch", "--json", "-s", server.address) as (process, stdout, _):
        output = stdout.wait_for(lambda out: out.count(b"\n") >= 2, "two JSON lines")
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(CLI_TIMEOUT) == 0
    documents = [json.loads(line) for line in output.splitlines()[:2]]
    assert [d["functions"]["mail"]["queued"] for d in documents] == [1, 1]
    assert all(d["servers"][0]["state"] == "up" for d in documents)


def test_watch_on_a_terminal_redraws_in_place(start_jobserver):
    server = start_jobserver(*MEMORY)
    queue(server, "resize", 1)
    down = nowhere()
    with running("status", "--watch", "-s", addresses(server, down), terminal="stdout") as (
        process,
        stdout,
        _,
    ):
        output = stdout.wait_for(lambda out: out.count(TITLE.encode()) >= 3, "three redraws")
        process.send_signal(signal.SIGTERM)
        assert process.wait(CLI_TIMEOUT) == 0
        output = stdout.wait_closed()
    # rich's Live moves the cursor back up over the last table (ESC [ n A) before each redraw,
    # hides the cursor while it runs and shows it again when it stops.
    assert re.search(rb"\x1b\[\d*A", output)
    assert b"\x1b[?25l" in output and output.rstrip().endswith(b"\x1b[?25h")
    text = plain(output)
    assert f"{TITLE}2 servers, 1 not answering" in text
    assert ["resize", "total", "1", "0", "1", "0", "0", "0"] in rows(text)
    assert [down, "unreachable", "-", "-", "-", "Connection", "refused"] in rows(text)
