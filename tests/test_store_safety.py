"""Store safety (hardening issue): one server per database, a data file deleted or replaced
while running, a disk that fills up.

- A second server on the same database exits at start with one line naming the file and the
  first server's pid; the first keeps serving.
- A data file deleted or replaced while the server runs is noticed at the next commit (or
  within a second when idle): the live jobs are written into a new file before the next submit
  is acknowledged, and a restart (after SIGKILL or SIGTERM) loads every acknowledged job. A
  replacement is moved aside, not overwritten.
- A disk filled by queued jobs refuses submits (ERROR QUEUE_ERROR), still removes the jobs that
  finish, and accepts submits again once they drained, without a restart; drained jobs do not
  come back after one.

Real servers (tests/servers.py) and the store class itself for what a server cannot be made
to do at a chosen moment (a file deleted in the middle of a commit). The full disk is a tmpfs
mounted for the test (root), unmounted at teardown.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
import servers
from servers import jobserver_argv
from test_store_support import Packets, ServerSet, drain, split_args

from jobserver.engine.journal import StoredJob
from jobserver.protocol import PacketType as T
from jobserver.store import StoreError
from jobserver.store.files import rewrite_path
from jobserver.store.lock import lock_path
from jobserver.store.sqlite import SqliteStore

COMMAND_TIMEOUT = 30.0
"""Seconds a server that cannot start has to exit: far beyond a start, so only a hang fails."""

IDLE_REWRITE_TIMEOUT = 15.0
"""Bound on waiting for an idle server to rewrite a deleted file (it looks every second)."""

BIG_PAYLOAD = 40 * 1024
"""100 jobs of this are more than SQLite's 1000-page WAL: the old file has been checkpointed
when it goes, so what is in its WAL alone is not the whole queue."""

FULL_DISK_SIZE = "8m"
"""The tmpfs the full-disk test fills: a few hundred jobs of FILL_PAYLOAD."""

FILL_PAYLOAD = 16 * 1024
MAX_FILL_SUBMITS = 2000
"""Far more FILL_PAYLOAD jobs than FULL_DISK_SIZE holds: the loop ends at the first refusal."""


@pytest.fixture
def server_set():
    started = ServerSet()
    yield started
    started.stop_all()


def database(data_dir: Path, port: int) -> Path:
    return data_dir / f"jobserver-{port}.sqlite3"


def submit_all(server: servers.Server, function: bytes, uniques: list[bytes], payload: bytes):
    with Packets(server.port) as client:
        for unique in uniques:
            client.submit(T.SUBMIT_JOB_BG, function, unique, payload)


def ran_uniques(server: servers.Server, function: bytes) -> list[bytes]:
    return [args[2] for args in drain(server, function)]


def stop(server_set: ServerSet, server: servers.Server, how: str) -> None:
    if how == "SIGKILL":
        server_set.kill(server)
    else:
        assert server_set.terminate(server) == 0


# --- one server per database ------------------------------------------------------------------


def test_a_second_server_on_the_same_database_exits_naming_the_file_and_the_pid(
    server_set, tmp_path
):
    data_dir = tmp_path / "data"
    first = server_set.start(data_dir=data_dir)
    submit_all(first, b"one", [b"before"], b"")

    # Same port and data directory (say, -L 127.0.0.1 and -L ::1): the store is opened before
    # the port is taken, so the lock is what refuses it.
    result = subprocess.run(
        jobserver_argv(first.port, data_dir=data_dir), cwd=tmp_path, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("jobserver: ")]
    assert len(lines) == 1, result.stderr
    assert str(database(data_dir, first.port)) in lines[0], lines[0]
    assert re.search(rf"\bpid {first.pid}\b", lines[0]), lines[0]

    # The first one serves on, its database untouched.
    submit_all(first, b"one", [b"after"], b"")
    assert ran_uniques(first, b"one") == [b"before", b"after"]
    assert first.proc.poll() is None


def test_the_lock_names_the_holder_and_goes_with_close(tmp_path):
    path = tmp_path / "jobserver-1.sqlite3"
    store = SqliteStore.open(tmp_path, path)
    try:
        assert lock_path(path).read_text().strip() == str(os.getpid())
        with pytest.raises(StoreError) as refused:
            SqliteStore.open(tmp_path, path)
        assert str(path) in str(refused.value)
        assert f"pid {os.getpid()}" in str(refused.value)
    finally:
        store.close()
    SqliteStore.open(tmp_path, path).close()  # free again once closed


def test_a_deleted_lock_file_is_taken_again(tmp_path):
    path = tmp_path / "jobserver-1.sqlite3"
    store = SqliteStore.open(tmp_path, path)
    try:
        store.load()
        lock_path(path).unlink()
        store.check()  # what the store thread does when idle (and each commit does)
        assert lock_path(path).read_text().strip() == str(os.getpid())
        with pytest.raises(StoreError, match="in use by another jobserver"):
            SqliteStore.open(tmp_path, path)
    finally:
        store.close()


# --- a data file deleted or replaced while running ---------------------------------------------


def replace_with_another_database(path: Path) -> None:
    other = path.with_name("other.sqlite3")
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE not_jobs (x)")
    db.execute("INSERT INTO not_jobs VALUES ('keep me')")
    db.commit()
    db.close()
    os.rename(other, path)


@pytest.mark.parametrize("stop_with", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_data_file_deleted_or_replaced_while_running_loses_no_acknowledged_job(
    server_set, tmp_path, change, stop_with
):
    data_dir = tmp_path / "data"
    server = server_set.start(data_dir=data_dir)
    path = database(data_dir, server.port)
    payload = os.urandom(BIG_PAYLOAD)
    before = [b"before-%d" % i for i in range(100)]
    after = [b"after-%d" % i for i in range(100)]
    submit_all(server, b"kept", before, payload)
    old_inode = path.stat().st_ino

    if change == "deleted":
        path.unlink()
    else:
        replace_with_another_database(path)
    with Packets(server.port) as client:
        client.submit(T.SUBMIT_JOB_BG, b"kept", after[0], payload)
        # Acknowledged: so it is in a file at the path, a new one.
        assert path.stat().st_ino != old_inode
    submit_all(server, b"kept", after[1:], payload)
    if change == "replaced":  # moved aside, whole, not overwritten
        (aside,) = data_dir.glob(f"{path.name}.replaced-*")
        with sqlite3.connect(aside) as db:
            assert db.execute("SELECT x FROM not_jobs").fetchall() == [("keep me",)]
    stop(server_set, server, stop_with)
    assert f"was {change} while in use; its 101 live jobs were written" in server.stderr_text()

    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"kept") == before + after


def test_a_data_directory_emptied_while_running_is_written_again_lock_included(
    server_set, tmp_path
):
    data_dir = tmp_path / "data"
    server = server_set.start(data_dir=data_dir)
    submit_all(server, b"kept", [b"one", b"two"], b"x")
    for file in list(data_dir.iterdir()):  # database, -wal, -shm, lock file, reserve
        file.unlink()
    submit_all(server, b"kept", [b"three"], b"x")
    assert database(data_dir, server.port).exists()

    # The lock is held again: a second server on the same database is still refused.
    result = subprocess.run(
        jobserver_argv(server.port, data_dir=data_dir), cwd=tmp_path, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    assert result.returncode != 0 and f"pid {server.pid}" in result.stderr, result.stderr

    server_set.kill(server)
    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"kept") == [b"one", b"two", b"three"]


def test_an_idle_server_rewrites_a_deleted_file_without_waiting_for_a_submit(server_set, tmp_path):
    data_dir = tmp_path / "data"
    server = server_set.start(data_dir=data_dir)
    path = database(data_dir, server.port)
    uniques = [b"idle-%d" % i for i in range(10)]
    submit_all(server, b"idle", uniques, b"x")
    path.unlink()
    servers.wait_until(path.exists, IDLE_REWRITE_TIMEOUT, 0.05, "the file to be written again")
    servers.wait_until(  # complete: the rewrite renames a finished file into place
        lambda: "live jobs were written to a new file" in server.stderr_text(),
        IDLE_REWRITE_TIMEOUT,
        0.05,
        "the rewrite's log line",
    )
    server_set.kill(server)
    restarted = server_set.restart(server, data_dir=data_dir)
    assert ran_uniques(restarted, b"idle") == uniques


def record(record_id: int) -> StoredJob:
    return StoredJob(record_id, b"f", b"u%d" % record_id, 1, 0, b"", b"p%d" % record_id)


class DeletedDuringCommit(SqliteStore):
    """Deletes its file at the end of its next commit, before the store looks again: the one
    moment a deletion can race a commit. `block_rewrite` also makes the rewrite's new file
    impossible to create (a directory holds its name)."""

    delete_next = False
    block_rewrite = False

    def _commit(self, adds, removes):
        new = super()._commit(adds, removes)
        if self.delete_next:
            self.delete_next = False
            self.path.unlink()
            if self.block_rewrite:
                (rewrite_path(self.path) / "blocked").mkdir(parents=True)
        return new


def test_a_batch_committed_as_its_file_is_deleted_lands_in_the_new_file(tmp_path):
    path = tmp_path / "jobserver-1.sqlite3"
    store = DeletedDuringCommit.open(tmp_path, path)
    try:
        store.load()
        store.apply([record(i) for i in range(1, 6)], [])
        store.delete_next = True
        store.apply([record(6), record(7)], [1])  # returns: they are acknowledged
        assert path.exists()
    finally:
        store.close()
    reopened = SqliteStore.open(tmp_path, path)
    try:
        assert [job.record_id for job in reopened.load()] == [2, 3, 4, 5, 6, 7]
    finally:
        reopened.close()


def test_a_batch_whose_new_file_cannot_be_written_is_refused_and_never_comes_back(tmp_path):
    """The file goes during a commit and the new file cannot be written: the batch's records
    are refused (not acknowledged), its removes stay written, and the next rewrite leaves the
    refused records out."""
    path = tmp_path / "jobserver-1.sqlite3"
    store = DeletedDuringCommit.open(tmp_path, path)
    try:
        store.load()
        store.apply([record(i) for i in range(1, 6)], [])
        store.delete_next = store.block_rewrite = True
        with pytest.raises(StoreError) as refused:
            store.apply([record(6), record(7)], [1])
        assert refused.value.removes_written
        assert "cannot be written to a new file" in str(refused.value)
        assert not path.exists()

        (rewrite_path(path) / "blocked").rmdir()
        rewrite_path(path).rmdir()
        store.apply([record(8)], [2])
        assert path.exists()
    finally:
        store.close()
    reopened = SqliteStore.open(tmp_path, path)
    try:
        assert [job.record_id for job in reopened.load()] == [3, 4, 5, 8]
    finally:
        reopened.close()


def test_a_rewrite_interrupted_before_its_rename_is_put_in_place_at_start(tmp_path):
    path = tmp_path / "jobserver-1.sqlite3"
    store = SqliteStore.open(tmp_path, path)
    store.load()
    store.apply([record(i) for i in range(1, 4)], [2])
    store.close()
    # As a crash leaves it: the complete new file under its hidden name, the old file gone,
    # its WAL still there.
    os.rename(path, rewrite_path(path))
    path.with_name(path.name + "-wal").write_bytes(b"stale" * 1000)

    reopened = SqliteStore.open(tmp_path, path)
    try:
        assert [job.record_id for job in reopened.load()] == [1, 3]
        assert not rewrite_path(path).exists()
    finally:
        reopened.close()


def test_an_incomplete_rewrite_left_by_a_crash_is_deleted_at_start(tmp_path):
    path = tmp_path / "jobserver-1.sqlite3"
    store = SqliteStore.open(tmp_path, path)
    store.load()
    store.apply([record(1)], [])
    store.close()
    rewrite_path(path).write_bytes(b"half a database")
    rewrite_path(path).with_name(rewrite_path(path).name + "-journal").write_bytes(b"hot")

    reopened = SqliteStore.open(tmp_path, path)
    try:
        assert [job.record_id for job in reopened.load()] == [1]
        assert sorted(p.name for p in tmp_path.glob(".*")) == []
    finally:
        reopened.close()


# --- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A FULL_DISK_SIZE tmpfs (root only: CI runs the tests as root); unmounted afterwards."""
    point = tmp_path / "small-disk"
    point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FULL_DISK_SIZE}", "tmpfs", str(point)],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the tests must run as root): {result.stderr}")
    yield point
    if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)  # busy: detach


