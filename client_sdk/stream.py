"""A foreground job whose progress is read while it runs: `async with client.stream(...)`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from jobserver.sdk.errors import JobTimeout

from .jobs import CallTimer, JobHandle, JobWaiter, Update
from .session import Session

T = TypeVar("T")

Start = Callable[[], Awaitable[tuple[Session, JobWaiter]]]


class JobStream:
    """Progress updates of one foreground job, in the order the worker sent them, then its
    result. Made by `Client.stream()`; entering it submits the job.

    Iterating yields `Status(numerator, denominator)`, `Data(data)` and `Warning(data)` and
    ends when the job ends; `await job.result()` then gives the decoded result or raises the
    job's failure (JobFailed, JobException, JobLost). `result()` may also be awaited after the
    `async with` block; leaving the block early drops the remaining updates, not the job.

    Example (with a server on 127.0.0.1:4730 and a worker for "resize")::

        async def main():
            async with Client(["127.0.0.1:4730"]) as client:
                async with client.stream("resize", {"path": "a.png"}) as job:
                    async for update in job:
                        print(update)  # Status(numerator=1, denominator=3), Data(...), ...
                print(await job.result())

        asyncio.run(main())  # or trio.run(main)
    """

    def __init__(
        self,
        start: Start,
        decode: Callable[[bytes], Any],
        function: str,
        timeout: float | None,
    ) -> None:
        self._start = start
        self._decode = decode
        self._function = function
        self._timeout = timeout
        self._timer: CallTimer | None = None
        self._session: Session | None = None
        self._waiter: JobWaiter | None = None

    @property
    def handle(self) -> JobHandle:
        """The job's handle on the server that accepted it (empty before `async with`)."""
        return self._waiter.handle if self._waiter is not None else JobHandle("")

    async def __aenter__(self) -> JobStream:
        if self._waiter is not None:
            raise RuntimeError("a JobStream can be entered only once")
        self._timer = CallTimer(self._function, self._timeout)
        self._session, waiter = await self._timer.run(self._start)
        self._waiter = waiter
        self._timer.handle = str(waiter.handle)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        waiter = self._require_started()
        waiter.stop_updates()
        if exc_type is not None and not waiter.done and self._session is not None:
            self._session.forget(waiter)  # the caller is leaving on an error: nobody waits

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> Update:
        update = await self._timed(self._require_started().next_update)
        if update is None:
            raise StopAsyncIteration
        return update

    async def result(self) -> Any:
        """The job's result decoded with the client's codec; raises the job's failure."""
        return self._decode(await self._timed(self._require_started().outcome))

    async def _timed(self, step: Callable[[], Awaitable[T]]) -> T:
        assert self._timer is not None
        try:
            return await self._timer.run(step)
        except JobTimeout:
            if self._session is not None and self._waiter is not None:
                self._session.forget(self._waiter)
                self._session.probe()  # counts against the server until it shows life
            raise

    def _require_started(self) -> JobWaiter:
        if self._waiter is None:
            raise RuntimeError("use `async with client.stream(...) as job` first")
        return self._waiter
