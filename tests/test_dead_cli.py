"""`jobserver dead list|retry|purge`: the dead jobs of several servers at once, over the admin
protocol, with a server column, per-server counts and a total; unreachable servers and servers
without dead jobs (gearmand) reported, with exit status 1.

Dead jobs are made with raw packets (tests/servers.py): background jobs whose worker answers
WORK_FAIL, on servers run with `--store memory` and the default `--bg-retries 0`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import servers
from test_sdk_failed_jobs import dead_jobs

CLI_TIMEOUT = 60
"""Seconds one `jobserver dead` run may take (it answers in well under a second)."""

CAN_DO = 1
SUBMIT_JOB_BG = 18
JOB_CREATED = 8
GRAB_JOB_UNIQ = 30
JOB_ASSIGN_UNIQ = 31
WORK_FAIL = 14

MEMORY = ("--store", "memory")


def jobserver_dead(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobserver", "dead", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=servers.REPO_ROOT,
    )


def make_dead(server: servers.Server, function: str, count: int) -> list[str]:
    """Submit `count` background jobs of `function` and fail each once; their handles."""
    handles = []
    with server.connect() as client:
        for n in range(count):
            unique = f"{function}-{n}".encode()
            handle = client.request(
                SUBMIT_JOB_BG, function.encode(), unique, b"arg", expect=JOB_CREATED
            )
            handles.append(handle.decode())
    with server.connect() as worker:
        worker.send(CAN_DO, function.encode())
        for _ in range(count):
            handle = worker.request(GRAB_JOB_UNIQ, expect=JOB_ASSIGN_UNIQ).split(b"\0")[0]
            worker.send(WORK_FAIL, handle)
    servers.wait_until(
        lambda: sum(fields[1] == function.encode() for fields in dead_jobs(server)) == count,
        what=f"{count} dead {function} jobs on {server}",
    )
    return handles


def table(output: str) -> list[list[str]]:
    """The rows of the command's table (header first), split on runs of spaces."""
    return [line.split() for line in output.splitlines()]


@pytest.fixture
def two_servers(start_jobserver) -> tuple[servers.Server, servers.Server]:
    return start_jobserver(*MEMORY), start_jobserver(*MEMORY)


def test_list_shows_every_servers_dead_jobs_in_one_table(two_servers):
    first, second = two_servers
    first_handles = make_dead(first, "resize", 2)
    second_handles = make_dead(second, "mail", 1)

    result = jobserver_dead("list", "--servers", f"{first.address},{second.address}")
    assert (result.returncode, result.stderr) == (0, "")
    header, *rows = table(result.stdout)
    assert header == [
        "SERVER",
        "HANDLE",
        "FUNCTION",
        "UNIQUE",
        "ATTEMPTS",
        "LAST",
        "FAILURE",
        "ERROR",
    ]
    listed = {(row[0], row[1], row[2], row[3], row[4]) for row in rows}
    assert listed == {
        (first.address, first_handles[0], "resize", "resize-0", "1"),
        (first.address, first_handles[1], "resize", "resize-1", "1"),
        (second.address, second_handles[0], "mail", "mail-0", "1"),
    }
    assert all(row[5].endswith("Z") for row in rows)  # last failure, UTC

    only_mail = jobserver_dead("list", "mail", "--servers", f"{first.address},{second.address}")
    assert only_mail.returncode == 0
    assert [row[1] for row in table(only_mail.stdout)[1:]] == second_handles


def test_list_with_no_dead_jobs_says_so(two_servers):
    first, second = two_servers
    result = jobserver_dead("list", "--all", "-s", f"{first.address},{second.address}")
    assert (result.returncode, result.stdout, result.stderr) == (0, "no dead jobs\n", "")


def test_list_reports_an_unreachable_server_and_exits_1(two_servers):
    first, _ = two_servers
    handles = make_dead(first, "resize", 1)
    nowhere = f"{servers.HOST}:{servers.free_port()}"

    result = jobserver_dead("list", "--servers", f"{nowhere},{first.address}")
    assert result.returncode == 1
    assert [row[:2] for row in table(result.stdout)[1:]] == [[first.address, handles[0]]]
    assert f"{nowhere}: Connection refused" in result.stderr
    assert "1 of 2 servers failed" in result.stderr


