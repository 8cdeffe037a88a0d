"""Engine operations behind the admin commands: cancel job, drop function, maxqueue
(shared doc §4, §6.14, §6.18)."""

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

from jobserver.protocol import PacketType as T

QUEUE_FULL = error("QUEUE_ERROR", "Job queue is full")

# ------------------------------------------------------------------ cancel job


def test_cancel_queued_job_fails_it_to_every_listener_and_forgets_it():
    engine = new_engine()
    a, b = connect(engine), connect(engine)
    handle = submit(engine, a, b"fn", b"u", b"x")
    submit(engine, b, b"fn", b"u", b"x")
    later = submit(engine, a, b"fn", b"", b"y")
    assert engine.cancel_job(handle) is True
    assert replies(a) == [packet(T.WORK_FAIL, handle)]
    assert replies(b) == [packet(T.WORK_FAIL, handle)]
    assert get_status(engine, b, handle) == (b"0", b"0", b"0", b"0")
    assert queued(engine) == [0, 1, 0]
    assert engine.functions[b"fn"].total == 1
    assert a.listening == {engine.jobs[later]}
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == later
    assert grab(engine, w) == packet(T.NO_JOB)
    # The unique is free for a new job.
    assert submit(engine, a, b"fn", b"u", b"x") != handle


def test_cancel_unknown_handle_is_false():
    engine = new_engine()
    assert engine.cancel_job(b"H:nope:1") is False


def test_cancel_queued_bg_job_removes_it_silently():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    assert engine.cancel_job(handle) is True
    assert replies(client) == []
    assert b"fn" not in engine.functions  # nothing uses it any more: forgotten
    assert grab(engine, worker(engine, "fn")) == packet(T.NO_JOB)


def test_cancelled_queued_job_does_not_wake_or_satisfy_pre_sleep():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    engine.cancel_job(handle)
    w = worker(engine, "fn")
    send(engine, w, T.PRE_SLEEP)
    assert replies(w) == []


def test_cancel_running_job_fails_it_once_and_the_listener_hears_nothing_more():
    # gearmand sends WORK_FAIL and later still forwards the job's WORK_STATUS/COMPLETE
    # (§4 cancel, §6.14); our listeners get nothing after the WORK_FAIL.
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    assert engine.cancel_job(handle) is True
    assert replies(client) == [packet(T.WORK_FAIL, handle)]
    assert client.listening == set()
    # The worker is not told and keeps running it: the function still counts it.
    assert replies(w) == []
    assert engine.functions[b"fn"].running == 1
    send(engine, w, T.WORK_STATUS, handle, b"1", b"2")
    send(engine, w, T.WORK_DATA, handle, b"d")
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(w) == []
    assert replies(client) == []
    function = engine.functions[b"fn"]
    assert (function.running, function.total) == (0, 0)
    assert w.held == {}


def test_cancel_running_job_frees_its_unique_at_once():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"u", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    engine.cancel_job(handle)
    replies(client)
    again = submit(engine, client, b"fn", b"u", b"x")
    assert again != handle
    # The old job's late result must not reach the new job's listener.
    send(engine, w, T.WORK_COMPLETE, handle, b"old")
    assert replies(client) == []
    assert grab_handle(engine, w) == again


def test_cancelled_running_job_is_not_requeued_when_its_worker_is_lost():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    grab_handle(engine, w)
    function = engine.functions[b"fn"]
    engine.cancel_job(handle)
    engine.disconnect(w)
    assert (function.running, function.total, function.queued) == (0, 0, [0, 0, 0])
    assert b"fn" not in engine.functions


def test_cancelled_running_job_is_dropped_not_requeued_when_its_timeout_expires():
    # Timeout expiry takes a job back exactly like a lost worker (§3.9), and a lost worker's
    # cancelled job is dropped (test above): the function must not count it as running forever.
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    w = connect(engine)
    send(engine, w, T.CAN_DO_TIMEOUT, "fn", "1000")
    grab_handle(engine, w)
    engine.cancel_job(handle)
    advance(engine, 2)
    function = engine.functions[b"fn"]  # kept: the worker is still registered
    assert (function.running, function.total, queued(engine)) == (0, 0, [0, 0, 0])
    assert w.held == {}
    send(engine, w, T.WORK_COMPLETE, handle, b"late")
    assert reply(w) == error("JOB_NOT_FOUND", "Job given in work result not found")


