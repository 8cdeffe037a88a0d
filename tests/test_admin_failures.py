"""Admin commands for failed background jobs (issue 13): `show dead jobs`, `retry dead job(s)`,
`purge dead jobs`, `retries` and `show job`, as replies of AdminProtocol.execute (no sockets).

Dead jobs are made the way a server makes them: a worker reports WORK_FAIL or WORK_EXCEPTION
for a background job whose function has no retries left.
"""

from __future__ import annotations

import math
import random

import pytest
from engine_helpers import (
    START_TIME,
    advance,
    connect,
    grab_handle,
    new_engine,
    replies,
    send,
    submit,
    worker,
)

from jobserver.admin import AdminProtocol, ServerFacts
from jobserver.engine import Engine
from jobserver.engine.failures import retry_delay
from jobserver.engine.journal import RetryPolicy
from jobserver.protocol import PacketType as T

SEED = 13
START_ISO = b"2027-01-15T08:00:00Z"  # START_TIME in UTC


def admin(engine: Engine, line: bytes) -> bytes:
    return AdminProtocol(engine, ServerFacts(pid=1)).execute(line)


def failing_engine(**options) -> Engine:
    return new_engine(rng=random.Random(SEED), **options)


def kill(engine: Engine, function: bytes, unique: bytes, error: bytes | None = None) -> bytes:
    """A background job of `function` that fails its only attempt (WORK_EXCEPTION with `error`,
    or WORK_FAIL); returns its handle."""
    client, w = connect(engine), worker(engine, function)
    handle = submit(engine, client, function, unique, b"data", T.SUBMIT_JOB_BG)
    assert grab_handle(engine, w) == handle
    if error is None:
        send(engine, w, T.WORK_FAIL, handle)
    else:
        send(engine, w, T.WORK_EXCEPTION, handle, error)
    assert replies(w) == []
    engine.disconnect(w)
    engine.disconnect(client)
    return handle


def dead_line(handle: bytes, function: bytes, unique: bytes, error: bytes, when=START_ISO):
    return b"\t".join((handle, function, unique, b"1", when, error)) + b"\n"


# --- show dead jobs ----------------------------------------------------------------------------


def test_show_dead_jobs_lists_every_dead_job_oldest_first_then_a_dot():
    engine = failing_engine()
    f1 = kill(engine, b"f", b"a")
    advance(engine, 61)
    g1 = kill(engine, b"g", b"b", b"boom")
    assert admin(engine, b"show dead jobs") == (
        dead_line(f1, b"f", b"a", b"failed")
        + dead_line(g1, b"g", b"b", b"boom", b"2027-01-15T08:01:01Z")
        + b".\n"
    )


def test_show_dead_jobs_of_a_function_lists_only_its_jobs():
    engine = failing_engine()
    f1 = kill(engine, b"f", b"a")
    kill(engine, b"g", b"b")
    f2 = kill(engine, b"f", b"c")
    assert admin(engine, b"show dead jobs f") == (
        dead_line(f1, b"f", b"a", b"failed") + dead_line(f2, b"f", b"c", b"failed") + b".\n"
    )
    assert admin(engine, b"show dead jobs nothing") == b".\n"


def test_show_dead_jobs_is_just_a_dot_when_the_set_is_empty():
    assert admin(failing_engine(), b"show dead jobs") == b".\n"
    assert admin(failing_engine(), b"SHOW DEAD JOBS") == b".\n"


def test_show_dead_jobs_escapes_control_bytes_in_the_error_and_the_unique():
    engine = failing_engine()
    handle = kill(engine, b"f", b"u\tx", b"Traceback:\n\tline 1\\\r\n")
    (line, end) = admin(engine, b"show dead jobs").splitlines(keepends=True)
    assert end == b".\n"
    assert line == dead_line(handle, b"f", b"u\\x09x", b"Traceback:\\x0a\\x09line 1\\x5c\\x0d\\x0a")
    assert line.count(b"\t") == 5


def test_show_dead_jobs_counts_every_failed_attempt():
    engine = failing_engine(bg_retries=2, bg_retry_delay=1.0)
    client, w = connect(engine), worker(engine, "f")
    handle = submit(engine, client, b"f", b"u", b"x", T.SUBMIT_JOB_BG)
    for _ in range(3):
        advance(engine, 10)
        assert grab_handle(engine, w) == handle
        send(engine, w, T.WORK_FAIL, handle)
    fields = admin(engine, b"show dead jobs").split(b"\n")[0].split(b"\t")
    assert fields[3] == b"3"
    assert fields[4] == b"2027-01-15T08:00:30Z"  # the last failure


