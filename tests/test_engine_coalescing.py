"""Unique ids and coalescing (shared doc §3.2, §6.6, §6.10)."""

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

FG_SUBMITS = (T.SUBMIT_JOB, T.SUBMIT_JOB_HIGH, T.SUBMIT_JOB_LOW)
BG_SUBMITS = (T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW_BG)


def test_same_function_and_unique_get_the_existing_handle_without_a_new_job():
    engine = new_engine()
    first, second = connect(engine), connect(engine)
    handle = submit(engine, first, b"fn", b"u", b"a")
    assert submit(engine, second, b"fn", b"u", b"a") == handle
    assert len(engine.jobs) == 1
    assert engine.functions[b"fn"].total == 1
    # Coalesced submits do not consume handle numbers (§3.1).
    assert handle.endswith(b":1")
    assert submit(engine, first, b"fn", b"other", b"a").endswith(b":2")


def test_same_unique_under_another_function_is_a_separate_job():
    engine = new_engine()
    client = connect(engine)
    a = submit(engine, client, b"fa", b"u", b"x")
    b = submit(engine, client, b"fb", b"u", b"x")
    assert a != b
    assert engine.functions[b"fa"].total == engine.functions[b"fb"].total == 1


@pytest.mark.parametrize("kind", FG_SUBMITS + BG_SUBMITS)
def test_empty_unique_never_coalesces(kind):
    engine = new_engine()
    client = connect(engine)
    handles = {submit(engine, client, b"fn", b"", b"same", kind) for _ in range(3)}
    assert len(handles) == 3
    assert engine.functions[b"fn"].total == 3


def test_dash_unique_coalesces_on_the_exact_payload():
    engine = new_engine()
    client = connect(engine)
    a = submit(engine, client, b"fn", b"-", b"payload")
    assert submit(engine, client, b"fn", b"-", b"payload") == a
    assert submit(engine, client, b"fn", b"-", b"payload ") != a
    assert submit(engine, client, b"other", b"-", b"payload") != a
    assert len(engine.jobs) == 3


def test_dash_unique_with_empty_payload_never_coalesces():
    engine = new_engine()
    client = connect(engine)
    assert submit(engine, client, b"fn", b"-", b"") != submit(engine, client, b"fn", b"-", b"")


def test_dash_job_keeps_dash_as_its_unique():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"-", b"payload")
    w = worker(engine, "fn")
    assert grab(engine, w, T.GRAB_JOB_UNIQ) == packet(
        T.JOB_ASSIGN_UNIQ, handle, b"fn", b"-", b"payload"
    )


def test_literal_unique_equal_to_a_payload_does_not_match_a_dash_job():
    engine = new_engine()
    client = connect(engine)
    dash = submit(engine, client, b"fn", b"-", b"payload")
    literal = submit(engine, client, b"fn", b"payload", b"payload")
    assert literal != dash
    # ...and the other way round: a dash submit does not find the literal-unique job.
    engine2 = new_engine()
    client2 = connect(engine2)
    literal2 = submit(engine2, client2, b"fn", b"payload", b"payload")
    assert submit(engine2, client2, b"fn", b"-", b"payload") != literal2


def test_dash_job_can_be_coalesced_again_while_running_but_not_after_it_finished():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"-", b"p")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    assert submit(engine, client, b"fn", b"-", b"p") == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(client) == [packet(T.WORK_COMPLETE, handle, b"r")] * 2
    assert submit(engine, client, b"fn", b"-", b"p") != handle


def test_later_submit_payload_and_priority_are_ignored():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"u", b"first", T.SUBMIT_JOB_LOW)
    assert submit(engine, client, b"fn", b"u", b"second", T.SUBMIT_JOB_HIGH) == handle
    assert submit(engine, client, b"fn", b"u", b"third", T.SUBMIT_JOB_HIGH_BG) == handle
    assert queued(engine) == [0, 0, 1]
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"fn", b"first")


