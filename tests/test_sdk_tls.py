"""TLS in the SDKs and their commands (issue 15): Client, SyncClient, Worker, `jobserver submit`,
`status`, `dead` and `worker` connect with TLS when given a CA and, for servers that require
one (mutual TLS), a client certificate.

Against real servers: one jobserver serving TLS on --tls-port beside its plaintext port, one
that also requires client certificates (--tls-ca), and one whose certificate names another
host. Their certificates come from tests/tls_certs.py (trustme): a CA, server certificates, a
client certificate with CN "client-a", and a second CA that signed nothing these servers
trust. A server whose TLS fails (certificate from another CA, wrong host name, a plaintext
port, our certificate refused) is an unreachable server with the cause in the message, so
failover and the health log work as for any other. The handshake's own failures that need no
server process (silence, a peer that closes, one that does not speak TLS) are shown against
small listeners written here.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import pytest
import servers
import tls_certs
from anyio.streams.tls import TLSStream

from client_sdk import Client, NoServerAvailable, SyncClient, TlsConfigError, TlsFiles
from jobserver.protocol import PacketType, encode_request, encode_response
from jobserver.sdk.addresses import ServerAddress
from jobserver.sdk.connection import ConnectionLost, ServerConnection
from jobserver.sdk.tls import client_context
from worker_sdk import Worker

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

TEST_TIMEOUT = 20.0
"""Seconds any one async test may take in all; each needs well under one."""

CLI_TIMEOUT = 30.0
"""Seconds one command-line run may take (each answers in about a second)."""

HANDSHAKE_TIMEOUT = 0.5
"""The connect timeout given to connections against a silent listener: the test waits this
long for the handshake to give up, so it is short."""

JOBSERVER = [sys.executable, "-m", "jobserver"]


# --- certificates and servers (tests/tls_certs.py) ---------------------------------------------

tls_pki = tls_certs.tls_pki


@dataclass(frozen=True)
class Pki:
    """The PEM files these tests hand to the SDKs and commands."""

    ca: Path
    """Signs the servers' certificates and client-a's."""
    other_ca: Path
    """Signs nothing the servers trust or present."""
    server_cert: Path
    server_key: Path
    client_cert: Path
    """client-a's certificate (subject CN "client-a")."""
    client_key: Path
    client_cert_and_key: Path
    """client-a's certificate and key in one file."""
    garbage: Path
    """A file that is no PEM at all."""
    certificates: tls_certs.Pki
    """Where the files come from: more certificates can be issued from its CAs."""


@pytest.fixture(scope="module")
def pki(tls_pki: tls_certs.Pki, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("sdk-tls")
    client = tls_pki.client("client-a")
    both = directory / "client-a-with-key.pem"
    both.write_bytes(client.cert.read_bytes() + client.key.read_bytes())
    garbage = directory / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    return Pki(
        ca=tls_pki.ca_pem,
        other_ca=tls_pki.other_ca_pem,
        server_cert=tls_pki.server.cert,
        server_key=tls_pki.server.key,
        client_cert=client.cert,
        client_key=client.key,
        client_cert_and_key=both,
        garbage=garbage,
        certificates=tls_pki,
    )


@dataclass(frozen=True)
class TlsServer:
    """A jobserver serving TLS on a port of its own, as the SDKs write its addresses."""

    plain: str
    """Its plaintext Gearman port."""
    tls: str
    tls_port: int


@contextmanager
def tls_jobserver(pki: Pki, *args: str) -> Iterator[TlsServer]:
    started = tls_certs.start_tls_jobserver(pki.certificates, *args)
    try:
        yield TlsServer(
            str(ServerAddress(*started.plain)), str(ServerAddress(*started.tls)), started.tls_port
        )
    finally:
        started.stop()


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[TlsServer]:
    """Serves TLS to anyone (no client certificate asked); its certificate names 127.0.0.1
    and localhost."""
    with tls_jobserver(pki) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[TlsServer]:
    """Requires a client certificate signed by the test CA (mutual TLS)."""
    with tls_jobserver(pki, "--tls-ca", str(pki.ca)) as server:
        yield server


@pytest.fixture(scope="module")
def misnamed_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """Presents a certificate from the test CA for the name jobs.example only."""
    directory = tmp_path_factory.mktemp("misnamed")
    leaf = pki.certificates.ca.issue_cert("jobs.example")
    cert, key = directory / "jobs.example.pem", directory / "jobs.example.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    # After the fixture's own --tls-cert/--tls-key: the last of an option given twice counts.
    with tls_jobserver(pki, "--tls-cert", str(cert), "--tls-key", str(key)) as server:
        yield server


def with_client_certificate(pki: Pki) -> TlsFiles:
    return TlsFiles(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)


async def wait_for_log(caplog: pytest.LogCaptureFixture, *words: str) -> str:
    """The first WARNING logged that holds every one of `words` (the caller bounds the wait)."""
    while True:
        for record in caplog.records:
            message = record.getMessage()
            if record.levelno == logging.WARNING and all(word in message for word in words):
                return message
        await anyio.sleep(0.02)


# --- round trips -------------------------------------------------------------------------------


async def test_client_and_worker_run_foreground_and_background_jobs_over_tls(
    tls_server, pki, anyio_backend
):
    function = f"tls_reverse_{anyio_backend}"
    files = TlsFiles(ca=pki.ca)
    worker = Worker([tls_server.tls], codec="json", tls=files)
    background_done = anyio.Event()

    @worker.function(function)
    async def reverse(job):
        if job.arg == "in the background":
            background_done.set()
        return job.arg[::-1]

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.serve)
            async with Client([tls_server.tls], codec="json", tls=files) as client:
                assert await client.submit(function, "over tls") == "slt revo"
                handle = await client.submit_background(function, "in the background")
                assert handle.server == tls_server.tls
                await background_done.wait()
            worker.stop()