# --- retry dead job(s) -------------------------------------------------------------------------


def test_retry_dead_job_reruns_it_and_an_unknown_handle_is_an_error():
    engine = failing_engine()
    handle = kill(engine, b"f", b"u")
    assert admin(engine, b"retry dead job " + handle) == b"OK 1\n"
    assert admin(engine, b"show dead jobs") == b".\n"
    (revived,) = engine.iter_jobs()
    assert revived.unique == b"u" and revived.handle != handle
    assert admin(engine, b"retry dead job " + handle) == b"ERR UNKNOWN_JOB\r\n"
    assert admin(engine, b"retry dead job H:nope") == b"ERR UNKNOWN_JOB\r\n"


def test_retry_dead_jobs_of_a_function_or_all_answers_the_count():
    engine = failing_engine()
    kill(engine, b"f", b"a")
    kill(engine, b"g", b"b")
    kill(engine, b"f", b"c")
    assert admin(engine, b"retry dead jobs f") == b"OK 2\n"
    assert admin(engine, b"retry dead jobs f") == b"OK 0\n"
    assert admin(engine, b"retry dead jobs all") == b"OK 1\n"
    assert admin(engine, b"retry dead jobs all") == b"OK 0\n"
    assert sorted(job.unique for job in engine.iter_jobs()) == [b"a", b"b", b"c"]


@pytest.mark.parametrize(
    "line",
    [
        b"retry",
        b"retry dead",
        b"retry dead job",
        b"retry dead jobs",
        b"retry live job H:x",
        b"retry dead thing H:x",
        b"retry dead job H:x extra",
    ],
)
def test_retry_with_bad_arguments_is_invalid(line):
    engine = failing_engine()
    kill(engine, b"f", b"u")
    assert admin(engine, line).startswith(b"ERR INVALID_ARGUMENTS ")
    assert len(engine.dead) == 1


# --- purge dead jobs ---------------------------------------------------------------------------


def test_purge_dead_jobs_of_a_function_or_all_answers_the_count():
    engine = failing_engine()
    kill(engine, b"f", b"a")
    g = kill(engine, b"g", b"b")
    kill(engine, b"f", b"c")
    assert admin(engine, b"purge dead jobs f") == b"OK 2\n"
    assert admin(engine, b"show dead jobs") == dead_line(g, b"g", b"b", b"failed") + b".\n"
    assert admin(engine, b"purge dead jobs all") == b"OK 1\n"
    assert admin(engine, b"purge dead jobs all") == b"OK 0\n"
    assert not engine.jobs


@pytest.mark.parametrize(
    "line", [b"purge", b"purge dead", b"purge dead jobs", b"purge live jobs f", b"purge dead job f"]
)
def test_purge_with_bad_arguments_is_invalid(line):
    engine = failing_engine()
    kill(engine, b"f", b"u")
    assert admin(engine, line).startswith(b"ERR INVALID_ARGUMENTS ")
    assert len(engine.dead) == 1


# --- retries -----------------------------------------------------------------------------------


def test_retries_sets_a_function_s_policy_and_reads_it_back():
    engine = failing_engine()
    assert admin(engine, b"retries f 3 0.5") == b"OK\r\n"
    assert admin(engine, b"retries f") == b"OK 3 0.5\n"
    assert engine.policy_of(b"f") == RetryPolicy(3, 0.5)
    assert admin(engine, b"retries g") == b"OK 0 5\n"  # the server's default


def test_retries_without_a_base_uses_the_server_s_delay():
    engine = failing_engine(bg_retry_delay=2.5)
    assert admin(engine, b"retries f 4") == b"OK\r\n"
    assert admin(engine, b"retries f") == b"OK 4 2.5\n"


def test_retries_default_goes_back_to_the_server_s_policy():
    engine = failing_engine(bg_retries=1, bg_retry_delay=7.0)
    admin(engine, b"retries f 3 0.5")
    assert admin(engine, b"retries f default") == b"OK\r\n"
    assert admin(engine, b"retries f") == b"OK 1 7\n"
    assert admin(engine, b"retries f DEFAULT") == b"OK\r\n"


