"""Background tasks whose owner's own errors reach the caller unwrapped.

anyio task groups (like trio nurseries since 0.25, `strict_exception_groups`) wrap whatever
leaves their body in an ExceptionGroup, so that the body's error and its children's can travel
together. The SDKs keep connections in background task groups around the caller's code
(`async with Client(...)`), and a caller must be able to write `except NoServerAvailable:`
around that code, as the README promises, under trio and asyncio alike. Our background tasks
never end with an error of their own: a connection's failure becomes ConnectionLost / JobLost
for the calls that wait on it. So the body's exception is the only one there is, and it is
re-raised as itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc


@asynccontextmanager
async def background_nursery() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group for background tasks around the caller's code. An exception from that
    code cancels the tasks, waits for them, and is then raised unchanged (never in an
    ExceptionGroup). A background task that fails (a bug) is raised the way the task group
    raises it (an ExceptionGroup), with the caller's exception, if any, as its context.

    Example::

        async with background_nursery() as tasks:
            tasks.start_soon(connection.run)
            raise NoServerAvailable("...")  # the caller catches NoServerAvailable itself
    """
    body_error: BaseException | None = None
    async with anyio.create_task_group() as tasks:
        try:
            yield tasks
        except BaseException as error:  # cancellation too: re-raised below, outside the group
            body_error = error
            tasks.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