def test_coalescing_matches_a_running_job():
    engine = new_engine()
    first, second = connect(engine), connect(engine)
    handle = submit(engine, first, b"fn", b"u", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    assert submit(engine, second, b"fn", b"u", b"x") == handle
    assert engine.functions[b"fn"].total == 1
    send(engine, w, T.WORK_COMPLETE, handle, b"done")
    assert replies(first) == [packet(T.WORK_COMPLETE, handle, b"done")]
    assert replies(second) == [packet(T.WORK_COMPLETE, handle, b"done")]


def test_finished_unique_can_be_submitted_again_as_a_new_job():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"u", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_FAIL, handle)
    replies(client)
    again = submit(engine, client, b"fn", b"u", b"x")
    assert again != handle
    assert grab_handle(engine, w) == again


def test_64_byte_unique_is_accepted_and_coalesces():
    # gearmand stores only 63 bytes so a 64-byte unique never coalesces there; here it does.
    engine = new_engine()
    client = connect(engine)
    unique = b"u" * 64
    handle = submit(engine, client, b"fn", unique, b"x")
    assert submit(engine, client, b"fn", unique, b"x") == handle
    # A unique differing only in its 64th byte is another job.
    assert submit(engine, client, b"fn", b"u" * 63 + b"v", b"x") != handle
    w = worker(engine, "fn")
    assert grab(engine, w, T.GRAB_JOB_UNIQ).args[2] == unique


@pytest.mark.parametrize("kind", FG_SUBMITS + BG_SUBMITS)
def test_unique_over_64_bytes_is_rejected_and_creates_nothing(kind):
    engine = new_engine()
    client = connect(engine)
    send(engine, client, kind, "fn", "u" * 65, "x")
    assert reply(client) == error("ARGUMENT_TOO_LARGE", "Unique value too large")
    assert engine.jobs == {}
    assert client.listening == set()


@pytest.mark.parametrize("kind", [T.SUBMIT_REDUCE_JOB, T.SUBMIT_REDUCE_JOB_BACKGROUND])
def test_reduce_submit_with_unique_over_64_bytes_is_rejected(kind):
    # gearmand checks the reducer instead and accepts a 100-byte unique (§3.12); we check the
    # unique, which is what the limit is for.
    engine = new_engine()
    client = connect(engine)
    send(engine, client, kind, "fn", "u" * 65, "red", "agg", "x")
    assert reply(client) == error("ARGUMENT_TOO_LARGE", "Unique value too large")
    assert engine.jobs == {}


def test_epoch_submit_with_unique_over_64_bytes_is_rejected():
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.SUBMIT_JOB_EPOCH, "fn", "u" * 65, "0", "x")
    assert reply(client) == error("ARGUMENT_TOO_LARGE", "Unique value too large")
    assert engine.jobs == {}


def test_every_fg_submit_adds_a_listener_that_gets_results():
    engine = new_engine()
    clients = [connect(engine) for _ in range(3)]
    handles = {submit(engine, c, b"fn", b"u", b"x") for c in clients}
    (handle,) = handles
    assert len(engine.jobs[handle].listeners) == 3
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_STATUS, handle, b"1", b"2")
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    for c in clients:
        assert replies(c) == [
            packet(T.WORK_STATUS, handle, b"1", b"2"),
            packet(T.WORK_COMPLETE, handle, b"r"),
        ]


def test_late_listener_only_sees_packets_sent_after_it_attached():
    engine = new_engine()
    early, late = connect(engine), connect(engine)
    handle = submit(engine, early, b"fn", b"u", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_DATA, handle, b"chunk1")
    send(engine, w, T.WORK_STATUS, handle, b"1", b"2")
    assert submit(engine, late, b"fn", b"u", b"x") == handle
    send(engine, w, T.WORK_DATA, handle, b"chunk2")
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(early) == [
        packet(T.WORK_DATA, handle, b"chunk1"),
        packet(T.WORK_STATUS, handle, b"1", b"2"),
        packet(T.WORK_DATA, handle, b"chunk2"),
        packet(T.WORK_COMPLETE, handle, b"r"),
    ]
    assert replies(late) == [
        packet(T.WORK_DATA, handle, b"chunk2"),
        packet(T.WORK_COMPLETE, handle, b"r"),
    ]