def test_a_policy_set_by_retries_decides_the_next_failure_s_wait():
    engine = failing_engine()
    assert admin(engine, b"retries f 1 0.5") == b"OK\r\n"
    client, w = connect(engine), worker(engine, "f")
    handle = submit(engine, client, b"f", b"u", b"x", T.SUBMIT_JOB_BG)
    assert grab_handle(engine, w) == handle
    send(engine, w, T.WORK_FAIL, handle)
    assert not engine.dead
    wait = retry_delay(0.5, 1, random.Random(SEED))
    assert admin(engine, b"show job " + handle) == b"OK retrying 1 1 %d\n" % math.ceil(
        START_TIME + wait
    )


@pytest.mark.parametrize(
    "line",
    [
        b"retries",
        b"retries f x",
        b"retries f 3 y",
        b"retries f 3.5",
        b"retries f -1",
        b"retries f 1001",
        b"retries f 3 0",
        b"retries f 3 -0.5",
        b"retries f 3 nan",
        b"retries f 3 inf",
        b"retries f 3 86401",
        b"retries f 3 0.5 x",
        b"retries f default 0.5",
    ],
)
def test_retries_with_bad_arguments_is_invalid_and_changes_nothing(line):
    engine = failing_engine()
    admin(engine, b"retries f 2 1")
    assert admin(engine, line).startswith(b"ERR INVALID_ARGUMENTS ")
    assert admin(engine, b"retries f") == b"OK 2 1\n"


def test_retries_accepts_the_limits():
    engine = failing_engine()
    assert admin(engine, b"retries f 1000 86400") == b"OK\r\n"
    assert admin(engine, b"retries f") == b"OK 1000 86400\n"
    assert admin(engine, b"retries f 0 0.001") == b"OK\r\n"
    assert admin(engine, b"retries f") == b"OK 0 0.001\n"


# --- show job ----------------------------------------------------------------------------------


def test_show_job_tells_queued_running_retrying_dead_and_unknown():
    engine = failing_engine(bg_retries=1)
    client = connect(engine)
    handle = submit(engine, client, b"f", b"u", b"x", T.SUBMIT_JOB_BG)
    assert admin(engine, b"show job " + handle) == b"OK queued 0 1 0\n"

    w = worker(engine, "f")
    assert grab_handle(engine, w) == handle
    assert admin(engine, b"show job " + handle) == b"OK running 0 1 0\n"

    send(engine, w, T.WORK_FAIL, handle)
    wait = retry_delay(5.0, 1, random.Random(SEED))
    due = math.ceil(START_TIME + wait)
    assert admin(engine, b"show job " + handle) == b"OK retrying 1 1 %d\n" % due

    advance(engine, wait)
    assert admin(engine, b"show job " + handle) == b"OK queued 1 1 0\n"
    assert grab_handle(engine, w) == handle
    assert admin(engine, b"show job " + handle) == b"OK running 1 1 0\n"

    send(engine, w, T.WORK_FAIL, handle)
    assert admin(engine, b"show job " + handle) == b"OK dead 2 1 0\n"
    assert admin(engine, b"show job H:nope") == b"OK unknown 0 0 0\n"
    admin(engine, b"purge dead jobs all")
    assert admin(engine, b"show job " + handle) == b"OK unknown 0 0 0\n"


def test_show_job_of_a_foreground_job_and_of_an_epoch_job_not_yet_due_is_queued():
    engine = failing_engine()
    client = connect(engine)
    foreground = submit(engine, client, b"f", b"a", b"x")
    send(engine, client, T.SUBMIT_JOB_EPOCH, b"f", b"b", str(int(START_TIME) + 60), b"x")
    epoch = replies(client)[0].args[0]
    assert admin(engine, b"show job " + foreground) == b"OK queued 0 0 0\n"
    assert admin(engine, b"show job " + epoch) == b"OK queued 0 0 0\n"


@pytest.mark.parametrize(
    "line", [b"show job", b"show job a b", b"show dead", b"show dead jobs f g"]
)
def test_show_with_the_wrong_words_is_an_unknown_show_argument(line):
    assert admin(failing_engine(), line) == b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"
