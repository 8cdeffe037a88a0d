"""Owning durable jobs under a shared store's lease (issue 12), engine side: hold, release,
drop and adopt, without sockets.

With a PostgreSQL store shared by a cluster, a server owns its durable jobs only while its lease
holds. While the lease is in doubt they are held (`hold_durable`), out of workers' reach but
still known; a renewal puts them back (`release_held`); a peer's takeover makes them the peer's
(`drop_durable`: forgotten here, without journalling removes); and the jobs of a dead peer are
queued here (`adopt`). These tests play the lease watcher (ownership.py) and the commit loop by
hand, as test_store_engine.py does.
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
    grab_handle,
    new_engine,
    packet,
    replies,
    reply,
    send,
    worker,
)

from jobserver.admin import AdminProtocol, ServerFacts
from jobserver.engine import Engine, JobState, Peer
from jobserver.engine.journal import StoredJob
from jobserver.protocol import PacketType as T

UNKNOWN = (b"0", b"0", b"0", b"0")
QUEUED_HERE = (b"1", b"0", b"0", b"0")  # known, not running


def durable_jobs(engine: Engine, client: Peer, *uniques: bytes, kind=T.SUBMIT_JOB_BG):
    """Submit one background job per unique (payload = unique) and commit them; returns
    {unique: (handle, record id)}."""
    for unique in uniques:
        send(engine, client, kind, b"fn", unique, unique)
    batch = commit(engine)
    handles = [created.args[0] for created in replies(client)]
    assert len(handles) == len(uniques)
    return {
        stored.unique: (handle, stored.record_id)
        for stored, handle in zip(batch.adds, handles, strict=True)
    }


def foreground(engine: Engine, client: Peer, unique: bytes, data: bytes = b"x") -> bytes:
    send(engine, client, T.SUBMIT_JOB, b"fn", unique, data)
    created = reply(client)
    assert created.type == T.JOB_CREATED, created
    return created.args[0]


def stored(record_id, unique=b"", *, priority=1, run_at=0, reducer=b"", data=b""):
    return StoredJob(record_id, b"fn", unique, priority, run_at, reducer, data or unique)


def grab_uniques(engine: Engine, peer: Peer) -> list[bytes]:
    """GRAB_JOB_UNIQ until NO_JOB; the uniques handed out, in order."""
    uniques = []
    while (assigned := grab(engine, peer, T.GRAB_JOB_UNIQ)).type == T.JOB_ASSIGN_UNIQ:
        uniques.append(assigned.args[2])
    return uniques


def status_line(engine: Engine) -> bytes:
    return AdminProtocol(engine, ServerFacts(pid=1)).execute(b"status")


# --- hold_durable and release_held -----------------------------------------------------------


def test_held_jobs_are_not_handed_out_and_come_back_in_queue_order_on_release():
    engine = durable_engine()
    client = connect(engine)
    for kind, unique in [
        (T.SUBMIT_JOB_LOW_BG, b"low"),
        (T.SUBMIT_JOB_BG, b"n1"),
        (T.SUBMIT_JOB_HIGH_BG, b"high"),
        (T.SUBMIT_JOB_BG, b"n2"),
        (T.SUBMIT_JOB_BG, b"n3"),
    ]:
        send(engine, client, kind, b"fn", unique, unique)
    commit(engine)
    w = worker(engine, "fn")

    assert engine.hold_durable() == 5
    assert engine.durable_on_hold
    assert grab(engine, w) == packet(T.NO_JOB)
    assert engine.functions[b"fn"].queued == [0, 0, 0]

    assert engine.release_held() == 5
    assert not engine.durable_on_hold
    assert grab_uniques(engine, w) == [b"high", b"n1", b"n2", b"n3", b"low"]


def test_hold_and_release_keep_a_given_back_job_behind_the_jobs_queued_before_its_return():
    """A job a worker gives back goes to the tail of its queue (engine._release). Holding and
    releasing the queue must not undo that: the lease lapsing is invisible to the order."""
    engine = durable_engine()
    client = connect(engine)
    durable_jobs(engine, client, b"first", b"second")
    w = worker(engine, "fn")
    assert grab(engine, w, T.GRAB_JOB_UNIQ).args[2] == b"first"
    send(engine, w, T.CANT_DO, b"fn")  # given back: now queued behind "second"
    send(engine, w, T.CAN_DO, b"fn")

    engine.hold_durable()
    engine.release_held()
    assert grab_uniques(engine, w) == [b"second", b"first"]


def test_foreground_jobs_and_jobs_without_a_store_run_while_durable_ones_are_held():
    engine = durable_engine()
    client = connect(engine)
    durable_jobs(engine, client, b"bg")
    fg = foreground(engine, client, b"fg")
    w = worker(engine, "fn")
    engine.hold_durable()
    assert grab_handle(engine, w) == fg
    later = foreground(engine, client, b"fg-during-hold")
    assert grab_handle(engine, w) == later
    assert grab(engine, w) == packet(T.NO_JOB)

    memory = new_engine()  # no store: background jobs have no record and are never held
    memory_client = connect(memory)
    send(memory, memory_client, T.SUBMIT_JOB_BG, b"fn", b"u", b"x")
    handle = reply(memory_client).args[0]
    assert memory.hold_durable() == 0
    send(memory, memory_client, T.SUBMIT_JOB_BG, b"fn", b"v", b"y")
    later = reply(memory_client).args[0]
    memory_worker = worker(memory, "fn")
    assert grab_handle(memory, memory_worker) == handle
    assert grab_handle(memory, memory_worker) == later


def test_held_jobs_stay_known_to_status_requests_and_the_status_listing():
    engine = durable_engine()
    client, observer = connect(engine), connect(engine)
    jobs = durable_jobs(engine, client, b"a", b"b")
    worker(engine, "fn")
    engine.hold_durable()

    handle = jobs[b"a"][0]
    assert get_status(engine, observer, handle) == QUEUED_HERE
    send(engine, observer, T.GET_STATUS_UNIQUE, b"b")
    assert reply(observer) == packet(T.STATUS_RES_UNIQUE, b"b", b"1", b"0", b"0", b"0", b"0")
    assert engine.functions[b"fn"].total == 2
    assert status_line(engine) == b"fn\t2\t0\t1\n.\n"


def test_submits_coalesce_onto_a_held_job_and_its_foreground_client_gets_the_result():
    engine = durable_engine()
    client, bg_again, fg_client = connect(engine), connect(engine), connect(engine)
    handle, _ = durable_jobs(engine, client, b"u")[b"u"]
    engine.hold_durable()

    send(engine, bg_again, T.SUBMIT_JOB_BG, b"fn", b"u", b"other")
    assert replies(bg_again) == [packet(T.JOB_CREATED, handle)]  # at once: the record exists
    assert foreground(engine, fg_client, b"u") == handle
    assert not engine.journal.has_work
    assert len(engine.jobs) == 1

    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.NO_JOB)
    engine.release_held()
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"fn", b"u")
    send(engine, w, T.WORK_COMPLETE, handle, b"done")
    assert replies(fg_client) == [packet(T.WORK_COMPLETE, handle, b"done")]


def test_sleeping_workers_are_not_woken_for_held_jobs_and_are_woken_on_release():
    engine = durable_engine()
    client = connect(engine)
    sleeper = worker(engine, "fn")
    send(engine, sleeper, T.PRE_SLEEP)
    engine.hold_durable()
    durable_jobs(engine, client, b"new")  # committed during the hold: held at once
    assert replies(sleeper) == []
    assert engine.release_held() == 1
    assert replies(sleeper) == [packet(T.NOOP)]
    assert grab_uniques(engine, sleeper) == [b"new"]


def test_an_epoch_job_coming_due_during_a_hold_is_held():
    engine = durable_engine()
    client = connect(engine)
    w = worker(engine, "fn")
    send(engine, client, T.SUBMIT_JOB_EPOCH, b"fn", b"later", str(int(START_TIME) + 10), b"x")
    commit(engine)
    handle = reply(client).args[0]
    assert engine.hold_durable() == 0  # waiting, not queued: nothing to take out yet

    advance(engine, 10)
    assert grab(engine, w) == packet(T.NO_JOB)
    assert get_status(engine, client, handle) == QUEUED_HERE
    assert engine.functions[b"fn"].total == 1
    assert engine.release_held() == 1
    assert grab_handle(engine, w) == handle


@pytest.mark.parametrize("give_back", ["CANT_DO", "RESET_ABILITIES", "disconnect", "timeout"])
def test_a_durable_job_a_worker_gives_back_during_a_hold_is_held(give_back):
    engine = durable_engine()
    client = connect(engine)
    handle, record_id = durable_jobs(engine, client, b"u")[b"u"]
    w = connect(engine)
    if give_back == "timeout":
        send(engine, w, T.CAN_DO_TIMEOUT, b"fn", b"1000")
    else:
        send(engine, w, T.CAN_DO, b"fn")
    assert grab_handle(engine, w) == handle
    assert engine.hold_durable() == 0  # running jobs run on

    if give_back == "CANT_DO":
        send(engine, w, T.CANT_DO, b"fn")
    elif give_back == "RESET_ABILITIES":
        send(engine, w, T.RESET_ABILITIES)
    elif give_back == "disconnect":
        engine.disconnect(w)
    else:
        advance(engine, 2)
    other = worker(engine, "fn")
    assert grab(engine, other) == packet(T.NO_JOB)
    assert get_status(engine, client, handle) == QUEUED_HERE
    assert engine.jobs[handle].record_id == record_id

    assert engine.release_held() == 1
    assert grab_handle(engine, other) == handle


def test_a_running_durable_job_finishes_during_a_hold_and_its_record_is_removed():
    engine = durable_engine()
    client = connect(engine)
    jobs = durable_jobs(engine, client, b"running", b"queued")
    w = worker(engine, "fn")
    handle = grab_handle(engine, w)
    assert engine.hold_durable() == 1
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert engine.journal.take_batch().removes == [jobs[b"running"][1]]
    assert grab(engine, w) == packet(T.NO_JOB)


def test_cancelling_a_held_job_fails_its_clients_removes_its_record_and_release_skips_it():
    engine = durable_engine()
    client, fg_client = connect(engine), connect(engine)
    jobs = durable_jobs(engine, client, b"cancelled", b"kept")
    cancelled, record_id = jobs[b"cancelled"]
    assert foreground(engine, fg_client, b"cancelled") == cancelled
    engine.hold_durable()

    assert engine.cancel_job(cancelled)
    assert replies(fg_client) == [packet(T.WORK_FAIL, cancelled)]
    assert engine.journal.take_batch().removes == [record_id]
    assert get_status(engine, client, cancelled) == UNKNOWN
    assert engine.functions[b"fn"].total == 1

    assert engine.release_held() == 1
    w = worker(engine, "fn")
    assert grab_uniques(engine, w) == [b"kept"]


def test_a_second_hold_holds_nothing_more_and_after_release_new_jobs_run_at_once():
    engine = durable_engine()
    client = connect(engine)
    durable_jobs(engine, client, b"a")
    assert engine.hold_durable() == 1
    assert engine.hold_durable() == 0
    assert engine.release_held() == 1
    assert engine.release_held() == 0
    durable_jobs(engine, client, b"b")
    w = worker(engine, "fn")
    assert grab_uniques(engine, w) == [b"a", b"b"]
    assert engine.functions[b"fn"].pending == 0


def test_a_foreground_job_held_after_a_background_takeover_is_released_once():
    engine = durable_engine()
    fg_client, bg_client = connect(engine), connect(engine)
    handle = foreground(engine, fg_client, b"u")
    send(engine, bg_client, T.SUBMIT_JOB_BG, b"fn", b"u", b"x")  # its record is in flight
    assert engine.hold_durable() == 1
    commit(engine)
    assert replies(bg_client) == [packet(T.JOB_CREATED, handle)]
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.NO_JOB)

    assert engine.release_held() == 1
    assert grab_handle(engine, w) == handle
    assert grab(engine, w) == packet(T.NO_JOB)
    assert engine.functions[b"fn"].pending == 0


def test_a_held_foreground_job_whose_takeover_commit_fails_still_runs_for_its_client():
    """A foreground job (answered at once), a background submit that takes it over (its record
    is journalled), then the lease lapses before the commit: the job is held. The commit then
    fails (a database outage both lapses the lease and fails commits). The background submit
    gets QUEUE_ERROR; the foreground client was told JOB_CREATED long ago and still waits, so
    the job must stay, foreground as before (as it does without a hold), and run for it."""
    engine = durable_engine()
    fg_client, bg_client = connect(engine), connect(engine)
    handle = foreground(engine, fg_client, b"u")
    send(engine, bg_client, T.SUBMIT_JOB_BG, b"fn", b"u", b"x")
    engine.hold_durable()
    commit(engine, "Job could not be stored: database unreachable")
    assert replies(bg_client)[0].args[0] == b"QUEUE_ERROR"

    assert get_status(engine, bg_client, handle) == QUEUED_HERE
    engine.release_held()
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"result")
    assert replies(fg_client) == [packet(T.WORK_COMPLETE, handle, b"result")]


# --- drop_durable ----------------------------------------------------------------------------


def test_drop_durable_forgets_queued_and_waiting_jobs_below_without_removes():
    engine = durable_engine()
    client = connect(engine)
    old = durable_jobs(engine, client, b"old1", b"old2")
    send(engine, client, T.SUBMIT_JOB_EPOCH, b"fn", b"epoch", str(int(START_TIME) + 10), b"e")
    (epoch_record,) = commit(engine).adds
    epoch_handle = reply(client).args[0]
    below = engine.journal.next_record_id
    new = durable_jobs(engine, client, b"new")
    assert epoch_record.record_id < below <= new[b"new"][1]

    assert engine.drop_durable(below) == 3
    assert not engine.journal.has_work  # the records are the peer's now: none removed here
    for handle in (old[b"old1"][0], old[b"old2"][0], epoch_handle):
        assert get_status(engine, client, handle) == UNKNOWN
    assert engine.functions[b"fn"].total == 1
    w = worker(engine, "fn")
    advance(engine, 10)  # the dropped epoch job never comes due
    assert grab_uniques(engine, w) == [b"new"]
    # The uniques are free: a new submit makes a new job with a new record.
    send(engine, client, T.SUBMIT_JOB_BG, b"fn", b"old1", b"again")
    assert [s.unique for s in commit(engine).adds] == [b"old1"]
    assert replies(client)[0].args[0] != old[b"old1"][0]


def test_drop_durable_forgets_held_jobs_and_release_brings_back_only_the_newer_ones():
    engine = durable_engine()
    client = connect(engine)
    old = durable_jobs(engine, client, b"old")
    below = engine.journal.next_record_id
    durable_jobs(engine, client, b"new")
    assert engine.hold_durable() == 2

    assert engine.drop_durable(below) == 1
    assert not engine.journal.has_work
    assert get_status(engine, client, old[b"old"][0]) == UNKNOWN
    assert engine.functions[b"fn"].total == 1
    assert engine.functions[b"fn"].pending == 1
    assert engine.release_held() == 1
    w = worker(engine, "fn")
    assert grab_uniques(engine, w) == [b"new"]
    assert engine.functions[b"fn"].pending == 0


def test_drop_durable_fails_foreground_clients_coalesced_onto_a_dropped_job():
    engine = durable_engine()
    client, fg_client, fg_twice = connect(engine), connect(engine), connect(engine)
    handle, record_id = durable_jobs(engine, client, b"u")[b"u"]
    foreground(engine, fg_client, b"u")
    foreground(engine, fg_twice, b"u")
    foreground(engine, fg_twice, b"u")
    engine.hold_durable()

    assert engine.drop_durable(record_id + 1) == 1
    assert replies(fg_client) == [packet(T.WORK_FAIL, handle)]
    assert replies(fg_twice) == [packet(T.WORK_FAIL, handle)] * 2
    assert replies(client) == []  # the background submitter is not listening
    assert fg_client.listening == set() and fg_twice.listening == set()
    assert not engine.journal.has_work
    assert b"fn" not in engine.functions  # nothing uses it any more
    engine.disconnect(fg_client)  # leaving afterwards is harmless


def test_a_dropped_running_job_completes_for_its_client_without_a_remove():
    engine = durable_engine()
    client, fg_client = connect(engine), connect(engine)
    handle, record_id = durable_jobs(engine, client, b"u")[b"u"]
    assert foreground(engine, fg_client, b"u") == handle
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle

    assert engine.drop_durable(record_id + 1) == 1
    job = engine.jobs[handle]
    assert job.state is JobState.RUNNING
    assert job.record_id == 0 and not job.background
    assert get_status(engine, client, handle) == (b"1", b"1", b"0", b"0")
    send(engine, w, T.WORK_STATUS, handle, b"1", b"2")
    send(engine, w, T.WORK_COMPLETE, handle, b"done")
    assert replies(fg_client) == [
        packet(T.WORK_STATUS, handle, b"1", b"2"),
        packet(T.WORK_COMPLETE, handle, b"done"),
    ]
    assert not engine.journal.has_work
    assert engine.jobs == {}


@pytest.mark.parametrize("on_hold", [False, True], ids=["lease-held", "on-hold"])
def test_a_dropped_running_job_given_back_without_a_client_is_not_requeued(on_hold):
    engine = durable_engine()
    client = connect(engine)
    handle, record_id = durable_jobs(engine, client, b"u")[b"u"]
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    if on_hold:
        engine.hold_durable()
    assert engine.drop_durable(record_id + 1) == 1

    engine.disconnect(w)
    assert engine.jobs == {}
    assert get_status(engine, client, handle) == UNKNOWN
    assert engine.release_held() == 0
    assert grab(engine, worker(engine, "fn")) == packet(T.NO_JOB)
    assert not engine.journal.has_work
    assert engine.functions[b"fn"].total == 0


def test_a_dropped_running_job_given_back_with_a_client_runs_again_for_it_even_on_hold():
    engine = durable_engine()
    client, fg_client = connect(engine), connect(engine)
    handle, record_id = durable_jobs(engine, client, b"u")[b"u"]
    foreground(engine, fg_client, b"u")
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    engine.hold_durable()
    engine.drop_durable(record_id + 1)

    send(engine, w, T.CANT_DO, b"fn")  # requeued for its client, as a foreground job
    other = worker(engine, "fn")
    assert grab_handle(engine, other) == handle  # no record: not held
    send(engine, other, T.WORK_COMPLETE, handle, b"r")
    assert replies(fg_client) == [packet(T.WORK_COMPLETE, handle, b"r")]
    assert not engine.journal.has_work
    assert engine.release_held() == 0


def test_drop_durable_includes_adopted_jobs_with_negative_record_ids():
    engine = durable_engine()
    client = connect(engine)
    own = durable_jobs(engine, client, b"own")
    assert engine.adopt([stored(-3, b"adopted"), stored(-2, b"adopted-later", run_at=2**40)]) == 2
    below = engine.journal.next_record_id
    new = durable_jobs(engine, client, b"new")

    assert engine.drop_durable(below) == 3
    assert not engine.journal.has_work
    assert get_status(engine, client, own[b"own"][0]) == UNKNOWN
    assert [job.unique for job in engine.iter_jobs()] == [b"new"]
    assert engine.jobs[new[b"new"][0]].record_id == new[b"new"][1]
    w = worker(engine, "fn")
    assert grab_uniques(engine, w) == [b"new"]


def test_drop_durable_below_every_record_changes_nothing():
    engine = durable_engine()
    client = connect(engine)
    jobs = durable_jobs(engine, client, b"a", b"b")
    foreground(engine, client, b"fg")
    assert engine.drop_durable(1) == 0
    assert engine.drop_durable(min(record for _, record in jobs.values())) == 0
    assert len(engine.jobs) == 3
    assert grab_uniques(engine, worker(engine, "fn")) == [b"a", b"b", b"fg"]


# --- adopt -----------------------------------------------------------------------------------


def test_adopt_queues_jobs_with_fresh_handles_priorities_uniques_reducers_and_records():
    engine = durable_engine()
    client = connect(engine)
    durable_jobs(engine, client, b"own")
    before = set(engine.jobs)
    adopted = [
        stored(-10, b"low", priority=2),
        stored(-11, b"normal", data=b"n\0n"),
        stored(-12, b"high", priority=0, reducer=b"red"),
        stored(-13, b"", data=b"anon"),
    ]
    assert engine.adopt(adopted) == 4
    assert not engine.journal.has_work  # stored already, by the store that chose the ids
    assert len(set(engine.jobs) - before) == 4
    records = {job.unique or job.payload: job.record_id for job in engine.iter_jobs()}
    assert records == {b"own": 1, b"low": -10, b"normal": -11, b"high": -12, b"anon": -13}

    w = worker(engine, "fn")
    got = [grab(engine, w, T.GRAB_JOB_ALL) for _ in range(5)]
    assert [(p.type, *p.args[2:]) for p in got] == [
        (T.JOB_ASSIGN_ALL, b"high", b"red", b"high"),
        (T.JOB_ASSIGN_UNIQ, b"own", b"own"),
        (T.JOB_ASSIGN_UNIQ, b"normal", b"n\0n"),
        (T.JOB_ASSIGN_UNIQ, b"", b"anon"),
        (T.JOB_ASSIGN_UNIQ, b"low", b"low"),
    ]
    # Finishing an adopted job removes its (negative) record.
    send(engine, w, T.WORK_COMPLETE, got[0].args[0], b"r")
    assert engine.journal.take_batch().removes == [-12]


def test_adopted_epoch_jobs_wait_for_their_time():
    engine = durable_engine()
    adopted = [
        stored(-1, b"future", run_at=int(START_TIME) + 30),
        stored(-2, b"past", run_at=int(START_TIME) - 30),
    ]
    assert engine.adopt(adopted) == 2
    w = worker(engine, "fn")
    assert grab_uniques(engine, w) == [b"past"]
    assert engine.functions[b"fn"].waiting == 1
    advance(engine, 30)
    assert grab_uniques(engine, w) == [b"future"]


def test_jobs_adopted_during_a_hold_are_held_until_release():
    engine = durable_engine()
    engine.hold_durable()
    adopted = [stored(-1, b"a"), stored(-2, b"epoch", run_at=int(START_TIME) + 5), stored(-3, b"b")]
    assert engine.adopt(adopted) == 3
    w = worker(engine, "fn")
    advance(engine, 5)
    assert grab(engine, w) == packet(T.NO_JOB)
    assert engine.functions[b"fn"].total == 3
    assert engine.release_held() == 3
    assert grab_uniques(engine, w) == [b"a", b"b", b"epoch"]


def test_adopting_a_job_known_here_with_a_record_removes_the_adopted_record():
    engine = durable_engine()
    client = connect(engine)
    handle, record_id = durable_jobs(engine, client, b"u")[b"u"]
    assert engine.adopt([stored(-7, b"u", data=b"theirs"), stored(-8, b"v")]) == 1
    assert engine.journal.take_batch().removes == [-7]
    assert engine.jobs[handle].record_id == record_id
    assert len(engine.jobs) == 2
    w = worker(engine, "fn")
    assert grab(engine, w, T.GRAB_JOB_UNIQ) == packet(T.JOB_ASSIGN_UNIQ, handle, b"fn", b"u", b"u")
    assert grab_uniques(engine, w) == [b"v"]


def test_the_same_unique_twice_in_one_adoption_makes_one_job_and_removes_the_second_record():
    engine = durable_engine()
    assert engine.adopt([stored(-1, b"u"), stored(-2, b"u")]) == 1
    assert engine.journal.take_batch().removes == [-2]
    (job,) = engine.iter_jobs()
    assert job.record_id == -1


@pytest.mark.parametrize("running", [False, True], ids=["queued", "running"])
def test_adopting_a_job_known_here_as_foreground_gives_it_the_record(running):
    engine = durable_engine()
    fg_client = connect(engine)
    handle = foreground(engine, fg_client, b"u")
    w = worker(engine, "fn")
    if running:
        assert grab_handle(engine, w) == handle
    assert engine.adopt([stored(-5, b"u")]) == 0
    assert not engine.journal.has_work
    job = engine.jobs[handle]
    assert job.record_id == -5 and job.background

    engine.disconnect(fg_client)  # background now: it survives its client
    assert handle in engine.jobs
    if not running:
        assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert engine.journal.take_batch().removes == [-5]


def test_a_foreground_job_that_takes_an_adopted_record_during_a_hold_is_held():
    """Adopted news can arrive while the lease is in doubt (ownership.py handles news before
    it holds or releases). A queued foreground job that takes an adopted record is durable
    from then on and, like every durable job during a hold, must be out of workers' reach."""
    engine = durable_engine()
    fg_client = connect(engine)
    handle = foreground(engine, fg_client, b"u")
    engine.hold_durable()
    assert engine.adopt([stored(-5, b"u")]) == 0
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.NO_JOB)
    engine.release_held()
    assert grab_handle(engine, w) == handle


def test_submits_after_adopt_coalesce_onto_the_adopted_job():
    engine = durable_engine()
    assert engine.adopt([stored(-4, b"u", data=b"adopted"), stored(-5, b"-", data=b"pay")]) == 2
    handle = next(job.handle for job in engine.iter_jobs() if job.unique == b"u")
    by_payload = next(job.handle for job in engine.iter_jobs() if job.unique == b"-")
    client = connect(engine)
    send(engine, client, T.SUBMIT_JOB_BG, b"fn", b"u", b"new payload")
    send(engine, client, T.SUBMIT_JOB, b"fn", b"u", b"fg")
    send(engine, client, T.SUBMIT_JOB_BG, b"fn", b"-", b"pay")
    assert replies(client) == [  # at once: the records exist
        packet(T.JOB_CREATED, handle),
        packet(T.JOB_CREATED, handle),
        packet(T.JOB_CREATED, by_payload),
    ]
    assert not engine.journal.has_work
    w = worker(engine, "fn")
    assert grab(engine, w) == packet(T.JOB_ASSIGN, handle, b"fn", b"adopted")
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(client) == [packet(T.WORK_COMPLETE, handle, b"r")]
    assert engine.journal.take_batch().removes == [-4]
