"""Worker sleep and wake-up: PRE_SLEEP / NOOP, --worker-wakeup (shared doc §3.4, §6.5)."""

from __future__ import annotations

from engine_helpers import (
    connect,
    grab,
    grab_handle,
    new_engine,
    packet,
    replies,
    send,
    submit,
    types,
    worker,
)

from jobserver.protocol import PacketType as T

NOOP = packet(T.NOOP)


def sleeper(engine, *functions):
    """A worker registered for `functions` that sent PRE_SLEEP with nothing to do."""
    peer = worker(engine, *functions)
    send(engine, peer, T.PRE_SLEEP)
    assert replies(peer) == []
    return peer


def test_pre_sleep_with_nothing_to_do_gets_no_reply_and_a_submit_wakes_the_worker():
    engine = new_engine()
    w = sleeper(engine, "fn")
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    assert replies(w) == [NOOP]
    assert grab(engine, w).type == T.JOB_ASSIGN


def test_worker_that_never_sent_pre_sleep_never_gets_noop():
    engine = new_engine()
    w = worker(engine, "fn")
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_HIGH_BG)
    assert replies(w) == []


def test_pre_sleep_with_a_runnable_job_gets_an_immediate_noop_every_time():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_LOW_BG)
    w = worker(engine, "fn")
    for _ in range(3):
        send(engine, w, T.PRE_SLEEP)
        assert replies(w) == [NOOP]


def test_pre_sleep_looks_at_every_registered_function():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"second", b"", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "first", "second", "third")
    send(engine, w, T.PRE_SLEEP)
    assert replies(w) == [NOOP]


def test_only_one_noop_until_the_worker_grabs():
    engine = new_engine()
    w = sleeper(engine, "fn")
    client = connect(engine)
    for _ in range(3):
        submit(engine, client, b"fn", b"", b"x")
    assert replies(w) == [NOOP]
    grab_handle(engine, w)
    send(engine, w, T.PRE_SLEEP)  # two jobs are still queued: woken at once
    assert replies(w) == [NOOP]


def test_grab_rearms_wakeups_after_the_worker_goes_back_to_sleep():
    engine = new_engine()
    w = sleeper(engine, "fn")
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"1", T.SUBMIT_JOB_BG)
    assert replies(w) == [NOOP]
    handle = grab_handle(engine, w)
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    assert grab(engine, w) == packet(T.NO_JOB)
    send(engine, w, T.PRE_SLEEP)
    assert replies(w) == []
    submit(engine, client, b"fn", b"", b"2")
    assert replies(w) == [NOOP]


def test_noop_is_only_a_hint_another_worker_may_win_the_job():
    engine = new_engine()
    a = sleeper(engine, "fn")
    b = sleeper(engine, "fn")
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    assert replies(a) == [NOOP]
    assert replies(b) == [NOOP]
    assert grab_handle(engine, b) == handle
    assert grab(engine, a) == packet(T.NO_JOB)


def test_pre_sleep_after_a_noop_rearms_the_wakeup():
    # gearmand clears noop-sent only on GRAB_JOB, so a worker that answers NOOP with PRE_SLEEP
    # is never woken again (§3.4 rule 5, issue #343). We re-arm on PRE_SLEEP.
    engine = new_engine()
    slow = sleeper(engine, "fn")
    fast = worker(engine, "fn")
    client = connect(engine)
    first = submit(engine, client, b"fn", b"", b"1")
    assert replies(slow) == [NOOP]
    assert grab_handle(engine, fast) == first
    send(engine, slow, T.PRE_SLEEP)  # answers the NOOP with PRE_SLEEP; nothing runnable now
    assert replies(slow) == []
    submit(engine, client, b"fn", b"", b"2")
    assert replies(slow) == [NOOP]


def test_every_sleeping_worker_of_the_function_is_woken_by_default():
    engine = new_engine()
    sleepers = [sleeper(engine, "fn") for _ in range(4)]
    unrelated = sleeper(engine, "other")
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    for w in sleepers:
        assert replies(w) == [NOOP]
    assert replies(unrelated) == []


def test_worker_wakeup_one_wakes_one_sleeper_per_job_rotating():
    engine = new_engine(worker_wakeup=1)
    a, b, c = (sleeper(engine, "fn") for _ in range(3))
    client = connect(engine)
    woken = []
    for i in range(3):
        submit(engine, client, b"fn", b"", str(i))
        woken.append([w for w in (a, b, c) if replies(w) == [NOOP]])
    assert woken == [[a], [b], [c]]


def test_worker_wakeup_rotation_puts_a_worker_that_slept_again_at_the_back():
    engine = new_engine(worker_wakeup=1)
    a = sleeper(engine, "fn")
    b = sleeper(engine, "fn")
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"1")
    assert (types(a), types(b)) == ([T.NOOP], [])
    grab_handle(engine, a)
    send(engine, a, T.PRE_SLEEP)
    assert replies(a) == []
    submit(engine, client, b"fn", b"", b"2")
    assert (types(a), types(b)) == ([], [T.NOOP])
    grab_handle(engine, b)
    send(engine, b, T.PRE_SLEEP)
    submit(engine, client, b"fn", b"", b"3")
    assert (types(a), types(b)) == ([T.NOOP], [])


