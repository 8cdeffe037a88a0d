"""Priorities, FIFO order and job selection (shared doc §3.3, §3.5, §2 JOB_ASSIGN forms)."""

from __future__ import annotations

from engine_helpers import (
    connect,
    grab,
    grab_handle,
    new_engine,
    packet,
    queued,
    replies,
    send,
    submit,
    worker,
)

from jobserver.protocol import PacketType as T


def assigned_payloads(engine, peer, count: int) -> list[bytes]:
    payloads = []
    for _ in range(count):
        assigned = grab(engine, peer)
        assert assigned.type == T.JOB_ASSIGN, assigned
        payloads.append(assigned.args[2])
    return payloads


def test_interleaved_priorities_come_out_high_normal_low_fifo_within_each():
    engine = new_engine()
    client = connect(engine)
    for data, kind in [
        ("low1", T.SUBMIT_JOB_LOW),
        ("norm1", T.SUBMIT_JOB),
        ("high1", T.SUBMIT_JOB_HIGH),
        ("low2", T.SUBMIT_JOB_LOW_BG),
        ("norm2", T.SUBMIT_JOB_BG),
        ("high2", T.SUBMIT_JOB_HIGH_BG),
    ]:
        submit(engine, client, b"fn", b"", data, kind)
    assert queued(engine) == [2, 2, 2]
    w = worker(engine, "fn")
    assert assigned_payloads(engine, w, 6) == [
        b"high1",
        b"high2",
        b"norm1",
        b"norm2",
        b"low1",
        b"low2",
    ]
    assert grab(engine, w) == packet(T.NO_JOB)
    assert queued(engine) == [0, 0, 0]


def test_many_jobs_of_one_priority_are_strictly_fifo():
    engine = new_engine()
    client = connect(engine)
    for i in range(50):
        submit(engine, client, b"fn", b"", str(i), T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    assert assigned_payloads(engine, w, 50) == [str(i).encode() for i in range(50)]


def test_epoch_and_reduce_jobs_are_normal_priority():
    engine = new_engine()
    client = connect(engine)
    now = int(engine.wall_clock())
    send(engine, client, T.SUBMIT_JOB_EPOCH, "fn", "", str(now - 1), "epoch")
    send(engine, client, T.SUBMIT_REDUCE_JOB, "fn", "", "red", "agg", "reduce")
    send(engine, client, T.SUBMIT_REDUCE_JOB_BACKGROUND, "fn", "", "red", "agg", "reduce-bg")
    assert [p.type for p in replies(client)] == [T.JOB_CREATED] * 3
    assert queued(engine) == [0, 3, 0]


def test_cross_function_selection_takes_highest_priority_first():
    # gearmand 1.1.x walks registrations latest-first and takes any job of the first function
    # with work (got B-high, B-low, A-high, A-norm); we take priority first (§3.3, §6.12).
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fa", b"", b"A-norm", T.SUBMIT_JOB_BG)
    submit(engine, client, b"fa", b"", b"A-high", T.SUBMIT_JOB_HIGH_BG)
    submit(engine, client, b"fb", b"", b"B-low", T.SUBMIT_JOB_LOW_BG)
    submit(engine, client, b"fb", b"", b"B-high", T.SUBMIT_JOB_HIGH_BG)
    w = worker(engine, "fa", "fb")
    assert assigned_payloads(engine, w, 4) == [b"A-high", b"B-high", b"A-norm", b"B-low"]


def test_cross_function_selection_is_oldest_first_within_a_priority():
    engine = new_engine()
    client = connect(engine)
    for data in ("b1", "a1", "b2", "a2"):
        submit(engine, client, b"f" + data[:1].encode(), b"", data, T.SUBMIT_JOB_BG)
    # Registration order must not matter: the oldest job of the priority goes first.
    w = worker(engine, "fa", "fb")
    assert assigned_payloads(engine, w, 4) == [b"b1", b"a1", b"b2", b"a2"]


def test_worker_only_gets_jobs_of_functions_it_registered():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"other", b"", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.NO_JOB)
    assert queued(engine, "other") == [0, 1, 0]


def test_grab_without_any_registration_is_no_job():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    idle = connect(engine)
    for grab_type in (T.GRAB_JOB, T.GRAB_JOB_UNIQ, T.GRAB_JOB_ALL):
        assert grab(engine, idle, grab_type) == packet(T.NO_JOB)


def test_can_do_name_is_the_whole_payload_so_trailing_nul_is_another_function():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, b"fn\0")
    assert grab(engine, w) == packet(T.NO_JOB)
    assert set(engine.functions) == {b"fn", b"fn\0"}


def test_empty_function_name_is_a_function_like_any_other():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"", b"", b"x")
    w = worker(engine, b"")
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"", b"x")


def test_grab_job_assigns_handle_function_and_data():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"uniq", b"pay\0load")
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"fn", b"pay\0load")


