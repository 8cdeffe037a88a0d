"""Debian's `gearman` command (libgearman 1.1.20) as client and worker against the server.

Every test runs against jobserver and against gearmand 1.1.20 (`any_server`): the expected
values were observed on gearmand, so a pass on both proves jobserver is a drop-in peer for
libgearman clients and workers. The worker commands are ordinary shell tools; the gearman
worker feeds them the workload on stdin and returns their stdout as the result.
"""

from __future__ import annotations

import shlex

import pytest
from servers import GearmanCLI, admin, status, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("gearman_tools")]


@pytest.fixture
def gearman(any_server):
    with GearmanCLI(any_server) as cli:
        yield cli


def log_lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def appending_worker_command(log) -> tuple[str, ...]:
    """A worker command that records each workload as one line of `log` and returns it."""
    return ("sh", "-c", f'x=$(cat); echo "$x" >> {shlex.quote(str(log))}; printf %s "$x"')


def test_foreground_job_returns_the_worker_result(gearman):
    gearman.worker("rev", "rev")

    result = gearman.run("-f", "rev", "hello world")

    assert (result.returncode, result.stdout, result.stderr) == (0, b"dlrow olleh", b"")


def test_foreground_workload_from_stdin_keeps_newlines(gearman):
    gearman.worker("upper", "tr", "a-z", "A-Z")

    result = gearman.run("-f", "upper", input=b"first line\nsecond line\n\0binary\n")

    assert result.stdout == b"FIRST LINE\nSECOND LINE\n\0BINARY\n"


def test_several_data_arguments_are_one_workload(gearman):
    gearman.worker("rev", "rev")

    assert gearman.run("-f", "rev", "ab", "cd").stdout == b"ab"[::-1] + b"cd"[::-1]


def test_line_mode_submits_one_job_per_line(gearman):
    gearman.worker("count", "wc", "-l")

    per_line = gearman.run("-n", "-f", "count", input=b"a\nb\nc\n")
    whole = gearman.run("-f", "count", input=b"a\nb\nc\n")

    assert per_line.stdout == b"1\n1\n1\n"
    assert whole.stdout == b"3\n"


def test_prefix_option_names_the_function(gearman):
    gearman.worker("rev", "rev")

    assert gearman.run("-P", "-f", "rev", "xyz").stdout == b"rev: zyx"


def test_high_and_low_priority_foreground_jobs_complete(gearman):
    gearman.worker("rev", "rev")

    assert gearman.run("-I", "-f", "rev", "high").stdout == b"hgih"
    assert gearman.run("-L", "-f", "rev", "low").stdout == b"wol"


def test_failing_worker_command_fails_the_client(gearman):
    # The gearman worker sends WORK_FAIL when its command exits non-zero.
    gearman.worker("broken", "false")

    result = gearman.run("-f", "broken", "x")

    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"Job failed\n")


def test_worker_line_mode_forwards_work_data_packets(gearman):
    # `-w -n` makes the worker send one WORK_DATA per output line. libgearman 1.1.20 sends
    # the accumulated output each time, so the client prints a, a b, a b c: observed on
    # gearmand, and the server must forward every WORK_DATA in order.
    gearman.worker("lines", "printf", r"a\nb\nc\n", options=("-n",))

    result = gearman.run("-f", "lines", "x")

    assert result.stdout == b"a\na\nb\na\nb\nc\n"


def test_background_jobs_wait_for_a_worker_then_run(gearman, tmp_path):
    log = tmp_path / "log"
    for n in range(5):
        result = gearman.run("-b", "-f", "bg", f"job-{n}")
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert status(gearman.server.address) == {"bg": (5, 0, 0)}

    worker = gearman.worker("bg", *appending_worker_command(log), options=("-c", "5"))

    assert gearman.finish(worker)[0] == 0  # -c 5: exits after five jobs
    assert log_lines(log) == [f"job-{n}" for n in range(5)]
    # gearmand keeps listing "bg" with zeros; jobserver forgets a function nothing uses.
    wait_until(lambda: status(gearman.server.address) in ({"bg": (0, 0, 0)}, {}), what="drained")


