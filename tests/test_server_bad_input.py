"""Bad input over real sockets: each kind gets its treatment and never harms anyone else.

Unrecoverable framing (bad magic, unknown type, oversize arguments or line) closes that one
connection without a reply, as gearmand does (§1). A packet over --max-packet-size is answered
ERROR and its body skipped as it arrives, so the connection goes on (gearmand has no limit and
buffers whatever is announced). Everything else is answered with an ERROR
in place and the connection keeps working; where gearmand is silent (§3.14) we still answer,
so clients matching replies FIFO stay in step.

Every test keeps a bystander: a worker holding a job and the client waiting for it, on their
own connections. After the bad input the job must still complete, the client must get the
result, and the server process must still be running.
"""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest
import wire
from servers import echo, status, wait_until

from jobserver.protocol import (
    ARGUMENT_COUNT,
    MAX_ADMIN_LINE,
    MAX_ARGUMENTS_SIZE,
    REQ,
    RES,
    encode_request,
)
from jobserver.protocol import PacketType as T

connect = wire.connect  # fixture: connect(server) -> Wire, closed at teardown

BYSTANDER_FN = b"bystander"


def header(magic: bytes, packet_type: int, length: int) -> bytes:
    return magic + struct.pack(">II", packet_type, length)


class Bystander:
    """A worker holding a foreground job, and that job's client, waiting for its result."""

    def __init__(self, server, connect) -> None:
        self.server = server
        self.worker = connect(server)
        self.client = connect(server)
        self.worker.can_do(BYSTANDER_FN)
        self.handle = self.client.submit(BYSTANDER_FN, b"payload", b"bystander-unique")
        self.worker.send(T.GRAB_JOB)
        self.worker.expect(T.JOB_ASSIGN, self.handle, BYSTANDER_FN, b"payload")

    def assert_unaffected(self) -> None:
        assert self.server.proc.poll() is None, "the server process died"
        self.worker.send(T.WORK_STATUS, self.handle, b"1", b"2")
        self.client.expect(T.WORK_STATUS, self.handle, b"1", b"2")
        self.worker.send(T.WORK_COMPLETE, self.handle, b"still fine")
        self.client.expect(T.WORK_COMPLETE, self.handle, b"still fine")
        assert echo(self.server.host, self.server.port, b"alive") == b"alive"


@pytest.fixture
def bystander(jobserver, connect) -> Bystander:
    return Bystander(jobserver, connect)


# ---------------------------------------------------------------------- closed without reply


def test_bad_magic_closes_the_connection_without_a_reply(jobserver, connect, bystander):
    for magic in (b"\0XYZ", b"\0req", b"\0\0\0\0"):
        bad = connect(jobserver)
        bad.send_raw(header(magic, T.ECHO_REQ, 4) + b"ping")
        bad.assert_closed()
    bystander.assert_unaffected()


def test_packet_type_0_or_43_and_above_closes_the_connection(jobserver, connect, bystander):
    for packet_type in (0, 43, 0xFFFFFFFF):
        bad = connect(jobserver)
        bad.send_raw(header(REQ, packet_type, 0))
        bad.assert_closed()
    bystander.assert_unaffected()


def test_packet_over_max_packet_size_gets_error_and_its_body_is_skipped(start_jobserver, connect):
    server = start_jobserver("--max-packet-size", "65536")
    bystander = Bystander(server, connect)
    largest = b"e" * (65536 - 12)
    fits = connect(server)
    fits.send(T.ECHO_REQ, largest)
    fits.expect(T.ECHO_RES, largest)

    peer = connect(server)
    # The body is made of whole ECHO_REQ packets: were it decoded instead of skipped, they
    # would be answered.
    fake = encode_request(T.ECHO_REQ, b"must not be answered") * 4000
    peer.send_raw(header(REQ, T.ECHO_REQ, len(fake)) + fake[:1000])  # the ERROR comes at once
    peer.expect_error(
        b"ARGUMENT_TOO_LARGE",
        b"Packet of %d bytes exceeds the limit of 65536 bytes" % (12 + len(fake)),
    )
    peer.send_raw(fake[1000:])
    peer.echo(b"the connection goes on")
    peer.expect_nothing()
    bystander.assert_unaffected()


