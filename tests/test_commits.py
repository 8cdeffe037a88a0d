"""The store's own thread (jobserver/commits.py): one batch at a time, each result taken once,
and a failure of the store never hangs the server or loses the batch's removes.

The batches come from a real durable engine's journal and go to a real SqliteStore in
tmp_path; where a test needs the store to fail, a trigger in the database file refuses
chosen records, or (for a bug of ours) a subclass raises.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing

import pytest
from engine_helpers import connect, new_engine, send

from jobserver.commits import Committer, Written
from jobserver.protocol import PacketType as T
from jobserver.store import StoreError
from jobserver.store.sqlite import SqliteStore

RESULT_TIMEOUT = 10.0
"""Seconds a test waits for the thread's result: far beyond a commit, so only a hang fails."""


class Woken:
    """Stands in for the serving thread's wake-up: counts the calls, lets a test wait."""

    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


@pytest.fixture
def store(tmp_path):
    store = SqliteStore.open(tmp_path, tmp_path / "jobserver-1.sqlite3")
    store.load()
    yield store
    store.close()


def batch_of(*uniques: bytes) -> tuple:
    """A batch as the server takes it: background submits journalled by a durable engine."""
    engine = new_engine(durable=True)
    client = connect(engine)
    for unique in uniques:
        send(engine, client, T.SUBMIT_JOB_BG, b"fn", unique, b"x")
    return engine, engine.journal.take_batch()


def written_by(committer: Committer, woken: Woken) -> Written:
    assert woken.event.wait(RESULT_TIMEOUT), "the store thread never reported the batch"
    woken.event.clear()
    written = committer.take_written()
    assert written is not None
    return written


def written_through_a_thread(store: SqliteStore, *uniques: bytes) -> Written:
    """Start a Committer, write one batch of background submits with it, stop it."""
    woken = Woken()
    committer = Committer(store, woken)
    try:
        _, batch = batch_of(*uniques)
        committer.hand_over(batch)
        return written_by(committer, woken)
    finally:
        committer.stop()


def stored_uniques(store: SqliteStore) -> list[bytes]:
    return [job.unique for job in store.load()]


def test_a_handed_over_batch_is_written_reported_once_and_taken_once(store):
    woken = Woken()
    committer = Committer(store, woken)
    try:
        _, batch = batch_of(b"a", b"b")
        committer.hand_over(batch)
        assert committer.busy
        written = written_by(committer, woken)
        assert written == Written(batch, {}, False, written.seconds)
        assert written.seconds > 0  # timed, for the store-commit histogram
        assert committer.take_written() is None  # taken once
        assert not committer.busy
        assert woken.count == 1
    finally:
        committer.stop()
    assert stored_uniques(store) == [b"a", b"b"]


def test_only_the_record_the_store_refuses_is_refused(store, tmp_path):
    """A record that cannot be stored (here a trigger; in life, too big for the disk left)
    must not take the other submits of its batch down with it."""
    with closing(sqlite3.connect(tmp_path / "jobserver-1.sqlite3", isolation_level=None)) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON segments "
            "WHEN NEW.first_record_id <= 2 AND NEW.end_record_id > 2 "  # rows holding record 2
            "BEGIN SELECT RAISE(ABORT, 'no room for this one'); END"
        )
    written = written_through_a_thread(store, b"a", b"b", b"c")
    assert list(written.failed) == [2]
    assert "no room for this one" in written.failed[2]
    assert not written.removes_failed
    assert stored_uniques(store) == [b"a", b"c"]


class LockedStore(SqliteStore):
    """A store whose database another process keeps locked: every apply fails as busy."""

    calls = 0

    def apply(self, adds, removes, extras=None) -> None:
        self.calls += 1
        raise StoreError(f"job database {self.path}: database is locked", busy=True)


def test_a_locked_database_refuses_the_whole_batch_in_one_attempt(tmp_path):
    """Record by record, each attempt would wait out the lock again (5 s each)."""
    store = LockedStore.open(tmp_path, tmp_path / "jobserver-1.sqlite3")
    try:
        written = written_through_a_thread(store, b"a", b"b", b"c")
    finally:
        store.close()
    assert store.calls == 1
    assert sorted(written.failed) == [1, 2, 3]
    assert all("locked" in why for why in written.failed.values())
    assert written.removes_failed  # kept for the next batch


class BuggyStore(SqliteStore):
    """A store with a bug of ours: its first apply raises something that is not StoreError."""

    failures = 1

    def apply(self, adds, removes, extras=None) -> None:
        if self.failures:
            self.failures -= 1
            raise ValueError("a bug")
        super().apply(adds, removes, extras)


def test_a_bug_in_the_store_refuses_that_batch_and_the_thread_serves_the_next(tmp_path):
    """Never a hang: the submits get an error, the removes are retried, the thread lives."""
    store = BuggyStore.open(tmp_path, tmp_path / "jobserver-1.sqlite3")
    store.load()
    woken = Woken()
    committer = Committer(store, woken)
    try:
        _, first = batch_of(b"a")
        committer.hand_over(first)
        written = written_by(committer, woken)
        assert list(written.failed) == [1]
        assert "internal error" in written.failed[1]
        assert written.removes_failed

        _, second = batch_of(b"b")
        committer.hand_over(second)
        assert written_by(committer, woken)[:3] == (second, {}, False)
    finally:
        committer.stop()
    assert stored_uniques(store) == [b"b"]
    store.close()


def test_at_shutdown_the_batch_in_flight_is_waited_for_and_reported(store):
    """The server's last act: wait for the batch being written, report it (its replies and
    any failed removes), then stop the thread."""
    gate = threading.Event()

    def slow_wakeup() -> None:
        gate.wait(RESULT_TIMEOUT)  # the serving thread is busy elsewhere: nobody polls

    committer = Committer(store, slow_wakeup)
    _, batch = batch_of(b"a")
    committer.hand_over(batch)
    written = committer.wait_written()
    gate.set()
    committer.stop()
    assert len(written) == 1 and written[0][:3] == (batch, {}, False)
    assert committer.wait_written() == []  # nothing more in flight
    assert stored_uniques(store) == [b"a"]


def test_one_batch_at_a_time(store):
    """A store that does not pipeline (sqlite) takes a batch only once the last is reported."""
    committer = Committer(store, lambda: None)
    try:
        _, batch = batch_of(b"a")
        assert committer.may_hand_over(alone=False)
        committer.hand_over(batch)
        assert committer.busy and not committer.may_hand_over(alone=False)
    finally:
        assert len(committer.wait_written()) == 1
        committer.stop()
    assert not committer.busy and committer.may_hand_over(alone=True)
