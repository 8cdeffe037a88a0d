"""The durable engine without sockets: journal, withheld acknowledgements, restore (issue 4).

`Engine(durable=True)` journals every new background job and withholds its JOB_CREATED until
the I/O layer reports the commit (`commit_finished`). These tests play the I/O layer by hand:
`commit(engine)` takes the journal's batch and reports it committed (or failed), so every
interleaving of submits, commits, grabs and disconnects can be set up exactly. Some tests also
apply batches to a real SqliteStore in tmp_path.
"""

from __future__ import annotations

import pytest
from engine_helpers import (
    START_TIME,
    advance,
    commit,
    connect,
    durable_engine,
    get_status,
    grab,
    new_engine,
    packet,
    queued,
    replies,
    send,
    worker,
)

from jobserver.engine import Engine
from jobserver.engine.journal import Batch, StoredJob
from jobserver.protocol import PacketType as T
from jobserver.store import StoreError, database_path, open_store

STORE_ERROR = "Job could not be stored: job database /x/jobserver-1.sqlite3: disk is full"


def queue_error(text: str = STORE_ERROR):
    return packet(T.ERROR, b"QUEUE_ERROR", text)


def created(handle: bytes):
    return packet(T.JOB_CREATED, handle)


def pending_handle(engine: Engine, unique: bytes) -> bytes:
    """The handle of the (not yet acknowledged) job with that unique."""
    (job,) = [job for job in engine.iter_jobs() if job.unique == unique]
    return job.handle


def submit_bg(engine, client, unique=b"", data=b"x", function=b"fn", kind=T.SUBMIT_JOB_BG):
    send(engine, client, kind, function, unique, data)


# --- acknowledgement waits for the commit --------------------------------------------------


@pytest.mark.parametrize(
    "kind", [T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW_BG, "epoch", "reduce"]
)
def test_background_job_created_is_withheld_until_its_commit(kind):
    engine = durable_engine()
    client = connect(engine)
    if kind == "epoch":
        send(engine, client, T.SUBMIT_JOB_EPOCH, b"fn", b"u", str(int(START_TIME) + 60), b"x")
    elif kind == "reduce":
        send(engine, client, T.SUBMIT_REDUCE_JOB_BACKGROUND, b"fn", b"u", b"red", b"", b"x")
    else:
        submit_bg(engine, client, b"u", kind=kind)
    assert replies(client) == []
    assert engine.journal.has_work
    handle = pending_handle(engine, b"u")

    batch = commit(engine)
    assert [stored.unique for stored in batch.adds] == [b"u"]
    assert replies(client) == [created(handle)]
    assert not engine.journal.has_work


def test_foreground_submits_are_not_journalled_and_answered_at_once():
    engine = durable_engine()
    client = connect(engine)
    for kind in (T.SUBMIT_JOB, T.SUBMIT_JOB_HIGH, T.SUBMIT_JOB_LOW):
        send(engine, client, kind, b"fn", b"", b"x")
    send(engine, client, T.SUBMIT_REDUCE_JOB, b"fn", b"", b"r", b"", b"x")
    assert [p.type for p in replies(client)] == [T.JOB_CREATED] * 4
    assert not engine.journal.has_work


def test_a_store_less_engine_acknowledges_background_jobs_at_once():
    engine = new_engine()  # durable=False: the memory store
    client = connect(engine)
    submit_bg(engine, client, b"u")
    assert [p.type for p in replies(client)] == [T.JOB_CREATED]
    assert engine.journal is None


def test_later_replies_on_the_same_connection_wait_behind_the_pending_one_in_order():
    engine = durable_engine()
    client = connect(engine)
    submit_bg(engine, client, b"bg")
    send(engine, client, T.SUBMIT_JOB, b"fn", b"fg", b"y")  # needs no commit itself
    send(engine, client, T.ECHO_REQ, b"after")
    send(engine, client, T.GET_STATUS, b"H:nope")
    assert replies(client) == []
    bg, fg = pending_handle(engine, b"bg"), pending_handle(engine, b"fg")

    commit(engine)
    assert replies(client) == [
        created(bg),
        created(fg),
        packet(T.ECHO_RES, b"after"),
        packet(T.STATUS_RES, b"H:nope", b"0", b"0", b"0", b"0"),
    ]
    # Nothing held any more: the next reply goes out at once.
    send(engine, client, T.ECHO_REQ, b"now")
    assert replies(client) == [packet(T.ECHO_RES, b"now")]


