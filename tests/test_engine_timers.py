"""CAN_DO_TIMEOUT and SUBMIT_JOB_EPOCH timers (shared doc §3.9, §3.11, §6.8, §6.13)."""

from __future__ import annotations

import pytest
from engine_helpers import (
    START_TIME,
    advance,
    connect,
    error,
    get_status,
    grab,
    grab_handle,
    new_engine,
    packet,
    queued,
    replies,
    reply,
    send,
    submit,
    submit_epoch,
    worker,
)

from jobserver.engine.workers import parse_can_do_timeout
from jobserver.protocol import PacketType as T

BAD_EPOCH = error("INVALID_ARGUMENT", "Epoch must be a decimal unix time in range")
RESULT_NOT_FOUND = error("JOB_NOT_FOUND", "Job given in work result not found")


def timeout_worker(engine, timeout_ms: bytes | str, function: str = "fn"):
    w = connect(engine)
    send(engine, w, T.CAN_DO_TIMEOUT, function, timeout_ms)
    assert replies(w) == []
    return w


# ------------------------------------------------------------------ CAN_DO_TIMEOUT


def test_can_do_timeout_is_milliseconds_and_requeues_on_expiry():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, "3000")
    assert engine.seconds_until_next_timer() is None  # armed at assignment, not at CAN_DO
    assert grab_handle(engine, w) == handle
    assert engine.seconds_until_next_timer() == pytest.approx(3.0)
    send(engine, w, T.WORK_STATUS, handle, b"1", b"3")
    replies(client)
    advance(engine, 2.999)
    assert set(w.held) == {handle}
    advance(engine, 0.001)
    # Requeued like a lost worker: retries+1, status reset, client told nothing (§3.9).
    assert w.held == {}
    assert engine.jobs[handle].retries == 1
    assert queued(engine) == [0, 1, 0]
    assert engine.functions[b"fn"].running == 0
    assert get_status(engine, client, handle) == (b"1", b"0", b"0", b"0")
    assert replies(client) == []
    assert replies(w) == []
    # The worker keeps running it, but its late result is refused.
    send(engine, w, T.WORK_COMPLETE, handle, b"late")
    assert reply(w) == RESULT_NOT_FOUND
    assert replies(client) == []


def test_timer_is_armed_when_the_job_is_assigned():
    engine = new_engine()
    w = timeout_worker(engine, "2000")
    advance(engine, 100)
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    grab_handle(engine, w)
    advance(engine, 1.5)
    assert handle in w.held
    advance(engine, 0.5)
    assert handle not in w.held


@pytest.mark.parametrize(("timeout_ms", "seconds"), [("1", 1.0), ("999", 1.0), ("1000", 1.0)])
def test_can_do_timeout_below_one_second_is_raised_to_one_second(timeout_ms, seconds):
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, timeout_ms)
    grab_handle(engine, w)
    assert engine.seconds_until_next_timer() == pytest.approx(seconds)
    advance(engine, 0.999)
    assert handle in w.held
    advance(engine, 0.001)
    assert handle not in w.held


@pytest.mark.parametrize("timeout_ms", ["0", "-5"])
def test_can_do_timeout_zero_or_negative_means_no_timeout(timeout_ms):
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, timeout_ms)
    assert engine.functions[b"fn"].registrations == 1
    grab_handle(engine, w)
    assert engine.seconds_until_next_timer() is None
    advance(engine, 10_000)
    assert handle in w.held


@pytest.mark.parametrize(
    ("timeout_ms", "seconds"),
    [
        (b"\x00\x00\x75\x30", None),  # node `gearman` 2.1.0: a 4-byte binary 30000
        (b"2.5", 1.0),  # abraxas, Perl Gearman::Worker: seconds as a decimal; 2 ms -> 1 s
        (b"30000 ", 30.0),  # trailing space
        (b"", None),  # empty
        (b"  7000", 7.0),  # strtol skips leading whitespace
        (b"+3000", 3.0),
        (b"10s", 1.0),  # 10 ms, raised to the minimum
        (b"abc", None),
        (b"-5000", None),
        (b"4000\x00junk", 4.0),
    ],
)
def test_can_do_timeout_reads_leading_digits_like_gearmand_and_always_registers(
    timeout_ms, seconds
):
    # gearmand parses the timeout with strtol: leading digits count, the rest is ignored, and
    # no digits means no timeout (§3.9). The function is registered and nothing is sent back,
    # whatever the value: answering ERROR (as we once did) left such workers without jobs.
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, timeout_ms)  # asserts no reply
    assert engine.functions[b"fn"].registrations == 1
    assert grab_handle(engine, w) == handle
    if seconds is None:
        assert engine.seconds_until_next_timer() is None
    else:
        assert engine.seconds_until_next_timer() == pytest.approx(seconds)


