"""Connection limits, stalled input, and fair turns, on real servers and sockets.

- Past --max-connections a new connection is accepted and closed at once (FIN), logged once
  per interval; out of descriptors anyway (EMFILE), waiting connections are closed the same
  way, never a traceback.
- A connection stalled inside a packet longer than --read-timeout is closed; idle ones between
  packets are never closed.
- A read full of pipelined packets is applied PACKETS_PER_TURN at a time, letting the other
  connections in between.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
import servers
import trio
import wire

from jobserver.protocol import PacketType as T
from jobserver.protocol import encode_request
from jobserver.server import Server, ServerConfig
from jobserver.server_connections import PACKETS_PER_TURN

connect = wire.connect  # fixture: connect(server) -> Wire, closed at teardown


def echo_works(server: servers.Server) -> bool:
    try:
        return servers.echo(server.host, server.port, b"hello") == b"hello"
    except OSError:
        return False


def closed_by_server(sock: socket.socket, wait: float = 5.0) -> bool:
    """True if the server closes `sock` (EOF or reset) within `wait` seconds without sending
    anything; False if it is still open then."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------------- max_connections


def test_connections_past_max_connections_are_closed_at_once_and_logged_once(
    start_jobserver, connect
):
    server = start_jobserver("--max-connections", "5")
    served = [connect(server) for _ in range(4)]  # + the fixture's ready check, now closed
    for peer in served:
        peer.echo()
    fifth = connect(server)
    fifth.echo()

    refused = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(20)]
    assert all(closed_by_server(sock) for sock in refused)
    for sock in refused:
        sock.close()
    log = server.stderr_text()
    print(f"\n{log.count('refused')} log line(s) for {len(refused)} refused connections")
    assert log.count("refused") == 1
    assert "Traceback" not in log

    fifth.close()  # room for one again
    servers.wait_until(lambda: echo_works(server), what="a connection served once one closed")
    for peer in served:
        peer.echo()


@pytest.fixture
def start_jobserver_with_fd_limit(start_jobserver):
    """Start `prlimit --nofile=N python -m jobserver --store memory ...`; stopped by PID."""

    def start(nofile: int, *args: str) -> servers.Server:
        return start_jobserver("--store", "memory", *args, prlimit=(f"--nofile={nofile}",))

    return start


def test_out_of_descriptors_closes_waiting_connections_without_a_traceback(
    start_jobserver_with_fd_limit,
):
    # max_connections far above what 64 descriptors allow: accept itself fails (EMFILE).
    server = start_jobserver_with_fd_limit(64, "--max-connections", "1000")
    socks = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(100)]
    answered = closed = 0
    for sock in socks:
        sock.sendall(encode_request(T.ECHO_REQ, b"e"))
    for sock in socks:
        sock.settimeout(10)
        try:
            data = sock.recv(100)
        except ConnectionResetError:
            data = b""
        if data:
            answered += 1
        else:
            closed += 1
    log = server.stderr_text()
    print(f"\n100 connections, 64 descriptors: {answered} answered, {closed} closed at once")
    for sock in socks:
        sock.close()
    assert answered > 0 and closed > 0
    assert answered + closed == 100  # none left hanging (recv would time out)
    assert "Traceback" not in log
    assert 1 <= log.count("accept failed") <= 2  # once per interval, with a count
    servers.wait_until(lambda: echo_works(server), what="an ECHO once descriptors are free")


def test_default_max_connections_leaves_room_below_the_open_files_limit(
    start_jobserver_with_fd_limit,
):
    server = start_jobserver_with_fd_limit(128)
    socks = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(150)]
    outcomes = []
    for sock in socks:
        sock.sendall(encode_request(T.ECHO_REQ, b"e"))
    for sock in socks:
        sock.settimeout(10)
        try:
            outcomes.append(bool(sock.recv(100)))
        except ConnectionResetError:
            outcomes.append(False)
    for sock in socks:
        sock.close()
    log = server.stderr_text()
    print(f"\nnofile=128: {sum(outcomes)} of 150 served")
    assert 0 < sum(outcomes) < 128
    assert "refused" in log  # the connection limit acted, before accept ran out of descriptors
    assert "accept failed" not in log and "Traceback" not in log


