"""Small helpers for driving the pure job engine in tests (no sockets, no trio).

A test builds an engine with fake clocks, connects peers, sends them packets and decodes what
the engine queued for each peer:

    engine = new_engine()
    client, worker = connect(engine), connect(engine)
    send(engine, worker, T.CAN_DO, b"rev")
    handle = submit(engine, client, b"rev", data=b"hello")
    assert replies(worker) == []
"""

from __future__ import annotations

import itertools
from typing import Any

from jobserver.engine import Engine, Peer
from jobserver.engine.journal import Batch
from jobserver.protocol import REQ, RES, Decoder, Packet
from jobserver.protocol import PacketType as T

START_TIME = 1_800_000_000.0
"""Wall-clock start of every fake clock: a fixed unix time, so tests are reproducible."""

_peer_ids = itertools.count(1)


class FakeClock:
    """A clock that only moves when told to; pass it as wall_clock or monotonic_clock."""

    def __init__(self, now: float = START_TIME) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_engine(**options: Any) -> Engine:
    """An Engine with fake wall and monotonic clocks (reach them as engine.wall_clock and
    engine.monotonic_clock) and a short fixed handle prefix, unless options say otherwise."""
    options.setdefault("handle_prefix", "H:test")
    options.setdefault("wall_clock", FakeClock())
    options.setdefault("monotonic_clock", FakeClock(0.0))
    return Engine(**options)


def advance(engine: Engine, seconds: float) -> None:
    """Move both fake clocks forward and run whatever timers came due."""
    engine.wall_clock.advance(seconds)  # type: ignore[attr-defined]
    engine.monotonic_clock.advance(seconds)  # type: ignore[attr-defined]
    engine.run_timers()


def connect(engine: Engine, address: str = "127.0.0.1") -> Peer:
    return engine.connect(next(_peer_ids), address)


def _as_bytes(arg: bytes | str) -> bytes:
    return arg.encode() if isinstance(arg, str) else arg


def send(
    engine: Engine, peer: Peer, packet_type: int, *args: bytes | str, magic: bytes = REQ
) -> None:
    """Apply one request packet; str arguments are UTF-8 encoded."""
    engine.handle_packet(peer, Packet(packet_type, tuple(_as_bytes(a) for a in args), magic))


def replies(peer: Peer) -> list[Packet]:
    """Every packet the engine queued for `peer` since the last call, decoded (and drained).
    Each must carry the RES magic."""
    packets = Decoder(accept_admin=False).feed(peer.take_output())
    for packet in packets:
        assert isinstance(packet, Packet), packet
        assert packet.magic == RES, packet
    return packets  # type: ignore[return-value]


def reply(peer: Peer) -> Packet:
    """The one packet queued for `peer`; fails if there is none or more than one."""
    packets = replies(peer)
    assert len(packets) == 1, packets
    return packets[0]


def types(peer: Peer) -> list[int]:
    """The types of every packet queued for `peer` (drained)."""
    return [packet.type for packet in replies(peer)]


def error(code: bytes | str, text: bytes | str) -> Packet:
    return Packet(T.ERROR, (_as_bytes(code), _as_bytes(text)), RES)


def packet(packet_type: int, *args: bytes | str) -> Packet:
    """A server reply as `replies` returns it."""
    return Packet(packet_type, tuple(_as_bytes(a) for a in args), RES)


def submit(
    engine: Engine,
    client: Peer,
    function: bytes | str = b"fn",
    unique: bytes | str = b"",
    data: bytes | str = b"",
    packet_type: int = T.SUBMIT_JOB,
) -> bytes:
    """Submit a job (SUBMIT_JOB by default) and return the handle from its JOB_CREATED."""
    send(engine, client, packet_type, function, unique, data)
    created = reply(client)
    assert created.type == T.JOB_CREATED, created
    return created.args[0]


def submit_epoch(
    engine: Engine,
    client: Peer,
    function: bytes | str,
    epoch: float,
    unique: bytes | str = b"",
    data: bytes | str = b"",
) -> bytes:
    """SUBMIT_JOB_EPOCH for unix time `epoch`; returns the handle."""
    send(engine, client, T.SUBMIT_JOB_EPOCH, function, unique, str(int(epoch)), data)
    created = reply(client)
    assert created.type == T.JOB_CREATED, created
    return created.args[0]


def worker(engine: Engine, *functions: bytes | str) -> Peer:
    """A new connection registered (CAN_DO) for each function, in order."""
    peer = connect(engine)
    for function in functions:
        send(engine, peer, T.CAN_DO, function)
    assert replies(peer) == []
    return peer


def grab(engine: Engine, peer: Peer, packet_type: int = T.GRAB_JOB) -> Packet:
    """Send a GRAB_JOB* and return the single reply (JOB_ASSIGN* or NO_JOB)."""
    send(engine, peer, packet_type)
    return reply(peer)


def grab_handle(engine: Engine, peer: Peer) -> bytes:
    """GRAB_JOB that must assign a job; returns its handle."""
    assigned = grab(engine, peer)
    assert assigned.type == T.JOB_ASSIGN, assigned
    return assigned.args[0]


def get_status(engine: Engine, peer: Peer, handle: bytes) -> tuple[bytes, ...]:
    """GET_STATUS; returns (known, running, numerator, denominator)."""
    send(engine, peer, T.GET_STATUS, handle)
    status = reply(peer)
    assert status.type == T.STATUS_RES, status
    assert status.args[0] == handle.split(b"\0", 1)[0]
    return status.args[1:]


def queued(engine: Engine, function: bytes | str = b"fn") -> list[int]:
    """Live queued jobs per priority [HIGH, NORMAL, LOW] of a function."""
    return list(engine.functions[_as_bytes(function)].queued)


def durable_engine(**options: Any) -> Engine:
    """An engine with a journal, as with a store: background jobs wait for `commit`."""
    return new_engine(durable=True, **options)


def commit(engine: Engine, error: str | None = None) -> Batch:
    """Take everything journalled as one batch and report it committed (or failed)."""
    assert engine.journal is not None
    batch = engine.journal.take_batch()
    engine.commit_finished(batch, error)
    return batch
