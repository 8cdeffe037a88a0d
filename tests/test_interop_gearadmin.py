"""Debian's `gearadmin` against the server: every flag, output checked exactly.

Each test builds the same state on jobserver and on gearmand 1.1.20 (`any_server`) with raw
protocol packets, then runs gearadmin. Only what must differ is normalised: connection fds
(`FD`), job handles (replaced by the unique of the job they name), the version string and
the pid. List output comes in hash order on gearmand, so list lines are compared sorted.

The last section pins the admin-protocol behaviours where jobserver deliberately differs
from gearmand 1.1.20 (README: "Where we deliberately differ from gearmand 1.1.20").
"""

from __future__ import annotations

import contextlib
import re
import subprocess

import pytest
from servers import (
    CAN_DO,
    GEARADMIN,
    GRAB_JOB,
    GRAB_JOB_UNIQ,
    IO_TIMEOUT,
    JOB_ASSIGN,
    JOB_ASSIGN_UNIQ,
    JOB_CREATED,
    SET_CLIENT_ID,
    SUBMIT_JOB,
    SUBMIT_JOB_BG,
    SUBMIT_JOB_HIGH_BG,
    SUBMIT_JOB_LOW_BG,
    WORK_FAIL,
    Connection,
    Server,
    admin,
    gearman_tool_env,
    status,
    wait_until,
)

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("gearman_tools")]

VERSION = {"jobserver": "jobserver-0.1.0", "gearmand": "1.1.20+ds"}

# The reference state: (packet type, function, unique) of each background job, in order.
REFERENCE_JOBS = [
    (SUBMIT_JOB_HIGH_BG, b"resize", b"r-high"),
    (SUBMIT_JOB_BG, b"resize", b"r-normal-1"),
    (SUBMIT_JOB_BG, b"resize", b"r-normal-2"),
    (SUBMIT_JOB_LOW_BG, b"resize", b"r-low"),
    (SUBMIT_JOB_BG, b"bigjob", b""),
]
NO_UNIQUE = "(bigjob, no unique)"  # how the bigjob handle is shown after normalisation


def gearadmin(server: Server, *flags: str) -> tuple[int, str, str]:
    """Run gearadmin against `server`; returns (exit status, stdout, stderr)."""
    result = subprocess.run(
        [GEARADMIN, "-h", server.host, "-p", str(server.port), *flags],
        capture_output=True,
        timeout=2 * IO_TIMEOUT,
        env=gearman_tool_env(),
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def list_lines(output: str) -> list[str]:
    """The lines of a list reply, sorted, after checking it ends with the "." line."""
    lines = output.split("\n")
    assert lines[-2:] == [".", ""], f"not a complete list reply: {output!r}"
    return sorted(lines[:-2])


class ReferenceState:
    """Jobs, a named worker and a client on one server; the connections stay open.

    - worker `img-worker-7` registered `resize` then `thumb`, and holds the HIGH resize job;
    - resize has NORMAL x2 and LOW x1 queued; thumb has no jobs;
    - the bigjob job (empty unique) was taken by a worker that vanished: requeued, retries=1;
    - the client that submitted everything is still connected.
    """

    def __init__(self, server: Server):
        self.server = server
        self.worker = server.connect()
        self.worker.send(SET_CLIENT_ID, b"img-worker-7")
        self.worker.send(CAN_DO, b"resize")
        self.worker.send(CAN_DO, b"thumb")

        self.client = server.connect()
        self.labels: dict[str, str] = {}  # job handle -> the unique that names it in tests
        for packet_type, function, unique in REFERENCE_JOBS:
            handle = self.client.request(packet_type, function, unique, b"data", expect=JOB_CREATED)
            self.labels[handle.decode()] = unique.decode() or NO_UNIQUE

        assigned = self.worker.request(GRAB_JOB_UNIQ, expect=JOB_ASSIGN_UNIQ)
        assert assigned.split(b"\0")[1:3] == [b"resize", b"r-high"]

        with server.connect() as vanishing_worker:
            vanishing_worker.send(CAN_DO, b"bigjob")
            vanishing_worker.request(GRAB_JOB, expect=JOB_ASSIGN)
        wait_until(
            lambda: status(server.address).get("bigjob") == (1, 0, 0),
            what="the vanished worker's job to be requeued",
        )

    def handle(self, label: str) -> str:
        return next(handle for handle, name in self.labels.items() if name == label)

    def normalise_handles(self, text: str) -> str:
        for handle, label in self.labels.items():
            text = text.replace(handle, label)
        return text

    def close(self) -> None:
        self.worker.close()
        self.client.close()


@pytest.fixture
def state(any_server):
    reference = ReferenceState(any_server)
    yield reference
    reference.close()


def normalise_workers(output: str) -> str:
    """`workers` lines start with the connection's fd, which differs between servers."""
    return re.sub(r"^\d+ ", "FD ", output, flags=re.MULTILINE)


# --- read-only flags ----------------------------------------------------------------------


def test_status_counts_total_running_and_registered_workers(state):
    code, out, err = gearadmin(state.server, "--status")

    assert (code, err) == (0, "")
    assert list_lines(out) == ["bigjob\t1\t0\t0", "resize\t4\t1\t1", "thumb\t0\t0\t1"]


def test_priority_status_counts_queued_jobs_per_priority(state):
    code, out, err = gearadmin(state.server, "--priority-status")

    assert (code, err) == (0, "")
    # function, HIGH, NORMAL, LOW, workers: the running HIGH job is not queued any more.
    assert list_lines(out) == [
        "bigjob\t0\t1\t0\t0",
        "resize\t0\t2\t1\t1",
        "thumb\t0\t0\t0\t1",
    ]


def test_workers_lists_every_connection_with_its_id_and_functions(state):
    expected = [
        "FD 127.0.0.1 - :",  # the client
        "FD 127.0.0.1 - :",  # gearadmin's own connection
        "FD 127.0.0.1 img-worker-7 : thumb resize",  # most recent registration first
    ]

    def workers():
        code, out, err = gearadmin(state.server, "--workers")
        return (code, err, list_lines(normalise_workers(out)))

    # Connections of earlier admin polls may take a moment to disappear from the list.
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: workers() == (0, "", expected), what="the three connections")
    assert workers() == (0, "", expected)