def test_replies_behind_a_second_pending_submit_wait_for_its_own_commit():
    engine = durable_engine()
    client = connect(engine)
    submit_bg(engine, client, b"first")
    in_flight = engine.journal.take_batch()  # being written
    send(engine, client, T.ECHO_REQ, b"between")
    submit_bg(engine, client, b"second")  # goes into the next batch
    send(engine, client, T.ECHO_REQ, b"last")

    engine.commit_finished(in_flight)
    assert replies(client) == [
        created(pending_handle(engine, b"first")),
        packet(T.ECHO_RES, b"between"),
    ]
    commit(engine)
    assert replies(client) == [
        created(pending_handle(engine, b"second")),
        packet(T.ECHO_RES, b"last"),
    ]


def test_other_connections_are_not_held_by_a_pending_commit():
    engine = durable_engine()
    client, other = connect(engine), connect(engine)
    submit_bg(engine, client, b"bg")
    send(engine, other, T.ECHO_REQ, b"free")
    send(engine, other, T.SUBMIT_JOB, b"fn", b"", b"fg")
    got = replies(other)
    assert got[0] == packet(T.ECHO_RES, b"free")
    assert got[1].type == T.JOB_CREATED
    assert replies(client) == []


def test_a_pending_job_is_not_grabbable_until_committed_and_then_wakes_sleepers():
    engine = durable_engine()
    client = connect(engine)
    sleeper = worker(engine, "fn")
    send(engine, sleeper, T.PRE_SLEEP)
    busy = worker(engine, "fn")
    submit_bg(engine, client, b"u", b"payload")
    assert replies(sleeper) == []  # no NOOP for a job nobody may run yet
    assert grab(engine, busy, T.GRAB_JOB_UNIQ) == packet(T.NO_JOB)
    handle = pending_handle(engine, b"u")

    commit(engine)
    assert replies(sleeper) == [packet(T.NOOP)]
    assert grab(engine, busy, T.GRAB_JOB_UNIQ) == packet(
        T.JOB_ASSIGN_UNIQ, handle, b"fn", b"u", b"payload"
    )


def test_a_pending_epoch_job_waits_for_its_time_after_the_commit():
    engine = durable_engine()
    client = connect(engine)
    w = worker(engine, "fn")
    send(engine, client, T.SUBMIT_JOB_EPOCH, b"fn", b"u", str(int(START_TIME) + 10), b"x")
    commit(engine)
    assert replies(client)[0].type == T.JOB_CREATED
    assert grab(engine, w) == packet(T.NO_JOB)
    advance(engine, 10)
    assert grab(engine, w).type == T.JOB_ASSIGN


def test_coalesced_submits_on_a_pending_job_wait_and_all_get_job_created():
    engine = durable_engine()
    first, bg_again, fg_client = connect(engine), connect(engine), connect(engine)
    submit_bg(engine, first, b"u", b"one")
    submit_bg(engine, bg_again, b"u", b"two", kind=T.SUBMIT_JOB_LOW_BG)
    send(engine, fg_client, T.SUBMIT_JOB, b"fn", b"u", b"three")
    assert replies(first) == replies(bg_again) == replies(fg_client) == []
    assert len(engine.jobs) == 1
    handle = pending_handle(engine, b"u")

    batch = commit(engine)
    assert len(batch.adds) == 1  # one record for the three submits
    for peer in (first, bg_again, fg_client):
        assert replies(peer) == [created(handle)]
    # The foreground submitter is a listener of the job like any other.
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"fn", b"one")
    send(engine, w, T.WORK_COMPLETE, handle, b"done")
    assert replies(fg_client) == [packet(T.WORK_COMPLETE, handle, b"done")]
    assert replies(first) == replies(bg_again) == []


def test_a_submitter_that_left_before_the_commit_leaves_a_stored_runnable_job():
    engine = durable_engine()
    client = connect(engine)
    submit_bg(engine, client, b"u")
    handle = pending_handle(engine, b"u")
    engine.disconnect(client)
    commit(engine)  # no one to tell; the record is there and the job runs
    w = worker(engine, "fn")
    assert grab(engine, w).args[0] == handle


