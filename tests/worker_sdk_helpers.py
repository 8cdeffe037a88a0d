"""Helpers for the worker SDK tests: raw-protocol clients that trio tests can await, admin
queries, and a Worker served in the background of a test.

The clients are tests/wire.py connections (encoded with jobserver.protocol, not the client SDK)
whose blocking reads run in threads, so the worker under test keeps running in the test's own
trio loop while a test waits for replies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import servers
from wire import Wire

from jobserver.protocol import Packet
from jobserver.protocol import PacketType as T
from worker_sdk import Worker

TEST_TIMEOUT = 60
"""Seconds any one test may take in all (anyio.fail_after); generous for a loaded CI machine:
a test that hangs fails instead of stalling the run."""

REPLY_TIMEOUT = 30.0
"""Seconds one awaited packet may take to arrive (the test's own deadline usually cuts first)."""

POLL = 0.02
"""Pause between admin polls while waiting for a worker to (re)register."""

TERMINAL = {T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION}


class Client:
    """A foreground client connection to one server, awaited from trio."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    @classmethod
    async def connect(cls, server, *, exceptions: bool = False) -> Client:
        wire = await anyio.to_thread.run_sync(Wire.to, server)
        client = cls(wire)
        if exceptions:
            await client.call(wire.send, T.OPTION_REQ, b"exceptions")
            await client.call(wire.expect, T.OPTION_RES, b"exceptions")
        return client

    async def call(self, fn, *args, **kwargs):
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), abandon_on_cancel=True)

    async def submit(
        self, function: str, payload: bytes = b"", unique: str = "", kind: int = T.SUBMIT_JOB
    ) -> bytes:
        return await self.call(self.wire.submit, function.encode(), payload, unique.encode(), kind)

    async def read(self) -> Packet:
        return await self.call(self.wire.read_packet, REPLY_TIMEOUT)

    async def until_done(self, handle: bytes) -> list[Packet]:
        """Every packet for `handle` up to and including its WORK_COMPLETE/FAIL/EXCEPTION."""
        packets = []
        while True:
            packet = await self.read()
            assert packet.args[0].rstrip(b"\0") == handle, f"{packet} is not for {handle!r}"
            packets.append(packet)
            if packet.type in TERMINAL:
                return packets

    async def run(self, function: str, payload: bytes = b"", unique: str = "") -> Packet:
        """Submit a foreground job and return its final packet."""
        handle = await self.submit(function, payload, unique)
        return (await self.until_done(handle))[-1]

    def close(self) -> None:
        self.wire.close()


async def submit_background(server, function: str, payload: bytes = b"", unique: str = ""):
    """Submit a background job on a short-lived connection; returns its handle."""

    def submit() -> bytes:
        with Wire.to(server) as wire:
            return wire.submit(function.encode(), payload, unique.encode(), T.SUBMIT_JOB_BG)

    return await anyio.to_thread.run_sync(submit)


async def status(server) -> dict[str, tuple[int, int, int]]:
    """The admin `status` table: function -> (total, running, workers)."""
    return await anyio.to_thread.run_sync(servers.status, server.address)


async def admin(server, line: str) -> str:
    return (await anyio.to_thread.run_sync(servers.admin, server.address, line)).decode()


async def wait_for_workers(server, function: str, count: int = 1) -> None:
    """Until `status` shows at least `count` registrations of `function` (the caller's
    fail_after bounds the wait)."""
    while (await status(server)).get(function, (0, 0, 0))[2] < count:
        await anyio.sleep(POLL)


async def wait_for_status(server, function: str, expected: tuple[int, int, int]) -> None:
    """Until `status` shows exactly (total, running, workers) for `function`. A function
    missing from `status` counts as (0, 0, 0): jobserver forgets a function nothing uses,
    gearmand lists it with zeros."""
    while (await status(server)).get(function, (0, 0, 0)) != expected:
        await anyio.sleep(POLL)


@asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[Worker]:
    """Run worker.serve() in the background of the block; stop it (gracefully) at the end and
    wait until serve() has returned."""
    async with anyio.create_task_group() as nursery:
        nursery.start_soon(worker.serve)
        try:
            yield worker
        except BaseException:
            nursery.cancel_scope.cancel()  # a failing test does not wait for the grace period
            raise
        worker.stop()
