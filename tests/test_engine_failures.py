"""Failed background jobs (issue 13): retries with backoff, then the dead set, without sockets.

A background job whose run ends in WORK_FAIL or WORK_EXCEPTION counts a failed attempt. While
its function's policy allows another, it waits `retry_delay` (base * 2^(n-1) * U(1, 1.5), at
most an hour) and is queued again, keeping its handle and unique; then it goes to the dead set
with its last error. With retries at 0 (the default) a failed run goes straight to the dead
set, and a lost worker's job is requeued at once as gearmand does (bounded by --job-retries).
Foreground jobs are unchanged. These tests drive the engine with fake clocks and a seeded
random generator, and play the store's commit loop by hand as test_store_engine.py does.
"""

from __future__ import annotations

import math
import random

import pytest
from engine_helpers import (
    START_TIME,
    advance,
    commit,
    connect,
    durable_engine,
    get_status,
    grab,
    grab_handle,
    new_engine,
    packet,
    replies,
    reply,
    send,
    submit,
    worker,
)

from jobserver.engine import Engine, Job, JobState, Peer
from jobserver.engine.failures import RETRY_DELAY_CAP, retry_delay
from jobserver.engine.journal import Batch, DeadJob, RetryPolicy, StoredJob
from jobserver.protocol import PacketType as T

SEED = 13
BASE = 5.0  # the default --bg-retry-delay
START_MS = int(START_TIME * 1000)
UNKNOWN = (b"0", b"0", b"0", b"0")
KNOWN_NOT_RUNNING = (b"1", b"0", b"0", b"0")


def delays(base: float, attempts: int) -> list[float]:
    """The waits an engine built with rng=random.Random(SEED) draws for its first failures."""
    rng = random.Random(SEED)
    return [retry_delay(base, attempt, rng) for attempt in range(1, attempts + 1)]


def failing_engine(**options) -> Engine:
    options.setdefault("rng", random.Random(SEED))
    return new_engine(**options)


def failing_durable_engine(**options) -> Engine:
    options.setdefault("rng", random.Random(SEED))
    return durable_engine(**options)


def submit_bg(
    engine: Engine,
    client: Peer,
    unique: bytes = b"u",
    data: bytes = b"x",
    function: bytes = b"fn",
    kind: int = T.SUBMIT_JOB_BG,
) -> bytes:
    return submit(engine, client, function, unique, data, kind)


def run_and_fail(engine: Engine, w: Peer, handle: bytes, kind: int = T.WORK_FAIL, *args) -> None:
    """The worker is handed `handle` and reports it failed."""
    assert grab_handle(engine, w) == handle
    send(engine, w, kind, handle, *args)
    assert replies(w) == []


def only_dead(engine: Engine) -> DeadJob:
    (dead,) = list(engine.dead)
    return dead


def now_ms(engine: Engine) -> int:
    return int(engine.wall_clock() * 1000)


def job(engine: Engine, handle: bytes) -> Job:
    return engine.jobs[handle]


# --- retry_delay ------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("base", [0.5, 5.0])
def test_retry_delay_doubles_per_attempt_with_a_jitter_of_one_to_one_and_a_half(base, attempt):
    rng = random.Random(SEED)
    low = base * 2 ** (attempt - 1)
    for _ in range(200):
        assert low <= retry_delay(base, attempt, rng) <= low * 1.5


def test_retry_delay_draws_spread_jobs_that_fail_together():
    rng = random.Random(SEED)
    draws = {retry_delay(BASE, 1, rng) for _ in range(50)}
    assert len(draws) == 50
    assert min(draws) < BASE * 1.1 and max(draws) > BASE * 1.4


def test_retry_delay_is_reproducible_with_a_seeded_generator():
    assert delays(BASE, 4) == delays(BASE, 4)


@pytest.mark.parametrize("attempt", [12, 13, 64, 65, 10_000])
def test_retry_delay_is_capped_at_an_hour(attempt):
    rng = random.Random(SEED)
    for _ in range(20):
        delay = retry_delay(BASE, attempt, rng)
        assert delay == RETRY_DELAY_CAP
        assert math.isfinite(delay)


def test_retry_delay_just_below_the_cap_is_not_capped():
    # 5 * 2^9 = 2560 s: at most 3840 with jitter, so some draws are capped and some not.
    rng = random.Random(SEED)
    draws = [retry_delay(BASE, 10, rng) for _ in range(200)]
    assert all(2560 <= delay <= RETRY_DELAY_CAP for delay in draws)
    assert any(delay < RETRY_DELAY_CAP for delay in draws)
    assert any(delay == RETRY_DELAY_CAP for delay in draws)


# --- retries of a failed background job -------------------------------------------------------