# --- a commit that fails -------------------------------------------------------------------


def test_failed_commit_answers_queue_error_in_the_submits_place_and_the_job_never_existed():
    engine = durable_engine()
    client, observer = connect(engine), connect(engine)
    w = worker(engine, "fn")
    send(engine, client, T.ECHO_REQ, b"before")
    submit_bg(engine, client, b"u")
    send(engine, client, T.ECHO_REQ, b"after")
    handle = pending_handle(engine, b"u")
    assert replies(client) == [packet(T.ECHO_RES, b"before")]

    commit(engine, STORE_ERROR)
    assert replies(client) == [queue_error(), packet(T.ECHO_RES, b"after")]
    assert get_status(engine, observer, handle) == (b"0", b"0", b"0", b"0")
    send(engine, observer, T.GET_STATUS_UNIQUE, b"u")
    assert replies(observer)[0].args[1] == b"0"
    assert grab(engine, w) == packet(T.NO_JOB)
    assert engine.jobs == {}
    assert engine.functions[b"fn"].total == 0
    assert not engine.journal.has_work  # nothing to remove: the record was never written

    # The unique is free again: a new submit makes a new job, journalled afresh.
    submit_bg(engine, client, b"u")
    assert pending_handle(engine, b"u") != handle
    commit(engine)
    assert replies(client) == [created(pending_handle(engine, b"u"))]


def test_failed_commit_fails_every_submit_of_its_batch_and_only_those():
    engine = durable_engine()
    a, b = connect(engine), connect(engine)
    submit_bg(engine, a, b"a1")
    failing = engine.journal.take_batch()
    submit_bg(engine, b, b"b1")  # next batch
    engine.commit_finished(failing, STORE_ERROR)
    assert replies(a) == [queue_error()]
    assert replies(b) == []
    commit(engine)
    assert replies(b) == [created(pending_handle(engine, b"b1"))]


def test_coalesced_listeners_of_a_job_whose_commit_fails_get_the_error_and_nothing_else():
    engine = durable_engine()
    bg_client, fg_client, fg_twice = connect(engine), connect(engine), connect(engine)
    submit_bg(engine, bg_client, b"u")
    send(engine, fg_client, T.SUBMIT_JOB, b"fn", b"u", b"x")
    send(engine, fg_twice, T.SUBMIT_JOB_HIGH, b"fn", b"u", b"x")
    send(engine, fg_twice, T.SUBMIT_JOB, b"fn", b"u", b"x")

    commit(engine, STORE_ERROR)
    assert replies(bg_client) == [queue_error()]
    assert replies(fg_client) == [queue_error()]
    assert replies(fg_twice) == [queue_error(), queue_error()]
    assert fg_client.listening == set() and fg_twice.listening == set()

    # Nothing follows: the job is not handed out, cancelling finds nothing, and a new job with
    # the same unique is not theirs.
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.NO_JOB)
    other = connect(engine)
    send(engine, other, T.SUBMIT_JOB, b"fn", b"u", b"new")
    (new,) = replies(other)
    assert grab(engine, w).args[0] == new.args[0]
    send(engine, w, T.WORK_COMPLETE, new.args[0], b"r")
    assert replies(other) == [packet(T.WORK_COMPLETE, new.args[0], b"r")]
    for peer in (bg_client, fg_client, fg_twice):
        assert replies(peer) == []
        engine.disconnect(peer)  # and leaving is harmless


def test_a_refused_reply_held_behind_a_later_batch_is_still_an_error_when_it_goes_out():
    """A client submits a new job (its record goes into the next batch), then coalesces onto
    a job whose record is already being written. That batch is refused; the second reply must
    wait behind the first (replies keep request order), and when the next batch commits it
    must still go out as the refusal, not as JOB_CREATED for a job that never existed."""
    engine = durable_engine()
    other, client = connect(engine), connect(engine)
    submit_bg(engine, other, b"in-flight")
    in_flight = engine.journal.take_batch()
    submit_bg(engine, client, b"own")
    send(engine, client, T.SUBMIT_JOB_BG, b"fn", b"in-flight", b"x")
    own = pending_handle(engine, b"own")

    engine.commit_finished(in_flight, STORE_ERROR)
    assert replies(other) == [queue_error()]
    assert replies(client) == []  # both wait for the first reply's batch
    commit(engine)
    assert replies(client) == [created(own), queue_error()]


