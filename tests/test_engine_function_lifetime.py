"""Function entries come and go with their use (issue: state from clients is reclaimed).

A function exists while it has workers, jobs in any state (queued, waiting epoch jobs, pending
commits, running) or an operator's setting (`create function`, `maxqueue`); then it is
forgotten, and `status` no longer lists it. gearmand keeps every name it ever saw, 100,000
names held 351 MiB here before. Also: the bounds on what one peer can pile up (duplicate
CAN_DOs, listeners per job, stale CAN_DO_TIMEOUT timers), and what a function costs.
"""

from __future__ import annotations

import tracemalloc

from engine_helpers import (
    START_TIME,
    advance,
    connect,
    error,
    grab,
    grab_handle,
    new_engine,
    packet,
    replies,
    reply,
    send,
    submit,
    submit_epoch,
    worker,
)

from jobserver.engine.abilities import MAX_DUPLICATE_REGISTRATIONS
from jobserver.engine.engine import MAX_LISTENERS_PER_JOB
from jobserver.engine.journal import Batch
from jobserver.engine.workers import COMPACT_MIN_TIMERS
from jobserver.protocol import PacketType as T

TOO_MANY_LISTENERS = error("QUEUE_ERROR", "Too many clients are waiting on this job")

MAX_FUNCTION_BYTES = 500
"""The issue's budget per function while it exists (gearmand: about 240 B)."""


def test_a_worker_leaving_forgets_the_functions_only_it_used():
    engine = new_engine()
    w = worker(engine, "only-mine", "shared")
    other = worker(engine, "shared")
    engine.disconnect(w)
    assert set(engine.functions) == {b"shared"}
    engine.disconnect(other)
    assert engine.functions == {}


def test_cant_do_and_reset_abilities_forget_unused_functions():
    engine = new_engine()
    w = worker(engine, "a", "b", "c")
    send(engine, w, T.CANT_DO, "a")
    assert set(engine.functions) == {b"b", b"c"}
    send(engine, w, T.RESET_ABILITIES)
    assert engine.functions == {}


def test_a_function_with_queued_jobs_outlives_its_workers_and_goes_with_its_last_job():
    engine = new_engine()
    client = connect(engine)
    w = worker(engine, "fn")
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    engine.disconnect(w)
    assert b"fn" in engine.functions  # its job is queued
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    send(engine, w, T.RESET_ABILITIES)
    assert b"fn" in engine.functions  # requeued: still queued
    w2 = worker(engine, "fn")
    grab_handle(engine, w2)
    engine.disconnect(w2)  # requeued again; nobody registered
    assert b"fn" in engine.functions
    w3 = worker(engine, "fn")
    grab_handle(engine, w3)
    send(engine, w3, T.WORK_COMPLETE, handle, b"")
    send(engine, w3, T.CANT_DO, "fn")
    assert engine.functions == {}


def test_a_running_job_keeps_its_function_until_it_ends():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    engine.cancel_job(handle)  # detached, but its worker still runs it
    send(engine, w, T.CANT_DO, "other")
    assert engine.functions[b"fn"].running == 1
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    assert b"fn" in engine.functions  # still registered
    send(engine, w, T.CANT_DO, "fn")
    assert engine.functions == {}


def test_a_waiting_epoch_job_keeps_its_function_until_it_runs():
    engine = new_engine()
    client = connect(engine)
    handle = submit_epoch(engine, client, "later", START_TIME + 60)
    assert engine.functions[b"later"].waiting == 1
    advance(engine, 61)
    w = worker(engine, "later")
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    engine.disconnect(w)
    assert engine.functions == {}


def test_an_abandoned_foreground_job_and_its_function_go_together():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    engine.disconnect(client)
    assert engine.functions == {}


def test_a_job_out_of_retries_takes_its_unused_function_with_it():
    engine = new_engine(job_retries=1)
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    grab_handle(engine, w)
    engine.disconnect(w)
    assert engine.functions == {}


def test_a_submit_refused_by_the_store_leaves_no_function_behind():
    engine = new_engine(durable=True)
    client = connect(engine)
    send(engine, client, T.SUBMIT_JOB_BG, "stored", "", "x")
    assert engine.functions[b"stored"].pending == 1
    assert engine.journal is not None
    batch: Batch = engine.journal.take_batch()
    engine.commit_finished(batch, "disk full")
    assert reply(client).type == T.ERROR
    assert engine.functions == {}


def test_create_function_and_maxqueue_keep_an_idle_function_until_dropped():
    engine = new_engine()
    engine.create_function(b"made")
    engine.set_max_queue(b"limited", [1, 1, 1])
    w = worker(engine, "made", "limited")
    engine.disconnect(w)
    assert set(engine.functions) == {b"made", b"limited"}
    assert engine.drop_function(b"made") == "ok"
    assert engine.drop_function(b"limited") == "ok"
    assert engine.functions == {}


def test_a_forgotten_function_comes_back_with_its_next_use():
    engine = new_engine()
    client = connect(engine)
    w = worker(engine, "fn")
    engine.disconnect(w)
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    assert engine.functions[b"fn"].total == 1
    assert grab_handle(engine, worker(engine, "fn")) == handle


