"""Client SDK with several servers: server choice by (function, unique), failover, lost jobs.

Clusters are made of real servers of one kind (jobserver or gearmand, `start_server`); "down"
is a port nothing listens on, or a server killed with SIGKILL by its pid.
"""

from __future__ import annotations

import random

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest
from test_client_sdk_support import (
    RawWorker,
    WorkerJob,
    echo,
    eventually,
    kill,
    nothing_listening,
    server_status,
    workers_running,
)

from client_sdk import Client, JobLost, JobStatus, NoServerAvailable
from client_sdk.server_pool import rendezvous_order

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

TEST_TIMEOUT = 30


@pytest.fixture(params=["jobserver", "gearmand"])
def start_server(request):
    """A factory for servers of one kind, once per kind."""
    return request.getfixturevalue(f"start_{request.param}")


def unique_placed_on(function: str, target: str, servers: list[str], prefix: str = "u") -> str:
    """A unique id that rendezvous hashing puts on `target` first."""
    for n in range(10_000):
        unique = f"{prefix}{n}"
        if rendezvous_order(function.encode(), unique.encode(), servers)[0] == target:
            return unique
    raise AssertionError("no unique found")


async def total_jobs(server, function: str) -> int:
    return (await server_status(server)).get(function, (0, 0, 0))[0]


async def test_first_server_down_job_is_served_by_the_second(start_server):
    with anyio.fail_after(TEST_TIMEOUT):
        live = start_server()
        down = nothing_listening()
        worker = RawWorker(live, {"echo": echo})
        async with workers_running(worker), Client([down, live.address]) as client:
            assert await client.submit("echo", "no unique") == "no unique"
            unique = unique_placed_on("echo", down, [down, live.address])
            assert await client.submit("echo", "unique", unique=unique) == "unique"
            handle = await client.submit_background("echo", "background", unique=unique)
            assert handle.server == live.address
            await eventually(lambda: _executed(worker, 3))


async def _executed(worker: RawWorker, count: int) -> bool:
    return len(worker.executed) >= count


async def test_server_lost_before_job_created_is_resubmitted_to_the_next(start_server):
    # A server that accepts the connection and drops it on the first request: the job was
    # never accepted there, so the caller must not notice.
    with anyio.fail_after(TEST_TIMEOUT):
        live = start_server()
        dropped = 0

        async def drop_on_first_bytes(stream: anyio.abc.SocketStream) -> None:
            nonlocal dropped
            await stream.receive(1)
            dropped += 1
            await stream.aclose()

        async with anyio.create_task_group() as nursery:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            nursery.start_soon(listener.serve, drop_on_first_bytes)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            crashing = f"127.0.0.1:{port}"
            worker = RawWorker(live, {"echo": echo})
            async with workers_running(worker), Client([crashing, live.address]) as client:
                assert await client.submit("echo", 1) == 1
            assert dropped == 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("retry", [False, True])
async def test_server_killed_after_job_created(start_server, retry):
    with anyio.fail_after(TEST_TIMEOUT):
        doomed, survivor = start_server(), start_server()
        names = [doomed.address, survivor.address]
        unique = unique_placed_on("work", doomed.address, names)
        started = anyio.Event()

        async def never_finishes(job: WorkerJob) -> None:
            started.set()
            await anyio.sleep_forever()

        doomed_worker = RawWorker(doomed, {"work": never_finishes})
        survivor_worker = RawWorker(survivor, {"work": echo})
        outcome: dict[str, object] = {}
        async with workers_running(doomed_worker, survivor_worker), Client(names) as client:

            async def submit() -> None:
                try:
                    outcome["result"] = await client.submit(
                        "work", {"n": 1}, unique=unique, retry=retry
                    )
                except JobLost as error:
                    outcome["error"] = error

            async with anyio.create_task_group() as nursery:
                nursery.start_soon(submit)
                await started.wait()
                session = client._pool.server(doomed.address).session
                await eventually(lambda: _tracking(session))  # JOB_CREATED was read
                handle = doomed_worker.executed[0].handle.decode()
                kill(doomed)

        if retry:
            assert outcome == {"result": {"n": 1}}
            assert [job.unique for job in survivor_worker.executed] == [unique.encode()]
        else:
            error = outcome["error"]
            assert isinstance(error, JobLost)
            assert doomed.address in str(error) and handle in str(error)
            assert error.handle == handle and error.function == "work"
            assert survivor_worker.executed == []


async def _tracking(session) -> bool:
    await anyio.sleep(0)
    return session.tracked_jobs == 1


