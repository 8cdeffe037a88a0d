"""The TLS listener's side: its SSL context, the handshake, and a peer's identity.

`--tls-cert/--tls-key` serve TLS (the stdlib's ssl through trio.SSLStream); `--tls-ca` also
requires a client certificate signed by that CA (mTLS), whose subject CN is the connection's
identity for the ACL. gearmand's --ssl never verifies its peers; here a peer without a valid
certificate never gets past the handshake.
"""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path

import trio

log = logging.getLogger("jobserver")

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new TLS connection has to finish its handshake. A real client needs two round
trips (milliseconds); the bound frees the slot and memory of a peer that opened a connection
and stalls, and of a plaintext peer that waits for the server to speak first."""

HANDSHAKE_LOG_INTERVAL = 10.0
"""Seconds between log lines about failed handshakes: a port scanner or a fleet of
misconfigured clients is one line per interval with a count and the latest cause."""


class TlsConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file and why."""


def server_context(cert: Path, key: Path | None, ca: Path | None) -> ssl.SSLContext:
    """The listener's context: the stdlib's defaults for a server (modern ciphers, no
    compression, no renegotiation), TLS 1.2 at least, and with `ca` a required client
    certificate verified against it. Raises TlsConfigError naming the file at fault."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as error:
        missing = error.filename or (cert if not cert.exists() else key)
        raise TlsConfigError(f"TLS file {missing}: no such file") from None
    except PermissionError as error:
        raise TlsConfigError(f"TLS file {error.filename}: permission denied") from None
    except ssl.SSLError as error:
        raise TlsConfigError(_chain_problem(cert, key, error)) from None
    except OSError as error:
        raise TlsConfigError(f"TLS certificate {cert}: {error.strerror or error}") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except FileNotFoundError:
            raise TlsConfigError(f"TLS CA file {ca}: no such file") from None
        except (ssl.SSLError, OSError) as error:
            raise TlsConfigError(f"TLS CA file {ca}: not a PEM CA certificate ({error})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _chain_problem(cert: Path, key: Path | None, error: ssl.SSLError) -> str:
    reason = (error.reason or "").upper()
    if "KEY_VALUES_MISMATCH" in reason:
        return f"TLS key {key} does not belong to the certificate {cert}"
    if key is not None and reason in ("PEM_LIB", "") and not _has_pem(cert, "CERTIFICATE"):
        return f"TLS certificate {cert}: not a PEM certificate"
    if key is not None and reason in ("PEM_LIB", ""):
        return f"TLS key {key}: not a PEM private key (or it is encrypted)"
    if reason in ("PEM_LIB", ""):
        return f"TLS certificate {cert}: not a PEM certificate with its private key"
    return f"TLS certificate {cert}: {error.reason or error}"


def _has_pem(path: Path, label: str) -> bool:
    try:
        return f"-----BEGIN {label}-----".encode() in path.read_bytes()
    except OSError:
        return False


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

    def note(self, address: str, cause: str) -> None:
        self.total += 1
        self._unlogged += 1
        now = time.monotonic()
        if now >= self._next_log:
            log.warning(
                "TLS handshake failed %d time(s) in the last %g s; the latest from %s: %s",
                self._unlogged,
                HANDSHAKE_LOG_INTERVAL,
                address,
                cause,
            )
            self._unlogged = 0
            self._next_log = now + HANDSHAKE_LOG_INTERVAL


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
            return None, _cause(error.__cause__)
        except trio.ClosedResourceError:
            return None, "closed"
        return tls, ""
    return None, f"no handshake within {HANDSHAKE_TIMEOUT:g} s"


def _cause(error: BaseException | None) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_MESSAGE"):
            return f"not TLS ({reason})"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate"
        return reason
    if error is None:
        return "connection closed during the handshake"
    return str(error) or type(error).__name__
