"""Failed background jobs (issue 13) on a real `jobserver`: retried with backoff, then kept in
the dead set, across restarts of the sqlite and PostgreSQL stores; the admin commands that
re-run and purge them; raw-packet workers and Debian's `gearman` worker alike.

Delays are checked against loose bounds: a retry waits base * 2^(n-1) * U(1, 1.5), never less
(bar a little for the test's and the server's clocks), and at most RETRY_LATENESS more than
the longest such wait. Every other wait has a generous deadline.
Before a SIGKILL, a background "barrier" job is submitted: its JOB_CREATED goes out only once
its record is committed, and with it everything journalled before (test_store_restart.py).
"""

from __future__ import annotations

import re
import time
from typing import NamedTuple

import pytest
import servers
from servers import GearmanCLI, wait_until
from wire import Wire

from jobserver.protocol import PacketType as T
from jobserver.protocol import encode_request
from jobserver.sdk.retry import RETRY_AFTER_MARKER

DEADLINE = 15.0
"""Seconds any awaited event (a retry, a dead job, a log line) may take on a loaded machine."""

RETRY_LATENESS = 3.0
"""Seconds a retry may come after its longest possible delay: loose, for a loaded machine, yet
less than the default --bg-retry-delay of 5 s, so a retry that ignored the server's option
for its default would still fail the bound."""

MEMORY = ("--store", "memory")

WHEN = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
"""A `show dead jobs` last-failure field: UTC, ISO 8601."""


class Assignment(NamedTuple):
    handle: bytes
    function: bytes
    unique: bytes
    payload: bytes
    at: float  # time.monotonic() when it arrived


DEAD_TTL_TEST = 1.0
"""Seconds (the least --dead-ttl accepts): the dead jobs of the bounds test outlive it."""


def next_job(worker: Wire, timeout: float = DEADLINE) -> Assignment:
    """Grab a job, sleeping (PRE_SLEEP) until the server wakes this worker with NOOP."""
    deadline = time.monotonic() + timeout
    while True:
        worker.send(T.GRAB_JOB_UNIQ)
        packet = worker.read_packet()
        while packet.type == T.NOOP:  # a wake-up left over from an earlier sleep
            packet = worker.read_packet()
        if packet.type == T.JOB_ASSIGN_UNIQ:
            return Assignment(*packet.args, at=time.monotonic())
        assert packet.type == T.NO_JOB, f"expected JOB_ASSIGN_UNIQ or NO_JOB, got {packet!r}"
        worker.send(T.PRE_SLEEP)
        worker.expect(T.NOOP, timeout=max(0.01, deadline - time.monotonic()))


@pytest.fixture
def workers(start_jobserver):
    """`workers(server, *functions)`: a raw worker with those abilities. Every one is closed
    at teardown before the servers stop (hence the dependency): a server stopping waits up to
    2 s for each open peer's FIN."""
    opened: list[Wire] = []

    def worker_for(server: servers.Server, *functions: bytes) -> Wire:
        worker = Wire.to(server)
        opened.append(worker)
        worker.can_do(*functions)
        return worker

    yield worker_for
    for worker in opened:
        worker.close()


def submit_bg(server: servers.Server, function: bytes, unique: bytes, payload: bytes) -> bytes:
    with Wire.to(server) as client:
        return client.submit(function, payload, unique, T.SUBMIT_JOB_BG)


def admin(server: servers.Server, line: str) -> bytes:
    """One admin command's reply. Only `show dead jobs` answers a list here: `show job` is one
    line (which the helpers in wire.py and servers.py would each read as the other)."""
    with Wire.to(server) as connection:
        connection.send_line(line)
        return connection.read_admin_reply(is_list=line.startswith("show dead jobs"))


def dead_jobs(server: servers.Server, function: str = "") -> list[list[bytes]]:
    """`show dead jobs [<function>]`, one list of fields per dead job."""
    reply = admin(server, f"show dead jobs {function}".strip())
    assert reply.endswith(b".\n"), reply
    return [line.split(b"\t") for line in reply.splitlines()[:-1]]


def dead_handles(server: servers.Server) -> list[bytes]:
    return [fields[0] for fields in dead_jobs(server)]


