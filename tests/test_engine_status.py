"""GET_STATUS, GET_STATUS_UNIQUE, ECHO and SET_CLIENT_ID (shared doc §3.10, §3.15)."""

from __future__ import annotations

import pytest
from engine_helpers import (
    START_TIME,
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
    submit_epoch,
    worker,
)

from jobserver.protocol import PacketType as T


def status_unique(engine, peer, unique: bytes) -> tuple[bytes, ...]:
    """GET_STATUS_UNIQUE; returns (known, running, numerator, denominator, client_count)."""
    send(engine, peer, T.GET_STATUS_UNIQUE, unique)
    status = reply(peer)
    assert status.type == T.STATUS_RES_UNIQUE, status
    assert status.args[0] == unique
    return status.args[1:]


# ------------------------------------------------------------------ GET_STATUS


def test_get_status_follows_a_job_from_queued_to_running_to_gone():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    assert get_status(engine, client, handle) == (b"1", b"0", b"0", b"0")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    assert get_status(engine, client, handle) == (b"1", b"1", b"0", b"0")
    send(engine, w, T.WORK_STATUS, handle, b"3", b"7")
    assert get_status(engine, client, handle) == (b"1", b"1", b"3", b"7")
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    assert get_status(engine, client, handle) == (b"0", b"0", b"0", b"0")


def test_get_status_of_an_unknown_handle_is_zeros_never_an_error():
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.GET_STATUS, "H:nope:42")
    assert reply(client) == packet(T.STATUS_RES, "H:nope:42", "0", "0", "0", "0")
    send(engine, client, T.GET_STATUS, "")
    assert reply(client) == packet(T.STATUS_RES, "", "0", "0", "0", "0")


def test_get_status_works_from_any_connection_and_for_bg_jobs():
    engine = new_engine()
    submitter, stranger = connect(engine), connect(engine)
    handle = submit(engine, submitter, b"fn", b"", b"x", T.SUBMIT_JOB_BG)
    assert get_status(engine, stranger, handle) == (b"1", b"0", b"0", b"0")


def test_get_status_cuts_the_handle_at_its_first_nul():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"", b"x")
    send(engine, client, T.GET_STATUS, handle + b"\0junk")
    assert reply(client) == packet(T.STATUS_RES, handle, "1", "0", "0", "0")


def test_get_status_of_a_waiting_epoch_job_is_known_not_running():
    engine = new_engine()
    client = connect(engine)
    handle = submit_epoch(engine, client, "fn", START_TIME + 60)
    assert get_status(engine, client, handle) == (b"1", b"0", b"0", b"0")


def test_get_status_handle_of_63_bytes_is_looked_up():
    engine = new_engine()
    client = connect(engine)
    handle = b"H" * 63
    send(engine, client, T.GET_STATUS, handle)
    assert reply(client) == packet(T.STATUS_RES, handle, "0", "0", "0", "0")


@pytest.mark.parametrize("size", [64, 65, 1000])
def test_get_status_handle_of_64_bytes_or_more_is_an_error_not_silence(size):
    # gearmand sends nothing at all (§3.10, §3.14), desynchronising FIFO clients.
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.GET_STATUS, b"H" * size)
    answer = reply(client)
    assert answer.type == T.ERROR
    assert answer.args[0] == b"ARGUMENT_TOO_LARGE"


# ------------------------------------------------------------------ GET_STATUS_UNIQUE


def test_get_status_unique_counts_fg_clients_only():
    engine = new_engine()
    fg = [connect(engine) for _ in range(3)]
    for client in fg:
        submit(engine, client, b"fn", b"u9", b"x")
    observer = connect(engine)
    assert status_unique(engine, observer, b"u9") == (b"1", b"0", b"0", b"0", b"3")
    submit(engine, observer, b"fn", b"u9", b"x", T.SUBMIT_JOB_BG)
    assert status_unique(engine, observer, b"u9") == (b"1", b"0", b"0", b"0", b"3")
    engine.disconnect(fg[0])
    assert status_unique(engine, observer, b"u9") == (b"1", b"0", b"0", b"0", b"2")


def test_get_status_unique_of_a_running_job_reports_progress():
    engine = new_engine()
    client = connect(engine)
    handle = submit(engine, client, b"fn", b"u", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_STATUS, handle, b"2", b"5")
    replies(client)
    assert status_unique(engine, client, b"u") == (b"1", b"1", b"2", b"5", b"1")