# ---------------------------------------------------------------------- read timeout


def test_connection_stalled_inside_a_packet_is_closed_after_read_timeout(start_jobserver, connect):
    server = start_jobserver("--read-timeout", "1")
    idle = connect(server)
    idle.echo()
    half_header = socket.create_connection((server.host, server.port), timeout=5)
    half_header.sendall(b"\0REQ\0\0")
    slowloris = socket.create_connection((server.host, server.port), timeout=5)
    slowloris.sendall(struct.pack(">4sII", b"\0REQ", T.ECHO_REQ, 1000))
    half_line = socket.create_connection((server.host, server.port), timeout=5)
    half_line.sendall(b"stat")

    started = time.monotonic()
    slowloris_closed = False
    for _ in range(40):  # a byte every 0.1 s, for at most 4 s
        try:
            slowloris.send(b"x")
        except OSError:
            slowloris_closed = True
            break
        if closed_by_server(slowloris, 0.1):
            slowloris_closed = True
            break
    print(f"\nslowloris closed after {time.monotonic() - started:.1f} s (read timeout 1 s)")
    assert slowloris_closed
    assert closed_by_server(half_header)
    assert closed_by_server(half_line)
    assert server.stderr_text().count("no progress") >= 3
    idle.echo()  # 1+ s idle between packets: still served


def test_slow_but_steady_packet_and_idle_connections_are_not_closed(start_jobserver, connect):
    server = start_jobserver("--read-timeout", "1")
    idle = connect(server)
    steady = connect(server)
    body = b"s" * 30_000
    steady.send_raw(encode_request(T.ECHO_REQ, body)[:12])
    for start in range(0, len(body), 3000):  # 10 kB/s for 3 s: above MIN_READ_RATE
        steady.send_raw(body[start : start + 3000])
        time.sleep(0.3)
    steady.expect(T.ECHO_RES, body)
    time.sleep(1.5)
    idle.echo()
    assert "no progress" not in server.stderr_text()


# ---------------------------------------------------------------------- fair turns


def test_a_read_of_pipelined_packets_lets_other_connections_in_between_turns(tmp_path):
    """In-process, so the test sees the engine at the moment another peer is answered: with
    all of a 64 KiB read applied in one go, every GRAB_JOB would be done by then."""
    grabs = 5000  # 60 kB: one read

    async def main() -> int:
        server = Server(ServerConfig(port=0, listen="127.0.0.1", store="memory", data_dir=tmp_path))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            port = server.port
            submitter = socket.create_connection(("127.0.0.1", port))
            submitter.sendall(
                b"".join(
                    encode_request(T.SUBMIT_JOB_BG, b"fn", b"u%d" % i, b"") for i in range(grabs)
                )
            )

            def status() -> tuple[int, ...]:  # total, running, workers of "fn"
                for line in server.admin.execute(b"status").split(b"\n"):
                    if line.startswith(b"fn\t"):
                        return tuple(int(field) for field in line.split(b"\t")[1:4])
                return (0, 0, 0)

            with trio.fail_after(30):
                while status()[0] < grabs:
                    await trio.sleep(0.01)
            worker = socket.create_connection(("127.0.0.1", port))
            worker.sendall(encode_request(T.CAN_DO, b"fn"))
            with trio.fail_after(30):
                while not status()[2]:
                    await trio.sleep(0.01)
            other = trio.socket.socket()
            await other.connect(("127.0.0.1", port))
            # Blocking sends from the one trio thread: both are queued before the server runs.
            worker.sendall(encode_request(T.GRAB_JOB) * grabs)
            await other.send(encode_request(T.ECHO_REQ, b"me too"))
            with trio.fail_after(30):
                await other.recv(100)
            total, running, _workers = status()
            queued = total - running
            nursery.cancel_scope.cancel()
        for sock in (submitter, worker, other):
            sock.close()
        return queued

    still_queued = trio.run(main)
    print(f"\njobs still queued when the other peer was answered: {still_queued} of {grabs}")
    assert grabs // 10 >= PACKETS_PER_TURN
    assert still_queued >= grabs // 2  # only a few turns ran before the other peer's
