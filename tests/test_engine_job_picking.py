"""Which job a worker gets (shared doc §3.3): the highest priority across all of its functions,
oldest first within a priority, found in O(log n) of its functions (engine/abilities.py).

The cases here pin the lazy heaps' corners (functions that empty and refill, CANT_DO and
CAN_DO again, requeues); a property test checks every grab against a brute-force scan of the
engine's queues, the rule as the old linear `_pick_job` applied it.
"""

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
    worker,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jobserver.engine import Engine, JobState, Peer
from jobserver.engine.abilities import STALE_HEAP_ENTRIES
from jobserver.protocol import PacketType as T

NOOP = packet(T.NOOP)


def test_among_many_functions_the_single_queued_job_is_found():
    engine = new_engine()
    w = worker(engine, *(f"f{i}" for i in range(2000)))
    client = connect(engine)
    handle = submit(engine, client, b"f1234", b"", b"x", T.SUBMIT_JOB_BG)
    assert grab_handle(engine, w) == handle
    assert grab(engine, w) == packet(T.NO_JOB)


def test_high_beats_older_normal_across_functions_and_fifo_holds_within_a_priority():
    engine = new_engine()
    w = worker(engine, *(f"f{i}" for i in range(100)))
    client = connect(engine)
    normal_old = submit(engine, client, b"f7", b"", b"", T.SUBMIT_JOB_BG)
    low = submit(engine, client, b"f3", b"", b"", T.SUBMIT_JOB_LOW_BG)
    normal_new = submit(engine, client, b"f2", b"", b"", T.SUBMIT_JOB_BG)
    high = submit(engine, client, b"f99", b"", b"", T.SUBMIT_JOB_HIGH_BG)
    got = [grab_handle(engine, w) for _ in range(4)]
    assert got == [high, normal_old, normal_new, low]


def test_a_function_that_emptied_and_refilled_is_picked_again():
    engine = new_engine()
    w = worker(engine, "fa", "fb")
    client = connect(engine)
    first = submit(engine, client, b"fa", b"", b"", T.SUBMIT_JOB_BG)
    assert grab_handle(engine, w) == first
    assert grab(engine, w) == packet(T.NO_JOB)  # fa is empty now
    again = submit(engine, client, b"fa", b"", b"", T.SUBMIT_JOB_BG)
    assert grab_handle(engine, w) == again


def test_another_worker_taking_the_head_leaves_the_next_job_for_this_one():
    engine = new_engine()
    a, b = worker(engine, "fn", "other"), worker(engine, "fn")
    client = connect(engine)
    handles = [submit(engine, client, b"fn", b"", b"", T.SUBMIT_JOB_BG) for _ in range(3)]
    assert grab_handle(engine, b) == handles[0]
    assert grab_handle(engine, b) == handles[1]
    assert grab_handle(engine, a) == handles[2]  # its heap still said handles[0]: raised
    assert grab(engine, a) == packet(T.NO_JOB)


def test_cant_do_then_can_do_again_finds_jobs_queued_meanwhile():
    engine = new_engine()
    w = worker(engine, "fn")
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"", T.SUBMIT_JOB_BG)
    send(engine, w, T.CANT_DO, "fn")
    assert grab(engine, w) == packet(T.NO_JOB)
    queued_while_away = submit(engine, client, b"fn", b"", b"", T.SUBMIT_JOB_HIGH_BG)
    send(engine, w, T.CAN_DO, "fn")
    assert grab_handle(engine, w) == queued_while_away


def test_a_requeued_job_goes_behind_younger_jobs_of_other_functions():
    engine = new_engine()
    w = worker(engine, "fa", "fb")
    client = connect(engine)
    first = submit(engine, client, b"fa", b"", b"", T.SUBMIT_JOB_BG)
    lost = worker(engine, "fa")
    assert grab_handle(engine, lost) == first
    younger = submit(engine, client, b"fb", b"", b"", T.SUBMIT_JOB_BG)
    engine.disconnect(lost)  # `first` is requeued at the tail (§3.6)
    assert [grab_handle(engine, w) for _ in range(2)] == [younger, first]


