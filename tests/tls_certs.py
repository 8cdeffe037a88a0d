"""Certificates for the TLS tests, made with trustme, and jobservers serving them.

- `tls_pki` (session fixture): a CA, a server certificate for 127.0.0.1 and localhost, client
  certificates by CN on demand (also expired ones, or ones from a CA the servers do not trust),
  all as PEM files.
- `start_tls_jobserver(pki, *args)`: TLS on a --tls-port of its own beside the plaintext port,
  which tests/servers.py's readiness check (a plaintext ECHO) uses.
- `start_tls_only_jobserver(pki, *args)`: TLS on the Gearman port itself; ready once it
  answers an ECHO over TLS.
- `tls_wire(address, context)`: a tests/wire.py Wire whose socket speaks TLS.
- `client_hello(context)`: the first bytes a TLS client sends, for peers that stall after them.

A test module uses the fixtures by naming them at its top (`tls_pki = tls_certs.tls_pki`).
The TLS client side is the stdlib's ssl, never the SDKs: these tests check the server.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import servers
import trustme
from wire import TIMEOUT, Wire

MAX_START_ATTEMPTS = 3
"""Tries to start a server whose port, found free, was taken by another process before the
server bound it."""

EXPIRED_FOR = datetime.timedelta(days=1)
"""How long ago an expired client certificate's validity ended: far past any clock skew."""


@dataclass(frozen=True)
class CertFiles:
    cert: Path  # the certificate chain, leaf first
    key: Path


@dataclass
class Pki:
    """PEM files under `directory`: the servers' CA and certificate, and client certificates
    made on first use."""

    directory: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    other_ca: trustme.CA = field(default_factory=trustme.CA)  # trusted by no server
    _clients: dict[tuple[str, bool, bool], CertFiles] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ca_pem = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        self.other_ca_pem = self.directory / "other-ca.pem"
        self.other_ca.cert_pem.write_to_path(str(self.other_ca_pem))
        self.server = self._write("server", self.ca.issue_cert("127.0.0.1", "localhost"))

    def _write(self, name: str, leaf: trustme.LeafCert) -> CertFiles:
        files = CertFiles(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(files.key))
        return files

    def client(self, common_name: str, *, expired: bool = False, foreign: bool = False):
        """A client certificate with subject CN `common_name`, signed by the servers' CA (or
        by `other_ca` if `foreign`), valid now (or expired a day ago if `expired`)."""
        wanted = (common_name, expired, foreign)
        if wanted not in self._clients:
            dates = {}
            if expired:
                now = datetime.datetime.now(datetime.UTC)
                dates = {"not_before": now - 2 * EXPIRED_FOR, "not_after": now - EXPIRED_FOR}
            issuer = self.other_ca if foreign else self.ca
            leaf = issuer.issue_cert(f"{common_name}.client.test", common_name=common_name, **dates)
            name = f"client-{len(self._clients)}"
            self._clients[wanted] = self._write(name, leaf)
        return self._clients[wanted]

    def client_context(
        self, common_name: str | None = None, *, expired: bool = False, foreign: bool = False
    ) -> ssl.SSLContext:
        """A client context trusting the servers' CA, showing the client certificate of
        `common_name` (none if None)."""
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        if common_name is not None:
            files = self.client(common_name, expired=expired, foreign=foreign)
            context.load_cert_chain(files.cert, files.key)
        return context

    def server_args(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key))


@pytest.fixture(scope="session")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_wire(address: tuple[str, int], context: ssl.SSLContext, timeout: float = TIMEOUT) -> Wire:
    """A Wire over TLS: the handshake is done (raising ssl.SSLError or OSError if it fails)
    before this returns. A server that refuses our certificate after a TLS 1.3 handshake
    (the client's certificate comes last) shows it at the first read instead."""
    wire = Wire(address, timeout)
    try:
        wire.sock = context.wrap_socket(wire.sock, server_hostname=address[0])
    except BaseException:
        wire.close()
        raise
    return wire


def client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes a TLS client sends first, made without a connection."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = context.wrap_bio(incoming, outgoing, server_hostname=servers.HOST)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls_object.do_handshake()
    return outgoing.read()


@dataclass(frozen=True)
class TlsServer:
    server: servers.Server
    tls_port: int

    @property
    def plain(self) -> tuple[str, int]:
        return (servers.HOST, self.server.port)

    @property
    def tls(self) -> tuple[str, int]:
        return (servers.HOST, self.tls_port)

    def stop(self) -> None:
        self.server.stop()
        self.server.remove_workdir()


def start_tls_jobserver(pki: Pki, *args: str) -> TlsServer:
    """A jobserver (memory store) with TLS on a port of its own beside the plaintext one."""
    for attempt in range(MAX_START_ATTEMPTS):
        tls_port = servers.free_port()
        try:
            server = servers.start_jobserver(
                "--store", "memory", *pki.server_args(), "--tls-port", str(tls_port), *args
            )
        except servers.ServerStartError as error:
            if attempt == MAX_START_ATTEMPTS - 1 or "in use" not in str(error).lower():
                raise
            continue
        # No probe of the TLS port: the server binds it before it answers the readiness
        # ECHO, and a probe that connects and closes would be a failed handshake, the one
        # the rate-limited log names for the next HANDSHAKE_LOG_INTERVAL.
        return TlsServer(server, tls_port)
    raise AssertionError("unreachable")


def start_tls_only_jobserver(pki: Pki, *args: str) -> servers.Server:
    """A jobserver (memory store) serving TLS on its Gearman port, no plaintext port."""
    for attempt in range(MAX_START_ATTEMPTS):
        port = servers.free_port()
        workdir = Path(tempfile.mkdtemp(prefix=f"jobserver-tls-{port}-"))
        argv = servers.jobserver_argv(port, "--store", "memory", *pki.server_args(), *args)
        server = servers.Server("jobserver", argv, servers.HOST, port, workdir)
        context = pki.client_context()
        try:
            servers.wait_until(
                lambda: _echoes_over_tls(server, context),  # noqa: B023 - called here
                timeout=servers.START_TIMEOUT,
                what=f"an ECHO over TLS from {server}",
            )
            return server
        except (TimeoutError, servers.ServerStartError):
            server.stop()
            stderr = server.stderr_text()
            shutil.rmtree(workdir, ignore_errors=True)
            if attempt == MAX_START_ATTEMPTS - 1 or "in use" not in stderr.lower():
                raise servers.ServerStartError(f"{argv} did not start:\n{stderr}") from None
    raise AssertionError("unreachable")


def _echoes_over_tls(server: servers.Server, context: ssl.SSLContext) -> bool:
    if server.proc.poll() is not None:
        raise servers.ServerStartError(f"{server} exited with {server.proc.returncode}")
    try:
        with tls_wire((server.host, server.port), context, timeout=1.0) as wire:
            wire.echo(b"ready?")
            return True
    except OSError:  # ssl.SSLError and ConnectionError too
        return False


@pytest.fixture
def start_tls_server(tls_pki: Pki) -> Iterator:
    """`start_tls_server(*args)`: start_tls_jobserver with the session's certificates; every
    server started is stopped at teardown."""
    started: list[TlsServer] = []

    def factory(*args: str) -> TlsServer:
        server = start_tls_jobserver(tls_pki, *args)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def tls_connect() -> Iterator:
    """`tls_connect(address, context)` opens a tls_wire; every one is closed at teardown."""
    opened: list[Wire] = []

    def factory(address: tuple[str, int], context: ssl.SSLContext) -> Wire:
        wire = tls_wire(address, context)
        opened.append(wire)
        return wire

    yield factory
    for wire in opened:
        wire.close()