def wait_for_dead(server: servers.Server, count: int) -> list[list[bytes]]:
    def listed() -> list[list[bytes]] | None:
        listing = dead_jobs(server)
        return listing if len(listing) == count else None

    return wait_until(listed, timeout=DEADLINE, what=f"{count} dead job(s)")


def log_lines_naming(server: servers.Server, text: str) -> list[str]:
    return [line for line in server.stderr_text().splitlines() if text in line]


def barrier(server: servers.Server) -> None:
    """Return once everything the server journalled so far is committed to its store."""
    submit_bg(server, b"barrier", b"barrier-%d" % time.monotonic_ns(), b"")


def crash_and_restart(start_jobserver, server: servers.Server, *args: str, **options):
    """SIGKILL `server` (by its PID) once its journal is committed; start it again on the same
    port with `args` and `options` (its data_dir, for sqlite)."""
    barrier(server)
    server.proc.kill()
    server.proc.wait(servers.STOP_TIMEOUT)
    server.stop()  # closes its log
    return start_jobserver(*args, port=server.port, **options)


def restart(start_jobserver, server: servers.Server, *args: str, **options):
    """SIGTERM `server`, then start it again on the same port."""
    assert server.stop() == 0, server.stderr_text()
    return start_jobserver(*args, port=server.port, **options)


# --- retried with backoff ---------------------------------------------------------------------


def test_a_worker_asking_for_a_retry_after_a_delay_gets_it_and_it_counts_an_attempt(
    start_jobserver, workers
):
    """The worker SDK's Retry(delay=...) (jobserver/sdk/retry.py): WORK_EXCEPTION data that
    starts with the retry-after marker. The next attempt comes after that delay, not the
    policy's (30 s here), and the marker is not part of the error kept in the dead set."""
    server = start_jobserver("--bg-retries", "1", "--bg-retry-delay", "30")
    handle = submit_bg(server, b"polite", b"polite-1", b"payload")
    worker = workers(server, b"polite")
    assert next_job(worker).handle == handle
    asked_at = time.monotonic()
    worker.send(T.WORK_EXCEPTION, handle, RETRY_AFTER_MARKER + b"0.2\nRetry: rate limited")
    again = next_job(worker)
    assert again.handle == handle and again.at - asked_at >= 0.15
    worker.send(T.WORK_EXCEPTION, handle, RETRY_AFTER_MARKER + b"0.2\nRetry: rate limited")
    (dead,) = wait_for_dead(server, 1)
    assert dead[0] == handle and dead[3] == b"2" and dead[5] == b"Retry: rate limited"


@pytest.mark.parametrize("store", [(), MEMORY], ids=["sqlite", "memory"])
def test_a_job_failing_twice_then_succeeding_completes_after_growing_delays(
    start_jobserver, workers, store
):
    server = start_jobserver("--bg-retries", "2", "--bg-retry-delay", "0.3", *store)
    handle = submit_bg(server, b"flaky", b"flaky-1", b"payload")
    worker = workers(server, b"flaky")

    first = next_job(worker)
    assert first[:4] == (handle, b"flaky", b"flaky-1", b"payload")
    # The failure, then GET_STATUS and `show job`, in one chunk: handled in one turn, so the
    # job is seen waiting for its retry however slow the machine.
    failed_at, failed_at_wall = time.monotonic(), time.time()
    worker.send_raw(
        encode_request(T.WORK_FAIL, handle)
        + encode_request(T.GET_STATUS, handle)
        + b"show job %s\n" % handle
    )
    assert worker.expect(T.STATUS_RES) == (handle, b"1", b"0", b"0", b"0")  # known, waiting
    state, attempts, retries, due = worker.read_admin_reply(is_list=False).split()[1:]
    assert (state, attempts, retries) == (b"retrying", b"1", b"2")
    assert int(due) >= int(failed_at_wall)
    # Still the same job for a submitter: the same unique coalesces onto it.
    assert submit_bg(server, b"flaky", b"flaky-1", b"payload") == handle

    second = next_job(worker)
    assert second[:4] == first[:4]  # the same job: same handle, unique and payload
    # base delay 0.3 s (times 1 to 1.5)
    assert 0.25 <= second.at - failed_at <= 0.3 * 1.5 + RETRY_LATENESS
    failed_again_at = time.monotonic()
    worker.send(T.WORK_FAIL, handle)

    third = next_job(worker)
    assert third[:4] == first[:4]
    # then twice the base: 0.6 s (times 1 to 1.5)
    assert 0.5 <= third.at - failed_again_at <= 0.6 * 1.5 + RETRY_LATENESS
    worker.send(T.WORK_COMPLETE, handle, b"done at last")
    worker.echo()

    assert dead_jobs(server) == []
    assert admin(server, f"show job {handle.decode()}") == b"OK unknown 0 0 0\n"
    assert servers.status(server.address).get("flaky", (0, 0, 1))[:2] == (0, 0)


