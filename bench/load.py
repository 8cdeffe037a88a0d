"""The load generator: one role per process, the same bytes for every server under test.

    python -m bench.load ROLE SPEC_JSON

A process connects (and pre-encodes whatever it will send), prints `ready`, waits for a `go`
line on stdin, runs, and prints one JSON line with its result; roles that serve until told
(`fg-worker`, `idle`) also stop on a `stop` line. The driver (bench/loadproc.py) starts several
at once so that the load comes from several processes, as a real fleet of clients would.

Every loop is bounded: SPEC["deadline_s"] caps the run and every socket has a timeout, so a
stuck server turns into an error report, never a hang. Framing comes from jobserver.protocol
(encode_request, Decoder(accept_admin=False)); nothing else here knows the wire format.

Roles that measure a rate stop sending after SPEC["max_seconds"] (and then collect the replies
still due), so a slow server costs bounded time; their result says `capped` when that cut the
run short of `count`.

Roles (SPEC keys in brackets):
- `pipelined` [kind, count, window, payload_size, unique_prefix]: `count` requests with at most
  `window` in flight on one connection; kind `echo` (ECHO_REQ -> ECHO_RES), `get_status`
  (GET_STATUS of an unknown handle -> STATUS_RES, for servers without ECHO) or `submit_bg`
  (SUBMIT_JOB_BG with distinct uniques -> JOB_CREATED).
- `drain-worker`: GRAB_JOB_UNIQ / WORK_COMPLETE until NO_JOB (the queue is empty).
- `fg-client` [count, window, payload_size, unique_prefix]: foreground SUBMIT_JOB with `window`
  outstanding; latency is SUBMIT_JOB sent -> WORK_COMPLETE received.
- `fg-worker` [record, ports]: grabs, echoes the payload back in WORK_COMPLETE, sleeps
  (PRE_SLEEP) when idle; with `ports`, on a connection to each of those servers at once. With
  `record`, its result lists every job it was given as [unique, monotonic time of the
  JOB_ASSIGN_UNIQ] (time.monotonic is one clock for every process of the machine).
- `idle` [connections]: opens that many connections and holds them, sending nothing.
- `probe` [kind, count, warmup, payload_size]: sequential round trips, each one timed.
"""

from __future__ import annotations

import json
import resource
import select
import socket
import ssl
import struct
import sys
import time
from collections import deque
from collections.abc import Callable

from bench.tls import ClientTls
from jobserver.protocol import BadPacket, Decoder, Packet, encode_request
from jobserver.protocol import PacketType as T

FUNCTION = b"bench"
"""The one function name every scenario submits to and every worker registers."""

UNKNOWN_HANDLE = b"H:bench:0"
"""GET_STATUS target for the `get_status` probe: no server has it, so the reply is a plain
STATUS_RES (known=0) computed without touching any queue."""

RECEIVE_SIZE = 256 * 1024
"""Bytes asked per recv: large enough to take a whole window of replies in one call."""

IO_TIMEOUT = 30.0
"""A socket that stays silent this long means the server stopped answering: the run fails."""

IDLE_POLL = 0.2
"""Serving roles look at stdin for `stop` this often while their socket is quiet."""

REQUEST_REPLY = {
    "echo": T.ECHO_RES,
    "get_status": T.STATUS_RES,
    "submit_bg": T.JOB_CREATED,
}


class LoadError(Exception):
    """The server answered something unexpected, went silent or closed the connection."""


class Silence(LoadError):
    """Nothing arrived within the socket's timeout."""