@pytest.mark.parametrize("running", [False, True], ids=["queued", "running"])
def test_foreground_job_taken_over_by_a_background_submit_whose_commit_fails_stays_foreground(
    running,
):
    engine = durable_engine()
    fg_client, bg_client = connect(engine), connect(engine)
    w = worker(engine, "fn")
    send(engine, fg_client, T.SUBMIT_JOB, b"fn", b"u", b"x")
    (created_fg,) = replies(fg_client)  # a foreground job is answered at once
    handle = created_fg.args[0]
    if running:
        assert grab(engine, w).args[0] == handle
    submit_bg(engine, bg_client, b"u")
    assert replies(bg_client) == []  # it must be recorded before this answer
    assert engine.journal.has_work

    commit(engine, STORE_ERROR)
    assert replies(bg_client) == [queue_error()]
    job = engine.jobs[handle]
    assert not job.background and not job.record_id
    # Still the foreground client's job: it runs and the client gets the result.
    if not running:
        assert grab(engine, w).args[0] == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"result")
    assert replies(fg_client) == [packet(T.WORK_COMPLETE, handle, b"result")]
    assert engine.jobs == {}
    assert not engine.journal.has_work  # no record was written, none to remove


def test_a_taken_over_queued_job_whose_fg_client_left_is_dropped_when_the_commit_fails():
    engine = durable_engine()
    fg_client, bg_client, observer = connect(engine), connect(engine), connect(engine)
    send(engine, fg_client, T.SUBMIT_JOB, b"fn", b"u", b"x")
    handle = replies(fg_client)[0].args[0]
    submit_bg(engine, bg_client, b"u")
    engine.disconnect(fg_client)  # the job is background now: it stays
    assert handle in engine.jobs

    commit(engine, STORE_ERROR)
    assert replies(bg_client) == [queue_error()]
    # Foreground again with nobody waiting: abandoned, as any such job.
    assert get_status(engine, observer, handle) == (b"0", b"0", b"0", b"0")
    assert grab(engine, worker(engine, "fn")) == packet(T.NO_JOB)
    assert engine.functions[b"fn"].total == 0


def test_a_taken_over_running_job_whose_fg_client_left_runs_on_to_nobody():
    engine = durable_engine()
    fg_client, bg_client = connect(engine), connect(engine)
    w = worker(engine, "fn")
    send(engine, fg_client, T.SUBMIT_JOB, b"fn", b"u", b"x")
    handle = replies(fg_client)[0].args[0]
    assert grab(engine, w).args[0] == handle
    submit_bg(engine, bg_client, b"u")
    engine.disconnect(fg_client)
    commit(engine, STORE_ERROR)
    assert replies(bg_client) == [queue_error()]
    send(engine, w, T.WORK_COMPLETE, handle, b"nobody listens")
    assert replies(w) == []
    assert engine.jobs == {}
    assert engine.functions[b"fn"].total == 0


def test_a_successful_takeover_makes_the_foreground_job_durable():
    engine = durable_engine()
    fg_client, bg_client = connect(engine), connect(engine)
    send(engine, fg_client, T.SUBMIT_JOB, b"fn", b"u", b"x")
    handle = replies(fg_client)[0].args[0]
    submit_bg(engine, bg_client, b"u")
    batch = commit(engine)
    assert [(s.unique, s.payload) for s in batch.adds] == [(b"u", b"x")]
    assert replies(bg_client) == [created(handle)]
    engine.disconnect(fg_client)  # the job survives its foreground client now
    w = worker(engine, "fn")
    assert grab(engine, w).args[0] == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert engine.journal.take_batch().removes == [batch.adds[0].record_id]


# --- journal batches -----------------------------------------------------------------------