async def test_mutual_tls_round_trip_with_client_certificates_and_a_sync_client(
    mtls_server, pki, anyio_backend
):
    function = f"mtls_upper_{anyio_backend}"
    worker = Worker([mtls_server.tls], codec="json", tls=with_client_certificate(pki))

    @worker.function(function)
    def upper(job):
        return job.arg.upper()

    def submit_from_a_thread() -> object:
        # The certificate and its key in one file: TlsFiles(cert=...) without key=.
        tls = TlsFiles(ca=pki.ca, cert=pki.client_cert_and_key)
        with SyncClient([mtls_server.tls], codec="json", tls=tls) as client:
            return client.submit(function, "mutual", timeout=TEST_TIMEOUT)

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.serve)
            assert await anyio.to_thread.run_sync(submit_from_a_thread) == "MUTUAL"
            worker.stop()


# --- refused connections -----------------------------------------------------------------------


async def test_a_mutual_tls_server_is_unreachable_for_a_client_and_a_worker_without_a_certificate(
    mtls_server, pki, anyio_backend, caplog
):
    caplog.set_level(logging.WARNING)
    files = TlsFiles(ca=pki.ca)
    worker = Worker([mtls_server.tls], tls=files)

    @worker.function(f"never_{anyio_backend}")
    async def never(job):
        raise AssertionError("a worker without a certificate got a job")

    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([mtls_server.tls], tls=files) as client:
            with pytest.raises(NoServerAvailable) as raised:
                await client.submit_background(f"never_{anyio_backend}", b"x")
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.serve)
            logged = await wait_for_log(caplog, "unreachable", mtls_server.tls, "certificate")
            worker.stop()
    # The server sends no alert before closing (so the client cannot be told exactly why);
    # the message says what a connection that ends before any answer most likely means.
    assert mtls_server.tls in str(raised.value) and "certificate" in str(raised.value)
    assert logged.startswith("server unreachable:"), logged


async def test_a_server_certificate_from_another_ca_is_refused(tls_server, pki):
    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([tls_server.tls], tls=TlsFiles(ca=pki.other_ca)) as client:
            with pytest.raises(NoServerAvailable) as raised:
                await client.submit_background("anything", b"x")
    assert (
        f"{tls_server.tls}: TLS handshake failed: certificate verify failed: "
        "unable to get local issuer certificate"
    ) in str(raised.value)


async def test_the_server_name_is_checked_unless_the_callers_context_turns_that_off(
    misnamed_server, pki, anyio_backend
):
    # The certificate names jobs.example; the server is addressed as 127.0.0.1.
    with anyio.fail_after(TEST_TIMEOUT):
        async with Client([misnamed_server.tls], tls=TlsFiles(ca=pki.ca)) as client:
            with pytest.raises(NoServerAvailable) as raised:
                await client.submit_background("anything", b"x")
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.check_hostname = False  # the chain is still verified
        async with Client([misnamed_server.tls], tls=context) as client:
            handle = await client.submit_background(f"misnamed_{anyio_backend}", b"x")
    assert (
        f"{misnamed_server.tls}: TLS handshake failed: certificate verify failed: "
        "IP address mismatch, certificate is not valid for '127.0.0.1'"
    ) in str(raised.value)
    assert handle.server == misnamed_server.tls


