"""Jobs end to end over real sockets against a live jobserver process (shared doc §3).

Clients and workers are raw connections (tests/wire.py). Where jobserver deliberately differs
from gearmand 1.1.x (cross-function priority, waking workers when an epoch job comes due), the
test says so.
"""

from __future__ import annotations

import math
import time

import pytest
import wire
from servers import admin, status, wait_until
from wire import Wire

from jobserver.protocol import PacketType as T

connect = wire.connect  # fixture: connect(server) -> Wire, closed at teardown

FN = b"reverse"


def go_to_sleep(worker: Wire) -> None:
    """PRE_SLEEP with nothing runnable: the worker sleeps and gets no NOOP (the ECHO reply
    comes first, so the PRE_SLEEP has been processed)."""
    worker.send(T.PRE_SLEEP)
    worker.echo(b"asleep")


def got_noop(worker: Wire, wait: float) -> bool:
    try:
        worker.expect(T.NOOP, timeout=wait)
    except TimeoutError:
        return False
    return True


def woken_by_last_submit(workers: list[Wire], expect_any: bool = True) -> set[int]:
    """Indexes of the workers that got a NOOP for the submit just acknowledged. Waits up to 2 s
    for the first NOOP (if one is expected), then a grace period for any others: the NOOPs
    leave in the same flush as the JOB_CREATED, so they arrive together."""
    woken: set[int] = set()
    deadline = time.monotonic() + (2.0 if expect_any else 0.0)
    while expect_any and not woken and time.monotonic() < deadline:
        woken = {i for i, worker in enumerate(workers) if got_noop(worker, 0.01)}
    time.sleep(0.2)
    woken |= {i for i, worker in enumerate(workers) if i not in woken and got_noop(worker, 0.01)}
    return woken


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "grab, assign, assigned_args",
    [
        (T.GRAB_JOB, T.JOB_ASSIGN, lambda h: (h, FN, b"he\0llo")),
        (T.GRAB_JOB_UNIQ, T.JOB_ASSIGN_UNIQ, lambda h: (h, FN, b"u-1", b"he\0llo")),
        (T.GRAB_JOB_ALL, T.JOB_ASSIGN_UNIQ, lambda h: (h, FN, b"u-1", b"he\0llo")),
    ],
    ids=["GRAB_JOB", "GRAB_JOB_UNIQ", "GRAB_JOB_ALL"],
)
def test_foreground_job_round_trip_forwards_every_work_packet_verbatim(
    jobserver, connect, grab, assign, assigned_args
):
    worker, client = connect(jobserver), connect(jobserver)
    worker.can_do(FN)
    handle = client.submit(FN, b"he\0llo", b"u-1")

    worker.send(grab)
    worker.expect(assign, *assigned_args(handle))

    # WORK_STATUS is forwarded as sent; the server's own numbers are atoi() as uint32 (§3.7).
    worker.send(T.WORK_STATUS, handle, b"abc", b"4294967297")
    client.expect(T.WORK_STATUS, handle, b"abc", b"4294967297")
    client.send(T.GET_STATUS, handle)
    client.expect(T.STATUS_RES, handle, b"1", b"1", b"0", b"1")

    worker.send(T.WORK_DATA, handle, b"da\0ta")
    client.expect(T.WORK_DATA, handle, b"da\0ta")
    worker.send(T.WORK_WARNING, handle, b"")
    client.expect(T.WORK_WARNING, handle, b"")
    worker.send(T.WORK_COMPLETE, handle, b"ol\0leh")
    client.expect(T.WORK_COMPLETE, handle, b"ol\0leh")

    client.send(T.GET_STATUS, handle)
    client.expect(T.STATUS_RES, handle, b"0", b"0", b"0", b"0")
    worker.send(grab)
    worker.expect(T.NO_JOB)
    client.expect_nothing()


