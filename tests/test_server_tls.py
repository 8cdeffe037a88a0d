"""The server's TLS listener (issue 15, jobserver/tls.py): `--tls-cert/--tls-key` on the Gearman
port or on `--tls-port` beside plaintext, `--tls-ca` requiring client certificates (mTLS), the
handshake's bounds, the failure log naming the cause, and the start-up errors of bad files.

Real server processes; the client side is the stdlib's ssl over plain sockets (tests/tls_certs.py
wraps a tests/wire.py Wire), never the SDKs. No --acl here (tests/test_acl_server.py):
everything works over TLS as it does in plaintext. The handshake's causes and the log's rate
limit in-process: tests/test_tls_handshake.py.

The handshake timeout (10 s) is waited for once: peers opened by the first test that stall the
handshake are checked closed by the last one, the module's other tests running meanwhile.
"""

from __future__ import annotations

import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import servers
import tls_certs
from servers import HOST, wait_until
from test_cli_support import one_line, run_jobserver
from tls_certs import (
    Pki,
    TlsServer,
    client_hello,
    start_tls_jobserver,
    start_tls_only_jobserver,
    tls_wire,
)
from wire import Wire

from jobserver.protocol import PacketType as T
from jobserver.protocol import encode_request
from jobserver.tls import HANDSHAKE_TIMEOUT

# Fixtures (tests/tls_certs.py): the certificates, servers stopped at teardown, TLS Wires.
tls_pki = tls_certs.tls_pki
start_tls_server = tls_certs.start_tls_server
tls_connect = tls_certs.tls_connect

STALLED_HANDSHAKES = 100
"""Peers that send a ClientHello and then stall, all open while plaintext clients are served:
far more than a real burst of slow clients, still cheap (one socket and task each)."""

SILENT_PEERS = 10
"""Peers that connect and send nothing (waiting for the server to speak, as a plaintext
Gearman client on the wrong port does)."""

CLOSE_MARGIN = 20.0
"""Seconds past HANDSHAKE_TIMEOUT we allow the server to close stalled peers: generous on a
loaded machine, and still well short of hanging the run."""

CLOSE_WAIT = 30.0
"""Seconds we wait for a connection the server should close at once (a bound, not a speed
check: the assertion that it was early is made by ordering against a stalled handshake)."""

LARGE_DATA = 3 * 1024 * 1024 + 7
"""Bytes of a job's data and result sent over TLS: many 16 KiB TLS records and more than one
of the server's reads, so records split across packets and packets across records."""

ECHO_ROUNDS = 20
"""ECHO round trips a plaintext client completes while the stalled handshakes are open."""


# --- servers and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tls_pki: Pki) -> Iterator[TlsServer]:
    """TLS on --tls-port beside plaintext on the Gearman port; no client certificates, no ACL."""
    server = start_tls_jobserver(tls_pki)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_only_server(tls_pki: Pki) -> Iterator[servers.Server]:
    """TLS on the Gearman port itself (no --tls-port), no ACL."""
    server = start_tls_only_jobserver(tls_pki)
    yield server
    server.stop()
    server.remove_workdir()


@pytest.fixture(scope="module")
def mtls_server(tls_pki: Pki) -> Iterator[TlsServer]:
    """Requires a client certificate signed by the test CA."""
    server = start_tls_jobserver(tls_pki, "--tls-ca", str(tls_pki.ca_pem))
    yield server
    server.stop()


def address_of(server: servers.Server) -> tuple[str, int]:
    return (server.host, server.port)


def run_one_job(client: Wire, worker: Wire, function: bytes, data: bytes, result: bytes) -> None:
    """A foreground job from `client` done by `worker`: the whole Gearman round trip."""
    handle = client.submit(function, data)
    worker.can_do(function)
    worker.send(T.GRAB_JOB_UNIQ)
    assert worker.expect(T.JOB_ASSIGN_UNIQ) == (handle, function, b"", data)
    worker.send(T.WORK_COMPLETE, handle, result)
    client.expect(T.WORK_COMPLETE, handle, result)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed `sock` (EOF or reset), False while it is open. Reads and
    drops whatever the server sent before."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(1 << 16):
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def stall_mid_handshake(address: tuple[str, int], hello: bytes) -> socket.socket:
    """A peer that sent its ClientHello and had the server's answer, and goes no further: the
    server's handshake with it is under way when this returns."""
    sock = socket.create_connection(address, timeout=servers.IO_TIMEOUT)
    sock.sendall(hello)
    assert sock.recv(1 << 16), "the server closed instead of answering a ClientHello"
    return sock


