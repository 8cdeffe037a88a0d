"""TLS for the SDKs' connections: which CA to trust, and the client certificate to show.

Both SDKs and the cluster commands take `tls=`: None (plain TCP, the default), a `TlsFiles`
naming PEM files, or an `ssl.SSLContext` of your own, used as it is. `client_context` turns
that into one context, built once per Client or Worker, so that a missing file or a key that
does not belong to its certificate is an error when the Client or Worker is made, naming the
file, rather than a failure on every connect.

The server's certificate is checked against the host of the server address as written
("10.0.0.1:4730" needs an IP address entry in the certificate, "jobs.example:4730" that
name): a context of your own with `check_hostname = False` turns that off.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from .errors import GearmanError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
"""TLS 1.0 and 1.1 are deprecated (RFC 8996); 1.2 is what every maintained peer speaks."""

MAX_PEM_FILE_SIZE = 1 << 20
"""Bytes read from one PEM file to check it before OpenSSL loads it: a CA bundle of every
public root is about 220 KiB, so a file past 1 MiB is not a certificate file (a log, a
device)."""

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_TRUSTED_CERTIFICATE = b"-----BEGIN TRUSTED CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"  # "BEGIN PRIVATE KEY", "BEGIN RSA PRIVATE KEY", "EC ..."
_ENCRYPTED_KEY = b"ENCRYPTED"  # "BEGIN ENCRYPTED PRIVATE KEY", or "Proc-Type: 4,ENCRYPTED"


class TlsConfigError(GearmanError, ValueError):
    """A TLS file cannot be used: missing, unreadable, not PEM, or a key that does not match
    its certificate. The message names the file and the cause."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS connections to the servers.

    `ca`: the certificates that sign the servers' certificates (None: the system's CAs).
    `cert` and `key`: this client's certificate and its private key, for servers that require
    client certificates (mutual TLS); `key` may be left out when `cert` holds both.
    Passphrase-protected keys are not supported: a worker or client must start unattended.

    Example::

        from client_sdk import Client, TlsFiles

        tls = TlsFiles(ca="ca.pem", cert="client.pem", key="client.key")
        async with Client(["jobs.example:4730"], tls=tls) as client:
            await client.submit("resize", {"path": "a.png"})
    """

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None

    def __post_init__(self) -> None:
        if self.key is not None and self.cert is None:
            raise TlsConfigError(f"TLS key {self.key}: a client key needs its certificate (cert)")


TlsSettings = ssl.SSLContext | TlsFiles | None
"""What `tls=` accepts."""


def client_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The context connections to the servers use, or None for plain TCP.

    A TlsFiles becomes a context that verifies the server's certificate and host name
    against `ca` (or the system's CAs), speaks TLS 1.2 or later and shows `cert` when given;
    a context passed in is returned unchanged. Raises TlsConfigError naming the file and
    what is wrong with it.

    Example::

        context = client_context(TlsFiles(ca="ca.pem"))
        assert context is not None and context.check_hostname
    """
    if tls is None or isinstance(tls, ssl.SSLContext):
        return tls
    if not isinstance(tls, TlsFiles):
        raise TypeError(f"tls must be an ssl.SSLContext or a TlsFiles, not {type(tls).__name__}")
    context = _context_trusting(tls.ca)
    context.minimum_version = MINIMUM_VERSION
    if tls.cert is not None:
        load_certificate(context, tls.cert, tls.key)
    return context


def _context_trusting(ca: str | Path | None) -> ssl.SSLContext:
    """A client context trusting the certificates in `ca`, or the system's CAs."""
    if ca is None:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    what = check_ca_file(ca)
    try:
        # The path, not the bytes read: OpenSSL skips the text between certificates, and
        # bundles such as certifi's have comments in UTF-8, which cadata= refuses.
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except ssl.SSLError as error:
        _refuse(what, "a certificate in it is not valid PEM", error)
    except OSError as error:  # replaced or removed since it was read
        raise TlsConfigError(f"{what}: {error.strerror or error}") from None


def check_ca_file(ca: str | Path) -> str:
    """Raise TlsConfigError unless `ca` is a readable file with a PEM certificate in it;
    returns how messages name it. (The server's --tls-ca is checked the same way.)"""
    what = f"TLS CA file {ca}"
    data = _read_pem(ca, what)
    if _CERTIFICATE not in data and _TRUSTED_CERTIFICATE not in data:
        raise TlsConfigError(f"{what}: no PEM certificate in it")
    return what