@pytest.mark.parametrize("timeout_ms", ["1" * 21, "9" * 40, "9" * 5000])
def test_can_do_timeout_of_many_digits_registers_with_a_timeout_nobody_reaches(timeout_ms):
    # gearmand drops a registration whose timeout is over 20 characters, silently (§3.9): the
    # worker then never gets a job. We register it, with the timeout clamped (as strtol clamps
    # to LONG_MAX): 10**18 ms, some 31 million years.
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, timeout_ms)
    assert grab_handle(engine, w) == handle
    assert engine.seconds_until_next_timer() == pytest.approx(10**15)


def test_parse_can_do_timeout_clamps_without_converting_huge_digit_strings():
    assert parse_can_do_timeout(b"1" * 100_000) == 10**18
    assert parse_can_do_timeout(b"999999999999999999") == 999999999999999999
    assert parse_can_do_timeout(b"0000000000000000000000001500") == 1500


def test_can_do_timeout_counts_as_a_registration():
    engine = new_engine()
    w = timeout_worker(engine, "5000")
    assert engine.functions[b"fn"].registrations == 1
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    assert grab_handle(engine, w) == handle


def test_timer_does_not_fire_after_the_job_completed():
    # gearmand's per-connection timer fires anyway and drives `running` to -1 (issue #301).
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, "1000")
    grab_handle(engine, w)
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(client) == [packet(T.WORK_COMPLETE, handle, b"r")]
    advance(engine, 5)
    function = engine.functions[b"fn"]
    assert (function.running, function.total, queued(engine)) == (0, 0, [0, 0, 0])
    assert engine.seconds_until_next_timer() is None
    assert replies(client) == replies(w) == []


def test_stale_timer_of_a_finished_job_does_not_cut_the_next_job_short():
    engine = new_engine()
    client = connect(engine)
    first = submit(engine, client, b"fn", b"", b"1", T.SUBMIT_JOB_BG)
    second = submit(engine, client, b"fn", b"", b"2", T.SUBMIT_JOB_BG)
    w = timeout_worker(engine, "1000")
    grab_handle(engine, w)
    advance(engine, 0.5)
    send(engine, w, T.WORK_COMPLETE, first, b"")
    assert grab_handle(engine, w) == second
    advance(engine, 0.5)  # the first job's deadline
    assert set(w.held) == {second}
    assert engine.functions[b"fn"].running == 1
    advance(engine, 0.5)  # the second job's deadline
    assert w.held == {}
    assert engine.functions[b"fn"].running == 0
    assert engine.jobs[second].retries == 1


def test_stale_timer_does_not_take_the_job_from_its_next_worker():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, "1000")
    grab_handle(engine, w)
    engine.disconnect(w)  # requeued by connection loss before the timer fires
    patient = worker(engine, "fn")  # no timeout
    assert grab_handle(engine, patient) == handle
    advance(engine, 5)
    assert set(patient.held) == {handle}
    assert engine.jobs[handle].retries == 1
    assert engine.functions[b"fn"].running == 1


def test_job_timed_out_and_regrabbed_gets_a_fresh_timer():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, "1000")
    grab_handle(engine, w)
    advance(engine, 1)
    assert grab_handle(engine, w) == handle
    advance(engine, 0.9)
    assert handle in w.held
    advance(engine, 0.1)
    assert handle not in w.held
    assert engine.jobs[handle].retries == 2


def test_timeout_requeue_counts_towards_job_retries():
    engine = new_engine(job_retries=2)
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, "1000")
    grab_handle(engine, w)
    advance(engine, 1)
    assert replies(client) == []
    grab_handle(engine, w)
    advance(engine, 1)
    assert replies(client) == [packet(T.WORK_FAIL, handle)]
    assert handle not in engine.jobs
    assert engine.functions[b"fn"].total == 0