def test_show_jobs_lists_handle_retries_ignored_and_persisted(state):
    code, out, err = gearadmin(state.server, "--show-jobs")

    assert (code, err) == (0, "")
    assert list_lines(state.normalise_handles(out)) == sorted(
        [
            "r-high\t0\t0\t1",
            "r-normal-1\t0\t0\t1",
            "r-normal-2\t0\t0\t1",
            "r-low\t0\t0\t1",
            f"{NO_UNIQUE}\t1\t0\t1",  # requeued once after its worker vanished
        ]
    )


def test_show_unique_jobs_lists_every_unique_including_empty(state):
    code, out, err = gearadmin(state.server, "--show-unique-jobs")

    assert (code, err) == (0, "")
    assert list_lines(out) == ["", "r-high", "r-low", "r-normal-1", "r-normal-2"]


def test_server_version(any_server):
    assert gearadmin(any_server, "--server-version") == (0, VERSION[any_server.name] + "\n", "")


DEFAULT_LOG_LEVEL = {"jobserver": "NOTICE", "gearmand": "ERROR"}
"""jobserver logs its lifecycle (listening, store opened, limits hit) at NOTICE, its default, so
that a log file shows them; gearmand's default is ERROR (README: where we differ)."""


def test_server_verbose_reports_the_default_log_level(any_server):
    expected = DEFAULT_LOG_LEVEL[any_server.name] + "\n"
    assert gearadmin(any_server, "--server-verbose") == (0, expected, "")


def test_getpid_is_the_server_process_id(any_server):
    assert gearadmin(any_server, "--getpid") == (0, f"{any_server.pid}\n", "")


def test_several_flags_in_one_call_answer_in_gearadmin_order(any_server):
    # gearadmin runs its actions in its own fixed order, whatever the command line says.
    flags = ("--status", "--create-function", "newfn", "--getpid", "--server-version")

    assert gearadmin(any_server, *flags) == (
        0,
        f"{any_server.pid}\nOK\n{VERSION[any_server.name]}\nnewfn\t0\t0\t0\n.\n",
        "",
    )


# --- --cancel-job -----------------------------------------------------------------------


def test_cancel_job_with_unknown_handle_is_an_error(any_server):
    assert gearadmin(any_server, "--cancel-job", "H:nohost:999") == (
        0,
        "",
        "Error: UNKNOWN_JOB\r\n",
    )


def test_cancel_job_of_a_queued_job(state):
    assert gearadmin(state.server, "--cancel-job", state.handle("r-low")) == (0, "OK\n", "")

    _, jobs, _ = gearadmin(state.server, "--show-jobs")
    _, priorities, _ = gearadmin(state.server, "--priority-status")
    if state.server.name == "gearmand":
        # Marked ignored and not persisted, but still queued until a worker reaps it.
        assert "r-low\t0\t1\t0" in list_lines(state.normalise_handles(jobs))
        assert "resize\t0\t2\t1\t1" in list_lines(priorities)
    else:
        # jobserver forgets a cancelled job at once (jobserver/admin.py, `show jobs`).
        assert "r-low" not in state.normalise_handles(jobs)
        assert "resize\t0\t2\t0\t1" in list_lines(priorities)