def test_grab_job_all_hands_out_the_reducer_of_a_reduce_job(jobserver, connect):
    worker, client = connect(jobserver), connect(jobserver)
    worker.can_do(FN)
    client.send(T.SUBMIT_REDUCE_JOB, FN, b"u-r", b"my-reducer", b"ignored-aggregator", b"d\0x")
    (handle,) = client.expect(T.JOB_CREATED)

    worker.send(T.GRAB_JOB_ALL)
    worker.expect(T.JOB_ASSIGN_ALL, handle, FN, b"u-r", b"my-reducer", b"d\0x")
    worker.send(T.WORK_COMPLETE, handle, b"")
    client.expect(T.WORK_COMPLETE, handle, b"")


def test_background_job_runs_and_its_client_gets_nothing_after_job_created(jobserver, connect):
    worker, client = connect(jobserver), connect(jobserver)
    worker.can_do(FN)
    handle = client.submit(FN, b"bg-data", b"bg-1", T.SUBMIT_JOB_BG)

    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN, handle, FN, b"bg-data")
    worker.send(T.WORK_STATUS, handle, b"1", b"2")
    worker.send(T.WORK_DATA, handle, b"not forwarded")
    worker.echo()
    client.send(T.GET_STATUS, handle)
    client.expect(T.STATUS_RES, handle, b"1", b"1", b"1", b"2")

    worker.send(T.WORK_COMPLETE, handle, b"done")
    worker.echo()
    client.expect_nothing()
    client.send(T.GET_STATUS, handle)
    client.expect(T.STATUS_RES, handle, b"0", b"0", b"0", b"0")


def test_background_job_survives_its_client_disconnecting(jobserver, connect):
    client = connect(jobserver)
    handle = client.submit(FN, b"keep me", b"", T.SUBMIT_JOB_BG)
    client.close()

    worker = connect(jobserver)
    worker.can_do(FN)
    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN, handle, FN, b"keep me")


def test_same_unique_from_two_client_connections_coalesces_and_both_get_every_result(
    jobserver, connect
):
    worker, first, second = connect(jobserver), connect(jobserver), connect(jobserver)
    worker.can_do(FN)
    handle = first.submit(FN, b"first payload", b"same")
    assert second.submit(FN, b"second payload is ignored", b"same") == handle

    second.send(T.GET_STATUS_UNIQUE, b"same")
    second.expect(T.STATUS_RES_UNIQUE, b"same", b"1", b"0", b"0", b"0", b"2")

    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN, handle, FN, b"first payload")
    worker.send(T.WORK_STATUS, handle, b"1", b"2")
    worker.send(T.WORK_COMPLETE, handle, b"result")
    for client in (first, second):
        client.expect(T.WORK_STATUS, handle, b"1", b"2")
        client.expect(T.WORK_COMPLETE, handle, b"result")
    worker.send(T.GRAB_JOB)
    worker.expect(T.NO_JOB)  # one job, not two


def test_one_worker_gets_the_highest_priority_job_across_its_functions_first(jobserver, connect):
    # gearmand 1.1.x takes every job of the most recently registered function first, whatever
    # the priorities (§3.3, §6.12); we hand out by priority, oldest first within a priority.
    worker, client = connect(jobserver), connect(jobserver)
    worker.can_do(b"fa", b"fb")
    for packet_type, function, unique in [
        (T.SUBMIT_JOB_BG, b"fa", b"a-norm"),
        (T.SUBMIT_JOB_LOW_BG, b"fa", b"a-low"),
        (T.SUBMIT_JOB_LOW_BG, b"fb", b"b-low"),
        (T.SUBMIT_JOB_HIGH_BG, b"fb", b"b-high"),
        (T.SUBMIT_JOB_HIGH_BG, b"fa", b"a-high"),
        (T.SUBMIT_JOB_BG, b"fb", b"b-norm"),
    ]:
        client.submit(function, b"", unique, packet_type)

    order = []
    for _ in range(6):
        worker.send(T.GRAB_JOB_UNIQ)
        handle, _function, unique, _data = worker.expect(T.JOB_ASSIGN_UNIQ)
        order.append(unique)
        worker.send(T.WORK_COMPLETE, handle, b"")
    assert order == [b"b-high", b"a-high", b"a-norm", b"b-norm", b"a-low", b"b-low"]


