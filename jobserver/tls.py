"""The TLS listener's side: its SSL context, the handshake, a peer's identity, and the
session that encrypts and decrypts a connection's bytes.

`--tls-cert/--tls-key` serve TLS (the stdlib's ssl, on memory buffers); `--tls-ca` also
requires a client certificate signed by that CA (mTLS), whose subject CN is the connection's
identity for the ACL. gearmand's --ssl never verifies its peers; here a peer without a valid
certificate never gets past the handshake.
"""

from __future__ import annotations

import collections
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

MAX_HANDSHAKE_CAUSES = 8
"""Distinct causes a log line about failed handshakes counts one by one (the rest as "other
causes"): enough for every way a handshake fails (not TLS, no certificate, unknown CA,
expired, wrong version, ...), while a cause text naming varying details cannot grow the line
or the counter without bound."""

HANDSHAKE_RECEIVE_SIZE = 16384
"""Bytes read per step of the handshake: a ClientHello or a client's certificate chain is a
few KiB; a larger flight just takes two reads."""

DECRYPT_CHUNK = 65536
"""Plaintext bytes taken from OpenSSL per call while decrypting a read: the size of a read
(RECEIVE_SIZE), so one call nearly always empties it."""

CLOSED_DURING_HANDSHAKE = "connection closed during the handshake"
"""TCP health checks and port scanners, mostly."""

ALERT_SEND_TIMEOUT = 1.0
"""Seconds to hand a failed handshake's alert (a few dozen bytes) to the kernel: it fits the
socket buffer at once unless the peer is gone, and then nothing is lost by giving up."""

__all__ = ["TlsConfigError", "TlsSession", "handshake", "server_context"]


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
    # TLS 1.2 renegotiation would make OpenSSL want to read while we write a reply, which
    # the connection's one-write path does not do; no Gearman client renegotiates.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


OTHER_CAUSES = "other causes"
"""How a log line counts the failures past MAX_HANDSHAKE_CAUSES distinct causes."""


class HandshakeFailures:
    """Counts failed handshakes and logs them at most once per HANDSHAKE_LOG_INTERVAL, with
    how many failed for each cause (each failure is logged at DEBUG as it happens)."""

    def __init__(self) -> None:
        self.total = 0
        self._unlogged: collections.Counter[str] = collections.Counter()  # by cause
        self._next_log = -float("inf")
        self._latest = ("", "")

    def note(self, address: str, cause: str) -> None:
        self.total += 1
        log.debug("TLS handshake from %s failed: %s", address, cause)
        if cause in self._unlogged or len(self._unlogged) < MAX_HANDSHAKE_CAUSES:
            self._unlogged[cause] += 1
        else:
            self._unlogged[OTHER_CAUSES] += 1
        self._latest = (address, cause)
        if time.monotonic() >= self._next_log:
            self.report()

    def report(self) -> None:
        """Log the failures not logged yet, if any: at once for the first of a quiet spell,
        and from the server's timer for the rest of a burst (`report_pending`)."""
        if not self._unlogged:
            return
        address, cause = self._latest
        total = self._unlogged.total()
        by_cause = ""
        if len(self._unlogged) > 1:
            other = self._unlogged.pop(OTHER_CAUSES, 0)
            counted = [f"{n} {c}" for c, n in self._unlogged.most_common()]
            counts = "; ".join(counted + ([f"{other} {OTHER_CAUSES}"] if other else []))
            by_cause = f" ({counts})"
        log.warning(
            "TLS handshake failed %d time(s) in the last %g s%s; the latest from %s: %s",
            total,
            HANDSHAKE_LOG_INTERVAL,
            by_cause,
            address,
            cause,
        )
        self._unlogged.clear()
        self._next_log = time.monotonic() + HANDSHAKE_LOG_INTERVAL

    async def report_pending(self) -> None:
        """Runs beside a TLS listener: the tail of a burst is logged within an interval,
        even if no failure comes after it."""
        while True:
            await trio.sleep(HANDSHAKE_LOG_INTERVAL)
            if time.monotonic() >= self._next_log:
                self.report()


class TlsSession:
    """One connection's TLS after its handshake, without I/O: OpenSSL between two memory
    buffers. The connection (connection.py) moves bytes between them and the socket itself,
    with the same single non-blocking read and write per batch as a plaintext connection, so
    TLS costs the encryption and nothing more per reply: a trio.SSLStream instead needed a
    writer task, its locks and a task switch for every reply (foreground jobs at 0.52x of
    plaintext with it, bench/RESULTS.md "TLS")."""

    __slots__ = ("_incoming", "_outgoing", "_tls", "identity")

    def __init__(self, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self.identity = _common_name(tls.getpeercert())

    def encrypt(self, data: bytes | bytearray) -> bytes:
        """The records carrying `data`, ready for the socket."""
        if data:
            self._tls.write(data)  # a memory BIO takes all of it: no partial writes
        return self._outgoing.read()

    def decrypt(self, data: bytes) -> tuple[bytes, bool]:
        """(the plaintext that `data` completes, whether the peer sent close_notify). Raises
        ssl.SSLError (an OSError) for a corrupt or forged record: the connection is dropped.
        What OpenSSL has to send meanwhile (a TLS 1.3 KeyUpdate answer) waits in `encrypt`'s
        next result; `encrypt(b"")` collects it."""
        if data:
            self._incoming.write(data)
        chunks = []
        try:
            while True:
                chunk = self._tls.read(DECRYPT_CHUNK)
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            return b"".join(chunks), False
        except ssl.SSLZeroReturnError:
            return b"".join(chunks), True

    def close_notify(self) -> bytes:
        """The close_notify alert to send before closing, so the peer knows the stream is
        complete (not cut)."""
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()  # writes close_notify; wants the peer's answer, not waited for
        return self._outgoing.read()


def _common_name(certificate: dict | None) -> str | None:
    """The subject CN of the peer's verified certificate, or None (no client certificate
    asked for or given)."""
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


async def handshake(
    stream: trio.abc.Stream, context: ssl.SSLContext
) -> tuple[TlsSession | None, str]:
    """Run the server side of the handshake within HANDSHAKE_TIMEOUT: (the session, "") or
    (None, why it failed). A plaintext peer fails at its first bytes, not at the timeout; a
    refused peer gets OpenSSL's alert (certificate required, unknown CA, ...) so that its
    error names the cause."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                if outgoing.pending:
                    await stream.send_all(outgoing.read())
                data = await stream.receive_some(HANDSHAKE_RECEIVE_SIZE)
                if not data:
                    return None, CLOSED_DURING_HANDSHAKE
                incoming.write(data)
            if outgoing.pending:  # the server's Finished, TLS 1.3 session tickets
                await stream.send_all(outgoing.read())
        except ssl.SSLError as error:
            await _send_alert(stream, outgoing)
            return None, _cause(error)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None, CLOSED_DURING_HANDSHAKE  # reset by the peer
        return TlsSession(tls, incoming, outgoing), ""
    return None, f"no handshake within {HANDSHAKE_TIMEOUT:g} s"


async def _send_alert(stream: trio.abc.Stream, outgoing: ssl.MemoryBIO) -> None:
    """Best effort: the alert OpenSSL wrote on failing the handshake."""
    if not outgoing.pending:
        return
    with (
        trio.move_on_after(ALERT_SEND_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_all(outgoing.read())


def _cause(error: ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLEOFError):
        return CLOSED_DURING_HANDSHAKE
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {error.verify_message}"
    reason = error.reason or str(error)
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_MESSAGE"):
        return f"not TLS ({reason})"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate"
    return reason
