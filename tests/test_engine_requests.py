"""Every request gets exactly one reply, in order, or none where none is due (shared doc §1,
§2, §3.13, §3.14, §6.9)."""

from __future__ import annotations

import struct

import pytest
from engine_helpers import (
    connect,
    error,
    new_engine,
    packet,
    replies,
    reply,
    send,
    submit,
    types,
    worker,
)

from jobserver.protocol import ARGUMENT_COUNT, REQ, RES, BadPacket, Decoder
from jobserver.protocol import PacketType as T

INVALID_MAGIC = error("INVALID_MAGIC", "Request magic expected")
INVALID_COMMAND = error("INVALID_COMMAND", "Command not expected")

NOT_FOR_SERVERS = [
    T.UNUSED,
    T.NOOP,
    T.JOB_CREATED,
    T.NO_JOB,
    T.JOB_ASSIGN,
    T.ECHO_RES,
    T.ERROR,
    T.STATUS_RES,
    T.ALL_YOURS,
    T.OPTION_RES,
    T.JOB_ASSIGN_UNIQ,
    T.SUBMIT_JOB_SCHED,
    T.JOB_ASSIGN_ALL,
    T.STATUS_RES_UNIQUE,
]
"""Types 5, 24, 35 and every server-to-client type (§2)."""

SILENT_ON_SUCCESS = [
    (T.CAN_DO, ("fn",)),
    (T.CAN_DO_TIMEOUT, ("fn", "1000")),
    (T.CANT_DO, ("fn",)),
    (T.CANT_DO, ("never-registered",)),
    (T.RESET_ABILITIES, ()),
    (T.PRE_SLEEP, ()),
    (T.SET_CLIENT_ID, ("me",)),
]

# A request of every type a server accepts, with the type of its one reply on a fresh
# connection (no jobs anywhere).
ANSWERED = {
    T.SUBMIT_JOB: (("fn", "", "x"), T.JOB_CREATED),
    T.SUBMIT_JOB_BG: (("fn", "", "x"), T.JOB_CREATED),
    T.SUBMIT_JOB_HIGH: (("fn", "", "x"), T.JOB_CREATED),
    T.SUBMIT_JOB_HIGH_BG: (("fn", "", "x"), T.JOB_CREATED),
    T.SUBMIT_JOB_LOW: (("fn", "", "x"), T.JOB_CREATED),
    T.SUBMIT_JOB_LOW_BG: (("fn", "", "x"), T.JOB_CREATED),
    T.SUBMIT_JOB_EPOCH: (("fn", "", "0", "x"), T.JOB_CREATED),
    T.SUBMIT_REDUCE_JOB: (("fn", "", "r", "a", "x"), T.JOB_CREATED),
    T.SUBMIT_REDUCE_JOB_BACKGROUND: (("fn", "", "r", "a", "x"), T.JOB_CREATED),
    T.GRAB_JOB: ((), T.NO_JOB),
    T.GRAB_JOB_UNIQ: ((), T.NO_JOB),
    T.GRAB_JOB_ALL: ((), T.NO_JOB),
    T.WORK_STATUS: (("H:x:1", "1", "2"), T.ERROR),
    T.WORK_COMPLETE: (("H:x:1", "r"), T.ERROR),
    T.WORK_FAIL: (("H:x:1",), T.ERROR),
    T.WORK_EXCEPTION: (("H:x:1", "e"), T.ERROR),
    T.WORK_DATA: (("H:x:1", "d"), T.ERROR),
    T.WORK_WARNING: (("H:x:1", "w"), T.ERROR),
    T.GET_STATUS: (("H:x:1",), T.STATUS_RES),
    T.GET_STATUS_UNIQUE: (("u",), T.STATUS_RES_UNIQUE),
    T.ECHO_REQ: (("e",), T.ECHO_RES),
    T.OPTION_REQ: (("exceptions",), T.OPTION_RES),
}


def blank_args(packet_type: int) -> tuple[bytes, ...]:
    return (b"",) * ARGUMENT_COUNT[packet_type]


