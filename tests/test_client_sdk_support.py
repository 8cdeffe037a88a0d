"""Helpers for the client SDK tests (this module holds no tests).

`RawWorker` is a small Gearman worker written directly on jobserver.protocol and the shared
connection layer, so the client tests do not depend on worker_sdk: it registers functions,
loops GRAB_JOB_UNIQ / PRE_SLEEP / NOOP, and lets each test's handler send WORK_STATUS, WORK_DATA,
WORK_WARNING, WORK_FAIL, WORK_EXCEPTION or WORK_COMPLETE.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import servers

from jobserver.protocol import PacketType
from jobserver.sdk.addresses import parse_address
from jobserver.sdk.connection import ConnectionLost, ServerConnection

T = PacketType

WORKER_POLL = 0.2
"""A sleeping test worker grabs again after this long even without NOOP: gearmand 1.1.x never
wakes workers when an epoch job comes due (shared doc §3.11)."""


@dataclass
class WorkerJob:
    """One assigned job as a test handler sees it."""

    handle: bytes
    function: str
    unique: bytes
    payload: bytes
    connection: ServerConnection

    async def status(self, numerator: int, denominator: int) -> None:
        await self.connection.send(
            T.WORK_STATUS, self.handle, str(numerator).encode(), str(denominator).encode()
        )

    async def data(self, data: bytes) -> None:
        await self.connection.send(T.WORK_DATA, self.handle, data)

    async def warning(self, data: bytes) -> None:
        await self.connection.send(T.WORK_WARNING, self.handle, data)

    async def fail(self) -> None:
        await self.connection.send(T.WORK_FAIL, self.handle)

    async def exception(self, text: bytes) -> None:
        """WORK_EXCEPTION then WORK_FAIL, as libgearman workers send it."""
        await self.connection.send(T.WORK_EXCEPTION, self.handle, text)
        await self.connection.send(T.WORK_FAIL, self.handle)


Handler = Callable[[WorkerJob], Awaitable[bytes | None]]
"""Returns the result to send with WORK_COMPLETE, or None when it already ended the job."""


async def echo(job: WorkerJob) -> bytes:
    return job.payload


@dataclass
class RawWorker:
    """A worker on one server for the given functions; `executed` records every job run."""

    server: servers.Server
    handlers: dict[str, Handler]
    poll: float | None = WORKER_POLL
    executed: list[WorkerJob] = field(default_factory=list)

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Register, report started once the server has processed the registrations, then
        work until cancelled or until the server goes away."""
        connection = await ServerConnection.open(parse_address(self.server.address))
        try:
            await connection.send(T.SET_CLIENT_ID, b"client-sdk-test-worker")
            for name in self.handlers:
                await connection.send(T.CAN_DO, name.encode())
            await connection.send(T.ECHO_REQ, b"registered")
            while (await connection.receive()).type != T.ECHO_RES:
                pass
            task_status.started()
            await self._work(connection)
        except ConnectionLost:
            return  # the server was stopped or killed: this worker's part is over
        finally:
            await connection.aclose()

    async def _work(self, connection: ServerConnection) -> None:
        while True:
            await connection.send(T.GRAB_JOB_UNIQ)
            packet = await connection.receive()
            while packet.type in (T.NOOP, T.ERROR):  # a NOOP left over from a poll
                packet = await connection.receive()
            if packet.type == T.NO_JOB:
                await connection.send(T.PRE_SLEEP)
                with anyio.move_on_after(self.poll if self.poll is not None else float("inf")):
                    while (await connection.receive()).type != T.NOOP:
                        pass
                continue
            assert packet.type == T.JOB_ASSIGN_UNIQ, packet
            handle, function, unique, payload = packet.args
            job = WorkerJob(handle, function.decode(), unique, payload, connection)
            self.executed.append(job)
            result = await self.handlers[job.function](job)
            if result is not None:
                await connection.send(T.WORK_COMPLETE, handle, result)


@asynccontextmanager
async def workers_running(*workers: RawWorker) -> AsyncIterator[None]:
    """Run the workers (each registered before the body starts); stop them afterwards."""
    async with anyio.create_task_group() as nursery:
        for worker in workers:
            await nursery.start(worker.run)
        yield
        nursery.cancel_scope.cancel()


async def server_status(server: servers.Server) -> dict[str, tuple[int, int, int]]:
    """The admin `status` table of a server, without blocking the trio loop."""
    return await anyio.to_thread.run_sync(servers.status, server.address)


async def admin(server: servers.Server, line: str) -> bytes:
    return await anyio.to_thread.run_sync(servers.admin, server.address, line)


async def eventually(predicate: Callable[[], Awaitable[object]], interval: float = 0.02):
    """Poll an async predicate until it is truthy; the test's fail_after bounds it."""
    while True:
        value = await predicate()
        if value:
            return value
        await anyio.sleep(interval)


async def listeners_of_unique(server: servers.Server, unique: bytes) -> int:
    """client_count from GET_STATUS_UNIQUE: foreground submits attached to the job (§3.10)."""

    def ask() -> int:
        with server.connect() as conn:
            conn.send(T.GET_STATUS_UNIQUE, unique)
            reply_type, payload = conn.recv()
            assert reply_type == T.STATUS_RES_UNIQUE, (reply_type, payload)
            return int(payload.split(b"\0")[5])

    return await anyio.to_thread.run_sync(ask)


def nothing_listening() -> str:
    """The address of a 127.0.0.1 port nothing listens on (connects are refused)."""
    return f"{servers.HOST}:{servers.free_port()}"


def kill(server: servers.Server) -> None:
    """SIGKILL the server by its pid and reap it: no goodbye to any connection."""
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(servers.STOP_TIMEOUT)
