"""Servers sharing one PostgreSQL store (issue 12): jobs live in the database, a dead server's
jobs are taken over by a live one, and a frozen server cannot hand out jobs it lost.

Real servers, a real PostgreSQL (the session's private cluster), raw-protocol workers. Leases
are short (LEASE seconds) so that takeovers happen within a test; every wait has a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import psycopg
import pytest
from cluster_jobs import (
    Worker,
    node_rows,
    owners,
    ran_all,
    submit_background,
    wait_for,
)
from servers import start_jobserver, status
from wire import Wire

from jobserver.protocol import PacketType as T
from jobserver.store.pg_schema import SCHEMA_VERSION

LEASE = 2
"""Seconds; the minimum is 1. A peer checks every lease/4 s, and takes over only once it has
been connected for a lease plus 2 s (every peer's longest reconnect backoff)."""

TAKEOVER_DEADLINE = LEASE * 2 + 15
"""Seconds a takeover may take before the test fails: the design says lease plus about a
second (bench/ measures it); the slack is for a loaded CI machine, not a target."""


def cluster_server(uri: str, node: str, *extra: str, port: int | None = None):
    return start_jobserver(
        "--store", uri, "--node-id", node, "--lease", str(LEASE), *extra, port=port
    )


@pytest.fixture
def started(pg_database):
    """`started(node)` starts a server on the test's database; all stopped at teardown."""
    servers = []

    def start(node: str, *extra: str, port: int | None = None):
        server = cluster_server(pg_database, node, *extra, port=port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            os.kill(server.pid, signal.SIGCONT)  # a test that failed while it was frozen
        server.stop()
        server.remove_workdir()


def payloads(count: int, tag: str = "job") -> list[bytes]:
    return [f"{tag}-{n}".encode() for n in range(count)]


def test_jobs_are_rows_of_their_server_and_come_back_after_a_restart(started, pg_database):
    a = started("a")
    jobs = payloads(50)
    submit_background(a, b"f", jobs)
    assert owners(pg_database) == {"a": 50}
    with psycopg.connect(pg_database) as db:
        assert db.execute("SELECT max(version) FROM jobserver_schema").fetchone() == (
            SCHEMA_VERSION,
        )
    port = a.port
    a.stop()
    a = started("a", port=port)
    assert status(a.address)["f"][0] == 50
    with Worker([a], b"f") as worker:
        worker.run_until(ran_all(jobs), timeout=30)
        assert set(worker.runs.values()) == {1}
    wait_for(lambda: not owners(pg_database), 10, "the finished jobs' rows to be deleted")


def test_a_killed_server_loses_no_acknowledged_job(started, pg_database):
    """Three servers; SIGKILL the one holding the jobs and delete its files: every job it
    acknowledged runs through the other two, once each (no worker held any)."""
    a, b, c = started("a"), started("b"), started("c")
    jobs = payloads(300)
    acknowledged = submit_background(a, b"f", jobs[:200])
    acknowledged |= submit_background(a, b"g", jobs[200:])
    assert len(acknowledged) == 300
    assert owners(pg_database) == {"a": 300}
    a.proc.kill()
    a.proc.wait(timeout=10)
    shutil.rmtree(a.workdir, ignore_errors=True)

    with Worker([b, c], b"f", b"g") as worker:
        took = worker.run_until(ran_all(jobs), timeout=TAKEOVER_DEADLINE)
        worker.expect_no_job(0.5)
    assert sorted(worker.runs) == sorted(jobs), "lost jobs"
    assert max(worker.runs.values()) == 1, f"ran twice: {worker.runs.most_common(3)}"
    print(f"all 300 jobs ran {took:.1f} s after the kill (lease {LEASE} s)")
    nodes = node_rows(pg_database)
    assert nodes["a"][2] in ("b", "c"), nodes
    wait_for(lambda: not owners(pg_database), 10, "the finished jobs' rows to be deleted")


def test_coalescing_goes_on_for_taken_over_jobs(started, pg_database):
    a, b = started("a"), started("b")
    submit_background(a, b"f", [b"one"], unique_prefix=b"same-")
    a.proc.kill()
    a.proc.wait(timeout=10)
    wait_for(lambda: owners(pg_database).get("b"), TAKEOVER_DEADLINE, "b to take a's job over")
    wait_for(lambda: status(b.address).get("f", (0,))[0] == 1, 5, "the job queued on b")
    # The same unique on the new owner coalesces onto the taken-over job: no second job.
    with Wire.to(b) as client:
        client.send(T.SUBMIT_JOB_BG, b"f", b"same-one", b"one")
        client.expect(T.JOB_CREATED)
    assert status(b.address)["f"][0] == 1
    assert owners(pg_database) == {"b": 1}
    with Worker([b], b"f") as worker:
        worker.run_until(ran_all([b"one"]), timeout=10)
        worker.expect_no_job(0.5)
    assert worker.runs == {b"one": 1}


def test_a_frozen_server_hands_out_none_of_the_jobs_taken_from_it(started, pg_database):
    """SIGSTOP past the lease: a peer takes the jobs over. SIGCONT: the woken server gives
    none of them to a worker, not even one that was waiting on it all along, and rejoins
    under a new term to serve new jobs."""
    a, b = started("a"), started("b")
    jobs = payloads(100)
    submit_background(a, b"f", jobs)
    term_before = node_rows(pg_database)["a"][0]
    waiting = Wire.to(a)  # a worker asleep on a before the freeze
    waiting.can_do(b"f2")
    waiting.send(T.PRE_SLEEP)
    os.kill(a.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: owners(pg_database) == {"b": 100}, TAKEOVER_DEADLINE, "takeover by b")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    with Worker([a], b"f") as on_a:
        on_a.expect_no_job(1.0)
    assert node_rows(pg_database)["a"][0] > term_before + 1, "a did not rejoin under a new term"
    with Worker([b], b"f") as on_b:
        on_b.run_until(ran_all(jobs), timeout=30)
    assert max(on_b.runs.values()) == 1
    # a serves new durable jobs normally under its new term.
    submit_background(a, b"f", [b"after"])
    assert owners(pg_database).get("a") == 1
    with Worker([a], b"f") as on_a:
        on_a.run_until(ran_all([b"after"]), timeout=10)
    assert on_a.runs == {b"after": 1}
    waiting.close()


def test_a_restarted_server_does_not_reload_jobs_now_owned_by_a_peer(started, pg_database):
    a, b = started("a"), started("b")
    jobs = payloads(40)
    submit_background(a, b"f", jobs)
    port = a.port
    a.proc.kill()
    a.proc.wait(timeout=10)
    wait_for(lambda: owners(pg_database) == {"b": 40}, TAKEOVER_DEADLINE, "takeover by b")
    a = started("a", port=port)
    assert "f" not in status(a.address) or status(a.address)["f"][0] == 0
    with Worker([a, b], b"f") as worker:
        worker.run_until(ran_all(jobs), timeout=30)
        worker.expect_no_job(0.5)
    assert max(worker.runs.values()) == 1
    assert set(port for ports in worker.ran_on.values() for port in ports) == {b.port}


def test_a_cleanly_stopped_server_hands_its_jobs_over_at_once(started, pg_database):
    """SIGTERM ends the lease at once: a peer takes the jobs at its next check, not a lease
    later, so stopping a server for maintenance strands nothing."""
    a, b = started("a"), started("b")
    jobs = payloads(20)
    submit_background(a, b"f", jobs)
    a.stop()
    assert node_rows(pg_database)["a"][1] is True  # lease expired at the stop
    with Worker([b], b"f") as worker:
        worker.run_until(ran_all(jobs), timeout=TAKEOVER_DEADLINE)
    assert max(worker.runs.values()) == 1


def test_a_second_server_with_the_same_node_id_supersedes_the_first(started, pg_database):
    """Two servers started as the same node (a misconfiguration, or a restart while the old
    process still runs): the newer one owns the node's jobs; the older one stores nothing
    more and hands none of them out, instead of the two fencing each other in turn."""
    old = started("a")
    jobs = payloads(20)
    submit_background(old, b"f", jobs)
    new = started("a")
    assert status(new.address)["f"][0] == 20  # loaded as the node's jobs
    with Wire.to(old) as client:
        client.send(T.SUBMIT_JOB_BG, b"f", b"", b"refused")
        text = client.expect_error(b"QUEUE_ERROR")
    assert b"node id a was joined by another server" in text
    assert "node ids must be unique" in old.stderr_text()
    with Worker([old], b"f") as on_old:
        on_old.expect_no_job(0.5)
    with Worker([new], b"f") as on_new:
        on_new.run_until(ran_all(jobs), timeout=30)
    assert max(on_new.runs.values()) == 1


def test_taken_over_jobs_keep_priority_order_and_epoch_time(started, pg_database):
    a, b = started("a"), started("b")
    run_at = int(time.time()) + 3600
    with Wire.to(a) as client:
        client.send(T.SUBMIT_JOB_LOW_BG, b"f", b"u-low", b"low")
        client.send(T.SUBMIT_JOB_BG, b"f", b"u-normal-1", b"normal-1")
        client.send(T.SUBMIT_JOB_EPOCH, b"f", b"u-later", str(run_at).encode(), b"later")
        client.send(T.SUBMIT_JOB_BG, b"f", b"u-normal-2", b"normal-2")
        client.send(T.SUBMIT_JOB_HIGH_BG, b"f", b"u-high", b"high")
        for _ in range(5):
            client.expect(T.JOB_CREATED)
    a.proc.kill()
    a.proc.wait(timeout=10)
    wait_for(lambda: owners(pg_database) == {"b": 5}, TAKEOVER_DEADLINE, "takeover by b")
    with psycopg.connect(pg_database) as db:
        rows = db.execute("SELECT payload, run_at FROM jobserver_jobs").fetchall()
    assert dict(rows)[b"later"] == run_at
    with Worker([b], b"f") as worker:
        wait_for(lambda: worker.grab_once(), 10, "the first job on b")
        for _ in range(3):
            assert worker.grab_once() == 1
        worker.expect_no_job(0.5)  # the epoch job waits for its time
    order = [payload for payload, _count in worker.runs.items()]
    assert order == [b"high", b"normal-1", b"normal-2", b"low"]
    assert status(b.address)["f"][0] == 1
