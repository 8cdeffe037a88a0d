"""The engine's counts for metrics (engine/counters.py), without sockets: submits by kind,
results, wait and run times on fake clocks, totals that outlive an idle function, and the cap
on names counted on their own."""

from __future__ import annotations

from engine_helpers import advance, connect, grab_handle, new_engine, send, submit, worker

from jobserver.engine.counters import JOB_SECONDS_BUCKETS, OTHER, FunctionCounters, Histogram
from jobserver.protocol import PacketType as T


def test_submits_are_counted_by_kind_and_coalesced_ones_are_not():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"a")
    submit(engine, client, b"fn", b"a")  # coalesced onto the first: no new job
    submit(engine, client, b"fn", b"b", packet_type=T.SUBMIT_JOB_BG)
    submit(engine, client, b"fn", b"c", packet_type=T.SUBMIT_JOB_LOW_BG)
    counts = engine.counters.of(b"fn")
    assert (counts.submitted_foreground, counts.submitted_background) == (1, 2)


def test_wait_and_run_times_are_measured_from_queued_to_assigned_to_result():
    engine = new_engine()
    client = connect(engine)
    w = worker(engine, b"fn")
    for unique in (b"1", b"2", b"3"):
        submit(engine, client, b"fn", unique, packet_type=T.SUBMIT_JOB_BG)
    advance(engine, 2.0)  # every job waits 2 s ...
    handles = [grab_handle(engine, w) for _ in range(3)]
    advance(engine, 0.02)  # ... and runs 20 ms
    send(engine, w, T.WORK_COMPLETE, handles[0], b"ok")
    send(engine, w, T.WORK_FAIL, handles[1])
    send(engine, w, T.WORK_EXCEPTION, handles[2], b"boom")
    counts = engine.counters.of(b"fn")
    assert (counts.completed, counts.failed) == (1, 2)
    assert counts.wait is not None and counts.run is not None
    assert counts.wait.count == 3 and counts.run.count == 3
    assert counts.wait.total == 6.0 and abs(counts.run.total - 0.06) < 1e-9
    assert counts.wait.counts[JOB_SECONDS_BUCKETS.index(5.0)] == 3  # 1 < 2 s <= 5
    assert counts.run.counts[JOB_SECONDS_BUCKETS.index(0.05)] == 3  # 0.01 < 20 ms <= 0.05


def test_a_requeued_job_waits_again_from_its_requeue():
    engine = new_engine()
    client = connect(engine)
    first = worker(engine, b"fn")
    submit(engine, client, b"fn", b"x", packet_type=T.SUBMIT_JOB_BG)
    advance(engine, 1.0)
    grab_handle(engine, first)
    advance(engine, 10.0)
    engine.disconnect(first)  # requeued now, 11 s after it was first queued
    advance(engine, 0.5)
    grab_handle(engine, worker(engine, b"fn"))
    wait = engine.counters.of(b"fn").wait
    assert wait is not None and wait.count == 2 and wait.total == 1.5


def test_totals_outlive_a_forgotten_function():
    engine = new_engine()
    client = connect(engine)
    w = worker(engine, b"fn")
    submit(engine, client, b"fn", packet_type=T.SUBMIT_JOB_BG)
    send(engine, w, T.WORK_COMPLETE, grab_handle(engine, w), b"")
    engine.disconnect(w)
    assert b"fn" not in engine.functions  # idle: forgotten
    w = worker(engine, b"fn")
    submit(engine, client, b"fn", packet_type=T.SUBMIT_JOB_BG)
    send(engine, w, T.WORK_COMPLETE, grab_handle(engine, w), b"")
    assert engine.counters.of(b"fn").completed == 2


def test_names_past_the_cap_are_counted_together_as_other():
    counters = FunctionCounters(limit=2)
    assert counters.of(b"a").name == b"a"
    assert counters.of(b"b").name == b"b"
    assert counters.of(b"c") is counters.other
    assert counters.of(b"a").name == b"a"  # a name keeps its place
    assert counters.of(OTHER) is counters.other  # a function named "_other" shares it
    assert [counts.name for counts in counters.all()] == [b"a", b"b", OTHER]


def test_histogram_buckets_hold_values_up_to_their_bound():
    histogram = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 9.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1]
    assert histogram.count == 5 and histogram.total == 14.0
