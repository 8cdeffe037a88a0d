"""Background tasks whose owner's own errors reach the caller unwrapped.

trio (since 0.25, `strict_exception_groups`) wraps whatever leaves a nursery's body in an
ExceptionGroup, so that the body's error and its children's can travel together. The SDKs keep
connections in background nurseries around the caller's code (`async with Client(...)`), and a
caller must be able to write `except NoServerAvailable:` around that code, as the README
promises. Our background tasks never end with an error of their own: a connection's failure
becomes ConnectionLost / JobLost for the calls that wait on it. So the body's exception is the
only one there is, and it is re-raised as itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def background_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for background tasks around the caller's code. An exception from that code
    cancels the tasks, waits for them, and is then raised unchanged (never in an
    ExceptionGroup). A background task that fails (a bug) is raised the way trio raises it,
    with the caller's exception, if any, as its context.

    Example::

        async with background_nursery() as nursery:
            nursery.start_soon(connection.run)
            raise NoServerAvailable("...")  # the caller catches NoServerAvailable itself
    """
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        except BaseException as error:  # Cancelled too: re-raised below, outside the nursery
            body_error = error
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