def test_cancel_running_job_twice_is_false_the_second_time():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    grab_handle(engine, worker(engine, "fn"))
    assert engine.cancel_job(handle) is True
    assert engine.cancel_job(handle) is False
    assert replies(client) == [packet(T.WORK_FAIL, handle)]


def test_cancel_waiting_epoch_job_means_it_never_runs():
    engine = new_engine()
    client = connect(engine)
    handle = submit_epoch(engine, client, "fn", START_TIME + 10)
    function = engine.functions[b"fn"]
    assert engine.cancel_job(handle) is True
    assert (function.waiting, function.total) == (0, 0)
    assert b"fn" not in engine.functions
    w = worker(engine, "fn")
    send(engine, w, T.PRE_SLEEP)
    advance(engine, 20)
    assert replies(w) == []
    assert grab(engine, w) == packet(T.NO_JOB)
    assert queued(engine) == [0, 0, 0]


# ------------------------------------------------------------------ drop function


def test_drop_idle_function():
    engine = new_engine()
    engine.create_function(b"fn")
    assert engine.drop_function(b"fn") == "ok"
    assert b"fn" not in engine.functions


def test_drop_unknown_function_is_not_found():
    engine = new_engine()
    assert engine.drop_function(b"nope") == "not-found"


def test_drop_function_matches_names_case_insensitively():
    engine = new_engine()
    engine.create_function(b"Resize")
    assert engine.drop_function(b"rESIZE") == "ok"
    assert engine.functions == {}


def test_drop_function_with_registered_workers_is_busy():
    engine = new_engine()
    engine.create_function(b"fn")  # else it is forgotten as soon as nothing uses it
    w = worker(engine, "fn")
    assert engine.drop_function(b"fn") == "busy"
    send(engine, w, T.CANT_DO, "fn")
    assert engine.drop_function(b"fn") == "ok"


def test_drop_function_with_a_running_job_is_busy():
    engine = new_engine()
    engine.create_function(b"fn")
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn", "other")
    grab_handle(engine, w)
    assert engine.drop_function(b"fn") == "busy"
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    send(engine, w, T.CANT_DO, "fn")
    assert engine.drop_function(b"fn") == "ok"


def test_drop_function_with_queued_jobs_is_refused_rather_than_orphaning_them():
    # gearmand drops the function and orphans its queued jobs (§4, §6.18); we refuse.
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    assert engine.drop_function(b"fn") == "queued"
    assert engine.functions[b"fn"].total == 1
    assert grab_handle(engine, worker(engine, "fn")) == handle


def test_drop_function_with_a_waiting_epoch_job_is_refused():
    engine = new_engine()
    client = connect(engine)
    submit_epoch(engine, client, "fn", START_TIME + 60)
    assert engine.drop_function(b"fn") == "queued"


def test_drop_function_after_its_jobs_were_cancelled():
    engine = new_engine()
    engine.create_function(b"fn")
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    engine.cancel_job(handle)
    assert engine.drop_function(b"fn") == "ok"


def test_dropped_function_is_recreated_by_a_submit():
    engine = new_engine()
    engine.create_function(b"fn")
    engine.drop_function(b"fn")
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    assert engine.functions[b"fn"].total == 1
    assert grab_handle(engine, worker(engine, "fn")) == handle


# ------------------------------------------------------------------ maxqueue


@pytest.mark.parametrize(
    "kind", [T.SUBMIT_JOB, T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW]
)
def test_submit_over_maxqueue_is_queue_error_and_creates_nothing(kind):
    engine = new_engine()
    engine.set_max_queue(b"fn", [2, 2, 2])
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"1", kind)
    submit(engine, client, b"fn", b"", b"2", kind)
    send(engine, client, kind, "fn", "", "3")
    assert reply(client) == QUEUE_FULL
    assert len(engine.jobs) == 2
    assert len(client.listening) == (2 if kind in (T.SUBMIT_JOB, T.SUBMIT_JOB_LOW) else 0)


