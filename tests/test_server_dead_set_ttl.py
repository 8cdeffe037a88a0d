"""--dead-ttl on a running server (issue 13): the server's dead-set task (server_store.py)
sweeps the dead set every DEAD_SET_CHECK_INTERVAL and logs what it dropped.

At start the server drops what expired while it was down (test_failed_jobs_live.py); a dead
job that outlives its ttl while the server runs, or one adopted from a dead peer already past
it, waits for this sweep. The sweep is a minute apart, so the server runs here in-process on
trio's virtual clock (autojump_clock): the minute costs nothing. Its engine keeps the real
wall clock, so the dead jobs' ages are real: one failed long ago, one just now.
"""

from __future__ import annotations

import logging
import time

import trio

from jobserver.engine.journal import DeadJob
from jobserver.server import Server, ServerConfig
from jobserver.server_store import DEAD_SET_CHECK_INTERVAL

TTL = 3600.0
"""Seconds of --dead-ttl here: far longer than the test takes in real time, so the fresh dead
job cannot expire during it, however slow the machine."""


def dead_job(dead_id: int, handle: bytes, failed_s_ago: float) -> DeadJob:
    failed_ms = int((time.time() - failed_s_ago) * 1000)
    return DeadJob(dead_id, handle, b"fn", b"", 1, b"", b"x", 1, failed_ms, failed_ms, b"boom")


async def test_a_running_server_drops_a_dead_job_past_dead_ttl_at_its_next_sweep(
    autojump_clock, caplog
):
    caplog.set_level(logging.WARNING, logger="jobserver")
    server = Server(ServerConfig(port=0, listen="127.0.0.1", store="memory", dead_ttl=TTL))
    listeners = await server.bind()
    engine = server.engine
    assert engine is not None
    # As a takeover adopts a dead peer's dead set (ownership.py): one of its jobs is past the
    # ttl already, yet nothing drops it on arrival.
    engine.restore_dead([dead_job(-1, b"H:peer:old", 2 * TTL), dead_job(-2, b"H:peer:new", 0)])

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        assert [dead.handle for dead in engine.dead] == [b"H:peer:old", b"H:peer:new"]

        await trio.sleep(DEAD_SET_CHECK_INTERVAL + 1)  # virtual seconds

        assert [dead.handle for dead in engine.dead] == [b"H:peer:new"]
        assert [record.getMessage() for record in caplog.records] == [
            "dead set: dropped the 1 oldest dead jobs (past --dead-ttl or over --dead-max); 1 kept"
        ]
        assert engine.dead.dropped == 0  # logged once, not again at the next sweep
        nursery.cancel_scope.cancel()