def retry_survives_a_crash(start_jobserver, workers, *store: str, **options) -> None:
    """A job fails once, is killed (-9) with the server while it waits for its one retry, and
    fails again on the restarted server: it is dead with two attempts, not retried afresh.
    `store` and `options` (data_dir) name the store both servers share."""
    args = ("--bg-retries", "1", "--bg-retry-delay", "0.3", *store)
    server = start_jobserver(*args, **options)
    handle = submit_bg(server, b"flaky", b"flaky-1", b"payload")
    worker = workers(server, b"flaky")
    assert next_job(worker).handle == handle
    worker.send(T.WORK_EXCEPTION, handle, b"first")
    worker.echo()

    server = crash_and_restart(start_jobserver, server, *args, **options)

    worker = workers(server, b"flaky")
    again = next_job(worker)
    assert again[1:4] == (b"flaky", b"flaky-1", b"payload")
    worker.send(T.WORK_EXCEPTION, again.handle, b"second")
    worker.echo()
    [listed] = wait_for_dead(server, 1)  # its one retry was used before the crash
    assert listed[1:4] == [b"flaky", b"flaky-1", b"2"]
    assert listed[5:] == [b"second"]


def test_a_job_waiting_for_its_retry_survives_a_crash_with_its_attempts_counted(
    start_jobserver, workers, tmp_path
):
    retry_survives_a_crash(start_jobserver, workers, data_dir=tmp_path / "data")


def test_a_job_waiting_for_its_retry_survives_a_crash_with_the_postgresql_store(
    start_jobserver, workers, pg_database
):
    retry_survives_a_crash(
        start_jobserver, workers, "--store", pg_database, "--node-id", "a", "--lease", "2"
    )


# --- the dead set -----------------------------------------------------------------------------


def test_an_always_failing_job_is_dead_with_its_error_kept_across_a_crash_and_runs_again(
    start_jobserver, workers, tmp_path
):
    args = ("--bg-retries", "2", "--bg-retry-delay", "0.1")
    data_dir = tmp_path / "data"
    server = start_jobserver(*args, data_dir=data_dir)
    handle = submit_bg(server, b"parse", b"parse-1", b"input 1")
    worker = workers(server, b"parse")
    for _attempt in range(3):
        job = next_job(worker)
        assert job[:4] == (handle, b"parse", b"parse-1", b"input 1")
        worker.send(T.WORK_EXCEPTION, handle, b"ValueError: bad input\nline 2")
    worker.echo()  # the last failure is handled before the worker goes
    worker.close()

    [listed] = wait_for_dead(server, 1)
    assert listed[:4] == [handle, b"parse", b"parse-1", b"3"]
    assert WHEN.match(listed[4]), listed
    assert listed[5:] == [b"ValueError: bad input\\x0aline 2"]  # one field on one line
    [logged] = wait_until(
        lambda: log_lines_naming(server, handle.decode()), timeout=DEADLINE, what="a log line"
    )
    assert "(parse) failed 3 time(s)" in logged and "dead set" in logged
    assert admin(server, f"show job {handle.decode()}") == b"OK dead 3 2 0\n"

    server = crash_and_restart(start_jobserver, server, *args, data_dir=data_dir)

    assert dead_jobs(server) == [listed]
    assert admin(server, f"retry dead job {handle.decode()}") == b"OK 1\n"
    worker = workers(server, b"parse")
    again = next_job(worker)
    assert again[1:4] == (b"parse", b"parse-1", b"input 1")
    worker.send(T.WORK_COMPLETE, again.handle, b"parsed")
    worker.echo()
    assert dead_jobs(server) == []
    assert admin(server, f"retry dead job {handle.decode()}").startswith(b"ERR UNKNOWN_JOB")