def test_oversized_packet_with_res_magic_gets_invalid_magic(start_jobserver, connect):
    server = start_jobserver("--max-packet-size", "65536")
    peer = connect(server)
    peer.send_raw(header(RES, T.ECHO_REQ, 70000) + b"r" * 70000)
    peer.expect_error(b"INVALID_MAGIC", b"Request magic expected")
    peer.echo()


def test_header_announcing_over_8_KiB_of_can_do_closes_the_connection(
    jobserver, connect, bystander
):
    longest = b"f" * (MAX_ARGUMENTS_SIZE - 12)
    fits = connect(jobserver)
    fits.can_do(longest)  # header + name = 8192 bytes: accepted
    assert status(jobserver.address)[longest.decode()] == (0, 0, 1)

    bad = connect(jobserver)
    bad.send_raw(header(REQ, T.CAN_DO, MAX_ARGUMENTS_SIZE - 12 + 1))
    bad.assert_closed()
    bystander.assert_unaffected()


def test_submit_with_a_function_name_over_8_KiB_closes_the_connection(
    jobserver, connect, bystander
):
    bad = connect(jobserver)
    bad.send(T.SUBMIT_JOB, b"f" * 9000, b"", b"data")
    bad.assert_closed()
    bystander.assert_unaffected()


def test_admin_line_of_8_KiB_without_newline_closes_the_connection(jobserver, connect, bystander):
    fits = connect(jobserver)
    word = b"x" * (MAX_ADMIN_LINE - 1)  # with its newline: 8192 bytes, accepted
    assert fits.admin(word) == b"ERR UNKNOWN_COMMAND Unknown+server+command" + word + b"\r\n"

    bad = connect(jobserver)
    bad.send_raw(b"y" * MAX_ADMIN_LINE)
    bad.assert_closed()
    bystander.assert_unaffected()


# ---------------------------------------------------------------------- ERROR in place


def test_res_magic_gets_invalid_magic_error_and_the_connection_keeps_working(
    jobserver, connect, bystander
):
    peer = connect(jobserver)
    peer.send_raw(header(RES, T.ECHO_REQ, 4) + b"ping")
    peer.expect_error(b"INVALID_MAGIC", b"Request magic expected")
    peer.send_raw(header(RES, T.SUBMIT_JOB, 2) + b"fn")  # also malformed: magic wins
    peer.expect_error(b"INVALID_MAGIC", b"Request magic expected")
    peer.echo()
    bystander.assert_unaffected()


def test_missing_separators_get_invalid_packet_errors_in_place_and_the_connection_keeps_working(
    jobserver, connect, bystander
):
    too_few_arguments = [
        (T.SUBMIT_JOB, b"fn"),
        (T.SUBMIT_JOB_BG, b"fn\0unique"),
        (T.SUBMIT_JOB_EPOCH, b"fn\0u\0"),
        (T.SUBMIT_REDUCE_JOB, b"fn\0u\0reducer"),
        (T.WORK_STATUS, b"H:x:1\0" + b"1"),
        (T.CAN_DO_TIMEOUT, b"fn"),
    ]
    peer = connect(jobserver)
    for packet_type, payload in too_few_arguments:
        peer.send_raw(header(REQ, packet_type, len(payload)) + payload)
        peer.send(T.ECHO_REQ, b"%d" % packet_type)
    for packet_type, _ in too_few_arguments:
        peer.expect_error(b"INVALID_PACKET")
        peer.expect(T.ECHO_RES, b"%d" % packet_type)
    bystander.assert_unaffected()