def refusal(address: tuple[str, int], context: ssl.SSLContext) -> ssl.SSLError:
    """The TLS alert a client the server refuses gets: in the handshake, or at the first read
    (with TLS 1.3 the client's certificate is checked after the client has finished). Fails
    the test if the server serves the connection, or closes it without an alert."""
    try:
        with tls_wire(address, context) as refused:
            refused.echo()
    except ssl.SSLError as error:
        return error
    except ConnectionError as error:
        pytest.fail(f"closed without an alert naming the cause: {error!r}")
    pytest.fail("the server served a connection it should have refused")


def log_line(server: servers.Server, *words: str) -> str:
    """The first line of the server's log holding every one of `words` (bounded wait)."""

    def found() -> str | None:
        lines = server.stderr_text().splitlines()
        return next((line for line in lines if all(word in line for word in words)), None)

    return wait_until(found, what=f"{words} in the log of {server}")


@dataclass
class StalledPeers:
    """Connections to the TLS port that never finish a handshake."""

    mid_handshake: list[socket.socket] = field(default_factory=list)
    silent: list[socket.socket] = field(default_factory=list)
    opened: float = 0.0  # time.monotonic() before the first was opened

    @property
    def all(self) -> list[socket.socket]:
        return self.mid_handshake + self.silent


@pytest.fixture(scope="module")
def stalled_peers(tls_server: TlsServer, tls_pki: Pki) -> Iterator[StalledPeers]:
    """Opened when the module's first test asks for them, checked closed by its last test
    (the handshake timeout runs out while the tests in between run)."""
    peers = StalledPeers(opened=time.monotonic())
    try:
        hello = client_hello(tls_pki.client_context())
        for _ in range(SILENT_PEERS):
            peers.silent.append(socket.create_connection(tls_server.tls))
        for _ in range(STALLED_HANDSHAKES):
            peers.mid_handshake.append(stall_mid_handshake(tls_server.tls, hello))
        yield peers
    finally:
        for sock in peers.all:
            sock.close()


# --- many stalled handshakes (first: its peers time out while the other tests run) ----------


def test_many_stalled_tls_handshakes_do_not_stall_plaintext_or_tls_clients(
    tls_server, tls_pki, stalled_peers, tls_connect
):
    # Every stalled peer has had the server's answer: all their handshakes are in progress.
    plain = Wire(tls_server.plain)
    with plain:
        for round_number in range(ECHO_ROUNDS):
            plain.echo(b"plain %d" % round_number)
    tls_client = tls_connect(tls_server.tls, tls_pki.client_context())
    tls_client.echo(b"over tls")
    # ...and those handshakes were still in progress while the echoes were served: the server
    # ends them only at HANDSHAKE_TIMEOUT, orders of magnitude after these round trips.
    still_open = [sock for sock in stalled_peers.all if not closed_by_server(sock)]
    assert len(still_open) == STALLED_HANDSHAKES + SILENT_PEERS


# --- round trips -----------------------------------------------------------------------------


def test_a_job_round_trip_over_tls_on_the_gearman_port(tls_only_server, tls_pki, tls_connect):
    context = tls_pki.client_context()
    client = tls_connect(address_of(tls_only_server), context)
    worker = tls_connect(address_of(tls_only_server), context)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")

    run_one_job(client, worker, b"tls_reverse", b"hello", b"olleh")


