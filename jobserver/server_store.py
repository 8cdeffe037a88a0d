"""The server's side of the store: group commit, the commit pacer, the shared store's lease
watch, and the log of failed and dead jobs (a mixin of Server, server.py)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from .admin_text import listed
from .commits import Committer, write
from .engine import Engine
from .engine.counters import StoreCommits
from .ownership import WATCH_INTERVAL as OWNERSHIP_WATCH_INTERVAL
from .ownership import Ownership
from .store import JobStore

log = logging.getLogger("jobserver")  # as server.py: one logger for the server's lines

REMOVES_PER_COMMIT = 256
REMOVES_MAX_DELAY = 0.05
"""A batch holding only removes (jobs that finished) waits until it has REMOVES_PER_COMMIT of
them or is REMOVES_MAX_DELAY seconds old. Nobody waits for a remove, and a commit per finished
job would cost a sync each: draining a queue, the store would spend more than the jobs. The
price: if the server is killed meanwhile, those few jobs run again after the restart (at least
once, never lost). A batch with any add goes at once: its submitters wait for it."""

DEAD_SET_CHECK_INTERVAL = 60.0
"""Seconds between sweeps of the dead set for jobs past --dead-ttl (days, typically): a minute
late is nothing, and each sweep walks the whole set."""

MAX_LOGGED_ERROR = 500
"""Characters of a failed job's error text in a log line; the dead set keeps all of it."""

REMOVES_RETRY_DELAY = 0.5
"""Seconds between attempts to write removes the store refused (its database unreachable):
a store in its reconnect backoff refuses at once, and retrying at once would spin both
threads for as long as the outage lasts."""


class StoreDuties:
    """Server's work for its store; the attributes below are Server's."""

    engine: Engine | None
    store: JobStore | None
    store_commits: StoreCommits
    _committer: Committer | None
    _ownership: Ownership | None
    _commit_wakeup: trio.lowlevel.ParkingLot
    _removes_due: float | None
    _removes_failing: bool

    if TYPE_CHECKING:

        def _flush(self) -> None: ...

        async def _internal_error(self, where: str) -> None: ...

    def _advance_commits(self) -> None:
        """Group commit: report the batch the store has written (its replies go out), and hand
        it everything journalled since, as the next batch."""
        engine, committer = self.engine, self._committer
        assert engine is not None and engine.journal is not None and committer is not None
        while (written := committer.take_written()) is not None:
            engine.commit_finished(
                written.batch, failed=written.failed, removes_failed=written.removes_failed
            )
            self._removes_failing = written.removes_failed
            self.store_commits.record(
                written.seconds, bool(written.failed) or written.removes_failed
            )
        journal = engine.journal
        if not journal.has_work or not committer.may_hand_over(journal.has_extras):
            return
        if not journal.has_adds and (
            self._removes_failing or journal.removes_waiting < REMOVES_PER_COMMIT
        ):
            # Only finished jobs to forget: nobody waits on that, so let a few gather (or,
            # after a refusal, let the store recover).
            now = trio.current_time()
            if self._removes_due is None:
                delay = REMOVES_RETRY_DELAY if self._removes_failing else REMOVES_MAX_DELAY
                self._removes_due = now + delay
                self._commit_wakeup.unpark_all()  # so that the pacer sleeps until then
                return
            if now < self._removes_due:
                return
        self._removes_due = None
        committer.hand_over(journal.take_batch())

    async def _pace_commits(self) -> None:
        """Calls _flush when a batch has been written or removes are due and nothing else
        would (the server is idle)."""
        while True:
            due = math.inf if self._removes_due is None else self._removes_due
            with trio.move_on_at(due):
                await self._commit_wakeup.park()
            try:
                self._flush()
            except Exception:
                await self._internal_error("the commit pacer")

    def _take_commits(self) -> None:
        """The store's thread has written a batch: take its results and send their replies
        now, in trio's own callback, rather than a scheduling pass later in the pacer task."""
        try:
            self._flush()
        except Exception:
            self._commit_wakeup.unpark_all()  # the pacer retries, logs and pauses
            log.exception("internal error taking a written batch")

    def _final_commit(self) -> None:
        """At shutdown: report the batch in flight, then write what is journalled, so jobs
        finished just before do not run again at the next start."""
        engine, committer = self.engine, self._committer
        if engine is None or committer is None or engine.journal is None:
            return
        self._committer = None
        for written in committer.wait_written():
            engine.commit_finished(
                written.batch, failed=written.failed, removes_failed=written.removes_failed
            )
        committer.stop()
        if engine.journal.has_work:
            write(self.store, engine.journal.take_batch())  # type: ignore[arg-type]

    async def _watch_ownership(self) -> None:
        """A shared store's lease, for an idle server (ownership.py)."""
        ownership = self._ownership
        assert ownership is not None
        while True:
            await trio.sleep(OWNERSHIP_WATCH_INTERVAL)
            try:
                if ownership.check():
                    self._flush()
            except Exception:
                await self._internal_error("the lease watch")

    def _log_failures(self) -> None:
        engine = self.engine
        assert engine is not None
        for handle, function, attempts, retries, error, delay in engine.failure_log:
            # Escaped as in admin listings: a worker's text must not make log lines of its own.
            text = listed(error[:MAX_LOGGED_ERROR]).decode(errors="replace")
            if delay is None:
                log.warning(
                    "job %s (%s) failed %d time(s), no retry left: kept in the dead set: %s",
                    listed(handle).decode(errors="replace"),
                    listed(function).decode(errors="replace"),
                    attempts,
                    text,
                )
            else:
                log.info(
                    "job %s (%s) failed (attempt %d of %d): %s; next attempt in %.1f s",
                    listed(handle).decode(errors="replace"),
                    listed(function).decode(errors="replace"),
                    attempts,
                    retries + 1,
                    text,
                    delay,
                )
        engine.failure_log.clear()
        self._log_dead_dropped()

    def _log_dead_dropped(self) -> None:
        engine = self.engine
        assert engine is not None
        if engine.dead.dropped:
            log.warning(
                "dead set: dropped the %d oldest dead jobs (past --dead-ttl or over "
                "--dead-max); %d kept",
                engine.dead.dropped,
                len(engine.dead),
            )
            engine.dead.dropped = 0

    async def _tend_dead_set(self) -> None:
        """Drop dead jobs past --dead-ttl now and then, and log it. (Jobs dropped over
        --dead-max are logged as they die, with the failure that pushed them out.)"""
        engine = self.engine
        assert engine is not None
        while True:
            await trio.sleep(DEAD_SET_CHECK_INTERVAL)
            try:
                engine.expire_dead()
                self._log_dead_dropped()
                self._flush()
            except Exception:
                await self._internal_error("the dead-set task")
