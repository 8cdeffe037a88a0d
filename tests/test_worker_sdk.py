"""Worker SDK against real servers (jobserver and gearmand 1.1.20 through `any_server`): jobs in
every codec, the job object, progress packets, exceptions, bad payloads, CAN_DO_TIMEOUT.

Jobs are submitted with raw packets (tests/wire.py), never with the client SDK, so these tests
pin the worker's side of the protocol on its own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import msgpack
import pytest
from worker_sdk_helpers import TEST_TIMEOUT, Client, admin, serving, status, wait_for_workers

from jobserver.protocol import PacketType as T
from worker_sdk import Worker

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)

# codec -> (argument as the client encodes it, decoded argument, result the function returns,
#           result bytes the client must receive)
CASES = {
    "msgpack": (
        msgpack.packb({"path": "a.png", "sizes": [1, 2], "blob": b"\0\xff"}),
        {"path": "a.png", "sizes": [1, 2], "blob": b"\0\xff"},
        {"ok": True, "n": 3},
        msgpack.packb({"ok": True, "n": 3}),
    ),
    "json": (
        b'{"path":"a.png","sizes":[1,2]}',
        {"path": "a.png", "sizes": [1, 2]},
        {"ok": True, "n": 3},
        json.dumps({"ok": True, "n": 3}, separators=(",", ":")).encode(),
    ),
    "raw": (b"bytes\0with NUL", b"bytes\0with NUL", b"done\0!", b"done\0!"),
}


@pytest.mark.parametrize("codec", CASES)
async def test_async_function_gets_the_decoded_argument_and_its_result_is_encoded(
    any_server, codec
):

    wire_arg, arg, result, wire_result = CASES[codec]
    worker = Worker([any_server.address], codec=codec)
    seen = []

    @worker.function("convert")
    async def convert(job):
        seen.append(job.arg)
        return result

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "convert")
            client = await Client.connect(any_server)
            done = await client.run("convert", wire_arg)
    assert seen == [arg]
    assert done.type == T.WORK_COMPLETE
    assert done.args[1] == wire_result


@pytest.mark.parametrize("codec", CASES)
async def test_plain_function_runs_in_a_worker_thread_with_the_same_codec(any_server, codec):
    wire_arg, arg, result, wire_result = CASES[codec]
    worker = Worker([any_server.address], codec=codec)
    threads = []

    @worker.function("convert")
    def convert(job):
        threads.append(threading.current_thread())
        assert job.arg == arg
        return result

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "convert")
            client = await Client.connect(any_server)
            done = await client.run("convert", wire_arg)
    assert done.type == T.WORK_COMPLETE
    assert done.args[1] == wire_result
    assert threads and threads[0] is not threading.main_thread()


async def test_function_codec_overrides_the_worker_codec(any_server):
    worker = Worker([any_server.address], codec="msgpack")

    @worker.function("shout", codec="raw")
    async def shout(job):
        return job.arg.upper()

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "shout")
            client = await Client.connect(any_server)
            done = await client.run("shout", b"hello")
    assert done.args[1] == b"HELLO"


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_job_exposes_handle_function_unique_arg_and_payload(any_server, kind):
    worker = Worker([any_server.address], codec="json")
    jobs = []

    def record(job):
        jobs.append((job.handle, job.function, job.unique, job.arg, job.payload))
        return None

    if kind == "async":

        @worker.function("inspect")
        async def inspect_async(job):
            return record(job)
    else:
        worker.function("inspect")(record)

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "inspect")
            client = await Client.connect(any_server)
            with_unique = await client.submit("inspect", b'{"a":1}', unique="img-42")
            await client.until_done(with_unique)
            without_unique = await client.submit("inspect", b"[1,2]")
            await client.until_done(without_unique)
    assert jobs == [
        (with_unique.decode(), "inspect", "img-42", {"a": 1}, b'{"a":1}'),
        (without_unique.decode(), "inspect", "", [1, 2], b"[1,2]"),
    ]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_status_data_and_warning_reach_the_foreground_client_in_order(any_server, kind):
    worker = Worker([any_server.address], codec="msgpack")
    if kind == "async":

        @worker.function("progress")
        async def progress(job):
            await job.status(1, 3)
            await job.data(b"raw chunk")
            await job.data({"step": 2})
            await job.warning("careful")
            await job.status(3, 3)
            return "finished"
    else:

        @worker.function("progress")
        def progress_sync(job):
            job.status(1, 3)
            job.data(b"raw chunk")
            job.data({"step": 2})
            job.warning("careful")
            job.status(3, 3)
            return "finished"

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "progress")
            client = await Client.connect(any_server)
            handle = await client.submit("progress", msgpack.packb(None))
            packets = await client.until_done(handle)
    assert [(p.type, p.args[1:]) for p in packets] == [
        (T.WORK_STATUS, (b"1", b"3")),
        (T.WORK_DATA, (b"raw chunk",)),  # bytes go as they are
        (T.WORK_DATA, (msgpack.packb({"step": 2}),)),  # other values with the codec
        (T.WORK_WARNING, (msgpack.packb("careful"),)),
        (T.WORK_STATUS, (b"3", b"3")),
        (T.WORK_COMPLETE, (msgpack.packb("finished"),)),
    ]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_exception_becomes_work_exception_then_fail_and_the_worker_keeps_serving(
    any_server, kind, caplog
):
    worker = Worker([any_server.address], codec="json")

    def body(job):
        if job.arg["size"] < 0:
            raise ValueError(f"bad size {job.arg['size']}")
        return job.arg["size"] * 2

    if kind == "async":

        @worker.function("double")
        async def double(job):
            return body(job)
    else:
        worker.function("double")(body)

    caplog.set_level(logging.DEBUG, logger="worker_sdk")
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "double")
            with_option = await Client.connect(any_server, exceptions=True)
            plain = await Client.connect(any_server)
            failed = await with_option.run("double", b'{"size":-3}')
            failed_plain = await plain.run("double", b'{"size":-4}')
            good = await plain.run("double", b'{"size":5}')
    assert failed.type == T.WORK_EXCEPTION
    assert failed.args[1] == b"ValueError: bad size -3"
    # Without the `exceptions` option the server turns WORK_EXCEPTION into WORK_FAIL (§3.8).
    assert failed_plain.type == T.WORK_FAIL
    assert good.type == T.WORK_COMPLETE and good.args[1] == b"10"
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ValueError]
    assert len(logged) == 2, "each exception is logged with its traceback"
    # The WORK_FAIL after WORK_EXCEPTION draws ERROR JOB_NOT_FOUND from both servers; expected,
    # so it is not a warning.
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "JOB_NOT_FOUND" in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("codec", "payload"), [("msgpack", b"\xc1"), ("json", b"{not json"), ("msgpack", b"pa")]
)
async def test_undecodable_argument_fails_the_job_clearly_and_the_worker_serves_the_next(
    any_server, codec, payload
):
    worker = Worker([any_server.address], codec=codec)
    calls = []

    @worker.function("resize")
    async def resize(job):
        calls.append(job.arg)
        return "ok"

    good_payload = msgpack.packb(1) if codec == "msgpack" else b"1"
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "resize")
            client = await Client.connect(any_server, exceptions=True)
            failed = await client.run("resize", payload)
            good = await client.run("resize", good_payload)
    assert failed.type == T.WORK_EXCEPTION
    text = failed.args[1].decode()
    assert text.startswith("PayloadError: function 'resize': the argument is not valid " + codec)
    assert f"({len(payload)} bytes)" in text
    assert good.type == T.WORK_COMPLETE
    assert calls == [1], "the function never sees an undecodable argument"


async def test_unencodable_result_fails_the_job_clearly(any_server):
    worker = Worker([any_server.address], codec="msgpack")

    @worker.function("weird")
    async def weird(job):
        return object()

    @worker.function("fine")
    def fine(job):
        return [1, 2]

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "fine")
            client = await Client.connect(any_server, exceptions=True)
            failed = await client.run("weird", msgpack.packb(None))
            good = await client.run("fine", msgpack.packb(None))
    assert failed.type == T.WORK_EXCEPTION
    assert (
        failed.args[1]
        .decode()
        .startswith("PayloadError: function 'weird': cannot encode the result with codec 'msgpack'")
    )
    assert good.args[1] == msgpack.packb([1, 2])


async def test_registrations_and_client_id_show_in_admin_status_and_workers(any_server):
    worker = Worker([any_server.address], client_id="resizer-7")

    @worker.function("resize", timeout=30)
    async def resize(job):
        return None

    @worker.function("thumb")
    def thumb(job):
        return None

    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(any_server, "resize")
            await wait_for_workers(any_server, "thumb")
            table = await status(any_server)
            workers = await admin(any_server, "workers")
    assert table["resize"][2] == 1 and table["thumb"][2] == 1
    (line,) = [line for line in workers.splitlines() if " resizer-7 :" in line]
    assert sorted(line.split(" : ")[1].split()) == ["resize", "thumb"]


def test_default_client_id_is_hostname_and_pid():
    worker = Worker(["127.0.0.1:4730"])
    assert worker.client_id == f"{socket.gethostname()}-{os.getpid()}"


async def test_async_run_past_its_timeout_is_cancelled_and_the_retry_completes(
    start_jobserver, caplog
):
    """CAN_DO_TIMEOUT on our server: the job is taken back after the timeout (1 s, the server's
    floor) and assigned again. The worker cancels its own run at the same deadline, so the
    superseded run frees its slot and sends nothing: no JOB_NOT_FOUND. (gearmand cancels that
    timer at the worker's next PRE_SLEEP, §3.9, so a worker with free slots never times out
    there.)"""
    server = start_jobserver()
    worker = Worker([server.address], concurrency=2, codec="raw")
    attempts = []
    cancelled = []

    @worker.function("slow", timeout=0.5)
    async def slow(job):
        attempts.append(job.handle)
        if len(attempts) == 1:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.append(job.handle)
                raise
        return b"second"

    @worker.function("after")
    async def after(job):
        return b"still serving"

    caplog.set_level(logging.INFO, logger="worker_sdk")
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(server, "slow")
            client = await Client.connect(server)
            handle = await client.submit("slow", b"x")
            packets = await client.until_done(handle)
            after_timeout = await client.run("after")
    assert attempts == [handle.decode(), handle.decode()]
    assert cancelled == [handle.decode()]
    assert [(p.type, p.args[1:]) for p in packets] == [(T.WORK_COMPLETE, (b"second",))]
    assert after_timeout.args[1] == b"still serving"
    assert not [r for r in caplog.records if "JOB_NOT_FOUND" in r.getMessage()]


async def test_plain_def_past_its_timeout_is_never_run_twice_at_once(start_jobserver, caplog):
    """A thread cannot be stopped: the superseded run keeps its slot until it returns, its late
    result is dropped quietly, and the server's re-assignments of the same job wait for it
    (never two runs of one job at once); a later attempt completes the job."""
    server = start_jobserver()
    worker = Worker([server.address], concurrency=3, codec="raw")
    attempts = []
    running = []
    most_at_once = []
    lock = threading.Lock()

    @worker.function("stuck", timeout=1)
    def stuck(job):
        with lock:
            attempts.append(job.handle)
            first = len(attempts) == 1
            running.append(job.handle)
            most_at_once.append(running.count(job.handle))
        try:
            if first:
                time.sleep(2.5)  # past the 1 s timeout: the server hands the job out again
                return b"late"
            return b"in time"
        finally:
            with lock:
                running.remove(job.handle)

    caplog.set_level(logging.INFO, logger="worker_sdk")
    with anyio.fail_after(TEST_TIMEOUT):
        async with serving(worker):
            await wait_for_workers(server, "stuck")
            client = await Client.connect(server)
            handle = await client.submit("stuck", b"x")
            packets = await client.until_done(handle)
    assert len(attempts) >= 2 and set(attempts) == {handle.decode()}
    assert max(most_at_once) == 1
    assert [(p.type, p.args[1:]) for p in packets] == [(T.WORK_COMPLETE, (b"in time",))]
    assert not [r for r in caplog.records if "JOB_NOT_FOUND" in r.getMessage()]
    assert [r for r in caplog.records if "returned late" in r.getMessage()]