def test_finishing_failing_and_cancelling_stored_jobs_journal_their_removal():
    engine = durable_engine()
    client = connect(engine)
    for unique in (b"done", b"failed", b"exception", b"cancelled", b"kept"):
        submit_bg(engine, client, unique)
    records = {stored.unique: stored.record_id for stored in commit(engine).adds}
    assert len(set(records.values())) == 5
    w = worker(engine, "fn")
    for ending in (T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION):
        handle = grab(engine, w).args[0]
        send(engine, w, ending, *((handle,) if ending == T.WORK_FAIL else (handle, b"r")))
    assert engine.cancel_job(pending_handle(engine, b"cancelled"))
    batch = engine.journal.take_batch()
    assert batch.adds == []
    assert batch.removes == [records[u] for u in (b"done", b"failed", b"exception", b"cancelled")]


def test_retry_exhaustion_journals_the_removal():
    engine = durable_engine(job_retries=1)
    client = connect(engine)
    submit_bg(engine, client, b"u")
    (stored,) = commit(engine).adds
    w = worker(engine, "fn")
    grab(engine, w)
    engine.disconnect(w)  # the one attempt is used up: the job is failed and dropped
    assert engine.jobs == {}
    assert engine.journal.take_batch().removes == [stored.record_id]


def test_a_requeued_job_keeps_its_record():
    engine = durable_engine()
    client = connect(engine)
    submit_bg(engine, client, b"u")
    commit(engine)
    w = worker(engine, "fn")
    grab(engine, w)
    engine.disconnect(w)  # requeued (unlimited retries): still the same stored job
    assert not engine.journal.has_work


def apply_next_batch(engine: Engine, store) -> Batch:
    """What the server's commit loop does: take the batch, apply it, report success."""
    batch = engine.journal.take_batch()
    store.apply(batch.adds, batch.removes)
    engine.commit_finished(batch)
    return batch


@pytest.fixture
def sqlite_store(tmp_path):
    store = open_store("sqlite", tmp_path, 4730)
    yield store
    store.close()


def test_a_batch_adds_before_it_removes_so_a_job_added_and_removed_in_it_is_not_stored(
    sqlite_store,
):
    """A job cancelled while its record waits in the journal: the batch holds its add and
    its removal, and the store must end up without it (else it runs again after a restart)."""
    engine = durable_engine()
    client = connect(engine)
    submit_bg(engine, client, b"cancelled-while-pending")
    submit_bg(engine, client, b"kept")
    assert engine.cancel_job(pending_handle(engine, b"cancelled-while-pending"))
    batch = apply_next_batch(engine, sqlite_store)
    assert len(batch.removes) == 1
    assert [s.unique for s in sqlite_store.load()] == [b"kept"]


def test_a_taken_over_foreground_job_that_finishes_before_its_record_is_written_is_not_stored(
    sqlite_store,
):
    """A running foreground job, a background submit that coalesces onto it (its record is
    journalled), and the worker completes it before the commit loop takes the batch (a commit
    was in flight). The job is over: it must not be in the store afterwards."""
    engine = durable_engine()
    fg_client, bg_client = connect(engine), connect(engine)
    submit_bg(engine, bg_client, b"other")
    in_flight = engine.journal.take_batch()  # a commit being written meanwhile
    w = worker(engine, "fn")
    send(engine, fg_client, T.SUBMIT_JOB, b"fn", b"u", b"x")
    handle = replies(fg_client)[0].args[0]
    assert grab(engine, w).args[0] == handle
    submit_bg(engine, bg_client, b"u")
    send(engine, w, T.WORK_COMPLETE, handle, b"done")
    assert replies(fg_client) == [packet(T.WORK_COMPLETE, handle, b"done")]
    sqlite_store.apply(in_flight.adds, in_flight.removes)
    engine.commit_finished(in_flight)

    apply_next_batch(engine, sqlite_store)
    assert [s.unique for s in sqlite_store.load()] == [b"other"]
    assert [p.type for p in replies(bg_client)] == [T.JOB_CREATED, T.JOB_CREATED]


