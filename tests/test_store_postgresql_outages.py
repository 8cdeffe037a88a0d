"""A shared PostgreSQL store that fails (issue 12): bad settings at start, the database down,
restarted, our session terminated, the network to it cut. Background submits are refused
while nothing can be stored (ERROR QUEUE_ERROR, never JOB_CREATED), foreground jobs go on,
the server reconnects by itself, and nothing acknowledged is lost or stolen.

These tests stop and restart the session's PostgreSQL cluster; the pg_database fixture starts
it again for the next test if one leaves it down.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from cluster_jobs import (
    Worker,
    node_rows,
    owners,
    ran_all,
    submit_background,
    try_submit_background,
    wait_for,
)
from pg_cluster import PASSWORD
from servers import REPO_ROOT, free_port, start_jobserver
from tcp_proxy import TcpProxy
from wire import Wire

from jobserver.protocol import PacketType as T

LEASE = 2
"""Seconds: short, so that outages longer than a lease happen within a test."""

RECOVERY_DEADLINE = 20
"""Seconds the server may take to store jobs again once the database is back: reconnects are
at most 2 s apart, and a statement to a vanished database is cut after 5 s."""

OUTAGE_SECONDS = 3
"""How long the removes test keeps the database down: several retry intervals (0.5 s)."""

STARTUP_DEADLINE = 30
"""Seconds for a server to give up starting on a database it cannot use (connect timeout 5 s)."""


def start(uri: str, node: str, *extra: str):
    return start_jobserver("--store", uri, "--node-id", node, "--lease", str(LEASE), *extra)


@pytest.fixture
def servers_on(pg_database):
    started = []

    def factory(node: str, *extra: str, uri: str | None = None):
        server = start(uri or pg_database, node, *extra)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
        server.remove_workdir()


# ------------------------------------------------------------------ startup


def run_server_expecting_failure(store: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jobserver",
            str(free_port()),
            "--listen",
            "127.0.0.1",
            "--store",
            store,
        ],
        capture_output=True,
        text=True,
        timeout=STARTUP_DEADLINE,
        cwd=REPO_ROOT,
    )


def test_wrong_password_is_one_line_naming_the_database_without_the_password(pg_cluster):
    secret = "not-the-password-42"
    uri = pg_cluster.uri(password=secret)
    result = run_server_expecting_failure(uri)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/postgres" in lines[0]
    assert "password authentication failed" in lines[0]
    assert secret not in result.stderr + result.stdout
    assert PASSWORD not in result.stderr


def test_an_unreachable_database_is_one_line(pg_cluster):
    port = free_port()  # nothing listens there
    result = run_server_expecting_failure(f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/x")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot connect to database postgresql://postgres@127.0.0.1:{port}/x" in lines[0]
    assert "refused" in lines[0].lower()
    assert PASSWORD not in result.stderr


def test_a_malformed_uri_is_one_line():
    result = run_server_expecting_failure("postgresql://host:notaport/db?sslmode=bogus")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "database postgresql://" in lines[0]


def test_an_unknown_store_names_the_choices():
    result = run_server_expecting_failure("mysql://x")
    assert result.returncode != 0
    assert "postgresql://" in result.stderr and "sqlite" in result.stderr


# ------------------------------------------------------------------ outages


def test_database_down_refuses_background_submits_and_foreground_jobs_go_on(
    servers_on, pg_cluster, pg_database
):
    a = servers_on("a")
    submit_background(a, b"f", [b"before"])
    pg_cluster.stop()
    try:
        outcome, text = try_submit_background(a, b"f", b"during")
        assert outcome == "error" and text.startswith(b"QUEUE_ERROR"), (outcome, text)
        # Foreground jobs do not need the database.
        with Wire.to(a) as client, Wire.to(a) as worker:
            worker.can_do(b"fg")
            client.send(T.SUBMIT_JOB, b"fg", b"", b"hello")
            (handle,) = client.expect(T.JOB_CREATED)
            worker.send(T.GRAB_JOB)
            assigned = worker.expect(T.JOB_ASSIGN)
            assert assigned[0] == handle and assigned[2] == b"hello"
            worker.send(T.WORK_COMPLETE, handle, b"HELLO")
            client.expect(T.WORK_COMPLETE, handle, b"HELLO")
    finally:
        pg_cluster.start_again()
    # It reconnects by itself, and the job acknowledged before the outage is still there.
    wait_for(
        lambda: try_submit_background(a, b"f", b"after")[0] == "created",
        RECOVERY_DEADLINE,
        "a background submit to succeed again",
    )
    with Worker([a], b"f") as worker:
        worker.run_until(ran_all([b"before", b"after"]), timeout=30)
    assert b"during" not in worker.runs


def test_database_restart_under_load_loses_nothing_acknowledged(servers_on, pg_cluster):
    a = servers_on("a")
    acknowledged: list[bytes] = []
    refused: list[bytes] = []
    stop = threading.Event()

    def submit_forever() -> None:
        for n in range(100_000):  # bounded; stops far earlier
            if stop.is_set():
                return
            payload = f"load-{n}".encode()
            outcome, _text = try_submit_background(a, b"f", payload)
            (acknowledged if outcome == "created" else refused).append(payload)

    submitter = threading.Thread(target=submit_forever)
    submitter.start()
    try:
        wait_for(lambda: len(acknowledged) >= 50, 30, "submits before the restart")
        pg_cluster.restart()
        count = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= count + 50, RECOVERY_DEADLINE, "submits after it")
    finally:
        stop.set()
        submitter.join(timeout=30)
    with Worker([a], b"f") as worker:
        worker.run_until(ran_all(acknowledged), timeout=60)
    print(f"{len(acknowledged)} acknowledged, {len(refused)} refused during the restart")


def test_a_terminated_session_is_replaced(servers_on, pg_cluster, pg_database):
    a = servers_on("a")
    submit_background(a, b"f", [b"first"])
    database = pg_database.rsplit("/", 1)[1]
    assert pg_cluster.terminate_backends(database) >= 1
    wait_for(
        lambda: try_submit_background(a, b"f", b"second")[0] == "created",
        RECOVERY_DEADLINE,
        "a background submit to succeed after pg_terminate_backend",
    )
    with Worker([a], b"f") as worker:
        worker.run_until(ran_all([b"first", b"second"]), timeout=30)


def test_an_outage_for_everyone_steals_no_lease(servers_on, pg_cluster, pg_database):
    """The database gone for longer than a lease: every lease has expired by its clock when it
    comes back, but nobody could have renewed. Each server rejoins its own jobs; none takes
    another's over."""
    a, b = servers_on("a"), servers_on("b")
    jobs = [f"job-{n}".encode() for n in range(30)]
    submit_background(a, b"f", jobs)
    pg_cluster.stop()
    time.sleep(LEASE * 2 + 1)
    pg_cluster.start_again()
    wait_for(
        lambda: try_submit_background(b, b"g", b"probe")[0] == "created",
        RECOVERY_DEADLINE,
        "b to store jobs again",
    )
    time.sleep(LEASE + 3)  # past any takeover a peer might wrongly attempt
    nodes = node_rows(pg_database)
    assert nodes["a"][2] is None and nodes["b"][2] is None, nodes
    assert owners(pg_database) == {"a": 30, "b": 1}
    with Worker([a, b], b"f") as worker:
        worker.run_until(ran_all(jobs), timeout=30)
        worker.expect_no_job(0.5)
    assert max(worker.runs.values()) == 1


