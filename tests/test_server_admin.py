"""The admin text protocol over a socket, exact bytes, against a live jobserver (shared doc §4).

List replies are compared line by line regardless of line order (gearmand lists in hash
order, so clients cannot rely on one); everything else — tabs, `.` terminators, `\\n` versus
`\\r\\n`, `+` for spaces — is compared byte for byte. Connection fds in `workers` are the only
value normalised. Deliberate differences from gearmand 1.1.20 are marked.
"""

from __future__ import annotations

import re

import pytest
import wire
from servers import status, wait_until
from wire import Wire

from jobserver.protocol import PacketType as T

connect = wire.connect  # fixture: connect(server) -> Wire, closed at teardown

INCOMPLETE = b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+"


def list_lines(reply: bytes) -> list[bytes]:
    """The lines of a list reply, sorted, after checking its framing."""
    assert reply.endswith(b".\n"), f"list reply not terminated by a '.' line: {reply!r}"
    body = reply[:-2]
    assert body == b"" or body.endswith(b"\n"), f"list lines must end in \\n: {reply!r}"
    assert b"\r" not in body, f"list lines end in \\n only: {reply!r}"
    return sorted(body.split(b"\n")[:-1])


def assert_list(reply: bytes, expected: list[bytes]) -> None:
    assert list_lines(reply) == sorted(expected), reply


@pytest.fixture
def console(jobserver, connect) -> Wire:
    """An admin connection to the jobserver."""
    return connect(jobserver)


# ---------------------------------------------------------------------- lists


def test_workers_lists_every_connection_with_its_id_and_functions_most_recent_first(
    jobserver, connect, console
):
    worker = connect(jobserver)
    worker.send(T.SET_CLIENT_ID, b"img worker 7")
    worker.can_do(b"fb", b"fa", b"fb")  # duplicates are listed again
    client = connect(jobserver)
    client.echo()
    long_id = connect(jobserver)
    long_id.send(T.SET_CLIENT_ID, b"i" * 200)
    long_id.echo()

    expected = [
        b"FD 127.0.0.1 img worker 7 : fb fa fb",  # registered fb, fa, fb: latest first
        b"FD 127.0.0.1 - :",  # the client
        b"FD 127.0.0.1 - :",  # the admin connection itself
        b"FD 127.0.0.1 " + b"i" * 127 + b" :",  # ids are cut to 127 bytes
    ]

    def normalised() -> list[bytes]:
        reply = console.admin("workers")
        lines = list_lines(reply)
        fds = [line.split(b" ", 1)[0] for line in lines]
        assert all(fd.isdigit() for fd in fds) and len(set(fds)) == len(fds), reply
        return sorted(re.sub(rb"^\d+ ", b"FD ", line) for line in lines)

    # Connections closed just before this test (the fixture's readiness probe) may take a
    # moment to disappear from the list.
    wait_until(lambda: normalised() == sorted(expected), timeout=2.0, what="workers list")


def test_status_counts_queued_and_running_jobs_and_each_registration(jobserver, connect, console):
    worker, client = connect(jobserver), connect(jobserver)
    worker.can_do(b"fa", b"fa", b"fb")  # two registrations of fa count as two workers
    for unique in (b"1", b"2", b"3"):
        client.submit(b"fa", b"", unique, T.SUBMIT_JOB_BG)
    client.submit(b"fc", b"", b"", T.SUBMIT_JOB_BG)  # created by a submit: no workers
    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN)

    assert_list(console.admin("status"), [b"fa\t3\t1\t2", b"fb\t0\t0\t1", b"fc\t1\t0\t0"])


def test_empty_server_lists_nothing_but_the_terminator(console):
    assert console.admin("status") == b".\n"
    assert console.admin("prioritystatus") == b".\n"
    assert console.admin("show jobs") == b".\n"
    assert console.admin("show unique jobs") == b".\n"