def test_every_record_written_has_the_record_id_its_removal_will_use(sqlite_store):
    """Records are keyed by record id; two jobs must never share one, and a record must be
    removable (a record written under an id no job holds would come back at every start)."""
    engine = durable_engine()
    client = connect(engine)
    for unique in (b"a", b"b", b"c"):
        submit_bg(engine, client, unique)
    for unique in (b"a", b"b"):
        engine.cancel_job(pending_handle(engine, unique))
    batch = apply_next_batch(engine, sqlite_store)
    assert all(s.record_id > 0 for s in batch.adds), batch.adds
    assert len({s.record_id for s in batch.adds}) == len(batch.adds)
    assert [s.unique for s in sqlite_store.load()] == [b"c"]


def test_removals_of_a_failed_batch_are_retried_in_the_next_one_and_its_adds_are_not():
    engine = durable_engine()
    client = connect(engine)
    submit_bg(engine, client, b"finished")
    (finished,) = commit(engine).adds
    w = worker(engine, "fn")
    handle = grab(engine, w).args[0]
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    submit_bg(engine, client, b"refused")
    failing = engine.journal.take_batch()
    assert failing.removes == [finished.record_id]
    engine.commit_finished(failing, STORE_ERROR)
    assert replies(client)[-1] == queue_error()

    submit_bg(engine, client, b"next")
    retry = engine.journal.take_batch()
    assert retry.removes == [finished.record_id]  # a finished job must not come back
    assert [s.unique for s in retry.adds] == [b"next"]  # the refused job is not retried
    engine.commit_finished(retry)
    assert not engine.journal.has_work


def test_failed_removals_retried_reach_a_real_store(sqlite_store):
    """The same with SqliteStore: the retried batch deletes the finished job's record."""
    engine = durable_engine()
    client = connect(engine)
    submit_bg(engine, client, b"finished")
    apply_next_batch(engine, sqlite_store)
    w = worker(engine, "fn")
    send(engine, w, T.WORK_COMPLETE, grab(engine, w).args[0], b"r")
    engine.commit_finished(engine.journal.take_batch(), STORE_ERROR)  # not applied
    assert [s.unique for s in sqlite_store.load()] == [b"finished"]
    apply_next_batch(engine, sqlite_store)
    assert sqlite_store.load() == []


def test_record_ids_are_distinct_and_increasing():
    engine = durable_engine()
    client = connect(engine)
    for i in range(5):
        submit_bg(engine, client, b"u%d" % i)
    ids = [s.record_id for s in commit(engine).adds]
    assert ids == sorted(ids) and len(set(ids)) == 5 and ids[0] >= 1


def test_stored_fields_are_those_of_the_submit():
    engine = durable_engine()
    client = connect(engine)
    send(engine, client, T.SUBMIT_JOB_HIGH_BG, b"f1", b"hi", b"p\0h")
    send(engine, client, T.SUBMIT_JOB_LOW_BG, b"f2", b"", b"")
    send(engine, client, T.SUBMIT_JOB_EPOCH, b"f3", b"ep", str(int(START_TIME) + 99), b"e")
    send(engine, client, T.SUBMIT_REDUCE_JOB_BACKGROUND, b"f4", b"-", b"red", b"agg", b"r")
    adds = commit(engine).adds
    assert [(s.function, s.unique, s.priority, s.run_at, s.reducer, s.payload) for s in adds] == [
        (b"f1", b"hi", 0, 0, b"", b"p\0h"),
        (b"f2", b"", 2, 0, b"", b""),
        (b"f3", b"ep", 1, int(START_TIME) + 99, b"", b"e"),
        (b"f4", b"-", 1, 0, b"red", b"r"),
    ]


# --- restore -------------------------------------------------------------------------------


def stored(record_id, unique=b"", *, function=b"fn", priority=1, run_at=0, reducer=b"", data=b""):
    return StoredJob(record_id, function, unique, priority, run_at, reducer, data or unique)