def fill(server: servers.Server) -> tuple[list[bytes], bytes]:
    """Submit FILL_PAYLOAD jobs until one is refused; the acknowledged uniques and the
    refusal's text."""
    payload = os.urandom(FILL_PAYLOAD)
    acknowledged: list[bytes] = []
    with Packets(server.port) as client:
        for i in range(MAX_FILL_SUBMITS):
            unique = b"fill-%d" % i
            client.send(T.SUBMIT_JOB_BG, b"fill", unique, payload)
            packet_type, reply = client.recv()
            if packet_type == T.ERROR:
                code, text = split_args(T.ERROR, reply)
                assert code == b"QUEUE_ERROR", reply
                return acknowledged, text
            assert packet_type == T.JOB_CREATED, (packet_type, reply)
            acknowledged.append(unique)
    raise AssertionError(f"{MAX_FILL_SUBMITS} jobs of {FILL_PAYLOAD} bytes fit on the disk")


def test_a_disk_filled_by_queued_jobs_recovers_once_they_drain(server_set, small_disk):
    server = server_set.start(data_dir=small_disk)
    acknowledged, refusal = fill(server)
    assert len(acknowledged) > 10, refusal
    assert b"full" in refusal or b"no space" in refusal, refusal
    # Still full: more submits are refused, nothing else is.
    with Packets(server.port) as client:
        client.send(T.SUBMIT_JOB_BG, b"fill", b"refused-too", os.urandom(FILL_PAYLOAD))
        assert client.expect(T.ERROR)[0] == b"QUEUE_ERROR"
        client.echo()

    # The worker's completions are removes: they are written although the disk is full.
    assert ran_uniques(server, b"fill") == acknowledged
    # Drained: submits are accepted again, without a restart.
    after = [b"after-%d" % i for i in range(20)]
    submit_all(server, b"after", after, os.urandom(FILL_PAYLOAD))
    assert "disk space is back" in server.stderr_text()

    server_set.kill(server)
    restarted = server_set.restart(server, data_dir=small_disk)
    assert ran_uniques(restarted, b"fill") == []  # drained jobs stay drained
    assert ran_uniques(restarted, b"after") == after
