"""Batches in flight two at a time on the PostgreSQL store's connection (store/pg_pipeline.py),
against a real database: outcomes in order, a failed or fenced batch written nothing and is
written again by `apply`, a lost connection, a batch that must go alone, and the committer
handing results back in order.
"""

from __future__ import annotations

import select
import threading
import time

import psycopg
import pytest
from test_store_postgresql_store import fence, jobs, node_a_store, rows  # noqa: F401 (fixture)

from jobserver.commits import Committer
from jobserver.engine.journal import Batch, RetryPolicy, StoredJob, StoreExtras
from jobserver.store import StoreError
from jobserver.store.lease import Fenced
from jobserver.store.postgresql import PIPELINE_DEPTH, PostgresStore

ANSWER_TIMEOUT = 10.0
"""Seconds to wait for the database's answers: generous for a loaded CI machine."""

COUNT = 50  # jobs per batch


def batch(records: list[StoredJob], removes: list[int] | None = None, extras=None) -> Batch:
    end = records[-1].record_id + 1 if records else 1
    return Batch([], records, removes or [], end, extras)


LOCK_NODE_ROW = "SELECT FROM jobserver_nodes WHERE node_id = 'node-a' FOR UPDATE"
"""Held in a transaction, it keeps node-a's statements waiting: batches stay in flight."""


def kill_node_a_connection(admin: psycopg.Connection) -> None:
    """Terminate node-a's connection to the database, as an administrator (or a failover)
    would, and wait until it is gone."""
    killed = admin.execute(
        "SELECT count(pg_terminate_backend(pid, %s)) FROM pg_stat_activity"
        " WHERE application_name = 'jobserver node-a'",
        (int(ANSWER_TIMEOUT * 1000),),
    ).fetchone()
    assert killed == (1,)


def outcomes_of(store: PostgresStore, expected: int) -> list[bool]:
    """Wait for `expected` batches in flight to come back."""
    outcomes: list[bool] = []
    while len(outcomes) < expected:
        readable, _, _ = select.select([store.pipeline_fileno], [], [], ANSWER_TIMEOUT)
        assert readable, f"no answer within {ANSWER_TIMEOUT} s; got {outcomes}"
        outcomes += store.receive_batches()
    return outcomes


def test_the_store_pipelines(store):
    assert store.pipeline_depth == PIPELINE_DEPTH >= 2


def test_batches_in_flight_are_written_and_answered_in_order(store, pg_database):
    first, second = jobs(1, COUNT), jobs(COUNT + 1, COUNT)
    assert store.send_batch(batch(first))
    assert store.send_batch(batch(second, removes=[3, 4]))  # removes of the first batch
    assert outcomes_of(store, 2) == [True, True]
    assert store.pipeline_fileno is not None
    store.end_pipeline()
    expected = [j.record_id for j in [*first, *second] if j.record_id not in (3, 4)]
    assert [row[1] for row in rows(pg_database)] == expected
    store.apply(jobs(2 * COUNT + 1, 1), [])  # ordinary statements again on the connection


def test_a_failed_statement_writes_nothing_and_leaves_the_next_batch_alone(store, pg_database):
    store.apply(jobs(1, 1), [])
    clash = [*jobs(2, COUNT - 1), jobs(1, 1)[0]]  # record 1 is stored already
    assert store.send_batch(batch(clash))
    assert store.send_batch(batch(jobs(COUNT + 1, COUNT)))
    assert outcomes_of(store, 2) == [False, True]
    with pytest.raises(StoreError, match="duplicate key"):
        store.apply(clash, [])  # what the committer does with it: the usual refusal
    assert [row[1] for row in rows(pg_database)] == [1, *range(COUNT + 1, 2 * COUNT + 1)]


def test_fenced_batches_write_nothing_and_apply_rejoins_below_the_first(store, pg_database):
    store.apply(jobs(1, 3), [])
    fence(pg_database, "node-a", by="node-b")
    first, second = jobs(4, COUNT), jobs(COUNT + 4, COUNT)
    assert store.send_batch(batch(first))
    assert store.send_batch(batch(second))
    assert outcomes_of(store, 2) == [False, False]
    assert [row[0] for row in rows(pg_database)] == ["node-b"] * 3
    store.apply(first, [])
    store.apply(second, [])
    news = list(store.lease.news)
    assert len(news) == 1 and isinstance(news[0], Fenced)
    assert news[0].below == 4  # the peer's are those before the first batch in flight
    mine = [row[1] for row in rows(pg_database) if row[0] == "node-a"]
    assert mine == [j.record_id for j in [*first, *second]]


