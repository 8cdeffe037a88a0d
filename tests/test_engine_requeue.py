"""Requeue on worker loss, --job-retries, and client disconnects (shared doc §3.6, §6.7)."""

from __future__ import annotations

import pytest
from engine_helpers import (
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
    worker,
)

from jobserver.protocol import PacketType as T

RESULT_NOT_FOUND = error("JOB_NOT_FOUND", "Job given in work result not found")


def lose_worker(engine, peer):
    engine.disconnect(peer)


def cant_do(engine, peer):
    send(engine, peer, T.CANT_DO, "fn")
    assert replies(peer) == []


def reset_abilities(engine, peer):
    send(engine, peer, T.RESET_ABILITIES)
    assert replies(peer) == []


TAKE_BACK = [
    pytest.param(lose_worker, id="disconnect"),
    pytest.param(cant_do, id="CANT_DO"),
    pytest.param(reset_abilities, id="RESET_ABILITIES"),
]


@pytest.mark.parametrize("take_back", TAKE_BACK)
def test_job_taken_back_from_its_worker_is_requeued_silently_with_status_reset(take_back):
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_STATUS, handle, b"5", b"10")
    assert replies(client) == [packet(T.WORK_STATUS, handle, b"5", b"10")]
    take_back(engine, w)
    assert replies(client) == []
    job = engine.jobs[handle]
    assert job.retries == 1
    assert get_status(engine, client, handle) == (b"1", b"0", b"0", b"0")
    function = engine.functions[b"fn"]
    assert (function.running, function.total, queued(engine)) == (0, 1, [0, 1, 0])
    assert handle not in w.held
    # Same handle, and the client still gets the result from the next worker.
    other = worker(engine, "fn")
    assert grab_handle(engine, other) == handle
    send(engine, other, T.WORK_COMPLETE, handle, b"r")
    assert replies(client) == [packet(T.WORK_COMPLETE, handle, b"r")]


@pytest.mark.parametrize("take_back", TAKE_BACK)
def test_requeued_job_goes_to_the_tail_of_its_priority_queue(take_back):
    engine = new_engine()
    client = connect(engine)
    first = submit(engine, client, b"fn", b"", b"first", T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    grab_handle(engine, w)
    second = submit(engine, client, b"fn", b"", b"second", T.SUBMIT_JOB_BG)
    low = submit(engine, client, b"fn", b"", b"low", T.SUBMIT_JOB_LOW_BG)
    take_back(engine, w)
    other = worker(engine, "fn")
    assert [grab_handle(engine, other) for _ in range(3)] == [second, first, low]


@pytest.mark.parametrize("take_back", [cant_do, reset_abilities])
def test_worker_that_gave_a_job_back_cannot_send_results_for_it(take_back):
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    take_back(engine, w)
    send(engine, w, T.WORK_COMPLETE, handle, b"late")
    assert reply(w) == RESULT_NOT_FOUND
    assert replies(client) == []
    assert engine.jobs[handle].retries == 1


def test_cant_do_requeues_only_the_jobs_of_that_function():
    engine = new_engine()
    client = connect(engine)
    a = submit(engine, client, b"fa", b"", b"x", T.SUBMIT_JOB_BG)
    b = submit(engine, client, b"fb", b"", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "fa", "fb")
    grab_handle(engine, w)
    grab_handle(engine, w)
    send(engine, w, T.CANT_DO, "fa")
    assert set(w.held) == {b}
    assert engine.functions[b"fa"].queued == [0, 1, 0]
    assert engine.functions[b"fb"].running == 1
    assert engine.functions[b"fa"].registrations == 0
    assert engine.jobs[a].retries == 1


def test_cant_do_of_an_unregistered_function_changes_nothing():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.CANT_DO, "other")
    send(engine, w, T.CANT_DO, "never-heard-of")
    assert replies(w) == []
    assert set(w.held) == {handle}
    assert engine.functions[b"fn"].registrations == 1


def test_cant_do_removes_every_duplicate_registration():
    engine = new_engine()
    w = worker(engine, "fn", "fn", "other")
    function = engine.functions[b"fn"]
    send(engine, w, T.CANT_DO, "fn")
    assert function.registrations == 0 and function.workers() == []
    assert b"fn" not in engine.functions  # nothing uses it any more
    assert engine.functions[b"other"].registrations == 1
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    assert grab(engine, w) == packet(T.NO_JOB)


def test_reset_abilities_requeues_every_held_job():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fa", b"", b"x", T.SUBMIT_JOB_BG)
    submit(engine, client, b"fb", b"", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "fa", "fb")
    grab_handle(engine, w)
    grab_handle(engine, w)
    send(engine, w, T.RESET_ABILITIES)
    assert w.held == {}
    for name in (b"fa", b"fb"):
        function = engine.functions[name]
        assert (function.queued, function.running, function.registrations) == ([0, 1, 0], 0, 0)


def test_worker_loss_requeues_every_job_it_held():
    engine = new_engine()
    client = connect(engine)
    handles = [submit(engine, client, b"fn", b"", str(i)) for i in range(3)]
    w = worker(engine, "fn")
    for _ in handles:
        grab_handle(engine, w)
    engine.disconnect(w)
    assert queued(engine) == [0, 3, 0]
    assert all(engine.jobs[h].retries == 1 for h in handles)
    assert engine.functions[b"fn"].registrations == 0