def test_server_to_client_and_unimplemented_types_get_invalid_command_in_order(
    jobserver, connect, bystander
):
    rejected = [
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
    peer = connect(jobserver)
    packets = b"".join(
        encode_request(packet_type, *[b"x"] * ARGUMENT_COUNT[packet_type])
        for packet_type in rejected
    )
    peer.send_raw(packets + encode_request(T.ECHO_REQ, b"after"))
    for packet_type in rejected:
        text = peer.expect_error(b"INVALID_COMMAND")
        assert text == b"Command not expected", f"type {packet_type}: {text!r}"
    peer.expect(T.ECHO_RES, b"after")
    bystander.assert_unaffected()


def test_unique_over_64_bytes_gets_argument_too_large(jobserver, connect, bystander):
    peer = connect(jobserver)
    for packet_type in (T.SUBMIT_JOB, T.SUBMIT_JOB_BG, T.SUBMIT_JOB_LOW):
        peer.send(packet_type, b"fn", b"u" * 65, b"data")
        peer.expect_error(b"ARGUMENT_TOO_LARGE", b"Unique value too large")
    peer.send(T.SUBMIT_JOB_EPOCH, b"fn", b"u" * 65, b"0", b"data")
    peer.expect_error(b"ARGUMENT_TOO_LARGE", b"Unique value too large")
    handle = peer.submit(b"fn", b"data", b"u" * 64, T.SUBMIT_JOB_BG)  # 64 is accepted
    assert peer.submit(b"fn", b"data", b"u" * 64, T.SUBMIT_JOB_BG) == handle
    assert status(jobserver.address)["fn"] == (1, 0, 0)
    bystander.assert_unaffected()


def test_status_lookups_with_over_long_arguments_get_an_error_not_silence(
    jobserver, connect, bystander
):
    # gearmand sends nothing at all for these (§3.14), desynchronising FIFO clients.
    peer = connect(jobserver)
    peer.send(T.GET_STATUS, b"h" * 64)
    peer.send(T.GET_STATUS, b"h" * 63)
    peer.send(T.GET_STATUS_UNIQUE, b"u" * 65)
    peer.send(T.GET_STATUS_UNIQUE, b"u" * 64)
    peer.send(T.ECHO_REQ, b"in order")
    peer.expect_error(b"ARGUMENT_TOO_LARGE")
    peer.expect(T.STATUS_RES, b"h" * 63, b"0", b"0", b"0", b"0")
    peer.expect_error(b"ARGUMENT_TOO_LARGE")
    peer.expect(T.STATUS_RES_UNIQUE, b"u" * 64, b"0", b"0", b"0", b"0", b"0")
    peer.expect(T.ECHO_RES, b"in order")
    bystander.assert_unaffected()


def test_bad_epoch_gets_invalid_argument_and_creates_no_job(jobserver, connect, bystander):
    peer = connect(jobserver)
    for epoch in (b"soon", b"", b"12x", b"1.5", b"99999999999999999999"):
        peer.send(T.SUBMIT_JOB_EPOCH, b"epochs", b"u", epoch, b"data")
        text = peer.expect_error(b"INVALID_ARGUMENT")
        assert text, f"epoch {epoch!r}: empty error text"
    peer.echo()
    assert status(jobserver.address).get("epochs", (0, 0, 0))[0] == 0
    bystander.assert_unaffected()


def test_odd_can_do_timeouts_register_silently_as_with_gearmand(jobserver, connect, bystander):
    # gearmand reads the timeout with strtol and always registers, with no reply (§3.9); the
    # engine does the same (tests/test_engine_timers.py, tests/test_server_engine_limits.py).
    peer = connect(jobserver)
    for timeout in (b"abc", b"", b"1.5", b"1" * 21):
        peer.send(T.CAN_DO_TIMEOUT, b"timed", timeout)
    peer.echo()  # nothing came before the echo: no ERROR
    handle = peer.submit(b"timed", b"", b"", T.SUBMIT_JOB_BG)
    peer.send(T.GRAB_JOB)
    peer.expect(T.JOB_ASSIGN, handle, b"timed", b"")
    assert status(jobserver.address)["timed"] == (1, 1, 4)  # four registrations, as gearmand
    bystander.assert_unaffected()


WORK_PACKETS_AND_ERROR_TEXTS = [
    (T.WORK_STATUS, (b"1", b"2"), b"Job given in work result not found"),
    (T.WORK_COMPLETE, (b"result",), b"Job given in work result not found"),
    (T.WORK_FAIL, (), b"Job given in work result not found"),
    (T.WORK_DATA, (b"data",), b"Job does not exist on server"),
    (T.WORK_WARNING, (b"warning",), b"Job does not exist on server"),
    (T.WORK_EXCEPTION, (b"exception",), b"An exception was received for a job that does not exist"),
]


def test_work_packets_for_unknown_or_foreign_handles_get_job_not_found_with_gearmand_texts(
    jobserver, connect, bystander
):
    stranger = connect(jobserver)
    for handle in (b"H:no-such-job", bystander.handle):  # the second is held by another worker
        for packet_type, rest, text in WORK_PACKETS_AND_ERROR_TEXTS:
            stranger.send(packet_type, handle, *rest)
            stranger.expect_error(b"JOB_NOT_FOUND", text)
    bystander.client.expect_nothing()  # nothing the stranger sent reached the client
    bystander.assert_unaffected()


def test_unknown_option_gets_unknown_option_error(jobserver, connect, bystander):
    peer = connect(jobserver)
    for option in (b"frobnicate", b"exceptions2", b"", b"exceptions" + b"\0" * 54):
        peer.send(T.OPTION_REQ, option)
        peer.expect_error(b"UNKNOWN_OPTION", b"Server does not recognize given option")
    peer.echo()
    bystander.assert_unaffected()


# ---------------------------------------------------------------------- garbage, logging


def garbage(rng: random.Random) -> bytes:
    """A few chunks of nonsense: random bytes, headers with random types and lengths, and
    random text lines. Bounded: at most a few KiB."""
    chunks = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["bytes", "packet", "text"])
        if kind == "bytes":
            chunks.append(rng.randbytes(rng.randint(1, 2048)))
        elif kind == "packet":
            length = rng.choice([0, 1, rng.randint(2, 2048), rng.randint(0, 2**32 - 1)])
            magic = rng.choice([REQ, REQ, REQ, RES, b"\0REX"])
            body = rng.randbytes(min(length, 2048))
            chunks.append(header(magic, rng.randint(0, 50), length) + body)
        else:
            alphabet = b"abcdefghijklmnopqrstuvwxyz \t\r\0\xff"
            line = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
            chunks.append(rng.choice(b"abcxyz").to_bytes(1, "big") + line + b"\n")
    return b"".join(chunks)


