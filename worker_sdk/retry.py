"""`Retry`: a worker function's way to say "this attempt failed; try again after N seconds"."""

from __future__ import annotations

from jobserver.sdk.retry import check_retry_delay, retry_after_exception


class Retry(Exception):
    """Raise it in a worker function to end this run as failed and ask the server for the
    next attempt after `delay` seconds (0 to a day) instead of its policy's backoff, e.g.
    when a service answered "rate limited, come back in 30 s". `delay=None` keeps the policy's
    backoff. The message is what the dead set and the clients see, as for any exception.

    On the wire it is WORK_EXCEPTION (its data starts with the marker line
    `jobserver-retry-after:<seconds>`, see jobserver.sdk.retry), then WORK_FAIL, so a server
    that does not know the marker (gearmand) sees an ordinary failure. The attempt counts
    towards the function's `retries` like any failure.

    Example:
        >>> from worker_sdk import Retry, Worker
        >>> worker = Worker(["127.0.0.1:4730"])
        >>> @worker.function("fetch", retries=5)
        ... async def fetch(job):
        ...     raise Retry("rate limited by the API", delay=30)
    """

    def __init__(self, message: str = "", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.delay = None if delay is None else check_retry_delay(delay, "Retry delay")

    def exception_data(self) -> bytes:
        """WORK_EXCEPTION's data for this request."""
        text = f"{type(self).__name__}: {self.message}".encode(errors="replace")
        if self.delay is None:
            return text
        return retry_after_exception(self.delay, text)