def test_every_packet_type_is_covered_by_this_module():
    silent = {t for t, _ in SILENT_ON_SUCCESS}
    assert silent | set(ANSWERED) | set(NOT_FOR_SERVERS) == set(T)


@pytest.mark.parametrize("packet_type", list(ANSWERED))
def test_request_gets_exactly_one_reply(packet_type):
    args, reply_type = ANSWERED[packet_type]
    engine = new_engine()
    peer = connect(engine)
    send(engine, peer, packet_type, *args)
    assert types(peer) == [reply_type]


@pytest.mark.parametrize(("packet_type", "args"), SILENT_ON_SUCCESS)
def test_request_that_succeeds_silently_gets_no_reply(packet_type, args):
    engine = new_engine()
    peer = connect(engine)
    send(engine, peer, packet_type, *args)
    assert replies(peer) == []
    assert engine.dirty == []


def test_successful_work_packets_get_no_reply_to_the_worker():
    engine = new_engine()
    client = connect(engine)
    handles = [submit(engine, client, b"fn", b"", str(i)) for i in range(3)]
    w = worker(engine, "fn")
    for _ in handles:
        send(engine, w, T.GRAB_JOB)
    assert types(w) == [T.JOB_ASSIGN] * 3
    send(engine, w, T.WORK_STATUS, handles[0], "1", "2")
    send(engine, w, T.WORK_DATA, handles[0], "d")
    send(engine, w, T.WORK_WARNING, handles[0], "w")
    send(engine, w, T.WORK_COMPLETE, handles[0], "r")
    send(engine, w, T.WORK_FAIL, handles[1])
    send(engine, w, T.WORK_EXCEPTION, handles[2], "e")
    assert replies(w) == []


@pytest.mark.parametrize("packet_type", NOT_FOR_SERVERS)
def test_unused_and_server_to_client_types_are_invalid_command(packet_type):
    engine = new_engine()
    peer = connect(engine)
    send(engine, peer, packet_type, *blank_args(packet_type))
    assert reply(peer) == INVALID_COMMAND
    # The connection stays usable.
    send(engine, peer, T.ECHO_REQ, "still here")
    assert reply(peer) == packet(T.ECHO_RES, "still here")


def test_submit_job_sched_is_rejected_and_creates_nothing():
    engine = new_engine()
    peer = connect(engine)
    send(engine, peer, T.SUBMIT_JOB_SCHED, "fn", "", "1", "2", "3", "4", "5", "x")
    assert reply(peer) == INVALID_COMMAND
    assert engine.jobs == {}


@pytest.mark.parametrize("packet_type", list(T))
def test_res_magic_is_invalid_magic_for_every_type(packet_type):
    engine = new_engine()
    peer = connect(engine)
    send(engine, peer, packet_type, *blank_args(packet_type), magic=RES)
    assert reply(peer) == INVALID_MAGIC


def test_res_magic_submit_creates_no_job_and_res_magic_can_do_registers_nothing():
    engine = new_engine()
    peer = connect(engine)
    send(engine, peer, T.SUBMIT_JOB, "fn", "", "x", magic=RES)
    send(engine, peer, T.CAN_DO, "fn", magic=RES)
    assert replies(peer) == [INVALID_MAGIC, INVALID_MAGIC]
    assert engine.jobs == {}
    assert peer.abilities is None
    assert engine.functions == {}


def bad_packet(packet_type: int, payload: bytes, magic: bytes = REQ) -> BadPacket:
    """What the decoder yields for a packet whose separators are missing."""
    raw = struct.pack(">4sII", magic, packet_type, len(payload)) + payload
    (event,) = Decoder().feed(raw)
    assert isinstance(event, BadPacket), event
    return event


def test_bad_packet_is_answered_with_its_error():
    engine = new_engine()
    peer = connect(engine)
    bad = bad_packet(T.SUBMIT_JOB, b"fn-without-separators")
    engine.handle_bad_packet(peer, bad)
    assert reply(peer) == error(bad.code, bad.text)
    assert bad.code == b"INVALID_PACKET"
    assert engine.jobs == {}