async def test_clients_and_workers_fail_over_from_a_server_whose_tls_fails(
    tls_server, pki, anyio_backend, caplog
):
    caplog.set_level(logging.WARNING)
    function = f"failover_{anyio_backend}"
    failing = tls_server.plain  # TLS to a plaintext port: the handshake fails
    files = TlsFiles(ca=pki.ca)
    worker = Worker([failing, tls_server.tls], codec="json", tls=files)

    @worker.function(function)
    async def echo(job):
        return job.arg

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.serve)
            async with Client([failing, tls_server.tls], codec="json", tls=files) as client:
                # Jobs without a unique go round robin: of two, one tries `failing` first.
                assert [await client.submit(function, n) for n in (1, 2)] == [1, 2]
            worker.stop()
    logged = [
        record.name
        for record in caplog.records
        if record.levelno == logging.WARNING
        and f"{failing}: TLS handshake failed" in record.getMessage()
    ]
    assert "client_sdk" in logged and "worker_sdk" in logged, caplog.text


# --- the handshake against listeners written here ----------------------------------------------


async def serve_tcp(handler: Callable[[anyio.abc.SocketStream], Awaitable[None]], tasks) -> int:
    """Serve `handler` on a free 127.0.0.1 port until `tasks` is cancelled; the port."""
    listener = await anyio.create_tcp_listener(local_host=servers.HOST)
    tasks.start_soon(listener.serve, handler)
    return listener.extra(anyio.abc.SocketAttribute.local_port)


async def open_tls(port: int, tls: ssl.SSLContext | None) -> ServerConnection:
    return await ServerConnection.open(
        ServerAddress(servers.HOST, port), timeout=HANDSHAKE_TIMEOUT, tls=tls
    )


@pytest.mark.parametrize(
    ("peer", "cause"),
    [
        ("silent", f"TLS handshake failed: no answer within {HANDSHAKE_TIMEOUT:g} s"),
        ("closes", "TLS handshake failed: the server closed the connection (is this port"),
        ("plaintext", "TLS handshake failed: the server does not speak TLS on this port"),
    ],
)
async def test_a_failed_handshake_is_a_lost_connection_naming_the_cause(pki, peer, cause):
    async def handler(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            if peer == "silent":
                await anyio.sleep_forever()
            await stream.receive()  # the ClientHello
            if peer == "plaintext":  # what a Gearman server answers a text line with
                await stream.send(b"ERR UNKNOWN_COMMAND Unknown+server+command\n")

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            port = await serve_tcp(handler, tasks)
            with pytest.raises(ConnectionLost) as raised:
                await open_tls(port, client_context(TlsFiles(ca=pki.ca)))
            tasks.cancel_scope.cancel()
    assert str(raised.value).startswith(f"{servers.HOST}:{port}: {cause}"), raised.value


async def test_a_peer_closing_without_close_notify_is_an_ordinary_end_of_the_connection(pki):
    # gearmand and other Gearman peers close TLS connections without the closing alert.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)

    async def handler(stream: anyio.abc.SocketStream) -> None:
        tls = await TLSStream.wrap(
            stream, server_side=True, ssl_context=context, standard_compatible=False
        )
        assert await tls.receive() == encode_request(PacketType.ECHO_REQ, b"ping")
        await tls.send(encode_response(PacketType.ECHO_RES, b"ping"))
        await stream.aclose()  # the TCP connection, without TLS's close_notify

    with anyio.fail_after(TEST_TIMEOUT):
        async with anyio.create_task_group() as tasks:
            port = await serve_tcp(handler, tasks)
            connection = await open_tls(port, client_context(TlsFiles(ca=pki.ca)))
            await connection.send(PacketType.ECHO_REQ, b"ping")
            reply = await connection.receive()
            with pytest.raises(ConnectionLost) as raised:
                await connection.receive()
            await connection.aclose()
            tasks.cancel_scope.cancel()
    assert (reply.type, reply.args) == (PacketType.ECHO_RES, (b"ping",))
    assert str(raised.value) == f"{servers.HOST}:{port}: the server closed the connection"


# --- bad files ---------------------------------------------------------------------------------


def bad_settings(pki: Pki, tmp_path: Path) -> list[tuple[TlsFiles, str]]:
    missing = tmp_path / "missing.pem"
    return [
        (TlsFiles(ca=missing), f"TLS CA file {missing}: No such file or directory"),
        (TlsFiles(ca=pki.garbage), f"TLS CA file {pki.garbage}: no PEM certificate in it"),
        (
            TlsFiles(ca=pki.ca, cert=pki.garbage, key=pki.client_key),
            f"TLS certificate {pki.garbage}: no PEM certificate in it",
        ),
        (
            TlsFiles(ca=pki.ca, cert=pki.client_cert, key=pki.server_key),
            f"TLS key {pki.server_key}: the key does not belong to the certificate "
            f"{pki.client_cert}",
        ),
        (
            TlsFiles(ca=pki.ca, cert=pki.client_cert),
            f"TLS certificate {pki.client_cert}: no private key in it",
        ),
    ]


def test_bad_tls_files_fail_the_constructors_with_the_file_and_the_cause(pki, tmp_path):
    for files, message in bad_settings(pki, tmp_path):
        for make in (
            lambda files=files: Client(["127.0.0.1:4730"], tls=files),
            lambda files=files: SyncClient(["127.0.0.1:4730"], tls=files),
            lambda files=files: Worker(["127.0.0.1:4730"], tls=files),
        ):
            with pytest.raises(TlsConfigError) as raised:
                make()
            assert str(raised.value).startswith(message), (files, raised.value)
            assert isinstance(raised.value, ValueError)
    with pytest.raises(TlsConfigError, match="needs its certificate"):
        TlsFiles(key=pki.client_key)


def test_a_ca_bundle_with_comments_between_its_certificates_loads(pki, tmp_path):
    # Bundles such as certifi's name each CA in a comment, some in UTF-8.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        "# Issuer: CN=Főtanúsítvány\n".encode() + pki.other_ca.read_bytes() + pki.ca.read_bytes()
    )
    context = client_context(TlsFiles(ca=bundle))
    assert context is not None and context.check_hostname
    assert len(context.get_ca_certs()) == 2