def test_timeout_requeue_wakes_sleeping_workers():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, "1000")
    grab_handle(engine, w)
    sleeper = worker(engine, "fn")
    send(engine, sleeper, T.PRE_SLEEP)
    assert replies(sleeper) == []
    advance(engine, 1)
    assert replies(sleeper) == [packet(T.NOOP)]


def test_timeout_applies_only_to_jobs_of_the_function_registered_with_it():
    engine = new_engine()
    client = connect(engine)
    timed = submit(engine, client, b"timed", b"", b"x", T.SUBMIT_JOB_BG)
    free = submit(engine, client, b"free", b"", b"x", T.SUBMIT_JOB_BG)
    w = timeout_worker(engine, "1000", "timed")
    send(engine, w, T.CAN_DO, "free")
    grab_handle(engine, w)
    grab_handle(engine, w)
    advance(engine, 60)
    assert set(w.held) == {free}
    assert timed not in w.held


def test_timeouts_use_the_monotonic_clock_not_the_wall_clock():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, "1000")
    grab_handle(engine, w)
    engine.wall_clock.advance(3600)
    engine.run_timers()
    assert handle in w.held
    engine.monotonic_clock.advance(1)
    engine.run_timers()
    assert handle not in w.held


# ------------------------------------------------------------------ SUBMIT_JOB_EPOCH


def test_epoch_job_is_not_runnable_before_it_is_due():
    engine = new_engine()
    client = connect(engine)
    handle = submit_epoch(engine, client, "fn", START_TIME + 60, data="later")
    function = engine.functions[b"fn"]
    assert (function.waiting, function.total, queued(engine)) == (1, 1, [0, 0, 0])
    assert get_status(engine, client, handle) == (b"1", b"0", b"0", b"0")
    assert engine.seconds_until_next_timer() == pytest.approx(60)
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.NO_JOB)
    send(engine, w, T.PRE_SLEEP)
    assert replies(w) == []
    advance(engine, 59.5)
    assert grab(engine, w) == packet(T.NO_JOB)
    advance(engine, 0.5)
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"fn", b"later")
    assert function.waiting == 0


def test_epoch_job_coming_due_wakes_sleeping_workers():
    # gearmand 1.1.x never wakes anyone when an epoch job comes due (§3.11, issue #101).
    engine = new_engine()
    client = connect(engine)
    handle = submit_epoch(engine, client, "fn", START_TIME + 10)
    w = worker(engine, "fn")
    send(engine, w, T.PRE_SLEEP)
    assert replies(w) == []
    advance(engine, 9)
    assert replies(w) == []
    advance(engine, 1)
    assert replies(w) == [packet(T.NOOP)]
    assert grab(engine, w).args[0] == handle


def test_submitting_a_future_epoch_job_wakes_nobody():
    engine = new_engine()
    w = worker(engine, "fn")
    send(engine, w, T.PRE_SLEEP)
    client = connect(engine)
    submit_epoch(engine, client, "fn", START_TIME + 10)
    assert replies(w) == []


def test_not_yet_due_epoch_job_never_blocks_low_jobs_of_its_function():
    # gearmand 1.1.x yields nothing for the function until the epoch job is due (§3.11).
    engine = new_engine()
    client = connect(engine)
    submit_epoch(engine, client, "fn", START_TIME + 3600)
    low = submit(engine, client, b"fn", b"", b"low", T.SUBMIT_JOB_LOW_BG)
    w = worker(engine, "fn")
    send(engine, w, T.PRE_SLEEP)
    assert replies(w) == [packet(T.NOOP)]
    assert grab_handle(engine, w) == low


def test_due_epoch_job_is_queued_at_normal_priority_behind_earlier_normal_jobs():
    engine = new_engine()
    client = connect(engine)
    epoch = submit_epoch(engine, client, "fn", START_TIME + 10)
    normal = submit(engine, client, b"fn", b"", b"n", T.SUBMIT_JOB_BG)
    low = submit(engine, client, b"fn", b"", b"l", T.SUBMIT_JOB_LOW_BG)
    advance(engine, 10)
    assert queued(engine) == [0, 2, 1]
    w = worker(engine, "fn")
    assert [grab_handle(engine, w) for _ in range(3)] == [normal, epoch, low]


