"""One TCP connection from an SDK to a job server, speaking packets through jobserver.protocol.

Both SDKs use this and nothing else to talk to servers: connect with a timeout, TCP keepalive,
send encoded requests (several tasks may send at once), receive decoded replies. It is built on
anyio, so both SDKs run under trio and under asyncio alike (the server itself stays on trio).
`last_received` tells how long the server has been silent, for hung-server detection.

Replies are binary packets, except while the owner waits for the answer to an admin text
command it sent on the same connection (`accept_text`): jobserver and gearmand both answer
text commands in order with the packets around them, as text lines.
"""

from __future__ import annotations

import os
from collections import deque

import anyio
import anyio.abc

from ..protocol import RES, AdminLine, Decoder, Packet, ProtocolError, encode_request
from ..tcp import enable_keepalive
from .addresses import ServerAddress
from .errors import GearmanError, ProtocolViolation

CONNECT_TIMEOUT = 5.0
"""A server that has not accepted within this is treated as down and the next one is tried."""

RECEIVE_SIZE = 65536

KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
"""A server that vanished without FIN (power loss, partition) is noticed in about a minute,
instead of the kernel's default of more than two hours."""


class ConnectionLost(GearmanError):
    """The connection to a server closed or broke."""


class ServerConnection:
    def __init__(self, stream: anyio.abc.SocketStream, address: ServerAddress) -> None:
        self.address = address
        self._stream = stream
        self._decoder = Decoder(accept_admin=False)
        self._pending: deque[Packet | AdminLine] = deque()
        self._send_lock = anyio.Lock()  # FIFO: writers go out in the order they asked
        self.closed = False
        self.last_received = anyio.current_time()
        """When bytes last came from the server (the event loop's clock)."""

    @classmethod
    async def open(
        cls, address: ServerAddress, *, timeout: float = CONNECT_TIMEOUT
    ) -> ServerConnection:
        """Connect, or raise ConnectionLost saying why (refused, timed out, unresolvable)."""
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(address.host, address.port)
        except TimeoutError:
            raise ConnectionLost(f"{address}: no answer within {timeout:g} s") from None
        except OSError as error:
            raise ConnectionLost(f"{address}: {_connect_failure(error)}") from None
        enable_keepalive(
            stream.extra(anyio.abc.SocketAttribute.raw_socket),
            idle=KEEPALIVE_IDLE,
            interval=KEEPALIVE_INTERVAL,
            count=KEEPALIVE_COUNT,
        )
        return cls(stream, address)

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
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
            self.closed = True
            raise ConnectionLost(f"{self.address}: {error or 'connection broken'}") from None

    async def receive(self) -> Packet | AdminLine:
        """The next packet from the server, or text line while `accept_text` is on;
        ConnectionLost when the connection ends."""
        while not self._pending:
            try:
                data = await self._stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                self.closed = True
                raise ConnectionLost(f"{self.address}: the server closed the connection") from None
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
                self.closed = True
                raise ConnectionLost(f"{self.address}: {error or 'connection broken'}") from None
            self.last_received = anyio.current_time()
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


def _connect_failure(error: OSError) -> str:
    """Why a connect failed, as the system says it ("Connection refused"): anyio reports a
    failure over all of a host's addresses as "All connection attempts failed", with the last
    attempt's own error as its cause."""
    cause = error.__cause__
    if not error.errno and isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    return error.strerror or str(error)