# ---------------------------------------------------------------------- lost workers, retries


def test_job_of_a_worker_that_disconnects_is_requeued_and_completed_by_another(jobserver, connect):
    first, second, client = connect(jobserver), connect(jobserver), connect(jobserver)
    first.can_do(FN)
    second.can_do(FN)
    handle = client.submit(FN, b"payload")

    first.send(T.GRAB_JOB)
    first.expect(T.JOB_ASSIGN, handle, FN, b"payload")
    first.send(T.WORK_STATUS, handle, b"1", b"4")
    client.expect(T.WORK_STATUS, handle, b"1", b"4")
    go_to_sleep(second)

    first.close()
    second.expect(T.NOOP)  # the requeued job wakes sleeping workers (§3.4)
    # Requeued with its status reset; the client was told nothing (the STATUS_RES is next).
    client.send(T.GET_STATUS, handle)
    client.expect(T.STATUS_RES, handle, b"1", b"0", b"0", b"0")

    second.send(T.GRAB_JOB)
    second.expect(T.JOB_ASSIGN, handle, FN, b"payload")
    second.send(T.WORK_COMPLETE, handle, b"second did it")
    client.expect(T.WORK_COMPLETE, handle, b"second did it")


def test_job_retries_2_fails_the_job_to_its_client_after_two_worker_losses(
    start_jobserver, connect
):
    server = start_jobserver("-j", "2")
    client = connect(server)
    handle = client.submit(FN, b"doomed")

    first, second = connect(server), connect(server)
    first.can_do(FN)
    second.can_do(FN)
    first.send(T.GRAB_JOB)
    first.expect(T.JOB_ASSIGN, handle, FN, b"doomed")
    go_to_sleep(second)
    first.close()
    second.expect(T.NOOP)  # first loss: requeued, client not told
    client.expect_nothing()

    second.send(T.GRAB_JOB)
    second.expect(T.JOB_ASSIGN, handle, FN, b"doomed")
    second.close()
    client.expect(T.WORK_FAIL, handle)  # exactly the handle, no trailing NUL (§3.6)

    client.send(T.GET_STATUS, handle)
    client.expect(T.STATUS_RES, handle, b"0", b"0", b"0", b"0")
    third = connect(server)
    third.can_do(FN)
    third.send(T.GRAB_JOB)
    third.expect(T.NO_JOB)
    assert status(server.address)[FN.decode()][:2] == (0, 0)


def test_default_job_retries_are_unlimited(jobserver, connect):
    client = connect(jobserver)
    handle = client.submit(FN, b"stubborn")
    for _ in range(3):
        doomed, next_worker = connect(jobserver), connect(jobserver)
        doomed.can_do(FN)
        next_worker.can_do(FN)
        doomed.send(T.GRAB_JOB)
        doomed.expect(T.JOB_ASSIGN, handle, FN, b"stubborn")
        go_to_sleep(next_worker)
        doomed.close()
        next_worker.expect(T.NOOP)
        next_worker.close()
    last = connect(jobserver)
    last.can_do(FN)
    last.send(T.GRAB_JOB)
    last.expect(T.JOB_ASSIGN, handle, FN, b"stubborn")
    last.send(T.WORK_COMPLETE, handle, b"finally")
    client.expect(T.WORK_COMPLETE, handle, b"finally")


