"""What the store must record, and the replies waiting for it: durable background jobs.

A background submit is acknowledged (JOB_CREATED) only once its job is committed to the store
(issue: acknowledged means durable). The engine stays pure: it writes adds and removes here,
and the I/O layer takes them in batches (`take_batch`), commits each batch while the server
goes on serving, and reports back with `Engine.commit_finished`. Everything submitted while a
commit is in flight goes into the next batch together: group commit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .job import Job
    from .peer import Peer


class StoredJob(NamedTuple):
    """A durable job as the store keeps it."""

    record_id: int
    function: bytes
    unique: bytes
    priority: int
    run_at: int
    reducer: bytes
    payload: bytes


class PendingAck:
    """One reply that waits for a commit: JOB_CREATED on success, ERROR on failure."""

    __slots__ = ("peer", "reply")

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.reply: bytes | None = None


class Batch(NamedTuple):
    jobs: list[Job]  # jobs whose records this batch adds
    adds: list[StoredJob]
    removes: list[int]  # record ids; applied after the adds of the same batch


class Journal:
    __slots__ = ("_adds", "_jobs", "_removes", "next_record_id", "waiting")

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._adds: list[StoredJob] = []
        self._removes: list[int] = []
        # Jobs whose record is written but not yet committed -> the replies waiting for it.
        self.waiting: dict[Job, list[PendingAck]] = {}
        self.next_record_id = 1

    @property
    def has_work(self) -> bool:
        return bool(self._adds or self._removes)

    def add(self, job: Job, ack: PendingAck) -> None:
        """Record `job`, and hold `ack` until the record is committed.

        The record is captured now: if the job ends before its batch is taken, its remove
        (made with this same record id) follows the add and the two cancel out."""
        job.record_id = record_id = self.next_record_id
        self.next_record_id += 1
        self._jobs.append(job)
        self._adds.append(
            StoredJob(
                record_id,
                job.function.name,
                job.unique,
                int(job.priority),
                job.run_at,
                job.reducer,
                job.payload,
            )
        )
        self.waiting[job] = [ack]

    def wait_for(self, job: Job, ack: PendingAck) -> None:
        """Hold another reply until the (already journalled) job's record is committed."""
        self.waiting[job].append(ack)

    def remove(self, record_id: int) -> None:
        self._removes.append(record_id)

    def take_batch(self) -> Batch:
        batch = Batch(self._jobs, self._adds, self._removes)
        self._jobs, self._adds, self._removes = [], [], []
        return batch

    def retry_removes(self, removes: list[int]) -> None:
        """A failed commit's removes go into the next batch: a finished job must not come back."""
        self._removes[:0] = removes
