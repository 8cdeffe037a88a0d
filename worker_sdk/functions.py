"""The functions a worker offers: name, callable, CAN_DO timeout, payload codec and the retry
policy of their failed background jobs."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from jobserver.protocol import PacketType, encode_request
from jobserver.sdk.admin import check_admin_word
from jobserver.sdk.names import check_function_name
from jobserver.sdk.payload import Codec
from jobserver.sdk.retry import check_retry_policy, retry_policy_command

MAX_TIMEOUT_SECONDS = 365 * 24 * 3600
"""Largest CAN_DO_TIMEOUT we send. gearmand drops a registration whose millisecond value has more
than 20 digits (§3.9, §3.14); a year is far below that and far above any real job."""


SERVER_TIMEOUT_FLOOR = 1.0
"""Servers raise a CAN_DO_TIMEOUT below 1000 ms to 1000 ms (jobserver and gearmand alike), so a
run is only superseded after at least this long; the worker's own deadline matches it."""


class WorkerFunction:
    """One registered function. Created by `Worker.function`; you rarely build one yourself.

    Example:
        >>> from jobserver.sdk.payload import get_codec
        >>> async def reverse(job):
        ...     return job.arg[::-1]
        >>> WorkerFunction("reverse", reverse, timeout=30, codec=get_codec("raw")).timeout_ms
        30000
    """

    __slots__ = (
        "codec",
        "func",
        "is_async",
        "name",
        "name_bytes",
        "retries",
        "retry_delay",
        "timeout",
    )

    def __init__(
        self,
        name: str,
        func: Callable[..., Any],
        *,
        timeout: float | None,
        codec: Codec,
        retries: int | None = None,
        retry_delay: float | None = None,
    ) -> None:
        name_bytes = check_registration(name, timeout, retries, retry_delay)
        if not callable(func):
            raise TypeError(f"function {name!r}: {func!r} is not callable")
        self.name = name
        self.name_bytes = name_bytes
        self.func = func
        self.timeout = timeout
        self.codec = codec
        self.retries = retries
        self.retry_delay = None if retry_delay is None else float(retry_delay)
        self.is_async = _is_async_callable(func)

    @property
    def timeout_ms(self) -> int | None:
        """The CAN_DO_TIMEOUT value: milliseconds since gearmand 1.1.19 (§3.9). Servers raise
        anything below 1000 ms to 1000 ms."""
        if self.timeout is None:
            return None
        return max(1, math.ceil(self.timeout * 1000))

    @property
    def effective_timeout(self) -> float | None:
        """Seconds after which the server takes a run back (None: never)."""
        if self.timeout is None:
            return None
        return max(self.timeout, SERVER_TIMEOUT_FLOOR)

    def registration(self) -> bytes:
        """The encoded CAN_DO (no timeout) or CAN_DO_TIMEOUT packet for this function."""
        timeout_ms = self.timeout_ms
        if timeout_ms is None:
            return encode_request(PacketType.CAN_DO, self.name_bytes)
        return encode_request(PacketType.CAN_DO_TIMEOUT, self.name_bytes, str(timeout_ms).encode())

    def policy_command(self) -> bytes | None:
        """The admin command `retries <name> <n> [<base>]` that sets this function's retry
        policy on a server, or None when it keeps the server's default."""
        if self.retries is None:
            return None
        return retry_policy_command(self.name_bytes, self.retries, self.retry_delay)

    def __repr__(self) -> str:
        kind = "async" if self.is_async else "sync"
        policy = "" if self.retries is None else f" retries={self.retries}"
        if self.retry_delay is not None:
            policy += f" retry_delay={self.retry_delay:g}"
        return (
            f"<WorkerFunction {self.name!r} {kind} timeout={self.timeout} "
            f"codec={self.codec.name}{policy}>"
        )


def check_registration(
    name: str,
    timeout: float | None,
    retries: int | None = None,
    retry_delay: float | None = None,
) -> bytes:
    """Validate a function name (the check both SDKs share), a timeout and a retry policy;
    returns the name as sent (UTF-8). A function with a policy must have a name that fits in
    the admin command that sets it (one word)."""
    name_bytes = check_function_name(name)
    check_retry_policy(retries, retry_delay)
    if retries is not None:
        check_admin_word(name, f"function {name!r} has retries, so its name")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be seconds (int or float) or None, not {timeout!r}")
        if not 0 < timeout <= MAX_TIMEOUT_SECONDS:
            raise ValueError(
                f"function {name!r}: timeout must be > 0 and <= {MAX_TIMEOUT_SECONDS} s"
            )
    return name_bytes


def _is_async_callable(func: Callable[..., Any]) -> bool:
    while hasattr(func, "func") and not inspect.isfunction(func):  # functools.partial
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - instances with an async __call__
    return inspect.iscoroutinefunction(call)
