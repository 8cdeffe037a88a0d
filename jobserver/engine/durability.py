"""Durable background jobs: what the store reports back to the engine (commit outcomes) and
the jobs it loads at start. The records themselves are collected in journal.py.

Part of `Engine` (a mixin), like workers.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from ..protocol import PacketType as T
from ..protocol import encode
from .job import Job, JobState, Priority
from .journal import Batch, StoredJob

if TYPE_CHECKING:
    from .function import Function
    from .journal import Journal


class DurableJobs:
    """The store-facing half of `Engine`; see the module docstring."""

    # Provided by Engine.
    journal: Journal | None
    _function: Callable[[bytes], Function]
    _forget_if_unused: Callable[[Function], None]
    _activate: Callable[[Job], None]
    _unindex: Callable[[Job], None]
    _abandon: Callable[[Job], None]
    _create_job: Callable[..., Job]

    def commit_finished(
        self,
        batch: Batch,
        error: str | None = None,
        *,
        failed: Mapping[int, str] | None = None,
        removes_failed: bool = False,
    ) -> None:
        """The store committed `batch`, or could not: `error` for the whole batch, or `failed`
        (record id -> why) for single records. Replies waiting for it go out: JOB_CREATED, or
        ERROR QUEUE_ERROR for a job that was not stored (nothing was acknowledged; the
        submitter may retry). Removes that were not committed go into the next batch."""
        journal = self.journal
        assert journal is not None
        journal.decided_end = batch.end
        refused: dict[int, bytes] = {}
        if error is not None or failed:
            for job, record in zip(batch.jobs, batch.adds, strict=True):
                problem = error or (failed.get(record.record_id) if failed else None)
                if problem is not None:
                    refused[record.record_id] = encode(
                        T.ERROR, b"QUEUE_ERROR", problem.encode(errors="replace")
                    )
                    self._not_stored(job)
        pending, activate = JobState.PENDING, self._activate
        for job in batch.jobs:
            if job.state is pending:  # committed (a refused one is GONE by now)
                job.function.pending -= 1
                activate(job)
        # Each holding peer once, after all of the batch's outcomes are known: a client that
        # pipelined hundreds of submits gets their replies in one pass.
        holding = journal.holding
        if refused:
            for peer in holding:
                peer.refuse(refused)
        for peer in list(holding):
            if peer.release(batch.end):
                del holding[peer]
        if error is not None or removes_failed:
            journal.retry_removes(batch.removes)

    def _not_stored(self, job: Job) -> None:
        if job.state == JobState.GONE:
            return  # finished meanwhile; its remove is harmless
        job.record_id = 0
        if job.state == JobState.PENDING:
            # Nobody was told of it: it never existed. Coalesced listeners got ERROR instead.
            job.function.pending -= 1
            self._unindex(job)
            if job.listeners:
                for listener in job.listeners:
                    listener.listening.discard(job)
                job.listeners = None
            job.state = JobState.GONE
            self._forget_if_unused(job.function)
        else:
            # A foreground job a background submit tried to take over: it stays foreground.
            job.background = False
            if not job.listeners:
                self._abandon(job)

    def restore(self, stored_jobs: Iterable[StoredJob], next_record_id: int = 1) -> int:
        """Load the store's jobs at start, before any connection: fresh handles, runnable at
        once or at their epoch time, coalescing on their unique ids as before. New records
        get ids from `next_record_id` up (the store may know of ids above the jobs' own).
        Returns the count."""
        journal = self.journal
        assert journal is not None
        journal.next_record_id = max(journal.next_record_id, next_record_id)
        count = 0
        for stored in stored_jobs:
            job = self._create_job(
                self._function(stored.function),
                stored.unique,
                stored.payload,
                Priority(stored.priority),
                True,
                stored.reducer,
                stored.run_at,
            )
            job.record_id = stored.record_id
            journal.next_record_id = max(journal.next_record_id, stored.record_id + 1)
            count += 1
        journal.decided_end = journal.next_record_id  # every record loaded is committed
        return count