def test_cycling_cant_do_and_can_do_does_not_grow_the_ready_heaps():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"", T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    for _ in range(1000):
        send(engine, w, T.CANT_DO, "fn")
        send(engine, w, T.CAN_DO, "fn")
    assert w.abilities is not None
    assert all(len(heap) <= 2 + STALE_HEAP_ENTRIES for heap in w.abilities.ready)
    assert grab(engine, w).type == T.JOB_ASSIGN


def test_pre_sleep_with_many_empty_functions_sleeps_and_a_job_in_any_of_them_wakes():
    engine = new_engine()
    w = worker(engine, *(f"f{i}" for i in range(5000)))
    send(engine, w, T.PRE_SLEEP)
    assert replies(w) == []
    client = connect(engine)
    submit(engine, client, b"f4321", b"", b"", T.SUBMIT_JOB_BG)
    assert replies(w) == [NOOP]


# ------------------------------------------------------------------ property: the rule holds

FUNCTIONS = [b"fa", b"fb", b"fc"]
SUBMITS = [T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW_BG, T.SUBMIT_JOB]

WORKERS = 2

submit_op = st.tuples(st.just("submit"), st.sampled_from(FUNCTIONS), st.sampled_from(SUBMITS))
grab_op = st.tuples(st.just("grab"), st.integers(0, WORKERS - 1))
operation = st.one_of(
    # Submits and grabs weigh most: the heaps' corners come from their interleaving.
    submit_op,
    submit_op,
    grab_op,
    grab_op,
    st.tuples(st.just("can_do"), st.integers(0, WORKERS - 1), st.sampled_from(FUNCTIONS)),
    st.tuples(st.just("cant_do"), st.integers(0, WORKERS - 1), st.sampled_from(FUNCTIONS)),
    st.tuples(st.just("complete"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("reconnect"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
)

STALE_KEY_EXAMPLE = [
    ("can_do", 0, b"fa"),
    ("can_do", 0, b"fb"),
    ("submit", b"fa", T.SUBMIT_JOB_BG),
    ("submit", b"fb", T.SUBMIT_JOB_BG),
    ("submit", b"fa", T.SUBMIT_JOB_BG),
    ("grab", 0),
    ("grab", 0),  # fa's key is stale (its head moved on): fb's older job comes first
]


def expected_job(engine: Engine, peer: Peer) -> bytes | None:
    """The brute-force answer: over every queued job of the worker's functions, the lowest
    (priority, enqueue order)."""
    registered = set(peer.abilities.registrations) if peer.abilities else set()
    candidates = [
        (job.priority, job.sequence, job.handle)
        for job in engine.jobs.values()
        if job.state == JobState.QUEUED and job.function in registered
    ]
    return min(candidates)[2] if candidates else None


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sets(st.sampled_from(FUNCTIONS)), min_size=WORKERS, max_size=WORKERS),
    st.lists(operation, max_size=60),
)
@example([set(), set()], STALE_KEY_EXAMPLE)
def test_every_grab_gets_what_a_scan_of_all_queues_would_pick(registered, operations):
    engine = new_engine()
    client = connect(engine)
    workers = [worker(engine, *sorted(functions)) for functions in registered]
    for kind, *args in operations:
        if kind == "submit":
            function, packet_type = args
            send(engine, client, packet_type, function, b"", b"x")
        elif kind == "can_do":
            send(engine, workers[args[0]], T.CAN_DO, args[1])
        elif kind == "cant_do":
            send(engine, workers[args[0]], T.CANT_DO, args[1])
        elif kind == "grab":
            w = workers[args[0]]
            replies(w)
            want = expected_job(engine, w)
            got = grab(engine, w)
            if want is None:
                assert got == packet(T.NO_JOB)
            else:
                assert got.type == T.JOB_ASSIGN and got.args[0] == want
        elif kind == "complete":
            w = workers[args[0]]
            if w.held:
                send(engine, w, T.WORK_COMPLETE, next(iter(w.held)), b"")
        elif kind == "reconnect":
            engine.disconnect(workers[args[0]])
            workers[args[0]] = connect(engine)
        elif kind == "cancel":
            handles = sorted(engine.jobs)
            if handles:
                engine.cancel_job(handles[args[0] % len(handles)])
    for w in workers:
        replies(w)
        want = expected_job(engine, w)
        got = grab(engine, w)
        assert (got.args[0] if got.type == T.JOB_ASSIGN else None) == want
