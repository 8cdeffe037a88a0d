"""Group commit: one thread of its own writes the journal's batches to the store, one at a time.

The serving thread hands a batch over and goes on serving; whatever is submitted meanwhile
gathers in the journal for the next batch (issue 4). When the store has written a batch, the
result waits here until the serving thread takes it, which it does after every batch of
requests it serves (`Server._flush`) and whenever `on_written` wakes it while it is idle.

Why not trio.to_thread: each call there costs about 0.1 ms of CPU (a thread-cache handoff,
thread renaming, outcome capture), and its result reaches the serving thread only at trio's
next scheduling round, behind whatever connections are runnable. At tens of thousands of
durable submits a second both show: a commit's result would wait longer than the commit took.

A store that pipelines without blocking (PostgreSQL) is also lent to the serving thread while
its own thread is idle, so that batches go out and their results come back with no hand-over
between threads at all ("the loan", below); everything that may block stays on the thread.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import trio

from .commit_loan import RECLAIM_WAIT, StoreLoan
from .engine.journal import Batch
from .store import JobStore, StoreError

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0
"""Seconds between the store's checks (`JobStore.check`), between batches or while none
comes: a data file deleted while the server is idle is rewritten within about this long, not
only at the next submit, a disk that filled recovers without one, and a deleted lock file is
taken again. Each check is a stat or two: a second apart, not once per batch, because every
system call in this thread lets the serving thread take the GIL, and winning it back can
cost this thread a switch interval (5 ms) per call. A shared store renews its lease in its
check and says how often that must be (`check_interval`, see store/postgresql.py)."""


WAKEUP_DRAIN = 4096
"""Bytes read at a time from the wake-up socket (one byte per batch handed over)."""


class Written(NamedTuple):
    """What became of a batch: `failed` maps record ids that could not be stored to why;
    `seconds` is how long the store took (for the store-commit histogram, /metrics)."""

    batch: Batch
    failed: dict[int, str]
    removes_failed: bool
    seconds: float = 0.0


Outcome = bool | StoreError
"""What became of a pipelined batch: written (True), to be written again (False), or refused
with the connection it was in flight on."""


class Committer(StoreLoan):
    """The store's thread. One batch at a time; or, for a store that pipelines
    (`pipeline_depth` > 1, the PostgreSQL store), up to that many, sent back to back and
    answered in the order sent. Results are taken in the order the batches were handed over."""

    def __init__(
        self, store: JobStore, on_written: Callable[[], None], *, lend: bool = False
    ) -> None:
        """`on_written` is called in the store's thread after each batch; it must only wake
        the serving thread (trio's run_sync_soon), never touch the engine. `lend`: a
        pipelining store is lent to the serving thread while this thread is idle (see
        `serve_loan`, which the serving thread must then run)."""
        self._store = store
        self._on_written = on_written
        self._condition = threading.Condition()
        self._handed: collections.deque[Batch] = collections.deque()  # not yet sent
        self._results: collections.deque[Written] = collections.deque()
        self._stopping = False
        self._check_interval: float = getattr(store, "check_interval", CHECK_INTERVAL)
        self._depth: int = getattr(store, "pipeline_depth", 1)
        # The serving thread's own bookkeeping: batches handed over whose results it has not
        # taken, and whether one of them must be alone (see may_hand_over).
        self._outstanding = 0
        self._alone = False
        # The pipelined thread waits on the database's socket and on this one: a byte per
        # batch handed over (or stop). Both ends non-blocking: a full pair means a wake-up is
        # pending anyway, and the serving thread must never block on it.
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()
        self._wakeup_reader.setblocking(False)
        self._wakeup_writer.setblocking(False)
        # The loan (commit_loan.py): the store lent to the serving thread while this one idles.
        self.lends = lend and self._depth > 1
        self._loan_lock = threading.Lock()  # who holds the store; never held while blocking
        self._lent = False  # the serving thread holds the store
        self._want_back = False  # and is to give it back once its batches are in
        self._loaned: collections.deque[tuple[Batch, float]] = collections.deque()  # in flight
        self._returning: list[tuple[Batch, float, Outcome]] = []  # behind one to write again
        self._returned: collections.deque[tuple[Batch, float, Outcome]] = collections.deque()
        self._loan_wakeup = trio.lowlevel.ParkingLot()
        run = self._run if self._depth == 1 else self._run_pipelined
        self._thread = threading.Thread(target=run, name="jobserver-store", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a batch is handed over and its result not yet taken."""
        return self._outstanding > 0

    def may_hand_over(self, alone: bool) -> bool:
        """Whether another batch may be handed over now. A batch that changes the dead set or
        the policies goes `alone`, with nothing else in flight: the order of such changes
        across batches matters (a dead job recorded, then retried), and two batches in
        flight may be written again out of order after a failure."""
        if self._returning:  # a lent batch came back unwritten: the rest come back first
            return False
        if self._outstanding == 0:
            return True
        if self._loaned:
            return not alone and not self._want_back and len(self._loaned) < self._depth
        return not alone and not self._alone and self._outstanding < self._depth

    def hand_over(self, batch: Batch) -> None:
        self._outstanding += 1
        self._alone = self._alone or batch.extras is not None
        with self._loan_lock:
            if self._lent:
                if batch.extras is None and not self._want_back and self._send_on_loan(batch):
                    return
                self._end_loan()  # this one goes through the thread: nothing is in flight
            with self._condition:
                self._handed.append(batch)
                self._condition.notify()
        if self._depth > 1:
            self._wake()

    def take_written(self) -> Written | None:
        """The oldest result not yet taken; None while it is being written (or if idle)."""
        if not self._results:  # filled by the store thread; reading its length is atomic
            return None
        with self._condition:
            written = self._results.popleft()
        self._outstanding -= 1
        if not self._outstanding:
            self._alone = False
        return written

    def wait_written(self) -> list[Written]:
        """Block until every batch handed over is written; their results. For shutdown."""
        self._drain_loan()
        with self._condition:
            while len(self._results) < self._outstanding:
                self._condition.wait()
        taken = []
        while (written := self.take_written()) is not None:
            taken.append(written)
        return taken

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._wake()
        self._thread.join()
        self._wakeup_reader.close()
        self._wakeup_writer.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wakeup_writer.send(b"\0")

    def _post(self, written: Written, started: float) -> None:
        written = written._replace(seconds=time.monotonic() - started)
        with self._condition:
            self._results.append(written)
            self._condition.notify_all()

    def _post_written(self, batch: Batch, started: float) -> None:
        self._post(Written(batch, {}, False), started)

    def _written(self) -> None:
        try:
            self._on_written()
        except Exception:  # the serving thread is gone (shutting down); it polls anyway
            log.debug("could not wake the serving thread", exc_info=True)

    def _run(self) -> None:
        next_check = time.monotonic() + self._check_interval
        while True:
            with self._condition:
                if not self._handed and not self._stopping:
                    self._condition.wait(max(0.0, next_check - time.monotonic()))
                if not self._handed and self._stopping:
                    return
                batch = self._handed.popleft() if self._handed else None
            if time.monotonic() >= next_check:
                self._check_store()
                next_check = time.monotonic() + self._check_interval
            if batch is None:
                continue
            started = time.monotonic()
            self._post(_write_safely(self._store, batch), started)
            self._written()

    def _run_pipelined(self) -> None:
        """As _run, with up to `pipeline_depth` batches in flight (store/pg_pipeline.py).
        A batch that comes back unwritten (fenced, or its statement failed) is written again
        through `write`, as any batch, once the others in flight are back; the results after
        it wait for it, so they are still taken in order."""
        store: Any = self._store
        in_flight: collections.deque[tuple[Batch, float]] = collections.deque()
        held: list[tuple[Batch, float, Outcome]] = []  # come back, behind one to write again
        next_check = time.monotonic() + self._check_interval
        while True:
            self._drain_wakeups()
            now = time.monotonic()
            check_due = now >= next_check
            if self._lent and not self._reclaim(check_due):
                self._wait_readable(None, RECLAIM_WAIT if self._want_back else next_check - now)
                continue
            if self.lends:
                store.on_pipeline_closing = None  # the store is this thread's
            held.extend(self._take_returned())
            if not in_flight:
                if held:
                    for batch, started, outcome in held:
                        self._post(_settle(store, batch, outcome), started)
                    held.clear()
                    self._written()
                    continue
                if check_due:
                    self._check_store()
                    next_check = time.monotonic() + self._check_interval
                    continue
            try:
                if not check_due and not held:
                    self._send(store, in_flight)
                if in_flight:
                    self._await_outcomes(store, in_flight, held)
                    continue
            except Exception as error:  # a bug of ours: refuse what is in flight, never hang
                log.exception("internal error in the store's pipeline")
                self._refuse(in_flight, StoreError(store.abandon_pipeline(error), busy=True))
                continue
            with self._condition:
                if self._stopping and not self._handed:
                    break
            if not self._handed:
                if self.lends and self._lend(store):
                    continue
                self._wait_readable(None, next_check - now)
        store.end_pipeline()

    def _send(self, store: Any, in_flight: collections.deque[tuple[Batch, float]]) -> None:
        """Send handed-over batches while there is room in flight."""
        while len(in_flight) < self._depth:
            with self._condition:
                if not self._handed:
                    return
                batch = self._handed.popleft()
            started = time.monotonic()
            try:
                if store.send_batch(batch):
                    in_flight.append((batch, started))
                    continue
            except StoreError as failure:  # the connection is lost, with what was in flight
                self._refuse(in_flight, failure)
                self._post(_write_safely(store, batch), started)  # refused, or the store is back
                self._written()
                continue
            except Exception as error:  # a bug of ours: refuse this batch and those in flight
                log.exception("internal error sending a batch of %d records", len(batch.adds))
                failure = StoreError(store.abandon_pipeline(error))
                self._refuse(in_flight, failure)
                self._refuse(collections.deque([(batch, started)]), failure)
                continue
            if in_flight:  # it must go alone: after the others
                with self._condition:
                    self._handed.appendleft(batch)
                return
            self._post(_write_safely(store, batch), started)  # apply ends the pipeline first
            self._written()

    def _await_outcomes(
        self,
        store: Any,
        in_flight: collections.deque[tuple[Batch, float]],
        held: list[tuple[Batch, float, bool]],
    ) -> None:
        """Wait for the database, or a new batch, or the oldest batch's deadline; post what
        came back."""
        deadline = store.oldest_deadline
        if not self._wait_readable(store.pipeline_fileno, deadline - time.monotonic()):
            if time.monotonic() >= deadline:
                failure = StoreError(store.abandon_pipeline(), busy=True)
                self._refuse(in_flight, failure)
            return
        try:
            outcomes = store.receive_batches()
        except StoreError as failure:
            self._refuse(in_flight, failure)
            return
        posted = False
        for written in outcomes:
            batch, started = in_flight.popleft()
            if written and not held:
                self._post(Written(batch, {}, False), started)
                posted = True
            else:
                held.append((batch, started, written))
        if posted:
            self._written()

    def _refuse(
        self, in_flight: collections.deque[tuple[Batch, float]], failure: StoreError
    ) -> None:
        """The connection was lost with these batches in flight: none is acknowledged (a
        commit whose answer was lost may have happened; the submitters are told it did not,
        as when a single batch's connection is lost)."""
        if not in_flight:
            return
        log.error("%s; %d batches in flight refused", failure, len(in_flight))
        while in_flight:
            batch, started = in_flight.popleft()
            self._post(_refused(batch, failure), started)
        self._written()

    def _wait_readable(self, fileno: int | None, timeout: float) -> bool:
        """Wait for a wake-up (a batch handed over, stop) or for `fileno`; True if `fileno`
        is readable."""
        watched = [self._wakeup_reader] if fileno is None else [self._wakeup_reader, fileno]
        readable, _, _ = select.select(watched, [], [], max(0.0, timeout))
        return fileno is not None and fileno in readable

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wakeup_reader.recv(WAKEUP_DRAIN):
                pass

    def _check_store(self) -> None:
        try:
            self._store.check()
        except Exception:  # a bug of ours: the next batch is written all the same
            log.exception("internal error checking the store")


def _refused(batch: Batch, failure: StoreError) -> Written:
    """A batch none of whose records was stored; its removes are written again later."""
    reason = f"Job could not be stored: {failure}"
    return Written(batch, {record.record_id: reason for record in batch.adds}, True)


def _settle(store: JobStore, batch: Batch, outcome: Outcome) -> Written:
    """The result of a batch that came back from the pipeline: written, to write again (the
    statement failed or was fenced: `write` deals with both), or refused (lost with the
    connection)."""
    if isinstance(outcome, StoreError):
        return _refused(batch, outcome)
    return Written(batch, {}, False) if outcome else _write_safely(store, batch)


def _write_safely(store: JobStore, batch: Batch) -> Written:
    try:
        return write(store, batch)
    except Exception as error:  # a bug of ours: refuse the batch, never hang on it
        log.exception("internal error writing a batch of %d records", len(batch.adds))
        reason = f"Job could not be stored: internal error: {error!r}"
        return Written(batch, {r.record_id: reason for r in batch.adds}, True)


def write(store: JobStore, batch: Batch) -> Written:
    """Write a batch; if the store refuses it, each record in its own transaction, so one that
    cannot be stored (too big for the disk left) does not take the others' submits down with
    it. Then the removes; if they fail, the engine puts them in the next batch. A database
    locked by someone else refuses the whole batch at once: each record would wait out the
    lock timeout again; a full disk refuses the batch's records at once (the store refuses
    each until space is back) and writes its removes, which is what frees space."""
    try:
        store.apply(batch.adds, batch.removes, batch.extras)
    except StoreError as failure:
        reason = f"Job could not be stored: {failure}"
        refused = {record.record_id: reason for record in batch.adds}
        if failure.busy:  # another process holds the lock: one by one would wait again each
            log.error("%s; %d submits refused, removes kept for later", failure, len(batch.adds))
            return Written(batch, refused, True)
        if failure.removes_written:
            log.error("%s; %d submits refused", failure, len(batch.adds))
            # Dead jobs refused with the submits (a full disk) are written again later: the
            # job they record is already gone from the queue. Writing one twice is harmless.
            return Written(batch, refused, bool(batch.extras and batch.extras.dead_adds))
        if failure.low_space:
            log.error("%s; %d submits refused", failure, len(batch.adds))
            return Written(batch, refused, not _write_removes(store, batch))
        log.error("%s; retrying the %d records one by one", failure, len(batch.adds))
    else:
        return Written(batch, {}, False)
    failed: dict[int, str] = {}
    for record in batch.adds:
        try:
            store.apply([record], [])
        except StoreError as failure:
            failed[record.record_id] = f"Job could not be stored: {failure}"
    if failed:
        log.error("%d submits refused: they could not be stored", len(failed))
    return Written(batch, failed, not _write_removes(store, batch))


def _write_removes(store: JobStore, batch: Batch) -> bool:
    """Whether the removes (and the dead-set and policy changes) are written; if not, the
    engine puts them in the next batch."""
    removes = batch.removes
    if not removes and batch.extras is None:
        return True
    try:
        store.apply([], removes, batch.extras)
    except StoreError as failure:
        if failure.removes_written:
            return True
        log.error("%s; %d removes will be retried", failure, len(removes))
        return False
    return True