def test_same_connection_submitting_twice_gets_every_packet_twice():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"u", b"x")
    assert submit(engine, client, b"fn", b"u", b"x") == handle
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_DATA, handle, b"d")
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(client) == [
        packet(T.WORK_DATA, handle, b"d"),
        packet(T.WORK_DATA, handle, b"d"),
        packet(T.WORK_COMPLETE, handle, b"r"),
        packet(T.WORK_COMPLETE, handle, b"r"),
    ]


def test_bg_submit_coalescing_onto_a_fg_job_gets_nothing_after_job_created():
    engine = new_engine()
    fg, bg = connect(engine), connect(engine)
    handle = submit(engine, fg, b"fn", b"u", b"x")
    assert submit(engine, bg, b"fn", b"u", b"x", T.SUBMIT_JOB_BG) == handle
    assert len(engine.jobs[handle].listeners) == 1
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_STATUS, handle, b"1", b"2")
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(bg) == []
    assert len(replies(fg)) == 2


def test_bg_job_survives_its_fg_coalescer_leaving_while_queued():
    # gearmand discards the job here (§3.2 "Hazard"); a job someone submitted in the
    # background must still run.
    engine = new_engine()
    bg, fg = connect(engine), connect(engine)
    handle = submit(engine, bg, b"fn", b"u", b"x", T.SUBMIT_JOB_BG)
    assert submit(engine, fg, b"fn", b"u", b"x") == handle
    engine.disconnect(fg)
    assert get_status(engine, bg, handle) == (b"1", b"0", b"0", b"0")
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle


def test_fg_job_made_background_by_a_later_bg_submit_survives_the_fg_client_leaving():
    engine = new_engine()
    fg, bg = connect(engine), connect(engine)
    handle = submit(engine, fg, b"fn", b"u", b"x")
    assert submit(engine, bg, b"fn", b"u", b"x", T.SUBMIT_JOB_LOW_BG) == handle
    engine.disconnect(fg)
    assert engine.functions[b"fn"].total == 1
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle


def test_running_bg_job_survives_its_fg_coalescer_leaving_and_is_requeued_on_worker_loss():
    engine = new_engine()
    bg, fg = connect(engine), connect(engine)
    handle = submit(engine, bg, b"fn", b"u", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "fn")
    grab_handle(engine, w)
    assert submit(engine, fg, b"fn", b"u", b"x") == handle
    engine.disconnect(fg)
    engine.disconnect(w)
    assert queued(engine) == [0, 1, 0]
    assert grab_handle(engine, worker(engine, "fn")) == handle


def test_fg_job_survives_while_any_of_its_listeners_remains():
    engine = new_engine()
    first, second = connect(engine), connect(engine)
    handle = submit(engine, first, b"fn", b"u", b"x")
    submit(engine, second, b"fn", b"u", b"x")
    engine.disconnect(first)
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(second) == [packet(T.WORK_COMPLETE, handle, b"r")]


def test_coalesced_submit_is_not_refused_by_maxqueue():
    # maxqueue is checked only when a new job would be created (§3.2).
    engine = new_engine()
    client = connect(engine)
    engine.set_max_queue(b"fn", [1, 1, 1])
    handle = submit(engine, client, b"fn", b"u", b"x")
    assert submit(engine, client, b"fn", b"u", b"x", T.SUBMIT_JOB_HIGH) == handle
    send(engine, client, T.SUBMIT_JOB, "fn", "other", "x")
    assert reply(client) == error("QUEUE_ERROR", "Job queue is full")
