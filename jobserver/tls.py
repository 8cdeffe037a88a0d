"""The TLS listener's side: its SSL context, the handshake, and a peer's identity.

`--tls-cert/--tls-key` serve TLS (the stdlib's ssl through trio.SSLStream); `--tls-ca` also
requires a client certificate signed by that CA (mTLS), whose subject CN is the connection's
identity for the ACL. gearmand's --ssl never verifies its peers; here a peer without a valid
certificate never gets past the handshake.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from pathlib import Path

import trio

from .sdk.tls import (
    MINIMUM_VERSION,
    TlsConfigError,
    check_ca_file,
    load_certificate,
    openssl_reason,
)

log = logging.getLogger("jobserver")

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new TLS connection has to finish its handshake. A real client needs two round
trips (milliseconds); the bound frees the slot and memory of a peer that opened a connection
and stalls, and of a plaintext peer that waits for the server to speak first."""

HANDSHAKE_LOG_INTERVAL = 10.0
"""Seconds between log lines about failed handshakes: a port scanner or a fleet of
misconfigured clients is one line per interval with a count and the latest cause."""

ALERT_SEND_TIMEOUT = 1.0
"""Seconds to hand a failed handshake's alert (a few dozen bytes) to the kernel: it fits the
socket buffer at once unless the peer is gone, and then nothing is lost by giving up."""

__all__ = ["TlsConfigError", "handshake", "peer_identity", "server_context"]


def server_context(cert: Path, key: Path | None, ca: Path | None) -> ssl.SSLContext:
    """The listener's context: the stdlib's defaults for a server (modern ciphers, no
    compression, no renegotiation), TLS 1.2 at least, and with `ca` a required client
    certificate verified against it. Raises TlsConfigError naming the file at fault, with the
    same checks and wording as the SDKs' client certificates (sdk/tls.py)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    load_certificate(context, cert, key)
    if ca is not None:
        what = check_ca_file(ca)
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as error:
            raise TlsConfigError(f"{what}: not valid PEM ({openssl_reason(error)})") from None
        except OSError as error:  # replaced or removed since it was checked
            raise TlsConfigError(f"{what}: {error.strerror or error}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_identity(stream: trio.SSLStream[trio.SocketStream]) -> str | None:
    """The subject CN of the peer's verified certificate, or None (no client certificate
    asked for or given)."""
    certificate = stream.getpeercert()
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class HandshakeFailures:
    """Counts failed handshakes and logs them at most once per HANDSHAKE_LOG_INTERVAL."""

    def __init__(self) -> None:
        self.total = 0
        self._unlogged = 0
        self._next_log = -float("inf")
        self._latest = ("", "")

    def note(self, address: str, cause: str) -> None:
        self.total += 1
        self._unlogged += 1
        self._latest = (address, cause)
        if time.monotonic() >= self._next_log:
            self.report()

    def report(self) -> None:
        """Log the failures not logged yet, if any: at once for the first of a quiet spell,
        and from the server's timer for the rest of a burst (`report_pending`)."""
        if not self._unlogged:
            return
        address, cause = self._latest
        log.warning(
            "TLS handshake failed %d time(s) in the last %g s; the latest from %s: %s",
            self._unlogged,
            HANDSHAKE_LOG_INTERVAL,
            address,
            cause,
        )
        self._unlogged = 0
        self._next_log = time.monotonic() + HANDSHAKE_LOG_INTERVAL

    async def report_pending(self) -> None:
        """Runs beside a TLS listener: the tail of a burst is logged within an interval,
        even if no failure comes after it."""
        while True:
            await trio.sleep(HANDSHAKE_LOG_INTERVAL)
            if time.monotonic() >= self._next_log:
                self.report()


async def handshake(
    stream: trio.SocketStream, context: ssl.SSLContext
) -> tuple[trio.SSLStream[trio.SocketStream] | None, str]:
    """Run the server side of the handshake within HANDSHAKE_TIMEOUT: (the TLS stream, "") or
    (None, why it failed). A plaintext peer fails at its first bytes, not at the timeout."""
    tls = trio.SSLStream(stream, context, server_side=True)
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as error:
            await _send_alert(tls, stream)
            return None, _cause(error.__cause__)
        except trio.ClosedResourceError:
            return None, "closed"
        return tls, ""
    return None, f"no handshake within {HANDSHAKE_TIMEOUT:g} s"


async def _send_alert(tls: trio.SSLStream[trio.SocketStream], stream: trio.SocketStream) -> None:
    """Send the TLS alert OpenSSL wrote on failing the handshake ("certificate required",
    "unknown CA", ...), which trio.SSLStream leaves unsent: with it the client's error names
    the cause instead of "connection closed". trio keeps that buffer in a private attribute;
    if a trio release moves it, the peer just gets the close without the alert
    (tests/test_server_tls.py notices)."""
    outgoing = getattr(tls, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    with (
        trio.move_on_after(ALERT_SEND_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_all(outgoing.read())


def _cause(error: BaseException | None) -> str:
    if error is None or isinstance(error, ssl.SSLEOFError):
        # trio chains every close mid-handshake to SSLEOFError (UNEXPECTED_EOF_WHILE_READING):
        # TCP health checks and port scanners, mostly.
        return "connection closed during the handshake"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_MESSAGE"):
            return f"not TLS ({reason})"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate"
        return reason
    return str(error) or type(error).__name__
