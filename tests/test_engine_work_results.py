"""WORK_* results, forwarding and the `exceptions` option (shared doc §3.5, §3.7, §3.8)."""

from __future__ import annotations

import pytest
from engine_helpers import (
    connect,
    error,
    get_status,
    grab_handle,
    new_engine,
    packet,
    replies,
    reply,
    send,
    submit,
    worker,
)

from jobserver.engine.engine import parse_atoi_u32
from jobserver.protocol import PacketType as T

RESULT_NOT_FOUND = error("JOB_NOT_FOUND", "Job given in work result not found")
DATA_NOT_FOUND = error("JOB_NOT_FOUND", "Job does not exist on server")
EXCEPTION_NOT_FOUND = error(
    "JOB_NOT_FOUND", "An exception was received for a job that does not exist"
)

# Each WORK_* type with arguments for handle H and the error it gets for an unknown handle.
WORK_PACKETS = [
    pytest.param(T.WORK_STATUS, (b"1", b"2"), RESULT_NOT_FOUND, id="WORK_STATUS"),
    pytest.param(T.WORK_COMPLETE, (b"result",), RESULT_NOT_FOUND, id="WORK_COMPLETE"),
    pytest.param(T.WORK_FAIL, (), RESULT_NOT_FOUND, id="WORK_FAIL"),
    pytest.param(T.WORK_DATA, (b"data",), DATA_NOT_FOUND, id="WORK_DATA"),
    pytest.param(T.WORK_WARNING, (b"warn",), DATA_NOT_FOUND, id="WORK_WARNING"),
    pytest.param(T.WORK_EXCEPTION, (b"boom",), EXCEPTION_NOT_FOUND, id="WORK_EXCEPTION"),
]


def running_job(engine, *, background=False, listeners=1):
    """A job of `fn` held by a worker; returns (handle, worker, clients)."""
    clients = [connect(engine) for _ in range(listeners)]
    kind = T.SUBMIT_JOB_BG if background else T.SUBMIT_JOB
    handle = submit(engine, clients[0], b"fn", b"u", b"x", kind)
    for client in clients[1:]:
        assert submit(engine, client, b"fn", b"u", b"x") == handle
    w = worker(engine, "fn")
    assert grab_handle(engine, w) == handle
    return handle, w, clients


@pytest.mark.parametrize(
    ("packet_type", "args"),
    [
        (T.WORK_STATUS, (b"abc", b"4294967297")),
        (T.WORK_STATUS, (b"", b"-1")),
        (T.WORK_DATA, (b"bytes\0with\0nuls",)),
        (T.WORK_DATA, (b"",)),
        (T.WORK_WARNING, (b"careful\0!",)),
    ],
)
def test_progress_packets_are_forwarded_verbatim_to_every_listener(packet_type, args):
    engine = new_engine()
    handle, w, clients = running_job(engine, listeners=2)
    send(engine, w, packet_type, handle, *args)
    assert replies(w) == []
    for client in clients:
        assert replies(client) == [packet(packet_type, handle, *args)]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"0", 0),
        (b"12", 12),
        (b"12x", 12),
        (b"abc", 0),
        (b"", 0),
        (b"-1", 4294967295),
        (b"4294967295", 4294967295),
        (b"4294967297", 1),
        (b"  7", 7),
        (b"+5", 5),
        (b"-", 0),
    ],
)
def test_work_status_numbers_are_read_like_c_atoi_into_uint32(text, value):
    assert parse_atoi_u32(text) == value
    engine = new_engine()
    handle, w, _ = running_job(engine)
    observer = connect(engine)
    expected_value = str(value).encode()
    send(engine, w, T.WORK_STATUS, handle, text, b"100")
    assert get_status(engine, observer, handle) == (b"1", b"1", expected_value, b"100")
    send(engine, w, T.WORK_STATUS, handle, b"3", text)
    assert get_status(engine, observer, handle) == (b"1", b"1", b"3", expected_value)


