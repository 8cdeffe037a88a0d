"""Listening addresses, TCP keepalive and many concurrent connections, on a live jobserver."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time

import pytest
import servers
import wire

from jobserver.protocol import PacketType as T

connect = wire.connect  # fixture: connect(server) -> Wire, closed at teardown


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(
    not ipv6_loopback_available(), reason="this machine has no IPv6 loopback (::1)"
)


def port_free_on_both_families() -> int:
    """A port free on 127.0.0.1 and, where available, on ::1."""
    for _ in range(20):
        port = servers.free_port()
        if not ipv6_loopback_available():
            return port
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
                sock.bind(("::1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on both 127.0.0.1 and ::1")


@pytest.fixture
def start_custom_jobserver(tmp_path):
    """Start `python -m jobserver -p PORT *args` (no implied -L) and wait for ECHO on `host`;
    the fixtures in conftest always pass -L 127.0.0.1, which these tests must not."""
    started: list[servers.Server] = []

    def start(*args: str, host: str) -> servers.Server:
        port = port_free_on_both_families()
        workdir = tmp_path / f"server-{len(started)}"
        workdir.mkdir()
        argv = [
            *[sys.executable, "-m", "jobserver", "-p", str(port), *args],
            *["--data-dir", str(workdir / "data")],
        ]
        server = servers.Server("jobserver", argv, host, port, workdir)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def echo_on(host: str, port: int) -> bytes:
    return servers.echo(host, port, b"hello " + host.encode())


@needs_ipv6
def test_listen_on_ipv6_loopback(start_custom_jobserver):
    server = start_custom_jobserver("-L", "::1", host="::1")
    assert echo_on("::1", server.port) == b"hello ::1"
    assert not servers.port_accepts("127.0.0.1", server.port)  # only the address asked for
    with wire.Wire(("::1", server.port)) as admin:
        workers = admin.admin("workers")
    assert b" ::1 - :\n" in workers, workers  # peers are shown by their IPv6 address


def test_default_listens_on_ipv4_and_on_ipv6_where_available(start_custom_jobserver):
    server = start_custom_jobserver(host="127.0.0.1")
    assert echo_on("127.0.0.1", server.port) == b"hello 127.0.0.1"
    if ipv6_loopback_available():
        assert echo_on("::1", server.port) == b"hello ::1"


def keepalive_timers(port: int) -> list[str]:
    """`ss` lines for established sockets whose source port is `port` (the server side)."""
    result = subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) not installed")


@needs_ss
def test_accepted_sockets_have_tcp_keepalive(jobserver, connect):
    peer = connect(jobserver)
    peer.echo()
    lines = servers.wait_until(
        lambda: keepalive_timers(jobserver.port), timeout=2.0, what="the server-side socket"
    )
    assert len(lines) == 1, lines
    assert "timer:(keepalive," in lines[0], lines


@needs_ss
def test_no_keepalive_turns_keepalive_off(start_jobserver, connect):
    server = start_jobserver("--no-keepalive")
    peer = connect(server)
    peer.echo()
    lines = servers.wait_until(
        lambda: keepalive_timers(server.port), timeout=2.0, what="the server-side socket"
    )
    assert len(lines) == 1, lines
    assert "keepalive" not in lines[0], lines


def test_300_concurrent_connections_each_get_their_echo(jobserver):
    with contextlib.ExitStack() as stack:
        peers = [stack.enter_context(wire.Wire.to(jobserver)) for _ in range(300)]
        started = time.monotonic()
        for n, peer in enumerate(peers):
            peer.send(T.ECHO_REQ, b"peer %d" % n)
        for n, peer in enumerate(peers):
            peer.expect(T.ECHO_RES, b"peer %d" % n)
        assert time.monotonic() - started < 5.0
        # Every one is still served: 300 peers + the admin connection + the "." line.
        with wire.Wire.to(jobserver) as admin:
            servers.wait_until(
                lambda: admin.admin("workers").count(b"\n") == 302,
                timeout=2.0,
                what="exactly 301 connections in the workers list",
            )
