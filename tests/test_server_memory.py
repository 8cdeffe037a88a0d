"""Memory is bounded and survivable: what one peer makes the server hold costs that peer.

Each test runs a real server, most under an address-space cap (`prlimit --as`), so the attacks
stay small: a few hundred MiB sent over loopback. Figures (memory, counts) are printed for
`pytest -s`; assertions are on behaviour only: the server is alive, other clients' ECHO and
jobs are answered, the offending connections are closed, and the log says why.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
import servers
import wire

from jobserver.protocol import PacketType as T
from jobserver.protocol import encode_request

connect = wire.connect  # fixture: connect(server) -> Wire, closed at teardown

MiB = 1024 * 1024

CAP = 1024 * MiB
"""Address-space cap of the capped servers: big enough for the interpreter and trio (the
server starts at a few hundred MiB of address space), small enough that 40 peers each sending
most of a 24 MiB packet would exhaust it without the memory budget."""

ATTACKERS = 40
ANNOUNCED = 24 * MiB
"""Each attacker announces an ECHO_REQ of this size and sends all of it but the last byte:
40 of them hold 960 MiB in partial input, more than CAP."""

CHUNK = b"x" * MiB


@pytest.fixture
def start_capped_jobserver(start_jobserver):
    """Start `prlimit --as=CAP python -m jobserver --store memory ...`; stopped by PID."""

    def start(*args: str) -> servers.Server:
        return start_jobserver("--store", "memory", *args, prlimit=(f"--as={CAP}",))

    return start


def memory_mib(server: servers.Server) -> tuple[int, int]:
    """(resident, peak resident) MiB of the server process."""
    fields = {}
    for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def announce_and_fill(server: servers.Server, size: int) -> socket.socket | None:
    """Connect, announce an ECHO_REQ of `size` bytes and send all but its last byte. None when
    the server closed the connection while we were still sending."""
    sock = socket.create_connection((server.host, server.port), timeout=30)
    try:
        sock.sendall(struct.pack(">4sII", b"\0REQ", T.ECHO_REQ, size - 12))
        for _ in range(size // len(CHUNK) - 1):
            sock.sendall(CHUNK)
        sock.sendall(CHUNK[: len(CHUNK) - 13])
    except OSError:
        sock.close()
        return None
    return sock


def is_closed(sock: socket.socket, wait: float = 5.0) -> bool:
    """True once the server closed `sock` (EOF or reset) within `wait` seconds."""
    sock.settimeout(wait)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def run_a_job(server: servers.Server, connect, function: bytes = b"bystander") -> None:
    worker, client = connect(server), connect(server)
    worker.can_do(function)
    handle = client.submit(function, b"payload")
    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN, handle, function, b"payload")
    worker.send(T.WORK_COMPLETE, handle, b"done")
    client.expect(T.WORK_COMPLETE, handle, b"done")


def test_peers_announcing_huge_packets_under_an_address_space_cap_cost_only_themselves(
    start_capped_jobserver, connect
):
    server = start_capped_jobserver()
    small = connect(server)  # a modest partial packet: holds least, must never be chosen
    small.send_raw(struct.pack(">4sII", b"\0REQ", T.ECHO_REQ, 100) + b"s" * 50)
    base = memory_mib(server)[0]
    started = time.monotonic()
    attackers = [announce_and_fill(server, ANNOUNCED) for _ in range(ATTACKERS)]
    elapsed = time.monotonic() - started

    assert server.proc.poll() is None, f"the server died:\n{server.stderr_text()}"
    assert servers.echo(server.host, server.port, b"still here") == b"still here"
    run_a_job(server, connect)
    small.send_raw(b"s" * 50)
    small.expect(T.ECHO_RES, b"s" * 100)

    closed = sum(1 for sock in attackers if sock is None or is_closed(sock, 0.5))
    log = server.stderr_text()
    budget_lines = log.count("over the memory budget")
    resident, peak = memory_mib(server)
    print(
        f"\n{ATTACKERS} peers x {ANNOUNCED // MiB} MiB partial packets under --as={CAP // MiB}M: "
        f"{closed} closed, {budget_lines} budget log lines, memory {base} -> {resident} MiB "
        f"(peak {peak} MiB), sent in {elapsed:.1f} s"
    )
    assert closed > 0
    assert budget_lines >= closed - log.count("internal error")
    assert "MemoryError" not in log  # the budget acted before the allocator failed
    for sock in attackers:
        if sock is not None:
            sock.close()


def test_memory_error_while_serving_one_connection_closes_only_that_connection(
    start_capped_jobserver, connect
):
    # A budget far above the cap: the allocator fails first, inside the decoder.
    server = start_capped_jobserver("--memory-budget", str(64 * 1024 * MiB))
    attackers = [announce_and_fill(server, ANNOUNCED) for _ in range(ATTACKERS)]

    assert server.proc.poll() is None, f"the server died:\n{server.stderr_text()}"
    closed = sum(1 for sock in attackers if sock is None or is_closed(sock, 0.5))
    for sock in attackers:
        if sock is not None:
            sock.close()
    log = server.stderr_text()
    print(f"\nwithout a usable budget: {closed} of {ATTACKERS} closed on MemoryError")
    assert "MemoryError" in log
    assert "internal error serving" in log
    assert closed > 0
    # Its memory back, the server serves as before.
    servers.wait_until(
        lambda: servers.echo(server.host, server.port, b"alive") == b"alive",
        what="an ECHO after the attackers left",
    )
    run_a_job(server, connect)


def submit_and_assign(connect, server, function: bytes = b"stream"):
    """A client waiting on a foreground job, and the worker holding it."""
    worker, client = connect(server), connect(server)
    worker.can_do(function)
    handle = client.submit(function, b"arg")
    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN, handle, function, b"arg")
    return worker, client, handle


def stream_until_closed(
    server: servers.Server, worker: wire.Wire, client: wire.Wire, handle: bytes, limit: int
) -> int:
    """The worker sends 1 MiB WORK_DATA to a client that never reads, until the server logs
    that it closed a connection or `limit` bytes are sent. Returns the bytes sent."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    packet = encode_request(T.WORK_DATA, handle, b"d" * MiB)
    worker.sock.settimeout(30)
    sent = 0
    while sent < limit:
        worker.send_raw(packet)
        sent += len(packet)
        if sent % (8 * MiB) < len(packet) and "closing connection" in server.stderr_text():
            break
    return sent