def test_maxqueue_limit_is_per_priority_against_the_function_total():
    engine = new_engine()
    engine.set_max_queue(b"fn", [3, 2, 1])
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"n", T.SUBMIT_JOB_BG)  # total 1
    send(engine, client, T.SUBMIT_JOB_LOW_BG, "fn", "", "l")
    assert reply(client) == QUEUE_FULL
    submit(engine, client, b"fn", b"", b"n", T.SUBMIT_JOB_BG)  # total 2
    send(engine, client, T.SUBMIT_JOB_BG, "fn", "", "n")
    assert reply(client) == QUEUE_FULL
    submit(engine, client, b"fn", b"", b"h", T.SUBMIT_JOB_HIGH_BG)  # total 3
    send(engine, client, T.SUBMIT_JOB_HIGH_BG, "fn", "", "h")
    assert reply(client) == QUEUE_FULL
    assert engine.functions[b"fn"].total == 3


def test_maxqueue_counts_running_and_waiting_jobs():
    engine = new_engine()
    engine.set_max_queue(b"fn", [2, 2, 2])
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"run", T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    grab_handle(engine, w)
    submit_epoch(engine, client, "fn", START_TIME + 60)
    send(engine, client, T.SUBMIT_JOB_HIGH_BG, "fn", "", "x")
    assert reply(client) == QUEUE_FULL
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_HIGH_BG)


def test_bad_epoch_is_reported_before_maxqueue():
    engine = new_engine()
    engine.set_max_queue(b"fn", [1, 1, 1])
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    send(engine, client, T.SUBMIT_JOB_EPOCH, "fn", "", "abc", "x")
    assert reply(client).args[0] == b"INVALID_ARGUMENT"


@pytest.mark.parametrize("limits", [[0, 0, 0], [-1, -5, 0]])
def test_maxqueue_zero_or_negative_is_unlimited(limits):
    engine = new_engine()
    engine.set_max_queue(b"fn", [1, 1, 1])
    engine.set_max_queue(b"fn", limits)
    client = connect(engine)
    for i in range(20):
        submit(engine, client, b"fn", b"", str(i), T.SUBMIT_JOB_BG)
    assert engine.functions[b"fn"].total == 20


def test_maxqueue_for_an_unknown_function_takes_effect_when_jobs_arrive():
    # gearmand ignores maxqueue for a function it does not know yet (§4); we keep the limit.
    engine = new_engine()
    engine.set_max_queue(b"later", [1, 1, 1])
    client = connect(engine)
    submit(engine, client, b"later", b"", b"1", T.SUBMIT_JOB_BG)
    send(engine, client, T.SUBMIT_JOB_BG, "later", "", "2")
    assert reply(client) == QUEUE_FULL


def test_maxqueue_applies_to_one_function_only():
    engine = new_engine()
    engine.set_max_queue(b"fn", [1, 1, 1])
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"1", T.SUBMIT_JOB_BG)
    for i in range(5):
        submit(engine, client, b"other", b"", str(i), T.SUBMIT_JOB_BG)


def test_cancelling_most_of_a_long_queue_keeps_the_rest_in_order():
    # Cancelled entries are skipped lazily and the queue is rebuilt once they dominate it.
    engine = new_engine()
    client = connect(engine)
    handles = [submit(engine, client, b"fn", b"", b"", T.SUBMIT_JOB_BG) for _ in range(3000)]
    keep = handles[::10]
    for handle in set(handles) - set(keep):
        assert engine.cancel_job(handle) is True
    function = engine.functions[b"fn"]
    assert queued(engine) == [0, len(keep), 0]
    assert function.queues[1].length < len(handles)  # stale entries were compacted away
    w = worker(engine, "fn")
    assert [grab_handle(engine, w) for _ in keep] == keep
    assert grab(engine, w) == packet(T.NO_JOB)