def connect(spec: dict, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A connection to SPEC's server; with SPEC["tls"] (a ClientTls as a dict) a TLS one with
    our client certificate, its handshake done before the caller's clock starts."""
    sock = socket.create_connection((spec["host"], spec["port"]), timeout=timeout)
    # Requests are written in batches by us, never byte by byte: Nagle would only add delay.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if "tls" not in spec:
        return sock
    try:
        return ClientTls(**spec["tls"]).wrap(sock, spec["host"])
    except BaseException:
        sock.close()
        raise


class Stream:
    """One connection plus its decoder; `receive` returns the packets of one read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = Decoder(accept_admin=False)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> list[Packet]:
        try:
            data = self.sock.recv(RECEIVE_SIZE)
        except TimeoutError:
            raise Silence(f"no reply within {self.sock.gettimeout()} s") from None
        if not data:
            raise LoadError("server closed the connection")
        events = self.decoder.feed(data)
        for event in events:
            if isinstance(event, BadPacket) or event.type == T.ERROR:
                raise LoadError(f"server sent {event!r}")
        return events  # type: ignore[return-value]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.restart()

    def restart(self) -> None:
        self.at = time.monotonic() + self.seconds

    def check(self, progress: str) -> None:
        if time.monotonic() > self.at:
            raise LoadError(f"deadline of {self.seconds} s passed ({progress})")


def payload_of(size: int) -> bytes:
    return b"x" * size


def request_list(spec: dict) -> list[bytes]:
    """Every request a `pipelined` or `probe` process will send, encoded before the clock runs."""
    kind, count = spec["kind"], spec["count"]
    if kind == "echo":
        return [encode_request(T.ECHO_REQ, payload_of(spec["payload_size"]))] * count
    if kind == "get_status":
        return [encode_request(T.GET_STATUS, UNKNOWN_HANDLE)] * count
    if kind == "submit_bg":
        payload = payload_of(spec["payload_size"])
        prefix = spec["unique_prefix"]
        return [
            encode_request(T.SUBMIT_JOB_BG, FUNCTION, f"{prefix}{i}".encode(), payload)
            for i in range(count)
        ]
    raise ValueError(f"unknown request kind {kind!r}")


# Each role sets up (connects, encodes) and returns the function that runs after `go`.
Role = Callable[[dict, Deadline], Callable[[], dict]]


def pipelined(spec: dict, deadline: Deadline) -> Callable[[], dict]:
    stream = Stream(connect(spec))
    requests = request_list(spec)
    expected = REQUEST_REPLY[spec["kind"]]
    count, window = len(requests), spec["window"]

    def run() -> dict:
        start = time.monotonic()
        stop_at = start + spec["max_seconds"]
        sent = min(window, count)
        stream.send(b"".join(requests[:sent]))
        done = 0
        while done < sent:
            replies = stream.receive()
            for reply in replies:
                if reply.type != expected:
                    raise LoadError(f"expected packet type {expected}, got {reply!r}")
            done += len(replies)
            if sent < count and replies and time.monotonic() < stop_at:
                more = min(len(replies), count - sent)
                stream.send(b"".join(requests[sent : sent + more]))
                sent += more
            deadline.check(f"{done} of {count} replies")
        return {"count": done, "start": start, "end": time.monotonic(), "capped": done < count}

    return run


def drain_worker(spec: dict, deadline: Deadline) -> Callable[[], dict]:
    stream = Stream(connect(spec))
    stream.send(encode_request(T.CAN_DO, FUNCTION))
    grab = encode_request(T.GRAB_JOB_UNIQ)

    def run() -> dict:
        start = time.monotonic()
        stop_at = start + spec["max_seconds"]
        stream.send(grab)
        done = 0
        while True:
            for packet in stream.receive():
                if packet.type == T.JOB_ASSIGN_UNIQ:
                    complete = encode_request(T.WORK_COMPLETE, packet.args[0], b"")
                    done += 1
                    if time.monotonic() >= stop_at:  # time is up: the queue is not empty yet
                        stream.send(complete)
                        return {
                            "count": done,
                            "start": start,
                            "end": time.monotonic(),
                            "capped": True,
                        }
                    # The result and the next grab leave in one write, as one would batch them.
                    stream.send(complete + grab)
                elif packet.type == T.NO_JOB:
                    # Replies come in order, so every WORK_COMPLETE we sent was processed.
                    return {"count": done, "start": start, "end": time.monotonic(), "capped": False}
                elif packet.type != T.NOOP:
                    raise LoadError(f"unexpected {packet!r}")
            deadline.check(f"{done} jobs done")

    return run


def fg_client(spec: dict, deadline: Deadline) -> Callable[[], dict]:
    stream = Stream(connect(spec))
    payload = payload_of(spec["payload_size"])
    prefix = spec["unique_prefix"]
    count, window = spec["count"], spec["window"]
    requests = [
        encode_request(T.SUBMIT_JOB, FUNCTION, f"{prefix}{i}".encode(), payload)
        for i in range(count)
    ]

    def run() -> dict:
        clock = time.perf_counter
        sent_at: deque[float] = deque()  # JOB_CREATED comes back in submission order
        started: dict[bytes, float] = {}
        latencies: list[float] = []
        start = time.monotonic()
        stop_at = start + spec["max_seconds"]
        sent = min(window, count)
        now = clock()
        sent_at.extend([now] * sent)
        stream.send(b"".join(requests[:sent]))
        while len(latencies) < sent:
            packets = stream.receive()
            now = clock()
            finished = 0
            for packet in packets:
                kind = packet.type
                if kind == T.JOB_CREATED:
                    started[packet.args[0]] = sent_at.popleft()
                elif kind == T.WORK_COMPLETE:
                    latencies.append(now - started.pop(packet.args[0]))
                    finished += 1
                elif kind in (T.WORK_FAIL, T.WORK_EXCEPTION):
                    raise LoadError(f"job failed: {packet!r}")
                # WORK_DATA / WORK_STATUS / WORK_WARNING: our workers send none.
            if finished and sent < count and time.monotonic() < stop_at:
                more = min(finished, count - sent)
                sent_at.extend([clock()] * more)
                stream.send(b"".join(requests[sent : sent + more]))
                sent += more
            deadline.check(f"{len(latencies)} of {count} jobs")
        return {
            "count": len(latencies),
            "start": start,
            "end": time.monotonic(),
            "capped": len(latencies) < count,
            "latencies_us": [round(x * 1e6) for x in latencies],
        }

    return run


def stop_requested() -> bool:
    """True once the driver wrote `stop` (or closed our stdin)."""
    readable, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(readable) and sys.stdin.readline().strip() in ("stop", "")


class WorkerConnection:
    """One connection of an `fg-worker` to one server: CAN_DO, then grab, echo the payload
    back in WORK_COMPLETE, PRE_SLEEP when there is no job, grab again on NOOP."""

    GRAB = encode_request(T.GRAB_JOB_UNIQ)
    PRE_SLEEP = encode_request(T.PRE_SLEEP)

    def __init__(self, spec: dict, port: int) -> None:
        self.stream = Stream(connect({**spec, "port": port}))
        self.stream.sock.settimeout(IDLE_POLL)
        self.stream.send(encode_request(T.CAN_DO, FUNCTION))
        self.sleeping = False

    def answer(self, packets: list[Packet], now: float, runs: list | None) -> int:
        """Send what `packets` call for, in one write; returns the jobs done. `runs`, when
        given, gets [unique, now] for every job."""
        out = []
        done = 0
        for packet in packets:
            kind = packet.type
            if kind == T.JOB_ASSIGN_UNIQ:
                handle, _function, unique, data = packet.args
                out.append(encode_request(T.WORK_COMPLETE, handle, data))
                out.append(self.GRAB)
                done += 1
                if runs is not None:
                    runs.append((unique.decode(), now))
            elif kind == T.NO_JOB:
                out.append(self.PRE_SLEEP)
                self.sleeping = True
            elif kind == T.NOOP:
                if self.sleeping:  # one grab per wake-up, however many NOOPs arrive
                    out.append(self.GRAB)
                    self.sleeping = False
            else:
                raise LoadError(f"unexpected {packet!r}")
        if out:
            self.stream.send(b"".join(out))
        return done


def readable(connections: list[WorkerConnection]) -> list[WorkerConnection]:
    """The connections that have something to read; raises Silence after IDLE_POLL without.

    One connection needs no select: its recv waits up to IDLE_POLL itself (its socket's
    timeout), one system call per batch as before several servers were served. A TLS socket
    may hold decrypted bytes that select cannot see (SSLSocket.pending), so those go first."""
    if len(connections) == 1:
        return connections
    buffered = [c for c in connections if isinstance(c.stream.sock, ssl.SSLSocket)]
    buffered = [c for c in buffered if c.stream.sock.pending()]  # type: ignore[attr-defined]
    if buffered:
        return buffered
    ready, _, _ = select.select([c.stream.sock for c in connections], [], [], IDLE_POLL)
    if not ready:
        raise Silence(f"no packet within {IDLE_POLL} s")
    return [c for c in connections if c.stream.sock in ready]


def fg_worker(spec: dict, deadline: Deadline) -> Callable[[], dict]:
    """One worker process: a connection to each of SPEC["ports"] (or to SPEC["port"]), taking
    jobs from all of them as the worker SDK does; each connection grabs on its own, as a
    worker SDK with a concurrency of at least the number of servers would."""
    ports = spec.get("ports") or [spec["port"]]
    connections = [WorkerConnection(spec, port) for port in ports]
    record = spec.get("record", False)

    def run() -> dict:
        done = 0
        runs: list[tuple[str, float]] = []
        for connection in connections:
            connection.stream.send(WorkerConnection.GRAB)
        while True:
            try:
                batches = [(c, c.stream.receive()) for c in readable(connections)]
            except Silence:
                if stop_requested():
                    return {"count": done, "runs": runs} if record else {"count": done}
                deadline.check(f"{done} jobs done")
                continue
            now = time.monotonic()
            for connection, packets in batches:
                done += connection.answer(packets, now, runs if record else None)

    return run


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise LoadError(f"need {needed} file descriptors, hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


SLOW_CONNECT = 0.2
"""A connect() that takes this long waited for a SYN retransmission (the server's accept queue
was full): the `idle` role then spaces its connects out."""

MAX_CONNECT_GAP = 0.01

RESET_ON_CLOSE = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() sends RST, so 10,000 closed connections leave no TIME_WAIT
entries behind to crowd the ephemeral ports of the runs that follow."""


def idle(spec: dict, deadline: Deadline) -> Callable[[], dict]:
    """Open `connections` connections, one after the other, and hold them without a byte.

    Servers with a short listen backlog (gear listens with 1, gearmand with 32) drop SYNs
    while their accept queue is full, and each drop costs a 1 s retransmission; so whenever
    a connect was that slow, the next ones are spaced out a little more (up to 10 ms apart),
    and a run of fast ones halves the gap again.
    """
    count = spec["connections"]
    raise_fd_limit(count + 64)
    sockets = []
    gap, fast_in_a_row = 0.0, 0
    for _ in range(count):
        began = time.monotonic()
        sock = connect(spec)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        sockets.append(sock)
        if time.monotonic() - began > SLOW_CONNECT:
            gap, fast_in_a_row = min(MAX_CONNECT_GAP, max(2 * gap, 0.0005)), 0
        else:
            fast_in_a_row += 1
            if fast_in_a_row >= 500:
                gap, fast_in_a_row = gap / 2, 0
        if gap:
            time.sleep(gap)
        deadline.check(f"{len(sockets)} of {count} connections open")

    def run() -> dict:
        while not stop_requested():
            deadline.check(f"holding {count} connections")
            time.sleep(IDLE_POLL)
        for sock in sockets:
            sock.close()
        return {"count": count}

    return run


def probe(spec: dict, deadline: Deadline) -> Callable[[], dict]:
    stream = Stream(connect(spec))
    request = request_list({**spec, "count": 1})[0]
    expected = REQUEST_REPLY[spec["kind"]]

    def round_trip() -> float:
        began = time.perf_counter()
        stream.send(request)
        replies: list[Packet] = []
        while not replies:
            replies = stream.receive()
        if len(replies) != 1 or replies[0].type != expected:
            raise LoadError(f"expected one packet of type {expected}, got {replies!r}")
        return time.perf_counter() - began

    def run() -> dict:
        for _ in range(spec["warmup"]):
            round_trip()
        latencies = []
        start = time.monotonic()
        for i in range(spec["count"]):
            latencies.append(round_trip())
            deadline.check(f"{i} of {spec['count']} round trips")
        return {
            "count": len(latencies),
            "start": start,
            "end": time.monotonic(),
            "latencies_us": [round(x * 1e6) for x in latencies],
        }

    return run


ROLES: dict[str, Role] = {
    "pipelined": pipelined,
    "drain-worker": drain_worker,
    "fg-client": fg_client,
    "fg-worker": fg_worker,
    "idle": idle,
    "probe": probe,
}


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    role_name, spec = argv[0], json.loads(argv[1])
    deadline = Deadline(spec["deadline_s"])
    try:
        run = ROLES[role_name](spec, deadline)
        say("ready")
        if sys.stdin.readline().strip() != "go":
            return 0  # the driver gave up before starting us
        deadline.restart()
        cpu_before = time.process_time()
        result = {"ok": True, **run()}
        # What this process cost the machine while it ran: the load shares the server's cores.
        result["cpu_s"] = time.process_time() - cpu_before
    except (LoadError, OSError, ValueError) as error:
        result = {"ok": False, "error": f"{role_name}: {type(error).__name__}: {error}"}
    say(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
