"""Durable background jobs: what the store reports back to the engine (commit outcomes) and
the jobs it loads at start. The records themselves are collected in journal.py.

With a store shared by a cluster (postgresql), a server owns its durable jobs only while its
lease holds, so four more operations: hold them while the lease is in doubt, release them when
it is renewed, drop the ones a peer has taken over, and adopt the jobs of a dead peer.

Part of `Engine` (a mixin), like workers.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from ..protocol import PacketType as T
from ..protocol import encode
from .job import Job, JobState, Priority
from .journal import Batch, DeadJob, StoredJob

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
    _find_duplicate: Callable[[bytes, bytes, bytes], Job | None]
    _notify: Callable[[Job, bytes], None]
    _detach_listeners: Callable[[Job], None]
    jobs: dict[bytes, Job]
    _failures: dict[Job, tuple[int, int, bytes]]
    _reviving: dict[Job, DeadJob]
    _revived: Callable[..., None]
    durable_on_hold: bool
    _on_hold: list[Job]

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
                    self._not_stored(job, record.record_id)
        pending, activate = JobState.PENDING, self._activate
        for job in batch.jobs:
            if job.state is pending:  # committed (a refused one is GONE by now)
                job.function.pending -= 1
                activate(job)
        if self._reviving:
            for job in batch.jobs:
                if job in self._reviving:
                    self._revived(job, stored=bool(job.record_id))
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
            journal.retry_removes(batch.removes, batch.extras)

    def _not_stored(self, job: Job, record_id: int) -> None:
        if job.state == JobState.GONE:
            return  # finished meanwhile; its remove is harmless
        if job.record_id != record_id:
            return  # a newer record of it (a later retry's) stands
        job.record_id = 0
        if job in self._failures:
            return  # a failed job's record for its next attempt: it waits on, in memory only
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
            self._queue_stored(stored)
            journal.next_record_id = max(journal.next_record_id, stored.record_id + 1)
            count += 1
        journal.decided_end = journal.next_record_id  # every record loaded is committed
        return count

    def _queue_stored(self, stored: StoredJob) -> None:
        """A stored job (loaded at start, or adopted): a fresh handle, its record, the failed
        attempts it had (failures.py), and runnable now or at its time (held while on hold)."""
        job = self._create_job(
            self._function(stored.function),
            stored.unique,
            stored.payload,
            Priority(stored.priority),
            True,
            stored.reducer,
            stored.run_at,
            True,  # pending: activated below, once it has its record
        )
        job.record_id = stored.record_id
        if stored.attempts:
            self._failures[job] = (stored.attempts, stored.first_failed_ms, stored.last_error)
        job.function.pending -= 1
        self._activate(job)

    # ------------------------------------------------------------------ a shared store's lease

    def hold_durable(self) -> int:
        """The lease was not renewed in time, so a peer may soon take these jobs over: keep every
        queued durable job (and every one that becomes runnable) out of workers' reach until
        `release_held` or `drop_durable`. Held jobs stay known: GET_STATUS answers for them,
        submits coalesce onto them, `status` counts them as queued. Returns how many."""
        self.durable_on_hold = True
        queued = JobState.QUEUED
        jobs = [job for job in self.jobs.values() if job.record_id and job.state is queued]
        jobs.sort(key=_queue_order)  # released in the order they were queued
        for job in jobs:
            job.function.forget_queued(job)
            self._hold(job)
        return len(jobs)

    def _hold(self, job: Job) -> None:
        job.state = JobState.HELD  # not runnable, counted as queued; a stale queue entry
        job.function.pending += 1
        self._on_hold.append(job)

    def release_held(self) -> int:
        """The lease was renewed under the same term: the held jobs are still ours. They go back
        to their queues in the order they were held. Returns how many."""
        self.durable_on_hold = False
        held, self._on_hold = self._on_hold, []
        count = 0
        for job in held:
            if job.state is JobState.HELD:  # not cancelled or dropped meanwhile
                job.function.pending -= 1
                self._activate(job)
                count += 1
        return count

    def drop_durable(self, below: int) -> int:
        """Every record with an id below `below` (adopted ones, with negative ids, included)
        now belongs to another server, which runs its job: forget those jobs here without
        writing their removes. Foreground clients waiting on one get WORK_FAIL. A running one
        finishes here (at least once: it may run twice); given back by its worker, it is
        requeued only for its foreground clients, never as durable. Returns how many."""
        running = (JobState.RUNNING, JobState.DETACHED)
        count = 0
        for job in list(self.jobs.values()):
            record_id = job.record_id
            if not record_id or record_id >= below:
                continue
            count += 1
            job.record_id = 0  # no remove: the record is not ours to delete
            if job.state in running:
                job.background = False
                continue
            if job.listeners:
                self._notify(job, encode(T.WORK_FAIL, job.handle))
            self._detach_listeners(job)
            self._unindex(job)
            function = job.function
            if job.state is JobState.QUEUED:
                function.forget_queued(job)
            elif job.state is JobState.WAITING:
                function.waiting -= 1  # its epoch-heap entry is skipped once it is not WAITING
            elif job.state is JobState.HELD:
                function.pending -= 1
            job.state = JobState.GONE
            self._forget_if_unused(function)
        return count

    def adopt(self, stored_jobs: Iterable[StoredJob]) -> int:
        """Jobs taken over from a dead peer (their records are ours now, with ids the store
        chose: negative, so they never meet the journal's). Queued like restored jobs, with
        fresh handles. A job whose (function, unique) is already known here is the same job
        submitted to both servers: the known job stands for both, taking the record if it had
        none, else the adopted record is removed. Returns how many new jobs were queued."""
        journal = self.journal
        assert journal is not None
        count = 0
        for stored in stored_jobs:
            known = self._find_duplicate(stored.function, stored.unique, stored.payload)
            if known is not None:
                if known.record_id:
                    journal.remove(stored.record_id)
                else:
                    known.record_id = stored.record_id
                    known.background = True
                    if self.durable_on_hold and known.state is JobState.QUEUED:
                        known.function.forget_queued(known)
                        self._hold(known)
                continue
            self._queue_stored(stored)
            count += 1
        return count


def _queue_order(job: Job) -> int:
    return job.sequence
