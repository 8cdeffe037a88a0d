"""Client SDK routing without a server process: rendezvous order, and how one session matches
replies FIFO and hands WORK_* packets to its waiting calls.

The session is driven through an in-memory stream by a scripted peer that writes exact server
packets, for the cases a real server produces only by accident of timing or configuration:
WORK_FAIL with gearmand's trailing NUL (§3.8), coalesced copies for one connection (§3.2), a
caller that gave up between copies, ERROR in the reply FIFO, a connection lost mid-job.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest

from client_sdk import Data, JobFailed, JobLost, ServerError, Status
from client_sdk.jobs import JobWaiter
from client_sdk.server_pool import rendezvous_order
from client_sdk.session import Session
from client_sdk.submission import foreground
from jobserver.protocol import Decoder, Packet, PacketType, encode_response
from jobserver.sdk.addresses import ServerAddress
from jobserver.sdk.connection import ConnectionLost, ServerConnection

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

T = PacketType
SERVERS = ["10.0.0.1:4730", "10.0.0.2:4730", "10.0.0.3:4730"]


def test_rendezvous_order_is_stable_and_ignores_the_listing_order():
    first = rendezvous_order(b"resize", b"a.png", SERVERS)
    assert sorted(first) == sorted(SERVERS)
    assert rendezvous_order(b"resize", b"a.png", list(reversed(SERVERS))) == first
    assert rendezvous_order(b"resize", b"a.png", SERVERS) == first


def test_rendezvous_removing_a_server_moves_only_its_jobs():
    keys = [f"item-{n}".encode() for n in range(600)]
    before = {key: rendezvous_order(b"f", key, SERVERS) for key in keys}
    remaining = SERVERS[1:]
    for key, order in before.items():
        after = rendezvous_order(b"f", key, remaining)
        # The fallback is the next server of the full order: all clients agree on it.
        assert after == [server for server in order if server in remaining]


def test_rendezvous_spreads_uniques_over_the_servers():
    counts = Counter(rendezvous_order(b"f", b"%d" % n, SERVERS)[0] for n in range(3000))
    assert set(counts) == set(SERVERS)
    assert min(counts.values()) > 800  # 1000 each on average


def test_rendezvous_depends_on_the_function_too():
    firsts = {rendezvous_order(f"fn{n}".encode(), b"same", SERVERS)[0] for n in range(50)}
    assert len(firsts) > 1


class ScriptedServer:
    """The server end of an in-memory connection: reads requests, writes exact replies."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = Decoder(accept_admin=False)
        self.pending: list[Packet] = []

    async def expect(self, packet_type: int) -> Packet:
        while not self.pending:
            self.pending.extend(self.decoder.feed(await self.stream.receive(65536)))
        packet = self.pending.pop(0)
        assert packet.type == packet_type, packet
        return packet

    async def send(self, packet_type: int, *args: bytes) -> None:
        await self.stream.send(encode_response(packet_type, *args))


SETTLE_ROUNDS = 500
"""How often `settle` lets the session's tasks run (10 ms apart, 5 s in all) before giving up:
bytes cross a socket pair asynchronously, so "every task is blocked" alone does not mean the
session has read what the script just sent."""


async def settle(condition: Callable[[], bool]) -> None:
    """Let the session's tasks run until `condition` holds (the assertion after it checks)."""
    for _ in range(SETTLE_ROUNDS):
        await anyio.wait_all_tasks_blocked()
        if condition():
            return
        await anyio.sleep(0.01)


@asynccontextmanager
async def scripted_session():
    # A connected socket pair: the session's real connection code on one end, the script on
    # the other.
    client_socket, server_socket = socket.socketpair()
    client_end = await anyio.abc.UNIXSocketStream.from_socket(client_socket)
    server_end = await anyio.abc.UNIXSocketStream.from_socket(server_socket)
    session = Session(ServerConnection(client_end, ServerAddress("scripted", 4730)))
    async with anyio.create_task_group() as nursery:
        await nursery.start(session.run)
        yield session, ScriptedServer(server_end), nursery
        session.close(ConnectionLost("scripted:4730: test over"))


async def submit_and_watch(session, nursery, results: dict, key, *, streaming=True):
    submission = foreground("f", b"x", b"same", "normal")

    async def run() -> None:
        waiter = JobWaiter("f", session.server, streaming=streaming)
        await session.submit(submission, waiter)
        updates = []
        while (update := await waiter.next_update()) is not None:
            updates.append(update)
        try:
            updates.append(await waiter.outcome())
        except Exception as error:
            updates.append(error)
        results[key] = updates

    nursery.start_soon(run)


async def test_work_fail_with_gearmands_trailing_nul_fails_the_job():
    with anyio.fail_after(5):
        results: dict = {}
        async with scripted_session() as (session, server, nursery):
            await submit_and_watch(session, nursery, results, 1)
            await server.expect(T.SUBMIT_JOB)
            await server.send(T.JOB_CREATED, b"H:1")
            await server.send(T.WORK_FAIL, b"H:1\0")
            await settle(lambda: 1 in results)
        [failure] = results[1]
        assert isinstance(failure, JobFailed) and failure.handle == "H:1"


