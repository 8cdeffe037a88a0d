"""What an idle connection costs the server in tasks: one (its reader). A writer task exists
only while output waits for a peer that does not read, and ends once that output is sent; a
peer that stops reading for good is still dropped at the outbox cap, its writer with it.

Fleets of idle workers are the normal case (issue 16: RSS per idle connection against
gearmand's), so the structure is checked here, in-process, by counting trio's tasks; the
bytes are measured in bench/ (scenario (f)).
"""

from __future__ import annotations

import trio
import trio.testing

from jobserver.protocol import PacketType as T
from jobserver.protocol import encode_request
from jobserver.server import Server, ServerConfig

IDLE = 20
"""Idle connections opened: enough that a per-connection task pair would show clearly."""

ECHO_SIZE = 16 << 20
"""Bytes echoed to the peer that does not read: more than the kernel's buffers on loopback
take (the server's send buffer, autotuned up to tcp_wmem's 4 MiB by default, and the peer's
receive buffer, up to tcp_rmem's 6 MiB), so the rest waits in `pending` for a writer task."""

WAIT_LIMIT = 30.0
"""Seconds any one condition below may take to come true (it takes milliseconds)."""


def task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            count(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    return count(trio.lowlevel.current_root_task())


async def wait_until(condition) -> None:
    with trio.fail_after(WAIT_LIMIT):
        while not condition():
            await trio.sleep(0.01)


async def test_an_idle_connection_is_one_task_and_a_writer_lives_only_while_output_waits():
    server = Server(ServerConfig(port=0, listen="127.0.0.1", store="memory"))
    listeners = await server.bind()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        before = task_count()
        idle = []
        for _ in range(IDLE):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", server.port))
            idle.append(sock)
        await wait_until(lambda: server.gate.open == IDLE)
        await trio.testing.wait_all_tasks_blocked()
        assert task_count() - before == IDLE  # one task each: no writer for idle peers

        # A peer that asks for 16 MiB back and does not read yet.
        slow = trio.socket.socket()
        await slow.connect(("127.0.0.1", server.port))
        request = memoryview(encode_request(T.ECHO_REQ, b"x" * ECHO_SIZE))
        with trio.fail_after(WAIT_LIMIT):
            while request:
                request = request[await slow.send(request) :]
        await wait_until(lambda: task_count() - before == IDLE + 2)  # its reader and a writer

        received = 0
        expected = 12 + ECHO_SIZE
        with trio.fail_after(WAIT_LIMIT):
            while received < expected:
                received += len(await slow.recv(65536))
        await wait_until(lambda: task_count() - before == IDLE + 1)  # the writer ended
        assert received == expected

        for sock in [*idle, slow]:
            sock.close()
        await wait_until(lambda: server.gate.open == 0)
        await wait_until(lambda: task_count() == before)
        nursery.cancel_scope.cancel()