def test_restore_gives_fresh_handles_and_keeps_uniques_priorities_payloads_and_reducers():
    engine = durable_engine()
    jobs = [
        stored(3, b"low", priority=2),
        stored(7, b"normal", data=b"n\0n"),
        stored(5, b"high", priority=0, reducer=b"red"),
        stored(9, b"", data=b"anon"),
        stored(11, b"", data=b"anon"),
    ]
    assert engine.restore(jobs) == 5
    assert not engine.journal.has_work  # already stored: nothing to write
    handles = list(engine.jobs)
    assert len(set(handles)) == 5 and all(h.startswith(b"H:test:") for h in handles)
    assert queued(engine) == [1, 3, 1]

    w = worker(engine, "fn")
    got = [grab(engine, w, T.GRAB_JOB_ALL) for _ in range(5)]
    assert got[0] == packet(T.JOB_ASSIGN_ALL, got[0].args[0], b"fn", b"high", b"red", b"high")
    assert [(p.args[2], p.args[-1]) for p in got[1:]] == [
        (b"normal", b"n\0n"),
        (b"", b"anon"),
        (b"", b"anon"),
        (b"low", b"low"),
    ]
    # Finishing a restored job removes its original record.
    send(engine, w, T.WORK_COMPLETE, got[0].args[0], b"r")
    assert engine.journal.take_batch().removes == [5]


def test_restore_keeps_epoch_times_future_ones_wait_past_ones_run_at_once():
    engine = durable_engine()
    engine.restore(
        [
            stored(1, b"future", run_at=int(START_TIME) + 30),
            stored(2, b"past", run_at=int(START_TIME) - 30),
        ]
    )
    w = worker(engine, "fn")
    assert grab(engine, w, T.GRAB_JOB_UNIQ).args[2] == b"past"
    assert grab(engine, w, T.GRAB_JOB_UNIQ) == packet(T.NO_JOB)
    advance(engine, 30)
    assert grab(engine, w, T.GRAB_JOB_UNIQ).args[2] == b"future"


def test_new_record_ids_continue_after_the_largest_restored_one():
    engine = durable_engine()
    engine.restore([stored(40, b"a"), stored(7, b"b"), stored(12, b"c")])
    client = connect(engine)
    submit_bg(engine, client, b"new")
    assert [s.record_id for s in commit(engine).adds] == [41]


def test_submits_coalesce_on_restored_jobs_without_a_new_record():
    engine = durable_engine()
    engine.restore([stored(1, b"u", data=b"old"), stored(2, b"-", data=b"by payload")])
    handle = pending_handle(engine, b"u")
    client = connect(engine)
    submit_bg(engine, client, b"u", b"new payload")
    send(engine, client, T.SUBMIT_JOB, b"fn", b"u", b"fg")
    submit_bg(engine, client, b"-", b"by payload")
    got = replies(client)  # answered at once: the record exists
    assert got[:2] == [created(handle), created(handle)]
    assert got[2] == created(pending_handle(engine, b"-"))
    assert not engine.journal.has_work
    assert len(engine.jobs) == 2
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"fn", b"old")


def test_restore_then_fresh_handles_do_not_repeat_old_ones():
    old = durable_engine(start_time_ms=1_000)
    client = connect(old)
    submit_bg(old, client, b"u")
    batch = commit(old)
    old_handle = pending_handle(old, b"u")
    new = durable_engine(start_time_ms=2_000)
    new.restore(batch.adds)
    assert pending_handle(new, b"u") != old_handle


def test_open_store_memory_is_none_and_unknown_kinds_are_refused(tmp_path):
    assert open_store("memory", tmp_path / "never", 4730) is None
    assert not (tmp_path / "never").exists()
    with pytest.raises(StoreError, match="unknown store"):
        open_store("redis", tmp_path, 4730)
    assert database_path(tmp_path, 4731) == tmp_path / "jobserver-4731.sqlite3"


def test_sqlite_store_round_trips_every_field_and_keeps_empty_uniques_apart(tmp_path):
    jobs = [
        StoredJob(1, b"f\0n", b"", 0, 0, b"", b"\0\xff"),
        StoredJob(2, b"f\0n", b"", 0, 0, b"", b"\0\xff"),  # same (function, unique)
        StoredJob(3, b"g", b"u" * 64, 2, 2**62, b"reducer", b"x" * 100_000),
    ]
    store = open_store("sqlite", tmp_path, 1)
    try:
        store.apply(jobs, [])
    finally:
        store.close()
    store = open_store("sqlite", tmp_path, 1)
    try:
        assert store.load() == jobs
        store.apply([], [1, 3, 99])  # unknown ids are ignored
        assert store.load() == jobs[1:2]
    finally:
        store.close()
