"""What the engine knows of one connection: its registrations, jobs, options and output."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .abilities import Abilities
    from .job import Job

MAX_CLIENT_ID_SIZE = 127
"""gearmand truncates SET_CLIENT_ID to 127 bytes (§1); `workers` lines stay bounded."""


NOT_LISTENING: frozenset[Job] = frozenset()
"""`listening` of a peer waiting on no job, shared: an empty set of its own would be 216 bytes
in every idle worker connection; the engine gives a peer a set at its first foreground job."""


class Peer:
    """One connection. Gearman has no client or worker roles: any peer may submit and work.

    Output is appended to `outbox`; the engine lists the peer in its dirty list the first time
    its outbox becomes non-empty, and the I/O layer flushes each dirty peer once per batch.

    A reply that must wait for the store (JOB_CREATED of a durable job) is held in `deferred`
    with the record id it waits on; everything sent to the peer after it queues behind it, so
    replies keep the order of requests (shared doc §1) whatever the store takes.
    """

    __slots__ = (
        "_dirty",
        "abilities",
        "address",
        "client_id",
        "closed",
        "deferred",
        "exceptions",
        "held",
        "id",
        "listening",
        "noop_sent",
        "outbox",
        "sleep_stamp",
        "sleeping",
        "transport",
    )

    def __init__(self, peer_id: int, address: str, dirty: list[Peer], exceptions: bool) -> None:
        self.id = peer_id
        self.address = address
        self.client_id = b"-"
        # What it registered (CAN_DO); None until its first registration, as most
        # connections are clients.
        self.abilities: Abilities | None = None
        self.held: dict[bytes, Job] = {}  # jobs this worker is running, by handle
        # Jobs this client waits on (foreground submits); most peers never submit one.
        self.listening: set[Job] | frozenset[Job] = NOT_LISTENING
        self.exceptions = exceptions  # OPTION_REQ "exceptions" (§3.8)
        self.sleeping = False  # sent PRE_SLEEP and was not woken since
        self.sleep_stamp = 0  # when it last went to sleep (engine-wide order), for fairness
        self.noop_sent = False
        self.outbox = bytearray()
        self.deferred: deque[bytes | tuple[int, bytes]] | None = None
        self.closed = False
        self.transport: Any = None  # the I/O layer's handle for this peer
        self._dirty = dirty

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self.deferred is not None:
            self.deferred.append(data)
            return
        self._send_now(data)

    def _send_now(self, data: bytes) -> None:
        if not self.outbox:
            self._dirty.append(self)
        self.outbox += data

    def defer(self, record_id: int, reply: bytes) -> None:
        """Send `reply` once record `record_id` is decided (see release); hold everything sent
        after it until then."""
        if self.closed:
            return
        if self.deferred is None:
            self.deferred = deque()
        self.deferred.append((record_id, reply))

    def refuse(self, refused: Mapping[int, bytes]) -> None:
        """Put the refusal in place of each held reply whose record was refused, wherever it
        waits: one held behind a reply of a later batch goes out after it, as the refusal."""
        deferred = self.deferred
        if deferred:
            self.deferred = deque(
                refused.get(item[0], item) if type(item) is tuple else item  # type: ignore[index]
                for item in deferred
            )

    def release(self, decided_end: int) -> bool:
        """Send what no longer waits: everything up to the first reply whose record id is not
        below `decided_end`. Returns True when nothing is held any more."""
        deferred = self.deferred
        if deferred is None or self.closed:
            self.deferred = None
            return True
        ready: list[bytes] = []  # sent in one piece: a commit releases hundreds at once
        while deferred:
            item = deferred[0]
            if type(item) is not bytes:
                record_id, item = item  # type: ignore[misc]
                if record_id >= decided_end:
                    break
            ready.append(item)  # type: ignore[arg-type]
            deferred.popleft()
        else:
            self.deferred = None
        if ready:
            self._send_now(b"".join(ready))
        return self.deferred is None

    def take_output(self) -> bytes:
        data = bytes(self.outbox)
        self.outbox.clear()
        return data

    def __repr__(self) -> str:
        return f"<Peer {self.id} {self.address}>"