def test_a_failed_background_job_waits_its_delay_and_is_then_handed_out_again():
    engine = failing_engine(bg_retries=2)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    run_and_fail(engine, w, handle)
    (first_delay,) = delays(BASE, 1)

    assert grab(engine, w) == packet(T.NO_JOB)
    assert engine.failure_of(job(engine, handle)) == (1, START_MS, b"failed")
    assert job(engine, handle).state == JobState.WAITING
    advance(engine, first_delay - 0.01)
    assert grab(engine, w) == packet(T.NO_JOB)
    advance(engine, 0.01)
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"fn", b"x")
    assert replies(client) == []  # a background client hears nothing of it


def test_a_sleeping_worker_is_woken_when_a_retry_comes_due():
    engine = failing_engine(bg_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    run_and_fail(engine, w, handle)
    send(engine, w, T.PRE_SLEEP)
    assert replies(w) == []
    advance(engine, delays(BASE, 1)[0])
    assert replies(w) == [packet(T.NOOP)]
    assert grab_handle(engine, w) == handle


def test_the_third_failure_with_two_retries_puts_the_job_in_the_dead_set():
    engine = failing_engine(bg_retries=2)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client, b"u", b"payload", kind=T.SUBMIT_JOB_HIGH_BG)
    first, second = delays(BASE, 2)

    run_and_fail(engine, w, handle)
    advance(engine, first)
    run_and_fail(engine, w, handle)
    assert grab(engine, w) == packet(T.NO_JOB)
    assert engine.failure_of(job(engine, handle)) == (2, START_MS, b"failed")
    advance(engine, second)
    run_and_fail(engine, w, handle)

    assert only_dead(engine) == DeadJob(
        1, handle, b"fn", b"u", 0, b"", b"payload", 3, START_MS, now_ms(engine), b"failed"
    )
    assert now_ms(engine) > START_MS
    assert handle not in engine.jobs
    assert get_status(engine, client, handle) == UNKNOWN
    advance(engine, RETRY_DELAY_CAP)
    assert grab(engine, w) == packet(T.NO_JOB)


def test_failures_are_logged_with_their_delay_or_none_when_the_job_died():
    engine = failing_engine(bg_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    run_and_fail(engine, w, handle)
    (first,) = delays(BASE, 1)
    advance(engine, first)
    run_and_fail(engine, w, handle, T.WORK_EXCEPTION, b"boom")
    assert engine.failure_log == [
        (handle, b"fn", 1, 1, b"failed", first),
        (handle, b"fn", 2, 1, b"boom", None),
    ]


def test_get_status_knows_a_job_waiting_for_its_retry_with_its_progress_reset():
    engine = failing_engine(bg_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_STATUS, handle, b"1", b"2")
    assert get_status(engine, client, handle) == (b"1", b"1", b"1", b"2")
    send(engine, w, T.WORK_FAIL, handle)
    assert get_status(engine, client, handle) == KNOWN_NOT_RUNNING
    send(engine, client, T.GET_STATUS_UNIQUE, b"u")
    assert reply(client) == packet(T.STATUS_RES_UNIQUE, b"u", b"1", b"0", b"0", b"0", b"0")


def test_submits_with_the_same_unique_coalesce_onto_the_job_waiting_for_its_retry():
    engine = failing_engine(bg_retries=1)
    client, fg_client, w = connect(engine), connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    run_and_fail(engine, w, handle)

    assert submit_bg(engine, client) == handle
    assert submit(engine, fg_client, b"fn", b"u", b"x") == handle
    assert len(engine.jobs) == 1
    advance(engine, delays(BASE, 1)[0])
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"done")
    assert replies(fg_client) == [packet(T.WORK_COMPLETE, handle, b"done")]
    assert not engine.jobs and not engine.dead


def test_a_retried_job_that_completes_is_forgotten_with_its_failures():
    engine = failing_engine(bg_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    run_and_fail(engine, w, handle)
    failed_job = job(engine, handle)
    advance(engine, delays(BASE, 1)[0])
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    assert engine.failure_of(failed_job) is None
    assert not engine.jobs and not engine.dead


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"boom", b"boom"),
        (b"line one\nline\ttwo\0", b"line one\nline\ttwo\0"),
        (b"", b"exception"),
    ],
)
def test_work_exception_data_becomes_the_error_text(data, error):
    engine = failing_engine(bg_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    run_and_fail(engine, w, handle, T.WORK_EXCEPTION, data)
    assert engine.failure_of(job(engine, handle)) == (1, START_MS, error)
    advance(engine, delays(BASE, 1)[0])
    run_and_fail(engine, w, handle, T.WORK_EXCEPTION, data)
    assert only_dead(engine).error == error


@pytest.mark.parametrize("kind", [T.WORK_FAIL, T.WORK_EXCEPTION])
def test_a_foreground_job_failure_is_unchanged(kind):
    engine = failing_engine(bg_retries=2)
    client, w = connect(engine), worker(engine, "fn")
    send(engine, client, T.OPTION_REQ, b"exceptions")
    replies(client)
    handle = submit(engine, client, b"fn", b"u", b"x")
    args = (b"boom",) if kind == T.WORK_EXCEPTION else ()
    run_and_fail(engine, w, handle, kind, *args)
    assert replies(client) == [packet(kind, handle, *args)]
    assert not engine.jobs and not engine.dead and engine.failure_log == []
    advance(engine, RETRY_DELAY_CAP)
    assert grab(engine, w) == packet(T.NO_JOB)


@pytest.mark.parametrize("exceptions", [False, True])
def test_a_foreground_client_coalesced_onto_a_background_job_is_told_once_and_detached(
    exceptions,
):
    engine = failing_engine(bg_retries=1)
    client, fg_client, w = connect(engine), connect(engine), worker(engine, "fn")
    if exceptions:
        send(engine, fg_client, T.OPTION_REQ, b"exceptions")
        replies(fg_client)
    handle = submit_bg(engine, client)
    assert submit(engine, fg_client, b"fn", b"u", b"x") == handle

    run_and_fail(engine, w, handle, T.WORK_EXCEPTION, b"boom")
    told = packet(T.WORK_EXCEPTION, handle, b"boom") if exceptions else packet(T.WORK_FAIL, handle)
    assert replies(fg_client) == [told]
    assert not fg_client.listening
    assert job(engine, handle).state == JobState.WAITING  # the job still retries

    advance(engine, delays(BASE, 1)[0])
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_DATA, handle, b"more")
    send(engine, w, T.WORK_COMPLETE, handle, b"done")
    assert replies(fg_client) == []


