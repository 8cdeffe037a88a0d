"""What a restart of a real `jobserver` keeps and drops (issue 4, "Restart" and "Tests").

Every test runs real server processes on 127.0.0.1 with the sqlite store in tmp_path, stops
them by pid (SIGKILL for a crash, SIGTERM for a clean shutdown) and restarts them on the same
port and data directory.

To know that what the engine journalled is on disk before a SIGKILL, a test submits a
background "barrier" job and waits for its JOB_CREATED: that reply goes out only once the batch
holding the barrier's record is committed, and every removal journalled before it is in that
batch or an earlier one (journal batches apply in order).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import servers
from servers import admin
from test_store_support import Packets, ServerSet, drain, queued, status

from jobserver.protocol import PacketType as T
from jobserver.store.location import default_data_dir

_barriers = itertools.count(1)


@pytest.fixture
def server_set():
    started = ServerSet()
    yield started
    started.stop_all()


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def barrier(server) -> bytes:
    """Return once everything journalled so far is committed; the barrier job (function
    `barrier`) stays queued, and comes back after a restart like any other."""
    unique = b"barrier-%d" % next(_barriers)
    with Packets(server.port) as client:
        client.submit(T.SUBMIT_JOB_BG, b"barrier", unique, b"")
    return unique


def submit_bg(server, function: bytes, uniques, packet_type=T.SUBMIT_JOB_BG) -> list[bytes]:
    """Background submits, each acknowledged; returns the handles."""
    with Packets(server.port) as client:
        return [client.submit(packet_type, function, u, b"data of " + u) for u in uniques]


def ran_uniques(server, function: bytes) -> list[bytes]:
    return [args[2] for args in drain(server, function)]


def show_jobs(server) -> list[bytes]:
    lines = admin(server.address, "show jobs").split(b"\n")
    return [line.split(b"\t")[0] for line in lines if line and line != b"."]


# --- completed jobs do not come back ------------------------------------------------------


def test_jobs_finished_before_a_crash_do_not_run_again_and_the_others_do(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    uniques = [b"job-%d" % i for i in range(10)]
    submit_bg(server, b"work", uniques)

    # A worker ends the first four: completed, failed, exception, completed.
    with Packets(server.port) as worker:
        worker.send(T.CAN_DO, b"work")
        for ending in (T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION, T.WORK_COMPLETE):
            handle, _, unique, _ = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)
            assert unique in uniques[:4]
            if ending == T.WORK_FAIL:
                worker.send(ending, handle)
            else:
                worker.send(ending, handle, b"result")
        # The fifth is running (grabbed, never finished) when the server dies.
        _, _, running, _ = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)
        assert running == uniques[4]
        worker.echo()
        assert queued(server, "work") == 6
        time.sleep(0.5)
        barrier(server)
        server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    assert queued(restarted, "work") == 6
    # The running one comes back too, in submit order with the rest.
    assert ran_uniques(restarted, b"work") == uniques[4:]

    # Jobs run after the restart are deleted as well: a second crash brings back none.
    barrier(restarted)
    server_set.kill(restarted)
    again = server_set.restart(restarted, data_dir=data_dir)
    assert queued(again, "work") == 0
    assert ran_uniques(again, b"work") == []
    assert queued(again, "barrier") == 2


def test_a_finished_job_is_forgotten_on_disk_soon_without_any_later_request(server_set, data_dir):
    """Removes of finished jobs wait a moment for company (the server's REMOVES_MAX_DELAY,
    50 ms) instead of a sync each; on an idle server nothing else comes along, and they must
    still reach the disk. Here no barrier: the job is completed, the server left alone for a
    while, then killed."""
    server = server_set.start(data_dir=data_dir)
    submit_bg(server, b"once", [b"finished", b"queued"])
    with Packets(server.port) as worker:
        worker.send(T.CAN_DO, b"once")
        handle, _, unique, _ = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)
        assert unique == b"finished"
        worker.send(T.WORK_COMPLETE, handle, b"done")
        worker.echo()  # the completion was processed
    time.sleep(1.0)
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"once") == [b"queued"]


def test_sigterm_keeps_queued_jobs_and_drops_those_finished_just_before(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    uniques = [b"job-%d" % i for i in range(6)]
    submit_bg(server, b"work", uniques)
    with Packets(server.port) as worker:
        worker.send(T.CAN_DO, b"work")
        for _ in range(3):
            handle, _, _, _ = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)
            worker.send(T.WORK_COMPLETE, handle, b"ok")
        worker.echo()
    # No barrier, no wait: the final commit at shutdown must write the removals.
    assert server_set.terminate(server) == 0

    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"work") == uniques[3:]
    assert server_set.terminate(restarted) == 0
    again = server_set.restart(restarted, data_dir=data_dir)
    assert status(again).get("work", (0, 0, 0)) == (0, 0, 0)


# --- what a reloaded job keeps ------------------------------------------------------------


def test_priorities_survive_a_restart(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    kinds = {b"L": T.SUBMIT_JOB_LOW_BG, b"N": T.SUBMIT_JOB_BG, b"H": T.SUBMIT_JOB_HIGH_BG}
    order = [b"L1", b"N1", b"H1", b"L2", b"N2", b"H2", b"N3", b"L3", b"H3"]
    with Packets(server.port) as client:
        for unique in order:
            client.submit(kinds[unique[:1]], b"prio", unique, unique)
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    assert admin(restarted.address, "prioritystatus") == b"prio\t3\t3\t3\t0\n.\n"
    assert ran_uniques(restarted, b"prio") == [
        b"H1",
        b"H2",
        b"H3",
        b"N1",
        b"N2",
        b"N3",
        b"L1",
        b"L2",
        b"L3",
    ]


def test_unique_ids_survive_and_coalesce_with_new_submits_after_a_restart(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    with Packets(server.port) as client:
        before = client.submit(T.SUBMIT_JOB_BG, b"uniq", b"order-42", b"first payload")
        client.submit(T.SUBMIT_JOB_BG, b"uniq", b"-", b"keyed by payload")
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    handles = show_jobs(restarted)
    assert len(handles) == 2
    assert before not in handles  # fresh handles after a restart
    with Packets(restarted.port) as client:
        again = client.submit(T.SUBMIT_JOB_BG, b"uniq", b"order-42", b"second payload")
        assert again in handles
        # A foreground submit coalesces onto the reloaded job too (same handle).
        assert client.submit(T.SUBMIT_JOB, b"uniq", b"order-42", b"third") == again
        dash = client.submit(T.SUBMIT_JOB_BG, b"uniq", b"-", b"keyed by payload")
        assert dash in handles and dash != again
        assert queued(restarted, "uniq") == 2  # no second job for either

        ran = drain(restarted, b"uniq")
        assert [(args[0], args[2], args[3]) for args in ran] == [
            (again, b"order-42", b"first payload"),  # the later payloads are ignored
            (dash, b"-", b"keyed by payload"),
        ]
        # The foreground client that coalesced gets the result of the reloaded job.
        assert client.expect(T.WORK_COMPLETE) == [again, b"done"]


def test_epoch_times_survive_a_restart(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    now = int(time.time())
    soon, later = now + 2, now + 6
    with Packets(server.port) as client:
        client.submit(T.SUBMIT_JOB_EPOCH, b"timed", b"soon", str(soon).encode(), b"s")
        client.submit(T.SUBMIT_JOB_EPOCH, b"timed", b"later", str(later).encode(), b"l")
    server_set.kill(server)
    # Down while `soon` comes due.
    time.sleep(max(0.0, soon + 0.2 - time.time()))

    restarted = server_set.restart(server, data_dir=data_dir)
    assert time.time() < later - 1, "the restart took too long for this test"
    assigned: dict[bytes, float] = {}
    with Packets(restarted.port) as worker:
        worker.send(T.CAN_DO, b"timed")
        # `soon` passed during the downtime: it runs at once, `later` is still waiting.
        _, _, unique, _ = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)
        assert unique == b"soon"
        worker.request(T.GRAB_JOB_UNIQ, expect=T.NO_JOB)
        assert queued(restarted, "timed") >= 1  # counted, not lost
        # Sleep until woken: the server sends NOOP when `later` comes due.
        worker.send(T.PRE_SLEEP)
        worker.expect(T.NOOP, timeout=later - time.time() + 3)
        woken = time.time()
        _, _, unique, _ = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)
        assigned[unique] = woken
    assert list(assigned) == [b"later"]
    assert later <= assigned[b"later"] < later + 2


def test_payloads_with_nul_bytes_and_empty_payloads_survive_a_restart(server_set, data_dir):
    payloads = {
        b"nul": b"\0a\0\0b\0",
        b"empty": b"",
        b"binary": bytes(range(256)) * 64,
        b"big": b"\xff\0" * 300_000,
    }
    server = server_set.start(data_dir=data_dir)
    with Packets(server.port) as client:
        for unique, payload in payloads.items():
            client.submit(T.SUBMIT_JOB_BG, b"bin", unique, payload)
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    ran = {args[2]: args[3] for args in drain(restarted, b"bin")}
    assert ran == payloads


def test_background_jobs_with_empty_unique_each_survive_a_restart(server_set, data_dir):
    """gearmand's libsqlite3 queue keys records by (unique, function): the second job with an
    empty unique overwrites the first (shared doc §3.15). Both must come back here."""
    server = server_set.start(data_dir=data_dir)
    with Packets(server.port) as client:
        first = client.submit(T.SUBMIT_JOB_BG, b"anon", b"", b"same payload")
        second = client.submit(T.SUBMIT_JOB_BG, b"anon", b"", b"same payload")
        third = client.submit(T.SUBMIT_JOB_LOW_BG, b"anon", b"", b"other payload")
    assert len({first, second, third}) == 3
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    assert queued(restarted, "anon") == 3
    ran = [(args[2], args[3]) for args in drain(restarted, b"anon")]
    assert ran == [(b"", b"same payload"), (b"", b"same payload"), (b"", b"other payload")]


def test_reduce_background_jobs_keep_their_reducer_across_a_restart(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    with Packets(server.port) as client:
        client.submit(
            T.SUBMIT_REDUCE_JOB_BACKGROUND, b"mapper", b"mr-1", b"my-reducer", b"", b"input\0x"
        )
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    with Packets(restarted.port) as worker:
        worker.send(T.CAN_DO, b"mapper")
        handle, function, unique, reducer, payload = worker.request(
            T.GRAB_JOB_ALL, expect=T.JOB_ASSIGN_ALL
        )
        assert (function, unique, reducer, payload) == (
            b"mapper",
            b"mr-1",
            b"my-reducer",
            b"input\0x",
        )
        worker.send(T.WORK_COMPLETE, handle, b"")
        worker.echo()


# --- what a restart drops -----------------------------------------------------------------


@pytest.mark.parametrize("stop", ["kill", "terminate"])
def test_memory_store_loses_background_jobs_on_restart(server_set, tmp_path, stop):
    data_dir = tmp_path / "data"
    args = ("--store", "memory", "--data-dir", str(data_dir))
    server = server_set.start(*args)
    submit_bg(server, b"volatile", [b"a", b"b"])
    assert queued(server, "volatile") == 2
    getattr(server_set, stop)(server)

    restarted = server_set.start(*args, port=server.port)
    assert "volatile" not in status(restarted)
    assert not data_dir.exists()  # the memory store writes nothing


@pytest.mark.parametrize("stop", ["kill", "terminate"])
def test_foreground_jobs_are_not_stored(server_set, data_dir, stop):
    server = server_set.start(data_dir=data_dir)
    client = Packets(server.port)
    try:
        client.submit(T.SUBMIT_JOB, b"fg", b"waiting-client", b"x")
        client.submit(T.SUBMIT_JOB_HIGH, b"fg", b"", b"y")
        assert queued(server, "fg") == 2
        barrier(server)
        getattr(server_set, stop)(server)
    finally:
        client.close()

    restarted = server_set.restart(server, data_dir=data_dir)
    assert queued(restarted, "fg") == 0
    assert ran_uniques(restarted, b"fg") == []
    assert queued(restarted, "barrier") == 1


def test_cancelled_jobs_do_not_come_back(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    doomed, _ = submit_bg(server, b"cancel", [b"doomed", b"kept"])
    assert admin(server.address, b"cancel job " + doomed) == b"OK\r\n"
    barrier(server)
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"cancel") == [b"kept"]


def test_cancelled_jobs_do_not_come_back_after_sigterm(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    doomed, _ = submit_bg(server, b"cancel", [b"doomed", b"kept"])
    assert admin(server.address, b"cancel job " + doomed) == b"OK\r\n"
    assert server_set.terminate(server) == 0

    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"cancel") == [b"kept"]


# --- a background submit makes a foreground job durable ----------------------------------


@pytest.mark.parametrize("running", [False, True], ids=["queued", "running"])
def test_background_submit_onto_a_foreground_job_makes_it_durable(server_set, data_dir, running):
    server = server_set.start(data_dir=data_dir)
    fg_client = Packets(server.port)
    worker = Packets(server.port)
    try:
        handle = fg_client.submit(T.SUBMIT_JOB, b"mixed", b"shared", b"payload")
        if running:
            worker.send(T.CAN_DO, b"mixed")
            assigned = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)
            assert assigned[0] == handle
        with Packets(server.port) as bg_client:
            assert bg_client.submit(T.SUBMIT_JOB_BG, b"mixed", b"shared", b"other") == handle
        server_set.kill(server)
    finally:
        fg_client.close()
        worker.close()

    restarted = server_set.restart(server, data_dir=data_dir)
    ran = drain(restarted, b"mixed")
    assert [(args[2], args[3]) for args in ran] == [(b"shared", b"payload")]


def test_a_foreground_job_whose_client_left_is_gone_after_a_restart(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    with Packets(server.port) as client:
        client.submit(T.SUBMIT_JOB, b"fg", b"left", b"x")
    # The client is gone: the queued foreground job is dropped (nobody wants it).
    barrier(server)
    server_set.kill(server)
    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"fg") == []


# --- while a commit is in flight ----------------------------------------------------------
#
# An outside connection holding the database's write lock (as a backup tool or an operator's
# sqlite3 shell might) keeps the server's commit of one batch waiting (busy timeout 5 s), so a
# test can make things happen, deterministically, while a batch is being written and the next
# one gathers in the journal.


@contextlib.contextmanager
def commit_held(server, data_dir):
    """Hold the database's write lock: the server's next commit waits until the block ends."""
    db = sqlite3.connect(data_dir / f"jobserver-{server.port}.sqlite3", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.close()  # rolls back and releases the lock


def test_a_taken_over_foreground_job_finished_during_a_commit_does_not_come_back(
    server_set, data_dir
):
    """A background submit coalesces onto a running foreground job while another batch is
    being written; the worker completes the job before its record is written. The job is over
    and must stay over after a crash (and a record of it must not outlive its completion)."""
    server = server_set.start(data_dir=data_dir)
    with (
        Packets(server.port) as fg_client,
        Packets(server.port) as bg_client,
        Packets(server.port) as blocker,
        Packets(server.port) as worker,
    ):
        worker.send(T.CAN_DO, b"race")
        handle = fg_client.submit(T.SUBMIT_JOB, b"race", b"U", b"payload")
        assert worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)[0] == handle
        with commit_held(server, data_dir):
            blocker.send(T.SUBMIT_JOB_BG, b"blocker", b"b", b"")
            time.sleep(0.2)  # its batch is taken and waits for the lock
            bg_client.send(T.SUBMIT_JOB_BG, b"race", b"U", b"other")
            worker.echo()  # (another connection: just lets the submit be read first)
            time.sleep(0.1)
            worker.send(T.WORK_COMPLETE, handle, b"done")
            assert fg_client.expect(T.WORK_COMPLETE) == [handle, b"done"]
        blocker.expect(T.JOB_CREATED)
        bg_client.expect(T.JOB_CREATED)
    barrier(server)
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    after_first = ran_uniques(restarted, b"race")
    assert ran_uniques(restarted, b"blocker") == [b"b"]
    # Whatever ran after the restart is finished too: a second crash brings back nothing.
    barrier(restarted)
    server_set.kill(restarted)
    again = server_set.restart(restarted, data_dir=data_dir)
    assert (after_first, ran_uniques(again, b"race")) == ([], [])


def test_a_job_cancelled_before_its_record_is_written_does_not_come_back(server_set, data_dir):
    server = server_set.start(data_dir=data_dir)
    with Packets(server.port) as blocker, Packets(server.port) as client:
        with commit_held(server, data_dir):
            blocker.send(T.SUBMIT_JOB_BG, b"blocker", b"b", b"")
            time.sleep(0.2)  # its batch is taken and waits for the lock
            client.send(T.SUBMIT_JOB_BG, b"cancel", b"doomed", b"x")
            client.send(T.SUBMIT_JOB_BG, b"cancel", b"kept", b"y")
            time.sleep(0.1)
            handles = show_jobs(server)
            assert len(handles) == 3  # the blocker and the two waiting for their commit
            doomed = sorted(handles)[1]  # handles end in a counter: 1 blocker, 2 doomed
            assert admin(server.address, b"cancel job " + doomed) == b"OK\r\n"
        blocker.expect(T.JOB_CREATED)
        client.recv()  # doomed: JOB_CREATED or an error, either is fine
        client.expect(T.JOB_CREATED)
    barrier(server)
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"cancel") == [b"kept"]


def test_sigterm_during_a_commit_still_writes_the_removals_queued_behind_it(server_set, data_dir):
    """Deterministic form of the SIGTERM test above: the removals of finished jobs wait in the
    journal behind a batch being written when SIGTERM arrives; the shutdown must write them."""
    server = server_set.start(data_dir=data_dir)
    uniques = [b"job-%d" % i for i in range(4)]
    submit_bg(server, b"work", uniques)
    with Packets(server.port) as worker, Packets(server.port) as blocker:
        worker.send(T.CAN_DO, b"work")
        with commit_held(server, data_dir):
            blocker.send(T.SUBMIT_JOB_BG, b"blocker", b"b", b"")
            time.sleep(0.2)  # its batch is taken and waits for the lock
            for _ in range(2):
                handle = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)[0]
                worker.send(T.WORK_COMPLETE, handle, b"ok")
            worker.echo()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        assert server.proc.wait(servers.STOP_TIMEOUT) == 0
    server.stop()

    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"work") == uniques[2:]


# --- files and defaults -------------------------------------------------------------------


def test_empty_function_name_and_longest_unique_survive_a_restart(server_set, data_dir):
    longest = b"u" * 64
    server = server_set.start(data_dir=data_dir)
    with Packets(server.port) as client:
        client.submit(T.SUBMIT_JOB_BG, b"", longest, b"no name")
    server_set.kill(server)
    restarted = server_set.restart(server, data_dir=data_dir)
    ran = drain(restarted, b"")
    assert [(args[1], args[2], args[3]) for args in ran] == [(b"", longest, b"no name")]


def test_servers_sharing_a_data_directory_each_keep_their_own_jobs(server_set, data_dir):
    first = server_set.start(data_dir=data_dir)
    second = server_set.start(data_dir=data_dir)
    submit_bg(first, b"shared", [b"of-first"])
    submit_bg(second, b"shared", [b"of-second-1", b"of-second-2"])
    assert sorted(p.name for p in data_dir.glob("*.sqlite3")) == sorted(
        [f"jobserver-{first.port}.sqlite3", f"jobserver-{second.port}.sqlite3"]
    )
    server_set.kill(first)
    server_set.kill(second)

    first = server_set.restart(first, data_dir=data_dir)
    second = server_set.restart(second, data_dir=data_dir)
    assert ran_uniques(first, b"shared") == [b"of-first"]
    assert ran_uniques(second, b"shared") == [b"of-second-1", b"of-second-2"]


def test_a_daemon_started_with_no_store_options_keeps_background_jobs_across_kill_9(tmp_path):
    """The issue's "done when": `jobserver -d PORT` with no store options keeps background
    jobs across kill -9 (its store is in default_data_dir(), whatever the directory it was
    started in). Only this port's files are removed from there afterwards (and the directory,
    if the test made it)."""
    port = servers.free_port()
    made_data_dir = not default_data_dir().exists()
    pid_file = tmp_path / "jobserver.pid"
    argv = [sys.executable, "-m", "jobserver", "-d", "-L", servers.HOST, str(port)]
    argv += ["--pid-file", str(pid_file)]
    pids: list[int] = []

    def start_daemon() -> int:
        result = subprocess.run(
            argv, cwd=tmp_path, capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert (result.returncode, result.stderr) == (0, ""), result
        pid = int(pid_file.read_text())
        pids.append(pid)
        return pid

    try:
        pid = start_daemon()
        assert (default_data_dir() / f"jobserver-{port}.sqlite3").exists()
        with Packets(port) as client:
            client.submit(T.SUBMIT_JOB_HIGH_BG, b"daemon", b"survivor", b"kept")
        os.kill(pid, signal.SIGKILL)
        servers.wait_until(
            lambda: not servers.port_accepts(servers.HOST, port, 0.2), what="the daemon to die"
        )

        start_daemon()
        daemon = types.SimpleNamespace(port=port, address=f"{servers.HOST}:{port}")
        assert [args[2:] for args in drain(daemon, b"daemon")] == [[b"survivor", b"kept"]]
    finally:
        for pid in pids:  # ours only: the pid must still be a jobserver
            with contextlib.suppress(OSError):
                if b"jobserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        for path in default_data_dir().glob(f"jobserver-{port}.*"):
            path.unlink(missing_ok=True)
        if made_data_dir:
            with contextlib.suppress(OSError):  # another server put files there meanwhile
                default_data_dir().rmdir()