def test_large_job_data_and_results_cross_tls_records_whole(tls_only_server, tls_pki, tls_connect):
    context = tls_pki.client_context()
    client = tls_connect(address_of(tls_only_server), context)
    worker = tls_connect(address_of(tls_only_server), context)
    data = bytes(range(256)) * (LARGE_DATA // 256) + b"x" * (LARGE_DATA % 256)

    run_one_job(client, worker, b"tls_large", data, data[::-1])


def test_pipelined_requests_over_tls_are_answered_in_order(tls_only_server, tls_pki, tls_connect):
    client = tls_connect(address_of(tls_only_server), tls_pki.client_context())
    client.send_raw(
        b"".join(
            [
                *(encode_request(T.ECHO_REQ, b"e%d" % n) for n in range(50)),
                b"status\n",
                encode_request(T.ECHO_REQ, b"last"),
            ]
        )
    )

    for n in range(50):
        client.expect(T.ECHO_RES, b"e%d" % n)
    assert client.read_admin_reply(is_list=True).endswith(b".\n")
    client.expect(T.ECHO_RES, b"last")


def test_without_an_acl_every_admin_command_works_over_tls(tls_only_server, tls_pki, tls_connect):
    console = tls_connect(address_of(tls_only_server), tls_pki.client_context())
    client = tls_connect(address_of(tls_only_server), tls_pki.client_context())
    handle = client.submit(b"tls_admin_cancel", b"x", packet_type=T.SUBMIT_JOB_BG)

    assert console.admin("create function tls_admin_made") == b"OK\r\n"
    assert b"tls_admin_made\t0\t0\t0\n" in console.admin("status")
    assert handle + b"\t0\t0\t1\n" in console.admin("show jobs")
    assert console.admin("maxqueue tls_admin_made 5") == b"OK\r\n"
    assert console.admin("retries tls_admin_made 2") == b"OK\r\n"
    assert console.admin(b"cancel job " + handle) == b"OK\r\n"
    assert console.admin("drop function tls_admin_made") == b"OK\r\n"
    assert console.admin("purge dead jobs all") == b"OK 0\n"
    assert b"tls_admin_made" not in console.admin("status")
    assert handle not in console.admin("show jobs")


def test_a_worker_lost_over_tls_gives_its_job_back_to_the_queue(
    tls_only_server, tls_pki, tls_connect
):
    context = tls_pki.client_context()
    client = tls_connect(address_of(tls_only_server), context)
    handle = client.submit(b"tls_requeue", b"data")
    first = tls_wire(address_of(tls_only_server), context)
    first.can_do(b"tls_requeue")
    first.send(T.GRAB_JOB)
    assert first.expect(T.JOB_ASSIGN) == (handle, b"tls_requeue", b"data")
    first.close()  # without a word: the connection is gone mid-job

    second = tls_connect(address_of(tls_only_server), context)
    second.can_do(b"tls_requeue")
    second.send(T.GRAB_JOB)
    assert second.expect(T.JOB_ASSIGN) == (handle, b"tls_requeue", b"data")
    second.send(T.WORK_COMPLETE, handle, b"done")
    client.expect(T.WORK_COMPLETE, handle, b"done")


def test_a_plaintext_peer_on_a_tls_gearman_port_is_not_served(tls_only_server):
    with Wire(address_of(tls_only_server)) as plain:
        plain.send(T.ECHO_REQ, b"in the clear")
        assert plain.read_until_closed(timeout=CLOSE_WAIT) == b""


# --- TLS on --tls-port beside plaintext -------------------------------------------------------


def test_the_tls_port_and_the_plaintext_port_serve_the_same_queues(
    tls_server, tls_pki, tls_connect
):
    context = tls_pki.client_context()
    with Wire(tls_server.plain) as plain_client, Wire(tls_server.plain) as plain_worker:
        # A plaintext client's job done by a TLS worker, and a TLS client's by a plaintext one.
        run_one_job(plain_client, tls_connect(tls_server.tls, context), b"both_a", b"1", b"one")
        run_one_job(tls_connect(tls_server.tls, context), plain_worker, b"both_b", b"2", b"two")
        queued = tls_connect(tls_server.tls, context).submit(
            b"both_c", b"3", packet_type=T.SUBMIT_JOB_BG
        )
        assert queued + b"\t0\t0\t1\n" in plain_client.admin("show jobs")
        assert b"both_c\t1\t0\t0\n" in plain_client.admin("status")


def test_the_start_log_names_the_tls_port_and_whether_client_certificates_are_required(
    tls_server, mtls_server
):
    assert log_line(tls_server.server, f"TLS on port {tls_server.tls_port}").endswith(
        f"TLS on port {tls_server.tls_port}"
    )
    assert log_line(mtls_server.server, f"TLS on port {mtls_server.tls_port}").endswith(
        "client certificates required (mTLS)"
    )


def test_a_tls_client_on_the_plaintext_port_fails_and_the_log_says_where_tls_is(
    tls_server, tls_pki
):
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_wire(tls_server.plain, tls_pki.client_context()).close()

    line = log_line(tls_server.server, "a TLS client on this plaintext port")
    assert line.endswith(
        f"a TLS client on this plaintext port (TLS is on port {tls_server.tls_port})"
    )


def test_tls_1_2_is_served(tls_server, tls_pki, tls_connect):
    context = tls_pki.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    client = tls_connect(tls_server.tls, context)

    assert client.sock.version() == "TLSv1.2"
    client.echo()


@pytest.mark.parametrize("first_bytes", ["binary", "admin text"])
def test_a_plaintext_peer_on_the_tls_port_is_closed_at_its_first_bytes(
    first_bytes, tls_server, tls_pki
):
    # A handshake started before the plaintext peer connects ends at the timeout before the
    # plaintext peer's would: if the plaintext peer is closed while it is still open, it was
    # closed for its bytes, not by the timeout.
    earlier = stall_mid_handshake(tls_server.tls, client_hello(tls_pki.client_context()))
    with earlier, Wire(tls_server.tls) as plain:
        if first_bytes == "binary":
            plain.send(T.ECHO_REQ, b"in the clear")
        else:
            plain.send_line("status")
        assert plain.read_until_closed(timeout=CLOSE_WAIT) == b""
        assert not closed_by_server(earlier)


# --- mutual TLS -------------------------------------------------------------------------------


def test_mutual_tls_serves_a_client_certificate_signed_by_the_ca(mtls_server, tls_pki, tls_connect):
    context = tls_pki.client_context("client-a")
    run_one_job(
        tls_connect(mtls_server.tls, context),
        tls_connect(mtls_server.tls, context),
        b"mtls_job",
        b"data",
        b"result",
    )


def tls_1_1_context(pki: Pki) -> ssl.SSLContext:
    """A client offering TLS 1.0 and 1.1 only (our OpenSSL still speaks them at level 0)."""
    context = pki.client_context("client-a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


REFUSALS = {
    # case: (the client's context; the alert it gets; the cause the server's log gives)
    "no client certificate": (
        lambda pki: pki.client_context(),
        "CERTIFICATE_REQUIRED",
        "no client certificate",
    ),
    "a certificate from another CA": (
        lambda pki: pki.client_context("client-a", foreign=True),
        "UNKNOWN_CA",
        "client certificate rejected: unable to get local issuer certificate",
    ),
    "an expired certificate": (
        lambda pki: pki.client_context("client-a", expired=True),
        "CERTIFICATE_EXPIRED",
        "client certificate rejected: certificate has expired",
    ),
    "TLS 1.1": (tls_1_1_context, "PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_mutual_tls_refuses_with_an_alert_and_logs_the_cause(case, tls_pki, start_tls_server):
    # A server of its own: the log names one failed handshake per HANDSHAKE_LOG_INTERVAL.
    server = start_tls_server("--tls-ca", str(tls_pki.ca_pem))
    make_context, alert, cause = REFUSALS[case]

    error = refusal(server.tls, make_context(tls_pki))

    assert alert in (error.reason or ""), error
    line = log_line(server.server, "TLS handshake failed")
    assert line.endswith(
        f"TLS handshake failed 1 time(s) in the last 10 s; the latest from {HOST}: {cause}"
    )
    servers.echo(*server.plain)  # the server goes on


# --- start-up errors --------------------------------------------------------------------------


def start_failure(tmp_path, *args: str):
    return run_jobserver(
        "-L", HOST, "-p", str(servers.free_port()), "--store", "memory", *args, cwd=tmp_path
    )


UNUSABLE_FILES = {
    # case: (the options, from {cert} {key} {missing} {garbage} {other_key}; the file at
    # fault; words of the cause). Words, not whole lines: the wording is shared with the SDKs'
    # (jobserver/sdk/tls.py) and may change; naming the file and the fault may not.
    "missing certificate": ("--tls-cert {missing} --tls-key {key}", "missing", "no such file"),
    "missing key": ("--tls-cert {cert} --tls-key {missing}", "missing", "no such file"),
    "garbage certificate": (
        "--tls-cert {garbage} --tls-key {key}",
        "garbage",
        "no pem certificate",
    ),
    "garbage key": ("--tls-cert {cert} --tls-key {garbage}", "garbage", "no pem private key"),
    "key of another certificate": (
        "--tls-cert {cert} --tls-key {other_key}",
        "other_key",
        "does not belong to the certificate",
    ),
    "certificate without its key": ("--tls-cert {cert}", "cert", "no private key"),
    "missing CA": (
        "--tls-cert {cert} --tls-key {key} --tls-ca {missing}",
        "missing",
        "no such file",
    ),
    "garbage CA": (
        "--tls-cert {cert} --tls-key {key} --tls-ca {garbage}",
        "garbage",
        "no pem certificate",
    ),
}


@pytest.mark.parametrize("case", UNUSABLE_FILES)
def test_an_unusable_tls_file_is_one_line_naming_it(case, tls_pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    files = {
        "cert": tls_pki.server.cert,
        "key": tls_pki.server.key,
        "missing": tmp_path / "missing.pem",
        "garbage": garbage,
        "other_key": tls_pki.client("someone-else").key,
    }
    options, at_fault, cause = UNUSABLE_FILES[case]

    result = start_failure(tmp_path, *options.format_map(files).split())

    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("jobserver: TLS "), line
    assert f" {files[at_fault]}:" in line or f" {files[at_fault]} " in line, line
    assert cause in line.lower(), line


def test_a_busy_tls_port_is_one_line_naming_it(tls_pki, tmp_path):
    with socket.create_server((HOST, 0)) as busy:
        busy_port = busy.getsockname()[1]
        result = start_failure(tmp_path, *tls_pki.server_args(), "--tls-port", str(busy_port))

    assert result.returncode == 1
    assert one_line(result) == (
        f"jobserver: cannot listen for TLS on {HOST} port {busy_port}: Address already in use"
    )


@pytest.mark.parametrize("option", ["--tls-key", "--tls-ca", "--tls-port"])
def test_a_tls_option_without_a_certificate_is_a_usage_error(option, tls_pki, tmp_path):
    value = str(servers.free_port()) if option == "--tls-port" else str(tls_pki.server.key)

    result = start_failure(tmp_path, option, value)

    assert result.returncode == 2
    assert f"Invalid value for {option}: needs --tls-cert" in result.stderr


def test_a_tls_port_equal_to_the_gearman_port_is_a_usage_error(tls_pki, tmp_path):
    port = servers.free_port()
    result = run_jobserver(
        "-L",
        HOST,
        "-p",
        str(port),
        "--store",
        "memory",
        *tls_pki.server_args(),
        "--tls-port",
        str(port),
        cwd=tmp_path,
    )

    assert result.returncode == 2
    assert f"Invalid value for --tls-port: is the Gearman port too ({port})" in result.stderr


# --- the handshake timeout (last: the stalled peers were opened by the first test) ------------


def test_stalled_and_silent_handshakes_are_closed_at_the_handshake_timeout(stalled_peers):
    deadline = stalled_peers.opened + HANDSHAKE_TIMEOUT + CLOSE_MARGIN
    wait_until(
        lambda: all(closed_by_server(sock) for sock in stalled_peers.all),
        timeout=max(0.0, deadline - time.monotonic()),
        what=f"the server to close {len(stalled_peers.all)} stalled handshakes",
    )