def test_a_foreground_client_coalesced_onto_a_background_job_that_dies_gets_work_fail_once():
    engine = failing_engine()  # no retries: dead at the first failure
    client, fg_client, w = connect(engine), connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    assert submit(engine, fg_client, b"fn", b"u", b"x") == handle
    run_and_fail(engine, w, handle)
    assert replies(fg_client) == [packet(T.WORK_FAIL, handle)]
    assert only_dead(engine).handle == handle


def test_cancelling_a_job_waiting_for_its_retry_forgets_it():
    engine = failing_engine(bg_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    run_and_fail(engine, w, handle)
    failed_job = job(engine, handle)
    assert engine.cancel_job(handle)
    assert engine.functions[b"fn"].waiting == 0
    assert engine.failure_of(failed_job) is None
    advance(engine, RETRY_DELAY_CAP)
    assert grab(engine, w) == packet(T.NO_JOB)
    assert not engine.dead


def test_a_function_policy_overrides_the_default_for_that_function_only():
    engine = failing_engine(bg_retries=0)
    engine.set_retry_policy(b"retried", RetryPolicy(1, 0.5))
    client, w = connect(engine), worker(engine, "retried", "plain")
    retried = submit_bg(engine, client, b"a", function=b"retried")
    plain = submit_bg(engine, client, b"b", function=b"plain")
    run_and_fail(engine, w, retried)
    run_and_fail(engine, w, plain)
    assert only_dead(engine).handle == plain
    assert job(engine, retried).state == JobState.WAITING
    (first,) = delays(0.5, 1)
    assert 0.5 <= first <= 0.75
    advance(engine, first)
    assert grab_handle(engine, w) == retried


def test_a_job_given_back_by_cant_do_does_not_use_up_a_retry():
    """CANT_DO and RESET_ABILITIES give a job back; only failed runs, lost workers and timeouts
    count failed attempts (failures.py's module docstring)."""
    engine = failing_engine(bg_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    assert grab_handle(engine, w) == handle
    send(engine, w, T.CANT_DO, b"fn")
    send(engine, w, T.CAN_DO, b"fn")
    run_and_fail(engine, w, handle)  # the first failed attempt: one retry is left
    assert not engine.dead
    assert job(engine, handle).state == JobState.WAITING


# --- retries 0 (the default), lost workers and timeouts ----------------------------------------


@pytest.mark.parametrize("kind", [T.SUBMIT_JOB_BG, T.SUBMIT_JOB_LOW_BG])
def test_with_no_retries_a_failed_background_job_goes_to_the_dead_set_at_once(kind):
    engine = failing_engine()
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client, b"u", b"data", kind=kind)
    advance(engine, 7)
    run_and_fail(engine, w, handle)
    failed_at = now_ms(engine)
    priority = 2 if kind == T.SUBMIT_JOB_LOW_BG else 1
    assert only_dead(engine) == DeadJob(
        1, handle, b"fn", b"u", priority, b"", b"data", 1, failed_at, failed_at, b"failed"
    )
    assert not engine.jobs
    assert b"fn" in engine.functions  # its worker is still registered


def test_a_function_nobody_registers_is_forgotten_when_its_only_job_dies():
    engine = failing_engine(job_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    assert grab_handle(engine, w) == handle
    engine.disconnect(w)
    assert only_dead(engine).handle == handle
    assert b"fn" not in engine.functions


def test_a_lost_worker_s_background_job_is_requeued_at_once_without_retries():
    engine = failing_engine()
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    assert grab_handle(engine, w) == handle
    engine.disconnect(w)
    assert job(engine, handle).state == JobState.QUEUED
    assert engine.failure_of(job(engine, handle)) is None
    assert grab_handle(engine, worker(engine, "fn")) == handle
    assert not engine.dead


def test_with_job_retries_a_background_job_goes_to_the_dead_set_after_the_last_lost_worker():
    engine = failing_engine(job_retries=2)
    client = connect(engine)
    handle = submit_bg(engine, client)
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    engine.disconnect(w)
    assert job(engine, handle).state == JobState.QUEUED  # requeued at once
    advance(engine, 3)
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    engine.disconnect(w)

    dead = only_dead(engine)
    assert (dead.handle, dead.attempts, dead.error) == (handle, 2, b"worker lost")
    assert dead.last_failed_ms == now_ms(engine)
    assert handle not in engine.jobs


def test_with_job_retries_a_foreground_job_still_just_fails():
    engine = failing_engine(job_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit(engine, client, b"fn", b"u", b"x")
    assert grab_handle(engine, w) == handle
    engine.disconnect(w)
    assert replies(client) == [packet(T.WORK_FAIL, handle)]
    assert not engine.jobs and not engine.dead


def test_with_a_function_policy_a_lost_worker_counts_an_attempt_with_backoff():
    engine = failing_engine()
    engine.set_retry_policy(b"fn", RetryPolicy(1, 2.0))
    client = connect(engine)
    handle = submit_bg(engine, client)
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    engine.disconnect(w)

    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.NO_JOB)
    assert engine.failure_of(job(engine, handle)) == (1, START_MS, b"worker lost")
    advance(engine, delays(2.0, 1)[0])
    assert grab_handle(engine, w) == handle
    engine.disconnect(w)
    dead = only_dead(engine)
    assert (dead.attempts, dead.first_failed_ms, dead.error) == (2, START_MS, b"worker lost")


def test_a_foreground_client_waits_through_a_lost_worker_and_gets_work_fail_when_it_dies():
    engine = failing_engine()
    engine.set_retry_policy(b"fn", RetryPolicy(1, 2.0))
    client, fg_client = connect(engine), connect(engine)
    handle = submit_bg(engine, client)
    assert submit(engine, fg_client, b"fn", b"u", b"x") == handle
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    engine.disconnect(w)
    assert replies(fg_client) == []  # still waiting for the next attempt
    advance(engine, delays(2.0, 1)[0])
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    engine.disconnect(w)
    assert replies(fg_client) == [packet(T.WORK_FAIL, handle)]
    assert not fg_client.listening


def timeout_worker(engine: Engine) -> Peer:
    w = connect(engine)
    send(engine, w, T.CAN_DO_TIMEOUT, b"fn", b"1000")
    assert replies(w) == []
    return w


def test_can_do_timeout_expiry_with_a_policy_counts_an_attempt_timed_out():
    engine = failing_engine()
    engine.set_retry_policy(b"fn", RetryPolicy(1, 2.0))
    client, w = connect(engine), timeout_worker(engine)
    handle = submit_bg(engine, client)
    assert grab_handle(engine, w) == handle
    advance(engine, 1.0)
    assert not w.held
    assert engine.failure_of(job(engine, handle)) == (1, START_MS + 1000, b"timed out")
    assert job(engine, handle).state == JobState.WAITING
    send(engine, w, T.WORK_COMPLETE, handle, b"late")  # the job is no longer this worker's
    assert reply(w).type == T.ERROR

    advance(engine, delays(2.0, 1)[0])
    assert grab_handle(engine, w) == handle
    advance(engine, 1.0)
    dead = only_dead(engine)
    assert (dead.attempts, dead.error) == (2, b"timed out")


def test_can_do_timeout_expiry_past_job_retries_puts_a_background_job_in_the_dead_set():
    engine = failing_engine(job_retries=1)
    client, w = connect(engine), timeout_worker(engine)
    handle = submit_bg(engine, client)
    assert grab_handle(engine, w) == handle
    advance(engine, 1.0)
    dead = only_dead(engine)
    assert (dead.handle, dead.attempts, dead.error) == (handle, 1, b"timed out")


# --- durable retries ---------------------------------------------------------------------------


class StoreMirror:
    """What a store holds after applying the committed batches: record ids and dead ids."""

    def __init__(self) -> None:
        self.records: set[int] = set()
        self.dead: set[int] = set()

    def commit(self, engine: Engine, error: str | None = None) -> Batch:
        batch = commit(engine, error)
        if error is None:
            self.records |= {stored.record_id for stored in batch.adds}
            self.records -= set(batch.removes)
            if batch.extras is not None:
                self.dead |= {dead.dead_id for dead in batch.extras.dead_adds}
                self.dead -= set(batch.extras.dead_removes)
        return batch


def durable_job(engine: Engine, client: Peer, unique: bytes = b"u", data: bytes = b"x"):
    """A committed background job; returns (handle, record id)."""
    send(engine, client, T.SUBMIT_JOB_BG, b"fn", unique, data)
    batch = commit(engine)
    (created,) = replies(client)
    return created.args[0], batch.adds[0].record_id


def test_a_retry_replaces_the_job_s_record_with_one_holding_its_failures():
    engine = failing_durable_engine(bg_retries=2)
    client, w = connect(engine), worker(engine, "fn")
    handle, record_id = durable_job(engine, client, b"u", b"payload")
    run_and_fail(engine, w, handle, T.WORK_EXCEPTION, b"boom")
    (first,) = delays(BASE, 1)

    batch = commit(engine)
    assert batch.removes == [record_id]
    (added,) = batch.adds
    assert added == StoredJob(
        added.record_id,
        b"fn",
        b"u",
        1,
        math.ceil(START_TIME + first),
        b"",
        b"payload",
        1,
        START_MS,
        b"boom",
    )
    assert added.record_id > record_id
    assert job(engine, handle).record_id == added.record_id
    assert batch.extras is None
    assert job(engine, handle).state == JobState.WAITING  # committing it queues nothing

    advance(engine, first)
    run_and_fail(engine, w, handle)
    second_batch = commit(engine)
    assert second_batch.removes == [added.record_id]
    assert second_batch.adds[0].attempts == 2
    assert second_batch.adds[0].first_failed_ms == START_MS  # the first failure's time
    assert second_batch.adds[0].last_error == b"failed"


def test_a_dead_job_s_record_is_removed_and_its_dead_record_added_in_one_batch():
    engine = failing_durable_engine()
    client, w = connect(engine), worker(engine, "fn")
    handle, record_id = durable_job(engine, client)
    run_and_fail(engine, w, handle)
    batch = commit(engine)
    assert batch.adds == [] and batch.removes == [record_id]
    assert batch.extras is not None
    assert batch.extras.dead_adds == [only_dead(engine)]
    assert batch.extras.dead_removes == [] and batch.extras.policies == []


def test_dead_set_changes_alone_make_the_journal_commit_at_once():
    engine = failing_durable_engine()
    engine.set_retry_policy(b"fn", RetryPolicy(2, 1.0))
    assert engine.journal.has_adds and engine.journal.has_work
    batch = commit(engine)
    assert batch.extras.policies == [(b"fn", RetryPolicy(2, 1.0))]
    assert not engine.journal.has_work


def test_a_refused_commit_s_dead_set_changes_go_into_the_next_batch():
    engine = failing_durable_engine()
    client, w = connect(engine), worker(engine, "fn")
    handle, record_id = durable_job(engine, client)
    run_and_fail(engine, w, handle)
    commit(engine, error="disk full")
    engine.set_retry_policy(b"fn", None)
    batch = commit(engine)
    assert batch.removes == [record_id]
    assert batch.extras.dead_adds == [only_dead(engine)]
    assert batch.extras.policies == [(b"fn", None)]


def stored_failed(record_id, attempts, *, run_at=0, unique=b"u", error=b"boom"):
    return StoredJob(
        record_id, b"fn", unique, 1, run_at, b"", b"x", attempts, START_MS - 60_000, error
    )


def test_a_restored_job_that_had_failed_keeps_counting_its_attempts():
    engine = failing_durable_engine(bg_retries=2)
    assert engine.restore([stored_failed(7, 2)]) == 1
    (restored,) = engine.jobs.values()
    assert engine.failure_of(restored) == (2, START_MS - 60_000, b"boom")
    w = worker(engine, "fn")
    run_and_fail(engine, w, restored.handle)
    dead = only_dead(engine)
    assert (dead.attempts, dead.first_failed_ms, dead.error) == (3, START_MS - 60_000, b"failed")
    assert commit(engine).removes == [7]


def test_a_restored_job_with_attempts_left_retries_with_the_next_delay():
    engine = failing_durable_engine(bg_retries=2)
    engine.restore([stored_failed(7, 1)])
    (restored,) = engine.jobs.values()
    w = worker(engine, "fn")
    run_and_fail(engine, w, restored.handle)
    assert not engine.dead
    # The second failed attempt waits base * 2 (with jitter), not base.
    rng = random.Random(SEED)
    second = retry_delay(BASE, 2, rng)
    (added,) = commit(engine).adds
    assert (added.attempts, added.run_at) == (2, math.ceil(START_TIME + second))
    assert added.first_failed_ms == START_MS - 60_000


def test_a_restored_job_waiting_for_its_retry_waits_until_its_time():
    engine = failing_durable_engine(bg_retries=2)
    engine.restore([stored_failed(7, 1, run_at=int(START_TIME) + 30)])
    (restored,) = engine.jobs.values()
    assert restored.state == JobState.WAITING
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.NO_JOB)
    advance(engine, 30)
    assert grab_handle(engine, w) == restored.handle


def test_an_adopted_job_that_had_failed_keeps_counting_its_attempts():
    engine = failing_durable_engine(bg_retries=1)
    assert engine.adopt([stored_failed(-3, 1)]) == 1
    (adopted,) = engine.jobs.values()
    w = worker(engine, "fn")
    run_and_fail(engine, w, adopted.handle)
    dead = only_dead(engine)
    assert (dead.attempts, dead.first_failed_ms) == (2, START_MS - 60_000)


def test_a_refused_retry_record_keeps_the_job_waiting_in_memory():
    engine = failing_durable_engine(bg_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle, record_id = durable_job(engine, client)
    run_and_fail(engine, w, handle)

    commit(engine, error="disk full")
    waiting = job(engine, handle)
    assert waiting.state == JobState.WAITING and waiting.record_id == 0
    assert get_status(engine, client, handle) == KNOWN_NOT_RUNNING
    assert engine.failure_of(waiting) == (1, START_MS, b"failed")
    assert commit(engine).removes == [record_id]  # the old record goes all the same

    advance(engine, delays(BASE, 1)[0])
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    assert not engine.jobs
    batch = commit(engine)
    assert batch.adds == [] and batch.removes == []


def test_a_retry_record_refused_after_the_job_failed_again_does_not_orphan_the_newer_one():
    """A store outage holds a retry record's commit while the job comes due, runs and fails
    again: the refusal of the older record must not make the job forget its newer one, or the
    newer record is never removed and the finished job comes back at the next start."""
    engine = failing_durable_engine(bg_retries=3, bg_retry_delay=1.0)
    store = StoreMirror()
    client, w = connect(engine), worker(engine, "fn")
    send(engine, client, T.SUBMIT_JOB_BG, b"fn", b"u", b"x")
    store.commit(engine)
    handle = reply(client).args[0]
    first, second, _ = delays(1.0, 3)
    run_and_fail(engine, w, handle)
    older = engine.journal.take_batch()  # in flight
    advance(engine, first)
    run_and_fail(engine, w, handle)
    newer = engine.journal.take_batch()  # in flight too
    engine.commit_finished(older, "store unreachable")
    store.commit(engine)  # the older batch's removes, retried
    engine.commit_finished(newer)
    store.records |= {stored.record_id for stored in newer.adds}
    store.records -= set(newer.removes)

    advance(engine, second)
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    store.commit(engine)
    assert store.records == set()  # the completed job does not come back at the next start


# --- dead set bounds ---------------------------------------------------------------------------


def test_the_dead_set_drops_its_oldest_past_dead_max_and_journals_the_drops():
    engine = failing_durable_engine(dead_max=3)
    client, w = connect(engine), worker(engine, "fn")
    for unique in (b"a", b"b", b"c", b"d", b"e"):
        send(engine, client, T.SUBMIT_JOB_BG, b"fn", unique, b"x")
    commit(engine)
    handles = [created.args[0] for created in replies(client)]
    for handle in handles:
        run_and_fail(engine, w, handle)
    assert [dead.handle for dead in engine.dead] == handles[2:]
    assert engine.dead.dropped == 2
    extras = commit(engine).extras
    assert [dead.dead_id for dead in extras.dead_adds] == [1, 2, 3, 4, 5]
    assert extras.dead_removes == [1, 2]  # applied after the adds, as record removes are


def test_expire_dead_drops_dead_jobs_by_their_last_failure():
    engine = failing_durable_engine(dead_ttl=100.0)
    client, w = connect(engine), worker(engine, "fn")
    old = durable_job(engine, client, b"old")[0]
    run_and_fail(engine, w, old)
    advance(engine, 60)
    new = durable_job(engine, client, b"new")[0]
    run_and_fail(engine, w, new)
    commit(engine)

    advance(engine, 40)  # exactly the ttl since the old one's failure: kept
    engine.expire_dead()
    assert len(engine.dead) == 2 and not engine.journal.has_work
    advance(engine, 0.001)
    engine.expire_dead()
    assert [dead.handle for dead in engine.dead] == [new]
    assert engine.dead.dropped == 1
    assert commit(engine).extras.dead_removes == [1]
    advance(engine, 60)
    engine.expire_dead()
    assert not engine.dead and engine.dead.dropped == 2


def test_expire_dead_uses_the_last_failure_not_the_first():
    engine = failing_engine(bg_retries=1, dead_ttl=100.0)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    run_and_fail(engine, w, handle)
    advance(engine, 90)
    run_and_fail(engine, w, handle)
    advance(engine, 50)  # 140 s after the first failure, 50 after the last
    engine.expire_dead()
    assert only_dead(engine).handle == handle


# --- retry_dead and purge_dead -----------------------------------------------------------------


def dead_jobs(engine: Engine, *specs: tuple[bytes, bytes]) -> list[bytes]:
    """A dead job per (function, unique), payload `data-<unique>`, HIGH priority; returns their
    handles. Works on memory engines only (durable ones need commits)."""
    client, w = connect(engine), worker(engine, *{function for function, _ in specs})
    handles = []
    for function, unique in specs:
        handle = submit(engine, client, function, unique, b"data-" + unique, T.SUBMIT_JOB_HIGH_BG)
        run_and_fail(engine, w, handle)
        handles.append(handle)
    engine.disconnect(w)
    return handles


def live_uniques(engine: Engine) -> list[bytes]:
    return sorted(live.unique for live in engine.iter_jobs())


def test_retry_dead_by_handle_queues_a_new_job_with_its_attempts_reset():
    engine = failing_engine()
    (handle,) = dead_jobs(engine, (b"fn", b"u"))
    engine.set_retry_policy(b"fn", RetryPolicy(1, BASE))

    assert engine.retry_dead(handle=handle) == 1
    assert not engine.dead
    (revived,) = engine.iter_jobs()
    assert revived.handle != handle
    assert (revived.unique, revived.payload, int(revived.priority)) == (b"u", b"data-u", 0)
    assert revived.background and revived.state == JobState.QUEUED
    assert revived.retries == 0 and engine.failure_of(revived) is None

    w = worker(engine, "fn")
    assert grab(engine, w, T.GRAB_JOB_UNIQ) == packet(
        T.JOB_ASSIGN_UNIQ, revived.handle, b"fn", b"u", b"data-u"
    )
    send(engine, w, T.WORK_FAIL, revived.handle)
    assert not engine.dead  # a full set of attempts again
    assert engine.failure_of(revived)[2] == b"failed"


def test_retry_dead_of_an_unknown_handle_does_nothing():
    engine = failing_engine()
    dead_jobs(engine, (b"fn", b"u"))
    assert engine.retry_dead(handle=b"H:test:999") == 0
    assert len(engine.dead) == 1 and not engine.jobs


def test_retry_dead_by_function_reruns_only_that_function_s_jobs():
    engine = failing_engine()
    dead_jobs(engine, (b"f", b"a"), (b"g", b"b"), (b"f", b"c"))
    assert engine.retry_dead(function=b"f") == 2
    assert live_uniques(engine) == [b"a", b"c"]
    assert [dead.unique for dead in engine.dead] == [b"b"]
    assert engine.retry_dead(function=b"nothing") == 0


def test_retry_dead_of_all_reruns_every_dead_job():
    engine = failing_engine()
    dead_jobs(engine, (b"f", b"a"), (b"g", b"b"))
    assert engine.retry_dead() == 2
    assert live_uniques(engine) == [b"a", b"b"]
    assert not engine.dead
    assert engine.retry_dead() == 0


def test_a_dead_job_whose_unique_is_live_again_is_just_removed():
    engine = failing_engine()
    (handle,) = dead_jobs(engine, (b"fn", b"u"))
    client = connect(engine)
    live = submit_bg(engine, client, b"u", b"resubmitted")
    assert engine.retry_dead(handle=handle) == 1
    assert not engine.dead
    assert list(engine.jobs) == [live]


def test_a_durable_retry_dead_removes_the_dead_record_only_once_the_new_job_is_committed():
    engine = failing_durable_engine()
    client, w = connect(engine), worker(engine, "fn")
    handle, _ = durable_job(engine, client, b"u", b"payload")
    run_and_fail(engine, w, handle)
    dead = only_dead(engine)
    commit(engine)

    assert engine.retry_dead(handle=handle) == 1
    (revived,) = engine.iter_jobs()
    assert revived.state == JobState.PENDING
    assert grab(engine, w) == packet(T.NO_JOB)  # not runnable before its record is committed
    batch = commit(engine)
    (added,) = batch.adds
    assert (added.unique, added.payload, added.attempts) == (b"u", b"payload", 0)
    assert batch.extras is None  # the dead record is still there while the add is in doubt

    assert commit(engine).extras.dead_removes == [dead.dead_id]
    assert grab_handle(engine, w) == revived.handle


def test_a_refused_durable_retry_dead_puts_the_dead_job_back():
    engine = failing_durable_engine()
    client, w = connect(engine), worker(engine, "fn")
    handle, _ = durable_job(engine, client)
    run_and_fail(engine, w, handle)
    dead = only_dead(engine)
    commit(engine)

    assert engine.retry_dead() == 1
    commit(engine, error="disk full")
    assert only_dead(engine) == dead
    assert engine.dead.find(handle) == dead
    assert not engine.jobs
    assert not engine.journal.has_work  # the dead record was never removed


def test_a_refused_durable_retry_dead_put_back_into_a_full_set_journals_what_it_drops():
    engine = failing_durable_engine(dead_max=2)
    store = StoreMirror()
    client, w = connect(engine), worker(engine, "fn")
    for unique in (b"a", b"b", b"c"):
        send(engine, client, T.SUBMIT_JOB_BG, b"fn", unique, b"x")
    store.commit(engine)
    a, b, c = [created.args[0] for created in replies(client)]
    run_and_fail(engine, w, a)
    run_and_fail(engine, w, b)
    assert grab_handle(engine, w) == c  # running while the operator re-runs `a`
    store.commit(engine)
    assert store.dead == {1, 2}

    assert engine.retry_dead(handle=a) == 1
    send(engine, w, T.WORK_FAIL, c)  # dies meanwhile: the set is full again, [b, c]
    store.commit(engine, error="disk full")  # the revive is refused: `a` comes back
    store.commit(engine)

    assert len(engine.dead) == 2
    assert store.dead == {dead.dead_id for dead in engine.dead}


def test_purge_dead_forgets_a_function_s_dead_jobs_or_all():
    engine = failing_engine()
    dead_jobs(engine, (b"f", b"a"), (b"g", b"b"), (b"f", b"c"))
    assert engine.purge_dead(b"f") == 2
    assert [dead.unique for dead in engine.dead] == [b"b"]
    assert engine.purge_dead(b"f") == 0
    assert engine.purge_dead() == 1
    assert not engine.dead and not engine.jobs


def test_a_durable_purge_journals_the_dead_removes():
    engine = failing_durable_engine()
    client, w = connect(engine), worker(engine, "fn")
    for unique in (b"a", b"b"):
        handle, _ = durable_job(engine, client, unique)
        run_and_fail(engine, w, handle)
    commit(engine)
    assert engine.purge_dead() == 2
    assert commit(engine).extras.dead_removes == [1, 2]


def test_restore_dead_keeps_the_store_s_dead_set_and_new_ids_follow_it():
    engine = failing_durable_engine(dead_max=2)
    stored = [
        DeadJob(i, b"H:old:%d" % i, b"fn", b"", 1, b"", b"x", 1, START_MS, START_MS, b"e")
        for i in (4, 9, 11)
    ]
    engine.restore_dead(stored)
    assert [dead.dead_id for dead in engine.dead] == [9, 11]
    assert commit(engine).extras.dead_removes == [4]
    client, w = connect(engine), worker(engine, "fn")
    handle, _ = durable_job(engine, client)
    run_and_fail(engine, w, handle)
    assert engine.dead.find(handle).dead_id == 12


def test_adopted_dead_jobs_take_their_place_by_age_and_the_oldest_is_dropped_past_dead_max():
    # A takeover (ownership.py) hands over a dead peer's dead set, negative ids, after this
    # server's own dead jobs: some of its jobs died before ours, some between them.
    engine = failing_durable_engine(dead_max=3)
    client, w = connect(engine), worker(engine, "fn")
    own_old, _ = durable_job(engine, client, b"own-old")
    own_new, _ = durable_job(engine, client, b"own-new")
    advance(engine, 2000)
    run_and_fail(engine, w, own_old)
    advance(engine, 1000)
    run_and_fail(engine, w, own_new)
    commit(engine)
    adopted = [
        DeadJob(-id_, b"H:peer:%d" % id_, b"fn", b"", 1, b"", b"x", 1, at_ms, at_ms, b"e")
        for id_, at_ms in ((1, START_MS + 1000_000), (2, START_MS + 2500_000))
    ]

    engine.restore_dead(adopted)

    # `show dead jobs` lists them oldest first
    shown = [dead.handle for dead in engine.dead.of_function(None)]
    assert shown == [own_old, b"H:peer:2", own_new]
    assert engine.dead.dropped == 1
    assert commit(engine).extras.dead_removes == [-1]  # the oldest, not one of our own


# --- retry policies ----------------------------------------------------------------------------


def test_set_retry_policy_and_policy_of_and_none_back_to_the_default():
    engine = failing_durable_engine(bg_retries=1, bg_retry_delay=2.0)
    assert engine.policy_of(b"fn") == RetryPolicy(1, 2.0)
    engine.set_retry_policy(b"fn", RetryPolicy(4, 0.5))
    assert engine.policy_of(b"fn") == RetryPolicy(4, 0.5)
    assert engine.policy_of(b"other") == RetryPolicy(1, 2.0)
    engine.set_retry_policy(b"fn", None)
    assert engine.policy_of(b"fn") == RetryPolicy(1, 2.0)
    engine.set_retry_policy(b"never-set", None)  # harmless
    assert commit(engine).extras.policies == [
        (b"fn", RetryPolicy(4, 0.5)),
        (b"fn", None),
        (b"never-set", None),
    ]


def test_restore_policies_brings_back_the_store_s_policies_without_journalling_them():
    engine = failing_durable_engine()
    engine.restore_policies([(b"fn", RetryPolicy(3, 1.5)), (b"g", RetryPolicy(0, 9.0))])
    assert engine.policy_of(b"fn") == RetryPolicy(3, 1.5)
    assert engine.policy_of(b"g") == RetryPolicy(0, 9.0)
    assert engine.policy_of(b"h") == RetryPolicy(0, BASE)
    assert not engine.journal.has_work


def test_a_policy_set_while_a_job_waits_applies_at_its_next_failure():
    engine = failing_engine(bg_retries=1)
    client, w = connect(engine), worker(engine, "fn")
    handle = submit_bg(engine, client)
    run_and_fail(engine, w, handle)
    engine.set_retry_policy(b"fn", RetryPolicy(5, BASE))
    advance(engine, delays(BASE, 1)[0])
    run_and_fail(engine, w, handle)
    assert not engine.dead
    assert job(engine, handle).state == JobState.WAITING