def test_a_batch_with_extras_is_not_pipelined(store, pg_database):
    extras = StoreExtras([], [], [(b"f", RetryPolicy(3, 1.0))])
    assert not store.send_batch(batch(jobs(1, 2), extras=extras))
    assert store.pipeline_fileno is None  # nothing was sent
    store.apply(jobs(1, 2), [], extras)
    assert [row[1] for row in rows(pg_database)] == [1, 2]


def test_a_connection_lost_with_batches_in_flight_is_a_busy_store_error(store, pg_database):
    # Holding the node row in a transaction keeps both batches waiting for it: in flight.
    with psycopg.connect(pg_database, autocommit=True) as admin, admin.transaction():
        admin.execute(LOCK_NODE_ROW)
        assert store.send_batch(batch(jobs(1, COUNT)))
        assert store.send_batch(batch(jobs(COUNT + 1, COUNT)))
        kill_node_a_connection(admin)
    with pytest.raises(StoreError) as raised:
        outcomes_of(store, 2)
    assert raised.value.busy
    assert store.pipeline_fileno is None


def test_the_committer_keeps_two_batches_in_flight_and_reports_them_in_order(store, pg_database):
    woken = threading.Semaphore(0)
    committer = Committer(store, woken.release)
    try:
        first, second = batch(jobs(1, COUNT)), batch(jobs(COUNT + 1, COUNT))
        committer.hand_over(first)
        assert committer.may_hand_over(alone=False)
        assert not committer.may_hand_over(alone=True)  # a batch with extras waits
        committer.hand_over(second)
        assert not committer.may_hand_over(alone=False)  # two in flight: full
        written = committer.wait_written()
    finally:
        committer.stop()
    assert [w.batch for w in written] == [first, second]
    assert all(not w.failed and not w.removes_failed for w in written)
    assert len(rows(pg_database)) == 2 * COUNT


def test_the_committer_writes_fenced_batches_again_in_order(store, pg_database):
    """Both batches in flight come back fenced; the committer writes them again through
    `apply` (which joins anew), and still reports them in the order handed over."""
    store.apply(jobs(1, 3), [])
    fence(pg_database, "node-a", by="node-b")
    committer = Committer(store, lambda: None)
    try:
        first, second = batch(jobs(4, COUNT)), batch(jobs(COUNT + 4, COUNT))
        committer.hand_over(first)
        committer.hand_over(second)
        written = committer.wait_written()
    finally:
        committer.stop()
    assert [w.batch for w in written] == [first, second]
    assert all(not w.failed for w in written)
    assert [n.below for n in store.lease.news if isinstance(n, Fenced)] == [4]
    mine = [row[1] for row in rows(pg_database) if row[0] == "node-a"]
    assert mine == list(range(4, 2 * COUNT + 4))


class StoreWithABug(PostgresStore):
    """A real PostgresStore whose pipeline breaks once, as a bug of ours would."""

    broken = False

    def send_batch(self, batch):
        if not self.broken and batch.adds and batch.adds[0].record_id > COUNT:
            self.broken = True
            raise RuntimeError("a bug")
        return super().send_batch(batch)


def next_written(committer: Committer, woken: threading.Event):
    """The next result, waiting at most ANSWER_TIMEOUT: a store thread that died or hangs
    fails the test instead of hanging it."""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while (written := committer.take_written()) is None:
        assert woken.wait(max(0.0, deadline - time.monotonic())), "the store's thread is stuck"
        woken.clear()
    return written


def test_a_bug_in_the_pipeline_refuses_its_batches_and_the_next_are_written(pg_database):
    """Never a hang: the batch the bug hit is refused (its submitters get QUEUE_ERROR), and
    the store's thread goes on with the next."""
    store = StoreWithABug.open(pg_database, "node-a", 5)
    store.load()
    woken = threading.Event()
    committer = Committer(store, woken.set)
    try:
        first, second, third = (batch(jobs(1 + n * COUNT, COUNT)) for n in range(3))
        committer.hand_over(first)
        assert not next_written(committer, woken).failed
        committer.hand_over(second)
        refused = next_written(committer, woken)
        assert refused.batch is second and refused.removes_failed
        assert set(refused.failed) == {j.record_id for j in second.adds}
        assert "internal error: RuntimeError('a bug')" in next(iter(refused.failed.values()))
        committer.hand_over(third)
        written_again = next_written(committer, woken)
        assert written_again.batch is third and not written_again.failed
    finally:
        committer.stop()
        store.close()
    stored = [row[1] for row in rows(pg_database)]
    assert stored == [j.record_id for j in [*first.adds, *third.adds]]