def test_a_dead_jobs_log_line_holds_its_whole_error_on_that_one_line(start_jobserver, workers):
    # The error text comes from the worker: written raw, its newline would start a line
    # that looks like a log record of its own (the admin listing escapes it for that reason).
    server = start_jobserver(*MEMORY)
    handle = submit_bg(server, b"parse", b"parse-1", b"input 1")
    worker = workers(server, b"parse")
    next_job(worker)
    worker.send(T.WORK_EXCEPTION, handle, b"ValueError: bad input\nline 2")
    worker.echo()

    [logged] = wait_until(
        lambda: log_lines_naming(server, handle.decode()), timeout=DEADLINE, what="a log line"
    )
    assert "bad input" in logged and "line 2" in logged, server.stderr_text()


def test_a_worker_lost_twice_counts_two_attempts_when_its_function_has_retries(
    start_jobserver, workers
):
    server = start_jobserver()
    assert admin(server, "retries lost 1 0.2") == b"OK\r\n"
    handle = submit_bg(server, b"lost", b"lost-1", b"payload")
    holder = workers(server, b"lost")
    assert next_job(holder).handle == handle
    waiting = workers(server, b"lost")

    lost_at = time.monotonic()
    holder.close()  # mid-job
    again = next_job(waiting)
    assert again[:4] == (handle, b"lost", b"lost-1", b"payload")
    assert again.at - lost_at >= 0.15  # base delay 0.2 s: a lost worker counts an attempt
    waiting.close()

    [listed] = wait_for_dead(server, 1)
    assert listed[:4] == [handle, b"lost", b"lost-1", b"2"]
    assert listed[5:] == [b"worker lost"]
    assert admin(server, f"show job {handle.decode()}") == b"OK dead 2 1 0\n"


def test_without_retries_a_lost_workers_job_is_queued_again_until_job_retries_then_dead(
    start_jobserver, workers
):
    server = start_jobserver("--job-retries", "2", *MEMORY)
    handle = submit_bg(server, b"lost", b"lost-1", b"payload")
    for _loss in range(2):
        holder = workers(server, b"lost")
        assert next_job(holder).handle == handle  # queued again at once, as gearmand does
        holder.close()

    [listed] = wait_for_dead(server, 1)
    assert listed[:4] == [handle, b"lost", b"lost-1", b"2"]
    assert listed[5:] == [b"worker lost"]


@pytest.mark.usefixtures("gearman_tools")
def test_a_gearman_cli_worker_whose_command_fails_sends_the_job_to_the_dead_set(
    start_jobserver,
):
    server = start_jobserver("--bg-retries", "1", "--bg-retry-delay", "0.2", *MEMORY)
    with GearmanCLI(server, timeout=DEADLINE) as gearman:
        # `false` exits 1, so the gearman worker answers WORK_FAIL. libgearman 1.1.20 counts a
        # failed job twice against -c (gearman_worker_work then reports GEARMAN_UNKNOWN_STATE;
        # the same on gearmand): -c 4 is two failed attempts, then the worker exits.
        worker = gearman.worker("boom", "false", options=("-c", "4"))
        submitted = gearman.run("-b", "-f", "boom", "payload")
        assert (submitted.returncode, submitted.stderr) == (0, b"")

        [listed] = wait_for_dead(server, 1)
        assert listed[1] == b"boom"
        assert (listed[3], listed[5:]) == (b"2", [b"failed"])
        assert worker.wait(DEADLINE) == 0  # both attempts ran on it


def test_the_dead_set_keeps_the_newest_dead_max_jobs_and_logs_the_dropped(
    start_jobserver, workers, tmp_path
):
    args = ("--dead-max", "3")
    data_dir = tmp_path / "data"
    server = start_jobserver(*args, data_dir=data_dir)
    handles = [submit_bg(server, b"doomed", b"doomed-%d" % n, b"") for n in range(5)]
    worker = workers(server, b"doomed")
    for handle in handles:
        assert next_job(worker).handle == handle
        worker.send(T.WORK_FAIL, handle)
    worker.echo()

    assert dead_handles(server) == handles[2:]
    # Dropped for room as they die, so logged at once (the 60 s sweep is for --dead-ttl).
    wait_until(
        lambda: log_lines_naming(server, "dead set: dropped the"),
        timeout=10.0,
        what="the log line about dropped dead jobs",
    )
    assert log_lines_naming(server, "3 kept")
    worker.close()

    server = restart(start_jobserver, server, *args, data_dir=data_dir)
    assert dead_handles(server) == handles[2:]  # the dropped are gone from the store too

    # Past --dead-ttl while the server was down: dropped (and logged) as it starts again.
    time.sleep(DEAD_TTL_TEST + 0.1)
    server = restart(start_jobserver, server, "--dead-ttl", str(DEAD_TTL_TEST), data_dir=data_dir)
    assert dead_handles(server) == []
    assert log_lines_naming(server, "0 kept")