def test_epoch_jobs_become_runnable_in_due_order():
    engine = new_engine()
    client = connect(engine)
    later = submit_epoch(engine, client, "fn", START_TIME + 20)
    sooner = submit_epoch(engine, client, "fn", START_TIME + 10)
    assert engine.seconds_until_next_timer() == pytest.approx(10)
    advance(engine, 30)
    w = worker(engine, "fn")
    assert [grab_handle(engine, w) for _ in range(2)] == [sooner, later]
    assert engine.seconds_until_next_timer() is None


@pytest.mark.parametrize("epoch", ["0", "1", str(int(START_TIME)), "-1"])
def test_epoch_in_the_past_or_now_is_runnable_immediately(epoch):
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.SUBMIT_JOB_EPOCH, "fn", "", epoch, "x")
    handle = reply(client).args[0]
    assert queued(engine) == [0, 1, 0]
    assert engine.functions[b"fn"].waiting == 0
    assert grab_handle(engine, worker(engine, "fn")) == handle


def test_epoch_job_is_background():
    engine = new_engine()
    client = connect(engine)
    handle = submit_epoch(engine, client, "fn", START_TIME - 1)
    assert engine.jobs[handle].listeners is None
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(client) == []
    assert replies(w) == []


def test_epoch_job_survives_its_submitter_disconnecting():
    engine = new_engine()
    client = connect(engine)
    handle = submit_epoch(engine, client, "fn", START_TIME + 5)
    engine.disconnect(client)
    advance(engine, 5)
    assert grab_handle(engine, worker(engine, "fn")) == handle


def test_epoch_job_coalesces_while_waiting():
    engine = new_engine()
    client = connect(engine)
    handle = submit_epoch(engine, client, "fn", START_TIME + 5, unique="u")
    assert submit_epoch(engine, client, "fn", START_TIME + 500, unique="u") == handle
    assert submit(engine, client, b"fn", b"u", b"x", T.SUBMIT_JOB_HIGH_BG) == handle
    assert engine.functions[b"fn"].waiting == 1
    assert len(engine.jobs) == 1


@pytest.mark.parametrize(
    "epoch",
    [
        "abc",
        "",
        "12x",
        "1.5",
        "9223372036854775808",  # one past INT64_MAX
        "-9223372036854775809",
        "99999999999999999999",
    ],
)
def test_bad_or_out_of_range_epoch_is_invalid_argument_and_creates_nothing(epoch):
    # gearmand gives no reply at all for an out-of-range epoch (§3.11, §3.14).
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.SUBMIT_JOB_EPOCH, "fn", "u", epoch, "x")
    assert reply(client) == BAD_EPOCH
    assert engine.jobs == {}
    assert engine.seconds_until_next_timer() is None


def test_largest_int64_epoch_is_accepted_and_waits():
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.SUBMIT_JOB_EPOCH, "fn", "", "9223372036854775807", "x")
    assert reply(client).type == T.JOB_CREATED
    assert engine.functions[b"fn"].waiting == 1


# ------------------------------------------------------------------ scheduling


def test_nothing_scheduled_means_no_timer():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    grab_handle(engine, worker(engine, "fn"))
    assert engine.seconds_until_next_timer() is None
    engine.run_timers()  # harmless with nothing due


def test_next_timer_is_the_sooner_of_epoch_and_timeout_and_never_negative():
    engine = new_engine()
    client = connect(engine)
    submit_epoch(engine, client, "other", START_TIME + 30)
    submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, "5000")
    grab_handle(engine, w)
    assert engine.seconds_until_next_timer() == pytest.approx(5)
    engine.monotonic_clock.advance(7)  # overdue, timers not yet run
    assert engine.seconds_until_next_timer() == 0.0
    engine.run_timers()
    assert engine.seconds_until_next_timer() == pytest.approx(30)


def test_abandoned_running_job_is_dropped_not_requeued_when_its_timeout_expires():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = timeout_worker(engine, "1000")
    grab_handle(engine, w)
    engine.disconnect(client)
    advance(engine, 1)
    assert handle not in engine.jobs
    function = engine.functions[b"fn"]
    assert (function.running, function.total, queued(engine)) == (0, 0, [0, 0, 0])
    send(engine, w, T.WORK_COMPLETE, handle, b"late")
    assert reply(w) == RESULT_NOT_FOUND