def test_prioritystatus_counts_queued_jobs_per_priority(jobserver, connect, console):
    worker, client = connect(jobserver), connect(jobserver)
    worker.can_do(b"fp")
    for packet_type in (T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_BG):
        client.submit(b"fp", b"", b"", packet_type)
    client.submit(b"fp", b"", b"", T.SUBMIT_JOB_BG)
    client.submit(b"fp", b"", b"", T.SUBMIT_JOB_LOW_BG)
    worker.send(T.GRAB_JOB)  # takes a HIGH job: running jobs are not counted
    worker.expect(T.JOB_ASSIGN)

    assert console.admin("prioritystatus") == b"fp\t1\t2\t1\t1\n.\n"


def test_show_jobs_lists_handle_retries_ignore_and_persisted(jobserver, connect, console):
    client = connect(jobserver)
    background = client.submit(b"fs", b"", b"bg", T.SUBMIT_JOB_BG)
    foreground = client.submit(b"fs", b"", b"fg")
    retried = client.submit(b"fr", b"", b"r", T.SUBMIT_JOB_BG)
    lost = connect(jobserver)
    lost.can_do(b"fr")
    lost.send(T.GRAB_JOB)
    lost.expect(T.JOB_ASSIGN, retried, b"fr", b"")
    lost.close()  # requeued: retries 1

    expected = sorted(
        [background + b"\t0\t0\t1", foreground + b"\t0\t0\t0", retried + b"\t1\t0\t1"]
    )
    wait_until(
        lambda: list_lines(console.admin("show jobs")) == expected,
        timeout=2.0,
        what=f"show jobs == {expected}",
    )


def test_show_unique_jobs_lists_each_unique_and_an_empty_line_for_none(jobserver, connect, console):
    client = connect(jobserver)
    client.submit(b"fu", b"", b"abc", T.SUBMIT_JOB_BG)
    client.submit(b"fu", b"", b"", T.SUBMIT_JOB_BG)
    client.submit(b"fu", b"payload", b"-", T.SUBMIT_JOB_BG)
    reply = console.admin("show unique jobs")
    assert_list(reply, [b"abc", b"", b"-"])
    assert b"\n\n" in reply or reply.startswith(b"\n"), reply  # the empty line is really there


def test_show_with_other_arguments_is_unknown_show_arguments_and_bare_show_unknown(console):
    assert console.admin("show stuff") == b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"
    assert console.admin("show unique") == b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"
    assert console.admin("show jobs now") == b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"
    assert console.admin("show") == b"ERR UNKNOWN_COMMAND Unknown+server+commandshow\r\n"


# ---------------------------------------------------------------------- changes


def test_cancel_job_fails_a_queued_job_to_its_client(jobserver, connect, console):
    client = connect(jobserver)
    handle = client.submit(b"fcancel", b"x")
    assert console.admin(b"cancel job " + handle) == b"OK\r\n"
    client.expect(T.WORK_FAIL, handle)
    client.send(T.GET_STATUS, handle)
    client.expect(T.STATUS_RES, handle, b"0", b"0", b"0", b"0")
    # Nothing uses the function any more: it is forgotten (gearmand lists it with zeros).
    assert "fcancel" not in status(jobserver.address)
    # jobserver forgets a cancelled job at once (gearmand keeps it, ignored, until reaped).
    assert console.admin(b"cancel job " + handle) == b"ERR UNKNOWN_JOB\r\n"


def test_cancel_job_of_a_running_job_fails_it_once_and_later_results_go_nowhere(
    jobserver, connect, console
):
    # gearmand lets the client get WORK_FAIL and later WORK_COMPLETE too (§6.14); we do not.
    worker, client = connect(jobserver), connect(jobserver)
    worker.can_do(b"frun")
    handle = client.submit(b"frun", b"x")
    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN, handle, b"frun", b"x")
    assert console.admin(b"cancel job " + handle) == b"OK\r\n"
    client.expect(T.WORK_FAIL, handle)

    worker.send(T.WORK_STATUS, handle, b"1", b"2")
    worker.send(T.WORK_COMPLETE, handle, b"too late")
    worker.echo()
    client.expect_nothing()
    assert status(jobserver.address)["frun"] == (0, 0, 1)


