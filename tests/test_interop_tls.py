"""Real third-party Gearman libraries over TLS, mutual TLS and an ACL (issue 15).

The peers: Debian's libgearman-client-perl (Gearman::Client and Gearman::Worker 2.004, run as
the scripts in tests/perl) and OpenDev's (formerly OpenStack's) gear 0.16.0, pure Python, run
in this process: every test that starts gear shuts it down and checks, within a bound, that
none of its threads lives on.

Three jobservers for the module (tests/tls_certs.py: the session's trustme CA and server
certificate for 127.0.0.1 and localhost, client certificates by CN), each serving TLS on a
port of its own beside the plaintext port that the admin `status` of the tests uses:
- `tls_server`: --tls-cert/--tls-key, no client certificate asked for;
- `mtls_server`: also --tls-ca, so a certificate signed by the test CA is required;
- `acl_server`: mTLS and --acl ACL (below); plaintext loopback peers are "ops" (admin), so
  the tests' admin `status` sees every function.

Perl: a job server entry takes use_ssl, ca_file, cert_file and key_file, which
Gearman::Objects hands to IO::Socket::SSL; that verifies the server's certificate and host name
and speaks TLS 1.3 unless told otherwise (the entry's socket_cb may change its arguments).
What it reports:
- a denied submit: Gearman::Client does not know the ERROR packet and dies with "Unimplemented
  packet type: error [PERMISSION_DENIED\\0identity 'reader' may not submit jobs of ...]";
- a denied registration: Gearman::Worker dies with "unexpected packet type: error [...]";
- no client certificate on the mTLS port, TLS 1.2: IO::Socket::SSL's connect fails with the
  server's alert, "sslv3 alert handshake failure", and the task with "undefined jssock";
- the same on TLS 1.3, which finishes on the client's side before the server has checked:
  the library fails later, at its read ("reading response packet failed: eof" or
  "read_error") or write ("Error sending data to job server"). A program that does not
  ignore SIGPIPE may instead die of it, silently (the close_notify Perl sends on the
  connection the server has closed); tests/perl/gearman_client.pl ignores it.

gear: it speaks TLS only when given all three of ssl_key, ssl_cert and ssl_ca, and silently
speaks plaintext with fewer, so gear cannot use TLS without a client certificate (it sends its
certificate to `tls_server` too, which does not ask for one). It wraps with
SSLContext.wrap_socket (not ssl.wrap_socket, so it runs on Python 3.12 as well), turns TLS 1.3
off (its poll loop can block on TLS 1.3 records) and does not check the server's host name.
What it reports:
- a denied submit: it logs "Received ERROR packet: b'PERMISSION_DENIED': ..." and submitJob
  raises GearmanError("Unable to submit job to any connected servers");
- a denied registration: it takes the ERROR for a broken connection, reconnects and registers
  again at once, about 20 times a second (each a TLS handshake and a "denied" line in the
  server's log), and never gets a job.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import gear
import pytest
import servers
import tls_certs
from conftest import IN_CI
from tls_certs import Pki, TlsServer, start_tls_jobserver

pytestmark = [
    pytest.mark.interop,
    # gear 0.16.0's own (ssl.PROTOCOL_TLS, OP_NO_TLSv1_3, Condition.notifyAll): nothing we do.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:gear"),
]

PERL_DIR = Path(__file__).resolve().parent / "perl"
PERL_MODULES = ("Gearman::Client", "Gearman::Worker", "IO::Socket::SSL")

JOB_TIMEOUT = 10.0
"""Seconds a client waits for its job's result (each takes milliseconds): the Perl client's
--timeout, gear's submit timeout and our wait for gear's WORK_COMPLETE."""

RUN_TIMEOUT = 30.0
"""Seconds one Perl process may run (each finishes in about 0.1 s); a generous bound that
only turns a hang into a failure."""

READY_TIMEOUT = 10.0
"""Seconds for a worker to connect and show in the admin status, and for gear to connect."""

GEAR_STOP_TIMEOUT = 10.0
"""Seconds for gear's shutdown: its stopWaitingForJobs waits up to 5 s for an unanswered
GRAB_JOB_UNIQ, and shutdown() then joins its threads without a timeout of its own."""

REFUSED_AFTER_HANDSHAKE = (
    r"failed: (reading response packet failed: (eof|read_error)|Error sending data to job server)"
)
"""What Gearman::Client says when a TLS 1.3 server refuses it after the client's side of the
handshake is done (Gearman::Taskset's croaks in add_task and _wait_for_packet)."""

ACL = """\
[identity."app"]
invoke = ["reverse_*"]
[identity."worker"]
register = ["reverse_*"]
[identity."reader"]
invoke = ["report_*"]
[identity."ops"]
invoke = ["*"]
register = ["*"]
admin = true
"""
"""app submits and worker serves reverse_*; reader has a certificate the CA signed but may
only submit report_*; ops is the plaintext loopback identity of the tests' admin `status`."""


# --- servers -------------------------------------------------------------------------------------

tls_pki = tls_certs.tls_pki  # the session's CA, server certificate and client certificates


def _serve(*args: str) -> Iterator[TlsServer]:
    started = start_tls_jobserver(*args)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def tls_server(tls_pki: Pki) -> Iterator[TlsServer]:
    yield from _serve(tls_pki)


@pytest.fixture(scope="module")
def mtls_server(tls_pki: Pki) -> Iterator[TlsServer]:
    yield from _serve(tls_pki, "--tls-ca", str(tls_pki.ca_pem))


@pytest.fixture(scope="module")
def acl_server(tls_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    acl = tmp_path_factory.mktemp("acl") / "acl.toml"
    acl.write_text(ACL)
    mtls = ("--tls-ca", str(tls_pki.ca_pem))
    yield from _serve(tls_pki, *mtls, "--acl", str(acl), "--loopback-identity", "ops")


def workers(server: TlsServer, function: str) -> int:
    """The admin status's count of workers for `function` (asked on the plaintext port)."""
    return servers.status(server.server.address).get(function, (0, 0, 0))[2]


def queued(server: TlsServer, function: str) -> int:
    return servers.status(server.server.address).get(function, (0, 0, 0))[0]


@pytest.fixture
def function(request: pytest.FixtureRequest) -> str:
    """A function name of this test's own (the servers are shared by the module), under the
    ACL's reverse_* globs."""
    return "reverse_" + re.sub(r"\W+", "_", request.node.name).strip("_")


def wait_for_worker(server: TlsServer, function: str, gone: Callable[[], bool]) -> None:
    """Until the admin status counts a worker for `function`, or `gone()` (it exited)."""
    servers.wait_until(
        lambda: gone() or workers(server, function) > 0,
        timeout=READY_TIMEOUT,
        what=f"a worker for {function!r}",
    )


# --- Perl: Gearman::Client and Gearman::Worker ---------------------------------------------


@pytest.fixture(scope="module")
def perl_gearman() -> None:
    """Skip (locally) or fail (in CI) without perl and Debian's libgearman-client-perl."""
    problem = None
    if shutil.which("perl") is None:
        problem = "perl is not installed"
    else:
        check = subprocess.run(
            ["perl", *(f"-M{module}" for module in PERL_MODULES), "-e", "1"],
            capture_output=True,
            timeout=RUN_TIMEOUT,
        )
        if check.returncode != 0:
            lines = check.stderr.decode(errors="replace").strip().splitlines()
            # perl's first line names the missing module; its @INC list is noise here.
            problem = lines[0].split(" (@INC", 1)[0] if lines else f"perl: {check.returncode}"
    if problem is None:
        return
    reason = (
        f"{problem}: install the Debian package libgearman-client-perl (scripts/test does this)"
    )
    if IN_CI:
        pytest.fail(f"CI requires the Perl Gearman interop peers; {reason}", pytrace=False)
    pytest.skip(reason)


def perl_tls_options(
    server: TlsServer, pki: Pki, identity: str | None, *, trust_test_ca: bool = True
) -> list[str]:
    """Connect to the TLS port, verify the server against the test CA (else against the
    system's CAs), and with `identity` present that client certificate."""
    options = ["--port", str(server.tls_port)]
    if trust_test_ca:
        options += ["--ca", str(pki.ca_pem)]
    if identity is not None:
        certificate = pki.client(identity)
        options += ["--cert", str(certificate.cert), "--key", str(certificate.key)]
    return options


def perl_client(
    server: TlsServer,
    pki: Pki,
    identity: str | None,
    function: str,
    workload: str,
    *options: str,
    trust_test_ca: bool = True,
) -> tuple[int, str]:
    """Run tests/perl/gearman_client.pl: (exit status, its "result: ..." or "failed: ..." line)."""
    tls = perl_tls_options(server, pki, identity, trust_test_ca=trust_test_ca)
    argv = ["perl", str(PERL_DIR / "gearman_client.pl"), *tls]
    argv += ["--timeout", f"{JOB_TIMEOUT:g}", *options, "--", function, workload]
    run = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT)
    output = run.stdout.decode(errors="replace").strip()
    assert output, f"no output; stderr: {run.stderr.decode(errors='replace')}"
    return run.returncode, output


def perl_worker_argv(server: TlsServer, pki: Pki, identity: str | None, function: str) -> list[str]:
    argv = ["perl", str(PERL_DIR / "gearman_worker.pl"), *perl_tls_options(server, pki, identity)]
    return [*argv, "--", function]


class PerlWorker:
    """tests/perl/gearman_worker.pl in the background, registered before the test goes on."""

    def __init__(self, server: TlsServer, pki: Pki, identity: str | None, function: str) -> None:
        self.proc = subprocess.Popen(
            perl_worker_argv(server, pki, identity, function),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_worker(server, function, gone=lambda: self.proc.poll() is not None)
        except BaseException:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise AssertionError(f"the Perl worker exited: {self.stop()}")

    def stop(self) -> list[str]:
        """Stop it (by PID) and return all it printed, one entry a line."""
        servers.stop_process(self.proc)
        output, _ = self.proc.communicate(timeout=RUN_TIMEOUT)
        return output.decode(errors="replace").splitlines()


@pytest.fixture
def perl_worker(perl_gearman) -> Iterator[Callable[..., PerlWorker]]:
    """`perl_worker(server, pki, identity, function)`; every worker is stopped at the end."""
    started: list[PerlWorker] = []

    def start(server: TlsServer, pki: Pki, identity: str | None, function: str) -> PerlWorker:
        worker = PerlWorker(server, pki, identity, function)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_perl_client_and_worker_run_a_job_over_tls_verifying_the_server(
    tls_server, tls_pki, perl_worker, function
):
    worker = perl_worker(tls_server, tls_pki, None, function)

    assert perl_client(tls_server, tls_pki, None, function, "over tls") == (0, "result: slt revo")
    assert worker.stop() == ["registered", "ran: over tls"]


def test_perl_client_without_the_test_ca_refuses_the_server_certificate(
    tls_server, tls_pki, perl_gearman, function
):
    """The positive test above verifies the server for real: without ca_file, IO::Socket::SSL
    checks the chain against the system's CAs, which never signed the test CA."""
    status, output = perl_client(
        tls_server, tls_pki, None, function, "unverified", trust_test_ca=False
    )

    assert status == 1
    assert "certificate verify failed" in output, output


@pytest.mark.parametrize("server_name", ["mtls_server", "acl_server"])
def test_perl_client_and_worker_with_client_certificates_run_a_job(
    server_name, request, tls_pki, perl_worker, function
):
    """On the mTLS port, and under the ACL, where app may invoke and worker register reverse_*."""
    server = request.getfixturevalue(server_name)
    worker = perl_worker(server, tls_pki, "worker", function)

    assert perl_client(server, tls_pki, "app", function, "mutual") == (0, "result: lautum")
    assert worker.stop() == ["registered", "ran: mutual"]


def test_perl_client_denied_by_the_acl_fails_with_permission_denied_and_its_job_never_runs(
    acl_server, tls_pki, perl_worker, function
):
    worker = perl_worker(acl_server, tls_pki, "worker", function)

    status, output = perl_client(acl_server, tls_pki, "reader", function, "denied")
    # An allowed job after the denied one: the worker's only job is this one.
    allowed = perl_client(acl_server, tls_pki, "app", function, "allowed")

    assert status == 1
    assert output.startswith(
        "failed: Unimplemented packet type: error [PERMISSION_DENIED -- "
        f"identity 'reader' may not submit jobs of '{function}']"
    ), output
    assert allowed == (0, "result: dewolla")
    assert worker.stop() == ["registered", "ran: allowed"]


def test_perl_worker_denied_registration_by_the_acl_dies_with_permission_denied(
    acl_server, tls_pki, perl_gearman, function
):
    run = subprocess.run(
        perl_worker_argv(acl_server, tls_pki, "app", function),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )

    assert run.returncode == 1
    assert run.stdout.decode().splitlines() == [
        "registered",
        "died: unexpected packet type: error [PERMISSION_DENIED -- "
        f"identity 'app' may not register '{function}']",
    ]
    assert workers(acl_server, function) == 0


def test_perl_client_without_a_client_certificate_on_tls_1_3_is_refused_after_its_handshake(
    mtls_server, tls_pki, perl_gearman, function
):
    """TLS 1.3: the client's side of the handshake is done before the server has seen that
    no certificate came, so Perl writes its SUBMIT_JOB and then finds the connection closed:
    at its read ("eof", or "read_error" when OpenSSL notices first), or, if the close comes
    first, at its write. Nothing reaches the job queue."""
    status, output = perl_client(mtls_server, tls_pki, None, function, "no certificate")

    assert status == 1
    assert re.match(REFUSED_AFTER_HANDSHAKE, output), output
    assert queued(mtls_server, function) == 0


def test_perl_client_without_a_client_certificate_on_tls_1_2_is_refused_with_the_alert(
    mtls_server, tls_pki, perl_gearman, function
):
    """TLS 1.2, where the server checks the client's certificate within the handshake: the
    alert the server sends ends IO::Socket::SSL's connect with the cause. (trio.SSLStream
    leaves a failed handshake's alert unsent; jobserver/tls.py sends it. A TLS 1.3 client gets
    the alert after its own side of the handshake, and Perl shows it only at times.)"""
    status, output = perl_client(
        mtls_server, tls_pki, None, function, "no certificate", "--tls-version", "TLSv1_2"
    )

    assert status == 1
    assert "alert handshake failure" in output, output


# --- gear: Client and Worker ---------------------------------------------------------------------


def bounded(action: Callable[[], object], timeout: float, what: str) -> None:
    """Run `action` in a thread of ours and fail if it has not returned within `timeout`:
    gear's blocking calls (connect, shutdown's joins) have no timeout of their own."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{what} did not return within {timeout:g} s"
    if errors:
        raise errors[0]


def gear_tls_files(pki: Pki, identity: str, *, foreign: bool = False) -> dict[str, str]:
    """gear's addServer/Connection arguments: the certificate with CN `identity` (from a CA
    the servers do not trust if `foreign`), and the servers' CA."""
    certificate = pki.client(identity, foreign=foreign)
    return {
        "ssl_key": str(certificate.key),
        "ssl_cert": str(certificate.cert),
        "ssl_ca": str(pki.ca_pem),
    }


class GearWorker:
    """A gear.Worker and the thread of ours that takes its jobs; it answers each with the
    workload reversed and records the workloads in `ran`."""

    def __init__(self, worker: gear.Worker) -> None:
        self.worker = worker
        self.ran: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, name="gear worker jobs", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                job = self.worker.getJob()
            except gear.InterruptedError:
                return
            self.ran.append(job.arguments)
            job.sendWorkComplete(job.arguments[::-1])

    def stop(self) -> None:
        # gear's shutdown() stops its poll thread first; a GRAB_JOB_UNIQ whose NO_JOB is still
        # on its way would then hold stopWaitingForJobs for 5 s. With the poll thread still
        # running it returns as soon as that NO_JOB arrives.
        bounded(self.worker.stopWaitingForJobs, GEAR_STOP_TIMEOUT, "gear stopWaitingForJobs")
        self.thread.join(GEAR_STOP_TIMEOUT)
        assert not self.thread.is_alive(), "the gear worker's getJob() was not interrupted"


class GearPeers:
    """Makes gear clients and workers connected to a server; `stop_all` shuts each down and
    checks that none of gear's threads outlives the test."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.started: list[gear.BaseClientServer] = []
        self.workers: list[GearWorker] = []

    def _connect(self, peer: gear.BaseClient, server: TlsServer, identity: str) -> None:
        self.started.append(peer)
        peer.addServer(servers.HOST, server.tls_port, **gear_tls_files(self.pki, identity))
        peer.waitForServer(READY_TIMEOUT)

    def client(self, server: TlsServer, identity: str) -> gear.Client:
        client = gear.Client(f"interop-{identity}")
        self._connect(client, server, identity)
        return client

    def worker(self, server: TlsServer, identity: str, function: str) -> GearWorker:
        worker = gear.Worker(f"interop-{identity}")
        self._connect(worker, server, identity)
        worker.registerFunction(function)
        serving = GearWorker(worker)
        self.workers.append(serving)
        wait_for_worker(server, function, gone=lambda: False)
        return serving

    def stop_all(self) -> None:
        for serving in self.workers:
            serving.stop()
        for peer in self.started:
            bounded(peer.shutdown, GEAR_STOP_TIMEOUT, "gear shutdown")
            alive = [t.name for t in (peer.poll_thread, peer.connect_thread) if t.is_alive()]
            assert not alive, f"gear threads still running after shutdown: {alive}"


@pytest.fixture
def gear_peers(tls_pki: Pki) -> Iterator[GearPeers]:
    peers = GearPeers(tls_pki)
    yield peers
    peers.stop_all()


def gear_job(client: gear.Client, function: str, workload: bytes) -> gear.Job:
    """Submit a foreground job and wait for its end; the job with its result in `data`."""
    job = gear.Job(function.encode(), workload)
    client.submitJob(job, timeout=JOB_TIMEOUT)
    servers.wait_until(lambda: job.complete, timeout=JOB_TIMEOUT, what=f"{job} to complete")
    return job


@pytest.mark.parametrize("server_name", ["tls_server", "mtls_server", "acl_server"])
def test_gear_client_and_worker_with_client_certificates_run_a_job(
    server_name, request, gear_peers, function
):
    """gear on every kind of TLS port: it always presents its certificate, also where the
    server does not ask for one, and always speaks TLS 1.2."""
    server = request.getfixturevalue(server_name)
    worker = gear_peers.worker(server, "worker", function)
    client = gear_peers.client(server, "app")

    job = gear_job(client, function, b"gear over tls")

    assert (job.failure, b"".join(job.data)) == (False, b"slt revo raeg")
    assert worker.ran == [b"gear over tls"]
    assert {c.conn.version() for c in client.active_connections} == {"TLSv1.2"}


def test_gear_client_denied_by_the_acl_gets_permission_denied_and_its_job_never_runs(
    acl_server, gear_peers, function, caplog
):
    caplog.set_level(logging.ERROR, logger="gear")
    worker = gear_peers.worker(acl_server, "worker", function)
    reader = gear_peers.client(acl_server, "reader")
    app = gear_peers.client(acl_server, "app")

    with pytest.raises(gear.GearmanError, match="Unable to submit job to any connected servers"):
        reader.submitJob(gear.Job(function.encode(), b"denied"), timeout=JOB_TIMEOUT)
    # An allowed job after the denied one: the worker's only job is this one.
    allowed = gear_job(app, function, b"allowed")

    assert (
        f"Received ERROR packet: b'PERMISSION_DENIED': "
        f"b\"identity 'reader' may not submit jobs of '{function}'\""
    ) in caplog.messages
    assert b"".join(allowed.data) == b"dewolla"
    assert worker.ran == [b"allowed"]


def test_gear_worker_denied_registration_by_the_acl_never_gets_the_function(
    acl_server, tls_pki, gear_peers, function, caplog
):
    """gear takes the ERROR for a broken connection and reconnects and registers again (see
    the module's docstring); the test stops it after its first denial."""
    caplog.set_level(logging.ERROR, logger="gear")
    denied = (
        "Received ERROR packet: b'PERMISSION_DENIED': "
        f"b\"identity 'app' may not register '{function}'\""
    )
    worker = gear.Worker("interop-denied")
    gear_peers.started.append(worker)
    worker.addServer(servers.HOST, acl_server.tls_port, **gear_tls_files(tls_pki, "app"))
    worker.waitForServer(READY_TIMEOUT)

    worker.registerFunction(function)
    servers.wait_until(lambda: denied in caplog.messages, what="gear to log the denial")

    assert workers(acl_server, function) == 0


def test_gear_given_only_a_ca_file_speaks_plaintext_which_the_tls_port_closes(tls_server, tls_pki):
    """gear needs ssl_key, ssl_cert and ssl_ca for TLS: it cannot verify a server without
    presenting a certificate of its own, and with a CA alone it sends plaintext."""
    connection = gear.Connection(servers.HOST, tls_server.tls_port, ssl_ca=str(tls_pki.ca_pem))
    assert not connection.use_ssl
    bounded(connection.connect, READY_TIMEOUT, "gear connect")
    try:
        connection.conn.settimeout(READY_TIMEOUT)
        connection.sendPacket(gear.Packet(gear.constants.REQ, gear.constants.ECHO_REQ, b"ping"))
        received = b""
        while chunk := _recv_or_reset(connection.conn):
            received += chunk
    finally:
        connection.disconnect()

    assert b"\0RES" not in received


def _recv_or_reset(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096)
    except ConnectionResetError:
        return b""


def test_gear_with_a_certificate_from_another_ca_cannot_connect_to_the_acl_port(
    acl_server, tls_pki
):
    """The certificate's CN is "app", an identity the ACL allows: the CA decides, not the name."""
    connection = gear.Connection(
        servers.HOST, acl_server.tls_port, **gear_tls_files(tls_pki, "app", foreign=True)
    )
    try:
        with pytest.raises(gear.ConnectionError, match="Unable to open socket"):
            bounded(connection.connect, READY_TIMEOUT, "gear connect")
    finally:
        connection.disconnect()