def test_drop_function_finds_names_differing_only_in_case_among_many():
    engine = new_engine()
    for i in range(1000):
        engine.create_function(b"name-%d" % i)
    engine.create_function(b"Resize")
    engine.create_function(b"RESIZE")
    engine.create_function(b"report")
    assert engine.drop_function(b"rEsIzE") == "ok"
    assert engine.drop_function(b"resize") == "ok"
    assert engine.drop_function(b"resize") == "not-found"
    assert engine.drop_function(b"REPORT") == "ok"
    assert engine.drop_function(b"NAME-999") == "ok"
    assert b"name-999" not in engine.functions and len(engine.functions) == 999


# ------------------------------------------------------------------ bounds


def test_duplicate_can_dos_count_up_to_the_bound_and_are_ignored_past_it():
    engine = new_engine()
    w = connect(engine)
    for _ in range(MAX_DUPLICATE_REGISTRATIONS + 10):
        send(engine, w, T.CAN_DO, "fn")
    assert replies(w) == []  # CAN_DO has no reply, past the bound either
    assert engine.functions[b"fn"].registrations == MAX_DUPLICATE_REGISTRATIONS
    send(engine, w, T.CANT_DO, "fn")
    assert engine.functions == {}


def test_listeners_per_job_are_bounded_and_the_one_past_the_bound_gets_an_error():
    engine = new_engine()
    clients = [connect(engine) for _ in range(4)]
    handle = submit(engine, clients[0], b"fn", b"u", b"x")
    for i in range(1, MAX_LISTENERS_PER_JOB):
        assert submit(engine, clients[i % 4], b"fn", b"u", b"x") == handle
    late = connect(engine)
    send(engine, late, T.SUBMIT_JOB, "fn", "u", "x")
    assert reply(late) == TOO_MANY_LISTENERS
    assert late.listening == set()
    assert len(engine.jobs[handle].listeners) == MAX_LISTENERS_PER_JOB
    # A background submit of the same unique is still answered: it adds no listener.
    assert submit(engine, late, b"fn", b"u", b"x", T.SUBMIT_JOB_BG) == handle
    # The others are unaffected: each gets the result once per submit.
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"done")
    assert sum(len(replies(c)) for c in clients) == MAX_LISTENERS_PER_JOB
    assert replies(late) == []


def test_timers_of_finished_jobs_are_swept_so_long_timeouts_do_not_pile_up():
    engine = new_engine()
    client = connect(engine)
    w = connect(engine)
    send(engine, w, T.CAN_DO_TIMEOUT, "fn", "86400000")  # one day
    for _ in range(5 * COMPACT_MIN_TIMERS):
        handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
        assert grab_handle(engine, w) == handle
        send(engine, w, T.WORK_COMPLETE, handle, b"")
    assert len(engine._timeout_heap) <= COMPACT_MIN_TIMERS
    # A live timer survives the sweeps.
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    grab_handle(engine, w)
    for _ in range(2 * COMPACT_MIN_TIMERS):
        done = submit(engine, client, b"fn", b"", b"y", T.SUBMIT_JOB_BG)
        grab_handle(engine, w)
        send(engine, w, T.WORK_COMPLETE, done, b"")
    advance(engine, 86400)
    assert handle not in w.held
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"fn", b"x")


# ------------------------------------------------------------------ memory


def bytes_per_function(build, count: int = 20_000) -> float:
    engine = new_engine()
    peer = connect(engine)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        build(engine, peer, count)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(engine.functions) == count
    return used / count


def _create(engine, _peer, count):
    for i in range(count):
        engine.create_function(b"function-%06d" % i)


def _can_do(engine, peer, count):
    for i in range(count):
        send(engine, peer, T.CAN_DO, b"function-%06d" % i)


def test_an_idle_function_costs_less_than_the_budget():
    used = bytes_per_function(_create)
    print(f"\nidle function (create function): {used:.0f} B")
    assert used <= MAX_FUNCTION_BYTES


def test_a_function_registered_by_a_worker_costs_less_than_the_budget_registration_included():
    used = bytes_per_function(_can_do)
    print(f"\nfunction with one worker's CAN_DO: {used:.0f} B")
    assert used <= MAX_FUNCTION_BYTES


def test_releasing_every_function_leaves_nothing():
    engine = new_engine()
    w = connect(engine)
    client = connect(engine)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(10_000):
            send(engine, w, T.CAN_DO, b"gone-%d" % i)
            send(engine, client, T.SUBMIT_JOB, b"job-%d" % i, b"", b"")
        peak = tracemalloc.get_traced_memory()[0] - before
        engine.disconnect(w)
        engine.disconnect(client)
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert engine.functions == {} and engine.jobs == {}
    print(f"\n20,000 functions (and 10,000 jobs): {peak} B; left once they went: {left} B")
    # What stays is the dicts' tables, which Python keeps at their peak size (about 50 B per
    # entry they once held); every function, job and registration is gone.
    assert left < 100 * 20_000
    assert left < peak / 10