def load_certificate(context: ssl.SSLContext, cert: str | Path, key: str | Path | None) -> None:
    """Load a certificate (chain) and its key into `context`, or raise TlsConfigError naming
    the file at fault. Used for SDK client certificates and the server's --tls-cert."""
    cert_what = f"TLS certificate {cert}"
    cert_data = _read_pem(cert, cert_what)
    if _CERTIFICATE not in cert_data:
        raise TlsConfigError(f"{cert_what}: no PEM certificate in it")
    if key is None:
        key_what, key_data = cert_what, cert_data
        if _PRIVATE_KEY not in cert_data:
            raise TlsConfigError(
                f"{cert_what}: no private key in it; give the key file too (key=, --tls-key)"
            )
    else:
        key_what = f"TLS key {key}"
        key_data = _read_pem(key, key_what)
        if _PRIVATE_KEY not in key_data:
            raise TlsConfigError(f"{key_what}: no PEM private key in it")
    if _ENCRYPTED_KEY in key_data:
        raise TlsConfigError(f"{key_what}: the key is passphrase-protected, which is not supported")

    def no_passphrase() -> NoReturn:
        # OpenSSL would otherwise prompt on the terminal: a key needing one is refused above,
        # this only guards a format the check did not know.
        raise TlsConfigError(f"{key_what}: the key is passphrase-protected, which is not supported")

    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except OSError as error:  # ssl.SSLError is an OSError too
        if isinstance(error, ssl.SSLError) and error.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                f"{key_what}: the key does not belong to the certificate {cert}"
            ) from None
        if isinstance(error, ssl.SSLError):
            _refuse(cert_what, f"it or the key {key or cert} is not valid PEM", error)
        raise TlsConfigError(f"{cert_what}: {error.strerror or error}") from None


def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PEM_FILE_SIZE + 1)
    except OSError as error:
        raise TlsConfigError(f"{what}: {error.strerror or error}") from None
    if len(data) > MAX_PEM_FILE_SIZE:
        raise TlsConfigError(f"{what}: over {MAX_PEM_FILE_SIZE >> 20} MiB, not a PEM file")
    return data


def _refuse(what: str, problem: str, error: ssl.SSLError) -> NoReturn:
    raise TlsConfigError(f"{what}: {problem} ({openssl_reason(error)})") from None


def openssl_reason(error: ssl.SSLError) -> str:
    """OpenSSL's reason in words: "[SSL: WRONG_VERSION_NUMBER] wrong version number
    (_ssl.c:1006)" is "wrong version number"; a failed certificate check says why.

    >>> openssl_reason(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    'wrong version number'
    """
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    reason = getattr(error, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    text = str(error.args[1] if len(error.args) > 1 else error)
    text = text.split("] ", 1)[-1]
    return text.split(" (_ssl.c:", 1)[0] or "TLS error"


_PLAIN_WORDS = {
    # The peer answered the ClientHello with bytes that are not TLS: a plaintext port.
    "WRONG_VERSION_NUMBER": "the server does not speak TLS on this port",
    "HTTP_REQUEST": "the server does not speak TLS on this port",
    "PACKET_LENGTH_TOO_LONG": "the server does not speak TLS on this port",
    "RECORD_LAYER_FAILURE": "the server does not speak TLS on this port",
    # Alerts the server sends about our certificate (mutual TLS).
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the handshake (a server that "
    "requires client certificates does so when none is given)",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust our client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused our client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server refused our client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says our client certificate has expired",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version both sides accept (1.2 or later here)",
    "UNSUPPORTED_PROTOCOL": "no TLS version both sides accept (1.2 or later here)",
}


def tls_failure(error: ssl.SSLError) -> str:
    """Why a TLS connection failed, in plain words with OpenSSL's own in brackets.

    >>> error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    >>> error.reason = "WRONG_VERSION_NUMBER"
    >>> tls_failure(error)
    'the server does not speak TLS on this port (wrong version number)'
    """
    reason = openssl_reason(error)
    words = _PLAIN_WORDS.get(str(getattr(error, "reason", "")))
    return f"{words} ({reason})" if words else reason
