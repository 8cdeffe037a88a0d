"""Every public SDK call raises its documented exception as itself, never an ExceptionGroup
holding it (trio >= 0.25 wraps whatever leaves a nursery; the SDKs must unwrap their own).

Each check runs in a fresh event loop (`anyio.run`, once on trio and once on asyncio: anyio
task groups always wrap), not inside a test plugin's own one, and asserts the exact type, so an
ExceptionGroup (which is no subclass of GearmanError) fails it.
"""

from __future__ import annotations

import threading

import anyio
import pytest
from conftest import SDK_BACKENDS
from test_client_sdk_support import nothing_listening

from client_sdk import (
    Client,
    GearmanError,
    JobTimeout,
    NoServerAvailable,
    SyncClient,
)
from worker_sdk import Worker

NO_WORKER = "nobody-serves-this"
"""A function no worker registers: a foreground job for it waits until the call times out."""

SHORT_TIMEOUT = 0.3


_backend = "trio"


@pytest.fixture(autouse=True, params=SDK_BACKENDS)
def backend(request) -> str:
    """Every test here runs once per event loop the SDKs support; `run` uses it."""
    global _backend
    _backend = request.param
    return request.param


def run(main):
    """`main()` in a fresh event loop of the test's backend."""
    return anyio.run(main, backend=_backend)


def raised_by(main) -> BaseException:
    """What `run(main)` raised (it must raise)."""
    try:
        run(main)
    except BaseException as error:
        return error
    raise AssertionError("expected an exception")


def assert_is(error: BaseException, kind: type[GearmanError]) -> None:
    assert type(error) is kind, f"expected {kind.__name__} itself, got {error!r}"
    assert isinstance(error, GearmanError)


# --- NoServerAvailable -------------------------------------------------------------------------

CALLS_WITHOUT_SERVER = {
    "submit": lambda client: client.submit("f", 1),
    "submit_background": lambda client: client.submit_background("f", 1),
    "status": lambda client: client.status("H:nowhere:1"),
}


@pytest.mark.parametrize("call", sorted(CALLS_WITHOUT_SERVER))
def test_no_server_available_is_caught_around_the_async_with_block(call):
    caught: list[NoServerAvailable] = []

    async def main():
        try:
            async with Client([nothing_listening()]) as client:
                await CALLS_WITHOUT_SERVER[call](client)
        except NoServerAvailable as error:  # what the README says to write
            caught.append(error)

    run(main)
    assert len(caught) == 1


@pytest.mark.parametrize("call", sorted(CALLS_WITHOUT_SERVER))
def test_no_server_available_leaves_the_client_as_itself(call):
    async def main():
        async with Client([nothing_listening()]) as client:
            await CALLS_WITHOUT_SERVER[call](client)

    assert_is(raised_by(main), NoServerAvailable)


def test_no_server_available_from_a_stream():
    async def main():
        async with Client([nothing_listening()]) as client, client.stream("f", 1) as job:
            async for _ in job:
                pass

    assert_is(raised_by(main), NoServerAvailable)


def test_no_server_available_from_a_sync_client():
    with SyncClient([nothing_listening()]) as client:
        for call in (
            lambda: client.submit("f", 1),
            lambda: client.submit_background("f", 1),
            lambda: client.status("H:nowhere:1"),
        ):
            with pytest.raises(NoServerAvailable) as raised:
                call()
            assert_is(raised.value, NoServerAvailable)
        with pytest.raises(NoServerAvailable) as raised, client.stream("f", 1):
            pass
        assert_is(raised.value, NoServerAvailable)


# --- JobTimeout ---------------------------------------------------------------------------------


def test_job_timeout_from_submit_is_caught_around_the_async_with_block(jobserver):
    caught: list[JobTimeout] = []

    async def main():
        try:
            async with Client([jobserver.address]) as client:
                await client.submit(NO_WORKER, 1, timeout=SHORT_TIMEOUT)
        except JobTimeout as error:
            caught.append(error)

    run(main)
    assert len(caught) == 1
    assert caught[0].function == NO_WORKER


def test_job_timeout_from_a_stream_and_its_result(jobserver):
    async def iterate():
        async with (
            Client([jobserver.address]) as client,
            client.stream(NO_WORKER, 1, timeout=SHORT_TIMEOUT) as job,
        ):
            async for _ in job:
                pass

    async def result():
        async with Client([jobserver.address]) as client:
            async with client.stream(NO_WORKER, 1, timeout=SHORT_TIMEOUT) as job:
                pass
            await job.result()

    assert_is(raised_by(iterate), JobTimeout)
    assert_is(raised_by(result), JobTimeout)


def test_job_timeout_from_a_sync_client(jobserver):
    with SyncClient([jobserver.address]) as client:
        with pytest.raises(JobTimeout) as raised:
            client.submit(NO_WORKER, 1, timeout=SHORT_TIMEOUT)
        assert_is(raised.value, JobTimeout)
        with (
            pytest.raises(JobTimeout) as raised,
            client.stream(NO_WORKER, 1, timeout=SHORT_TIMEOUT) as job,
        ):
            list(job)
        assert_is(raised.value, JobTimeout)


def test_job_timeout_is_also_a_builtin_timeout_error(jobserver):
    async def main():
        async with Client([jobserver.address]) as client:
            await client.submit(NO_WORKER, 1, timeout=SHORT_TIMEOUT)

    error = raised_by(main)
    assert isinstance(error, TimeoutError)


# --- the caller's own exceptions, and the worker -------------------------------------------


def test_the_callers_own_exception_leaves_the_client_unchanged():
    class Mine(Exception):
        pass

    async def main():
        async with Client([nothing_listening()]):
            raise Mine("from the caller's code")

    error = raised_by(main)
    assert type(error) is Mine


def test_cancelling_the_caller_inside_the_client_is_an_ordinary_cancel():
    async def main():
        with anyio.move_on_after(0.05) as scope:
            async with Client([nothing_listening()]):
                await anyio.sleep_forever()
        return scope.cancelled_caught

    assert run(main) is True


def test_worker_without_functions_raises_value_error_from_serve_and_run():
    worker = Worker([nothing_listening()])

    async def serve():
        await worker.serve()

    error = raised_by(serve)
    assert type(error) is ValueError and "no functions registered" in str(error)
    with pytest.raises(ValueError, match="no functions registered") as raised:
        worker.run()
    assert type(raised.value) is ValueError


def test_worker_run_from_a_thread_raises_value_error_without_functions():
    worker = Worker([nothing_listening()])
    errors: list[BaseException] = []

    def run():
        try:
            worker.run()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1 and type(errors[0]) is ValueError
