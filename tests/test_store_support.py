"""Helpers for the durable-store tests (this module holds no tests).

- `ServerSet`: real `jobserver` processes with a chosen data directory, restartable on the same
  port and directory, SIGKILLed or stopped by their own pid; everything is stopped at teardown.
- `Packets`: a small blocking binary-protocol connection with its own framing (built on
  servers.pack_request, not on the code under test), for workers and pipelined submitters.
- `drain`: a raw-socket worker (GRAB_JOB_UNIQ loop + WORK_COMPLETE) that runs every queued job
  of a function and returns what it ran.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import servers
from servers import HOST, pack_request

from jobserver.protocol import PacketType as T

RES = b"\0RES"
IO_TIMEOUT = 10.0


class ServerSet:
    """Test jobservers whose sqlite store lives in a directory the test chooses."""

    def __init__(self) -> None:
        self.started: list[servers.Server] = []

    def start(
        self, *args: str, port: int | None = None, data_dir: Path | None = None
    ) -> servers.Server:
        server = servers.start_jobserver(*args, port=port, data_dir=data_dir)
        self.started.append(server)
        return server

    def restart(self, server: servers.Server, *args: str, data_dir: Path) -> servers.Server:
        """The same port and data directory again (the old process must be gone)."""
        assert server.proc.poll() is not None, "stop or kill the server first"
        return self.start(*args, port=server.port, data_dir=data_dir)

    @staticmethod
    def kill(server: servers.Server) -> None:
        """SIGKILL by pid and reap: no shutdown code of the server runs."""
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(servers.STOP_TIMEOUT)
        assert server.proc.returncode == -signal.SIGKILL
        server.stop()  # closes the stderr log; the process is already reaped

    @staticmethod
    def terminate(server: servers.Server) -> int:
        """SIGTERM (clean shutdown); returns the exit status."""
        return server.stop()

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()
            server.remove_workdir()


class Packets(servers.Connection):
    """servers.Connection to 127.0.0.1, with replies checked and split into arguments."""

    def __init__(self, port: int, timeout: float = IO_TIMEOUT) -> None:
        super().__init__(HOST, port, timeout)

    def expect(self, packet_type: int, timeout: float | None = None) -> list[bytes]:
        """The next reply, which must be of this type; its NUL-separated arguments."""
        got, payload = self.recv(timeout)
        assert got == packet_type, f"expected {T(packet_type).name}, got {_name(got)} {payload!r}"
        return split_args(packet_type, payload)

    def request(self, packet_type: int, *args: bytes, expect: int) -> list[bytes]:  # type: ignore[override]
        self.send(packet_type, *args)
        return self.expect(expect)

    def submit(self, packet_type: int, function: bytes, unique: bytes, *rest: bytes) -> bytes:
        """A submit that must be acknowledged; returns the handle."""
        (handle,) = self.request(packet_type, function, unique, *rest, expect=T.JOB_CREATED)
        return handle

    def echo(self, data: bytes = b"ping") -> None:
        assert self.request(T.ECHO_REQ, data, expect=T.ECHO_RES) == [data]


_ARGC = {
    T.JOB_CREATED: 1,
    T.JOB_ASSIGN: 3,
    T.JOB_ASSIGN_UNIQ: 4,
    T.JOB_ASSIGN_ALL: 5,
    T.ERROR: 2,
    T.ECHO_RES: 1,
    T.STATUS_RES: 5,
    T.STATUS_RES_UNIQUE: 6,
    T.WORK_COMPLETE: 2,
    T.WORK_FAIL: 1,
    T.NO_JOB: 0,
    T.NOOP: 0,
}


def split_args(packet_type: int, payload: bytes) -> list[bytes]:
    """Split by the fixed argument count of the type: the last argument may hold NULs."""
    argc = _ARGC.get(packet_type, 1)
    if argc == 0:
        return []
    return payload.split(b"\0", argc - 1)


def _name(packet_type: int) -> str:
    try:
        return T(packet_type).name
    except ValueError:
        return str(packet_type)


def status(server: servers.Server) -> dict[str, tuple[int, int, int]]:
    return servers.status(server.address)


def queued(server: servers.Server, function: str) -> int:
    """Jobs of `function` that are queued or running (admin `status` total)."""
    return status(server).get(function, (0, 0, 0))[0]


def drain(
    server: servers.Server,
    function: bytes,
    limit: float = 60.0,
    grab_type: int = T.GRAB_JOB_UNIQ,
) -> list[list[bytes]]:
    """Run every job of `function` until NO_JOB and `status` shows none queued; each job is
    completed at once. Returns the JOB_ASSIGN_UNIQ arguments (handle, function, unique,
    payload) of every job run, in the order they were handed out."""
    ran: list[list[bytes]] = []
    deadline = time.monotonic() + limit
    with Packets(server.port) as worker:
        worker.send(T.CAN_DO, function)
        worker.send(grab_type)
        while time.monotonic() < deadline:
            packet_type, payload = worker.recv()
            if packet_type == T.NO_JOB:
                if queued(server, function.decode()) == 0:
                    return ran
                time.sleep(0.05)
                worker.send(grab_type)
                continue
            assert packet_type in (T.JOB_ASSIGN_UNIQ, T.JOB_ASSIGN, T.JOB_ASSIGN_ALL), (
                f"worker got {_name(packet_type)} {payload[:60]!r}"
            )
            args = split_args(packet_type, payload)
            ran.append(args)
            # Complete it and ask for the next in one write.
            worker.send_raw(
                pack_request(T.WORK_COMPLETE, args[0], b"done") + pack_request(grab_type)
            )
    raise AssertionError(f"the queue of {function!r} did not drain within {limit}s")
