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


class Batch(NamedTuple):
    jobs: list[Job]  # jobs whose records this batch adds
    adds: list[StoredJob]
    removes: list[int]  # record ids; applied after the adds of the same batch
    end: int  # one past the last record id it adds: once it is written, ids below are decided


_stored_job = tuple.__new__
"""Builds a StoredJob from a tuple in C; calling the class runs a Python-level constructor,
which costs more than the rest of journalling a job."""


class Journal:
    """Records to write, and which replies wait for them.

    A reply that waits for a record is held in its peer's output as (record id, reply) (see
    Peer.defer); the record's batch decides it. When a batch is refused, its records' held
    replies are replaced by the refusal where they wait (Peer.refuse). `decided_end` says how
    far commits have got: a held reply whose record id is below it goes out (Peer.release)
    once everything before it on its connection has.
    """

    __slots__ = ("_adds", "_jobs", "_removes", "decided_end", "holding", "next_record_id")

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._adds: list[StoredJob] = []
        self._removes: list[int] = []
        self.next_record_id = 1
        self.decided_end = 1
        # Peers with replies held for a commit, released after each one.
        self.holding: dict[Peer, None] = {}

    @property
    def has_work(self) -> bool:
        return bool(self._adds or self._removes)

    @property
    def has_adds(self) -> bool:
        """Whether a record waits to be written (and with it, a reply)."""
        return bool(self._adds)

    @property
    def removes_waiting(self) -> int:
        return len(self._removes)

    def add(self, job: Job) -> int:
        """Record `job`; returns its record id, which the replies acknowledging it wait on.

        The record is captured now: if the job ends before its batch is taken, its remove
        (made with this same record id) follows the add and the two cancel out."""
        job.record_id = record_id = self.next_record_id
        self.next_record_id = record_id + 1
        self._jobs.append(job)
        self._adds.append(
            _stored_job(
                StoredJob,
                (
                    record_id,
                    job.function.name,
                    job.unique,
                    job.priority,  # an IntEnum: an int to msgpack and to comparisons
                    job.run_at,
                    job.reducer,
                    job.payload,
                ),
            )
        )
        return record_id

    def in_flight(self, job: Job) -> bool:
        """Whether the job's record is written but its commit not finished."""
        return job.record_id >= self.decided_end

    def remove(self, record_id: int) -> None:
        self._removes.append(record_id)

    def take_batch(self) -> Batch:
        batch = Batch(self._jobs, self._adds, self._removes, self.next_record_id)
        self._jobs, self._adds, self._removes = [], [], []
        return batch

    def retry_removes(self, removes: list[int]) -> None:
        """A failed commit's removes go into the next batch: a finished job must not come back."""
        self._removes[:0] = removes