def test_cancel_job_error_forms(console):
    assert console.admin("cancel job H:nope:1") == b"ERR UNKNOWN_JOB\r\n"
    assert console.admin("cancel x y") == b"ERR UNKNOWN_ERROR\r\n"
    assert console.admin("cancel job a b") == b"ERR UNKNOWN_ERROR\r\n"
    assert console.admin("cancel job") == b"ERR UNKNOWN_COMMAND Unknown+server+commandcancel\r\n"


def test_create_function_over_lf_creates_the_whole_name(jobserver, console):
    # gearmand 1.1.x creates "fo" for `create function foo\n` (§4, §6.18); we do not.
    assert console.admin(b"create function foo\n") == b"OK\r\n"
    assert console.admin(b"create function bar\r\n") == b"OK\r\n"
    assert_list(console.admin("status"), [b"foo\t0\t0\t0", b"bar\t0\t0\t0"])
    assert console.admin("create function") == INCOMPLETE + b"create\r\n"
    assert console.admin("create fun x") == INCOMPLETE + b"create\r\n"


def test_drop_function_answers_ok_not_found_busy_or_queued(jobserver, connect, console):
    worker, client = connect(jobserver), connect(jobserver)
    assert console.admin("create function gone") == b"OK\r\n"
    assert console.admin("drop function GONE") == b"OK\r\n"  # names match case-insensitively
    assert "gone" not in status(jobserver.address)
    assert console.admin("drop function gone") == b"ERR function not found\r\n"

    worker.can_do(b"busy")
    assert console.admin("drop function busy") == (
        b"ERR there are still connected workers or executing clients\r\n"
    )
    # gearmand drops a function with queued jobs and orphans them (§4); we refuse.
    client.submit(b"queued", b"", b"", T.SUBMIT_JOB_BG)
    assert console.admin("drop function queued") == b"ERR function+has+queued+jobs\r\n"
    assert status(jobserver.address)["queued"] == (1, 0, 0)
    assert console.admin("drop function") == INCOMPLETE + b"drop\r\n"


def test_maxqueue_forms_set_limits_per_priority(jobserver, connect, console):
    client = connect(jobserver)

    def submit(function: bytes, packet_type: int) -> bool:
        client.send(packet_type, function, b"", b"")
        packet = client.read_packet()
        if packet.type == T.ERROR:
            assert packet.args == (b"QUEUE_ERROR", b"Job queue is full")
            return False
        assert packet.type == T.JOB_CREATED, packet
        return True

    high, normal, low = T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_BG, T.SUBMIT_JOB_LOW_BG
    assert console.admin("maxqueue one 1") == b"OK\r\n"  # one number: every priority
    assert [submit(b"one", t) for t in (low, high, normal, low)] == [True, False, False, False]

    assert console.admin("maxqueue two 3 1") == b"OK\r\n"  # HIGH, NORMAL; LOW unlimited
    results = [submit(b"two", t) for t in (normal, normal, high, low, low, high)]
    assert results == [True, False, True, True, True, False]

    assert console.admin("maxqueue three 0 0 1") == b"OK\r\n"  # HIGH, NORMAL, LOW; 0 = none
    assert [submit(b"three", t) for t in (low, low, normal, high)] == [True, False, True, True]

    assert console.admin("maxqueue three") == b"OK\r\n"  # no numbers: limits reset
    assert submit(b"three", low)

    assert console.admin("maxqueue") == INCOMPLETE + b"maxqueue\r\n"


def test_maxqueue_with_a_non_number_is_an_error(console):
    assert console.admin("maxqueue fn lots").startswith(b"ERR INVALID_ARGUMENTS ")


# ---------------------------------------------------------------------- facts


