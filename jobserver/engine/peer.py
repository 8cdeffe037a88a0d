"""What the engine knows of one connection: its registrations, jobs, options and output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .function import Function
    from .job import Job

MAX_CLIENT_ID_SIZE = 127
"""gearmand truncates SET_CLIENT_ID to 127 bytes (§1); `workers` lines stay bounded."""


class Peer:
    """One connection. Gearman has no client or worker roles: any peer may submit and work.

    Output is appended to `outbox`; the engine lists the peer in its dirty list the first time
    its outbox becomes non-empty, and the I/O layer flushes each dirty peer once per batch.
    """

    __slots__ = (
        "_dirty",
        "abilities",
        "address",
        "can_do",
        "client_id",
        "closed",
        "exceptions",
        "held",
        "id",
        "listening",
        "noop_sent",
        "outbox",
        "sleeping",
        "transport",
    )

    def __init__(self, peer_id: int, address: str, dirty: list[Peer], exceptions: bool) -> None:
        self.id = peer_id
        self.address = address
        self.client_id = b"-"
        # Registrations in the order made (duplicates kept), for `workers` and status counts.
        self.abilities: list[Function] = []
        # Distinct registered functions -> CAN_DO_TIMEOUT in seconds (0 = none).
        self.can_do: dict[Function, float] = {}
        self.held: dict[bytes, Job] = {}  # jobs this worker is running, by handle
        self.listening: set[Job] = set()  # jobs this client waits on (fg submits)
        self.exceptions = exceptions  # OPTION_REQ "exceptions" (§3.8)
        self.sleeping = False
        self.noop_sent = False
        self.outbox = bytearray()
        self.closed = False
        self.transport: Any = None  # the I/O layer's handle for this peer
        self._dirty = dirty

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.outbox:
            self._dirty.append(self)
        self.outbox += data

    def take_output(self) -> bytes:
        data = bytes(self.outbox)
        self.outbox.clear()
        return data

    def __repr__(self) -> str:
        return f"<Peer {self.id} {self.address}>"