def test_cant_do_requeues_the_held_job_of_that_function(jobserver, connect):
    quitter, other, client = connect(jobserver), connect(jobserver), connect(jobserver)
    quitter.can_do(FN)
    other.can_do(FN)
    handle = client.submit(FN, b"payload")
    quitter.send(T.GRAB_JOB)
    quitter.expect(T.JOB_ASSIGN, handle, FN, b"payload")
    go_to_sleep(other)

    quitter.send(T.CANT_DO, FN)
    other.expect(T.NOOP)
    quitter.send(T.WORK_COMPLETE, handle, b"no longer mine")
    quitter.expect_error(b"JOB_NOT_FOUND", b"Job given in work result not found")
    other.send(T.GRAB_JOB)
    other.expect(T.JOB_ASSIGN, handle, FN, b"payload")
    other.send(T.WORK_COMPLETE, handle, b"other")
    client.expect(T.WORK_COMPLETE, handle, b"other")


def test_queued_foreground_job_whose_only_client_leaves_is_dropped(jobserver, connect):
    client = connect(jobserver)
    handle = client.submit(FN, b"unwanted")
    client.close()
    # Dropped with its job, the function is forgotten too: nothing uses it any more.
    wait_until(lambda: FN.decode() not in status(jobserver.address), what="the job to be dropped")
    worker = connect(jobserver)
    worker.can_do(FN)
    worker.send(T.GRAB_JOB)
    worker.expect(T.NO_JOB)
    worker.send(T.GET_STATUS, handle)
    worker.expect(T.STATUS_RES, handle, b"0", b"0", b"0", b"0")


# ---------------------------------------------------------------------- failures, exceptions


def test_work_fail_is_forwarded_as_the_bare_handle(jobserver, connect):
    worker, client = connect(jobserver), connect(jobserver)
    worker.can_do(FN)
    handle = client.submit(FN, b"x")
    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN)
    worker.send(T.WORK_FAIL, handle)
    client.expect(T.WORK_FAIL, handle)
    worker.send(T.GRAB_JOB)
    worker.expect(T.NO_JOB)  # a failed job is not retried (§3.8)


def test_work_exception_reaches_clients_with_the_option_others_get_work_fail_with_a_nul(
    jobserver, connect
):
    worker, wants, plain = connect(jobserver), connect(jobserver), connect(jobserver)
    wants.send(T.OPTION_REQ, b"EXCEPTIONS")
    wants.expect(T.OPTION_RES, b"EXCEPTIONS")  # case-insensitive, echoed as sent
    worker.can_do(FN)
    handle = wants.submit(FN, b"x", b"shared")
    assert plain.submit(FN, b"x", b"shared") == handle

    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN)
    worker.send(T.WORK_EXCEPTION, handle, b"boom\0trace")
    wants.expect(T.WORK_EXCEPTION, handle, b"boom\0trace")
    # gearmand 1.1.20 sends `handle\0`, which libgearman's client cannot match (§3.8); we
    # send the plain form.
    plain.expect(T.WORK_FAIL, handle)

    worker.send(T.GRAB_JOB)
    worker.expect(T.NO_JOB)
    plain.send(T.GET_STATUS, handle)
    plain.expect(T.STATUS_RES, handle, b"0", b"0", b"0", b"0")


def test_exceptions_flag_forwards_work_exception_to_every_client(start_jobserver, connect):
    server = start_jobserver("--exceptions")
    worker, client = connect(server), connect(server)
    worker.can_do(FN)
    handle = client.submit(FN, b"x")
    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN)
    worker.send(T.WORK_EXCEPTION, handle, b"boom")
    client.expect(T.WORK_EXCEPTION, handle, b"boom")


# ---------------------------------------------------------------------- status queries