async def test_coalesced_copies_go_once_to_each_waiting_call():
    with anyio.fail_after(5):
        results: dict = {}
        async with scripted_session() as (session, server, nursery):
            await submit_and_watch(session, nursery, results, 1)
            await submit_and_watch(session, nursery, results, 2)
            await server.expect(T.SUBMIT_JOB)
            await server.expect(T.SUBMIT_JOB)
            await server.send(T.JOB_CREATED, b"H:1")
            await server.send(T.JOB_CREATED, b"H:1")  # coalesced: the same handle again
            for packet in (
                (T.WORK_STATUS, b"H:1", b"1", b"2"),
                (T.WORK_DATA, b"H:1", b"half"),
                (T.WORK_COMPLETE, b"H:1", b"done"),
            ):
                await server.send(*packet)  # one copy per submit, one after the other
                await server.send(*packet)
            await settle(lambda: len(results) == 2)
            assert session.tracked_jobs == 0
        assert results == {n: [Status(1, 2), Data(b"half"), b"done"] for n in (1, 2)}


async def test_copies_for_a_call_that_gave_up_are_absorbed():
    with anyio.fail_after(5):
        results: dict = {}
        async with scripted_session() as (session, server, nursery):
            submission = foreground("f", b"x", b"same", "normal")
            quitter = JobWaiter("f", session.server, streaming=True)
            nursery.start_soon(session.submit, submission, quitter)
            await server.expect(T.SUBMIT_JOB)
            await server.send(T.JOB_CREATED, b"H:7")
            await settle(lambda: bool(quitter.handle))
            session.forget(quitter)  # e.g. its timeout passed

            await submit_and_watch(session, nursery, results, "stayed")
            await server.expect(T.SUBMIT_JOB)
            await server.send(T.JOB_CREATED, b"H:7")
            for packet in ((T.WORK_DATA, b"H:7", b"d"), (T.WORK_COMPLETE, b"H:7", b"r")):
                await server.send(*packet)
                await server.send(*packet)
            await settle(lambda: "stayed" in results)
            assert (session.tracked_jobs, session.waiting_calls) == (0, 0)
        assert results == {"stayed": [Data(b"d"), b"r"]}
        assert not quitter.done


async def test_error_reply_goes_to_its_own_request_in_fifo_order():
    with anyio.fail_after(5):
        outcomes: dict = {}
        async with scripted_session() as (session, server, nursery):

            async def submit(unique: bytes) -> None:
                try:
                    outcomes[unique] = await session.submit(
                        foreground("f", b"x", unique, "low"), None
                    )
                except ServerError as error:
                    outcomes[unique] = (error.code, error.text)

            nursery.start_soon(submit, b"first")
            await server.expect(T.SUBMIT_JOB_LOW)
            nursery.start_soon(submit, b"second")
            await server.expect(T.SUBMIT_JOB_LOW)
            await server.send(T.ERROR, b"QUEUE_ERROR", b"Job queue is full")
            await server.send(T.JOB_CREATED, b"H:2")
            await settle(lambda: len(outcomes) == 2)
        assert outcomes == {b"first": ("QUEUE_ERROR", "Job queue is full"), b"second": "H:2"}


async def test_connection_lost_fails_requests_and_loses_accepted_jobs():
    with anyio.fail_after(5):
        results: dict = {}
        waiting_reply: list = []
        async with scripted_session() as (session, server, nursery):
            await submit_and_watch(session, nursery, results, "accepted", streaming=False)
            await server.expect(T.SUBMIT_JOB)
            await server.send(T.JOB_CREATED, b"H:3")

            async def unanswered() -> None:
                with pytest.raises(ConnectionLost) as caught:
                    await session.submit(foreground("f", b"y", b"", "high"), None)
                waiting_reply.append(str(caught.value))

            nursery.start_soon(unanswered)
            await server.expect(T.SUBMIT_JOB_HIGH)
            await server.stream.aclose()
            await settle(lambda: session.closed)
            assert session.closed
        [lost] = results["accepted"]
        assert isinstance(lost, JobLost) and "H:3" in str(lost) and "scripted:4730" in str(lost)
        assert waiting_reply == ["scripted:4730: the server closed the connection"]


async def test_reply_of_the_wrong_type_closes_the_connection():
    with anyio.fail_after(5):
        async with scripted_session() as (session, server, nursery):
            errors = []

            async def submit() -> None:
                try:
                    await session.submit(foreground("f", b"x", b"", "normal"), None)
                except ConnectionLost as error:
                    errors.append(error)

            nursery.start_soon(submit)
            await server.expect(T.SUBMIT_JOB)
            await server.send(T.STATUS_RES, b"H:1", b"0", b"0", b"0", b"0")
            await settle(lambda: session.closed)
            assert session.closed
        assert len(errors) == 1 and "STATUS_RES" in str(errors[0])