def test_get_status_unique_of_a_bg_job_has_no_clients():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"u", b"x", T.SUBMIT_JOB_BG)
    assert status_unique(engine, client, b"u") == (b"1", b"0", b"0", b"0", b"0")


def test_get_status_unique_of_an_unknown_or_finished_unique_is_all_zeros():
    engine = new_engine()
    client = connect(engine)
    assert status_unique(engine, client, b"nope") == (b"0",) * 5
    handle = submit(engine, client, b"fn", b"u", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.WORK_COMPLETE, handle, b"")
    replies(client)
    assert status_unique(engine, client, b"u") == (b"0",) * 5


def test_get_status_unique_ignores_the_function():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fa", b"shared", b"x")
    submit(engine, client, b"fb", b"shared", b"x")
    submit(engine, client, b"fb", b"shared", b"x")
    known, running, _, _, clients = status_unique(engine, client, b"shared")
    assert (known, running) == (b"1", b"0")
    assert clients in (b"1", b"2")


def test_get_status_unique_still_finds_the_other_function_after_one_finished():
    engine = new_engine()
    client = connect(engine)
    a = submit(engine, client, b"fa", b"shared", b"x")
    submit(engine, client, b"fb", b"shared", b"x", T.SUBMIT_JOB_BG)
    w = worker(engine, "fa")
    grab_handle(engine, w)
    send(engine, w, T.WORK_COMPLETE, a, b"")
    replies(client)
    assert status_unique(engine, client, b"shared") == (b"1", b"0", b"0", b"0", b"0")


@pytest.mark.parametrize("unique", [b"", b"-"])
def test_get_status_unique_never_finds_empty_or_dash_jobs(unique):
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", unique, b"x")
    submit(engine, client, b"fn", unique, b"-")
    assert status_unique(engine, client, unique) == (b"0",) * 5


def test_get_status_unique_accepts_64_bytes():
    engine = new_engine()
    client = connect(engine)
    unique = b"u" * 64
    submit(engine, client, b"fn", unique, b"x")
    assert status_unique(engine, client, unique) == (b"1", b"0", b"0", b"0", b"1")


def test_get_status_unique_over_64_bytes_is_an_error_not_silence():
    engine = new_engine()
    client = connect(engine)
    send(engine, client, T.GET_STATUS_UNIQUE, b"u" * 65)
    assert reply(client) == error("ARGUMENT_TOO_LARGE", "Unique value too large")


# ------------------------------------------------------------------ ECHO, SET_CLIENT_ID


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\0", b"a\0b\0\0", bytes(range(256)) * 4096],
    ids=["empty", "text", "nul", "nuls", "1MiB"],
)
def test_echo_returns_identical_bytes(data):
    engine = new_engine()
    peer = connect(engine)
    send(engine, peer, T.ECHO_REQ, data)
    assert reply(peer) == packet(T.ECHO_RES, data)


def test_echo_works_on_a_worker_connection_holding_a_job():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"x")
    w = worker(engine, "fn")
    grab_handle(engine, w)
    send(engine, w, T.ECHO_REQ, "ping")
    assert reply(w) == packet(T.ECHO_RES, "ping")


def test_set_client_id_gets_no_reply_and_defaults_to_dash():
    engine = new_engine()
    peer = connect(engine)
    assert peer.client_id == b"-"
    send(engine, peer, T.SET_CLIENT_ID, "img worker 7")
    assert replies(peer) == []
    assert peer.client_id == b"img worker 7"
    send(engine, peer, T.SET_CLIENT_ID, "")
    assert peer.client_id == b""


def test_set_client_id_is_truncated_to_127_bytes():
    engine = new_engine()
    peer = connect(engine)
    send(engine, peer, T.SET_CLIENT_ID, b"x" * 127)
    assert peer.client_id == b"x" * 127
    send(engine, peer, T.SET_CLIENT_ID, b"0123456789" * 30)
    assert peer.client_id == (b"0123456789" * 30)[:127]
    assert replies(peer) == []


def test_get_status_unique_with_a_nul_looks_up_and_echoes_the_part_before_it():
    # A NUL cannot be part of a unique id, nor travel in STATUS_RES_UNIQUE's first argument;
    # encoding it would fail and cost the client its connection.
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"u", b"x", T.SUBMIT_JOB_BG)
    send(engine, client, T.GET_STATUS_UNIQUE, b"u\0junk")
    [status] = replies(client)
    assert (status.type, status.args) == (T.STATUS_RES_UNIQUE, (b"u", b"1", b"0", b"0", b"0", b"0"))