def test_retries_count_every_loss_with_unlimited_retries_by_default():
    engine = new_engine()  # job_retries=0: unlimited, as gearmand 1.1.x -j 0
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    for attempt in range(1, 21):
        w = worker(engine, "fn")
        assert grab_handle(engine, w) == handle
        engine.disconnect(w)
        assert engine.jobs[handle].retries == attempt
    assert replies(client) == []
    assert get_status(engine, client, handle) == (b"1", b"0", b"0", b"0")


@pytest.mark.parametrize("retries", [1, 2, 3])
@pytest.mark.parametrize("take_back", TAKE_BACK)
def test_job_retries_n_fails_the_job_on_the_nth_lost_attempt(retries, take_back):
    engine = new_engine(job_retries=retries)
    a, b = connect(engine), connect(engine)
    handle = submit(engine, a, b"fn", b"u", b"x")
    submit(engine, b, b"fn", b"u", b"x")
    for _ in range(retries - 1):
        w = worker(engine, "fn")
        assert grab_handle(engine, w) == handle
        take_back(engine, w)
        assert replies(a) == replies(b) == []
        assert handle in engine.jobs
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    take_back(engine, w)
    # WORK_FAIL without a trailing NUL to every listener; the job is gone (§3.6).
    assert replies(a) == [packet(T.WORK_FAIL, handle)]
    assert replies(b) == [packet(T.WORK_FAIL, handle)]
    assert handle not in engine.jobs
    assert b"fn" not in engine.functions  # no job, no worker: forgotten
    assert a.listening == b.listening == set()
    assert get_status(engine, a, handle) == (b"0", b"0", b"0", b"0")
    assert grab(engine, worker(engine, "fn")) == packet(T.NO_JOB)
    # The unique is free again.
    assert submit(engine, a, b"fn", b"u", b"x") != handle


def test_bg_job_out_of_retries_is_dropped_silently():
    engine = new_engine(job_retries=1)
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"u", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    grab_handle(engine, w)
    function = engine.functions[b"fn"]
    engine.disconnect(w)
    assert replies(client) == []
    assert handle not in engine.jobs
    assert function.total == 0
    assert b"fn" not in engine.functions


def test_failing_a_job_out_of_retries_does_not_wake_sleepers():
    engine = new_engine(job_retries=1)
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    sleeper = worker(engine, "fn")
    send(engine, sleeper, T.PRE_SLEEP)
    engine.disconnect(w)
    assert replies(sleeper) == []


def test_client_disconnect_abandons_its_queued_fg_job():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"u", b"x")
    engine.disconnect(client)
    observer = connect(engine)
    assert get_status(engine, observer, handle) == (b"0", b"0", b"0", b"0")
    assert b"fn" not in engine.functions
    assert grab(engine, worker(engine, "fn")) == packet(T.NO_JOB)
    # Its unique no longer coalesces.
    assert submit(engine, observer, b"fn", b"u", b"x") != handle


def test_client_disconnect_never_abandons_a_bg_job():
    engine = new_engine()
    client = connect(engine)
    handles = [
        submit(engine, client, b"fn", b"", b"x", kind)
        for kind in (T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW_BG)
    ]
    engine.disconnect(client)
    w = worker(engine, "fn")
    assert {grab_handle(engine, w) for _ in handles} == set(handles)


def test_client_disconnect_while_job_runs_lets_it_finish_and_drops_its_results():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    engine.disconnect(client)
    observer = connect(engine)
    assert get_status(engine, observer, handle) == (b"1", b"1", b"0", b"0")
    # The worker is not told; its packets are accepted and go nowhere.
    send(engine, w, T.WORK_STATUS, handle, b"1", b"2")
    send(engine, w, T.WORK_DATA, handle, b"d")
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(w) == []
    assert handle not in engine.jobs
    assert engine.functions[b"fn"].running == 0


def test_abandoned_running_job_is_not_requeued_when_its_worker_is_lost():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    function = engine.functions[b"fn"]
    engine.disconnect(client)
    engine.disconnect(w)
    assert handle not in engine.jobs
    assert (function.total, function.running) == (0, 0)
    assert b"fn" not in engine.functions


def test_client_disconnect_keeps_jobs_of_other_listeners():
    engine = new_engine()
    leaving, staying = connect(engine), connect(engine)
    handle = submit(engine, leaving, b"fn", b"u", b"x")
    submit(engine, staying, b"fn", b"u", b"x")
    other = submit(engine, leaving, b"fn", b"", b"y")
    engine.disconnect(leaving)
    assert engine.jobs[handle].listeners == [staying]
    assert other not in engine.jobs
    assert engine.functions[b"fn"].total == 1


def test_disconnected_peer_gets_no_more_output():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"u", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, client, T.ECHO_REQ, "pending")
    engine.disconnect(client)
    assert client.outbox == b""
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert client.outbox == b""


def test_disconnect_twice_is_harmless():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    grab_handle(engine, w)
    engine.disconnect(w)
    engine.disconnect(w)
    assert engine.jobs[handle].retries == 1
    assert queued(engine) == [0, 1, 0]


def test_peer_lost_while_working_on_its_own_fg_job_leaves_nothing_behind():
    engine = new_engine()
    peer = worker(engine, "fn")
    handle = submit(engine, peer, b"fn", b"", b"x")
    assert grab_handle(engine, peer) == handle
    function = engine.functions[b"fn"]
    engine.disconnect(peer)
    assert handle not in engine.jobs
    assert (function.total, function.running, function.registrations) == (0, 0, 0)
    assert b"fn" not in engine.functions
    assert grab(engine, worker(engine, "fn")) == packet(T.NO_JOB)