def test_work_status_is_stored_for_bg_jobs_but_nothing_is_forwarded():
    engine = new_engine()
    handle, w, [client] = running_job(engine, background=True)
    send(engine, w, T.WORK_STATUS, handle, b"4", b"9")
    send(engine, w, T.WORK_DATA, handle, b"d")
    send(engine, w, T.WORK_WARNING, handle, b"w")
    assert replies(w) == []
    assert replies(client) == []
    assert get_status(engine, client, handle) == (b"1", b"1", b"4", b"9")
    send(engine, w, T.WORK_COMPLETE, handle, b"r")
    assert replies(w) == []
    assert replies(client) == []
    assert handle not in engine.jobs


@pytest.mark.parametrize("result", [b"", b"olleh", b"with\0nul\0bytes"])
def test_work_complete_is_forwarded_with_its_result_and_ends_the_job(result):
    engine = new_engine()
    handle, w, [client] = running_job(engine)
    send(engine, w, T.WORK_COMPLETE, handle, result)
    assert replies(w) == []
    assert replies(client) == [packet(T.WORK_COMPLETE, handle, result)]
    assert handle not in engine.jobs
    assert handle not in w.held
    assert client.listening == set()
    assert get_status(engine, client, handle) == (b"0", b"0", b"0", b"0")


def test_work_fail_is_forwarded_without_a_trailing_nul_and_is_never_retried():
    engine = new_engine()
    handle, w, [client] = running_job(engine)
    send(engine, w, T.WORK_FAIL, handle)
    assert replies(client) == [packet(T.WORK_FAIL, handle)]
    assert handle not in engine.jobs
    assert engine.functions[b"fn"].total == 0


@pytest.mark.parametrize(("packet_type", "args", "expected"), WORK_PACKETS)
def test_work_packet_for_an_unknown_handle_is_job_not_found(packet_type, args, expected):
    engine = new_engine()
    w = worker(engine, "fn")
    send(engine, w, packet_type, b"H:nope:1", *args)
    assert reply(w) == expected


@pytest.mark.parametrize(("packet_type", "args", "expected"), WORK_PACKETS)
def test_work_packet_from_a_connection_not_holding_the_job_is_job_not_found(
    packet_type, args, expected
):
    engine = new_engine()
    handle, holder, [client] = running_job(engine)
    other = worker(engine, "fn")
    send(engine, other, packet_type, handle, *args)
    assert reply(other) == expected
    assert replies(client) == []
    # The job is untouched and its real worker can still finish it.
    assert get_status(engine, client, handle) == (b"1", b"1", b"0", b"0")
    send(engine, holder, T.WORK_COMPLETE, handle, b"r")
    assert replies(holder) == []
    assert replies(client) == [packet(T.WORK_COMPLETE, handle, b"r")]


@pytest.mark.parametrize(("packet_type", "args", "expected"), WORK_PACKETS)
def test_work_packet_for_a_queued_job_nobody_holds_is_job_not_found(packet_type, args, expected):
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    send(engine, w, packet_type, handle, *args)
    assert reply(w) == expected
    assert replies(client) == []
    assert engine.functions[b"fn"].queued == [0, 1, 0]


@pytest.mark.parametrize(("packet_type", "args", "expected"), WORK_PACKETS)
@pytest.mark.parametrize("ending", [T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION])
def test_work_packet_after_the_job_ended_is_job_not_found(ending, packet_type, args, expected):
    engine = new_engine()
    handle, w, [client] = running_job(engine)
    send(engine, w, ending, handle, *([b"r"] if ending != T.WORK_FAIL else []))
    replies(client)
    send(engine, w, packet_type, handle, *args)
    assert reply(w) == expected
    assert replies(client) == []


