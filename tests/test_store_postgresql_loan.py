"""The PostgreSQL store lent to the serving thread (commits.py, "the loan"), against a real
database: while the store's thread is idle, batches are sent from trio without blocking and
their outcomes taken by a trio task, with no hand-over between threads; a check due takes the
store back; a batch that must go alone, a fenced batch and a lost connection go back to the
store's thread, and results always come in the order handed over.
"""

from __future__ import annotations

import time

import psycopg
import trio
from test_store_postgresql_pipeline import COUNT, LOCK_NODE_ROW, batch, kill_node_a_connection
from test_store_postgresql_store import fence, jobs, node_a_store, rows  # noqa: F401 (fixture)

import jobserver.store.postgresql as postgresql
from jobserver.commits import Committer, Written
from jobserver.engine.journal import Batch, RetryPolicy, StoreExtras
from jobserver.store.lease import Fenced

ANSWER_TIMEOUT = 10.0
"""Seconds to wait for a result or a state: generous for a loaded CI machine."""

POLL = 0.005  # seconds between looks at a state another thread changes


class Loan:
    """A lending Committer on a real store, its serve_loan task running in the test's nursery;
    counts the results that came through the loan and through the store's thread."""

    def __init__(self, store, nursery: trio.Nursery) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.by_thread = 0
        self.by_loan = 0
        self.woken = trio.Event()
        self.committer = Committer(store, self._thread_wrote, lend=True)
        nursery.start_soon(self.committer.serve_loan, self._loan_wrote)

    def _thread_wrote(self) -> None:  # the store's thread
        self.by_thread += 1
        self.token.run_sync_soon(self.woken.set)

    def _loan_wrote(self) -> None:  # the serving thread (here: trio)
        self.by_loan += 1
        self.woken.set()

    async def lent(self) -> None:
        with trio.fail_after(ANSWER_TIMEOUT):
            while not self.committer._lent:
                await trio.sleep(POLL)

    async def results(self, count: int) -> list[Written]:
        taken: list[Written] = []
        with trio.fail_after(ANSWER_TIMEOUT):
            while len(taken) < count:
                while (written := self.committer.take_written()) is not None:
                    taken.append(written)
                if len(taken) < count:
                    await self.woken.wait()
                    self.woken = trio.Event()
        return taken

    def hand_over(self, *batches: Batch) -> None:
        for one in batches:
            assert self.committer.may_hand_over(one.extras is not None)
            self.committer.hand_over(one)


async def test_an_idle_store_is_lent_and_batches_go_through_trio_in_order(store, pg_database):
    async with trio.open_nursery() as nursery:
        loan = Loan(store, nursery)
        try:
            await loan.lent()
            first, second = batch(jobs(1, COUNT)), batch(jobs(COUNT + 1, COUNT), removes=[3])
            loan.hand_over(first, second)
            assert not loan.committer.may_hand_over(alone=False)  # two in flight: full
            assert not loan.committer.may_hand_over(alone=True)
            written = await loan.results(2)
        finally:
            loan.committer.wait_written()
            loan.committer.stop()
            nursery.cancel_scope.cancel()
    assert [w.batch for w in written] == [first, second]
    assert all(not w.failed and not w.removes_failed for w in written)
    assert loan.by_thread == 0 and loan.by_loan >= 1  # no result came through the thread
    expected = [n for n in range(1, 2 * COUNT + 1) if n != 3]
    assert [row[1] for row in rows(pg_database)] == expected


async def test_a_batch_that_must_go_alone_is_written_by_the_thread_after_the_lent_ones(
    store, pg_database
):
    extras = StoreExtras([], [], [(b"f", RetryPolicy(3, 1.0))])
    async with trio.open_nursery() as nursery:
        loan = Loan(store, nursery)
        try:
            await loan.lent()
            first = batch(jobs(1, COUNT))
            loan.hand_over(first)
            assert not loan.committer.may_hand_over(alone=True)  # behind the one in flight
            (written,) = await loan.results(1)
            alone = batch(jobs(COUNT + 1, 2), extras=extras)
            loan.hand_over(alone)  # the loan is given back for it
            assert not loan.committer._lent
            (written_alone,) = await loan.results(1)
            await loan.lent()  # lent again once the thread is idle
            last = batch(jobs(COUNT + 3, 1))
            loan.hand_over(last)
            (written_last,) = await loan.results(1)
        finally:
            loan.committer.wait_written()
            loan.committer.stop()
            nursery.cancel_scope.cancel()
    assert [written.batch, written_alone.batch, written_last.batch] == [first, alone, last]
    assert loan.by_thread == 1  # the one with extras
    assert [row[1] for row in rows(pg_database)] == list(range(1, COUNT + 4))
    with psycopg.connect(pg_database) as db:
        assert db.execute("SELECT retries FROM jobserver_policies").fetchall() == [(3,)]