def test_client_that_never_reads_is_closed_at_max_outbox_whatever_it_held_before(
    jobserver, connect
):
    from jobserver.server_connections import MAX_OUTBOX

    worker, client, handle = submit_and_assign(connect, jobserver)
    sent = stream_until_closed(jobserver, worker, client, handle, limit=MAX_OUTBOX + 128 * MiB)
    peak = memory_mib(jobserver)[1]
    print(f"\nunread WORK_DATA: closed after {sent // MiB} MiB; peak {peak} MiB")
    assert "it stopped reading" in jobserver.stderr_text()
    assert sent <= MAX_OUTBOX + 32 * MiB
    assert is_closed(client.sock)
    worker.echo()


def test_unread_output_counts_against_the_memory_budget(start_jobserver, connect):
    server = start_jobserver("--memory-budget", str(64 * MiB))
    worker, client, handle = submit_and_assign(connect, server)
    sent = stream_until_closed(server, worker, client, handle, limit=256 * MiB)
    print(f"\nunread WORK_DATA under a 64 MiB budget: closed after {sent // MiB} MiB")
    assert "over the memory budget" in server.stderr_text()
    assert sent <= 64 * MiB + 32 * MiB
    assert is_closed(client.sock)
    run_a_job(server, connect)


READ_ALL_REPLIES_WITHIN = 120.0
"""Seconds the greedy reader may take for its ~100 MB of replies; generous on a loaded CI
machine, but a test that hangs fails instead of stalling the run."""


def test_pipelined_admin_commands_wait_for_their_reader_instead_of_piling_up(
    start_jobserver, connect
):
    server = start_jobserver("--store", "memory")
    jobs, commands = 2000, 1500
    submitter = connect(server)
    for start in range(0, jobs, 500):
        submitter.send_raw(
            b"".join(
                encode_request(T.SUBMIT_JOB_BG, b"fn", b"u%d" % i, b"")
                for i in range(start, start + 500)
            )
        )
        for _ in range(500):
            submitter.expect(T.JOB_CREATED)
    one_reply = len(submitter.admin("show jobs"))
    base = memory_mib(server)[0]

    greedy = connect(server)  # its kernel buffers hold a few MiB: far less than is asked
    greedy.send_raw(b"show jobs\n" * commands)  # 15 kB asking for ~100 MB of replies
    for _ in range(20):  # others are served meanwhile
        assert servers.echo(server.host, server.port, b"meanwhile") == b"meanwhile"
    time.sleep(0.5)
    resident, peak = memory_mib(server)
    print(
        f"\n{commands} pipelined `show jobs` of {one_reply} bytes each, unread: "
        f"memory {base} -> {resident} MiB, peak {peak} MiB "
        f"(replies asked for: {one_reply * commands // MiB} MiB)"
    )
    assert peak - base < one_reply * commands // MiB // 2

    # Nothing was lost: the reader gets every reply, complete and in order.
    received = 0
    greedy.sock.settimeout(30)
    expected = one_reply * commands
    deadline = time.monotonic() + READ_ALL_REPLIES_WITHIN
    while received < expected:
        assert time.monotonic() < deadline, f"only {received} of {expected} bytes came"
        chunk = greedy.sock.recv(1 << 20)
        assert chunk, "closed before every reply came"
        received += len(chunk)
    assert received == expected