def test_background_jobs_submitted_while_a_worker_sleeps_wake_it(gearman, tmp_path):
    log = tmp_path / "log"
    gearman.worker("bg", *appending_worker_command(log))

    for n in range(3):
        assert gearman.run("-b", "-f", "bg", f"job-{n}").returncode == 0

    wait_until(lambda: len(log_lines(log)) == 3, what="three background jobs to run")
    assert log_lines(log) == ["job-0", "job-1", "job-2"]
    wait_until(lambda: status(gearman.server.address) == {"bg": (0, 0, 1)}, what="drained")


def test_worker_count_option_leaves_the_rest_queued(gearman, tmp_path):
    log = tmp_path / "log"
    for n in range(3):
        gearman.run("-b", "-f", "bg", f"job-{n}")

    worker = gearman.worker("bg", *appending_worker_command(log), options=("-c", "2"))

    assert gearman.finish(worker)[0] == 0
    assert log_lines(log) == ["job-0", "job-1"]
    wait_until(lambda: status(gearman.server.address) == {"bg": (1, 0, 0)}, what="one left")


def test_background_priorities_run_high_then_normal_then_low(gearman, tmp_path):
    log = tmp_path / "log"
    submissions = [
        (("-L",), "low-1"),
        ((), "normal-1"),
        (("-I",), "high-1"),
        (("-L",), "low-2"),
        ((), "normal-2"),
        (("-I",), "high-2"),
    ]
    for priority, data in submissions:
        assert gearman.run("-b", *priority, "-f", "prio", data).returncode == 0

    # prioritystatus: function, queued HIGH, NORMAL, LOW, workers.
    assert admin(gearman.server.address, "prioritystatus") == b"prio\t2\t2\t2\t0\n.\n"

    worker = gearman.worker("prio", *appending_worker_command(log), options=("-c", "6"))

    assert gearman.finish(worker)[0] == 0
    assert log_lines(log) == ["high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]


def test_background_jobs_with_the_same_unique_coalesce(gearman, tmp_path):
    log = tmp_path / "log"
    assert gearman.run("-b", "-u", "same-key", "-f", "bg", "first").returncode == 0
    assert gearman.run("-b", "-u", "same-key", "-f", "bg", "second").returncode == 0
    assert gearman.run("-b", "-u", "other-key", "-f", "bg", "third").returncode == 0

    assert status(gearman.server.address) == {"bg": (2, 0, 0)}
    uniques = admin(gearman.server.address, "show unique jobs").decode().splitlines()
    assert sorted(uniques) == [".", "other-key", "same-key"]

    worker = gearman.worker("bg", *appending_worker_command(log), options=("-c", "2"))

    assert gearman.finish(worker)[0] == 0
    assert log_lines(log) == ["first", "third"]  # the later payload for same-key is ignored


def test_foreground_clients_with_the_same_unique_share_one_run(gearman, tmp_path):
    log = tmp_path / "log"
    slow_echo = f'x=$(cat); echo "$x" >> {shlex.quote(str(log))}; sleep 1; printf "done:%s" "$x"'
    gearman.worker("slow", "sh", "-c", slow_echo)

    first = gearman.spawn("-u", "shared", "-f", "slow", "first")
    wait_until(lambda: status(gearman.server.address)["slow"] == (1, 1, 1), what="job running")
    second = gearman.spawn("-u", "shared", "-f", "slow", "second")

    assert gearman.finish(first) == (0, b"done:first", b"")
    assert gearman.finish(second) == (0, b"done:first", b"")
    assert log_lines(log) == ["first"]


def test_three_workers_serve_thirty_concurrent_clients(gearman, tmp_path):
    log = tmp_path / "log"
    for name in ("w1", "w2", "w3"):
        command = f"echo {name} >> {shlex.quote(str(log))}; sleep 0.1; tr a-z A-Z"
        gearman.worker("upper", "sh", "-c", command)

    clients = {n: gearman.spawn("-f", "upper", f"payload number {n}") for n in range(30)}
    results = {n: gearman.finish(proc) for n, proc in clients.items()}

    assert results == {n: (0, f"PAYLOAD NUMBER {n}".encode(), b"") for n in range(30)}
    ran_on = log_lines(log)
    assert len(ran_on) == 30
    assert set(ran_on) == {"w1", "w2", "w3"}  # every worker took a share
    wait_until(lambda: status(gearman.server.address) == {"upper": (0, 0, 3)}, what="drained")