# --- operators --------------------------------------------------------------------------------


def test_retry_dead_jobs_of_a_function_and_purge_all_answer_their_counts(start_jobserver, workers):
    server = start_jobserver(*MEMORY)
    jobs = [(b"alpha", b"alpha-0"), (b"beta", b"beta-0"), (b"alpha", b"alpha-1")]
    handles = [submit_bg(server, function, unique, unique) for function, unique in jobs]
    worker = workers(server, b"alpha", b"beta")
    for handle in handles:
        assert next_job(worker).handle == handle
        worker.send(T.WORK_FAIL, handle)
    worker.echo()
    assert dead_handles(server) == handles
    assert [fields[0] for fields in dead_jobs(server, "alpha")] == [handles[0], handles[2]]

    assert admin(server, "retry dead jobs alpha") == b"OK 2\n"
    assert dead_handles(server) == [handles[1]]
    rerun = [next_job(worker), next_job(worker)]
    assert sorted(job[1:4] for job in rerun) == [
        (b"alpha", b"alpha-0", b"alpha-0"),
        (b"alpha", b"alpha-1", b"alpha-1"),
    ]
    for job in rerun:
        worker.send(T.WORK_COMPLETE, job.handle, b"")
    worker.echo()
    assert admin(server, "retry dead jobs alpha") == b"OK 0\n"

    assert admin(server, "purge dead jobs all") == b"OK 1\n"
    assert dead_jobs(server) == []
    assert admin(server, "purge dead jobs all") == b"OK 0\n"
    assert admin(server, "retry dead jobs all") == b"OK 0\n"


def test_a_functions_retry_policy_survives_a_restart(start_jobserver, tmp_path):
    data_dir = tmp_path / "data"
    server = start_jobserver(data_dir=data_dir)
    assert admin(server, "retries fn 4 1.5") == b"OK\r\n"
    assert admin(server, "retries reset 2 1") == b"OK\r\n"
    assert admin(server, "retries reset default") == b"OK\r\n"
    assert admin(server, "retries fn") == b"OK 4 1.5\n"

    server = restart(start_jobserver, server, data_dir=data_dir)

    assert admin(server, "retries fn") == b"OK 4 1.5\n"
    assert admin(server, "retries reset") == b"OK 0 5\n"  # the server's default again


# --- PostgreSQL -------------------------------------------------------------------------------


def test_a_dead_job_and_a_policy_survive_a_crash_with_the_postgresql_store(
    start_jobserver, workers, pg_database
):
    args = ("--store", pg_database, "--node-id", "a", "--lease", "2")
    server = start_jobserver(*args)
    assert admin(server, "retries pgfn 1 0.1") == b"OK\r\n"
    handle = submit_bg(server, b"pgfn", b"pg-1", b"payload")
    worker = workers(server, b"pgfn")
    for _attempt in range(2):
        assert next_job(worker).handle == handle
        worker.send(T.WORK_EXCEPTION, handle, b"RuntimeError: no")
    worker.echo()
    worker.close()
    [listed] = wait_for_dead(server, 1)
    assert listed[:4] == [handle, b"pgfn", b"pg-1", b"2"]
    assert listed[5:] == [b"RuntimeError: no"]

    server = crash_and_restart(start_jobserver, server, *args)

    assert dead_jobs(server) == [listed]
    assert admin(server, "retries pgfn") == b"OK 1 0.1\n"
    assert admin(server, f"retry dead job {handle.decode()}") == b"OK 1\n"
    worker = workers(server, b"pgfn")
    again = next_job(worker)
    assert again[1:4] == (b"pgfn", b"pg-1", b"payload")
    worker.send(T.WORK_COMPLETE, again.handle, b"")
    worker.echo()
    assert dead_jobs(server) == []
