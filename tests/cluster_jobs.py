"""Jobs across a cluster of real servers sharing one PostgreSQL store: submit background jobs
and count what acknowledged, run them with a worker connected to several servers and count
how often each ran, and read who owns what straight from the database.

Every loop is bounded in count and time; a job is identified by its payload.
"""

from __future__ import annotations

import collections
import contextlib
import time

import psycopg
from wire import Wire

from jobserver.protocol import PacketType as T

SUBMIT_DEADLINE = 30.0
"""Seconds a submit may wait for its reply: with the database unreachable, the store tries a
statement for up to 5 s and a new connection for up to 5 s before it refuses the batch."""

DRAIN_IDLE_PAUSE = 0.02
"""Seconds a worker waits after every server said NO_JOB before asking again."""


def submit_background(
    server, function: bytes, payloads: list[bytes], *, unique_prefix: bytes = b"u-"
) -> dict[bytes, bytes]:
    """Submit each payload as a background job (unique = prefix + payload), pipelined; returns
    payload -> handle for every JOB_CREATED (acknowledged). Any other reply fails."""
    with Wire.to(server, timeout=30) as wire:
        for payload in payloads:
            wire.send(T.SUBMIT_JOB_BG, function, unique_prefix + payload, payload)
        return {payload: wire.expect(T.JOB_CREATED)[0] for payload in payloads}


def try_submit_background(server, function: bytes, payload: bytes) -> tuple[str, bytes]:
    """One background submit on a fresh connection: ("created", handle), ("error", code and
    text) or ("down", why): the server could not be reached or closed on us."""
    try:
        with Wire.to(server, timeout=SUBMIT_DEADLINE) as wire:
            wire.send(T.SUBMIT_JOB_BG, function, b"u-" + payload, payload)
            packet = wire.read_packet()
    except (OSError, ConnectionError) as error:
        return "down", str(error).encode()
    if packet.type == T.JOB_CREATED:
        return "created", packet.args[0]
    assert packet.type == T.ERROR, f"unexpected reply {packet!r}"
    return "error", b" ".join(packet.args)


class Worker:
    """A raw-protocol worker on several servers at once, completing every job it is given and
    counting runs by payload. Servers that go away are dropped; others are kept."""

    def __init__(self, servers, *functions: bytes) -> None:
        self.runs: collections.Counter[bytes] = collections.Counter()
        self.ran_on: dict[bytes, list[int]] = collections.defaultdict(list)
        self._wires: list[tuple[int, Wire]] = []
        for server in servers:
            wire = Wire.to(server)
            wire.can_do(*functions)
            self._wires.append((server.port, wire))

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for _port, wire in self._wires:
            wire.close()
        self._wires.clear()

    def grab_once(self) -> int:
        """One GRAB_JOB on every server; runs whatever is assigned. Returns jobs run."""
        ran = 0
        for entry in list(self._wires):
            port, wire = entry
            try:
                wire.send(T.GRAB_JOB)
                while True:
                    packet = wire.read_packet()
                    if packet.type != T.NOOP:
                        break
                if packet.type == T.JOB_ASSIGN:
                    handle, _function, payload = packet.args
                    self.runs[payload] += 1
                    self.ran_on[payload].append(port)
                    wire.send(T.WORK_COMPLETE, handle, b"done")
                    ran += 1
                else:
                    assert packet.type == T.NO_JOB, f"unexpected {packet!r}"
            except (OSError, ConnectionError):
                self._wires.remove(entry)
                wire.close()
        return ran

    def run_until(self, done, timeout: float) -> float:
        """Grab and run jobs until `done(self)` holds; returns the seconds it took. Fails the
        test with what ran so far if `timeout` passes first."""
        start = time.monotonic()
        deadline = start + timeout
        while not done(self):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not done within {timeout:.0f} s: {len(self.runs)} distinct jobs ran"
                )
            if not self.grab_once():
                time.sleep(DRAIN_IDLE_PAUSE)
        return time.monotonic() - start

    def expect_no_job(self, seconds: float) -> None:
        """Ask every server for work for `seconds`; assert nothing is handed out."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            before = sum(self.runs.values())
            self.grab_once()
            assert sum(self.runs.values()) == before, f"handed out: {dict(self.runs)}"
            time.sleep(DRAIN_IDLE_PAUSE)


def ran_all(payloads) -> callable:
    wanted = set(payloads)
    return lambda worker: wanted <= worker.runs.keys()


def owners(uri: str) -> collections.Counter[str]:
    """Rows of jobserver_jobs per owner node, read directly."""
    with psycopg.connect(uri, autocommit=True) as db:
        rows = db.execute("SELECT owner, count(*) FROM jobserver_jobs GROUP BY owner").fetchall()
    return collections.Counter({owner: count for owner, count in rows})


def node_rows(uri: str) -> dict[str, tuple]:
    """node id -> (term, lease expired?, taken over by)."""
    with psycopg.connect(uri, autocommit=True) as db:
        rows = db.execute(
            "SELECT node_id, term, lease_expires < now(), taken_over_by FROM jobserver_nodes"
        ).fetchall()
    return {row[0]: tuple(row[1:]) for row in rows}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something true; fail naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(psycopg.OperationalError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
