"""What both SDKs log about a server's health: unreachable, hung, back.

A server that cannot be resolved or reached, or that stops answering, is logged at WARNING the
first time, and again at most every REPEAT_INTERVAL while it stays so (with how many failures
were not logged in between); the rest go to DEBUG. When it answers again, one INFO line. So a
misspelt host in a server list is never silent, and a long outage does not flood the log.
"""

from __future__ import annotations

import logging
import time

REPEAT_INTERVAL = 60.0
"""Seconds between WARNING lines about a server that keeps failing: often enough that an
operator tailing the log sees the outage is still on, rarely enough to stay readable with
hundreds of processes sharing a log pipeline."""


class ServerHealthLog:
    """Failure and recovery lines for one server.

    Example:
        >>> health = ServerHealthLog(logging.getLogger("client_sdk"), "10.0.0.1:4730")
        >>> health.failed("connection refused")  # WARNING
        >>> health.failed("connection refused")  # DEBUG: just logged
        >>> health.recovered()  # INFO: "10.0.0.1:4730 is back ..."
    """

    def __init__(self, log: logging.Logger, server: str) -> None:
        self._log = log
        self._server = server
        self._failing_since: float | None = None
        self._last_warning = -float("inf")
        self._unlogged = 0
        self._failures = 0

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def failed(self, reason: object, *, what: str = "unreachable") -> None:
        """One failure (connect error, lost connection, no answer in time)."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._failures = 0
        self._failures += 1
        text = str(reason)
        if not text.startswith(self._server):
            text = f"{self._server}: {text}"
        if now - self._last_warning >= REPEAT_INTERVAL:
            more = (
                f" ({self._unlogged} more failures since the last report)" if self._unlogged else ""
            )
            self._log.warning("server %s: %s%s", what, text, more)
            self._last_warning = now
            self._unlogged = 0
        else:
            self._unlogged += 1
            self._log.debug("server %s: %s", what, text)

    def recovered(self) -> None:
        """It answers again: one INFO line if it had failed."""
        if self._failing_since is None:
            return
        seconds = time.monotonic() - self._failing_since
        self._log.info(
            "%s is back after %.1f s (%d failure%s)",
            self._server,
            seconds,
            self._failures,
            "" if self._failures == 1 else "s",
        )
        self._failing_since = None
        self._last_warning = -float("inf")
        self._unlogged = 0