def test_random_garbage_from_20_connections_never_kills_the_server(jobserver, connect, bystander):
    rng = random.Random(20240607)
    peers = [connect(jobserver) for _ in range(20)]
    for peer in peers:
        try:
            peer.send_raw(garbage(rng))
            peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server already closed this one: fine
    for peer in peers:
        peer.read_until_closed(timeout=5.0)  # every one ends: closed, or drained after EOF
    bystander.assert_unaffected()


def test_server_logs_one_line_naming_the_reason_per_bad_peer(start_jobserver, connect, tmp_path):
    log_file = tmp_path / "server.log"
    server = start_jobserver("--log-file", str(log_file))
    bystander = Bystander(server, connect)
    bad_inputs = {
        "bad magic": header(b"\0XYZ", T.ECHO_REQ, 0),
        "unknown packet type 43": header(REQ, 43, 0),
        "exceed 8192 bytes": header(REQ, T.CAN_DO, 9000),
    }
    for data in bad_inputs.values():
        peer = connect(server)
        peer.send_raw(data)
        peer.assert_closed()
    malformed = connect(server)
    malformed.send_raw(header(REQ, T.SUBMIT_JOB, 2) + b"fn")
    malformed.expect_error(b"INVALID_PACKET")
    good = connect(server)
    good.echo()

    def warnings() -> list[str]:
        return [line for line in log_file.read_text().splitlines() if " ERROR " in line]

    wait_until(lambda: len(warnings()) >= 4, what="four ERROR lines in the log")
    time.sleep(0.1)  # nothing more should follow
    lines = warnings()
    assert len(lines) == 4, lines
    for reason in bad_inputs:
        matching = [line for line in lines if reason in line and "127.0.0.1" in line]
        assert len(matching) == 1, f"expected one line naming {reason!r}: {lines}"
    assert sum("malformed packet type 7" in line for line in lines) == 1, lines
    bystander.assert_unaffected()