def test_get_status_and_get_status_unique_report_known_running_progress_and_clients(
    jobserver, connect
):
    clients = [connect(jobserver) for _ in range(3)]
    worker, background, query = connect(jobserver), connect(jobserver), connect(jobserver)
    handle = clients[0].submit(FN, b"x", b"u9")
    for client in clients[1:]:
        assert client.submit(FN, b"x", b"u9") == handle
    assert background.submit(FN, b"x", b"u9", T.SUBMIT_JOB_BG) == handle

    query.send(T.GET_STATUS, handle)
    query.expect(T.STATUS_RES, handle, b"1", b"0", b"0", b"0")
    query.send(T.GET_STATUS_UNIQUE, b"u9")
    query.expect(T.STATUS_RES_UNIQUE, b"u9", b"1", b"0", b"0", b"0", b"3")  # bg not counted

    worker.can_do(FN)
    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN)
    worker.send(T.WORK_STATUS, handle, b"3", b"7")
    worker.echo()
    query.send(T.GET_STATUS, handle + b"\0ignored")  # the echoed handle stops at the NUL
    query.expect(T.STATUS_RES, handle, b"1", b"1", b"3", b"7")
    query.send(T.GET_STATUS_UNIQUE, b"u9")
    query.expect(T.STATUS_RES_UNIQUE, b"u9", b"1", b"1", b"3", b"7", b"3")

    clients[2].close()

    def client_count() -> bytes:
        query.send(T.GET_STATUS_UNIQUE, b"u9")
        return query.expect(T.STATUS_RES_UNIQUE)[5]

    wait_until(lambda: client_count() == b"2", what="client count to drop to 2")

    query.send(T.GET_STATUS, b"H:no-such-job")
    query.expect(T.STATUS_RES, b"H:no-such-job", b"0", b"0", b"0", b"0")
    query.send(T.GET_STATUS_UNIQUE, b"no-such-unique")
    query.expect(T.STATUS_RES_UNIQUE, b"no-such-unique", b"0", b"0", b"0", b"0", b"0")

    worker.send(T.WORK_COMPLETE, handle, b"r")
    worker.echo()
    query.send(T.GET_STATUS, handle)
    query.expect(T.STATUS_RES, handle, b"0", b"0", b"0", b"0")
    query.send(T.GET_STATUS_UNIQUE, b"u9")
    query.expect(T.STATUS_RES_UNIQUE, b"u9", b"0", b"0", b"0", b"0", b"0")


# ---------------------------------------------------------------------- timers


def test_epoch_job_is_not_handed_out_early_and_wakes_a_sleeping_worker_when_due(jobserver, connect):
    # gearmand 1.1.x never wakes anyone when an epoch job comes due (§3.11, issue #101);
    # a sleeping worker would only find it by polling. We send the NOOP at the due time.
    worker, poller, client = connect(jobserver), connect(jobserver), connect(jobserver)
    worker.can_do(FN)
    poller.can_do(FN)
    epoch = math.ceil(time.time() + 1.2)  # due in 1.2 to 2.2 seconds
    client.send(T.SUBMIT_JOB_EPOCH, FN, b"later", str(epoch).encode(), b"epoch-data")
    (handle,) = client.expect(T.JOB_CREATED)

    poller.send(T.GRAB_JOB)
    poller.expect(T.NO_JOB)
    client.send(T.GET_STATUS, handle)
    client.expect(T.STATUS_RES, handle, b"1", b"0", b"0", b"0")
    go_to_sleep(worker)  # nothing runnable yet: no NOOP

    time.sleep(max(0.0, epoch - 0.3 - time.time()))
    poller.send(T.GRAB_JOB)
    poller.expect(T.NO_JOB)  # still not due 0.3 s before its time

    worker.expect(T.NOOP, timeout=epoch + 2 - time.time())
    woken_at = time.time()
    assert woken_at >= epoch - 0.01, f"woken {epoch - woken_at:.2f}s before the job was due"
    assert woken_at < epoch + 1.0, f"woken {woken_at - epoch:.2f}s after the job was due"
    worker.send(T.GRAB_JOB_UNIQ)
    worker.expect(T.JOB_ASSIGN_UNIQ, handle, FN, b"later", b"epoch-data")


