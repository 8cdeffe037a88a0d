"""The loan (commits.py): a pipelining store (PostgreSQL) lent to the serving thread while the
store's own thread is idle, a mixin of Committer.

Through the store's thread, a batch's replies waited for two hand-overs between threads (0.2
and 0.3 ms on average, often a millisecond under load): the PostgreSQL store's submits ran at
0.47x the memory store's, 0.51-0.59x without them (bench/RESULTS.md). So while that thread has
nothing to do, it lends the store, connected and in pipeline mode, to the serving thread,
which sends batches itself without ever blocking (libpq copies them to its buffer and writes a
socket; what it cannot write waits for the socket in trio), and a trio task (`serve_loan`)
takes their outcomes. Everything that may block stays on the store's thread: connecting, the
checks (the loan is asked back when one is due), batches that must go alone or be written
again, refusals. Only one thread uses the store at a time, and the batches of one never
overtake the other's: the serving thread hands nothing to the thread while batches of its own
are in flight, and what comes back unwritten is settled by the thread before anything newer.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .engine.journal import Batch
from .store import JobStore, StoreError

if TYPE_CHECKING:
    from .commits import Outcome

log = logging.getLogger("jobserver.commits")  # one logger for the group commit's lines

RECLAIM_WAIT = 0.1
"""Seconds the store's thread waits at most, between looks, for the serving thread to give
the lent store back (it is woken when that happens; this only bounds a missed wake-up)."""


class StoreLoan:
    """Committer's loan; the attributes below are Committer's."""

    _store: JobStore
    _condition: threading.Condition
    _handed: collections.deque[Batch]
    _stopping: bool
    _depth: int
    lends: bool
    _loan_lock: threading.Lock
    _lent: bool
    _want_back: bool
    _loaned: collections.deque[tuple[Batch, float]]
    _returning: list[tuple[Batch, float, Outcome]]
    _returned: collections.deque[tuple[Batch, float, Outcome]]
    _loan_wakeup: trio.lowlevel.ParkingLot

    if TYPE_CHECKING:

        def _post_written(self, batch: Batch, started: float) -> None: ...

        def _wake(self) -> None: ...

    async def serve_loan(self, on_written: Callable[[], None]) -> None:
        """Runs in the serving thread's nursery when the committer `lends`: takes the
        outcomes of the batches sent on loan and posts their results, then calls
        `on_written` (here, in trio: no wake-up from another thread)."""
        while True:
            if not self._loaned:
                await self._loan_wakeup.park()
                continue
            try:
                outcomes = await self._await_loaned()
            except trio.ClosedResourceError:  # closed by a send that failed: settled there
                continue
            except StoreError as failure:
                with self._loan_lock:
                    self._lose_loan(failure)
                continue
            except Exception as error:  # a bug of ours: refuse what is in flight, never hang
                log.exception("internal error in the lent pipeline")
                failure = StoreError(self._store.abandon_pipeline(error), busy=True)  # type: ignore[attr-defined]
                with self._loan_lock:
                    self._lose_loan(failure)
                continue
            if self._take_outcomes(outcomes):
                on_written()

    async def _await_loaned(self) -> list[bool]:
        """The outcomes of lent batches that have come back (maybe none yet); raises
        StoreError when the connection fails or the oldest is overdue."""
        store: Any = self._store
        with trio.move_on_after(max(0.0, store.oldest_deadline - time.monotonic())):
            while store.pipeline_unsent:  # the socket was full when it was sent
                await trio.lowlevel.wait_writable(store.pipeline_fileno)
                store.flush_pipeline()
            await trio.lowlevel.wait_readable(store.pipeline_fileno)
            return list(store.receive_batches())
        raise StoreError(store.abandon_pipeline(), busy=True)

    def _take_outcomes(self, outcomes: list[bool]) -> bool:
        """Post the results of lent batches written, in order; one that was not is returned
        to the store's thread to write again, with every one after it. True if any was
        posted. Gives the store back once nothing is in flight, if it is asked back or a
        batch must be written again."""
        posted = False
        for written in outcomes:
            batch, started = self._loaned.popleft()
            if written and not self._returning:
                self._post_written(batch, started)
                posted = True
            else:
                self._returning.append((batch, started, written))
        with self._loan_lock:
            if self._lent and not self._loaned and (self._returning or self._want_back):
                self._end_loan()
        return posted

    def _send_on_loan(self, batch: Batch) -> bool:
        """Send `batch` on the lent store (the loan lock held); False if it must go through
        the thread, which is only when nothing is in flight."""
        store: Any = self._store
        started = time.monotonic()
        try:
            sent = store.send_batch(batch, wait=False)
        except StoreError as failure:  # the connection is lost, with what was in flight
            self._lose_loan(failure, (batch, started))
            return True
        except Exception as error:  # a bug of ours: refuse it and what is in flight
            log.exception("internal error sending a batch of %d records", len(batch.adds))
            self._lose_loan(StoreError(store.abandon_pipeline(error), busy=True), (batch, started))
            return True
        if not sent:  # this node may write no more (the thread's `apply` says why)
            if not self._loaned:
                return False
            self._returning.append((batch, started, False))
            return True
        self._loaned.append((batch, started))
        self._loan_wakeup.unpark_all()
        return True

    def _lose_loan(self, failure: StoreError, *also: tuple[Batch, float]) -> None:
        """The lent connection is lost with these batches in flight (the loan lock held):
        none is acknowledged; the store goes back to its thread, which posts the refusals
        in order behind any batch returned before."""
        lost = [*self._loaned, *also]
        log.error("%s; %d batches in flight refused", failure, len(lost))
        self._loaned.clear()
        self._returning.extend((batch, started, failure) for batch, started in lost)
        self._end_loan()

    def _end_loan(self) -> None:
        """Give the store back to its thread (the loan lock held, nothing in flight), with
        the batches it is to settle first."""
        self._lent = self._want_back = False
        returning, self._returning = self._returning, []
        with self._condition:
            self._returned.extend(returning)
            self._condition.notify()
        self._wake()

    def _drain_loan(self) -> None:
        """At shutdown, when trio no longer runs `serve_loan`: wait here for the lent
        batches' outcomes, then give the store back."""
        store: Any = self._store
        while self._loaned:
            try:
                timeout = max(0.0, store.oldest_deadline - time.monotonic())
                unsent = store.pipeline_unsent
                fileno = [store.pipeline_fileno]
                ready = select.select(
                    [] if unsent else fileno, fileno if unsent else [], [], timeout
                )
                if not ready[0] and not ready[1]:
                    raise StoreError(store.abandon_pipeline(), busy=True)
                if unsent:
                    store.flush_pipeline()
                    continue
                self._take_outcomes(store.receive_batches())
            except StoreError as failure:
                with self._loan_lock:
                    self._lose_loan(failure)
        with self._loan_lock:
            if self._lent:
                self._end_loan()

    def _lend(self, store: Any) -> bool:
        """Lend the idle store to the serving thread, connected and in pipeline mode (the
        connecting done here); False if it cannot be (the database is unreachable)."""
        if not store.prepare_pipeline():
            return False
        with self._loan_lock:
            with self._condition:
                if self._handed or self._returned or self._stopping:
                    return False
            store.on_pipeline_closing = notify_closing
            self._lent = True
        return True

    def _reclaim(self, check_due: bool) -> bool:
        """Whether the store is this thread's again. It is asked back when a check is due or
        the server stops, and given back once the batches sent on loan are in."""
        with self._loan_lock:
            if not self._lent:
                return True
            if not (check_due or self._stopping):
                return False
            if self._loaned:
                self._want_back = True
                return False
            self._lent = self._want_back = False
            return True

    def _take_returned(self) -> list[tuple[Batch, float, Outcome]]:
        """Batches the loan gave back to settle, oldest first."""
        if not self._returned:
            return []
        with self._condition:
            returned = list(self._returned)
            self._returned.clear()
        return returned


def notify_closing(fileno: int) -> None:
    """Tell trio a socket it may be waiting on is about to close (the lent pipeline's): the
    wait ends with ClosedResourceError. Outside trio (at shutdown) nothing waits on it."""
    with contextlib.suppress(RuntimeError):
        trio.lowlevel.notify_closing(fileno)