# --- the commands ------------------------------------------------------------------------------

WORKER_MODULE = textwrap.dedent(
    """
    from worker_sdk import Worker

    worker = Worker(["127.0.0.1:9"], codec="raw")  # the command line gives the servers

    @worker.function("cli_tls_reverse")
    def reverse(job):
        return job.payload[::-1]
    """
)


def jobserver(*args: str, cwd: Path = servers.REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """Run `jobserver ARGS...` to completion, output captured as text."""
    return subprocess.run(
        [*JOBSERVER, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=cwd,
        env=command_env(cwd),
    )


def command_env(module_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(module_dir), str(servers.REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def tls_options(pki: Pki, *, client_certificate: bool) -> list[str]:
    options = ["--tls-ca", str(pki.ca)]
    if client_certificate:
        options += ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    return options


def test_the_commands_work_over_mutual_tls(mtls_server, pki, tmp_path):
    (tmp_path / "tls_tasks.py").write_text(WORKER_MODULE)
    tls = tls_options(pki, client_certificate=True)
    worker = subprocess.Popen(
        [*JOBSERVER, "worker", "tls_tasks:worker", "--servers", mtls_server.tls, *tls],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=command_env(tmp_path),
    )
    try:
        submitted = jobserver(
            "submit", "cli_tls_reverse", "over tls", "--codec", "raw",
            "--servers", mtls_server.tls, *tls,
        )  # fmt: skip
        queued = jobserver(
            "submit", "cli_tls_reverse", "later", "--background", "--codec", "raw",
            "--servers", mtls_server.tls, "--timeout", str(CLI_TIMEOUT), *tls,
        )  # fmt: skip
        status = jobserver("status", "--servers", mtls_server.tls, *tls)
        dead = jobserver("dead", "list", "--servers", mtls_server.tls, *tls)
    finally:
        servers.stop_process(worker)
    worker_log = worker.stderr.read().decode() if worker.stderr else ""
    assert (submitted.returncode, submitted.stdout) == (0, "slt revo"), submitted.stderr
    assert queued.returncode == 0 and queued.stdout.startswith("H:"), queued.stderr
    assert status.returncode == 0, status.stderr
    assert "cli_tls_reverse" in status.stdout and "up" in status.stdout, status.stdout
    assert (dead.returncode, dead.stdout) == (0, "no dead jobs\n"), dead.stderr
    assert f"joined {mtls_server.tls}" in worker_log, worker_log


def test_status_without_a_client_certificate_reports_the_server_unreachable(mtls_server, pki):
    result = jobserver(
        "status", "--servers", mtls_server.tls, *tls_options(pki, client_certificate=False)
    )
    assert result.returncode == 1, result
    assert "unreachable" in result.stdout and "certificate" in result.stdout, result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ("submit", "f", "x"),
        ("status",),
        ("dead", "list"),
        ("worker", "tls_tasks:worker"),
    ],
    ids=lambda command: command[0],
)
def test_a_bad_tls_file_is_a_one_line_usage_error_naming_it(pki, tmp_path, command):
    (tmp_path / "tls_tasks.py").write_text(WORKER_MODULE)
    missing = tmp_path / "missing.pem"
    result = jobserver(
        *command,
        "--servers", "127.0.0.1:9",
        "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(missing),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert result.stderr == (
        f"jobserver {command[0]}: TLS key {missing}: No such file or directory\n"
    ), result.stderr
    assert result.stdout == ""


def test_a_key_without_its_certificate_is_a_usage_error(pki):
    result = jobserver("submit", "f", "--servers", "127.0.0.1:9", "--tls-key", str(pki.client_key))
    assert result.returncode == 2, result
    assert "--tls-key needs --tls-cert" in result.stderr and "Traceback" not in result.stderr
