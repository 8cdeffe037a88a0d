"""One TCP connection from an SDK to a job server, speaking packets through jobserver.protocol.

Both SDKs use this and nothing else to talk to servers: connect with a timeout, TCP keepalive,
send encoded requests (several tasks may send at once), receive decoded replies. It is built on
anyio, so both SDKs run under trio and under asyncio alike (the server itself stays on trio).
`last_received` tells how long the server has been silent, for hung-server detection.
With an `ssl.SSLContext` (tls.py) the connection is TLS; its failures are ConnectionLost like
any other, so failover and the health log treat a server whose certificate is refused as an
unreachable one, with the TLS cause in the message.

Replies are binary packets, except while the owner waits for the answer to an admin text
command it sent on the same connection (`accept_text`): jobserver and gearmand both answer
text commands in order with the packets around them, as text lines.
"""

from __future__ import annotations

import os
import ssl
from collections import deque

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from ..protocol import RES, AdminLine, Decoder, Packet, ProtocolError, encode_request
from ..tcp import enable_keepalive
from .addresses import ServerAddress
from .errors import GearmanError, ProtocolViolation
from .tls import tls_failure

CONNECT_TIMEOUT = 5.0
"""A server that has not accepted within this (TLS handshake included) is treated as down and
the next one is tried."""

RECEIVE_SIZE = 65536

KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
"""A server that vanished without FIN (power loss, partition) is noticed in about a minute,
instead of the kernel's default of more than two hours."""


class ConnectionLost(GearmanError):
    """The connection to a server closed or broke."""


class ServerConnection:
    def __init__(
        self, stream: anyio.abc.ByteStream, address: ServerAddress, *, tls: bool = False
    ) -> None:
        self.address = address
        self.tls = tls
        self._stream = stream
        self._received_any = False
        self._decoder = Decoder(accept_admin=False)
        self._pending: deque[Packet | AdminLine] = deque()
        self._send_lock = anyio.Lock()  # FIFO: writers go out in the order they asked
        self.closed = False
        self.last_received = anyio.current_time()
        """When bytes last came from the server (the event loop's clock)."""

    @classmethod
    async def open(
        cls,
        address: ServerAddress,
        *,
        timeout: float = CONNECT_TIMEOUT,
        tls: ssl.SSLContext | None = None,
    ) -> ServerConnection:
        """Connect, with TLS when given a context (tls.client_context), or raise ConnectionLost
        saying why (refused, timed out, unresolvable, the TLS handshake failed). `timeout`
        bounds the connect and the handshake together.

        Example::

            connection = await ServerConnection.open(
                parse_address("jobs.example:4730"), tls=client_context(TlsFiles(ca="ca.pem"))
            )
        """
        handshaking = False
        try:
            with anyio.fail_after(timeout):
                tcp = await anyio.connect_tcp(address.host, address.port)
                enable_keepalive(
                    tcp.extra(anyio.abc.SocketAttribute.raw_socket),
                    idle=KEEPALIVE_IDLE,
                    interval=KEEPALIVE_INTERVAL,
                    count=KEEPALIVE_COUNT,
                )
                if tls is None:
                    return cls(tcp, address)
                handshaking = True
                return cls(await _tls_handshake(tcp, address, tls), address, tls=True)
        except TimeoutError:
            if handshaking:
                raise ConnectionLost(
                    f"{address}: TLS handshake failed: no answer within {timeout:g} s"
                ) from None
            raise ConnectionLost(f"{address}: no answer within {timeout:g} s") from None
        except OSError as error:
            raise ConnectionLost(f"{address}: {_connect_failure(error)}") from None

    @property
    def accept_text(self) -> bool:
        """Whether admin text lines may come now. Off by default, so that a stray byte is a
        protocol error at once; the owner turns it on before sending a text command and off
        once every answer it waits for has come."""
        return self._decoder.accept_admin

    @accept_text.setter
    def accept_text(self, value: bool) -> None:
        self._decoder.accept_admin = value

    async def send(self, packet_type: int, *args: bytes) -> None:
        await self.send_bytes(encode_request(packet_type, *args))

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLost(f"{self.address}: connection closed")
        try:
            async with self._send_lock:
                await self._stream.send(data)
        except anyio.EndOfStream:
            # Only a TLS stream raises this on send: the TLS layer saw the server's end of the
            # connection (while reading, or on a write after the reader saw it).
            raise self._ended() from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
            self.closed = True
            raise ConnectionLost(f"{self.address}: {self._broken(error)}") from None

    async def receive(self) -> Packet | AdminLine:
        """The next packet from the server, or text line while `accept_text` is on;
        ConnectionLost when the connection ends."""
        while not self._pending:
            try:
                data = await self._stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                raise self._ended() from None
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
                self.closed = True
                raise ConnectionLost(f"{self.address}: {self._broken(error)}") from None
            self.last_received = anyio.current_time()
            self._received_any = True
            try:
                events = self._decoder.feed(data)
            except ProtocolError as error:
                self.closed = True
                raise ProtocolViolation(f"{self.address}: {error}") from None
            for event in events:
                if isinstance(event, AdminLine) or (
                    isinstance(event, Packet) and event.magic == RES
                ):
                    self._pending.append(event)
                else:
                    self.closed = True
                    raise ProtocolViolation(f"{self.address}: unexpected {event!r}")
        return self._pending.popleft()

    async def aclose(self) -> None:
        self.closed = True
        await anyio.aclose_forcefully(self._stream)

    def _ended(self) -> ConnectionLost:
        self.closed = True
        reason = "the server closed the connection" + self._refused_hint()
        return ConnectionLost(f"{self.address}: {reason}")

    def _broken(self, error: BaseException) -> str:
        """Why a send or receive failed. anyio's TLS stream reports a broken transport as a
        BrokenResourceError whose cause is the OSError, and TLS alerts as ssl.SSLError."""
        cause = error.__cause__ if isinstance(error, anyio.BrokenResourceError) else error
        if isinstance(cause, ssl.SSLError):
            return f"TLS error: {tls_failure(cause)}"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror + self._refused_hint()
        return (str(cause or error) or "connection broken") + self._refused_hint()

    def _refused_hint(self) -> str:
        """Gearman servers never speak first, so a TLS connection that ends before its first
        answer was most likely ended by the server's handshake checks: in TLS 1.3 the client's
        side of the handshake is done before the server verifies the client's certificate,
        and a server that refuses it may close without sending its alert."""
        if self.tls and not self._received_any:
            return " (before any answer: the server may have refused our TLS client certificate)"
        return ""


