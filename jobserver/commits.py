"""Group commit: one thread of its own writes the journal's batches to the store, one at a time.

The serving thread hands a batch over and goes on serving; whatever is submitted meanwhile
gathers in the journal for the next batch (issue 4). When the store has written a batch, the
result waits here until the serving thread takes it, which it does after every batch of
requests it serves (`Server._flush`) and whenever `on_written` wakes it while it is idle.

Why not trio.to_thread: each call there costs about 0.1 ms of CPU (a thread-cache handoff,
thread renaming, outcome capture), and its result reaches the serving thread only at trio's
next scheduling round, behind whatever connections are runnable. At tens of thousands of
durable submits a second both show: a commit's result would wait longer than the commit took.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

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


class Written(NamedTuple):
    """What became of a batch: `failed` maps record ids that could not be stored to why;
    `seconds` is how long the store took (for the store-commit histogram, /metrics)."""

    batch: Batch
    failed: dict[int, str]
    removes_failed: bool
    seconds: float = 0.0


class Committer:
    def __init__(self, store: JobStore, on_written: Callable[[], None]) -> None:
        """`on_written` is called in the store's thread after each batch; it must only wake
        the serving thread (trio's run_sync_soon), never touch the engine."""
        self._store = store
        self._on_written = on_written
        self._condition = threading.Condition()
        self._next: Batch | None = None
        self._written: Written | None = None
        self._busy = False  # a batch is handed over and its result not yet taken
        self._stopping = False
        self._check_interval: float = getattr(store, "check_interval", CHECK_INTERVAL)
        self._thread = threading.Thread(target=self._run, name="jobserver-store", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy

    def hand_over(self, batch: Batch) -> None:
        assert not self._busy, "one batch at a time"
        with self._condition:
            self._busy = True
            self._next = batch
            self._condition.notify()

    def take_written(self) -> Written | None:
        """The written batch's result, once; None while it is being written (or if idle)."""
        written = self._written  # set by the store thread; an attribute read is atomic
        if written is None:
            return None
        with self._condition:
            self._written = None
            self._busy = False
        return written

    def wait_written(self) -> Written | None:
        """Block until the batch in flight (if any) is written; for shutdown only."""
        with self._condition:
            while self._busy and self._written is None:
                self._condition.wait()
        return self.take_written()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join()

    def _run(self) -> None:
        next_check = time.monotonic() + self._check_interval
        while True:
            with self._condition:
                if self._next is None and not self._stopping:
                    self._condition.wait(max(0.0, next_check - time.monotonic()))
                if self._next is None and self._stopping:
                    return
                batch, self._next = self._next, None
            if time.monotonic() >= next_check:
                self._check_store()
                next_check = time.monotonic() + self._check_interval
            if batch is None:
                continue
            started = time.monotonic()
            try:
                written = write(self._store, batch)
            except Exception as error:  # a bug of ours: refuse the batch, never hang on it
                log.exception("internal error writing a batch of %d records", len(batch.adds))
                reason = f"Job could not be stored: internal error: {error!r}"
                written = Written(batch, {r.record_id: reason for r in batch.adds}, True)
            written = written._replace(seconds=time.monotonic() - started)
            with self._condition:
                self._written = written
                self._condition.notify_all()
            try:
                self._on_written()
            except Exception:  # the serving thread is gone (shutting down); it polls anyway
                log.debug("could not wake the serving thread", exc_info=True)

    def _check_store(self) -> None:
        try:
            self._store.check()
        except Exception:  # a bug of ours: the next batch is written all the same
            log.exception("internal error checking the store")


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