def test_cancel_job_sends_work_fail_to_the_waiting_client(any_server):
    with Connection(any_server.host, any_server.port) as client:
        handle = client.request(SUBMIT_JOB, b"nobody", b"", b"data", expect=JOB_CREATED)

        assert gearadmin(any_server, "--cancel-job", handle.decode()) == (0, "OK\n", "")
        assert client.recv() == (WORK_FAIL, handle)


# --- --create-function / --drop-function ------------------------------------------------


def test_create_function_adds_an_empty_function(state):
    assert gearadmin(state.server, "--create-function", "newfn") == (0, "OK\n", "")

    assert status(state.server.address)["newfn"] == (0, 0, 0)


def test_drop_function_removes_an_idle_function(state):
    gearadmin(state.server, "--create-function", "newfn")

    assert gearadmin(state.server, "--drop-function", "newfn") == (0, "OK\n", "")
    assert "newfn" not in status(state.server.address)


def test_drop_function_matches_the_name_case_insensitively(any_server):
    gearadmin(any_server, "--create-function", "MixedCase")

    assert gearadmin(any_server, "--drop-function", "mixedcase") == (0, "OK\n", "")
    assert status(any_server.address) == {}


def test_drop_function_unknown_is_an_error(any_server):
    assert gearadmin(any_server, "--drop-function", "nonex") == (
        0,
        "",
        "Error: function not found\r\n",
    )


def test_drop_function_with_a_registered_worker_is_refused(state):
    assert gearadmin(state.server, "--drop-function", "thumb") == (
        0,
        "",
        "Error: there are still connected workers or executing clients\r\n",
    )
    assert status(state.server.address)["thumb"] == (0, 0, 1)


def test_drop_function_with_queued_jobs(state):
    # gearmand drops the function and orphans its queued job; jobserver refuses.
    result = gearadmin(state.server, "--drop-function", "bigjob")

    if state.server.name == "gearmand":
        assert result == (0, "OK\n", "")
        assert "bigjob" not in status(state.server.address)
    else:
        assert result == (0, "", "Error: function+has+queued+jobs\r\n")
        assert status(state.server.address)["bigjob"] == (1, 0, 0)


# --- the same state gives the same gearadmin output on both servers ----------------------


def test_gearadmin_output_matches_gearmand(start_jobserver, start_gearmand):
    def snapshot(server: Server) -> dict[str, tuple[int, str, str]]:
        reference = ReferenceState(server)
        try:
            views = {}
            for flag in ("--status", "--priority-status", "--show-jobs", "--show-unique-jobs"):
                code, out, err = gearadmin(server, flag)
                views[flag] = (code, list_lines(reference.normalise_handles(out)), err)
            views["--server-verbose"] = gearadmin(server, "--server-verbose")
            return views
        finally:
            reference.close()

    # At gearmand's default log level (ours is NOTICE), so --server-verbose matches too.
    assert snapshot(start_jobserver("--verbose", "ERROR")) == snapshot(start_gearmand())


# --- admin protocol: where jobserver deliberately differs from gearmand 1.1.20 ------------


def test_create_function_over_lf_keeps_the_whole_name(any_server):
    # gearmand 1.1.x drops the last character unless the line ends in CRLF.
    assert admin(any_server.address, b"create function foo\n") == b"OK\r\n"

    created = "fo" if any_server.name == "gearmand" else "foo"
    assert status(any_server.address) == {created: (0, 0, 0)}


def test_maxqueue_on_an_unknown_function(any_server):
    # gearmand answers OK and does nothing; jobserver creates the function with the limit.
    assert admin(any_server.address, "maxqueue newq 10") == b"OK\r\n"

    expected = {} if any_server.name == "gearmand" else {"newq": (0, 0, 0)}
    assert status(any_server.address) == expected


def test_admin_line_with_six_tokens(any_server):
    # gearmand closes the connection without a reply; jobserver answers with an error.
    line = b"status a b c d e\n"
    reply = b""
    with (
        Connection(any_server.host, any_server.port) as conn,
        contextlib.suppress(ConnectionResetError),
    ):
        conn.sock.sendall(line)
        while not reply.endswith(b"\n") and (chunk := conn.sock.recv(4096)):
            reply += chunk

    if any_server.name == "gearmand":
        assert reply == b""
    else:
        assert reply == b"ERR INVALID_ARGUMENTS Too+many+arguments\r\n"