async def _tls_handshake(
    tcp: anyio.abc.SocketStream, address: ServerAddress, context: ssl.SSLContext
) -> TLSStream:
    """The TLS stream over `tcp`, the server's certificate checked against `address.host`
    (unless the context turns check_hostname off); ConnectionLost naming the cause when the
    handshake fails, with `tcp` closed."""
    try:
        return await TLSStream.wrap(
            tcp,
            server_side=False,
            hostname=address.host,
            ssl_context=context,
            # gearmand and other Gearman peers close without TLS's close_notify: that is an
            # ordinary end of the connection, not an attack on it, and not an error.
            standard_compatible=False,
        )
    except BaseException as error:
        await anyio.aclose_forcefully(tcp)
        if isinstance(error, ssl.SSLError):
            cause = tls_failure(error)
        elif isinstance(error, anyio.EndOfStream) or isinstance(
            error.__cause__, ConnectionResetError
        ):
            # What a plaintext Gearman server does with a ClientHello (not a packet), and what
            # a server refusing our certificate in TLS 1.2 does when it sends no alert: a
            # reset when it closes before reading all we sent.
            how = "closed" if isinstance(error, anyio.EndOfStream) else "reset"
            cause = (
                f"the server {how} the connection (is this port serving TLS? does the server "
                "require a client certificate?)"
            )
        elif isinstance(error, anyio.BrokenResourceError):
            broken = error.__cause__
            cause = (
                broken.strerror
                if isinstance(broken, OSError) and broken.strerror
                else "the connection broke"
            )
        else:
            raise
        raise ConnectionLost(f"{address}: TLS handshake failed: {cause}") from None


def _connect_failure(error: OSError) -> str:
    """Why a connect failed, as the system says it ("Connection refused"): anyio reports a
    failure over all of a host's addresses as "All connection attempts failed", with the last
    attempt's own error as its cause."""
    cause = error.__cause__
    if not error.errno and isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    return error.strerror or str(error)
