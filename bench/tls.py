"""The jobserver-tls column (issue 15): the run's certificates, and the load generator's side.

`RunCertificates` makes a CA, a server certificate for 127.0.0.1 and a client certificate
(CN bench-client) with trustme, in a temporary directory removed at the end of the run. The
server requires client certificates signed by that CA (`--tls-ca`), so every connection of the
column does the mutual-TLS handshake of a deployment with client certificates.

`ClientTls` names the client's PEM files; the load processes get it in their spec (as a dict)
and wrap each connection with `jobserver.sdk.tls.client_context`, the context the SDKs build
(server certificate and host name verified, TLS 1.2 at least, our certificate shown): the load
generator pays for TLS what a real client would.
"""

from __future__ import annotations

import functools
import shutil
import socket
import ssl
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from jobserver.sdk.tls import TlsFiles, client_context

CLIENT_NAME = "bench-client"
"""The client certificate's subject CN: the identity the server sees (no --acl is given, so
it may do everything)."""


class CertificatesUnavailable(RuntimeError):
    """trustme (which brings `cryptography`) is not installed: the column cannot run."""


@dataclass(frozen=True)
class ClientTls:
    """A client's PEM files: the CA that signed the server's certificate, and ours."""

    ca: str
    cert: str
    key: str

    def as_spec(self) -> dict[str, str]:
        """For a load process's JSON spec; `ClientTls(**that)` reads it back."""
        return asdict(self)

    def wrap(self, sock: socket.socket, host: str) -> ssl.SSLSocket:
        """`sock` with the handshake done (within the socket's timeout), checking that the
        server's certificate names `host`."""
        return context_for(self).wrap_socket(sock, server_hostname=host)


@functools.cache
def context_for(files: ClientTls) -> ssl.SSLContext:
    """One context per process and files: building it reads and checks three PEM files, and
    the `idle` role opens thousands of connections with it."""
    context = client_context(TlsFiles(ca=files.ca, cert=files.cert, key=files.key))
    assert context is not None  # a TlsFiles always gives a context
    return context


class RunCertificates:
    """The certificates of one bench run, in a temporary directory; `remove()` at the end."""

    def __init__(self, host: str) -> None:
        try:
            import trustme
        except ImportError:
            raise CertificatesUnavailable(
                "trustme is not installed (pip install trustme)"
            ) from None
        self.directory = Path(tempfile.mkdtemp(prefix="bench-tls-"))
        # trustme's default keys: ECDSA P-256, what a new deployment would pick. The key type
        # only weighs on the handshakes, which every scenario does before its clock starts.
        ca = trustme.CA()
        server = ca.issue_cert(host)
        client = ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)
        self.ca = self._write("ca.pem", ca.cert_pem.bytes())
        self.server_cert = self._write("server.pem", server.cert_chain_pems[0].bytes())
        self.server_key = self._write("server.key", server.private_key_pem.bytes())
        self.client = ClientTls(
            ca=str(self.ca),
            cert=str(self._write("client.pem", client.cert_chain_pems[0].bytes())),
            key=str(self._write("client.key", client.private_key_pem.bytes())),
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        return path

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