async def test_same_function_and_unique_always_go_to_the_same_server(start_server):
    with anyio.fail_after(TEST_TIMEOUT):
        cluster = [start_server() for _ in range(3)]
        names = [server.address for server in cluster]
        by_name = {server.address: server for server in cluster}
        placed: dict[str, str] = {}
        for n in range(6):
            unique = f"item-{n}"
            for attempt in range(3):  # three clients, each listing the servers differently
                order = random.Random(n * 10 + attempt).sample(names, len(names))
                async with Client(order) as client:
                    handle = await client.submit_background("pinned", n, unique=unique)
                placed.setdefault(unique, handle.server)
                assert handle.server == placed[unique]
        # One job per unique: the repeats coalesced on the server holding the first.
        totals = {name: await total_jobs(by_name[name], "pinned") for name in names}
        assert totals == {name: list(placed.values()).count(name) for name in names}
        for unique, name in placed.items():
            assert rendezvous_order(b"pinned", unique.encode(), names)[0] == name

        # With that server down, every client goes to the same fallback.
        unique, chosen = next(iter(placed.items()))
        kill(by_name[chosen])
        fallbacks = set()
        for attempt in range(3):
            order = random.Random(attempt).sample(names, len(names))
            async with Client(order) as client:
                fallbacks.add((await client.submit_background("pinned", 0, unique=unique)).server)
        expected = rendezvous_order(b"pinned", unique.encode(), names)[1]
        assert fallbacks == {expected}
        assert await total_jobs(by_name[expected], "pinned") == totals[expected] + 1


async def test_duplicates_from_two_clients_coalesce_on_one_server(start_server):
    with anyio.fail_after(TEST_TIMEOUT):
        cluster = [start_server() for _ in range(3)]
        names = [server.address for server in cluster]
        release = anyio.Event()

        async def gated(job: WorkerJob) -> bytes:
            await release.wait()
            return job.payload

        workers = [RawWorker(server, {"once": gated}) for server in cluster]
        results = []
        async with (
            workers_running(*workers),
            Client(names) as first,
            Client(list(reversed(names))) as second,
        ):

            async def submit(client: Client) -> None:
                results.append(await client.submit("once", "x", unique="shared-thing"))

            async with anyio.create_task_group() as nursery:
                nursery.start_soon(submit, first)
                await eventually(lambda: _running_somewhere(workers))
                nursery.start_soon(submit, second)
                await eventually(lambda: _both_attached(first, second))
                release.set()
        assert results == ["x", "x"]
        assert sum(len(worker.executed) for worker in workers) == 1


async def _running_somewhere(workers: list[RawWorker]) -> bool:
    await anyio.sleep(0)
    return any(worker.executed for worker in workers)


async def _both_attached(*clients: Client) -> bool:
    await anyio.sleep(0)
    return all(
        any(server.session and server.session.tracked_jobs for server in client._pool.servers)
        for client in clients
    )


async def test_jobs_without_unique_are_spread_round_robin(start_server):
    with anyio.fail_after(TEST_TIMEOUT):
        cluster = [start_server(), start_server()]
        workers = [RawWorker(server, {"echo": echo}) for server in cluster]
        async with workers_running(*workers), Client([s.address for s in cluster]) as client:
            for n in range(6):
                assert await client.submit("echo", n) == n
        assert [len(worker.executed) for worker in workers] == [3, 3]


async def test_no_server_available_names_each_server():
    with anyio.fail_after(TEST_TIMEOUT):
        down = [nothing_listening(), nothing_listening()]
        async with Client(down) as client:
            for call in (
                lambda: client.submit("echo", 1),
                lambda: client.submit("echo", 1, unique="u"),
                lambda: client.submit_background("echo", 1),
                lambda: client.status("H:host:1"),
            ):
                with pytest.raises(NoServerAvailable) as caught:
                    await call()
                for address in down:
                    assert address in str(caught.value)


async def test_status_asks_the_server_holding_the_job(start_server):
    with anyio.fail_after(TEST_TIMEOUT):
        cluster = [start_server(), start_server()]
        names = [server.address for server in cluster]
        async with Client(names) as client:
            unique = unique_placed_on("queued", names[1], names)
            handle = await client.submit_background("queued", 1, unique=unique)
            assert handle.server == names[1]
            assert await client.status(handle) == JobStatus(True, False, 0, 0)
            assert await client.status(str(handle)) == JobStatus(True, False, 0, 0)
            assert await client.status("H:nowhere:1") == JobStatus(False, False, 0, 0)
            with pytest.raises(ValueError, match="not one of this client's servers"):
                await client.status(type(handle)("H:x:1", server="10.9.9.9:4730"))


async def test_a_restarted_server_gets_its_jobs_again(start_jobserver):
    with anyio.fail_after(TEST_TIMEOUT):
        first, second = start_jobserver(), start_jobserver()
        names = [first.address, second.address]
        async with Client(names) as client:
            kill(first)
            unique = unique_placed_on("back", first.address, names)
            assert (await client.submit_background("back", 0, unique=unique)).server == names[1]
            start_jobserver(port=first.port)
            n = 0

            async def lands_on_first() -> bool:
                nonlocal n
                n += 1
                unique = unique_placed_on("back", first.address, names, prefix=f"r{n}-")
                handle = await client.submit_background("back", n, unique=unique)
                return handle.server == first.address

            await eventually(lands_on_first, interval=0.2)
