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
    """A durable job as the store keeps it. A job waiting for another attempt after failing
    (failures.py) also keeps how many attempts failed, when the first did (unix ms), and why
    the last did; run_at is then when the next attempt is due."""

    record_id: int
    function: bytes
    unique: bytes
    priority: int
    run_at: int
    reducer: bytes
    payload: bytes
    attempts: int = 0
    first_failed_ms: int = 0
    last_error: bytes = b""


class DeadJob(NamedTuple):
    """A background job that failed every attempt its retry policy allowed (failures.py):
    kept, durably, until it is retried, purged, or dropped for age or room."""

    dead_id: int  # the store's key: ours count up from 1, a dead peer's adopted ones are negative
    handle: bytes  # the job's last handle: what `retry dead job` names
    function: bytes
    unique: bytes
    priority: int
    reducer: bytes
    payload: bytes
    attempts: int
    first_failed_ms: int  # unix milliseconds
    last_failed_ms: int
    error: bytes  # WORK_EXCEPTION's data, or b"failed", b"worker lost", b"timed out"


class RetryPolicy(NamedTuple):
    """How often a failed background job of a function is tried again, and how soon."""

    retries: int  # attempts after the first; 0: none (the job goes to the dead set)
    base_delay: float  # seconds before the first retry; doubled for each one after


class StoreExtras(NamedTuple):
    """Changes besides job records, committed in the same transaction as the batch's."""

    dead_adds: list[DeadJob]
    dead_removes: list[int]  # dead ids
    policies: list[tuple[bytes, RetryPolicy | None]]  # per function; None: back to default


class Batch(NamedTuple):
    jobs: list[Job]  # jobs whose records this batch adds
    adds: list[StoredJob]
    removes: list[int]  # record ids; applied after the adds of the same batch
    end: int  # one past the last record id it adds: once it is written, ids below are decided
    extras: StoreExtras | None = None  # dead set and policy changes, if any


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

    __slots__ = (
        "_adds",
        "_extras",
        "_jobs",
        "_removes",
        "decided_end",
        "holding",
        "next_record_id",
    )

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._adds: list[StoredJob] = []
        self._removes: list[int] = []
        self._extras: StoreExtras | None = None
        self.next_record_id = 1
        self.decided_end = 1
        # Peers with replies held for a commit, released after each one.
        self.holding: dict[Peer, None] = {}

    @property
    def has_work(self) -> bool:
        return bool(self._adds or self._removes or self._extras)

    @property
    def has_adds(self) -> bool:
        """Whether a record (or a dead-set or policy change) waits to be written: a reply or
        an admin command's effect waits on it, so its batch goes at once."""
        return bool(self._adds or self._extras)

    @property
    def has_extras(self) -> bool:
        """Whether a dead-set or policy change waits to be written."""
        return self._extras is not None

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
                    0,  # attempts: a new job has failed none
                    0,
                    b"",
                ),
            )
        )
        return record_id

    def add_retry(self, job: Job, attempts: int, first_failed_ms: int, last_error: bytes) -> int:
        """Record `job` anew as waiting for its next attempt (at job.run_at): its failures so
        far survive a restart. The caller removes its previous record."""
        job.record_id = record_id = self.next_record_id
        self.next_record_id = record_id + 1
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
                attempts,
                first_failed_ms,
                last_error,
            )
        )
        return record_id

    def _extras_for_change(self) -> StoreExtras:
        if self._extras is None:
            self._extras = StoreExtras([], [], [])
        return self._extras

    def add_dead(self, dead: DeadJob) -> None:
        self._extras_for_change().dead_adds.append(dead)

    def remove_dead(self, dead_id: int) -> None:
        self._extras_for_change().dead_removes.append(dead_id)

    def set_policy(self, function: bytes, policy: RetryPolicy | None) -> None:
        self._extras_for_change().policies.append((function, policy))

    def in_flight(self, job: Job) -> bool:
        """Whether the job's record is written but its commit not finished."""
        return job.record_id >= self.decided_end

    def remove(self, record_id: int) -> None:
        self._removes.append(record_id)

    def take_batch(self) -> Batch:
        batch = Batch(self._jobs, self._adds, self._removes, self.next_record_id, self._extras)
        self._jobs, self._adds, self._removes = [], [], []
        self._extras = None
        return batch

    def retry_removes(self, removes: list[int], extras: StoreExtras | None = None) -> None:
        """A failed commit's removes go into the next batch: a finished job must not come back.
        So do its dead-set and policy changes, which nobody waits for either: an operator's
        purge or a job's death is written once the store can."""
        self._removes[:0] = removes
        if extras is not None:
            mine = self._extras_for_change()
            mine.dead_adds[:0] = extras.dead_adds
            mine.dead_removes[:0] = extras.dead_removes
            mine.policies[:0] = extras.policies