def test_work_packets_route_by_handle_between_jobs_held_by_one_worker():
    engine = new_engine()
    a, b = connect(engine), connect(engine)
    handle_a = submit(engine, a, b"fn", b"", b"a")
    handle_b = submit(engine, b, b"fn", b"", b"b")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    grab_handle(engine, w)
    send(engine, w, T.WORK_COMPLETE, handle_b, b"rb")
    send(engine, w, T.WORK_DATA, handle_a, b"da")
    assert replies(a) == [packet(T.WORK_DATA, handle_a, b"da")]
    assert replies(b) == [packet(T.WORK_COMPLETE, handle_b, b"rb")]


@pytest.mark.parametrize("option", [b"exceptions", b"EXCEPTIONS", b"Exceptions", b"exceptions\0"])
def test_option_req_exceptions_is_echoed_byte_for_byte(option):
    engine = new_engine()
    client = connect(engine)
    assert not client.exceptions
    send(engine, client, T.OPTION_REQ, option)
    assert reply(client) == packet(T.OPTION_RES, option)
    assert client.exceptions


@pytest.mark.parametrize(
    "option", [b"", b"exception", b"exceptions!", b"nope", b"exceptions" + b"\0" * 54]
)
def test_unknown_option_is_an_error_and_enables_nothing(option):
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.OPTION_REQ, option)
    assert reply(client) == error("UNKNOWN_OPTION", "Server does not recognize given option")
    assert not client.exceptions


def test_exceptions_option_stays_on_for_the_connection():
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.OPTION_REQ, "exceptions")
    send(engine, client, T.OPTION_REQ, "bogus")
    assert [p.type for p in replies(client)] == [T.OPTION_RES, T.ERROR]
    assert client.exceptions


def test_work_exception_goes_to_listeners_with_the_option_and_fail_nul_to_the_others():
    engine = new_engine()
    handle, w, [with_option, without] = running_job(engine, listeners=2)
    send(engine, with_option, T.OPTION_REQ, "exceptions")
    replies(with_option)
    send(engine, w, T.WORK_EXCEPTION, handle, b"boom\0trace")
    assert replies(w) == []
    assert replies(with_option) == [packet(T.WORK_EXCEPTION, handle, b"boom\0trace")]
    # gearmand 1.1.20 appends one NUL to the handle, which hangs libgearman's own client;
    # we send the plain form (engine.FAIL_AFTER_EXCEPTION_SUFFIX).
    assert replies(without) == [packet(T.WORK_FAIL, handle)]
    assert handle not in engine.jobs
    assert engine.functions[b"fn"].total == 0


def test_work_exception_raw_bytes_of_the_fail_fallback_are_a_plain_work_fail():
    engine = new_engine()
    handle, w, [client] = running_job(engine)
    send(engine, w, T.WORK_EXCEPTION, handle, b"boom")
    raw = client.take_output()
    # No NUL after the handle (gearmand's `H\0` hangs libgearman's client).
    assert raw == b"\0RES" + (14).to_bytes(4, "big") + len(handle).to_bytes(4, "big") + handle


def test_server_wide_exceptions_option_enables_it_on_every_connection():
    engine = new_engine(exceptions=True)
    handle, w, [client] = running_job(engine)
    assert client.exceptions
    send(engine, w, T.WORK_EXCEPTION, handle, b"boom")
    assert replies(client) == [packet(T.WORK_EXCEPTION, handle, b"boom")]


def test_work_exception_for_a_bg_job_ends_it_silently():
    engine = new_engine()
    handle, w, [client] = running_job(engine, background=True)
    send(engine, w, T.WORK_EXCEPTION, handle, b"boom")
    assert replies(w) == []
    assert replies(client) == []
    assert handle not in engine.jobs


def test_duplicate_listener_gets_the_exception_fallback_twice():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"u", b"x")
    submit(engine, client, b"fn", b"u", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_EXCEPTION, handle, b"boom")
    assert replies(client) == [packet(T.WORK_FAIL, handle)] * 2