def test_grab_job_uniq_carries_the_unique_even_when_empty():
    engine = new_engine()
    client = connect(engine)
    with_unique = submit(engine, client, b"fn", b"uniq", b"one")
    without = submit(engine, client, b"fn", b"", b"two")
    w = worker(engine, "fn")
    assert grab(engine, w, T.GRAB_JOB_UNIQ) == packet(
        T.JOB_ASSIGN_UNIQ, with_unique, b"fn", b"uniq", b"one"
    )
    assert grab(engine, w, T.GRAB_JOB_UNIQ) == packet(
        T.JOB_ASSIGN_UNIQ, without, b"fn", b"", b"two"
    )


def test_grab_job_all_gives_assign_all_only_for_jobs_with_a_reducer():
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.SUBMIT_REDUCE_JOB, "fn", "u1", "red", "agg", "data1")
    send(engine, client, T.SUBMIT_REDUCE_JOB_BACKGROUND, "fn", "u2", "", "agg", "data2")
    reduce_handle, empty_reducer = (p.args[0] for p in replies(client))
    plain = submit(engine, client, b"fn", b"u3", b"data3")
    w = worker(engine, "fn")
    assert grab(engine, w, T.GRAB_JOB_ALL) == packet(
        T.JOB_ASSIGN_ALL, reduce_handle, b"fn", b"u1", b"red", b"data1"
    )
    assert grab(engine, w, T.GRAB_JOB_ALL) == packet(
        T.JOB_ASSIGN_UNIQ, empty_reducer, b"fn", b"u2", b"data2"
    )
    assert grab(engine, w, T.GRAB_JOB_ALL) == packet(
        T.JOB_ASSIGN_UNIQ, plain, b"fn", b"u3", b"data3"
    )


def test_reduce_job_through_grab_job_and_grab_job_uniq_uses_the_plain_forms():
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.SUBMIT_REDUCE_JOB, "fn", "u1", "red", "agg", "d1")
    send(engine, client, T.SUBMIT_REDUCE_JOB, "fn", "u2", "red", "agg", "d2")
    first, second = (p.args[0] for p in replies(client))
    w = worker(engine, "fn")
    assert grab(engine, w, T.GRAB_JOB) == packet(T.JOB_ASSIGN, first, b"fn", b"d1")
    assert grab(engine, w, T.GRAB_JOB_UNIQ) == packet(
        T.JOB_ASSIGN_UNIQ, second, b"fn", b"u2", b"d2"
    )


def test_a_worker_may_hold_several_jobs_at_once():
    engine = new_engine()
    client = connect(engine)
    first = submit(engine, client, b"fn", b"", b"1")
    second = submit(engine, client, b"fn", b"", b"2")
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == first
    assert grab_handle(engine, w) == second
    function = engine.functions[b"fn"]
    assert function.running == 2
    assert function.total == 2
    assert set(w.held) == {first, second}


def test_function_counters_follow_a_job_from_queue_to_running_to_done():
    engine = new_engine()
    client = connect(engine)
    w = worker(engine, "fn")
    function = engine.functions[b"fn"]
    assert (function.total, function.running, function.registrations) == (0, 0, 1)
    handle = submit(engine, client, b"fn", b"", b"x")
    assert (function.total, function.running) == (1, 0)
    grab_handle(engine, w)
    assert (function.total, function.running, queued(engine)) == (1, 1, [0, 0, 0])
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    assert (function.total, function.running) == (0, 0)
    assert handle not in engine.jobs


def test_one_connection_can_submit_and_work_on_the_same_job():
    engine = new_engine()
    peer = worker(engine, "fn")
    handle = submit(engine, peer, b"fn", b"", b"x")
    assert grab_handle(engine, peer) == handle
    send(engine, peer, T.WORK_COMPLETE, handle, b"done")
    assert replies(peer) == [packet(T.WORK_COMPLETE, handle, b"done")]


def test_duplicate_can_do_counts_twice_but_assigns_each_job_once():
    engine = new_engine()
    w = worker(engine, "fn", "fn")
    function = engine.functions[b"fn"]
    assert function.registrations == 2
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"only")
    assert grab(engine, w).type == T.JOB_ASSIGN
    assert grab(engine, w) == packet(T.NO_JOB)


def test_functions_are_created_by_submit_and_can_do_and_forgotten_when_unused():
    # gearmand keeps every function name it ever saw (§4 status); we forget one once nothing
    # uses it, so names clients mention once do not pile up (test_engine_function_lifetime).
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"made-by-submit", b"", b"")
    w = worker(engine, "made-by-can-do")
    assert {b"made-by-submit", b"made-by-can-do"} <= set(engine.functions)
    send(engine, w, T.CAN_DO, "made-by-submit")
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    assert {b"made-by-submit", b"made-by-can-do"} <= set(engine.functions)  # w registered
    send(engine, w, T.RESET_ABILITIES)
    assert engine.functions == {}