@pytest.mark.parametrize("timeout_ms", [b"1000", b"1"], ids=["1000ms", "1ms-raised-to-1s"])
def test_can_do_timeout_expiry_requeues_to_another_worker_and_late_result_is_rejected(
    jobserver, connect, timeout_ms
):
    slow, other, client = connect(jobserver), connect(jobserver), connect(jobserver)
    slow.send(T.CAN_DO_TIMEOUT, FN, timeout_ms)
    slow.echo()
    handle = client.submit(FN, b"work")
    slow.send(T.GRAB_JOB)
    slow.expect(T.JOB_ASSIGN, handle, FN, b"work")
    assigned_at = time.monotonic()
    other.can_do(FN)
    go_to_sleep(other)  # the only job is running: no NOOP yet

    other.expect(T.NOOP, timeout=4.0)  # requeued on expiry, sleepers woken
    elapsed = time.monotonic() - assigned_at
    assert 0.9 <= elapsed <= 2.5, f"requeued after {elapsed:.2f}s, expected about 1s"
    other.send(T.GRAB_JOB)
    other.expect(T.JOB_ASSIGN, handle, FN, b"work")

    slow.send(T.WORK_COMPLETE, handle, b"too late")
    slow.expect_error(b"JOB_NOT_FOUND", b"Job given in work result not found")
    other.send(T.WORK_COMPLETE, handle, b"in time")
    client.expect(T.WORK_COMPLETE, handle, b"in time")
    client.expect_nothing()


def test_worker_wakeup_1_wakes_exactly_one_sleeping_worker_per_job(start_jobserver, connect):
    server = start_jobserver("-w", "1")
    client = connect(server)
    workers = [connect(server) for _ in range(3)]
    for worker in workers:
        worker.can_do(FN)
        go_to_sleep(worker)

    woken_so_far: set[int] = set()
    for job in range(3):
        client.submit(FN, b"", f"job-{job}".encode(), T.SUBMIT_JOB_BG)
        woken = woken_by_last_submit(workers)
        assert len(woken) == 1, f"job {job} woke workers {sorted(woken)}"
        assert not woken & woken_so_far, "a worker already sent a NOOP was woken again"
        woken_so_far |= woken

    client.submit(FN, b"", b"job-3", T.SUBMIT_JOB_BG)
    assert (
        woken_by_last_submit(workers, expect_any=False) == set()
    )  # each has a NOOP pending: none is woken twice


def test_default_worker_wakeup_wakes_every_sleeping_worker(jobserver, connect):
    client = connect(jobserver)
    workers = [connect(jobserver) for _ in range(3)]
    for worker in workers:
        worker.can_do(FN)
        go_to_sleep(worker)
    client.submit(FN, b"", b"", T.SUBMIT_JOB_BG)
    for worker in workers:
        worker.expect(T.NOOP)


# ---------------------------------------------------------------------- maxqueue


def test_maxqueue_set_by_admin_refuses_new_jobs_with_queue_error(jobserver, connect):
    assert admin(jobserver.address, "maxqueue limited 2") == b"OK\r\n"
    client = connect(jobserver)
    first = client.submit(b"limited", b"", b"u1", T.SUBMIT_JOB_BG)
    client.submit(b"limited", b"", b"u2", T.SUBMIT_JOB_BG)

    client.send(T.SUBMIT_JOB_BG, b"limited", b"u3", b"")
    client.expect_error(b"QUEUE_ERROR", b"Job queue is full")
    client.send(T.SUBMIT_JOB, b"limited", b"u4", b"")
    client.expect_error(b"QUEUE_ERROR", b"Job queue is full")
    # A submit that coalesces creates no job, so the limit does not apply (§3.2).
    assert client.submit(b"limited", b"", b"u1", T.SUBMIT_JOB_BG) == first
    client.submit(b"other", b"", b"u3", T.SUBMIT_JOB_BG)  # other functions are unaffected

    worker = connect(jobserver)
    worker.can_do(b"limited")
    worker.send(T.GRAB_JOB)
    handle, _, _ = worker.expect(T.JOB_ASSIGN)
    worker.send(T.WORK_COMPLETE, handle, b"")
    worker.echo()
    client.submit(b"limited", b"", b"u3", T.SUBMIT_JOB_BG)  # room again