def test_a_server_cut_off_from_the_database_holds_its_jobs_and_a_peer_runs_them(
    servers_on, pg_cluster, pg_database
):
    """The network between server a and the database is cut (a proxy frozen in between): a
    stops handing out its durable jobs within half a lease, refuses background submits, and
    b takes the jobs over. When the network is back a rejoins under a new term; every job ran
    once, on b."""
    with TcpProxy.start(pg_cluster.port) as proxy:
        a = servers_on("a", uri=pg_cluster.uri(pg_database.rsplit("/", 1)[1], port=proxy.port))
        b = servers_on("b")
        jobs = [f"job-{n}".encode() for n in range(50)]
        submit_background(a, b"f", jobs)
        term = node_rows(pg_database)["a"][0]
        with Worker([a], b"f") as on_a:
            proxy.freeze()
            try:
                time.sleep(LEASE)  # past the half lease a trusts its last renewal
                on_a.expect_no_job(0.5)
                outcome, text = try_submit_background(a, b"f", b"cut off")
                assert outcome == "error" and text.startswith(b"QUEUE_ERROR"), (outcome, text)
                wait_for(lambda: owners(pg_database).get("b") == 50, 30, "b to take a's jobs")
                on_a.expect_no_job(0.5)
            finally:
                proxy.thaw()
            wait_for(
                lambda: node_rows(pg_database)["a"][0] > term + 1, RECOVERY_DEADLINE, "a to rejoin"
            )
            on_a.expect_no_job(0.5)
        with Worker([b], b"f") as on_b:
            on_b.run_until(ran_all(jobs), timeout=30)
        assert max(on_b.runs.values()) == 1
        assert b"cut off" not in on_b.runs


def test_removes_refused_in_an_outage_are_retried_calmly_then_written(
    servers_on, pg_cluster, pg_database
):
    """Jobs finished while the database is down: their removes wait and are retried a few
    times a second (not in a loop as fast as the store can refuse), then written once it is
    back, so the finished jobs never run again."""
    a = servers_on("a")
    jobs = [f"job-{n}".encode() for n in range(300)]
    submit_background(a, b"f", jobs)
    with Wire.to(a) as worker:
        worker.can_do(b"f")
        handles = []
        for _ in jobs:
            worker.send(T.GRAB_JOB)
            handles.append(worker.expect(T.JOB_ASSIGN)[0])
        pg_cluster.stop()
        try:
            for handle in handles:
                worker.send(T.WORK_COMPLETE, handle, b"done")
            worker.echo()
            time.sleep(OUTAGE_SECONDS)
        finally:
            pg_cluster.start_again()
    wait_for(lambda: not owners(pg_database), RECOVERY_DEADLINE, "the removes to be written")
    refusals = a.stderr_text().count("removes kept for later")
    assert 1 <= refusals <= OUTAGE_SECONDS * 2 / 0.5 + 5, f"{refusals} refused batches"