def test_worker_wakeup_n_wakes_at_most_n_sleepers_per_job():
    engine = new_engine(worker_wakeup=2)
    sleepers = [sleeper(engine, "fn") for _ in range(5)]
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    assert [len(replies(w)) for w in sleepers] == [1, 1, 0, 0, 0]
    submit(engine, client, b"fn", b"", b"y")
    assert [len(replies(w)) for w in sleepers] == [0, 0, 1, 1, 0]


def test_a_woken_worker_is_not_woken_again_through_its_other_functions():
    engine = new_engine()
    w = sleeper(engine, "fa", "fb")
    client = connect(engine)
    submit(engine, client, b"fa", b"", b"x")
    submit(engine, client, b"fb", b"", b"x")
    submit(engine, client, b"fa", b"", b"y")
    assert replies(w) == [NOOP]


def test_can_do_while_sleeping_for_a_function_with_queued_work_wakes_at_once():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"busy", b"", b"x", T.SUBMIT_JOB_BG)
    w = sleeper(engine, "idle")
    send(engine, w, T.CAN_DO, "busy")
    assert replies(w) == [NOOP]
    assert grab(engine, w).args[1] == b"busy"


def test_can_do_while_sleeping_makes_later_submits_of_that_function_wake_it():
    engine = new_engine()
    w = sleeper(engine, "idle")
    send(engine, w, T.CAN_DO_TIMEOUT, "new", "5000")
    assert replies(w) == []
    client = connect(engine)
    submit(engine, client, b"new", b"", b"x")
    assert replies(w) == [NOOP]


def test_can_do_after_a_noop_sends_no_second_noop():
    engine = new_engine()
    w = sleeper(engine, "fn")
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    submit(engine, client, b"other", b"", b"x")
    assert replies(w) == [NOOP]
    send(engine, w, T.CAN_DO, "other")
    assert replies(w) == []


def test_cant_do_while_sleeping_stops_wakeups_for_that_function():
    engine = new_engine()
    w = sleeper(engine, "fa", "fb")
    send(engine, w, T.CANT_DO, "fa")
    client = connect(engine)
    submit(engine, client, b"fa", b"", b"x")
    assert replies(w) == []
    submit(engine, client, b"fb", b"", b"x")
    assert replies(w) == [NOOP]


def test_reset_abilities_while_sleeping_stops_all_wakeups():
    engine = new_engine()
    w = sleeper(engine, "fa", "fb")
    send(engine, w, T.RESET_ABILITIES)
    client = connect(engine)
    submit(engine, client, b"fa", b"", b"x")
    submit(engine, client, b"fb", b"", b"x")
    assert replies(w) == []
    assert not engine.functions[b"fa"].sleepers and not engine.functions[b"fb"].sleepers


def test_disconnected_sleeper_is_forgotten_and_others_are_still_woken():
    engine = new_engine(worker_wakeup=1)
    gone = sleeper(engine, "fn")
    stays = sleeper(engine, "fn")
    engine.disconnect(gone)
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")  # the one wake-up goes to a live worker
    assert replies(stays) == [NOOP]


def test_requeued_job_wakes_sleeping_workers():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    holder = worker(engine, "fn")
    grab_handle(engine, holder)
    w = sleeper(engine, "fn")
    engine.disconnect(holder)
    assert replies(w) == [NOOP]
    assert grab_handle(engine, w) == handle


def test_bg_and_every_priority_submit_wakes_sleepers():
    for kind in (T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW, T.SUBMIT_REDUCE_JOB_BACKGROUND):
        engine = new_engine()
        w = sleeper(engine, "fn")
        client = connect(engine)
        if kind == T.SUBMIT_REDUCE_JOB_BACKGROUND:
            send(engine, client, kind, "fn", "", "red", "agg", "x")
        else:
            send(engine, client, kind, "fn", "", "x")
        assert types(client) == [T.JOB_CREATED]
        assert replies(w) == [NOOP], kind


def test_coalesced_submit_does_not_wake_anyone():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"u", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    other = sleeper(engine, "fn")
    submit(engine, client, b"fn", b"u", b"x")
    assert replies(other) == []


def test_worker_loss_wakes_a_live_sleeper_not_the_lost_worker_itself():
    # A worker may PRE_SLEEP while holding a job. When it is lost, its job is requeued and the
    # one wake-up of --worker-wakeup 1 must go to a worker that can still take it.
    engine = new_engine(worker_wakeup=1)
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    lost = worker(engine, "fn")
    grab_handle(engine, lost)
    send(engine, lost, T.PRE_SLEEP)  # nothing else runnable: asleep while holding the job
    assert replies(lost) == []
    live = sleeper(engine, "fn")
    engine.disconnect(lost)
    assert replies(live) == [NOOP]
    assert grab_handle(engine, live) == handle