def test_retry_queues_a_functions_dead_jobs_again_on_every_server(two_servers):
    first, second = two_servers
    make_dead(first, "resize", 2)
    kept = make_dead(first, "mail", 1)
    make_dead(second, "resize", 1)

    result = jobserver_dead("retry", "resize", "--servers", f"{first.address},{second.address}")
    assert (result.returncode, result.stderr) == (0, "")
    assert table(result.stdout) == [
        ["SERVER", "RETRIED"],
        [first.address, "2"],
        [second.address, "1"],
        ["total", "3"],
    ]
    assert [fields[0].decode() for fields in dead_jobs(first)] == kept
    assert dead_jobs(second) == []
    assert servers.status(first.address)["resize"][0] == 2  # queued again, waiting for a worker
    assert servers.status(second.address)["resize"][0] == 1


def test_retry_by_handle_asks_every_server_and_one_has_it(two_servers):
    first, second = two_servers
    [handle] = make_dead(second, "resize", 1)
    both = f"{first.address},{second.address}"

    result = jobserver_dead("retry", "--handle", handle, "--servers", both)
    assert (result.returncode, result.stderr) == (0, "")
    assert table(result.stdout)[1:] == [[first.address, "0"], [second.address, "1"], ["total", "1"]]
    assert dead_jobs(second) == []

    again = jobserver_dead("retry", "--handle", handle, "--servers", both)
    assert again.returncode == 1
    assert f"no server has a dead job {handle!r}" in again.stderr


def test_purge_deletes_on_the_servers_it_reaches_and_reports_the_one_it_cannot(two_servers):
    first, second = two_servers
    make_dead(first, "resize", 2)
    make_dead(first, "mail", 1)
    make_dead(second, "mail", 2)
    nowhere = f"{servers.HOST}:{servers.free_port()}"

    result = jobserver_dead(
        "purge", "--all", "--servers", f"{first.address},{nowhere},{second.address}"
    )
    assert result.returncode == 1
    rows = table(result.stdout)
    assert rows[0] == ["SERVER", "PURGED"]
    assert rows[1] == [first.address, "3"]
    assert rows[2][:2] == [nowhere, "failed:"] and "Connection refused" in result.stdout
    assert rows[3:] == [[second.address, "2"], ["total", "5"]]
    assert "1 of 3 servers failed" in result.stderr
    assert dead_jobs(first) == dead_jobs(second) == []


def test_gearmand_is_reported_as_not_knowing_dead_jobs(start_jobserver, start_gearmand):
    ours, gearmand = start_jobserver(*MEMORY), start_gearmand()
    make_dead(ours, "resize", 1)
    result = jobserver_dead("list", "--servers", f"{ours.address},{gearmand.address}")
    assert result.returncode == 1
    assert len(table(result.stdout)) == 2  # the header and our one dead job
    assert f"{gearmand.address}: does not know dead jobs (ERR UNKNOWN_SHOW_ARGUMENTS)" in (
        result.stderr
    )
    purge = jobserver_dead("purge", "--all", "--servers", f"{ours.address},{gearmand.address}")
    assert purge.returncode == 1
    assert "does not know dead jobs (ERR UNKNOWN_COMMAND" in purge.stdout
    assert dead_jobs(ours) == []


@pytest.mark.parametrize(
    "args",
    [
        ["purge"],  # neither FUNCTION nor --all
        ["retry"],
        ["purge", "all"],  # the servers would read it as every function
        ["purge", "resize", "--all"],
        ["retry", "resize", "--handle", "H:x:1"],
        ["list", "two words"],
        ["retry", "--handle", "H x"],
        ["list", "--servers", "host:notaport"],
    ],
)
def test_bad_usage_exits_2_before_asking_any_server(args):
    result = jobserver_dead(*args)
    assert result.returncode == 2, result
    assert "Usage: jobserver dead" in result.stderr