def test_bad_packet_with_res_magic_is_invalid_magic():
    engine = new_engine()
    peer = connect(engine)
    engine.handle_bad_packet(peer, bad_packet(T.WORK_STATUS, b"no-nul", RES))
    assert reply(peer) == INVALID_MAGIC


def test_bad_packet_of_a_server_to_client_type_is_invalid_command():
    engine = new_engine()
    peer = connect(engine)
    engine.handle_bad_packet(peer, bad_packet(T.JOB_ASSIGN, b"no-nul"))
    engine.handle_bad_packet(peer, bad_packet(T.SUBMIT_JOB_SCHED, b"no-nul"))
    assert replies(peer) == [INVALID_COMMAND, INVALID_COMMAND]


def test_pipelined_requests_are_answered_once_each_in_request_order():
    # Clients match JOB_CREATED / ERROR to their submits FIFO (§6.9); gearmand breaks this for
    # bad epochs and long GET_STATUS* arguments (§3.14). A CAN_DO_TIMEOUT of any value gets
    # no reply, as from gearmand (a long one registers here; gearmand drops it silently).
    engine = new_engine()
    engine.set_max_queue(b"full", [1, 1, 1])
    peer = connect(engine)
    requests = [
        (T.SUBMIT_JOB, ("fn", "", "1")),
        (T.SUBMIT_JOB_EPOCH, ("fn", "", "99999999999999999999", "x")),
        (T.GET_STATUS, ("H" * 64,)),
        (T.GET_STATUS_UNIQUE, ("u" * 65,)),
        (T.CAN_DO_TIMEOUT, ("fn", "1" * 21)),  # no reply
        (T.SUBMIT_JOB_BG, ("fn", "u" * 65, "x")),
        (T.SUBMIT_JOB_BG, ("full", "", "x")),
        (T.SUBMIT_JOB_BG, ("full", "", "x")),
        (T.CAN_DO, ("fn",)),
        (T.OPTION_REQ, ("nope",)),
        (T.ALL_YOURS, ()),
        (T.ECHO_REQ, ("e",)),
        (T.WORK_COMPLETE, ("H:x:1", "r")),
        (T.PRE_SLEEP, ()),  # runnable job of fn: immediate NOOP
        (T.SET_CLIENT_ID, ("id",)),
        (T.GRAB_JOB, ()),
        (T.SUBMIT_JOB_LOW, ("fn", "", "2")),
    ]
    for packet_type, args in requests:
        send(engine, peer, packet_type, *args)
    got = replies(peer)
    assert [p.type for p in got] == [
        T.JOB_CREATED,
        T.ERROR,
        T.ERROR,
        T.ERROR,
        T.ERROR,
        T.JOB_CREATED,
        T.ERROR,
        T.ERROR,
        T.ERROR,
        T.ECHO_RES,
        T.ERROR,
        T.NOOP,
        T.JOB_ASSIGN,
        T.JOB_CREATED,
    ]
    assert [p.args[0] for p in got if p.type == T.ERROR] == [
        b"INVALID_ARGUMENT",
        b"ARGUMENT_TOO_LARGE",
        b"ARGUMENT_TOO_LARGE",
        b"ARGUMENT_TOO_LARGE",
        b"QUEUE_ERROR",
        b"UNKNOWN_OPTION",
        b"INVALID_COMMAND",
        b"JOB_NOT_FOUND",
    ]


def test_replies_go_only_to_the_requesting_connection():
    engine = new_engine()
    a, b = connect(engine), connect(engine)
    send(engine, a, T.ECHO_REQ, "x")
    send(engine, a, T.UNUSED)
    send(engine, a, T.GET_STATUS, "H:x:1")
    assert len(replies(a)) == 3
    assert replies(b) == []


def test_peers_with_output_are_listed_dirty_once():
    engine = new_engine()
    a, b = connect(engine), connect(engine)
    send(engine, a, T.ECHO_REQ, "1")
    send(engine, a, T.ECHO_REQ, "2")
    send(engine, b, T.ECHO_REQ, "3")
    assert engine.take_dirty() == [a, b]
    assert engine.take_dirty() == []
    assert len(replies(a)) == 2