def test_version_getpid_and_verbose(jobserver, console):
    assert console.admin("version") == b"OK jobserver-0.1.0\n"
    assert console.admin("getpid") == b"OK %d\n" % jobserver.pid
    assert console.admin("getpid extra tokens") == b"OK %d\n" % jobserver.pid
    assert console.admin("verbose") == b"OK NOTICE\n"  # our default; gearmand's is ERROR


def test_verbose_reports_the_configured_level(start_jobserver):
    server = start_jobserver("--verbose", "INFO")
    with Wire.to(server) as console:
        assert console.admin("verbose") == b"OK INFO\n"


def test_shutdown_is_an_unknown_command_and_the_server_keeps_running(jobserver, console):
    unknown = b"ERR UNKNOWN_COMMAND Unknown+server+commandshutdown\r\n"
    assert console.admin("shutdown") == unknown
    assert console.admin("shutdown graceful") == unknown
    assert jobserver.proc.poll() is None
    assert console.admin("version") == b"OK jobserver-0.1.0\n"


def test_unknown_commands_are_echoed_without_a_separator(console):
    prefix = b"ERR UNKNOWN_COMMAND Unknown+server+command"
    assert console.admin("frobnicate") == prefix + b"frobnicate\r\n"
    assert console.admin("frob nicate") == prefix + b"frob\r\n"
    assert console.admin("") == prefix + b"\r\n"
    assert console.admin(" status") == prefix + b"\r\n"  # a leading space: empty command
    assert console.admin("status\tnow") == prefix + b"status\tnow\r\n"  # TAB is no separator


def test_command_words_and_keywords_are_case_insensitive(jobserver, connect, console):
    client = connect(jobserver)
    handle = client.submit(b"Fn", b"", b"Uq", T.SUBMIT_JOB_BG)
    assert console.admin("STATUS") == b"Fn\t1\t0\t0\n.\n"
    assert console.admin("PriorityStatus") == b"Fn\t0\t1\t0\t0\n.\n"
    assert console.admin("SHOW JOBS") == handle + b"\t0\t0\t1\n.\n"
    assert console.admin("Show Unique Jobs") == b"Uq\n.\n"
    assert console.admin("VERSION") == b"OK jobserver-0.1.0\n"
    assert console.admin("GetPid") == b"OK %d\n" % jobserver.pid
    assert console.admin("VERBOSE") == b"OK NOTICE\n"
    assert list_lines(console.admin("WORKERS"))
    assert console.admin("MAXQUEUE Fn 5") == b"OK\r\n"
    assert console.admin("CREATE FUNCTION Other") == b"OK\r\n"  # names keep their case
    assert b"Other\t0\t0\t0\n" in console.admin("status")
    assert console.admin(b"CANCEL JOB " + handle) == b"OK\r\n"


def test_six_tokens_is_too_many_arguments_and_the_connection_stays_open(console):
    # gearmand closes the connection here; a text line is resynchronisable, so we answer.
    assert console.admin("a b c d e f") == b"ERR INVALID_ARGUMENTS Too+many+arguments\r\n"
    assert console.admin("maxqueue fn 1 2 3 4") == b"ERR INVALID_ARGUMENTS Too+many+arguments\r\n"
    assert console.admin("maxqueue fn 1 2 3") == b"OK\r\n"  # five tokens are fine
    assert console.admin("version") == b"OK jobserver-0.1.0\n"


def test_crlf_lines_and_runs_of_spaces(jobserver, connect, console):
    client = connect(jobserver)
    handle = client.submit(b"fx", b"", b"", T.SUBMIT_JOB_BG)
    assert console.admin(b"version\r\n") == b"OK jobserver-0.1.0\n"
    assert console.admin(b"status\r\n") == b"fx\t1\t0\t0\n.\n"
    assert console.admin(b"show    jobs\r\n") == handle + b"\t0\t0\t1\n.\n"
    assert console.admin(b"cancel  job   " + handle + b"\r\n") == b"OK\r\n"
