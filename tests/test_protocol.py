"""Tests for the sans-IO Gearman codec (jobserver/protocol.py; shared doc §1, §2)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobserver.protocol import (
    ARGUMENT_COUNT,
    DEFAULT_MAX_PACKET_SIZE,
    HAS_DATA_TAIL,
    HEADER_SIZE,
    MAX_ADMIN_LINE,
    MAX_ARGUMENTS_SIZE,
    REQ,
    RES,
    AdminLine,
    BadPacket,
    Decoder,
    OversizedPacket,
    Packet,
    PacketType,
    ProtocolError,
    encode,
    encode_request,
    encode_response,
    split_arguments,
)

T = PacketType
ALL_TYPES = list(PacketType)
MAGICS = [pytest.param(REQ, id="REQ"), pytest.param(RES, id="RES")]
NON_TAIL_MULTI_ARG_TYPES = [
    t for t in ALL_TYPES if t not in HAS_DATA_TAIL and ARGUMENT_COUNT[t] >= 2
]

HYPOTHESIS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def header(magic: bytes, packet_type: int, length: int) -> bytes:
    return magic + struct.pack(">II", packet_type, length)


def sample_args(packet_type: int) -> tuple[bytes, ...]:
    """Distinct arguments for a type; the last one carries NULs for data-tail types."""
    argc = ARGUMENT_COUNT[packet_type]
    if argc == 0:
        return ()
    head = tuple(b"arg%d-%d" % (i, packet_type) for i in range(argc - 1))
    last = b"\0da\0ta\0\0" if packet_type in HAS_DATA_TAIL else b"last-%d" % packet_type
    return (*head, last)


def feed_all(decoder: Decoder, chunks) -> list:
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def decode_one_feed(data: bytes, **kwargs) -> list:
    return Decoder(**kwargs).feed(data)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------------------------------------
# Type table sanity
# ---------------------------------------------------------------------------------------------


def test_packet_types_are_numbered_1_to_42_and_each_has_an_argument_count():
    assert [int(t) for t in PacketType] == list(range(1, 43))
    assert set(ARGUMENT_COUNT) == set(PacketType)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", MAGICS)
@pytest.mark.parametrize("packet_type", ALL_TYPES, ids=lambda t: t.name)
def test_every_packet_type_round_trips_through_encode_and_decode(packet_type, magic):
    args = sample_args(packet_type)
    wire = encode(packet_type, *args, magic=magic)
    payload = b"\0".join(args)
    assert wire == magic + struct.pack(">II", int(packet_type), len(payload)) + payload
    decoder = Decoder()
    assert decoder.feed(wire) == [Packet(packet_type, args, magic)]
    assert decoder.buffered == 0


@pytest.mark.parametrize("packet_type", sorted(HAS_DATA_TAIL), ids=lambda t: T(t).name)
def test_data_tail_keeps_nul_bytes_intact(packet_type):
    argc = ARGUMENT_COUNT[packet_type]
    args = (*(b"x%d" % i for i in range(argc - 1)), b"\0\0a\0b\0\0")
    [packet] = Decoder().feed(encode_request(packet_type, *args))
    assert packet.args == args
    assert packet.args[-1] == b"\0\0a\0b\0\0"


@pytest.mark.parametrize("packet_type", NON_TAIL_MULTI_ARG_TYPES, ids=lambda t: t.name)
def test_last_argument_of_non_tail_type_is_the_whole_remainder_including_nuls(packet_type):
    argc = ARGUMENT_COUNT[packet_type]
    args = (*(b"x%d" % i for i in range(argc - 1)), b"tail\0with\0nul")
    [packet] = Decoder().feed(encode_request(packet_type, *args))
    assert packet.args == args


@pytest.mark.parametrize("packet_type", [t for t in ALL_TYPES if ARGUMENT_COUNT[t] >= 1])
@pytest.mark.parametrize("magic", MAGICS)
def test_empty_arguments_keep_their_separators(packet_type, magic):
    argc = ARGUMENT_COUNT[packet_type]
    args = (b"",) * argc
    wire = encode(packet_type, *args, magic=magic)
    assert wire[HEADER_SIZE:] == b"\0" * (argc - 1)
    assert Decoder().feed(wire) == [Packet(packet_type, args, magic)]


def test_submit_job_from_the_proxy_capture_encodes_to_exact_bytes():
    wire = encode_request(T.SUBMIT_JOB, b"rev", b"d7da0818-e5ef-11f1-a998-02fc00000001", b"hello")
    expected = (
        b"\x00REQ\x00\x00\x00\x07\x00\x00\x00\x2e"
        b"rev\x00d7da0818-e5ef-11f1-a998-02fc00000001\x00hello"
    )
    assert wire == expected
    assert Decoder().feed(expected) == [
        Packet(7, (b"rev", b"d7da0818-e5ef-11f1-a998-02fc00000001", b"hello"), REQ)
    ]


@pytest.mark.parametrize(
    ("wire", "packet_type", "args", "magic"),
    [
        (b"\0RES\0\0\0\x08\0\0\0\x06H:vm:1", T.JOB_CREATED, (b"H:vm:1",), RES),
        (b"\0RES\0\0\0\x06\0\0\0\0", T.NOOP, (), RES),
        (b"\0RES\0\0\0\x0a\0\0\0\0", T.NO_JOB, (), RES),
        (b"\0REQ\0\0\0\x27\0\0\0\0", T.GRAB_JOB_ALL, (), REQ),
        (b"\0REQ\0\0\0\x01\0\0\0\x03rev", T.CAN_DO, (b"rev",), REQ),
        (b"\0REQ\0\0\0\x0d\0\0\0\x0cH:vm:1\0olleh", T.WORK_COMPLETE, (b"H:vm:1", b"olleh"), REQ),
        (b"\0REQ\0\0\0\x0d\0\0\0\x02H\0", T.WORK_COMPLETE, (b"H", b""), REQ),
        (b"\0REQ\0\0\0\x07\0\0\0\x04fn\0\0", T.SUBMIT_JOB, (b"fn", b"", b""), REQ),
        (b"\0REQ\0\0\0\x10\0\0\0\0", T.ECHO_REQ, (b"",), REQ),
        (
            b"\0RES\0\0\0\x1f\0\0\0\x0fH:vm:1\0rev\0u\0hi",
            T.JOB_ASSIGN_UNIQ,
            (b"H:vm:1", b"rev", b"u", b"hi"),
            RES,
        ),
        (
            b"\0RES\0\0\0\x13\0\0\0\x24INVALID_COMMAND\0Command not expected",
            T.ERROR,
            (b"INVALID_COMMAND", b"Command not expected"),
            RES,
        ),
    ],
    ids=[
        "JOB_CREATED",
        "NOOP",
        "NO_JOB",
        "GRAB_JOB_ALL",
        "CAN_DO",
        "WORK_COMPLETE",
        "WORK_COMPLETE-empty-result",
        "SUBMIT_JOB-empty-unique-and-data",
        "ECHO_REQ-empty",
        "JOB_ASSIGN_UNIQ",
        "ERROR",
    ],
)
def test_hand_written_wire_bytes_match_encoder_and_decoder(wire, packet_type, args, magic):
    assert encode(packet_type, *args, magic=magic) == wire
    assert Decoder().feed(wire) == [Packet(packet_type, args, magic)]


def test_encode_defaults_to_res_magic_and_helpers_pick_the_right_magic():
    assert encode(T.NOOP) == b"\0RES\0\0\0\x06\0\0\0\0"
    assert encode_response(T.NOOP) == b"\0RES\0\0\0\x06\0\0\0\0"
    assert encode_request(T.GRAB_JOB) == b"\0REQ\0\0\0\x09\0\0\0\0"


# ---------------------------------------------------------------------------------------------
# encode() validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packet_type", ALL_TYPES, ids=lambda t: t.name)
def test_encode_rejects_wrong_argument_count(packet_type):
    argc = ARGUMENT_COUNT[packet_type]
    with pytest.raises(ValueError):
        encode(packet_type, *([b"a"] * (argc + 1)))
    if argc:
        with pytest.raises(ValueError):
            encode(packet_type, *([b"a"] * (argc - 1)))


@pytest.mark.parametrize("packet_type", [0, 43, 1000, -1])
def test_encode_rejects_unknown_packet_types(packet_type):
    with pytest.raises(ValueError):
        encode(packet_type)
    with pytest.raises(ValueError):
        encode(packet_type, b"a")


@pytest.mark.parametrize("packet_type", [t for t in ALL_TYPES if ARGUMENT_COUNT[t] >= 2])
def test_encode_rejects_nul_inside_a_non_final_argument(packet_type):
    argc = ARGUMENT_COUNT[packet_type]
    for position in range(argc - 1):
        args = [b"ok"] * argc
        args[position] = b"b\0d"
        with pytest.raises(ValueError):
            encode(packet_type, *args)


def test_encode_allows_nul_in_the_final_argument():
    assert encode_request(T.WORK_COMPLETE, b"H", b"\0") == b"\0REQ\0\0\0\x0d\0\0\0\x03H\0\0"
    assert encode_request(T.CAN_DO, b"fn\0") == b"\0REQ\0\0\0\x01\0\0\0\x03fn\0"


# ---------------------------------------------------------------------------------------------
# Argument splitting
# ---------------------------------------------------------------------------------------------


def test_single_argument_type_takes_the_raw_payload_including_a_trailing_nul():
    wire = header(REQ, T.CAN_DO, 3) + b"fn\0"
    assert Decoder().feed(wire) == [Packet(T.CAN_DO, (b"fn\0",), REQ)]
    assert split_arguments(T.CAN_DO, b"fn\0") == (b"fn\0",)
    assert split_arguments(T.OPTION_REQ, b"exceptions\0") == (b"exceptions\0",)


@pytest.mark.parametrize("packet_type", [t for t in ALL_TYPES if ARGUMENT_COUNT[t] == 0])
def test_argument_less_type_with_a_body_decodes_to_no_arguments(packet_type):
    wire = header(REQ, packet_type, 5) + b"junk\0"
    decoder = Decoder()
    assert decoder.feed(wire + encode_request(T.ECHO_REQ, b"next")) == [
        Packet(packet_type, (), REQ),
        Packet(T.ECHO_REQ, (b"next",), REQ),
    ]
    assert decoder.buffered == 0


# ---------------------------------------------------------------------------------------------
# Missing separators: BadPacket, stream stays in sync
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet_type", "payload"),
    [
        (T.SUBMIT_JOB, b"fn\0unique"),
        (T.SUBMIT_JOB, b"fn"),
        (T.SUBMIT_JOB, b""),
        (T.WORK_COMPLETE, b"H"),
        (T.WORK_STATUS, b"H\x001"),
        (T.ERROR, b"CODE"),
        (T.STATUS_RES_UNIQUE, b"u\x001\x001\x001\x002"),
        (T.SUBMIT_JOB_SCHED, b"fn\0u\x001\x002"),
    ],
    ids=lambda v: v.name if isinstance(v, PacketType) else repr(v),
)
@pytest.mark.parametrize("magic", MAGICS)
def test_missing_separator_gives_bad_packet_and_next_packet_still_decodes(
    packet_type, payload, magic
):
    stream = (
        header(magic, packet_type, len(payload))
        + payload
        + encode_request(T.CAN_DO, b"fn")
        + b"status\n"
    )
    events = Decoder().feed(stream)
    bad = events[0]
    assert isinstance(bad, BadPacket)
    assert (bad.type, bad.magic, bad.code) == (packet_type, magic, b"INVALID_PACKET")
    assert bad.text  # some human-readable explanation
    assert events[1:] == [Packet(T.CAN_DO, (b"fn",), REQ), AdminLine(b"status")]
    expected = events

    # Same result when the bad packet arrives byte by byte.
    decoder = Decoder()
    assert feed_all(decoder, (stream[i : i + 1] for i in range(len(stream)))) == expected
    assert decoder.buffered == 0


# ---------------------------------------------------------------------------------------------
# Admin text lines
# ---------------------------------------------------------------------------------------------


def test_admin_line_with_lf_is_decoded_without_newline():
    assert Decoder().feed(b"status\n") == [AdminLine(b"status")]


def test_admin_line_with_crlf_strips_exactly_one_cr():
    assert Decoder().feed(b"status\r\n") == [AdminLine(b"status")]
    assert Decoder().feed(b"status\r\r\n") == [AdminLine(b"status\r")]
    assert Decoder().feed(b"\r\n") == [AdminLine(b"")]


def test_cr_inside_admin_line_is_kept():
    assert Decoder().feed(b"a\rb\n") == [AdminLine(b"a\rb")]


def test_empty_admin_line_is_an_empty_admin_event():
    decoder = Decoder()
    assert decoder.feed(b"\n") == [AdminLine(b"")]
    assert decoder.feed(b"\n\n") == [AdminLine(b""), AdminLine(b"")]
    assert decoder.buffered == 0


def test_admin_line_split_across_feeds_including_between_cr_and_lf():
    decoder = Decoder()
    assert decoder.feed(b"sta") == []
    assert decoder.buffered == 3
    assert decoder.feed(b"tus\r") == []
    assert decoder.feed(b"\n") == [AdminLine(b"status")]
    assert decoder.buffered == 0


def test_admin_lines_mixed_between_binary_packets_in_one_chunk():
    stream = (
        b"workers\n"
        + encode_request(T.CAN_DO, b"rev")
        + b"status\r\n"
        + encode_request(T.SUBMIT_JOB, b"rev", b"", b"he\0llo")
        + b"\n"
        + encode_request(T.PRE_SLEEP)
        + b"version\n"
    )
    assert Decoder().feed(stream) == [
        AdminLine(b"workers"),
        Packet(T.CAN_DO, (b"rev",), REQ),
        AdminLine(b"status"),
        Packet(T.SUBMIT_JOB, (b"rev", b"", b"he\0llo"), REQ),
        AdminLine(b""),
        Packet(T.PRE_SLEEP, (), REQ),
        AdminLine(b"version"),
    ]


def test_admin_line_of_maximum_length_including_newline_is_accepted():
    line = b"x" * (MAX_ADMIN_LINE - 1) + b"\n"
    assert len(line) == MAX_ADMIN_LINE
    assert Decoder().feed(line) == [AdminLine(b"x" * (MAX_ADMIN_LINE - 1))]


def test_admin_line_of_max_length_without_newline_raises_protocol_error():
    with pytest.raises(ProtocolError):
        Decoder().feed(b"x" * MAX_ADMIN_LINE)


def test_admin_line_longer_than_max_with_newline_raises_protocol_error():
    with pytest.raises(ProtocolError):
        Decoder().feed(b"x" * MAX_ADMIN_LINE + b"\n")


def test_admin_line_growing_past_the_limit_raises_once_it_reaches_max_bytes():
    decoder = Decoder()
    assert decoder.feed(b"x" * (MAX_ADMIN_LINE - 1)) == []
    assert decoder.buffered == MAX_ADMIN_LINE - 1
    with pytest.raises(ProtocolError):
        decoder.feed(b"x")


def test_admin_line_is_protocol_error_when_admin_is_not_accepted():
    with pytest.raises(ProtocolError):
        Decoder(accept_admin=False).feed(b"status\n")


def test_any_non_zero_first_byte_is_protocol_error_when_admin_is_not_accepted():
    with pytest.raises(ProtocolError):
        Decoder(accept_admin=False).feed(b"s")
    decoder = Decoder(accept_admin=False)
    assert decoder.feed(encode_response(T.NOOP)) == [Packet(T.NOOP, (), RES)]
    with pytest.raises(ProtocolError):
        decoder.feed(b"\n")


def test_binary_packets_decode_normally_when_admin_is_not_accepted():
    stream = encode_response(T.JOB_CREATED, b"H:1") + encode_response(T.WORK_COMPLETE, b"H:1", b"")
    assert Decoder(accept_admin=False).feed(stream) == [
        Packet(T.JOB_CREATED, (b"H:1",), RES),
        Packet(T.WORK_COMPLETE, (b"H:1", b""), RES),
    ]


# ---------------------------------------------------------------------------------------------
# Unrecoverable framing: ProtocolError
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"\0REX", b"\0req", b"\0res", b"\0\0\0\0", b"\0RE\0"])
def test_bad_magic_raises_protocol_error(magic):
    with pytest.raises(ProtocolError):
        Decoder().feed(header(magic, T.NOOP, 0))


def test_bad_magic_after_a_good_packet_raises_protocol_error():
    with pytest.raises(ProtocolError):
        Decoder().feed(encode_request(T.NOOP) + header(b"\0BAD", T.NOOP, 0))


@pytest.mark.parametrize("packet_type", [0, 43, 44, 255, 0x10000, 0xFFFFFFFF])
@pytest.mark.parametrize("magic", MAGICS)
def test_unknown_packet_type_raises_protocol_error(packet_type, magic):
    with pytest.raises(ProtocolError):
        Decoder().feed(header(magic, packet_type, 0))


def test_incomplete_header_is_buffered_not_rejected():
    decoder = Decoder()
    wire = encode_request(T.ECHO_REQ, b"ping")
    assert decoder.feed(wire[: HEADER_SIZE - 1]) == []
    assert decoder.buffered == HEADER_SIZE - 1
    assert decoder.feed(wire[HEADER_SIZE - 1 :]) == [Packet(T.ECHO_REQ, (b"ping",), REQ)]


def test_default_max_packet_size_is_64_mib():
    assert DEFAULT_MAX_PACKET_SIZE == 64 * 1024 * 1024
    assert Decoder().max_packet_size == DEFAULT_MAX_PACKET_SIZE


def test_packet_larger_than_default_max_packet_size_raises_from_the_header_alone():
    with pytest.raises(ProtocolError):
        Decoder().feed(header(REQ, T.ECHO_REQ, DEFAULT_MAX_PACKET_SIZE - HEADER_SIZE + 1))


def test_packet_of_exactly_default_max_packet_size_is_buffered():
    decoder = Decoder()
    assert decoder.feed(header(REQ, T.ECHO_REQ, DEFAULT_MAX_PACKET_SIZE - HEADER_SIZE)) == []
    assert decoder.buffered == HEADER_SIZE


def test_configured_max_packet_size_is_enforced_inclusive_of_the_header():
    limit = 10_000
    fits = encode_request(T.ECHO_REQ, b"e" * (limit - HEADER_SIZE))
    assert len(fits) == limit
    assert Decoder(max_packet_size=limit).feed(fits) == [
        Packet(T.ECHO_REQ, (b"e" * (limit - HEADER_SIZE),), REQ)
    ]
    with pytest.raises(ProtocolError):
        Decoder(max_packet_size=limit).feed(header(REQ, T.ECHO_REQ, limit - HEADER_SIZE + 1))


def test_decoder_refuses_max_packet_size_below_max_arguments_size():
    with pytest.raises(ValueError):
        Decoder(max_packet_size=MAX_ARGUMENTS_SIZE - 1)
    with pytest.raises(ValueError):
        Decoder(max_packet_size=0)
    assert Decoder(max_packet_size=MAX_ARGUMENTS_SIZE).max_packet_size == MAX_ARGUMENTS_SIZE


def test_oversized_non_data_packet_raises_from_the_header_before_the_body_arrives():
    decoder = Decoder()
    with pytest.raises(ProtocolError):
        decoder.feed(header(REQ, T.CAN_DO, 100_000))


@pytest.mark.parametrize("packet_type", [T.CAN_DO, T.GRAB_JOB, T.ERROR, T.STATUS_RES])
def test_non_data_packet_arguments_may_fill_exactly_max_arguments_size(packet_type):
    argc = ARGUMENT_COUNT[packet_type]
    body = MAX_ARGUMENTS_SIZE - HEADER_SIZE
    if argc == 0:
        wire = header(REQ, packet_type, body) + b"j" * body
        expected = Packet(packet_type, (), REQ)
    else:
        args = (b"a",) * (argc - 1) + (b"n" * (body - 2 * (argc - 1)),)
        wire = encode_request(packet_type, *args)
        expected = Packet(packet_type, args, REQ)
    assert len(wire) == MAX_ARGUMENTS_SIZE
    assert Decoder().feed(wire) == [expected]


@pytest.mark.parametrize("chunked", [False, True], ids=["one-feed", "byte-chunks"])
def test_non_data_packet_one_byte_over_max_arguments_size_raises(chunked):
    wire = encode_request(T.CAN_DO, b"n" * (MAX_ARGUMENTS_SIZE - HEADER_SIZE + 1))
    decoder = Decoder()
    with pytest.raises(ProtocolError):
        if chunked:
            feed_all(decoder, (wire[i : i + 1000] for i in range(0, len(wire), 1000)))
        else:
            decoder.feed(wire)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-feed", "chunks"])
def test_data_packet_with_non_tail_arguments_over_8_kib_raises(chunked):
    wire = encode_request(T.SUBMIT_JOB, b"f" * 9000, b"", b"data")
    decoder = Decoder()
    with pytest.raises(ProtocolError):
        if chunked:
            feed_all(decoder, (wire[i : i + 1000] for i in range(0, len(wire), 1000)))
        else:
            decoder.feed(wire)


def test_data_packet_non_tail_arguments_may_fill_exactly_max_arguments_size():
    unique = b"u" * 10
    function = b"f" * (MAX_ARGUMENTS_SIZE - HEADER_SIZE - len(unique) - 2)
    wire = encode_request(T.SUBMIT_JOB, function, unique, b"d" * 20_000)
    assert Decoder().feed(wire) == [Packet(T.SUBMIT_JOB, (function, unique, b"d" * 20_000), REQ)]
    with pytest.raises(ProtocolError):
        Decoder().feed(encode_request(T.SUBMIT_JOB, function + b"f", unique, b"d"))


def test_submit_job_with_one_mib_data_tail_is_accepted():
    data = bytes(range(256)) * 4096  # 1 MiB, NULs included
    wire = encode_request(T.SUBMIT_JOB, b"fn", b"uniq", data)
    decoder = Decoder()
    assert decoder.feed(wire[:HEADER_SIZE]) == []  # announcing 1 MiB is fine for a data type
    assert decoder.feed(wire[HEADER_SIZE:]) == [Packet(T.SUBMIT_JOB, (b"fn", b"uniq", data), REQ)]
    assert decoder.buffered == 0


@pytest.mark.parametrize("packet_type", NON_TAIL_MULTI_ARG_TYPES, ids=lambda t: t.name)
def test_oversized_non_data_packet_without_separators_is_protocol_error_in_any_chunking(
    packet_type,
):
    # 12 + 9000 bytes of arguments can never be accepted for a non-data type (§1: gearmand
    # closes). Whether the decoder notices must not depend on TCP segmentation: split into
    # chunks it raises from the header; fed at once it must not return a BadPacket instead.
    wire = header(REQ, packet_type, 9000) + b"x" * 9000
    with pytest.raises(ProtocolError):
        feed_all(Decoder(), [wire[:HEADER_SIZE], wire[HEADER_SIZE:]])
    with pytest.raises(ProtocolError):
        Decoder().feed(wire)


# ---------------------------------------------------------------------------------------------
# Oversized packets skipped (the server's decoder: skip_oversized=True)
# ---------------------------------------------------------------------------------------------

SKIP_LIMIT = 10_000


def oversized_stream() -> tuple[bytes, list]:
    """A packet before, an oversized ECHO_REQ whose body is made of whole valid packets (which
    must be skipped, not decoded), and a packet and an admin line after."""
    before = Packet(T.ECHO_REQ, (b"before",), REQ)
    after = Packet(T.SUBMIT_JOB, (b"fn", b"u", b"after\0"), REQ)
    body = encode_request(T.ECHO_REQ, b"skip me") * (SKIP_LIMIT // 10)
    stream = (
        encode_request(before.type, *before.args)
        + header(REQ, T.ECHO_REQ, len(body))
        + body
        + encode_request(after.type, *after.args)
        + b"status\n"
    )
    events = [
        before,
        OversizedPacket(T.ECHO_REQ, REQ, HEADER_SIZE + len(body)),
        after,
        AdminLine(b"status"),
    ]
    return stream, events


@pytest.mark.parametrize("size", [1, 5, 12, 13, 1000, 4096, 10_000, 100_000])
def test_oversized_packet_is_reported_once_and_its_body_skipped_under_any_chunking(size):
    stream, expected = oversized_stream()
    decoder = Decoder(max_packet_size=SKIP_LIMIT, skip_oversized=True)
    events = []
    most_buffered = 0
    for i in range(0, len(stream), size):
        events += decoder.feed(stream[i : i + size])
        most_buffered = max(most_buffered, decoder.buffered)
    assert events == expected
    assert decoder.buffered == 0
    assert not decoder.in_packet
    assert most_buffered <= max(size, 1000)  # the skipped body was never held


def test_oversized_packet_event_comes_with_the_header_before_the_body_arrives():
    decoder = Decoder(max_packet_size=SKIP_LIMIT, skip_oversized=True)
    assert decoder.feed(header(RES, T.WORK_DATA, 1 << 31)) == [
        OversizedPacket(T.WORK_DATA, RES, HEADER_SIZE + (1 << 31))
    ]
    assert decoder.buffered == 0
    assert decoder.in_packet  # still inside the packet: its body is to come
    assert decoder.feed(b"x" * 100_000) == []
    assert decoder.buffered == 0


def test_oversized_non_data_packet_is_still_a_protocol_error_when_skipping():
    # A 100 kB function name is garbage, not a large payload: the 8 KiB rule closes.
    with pytest.raises(ProtocolError):
        Decoder(max_packet_size=SKIP_LIMIT, skip_oversized=True).feed(
            header(REQ, T.CAN_DO, 100_000)
        )


def test_in_packet_is_true_only_inside_a_header_body_or_admin_line():
    decoder = Decoder()
    assert not decoder.in_packet
    decoder.feed(b"\0RE")
    assert decoder.in_packet
    decoder.feed(b"Q" + struct.pack(">II", T.NOOP, 0))
    assert not decoder.in_packet
    decoder.feed(b"sta")
    assert decoder.in_packet
    decoder.clear()
    assert not decoder.in_packet and decoder.buffered == 0
    assert decoder.feed(b"status\n") == [AdminLine(b"status")]


# ---------------------------------------------------------------------------------------------
# Chunking and buffering
# ---------------------------------------------------------------------------------------------


def test_many_packets_in_one_feed_decode_in_order():
    packets = [Packet(T.ECHO_REQ, (b"%d\0" % i,), REQ) for i in range(500)] + [
        Packet(T.SUBMIT_JOB_BG, (b"fn", b"u%d" % i, b"\0" * i), REQ) for i in range(500)
    ]
    stream = b"".join(encode(p.type, *p.args, magic=p.magic) for p in packets)
    decoder = Decoder()
    assert decoder.feed(stream) == packets
    assert decoder.buffered == 0


def test_one_packet_fed_byte_by_byte_decodes_on_the_last_byte():
    args = (b"H:vm:1", b"rev", b"d7da0818", b"he\0llo")
    wire = encode_response(T.JOB_ASSIGN_UNIQ, *args)
    decoder = Decoder()
    for i in range(len(wire) - 1):
        assert decoder.feed(wire[i : i + 1]) == []
        assert decoder.buffered == i + 1
    assert decoder.feed(wire[-1:]) == [Packet(T.JOB_ASSIGN_UNIQ, args, RES)]
    assert decoder.buffered == 0


def test_empty_feed_returns_nothing():
    decoder = Decoder()
    assert decoder.feed(b"") == []
    decoder.feed(b"\0RE")
    assert decoder.feed(b"") == []
    assert decoder.buffered == 3


def test_large_pipelined_stream_with_trailing_partial_packet_keeps_decoding():
    # More than 64 KiB consumed with a partial packet left over exercises buffer compaction.
    packets = [Packet(T.WORK_DATA, (b"H:%d" % i, bytes([i % 256]) * 1000), REQ) for i in range(200)]
    stream = b"".join(encode(p.type, *p.args, magic=p.magic) for p in packets)
    cut = len(stream) - 500
    decoder = Decoder()
    first = decoder.feed(stream[:cut])
    assert first == packets[:-1]
    assert decoder.buffered == cut - sum(
        len(encode(p.type, *p.args, magic=p.magic)) for p in packets[:-1]
    )
    assert decoder.feed(stream[cut:] + b"status\n") == [packets[-1], AdminLine(b"status")]
    assert decoder.buffered == 0


def test_events_fed_in_stages_of_varying_size_match_one_feed():
    stream = b"".join(
        encode_request(t, *sample_args(t)) + (b"cmd %d\r\n" % int(t)) for t in ALL_TYPES
    )
    reference = Decoder().feed(stream)
    for size in (1, 2, 3, 5, 7, 11, 12, 13, 64, 1000):
        decoder = Decoder()
        assert feed_all(decoder, (stream[i : i + size] for i in range(0, len(stream), size))) == (
            reference
        )
        assert decoder.buffered == 0


# ---------------------------------------------------------------------------------------------
# Property-based tests
# ---------------------------------------------------------------------------------------------

no_nul = st.binary(max_size=16).map(lambda b: b.replace(b"\0", b"\x01"))
final_arg = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"", b"\0", b"\0\0", b"\r\n", b"\n\0REQ"]),
)


@st.composite
def packets(draw) -> Packet:
    packet_type = draw(st.sampled_from(ALL_TYPES))
    magic = draw(st.sampled_from([REQ, RES]))
    argc = ARGUMENT_COUNT[packet_type]
    args = [draw(no_nul) for _ in range(argc - 1)]
    if argc:
        args.append(draw(final_arg))
    return Packet(int(packet_type), tuple(args), magic)


@st.composite
def admin_lines(draw) -> tuple[bytes, AdminLine]:
    """(wire bytes, expected event): first byte non-zero, no LF inside, LF or CRLF."""
    text = draw(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")))
    if text.startswith(b"\0"):
        text = b"x" + text[1:]
    terminator = draw(st.sampled_from([b"\n", b"\r\n"]))
    expected = text[:-1] if terminator == b"\n" and text.endswith(b"\r") else text
    return text + terminator, AdminLine(expected)


def packet_item(p: Packet) -> tuple[bytes, Packet]:
    return encode(p.type, *p.args, magic=p.magic), p


stream_items = st.lists(st.one_of(packets().map(packet_item), admin_lines()), max_size=25)


def chunkings(data: bytes):
    return st.lists(st.integers(0, len(data)), max_size=min(len(data), 40))


@HYPOTHESIS
@given(items=stream_items, data=st.data())
def test_valid_stream_decodes_to_original_events_under_any_chunking(items, data):
    stream = b"".join(wire for wire, _ in items)
    expected = [event for _, event in items]

    one_feed = Decoder()
    assert one_feed.feed(stream) == expected
    assert one_feed.buffered == 0

    cuts = data.draw(chunkings(stream), label="cuts")
    decoder = Decoder()
    assert feed_all(decoder, split_at(stream, cuts)) == expected
    assert decoder.buffered == 0


@HYPOTHESIS
@given(items=st.lists(packets(), max_size=25), data=st.data())
def test_valid_packet_stream_decodes_without_admin_support_under_any_chunking(items, data):
    stream = b"".join(encode(p.type, *p.args, magic=p.magic) for p in items)
    cuts = data.draw(chunkings(stream), label="cuts")
    decoder = Decoder(accept_admin=False)
    assert feed_all(decoder, split_at(stream, cuts)) == items
    assert decoder.buffered == 0


@HYPOTHESIS
@given(packet=packets())
def test_encoded_packet_round_trips_and_has_a_consistent_header(packet):
    wire = encode(packet.type, *packet.args, magic=packet.magic)
    magic, packet_type, length = struct.unpack(">4sII", wire[:HEADER_SIZE])
    assert (magic, packet_type, length) == (packet.magic, packet.type, len(wire) - HEADER_SIZE)
    assert split_arguments(packet.type, wire[HEADER_SIZE:]) == packet.args
    assert Decoder().feed(wire) == [packet]


def outcome(decoder: Decoder, chunks) -> tuple[str, list]:
    """Feed chunks; return ("ok", events) or ("error", events before the error).

    Anything other than ProtocolError propagates and fails the test."""
    events: list = []
    try:
        for chunk in chunks:
            events.extend(decoder.feed(chunk))
    except ProtocolError:
        return "error", events
    return "ok", events


@HYPOTHESIS
@given(blob=st.binary(max_size=400), accept_admin=st.booleans(), data=st.data())
def test_arbitrary_bytes_in_any_chunking_raise_nothing_but_protocol_error(blob, accept_admin, data):
    cuts = data.draw(chunkings(blob), label="cuts")
    status, events = outcome(Decoder(accept_admin=accept_admin), split_at(blob, cuts))
    reference_status, reference_events = outcome(Decoder(accept_admin=accept_admin), [blob])
    assert status == reference_status
    if status == "ok":
        assert events == reference_events
    for event in events:
        assert isinstance(event, Packet | AdminLine | BadPacket)


@st.composite
def corrupted_streams(draw) -> bytes:
    items = draw(stream_items)
    stream = bytearray(b"".join(wire for wire, _ in items))
    for _ in range(draw(st.integers(1, 5))):
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        position = draw(st.integers(0, len(stream)))
        if action == "insert":
            stream[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif position < len(stream):
            if action == "flip":
                stream[position] = draw(st.integers(0, 255))
            else:
                del stream[position]
    return bytes(stream)


@HYPOTHESIS
@given(stream=corrupted_streams(), accept_admin=st.booleans(), data=st.data())
def test_corrupted_valid_stream_in_any_chunking_raises_nothing_but_protocol_error(
    stream, accept_admin, data
):
    cuts = data.draw(chunkings(stream), label="cuts")
    status, events = outcome(Decoder(accept_admin=accept_admin), split_at(stream, cuts))
    reference_status, reference_events = outcome(Decoder(accept_admin=accept_admin), [stream])
    assert status == reference_status
    if status == "ok":
        assert events == reference_events