async def test_fenced_lent_batches_are_written_again_by_the_thread_in_order(store, pg_database):
    store.apply(jobs(1, 3), [])
    fence(pg_database, "node-a", by="node-b")
    async with trio.open_nursery() as nursery:
        loan = Loan(store, nursery)
        try:
            await loan.lent()
            first, second = batch(jobs(4, COUNT)), batch(jobs(COUNT + 4, COUNT))
            loan.hand_over(first, second)
            written = await loan.results(2)
            await loan.lent()  # and lent again afterwards
            third = batch(jobs(2 * COUNT + 4, 1))
            loan.hand_over(third)
            written += await loan.results(1)
        finally:
            loan.committer.wait_written()
            loan.committer.stop()
            nursery.cancel_scope.cancel()
    assert [w.batch for w in written] == [first, second, third]
    assert all(not w.failed for w in written)
    assert [n.below for n in store.lease.news if isinstance(n, Fenced)] == [4]
    mine = [row[1] for row in rows(pg_database) if row[0] == "node-a"]
    assert mine == list(range(4, 2 * COUNT + 5))


async def test_a_lent_connection_killed_refuses_its_batches_then_the_store_serves_again(
    store, pg_database
):
    async with trio.open_nursery() as nursery:
        loan = Loan(store, nursery)
        try:
            await loan.lent()
            first, second = batch(jobs(1, COUNT)), batch(jobs(COUNT + 1, COUNT))
            # Holding the node row keeps both batches waiting for it: in flight when killed.
            with psycopg.connect(pg_database, autocommit=True) as admin, admin.transaction():
                admin.execute(LOCK_NODE_ROW)
                loan.hand_over(first, second)
                kill_node_a_connection(admin)
            refused = await loan.results(2)
            # The store's thread connects again (after its backoff) and lends it again.
            await loan.lent()
            third = batch(jobs(2 * COUNT + 1, COUNT))
            loan.hand_over(third)
            (written,) = await loan.results(1)
        finally:
            loan.committer.wait_written()
            loan.committer.stop()
            nursery.cancel_scope.cancel()
    assert [w.batch for w in refused] == [first, second]
    for w, sent in zip(refused, (first, second), strict=True):
        assert set(w.failed) == {j.record_id for j in sent.adds} and w.removes_failed
        assert "unreachable" in next(iter(w.failed.values()))
    assert written.batch is third and not written.failed
    assert [row[1] for row in rows(pg_database)] == [j.record_id for j in third.adds]


async def test_lent_batches_past_their_deadline_are_refused(store, pg_database, monkeypatch):
    monkeypatch.setattr(postgresql, "CALL_DEADLINE", 0.5)
    async with trio.open_nursery() as nursery:
        loan = Loan(store, nursery)
        try:
            await loan.lent()
            first = batch(jobs(1, COUNT))
            # The database "hangs": the node row held, the statement waits for it.
            with psycopg.connect(pg_database, autocommit=True) as admin, admin.transaction():
                admin.execute(LOCK_NODE_ROW)
                started = time.monotonic()
                loan.hand_over(first)
                (refused,) = await loan.results(1)
                waited = time.monotonic() - started
        finally:
            loan.committer.wait_written()
            loan.committer.stop()
            nursery.cancel_scope.cancel()
    assert refused.batch is first and set(refused.failed) == {j.record_id for j in first.adds}
    assert 0.5 <= waited < ANSWER_TIMEOUT
    # Cutting the connection does not stop the statement already in the database: it commits
    # once the row is free. A refused submit may so still be stored (and run): never the
    # reverse, an acknowledged one lost (commits.py, _refuse).


async def test_the_thread_takes_the_store_back_for_its_checks_under_load(store, pg_database):
    """Batches keep coming; the checks (lease renewal, takeovers) still run every
    check_interval, between lent batches, and nothing is lost or reordered."""
    checks = []
    check = store.check
    store.check = lambda: (checks.append(time.monotonic()), check())[1]  # counts real checks
    handed: list[Batch] = []
    written: list[Written] = []
    async with trio.open_nursery() as nursery:
        loan = Loan(store, nursery)
        try:
            await loan.lent()
            next_id = 1
            with trio.fail_after(ANSWER_TIMEOUT * 2):
                until = time.monotonic() + 3 * store.check_interval + 0.5
                while time.monotonic() < until:
                    while loan.committer.may_hand_over(False) and len(handed) - len(written) < 2:
                        handed.append(batch(jobs(next_id, 10)))
                        next_id += 10
                        loan.committer.hand_over(handed[-1])
                    written += await loan.results(1)
                written += await loan.results(len(handed) - len(written))
        finally:
            loan.committer.wait_written()
            loan.committer.stop()
            nursery.cancel_scope.cancel()
    assert len(checks) >= 3
    assert [w.batch for w in written] == handed
    assert all(not w.failed for w in written)
    assert loan.by_loan > len(checks)  # most went through the loan
    assert [row[1] for row in rows(pg_database)] == list(range(1, next_id))


def test_shutdown_takes_the_outcomes_of_lent_batches_without_trio(store, pg_database):
    """wait_written, at shutdown, when serve_loan no longer runs: the lent batches' outcomes
    are taken right there."""

    async def lend_and_send() -> tuple[Committer, list[Batch]]:
        async with trio.open_nursery() as nursery:
            loan = Loan(store, nursery)
            await loan.lent()
            sent = [batch(jobs(1, COUNT)), batch(jobs(COUNT + 1, COUNT))]
            loan.hand_over(*sent)
            nursery.cancel_scope.cancel()  # serve_loan stops, the batches still in flight
        return loan.committer, sent

    committer, sent = trio.run(lend_and_send)
    try:
        written = committer.wait_written()
    finally:
        committer.stop()
    assert [w.batch for w in written] == sent
    assert all(not w.failed for w in written)
    assert len(rows(pg_database)) == 2 * COUNT
