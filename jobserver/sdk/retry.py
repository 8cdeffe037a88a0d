"""Failed background jobs (issue 13) as the SDKs put them on the wire: a function's retry
policy, and a worker function's request to be retried after a delay of its choosing.

Sans-IO, so that the server parses exactly what the worker SDK writes by importing the same
names: `RETRY_AFTER_MARKER`, `parse_retry_after`.

The policy travels as the admin text command `retries <function> <n> [<base-seconds>]`, sent
by a worker on each connection (jobserver/admin_failures.py answers it; gearmand answers
`ERR UNKNOWN_COMMAND`, which the worker ignores).

A retry request travels as WORK_EXCEPTION whose data starts with a marker line:

    jobserver-retry-after:<seconds>\\n<the exception text, e.g. "Retry: rate limited">

followed by WORK_FAIL, as for any exception. WORK_FAIL carries no data and WORK_EXCEPTION's
data is free text, so the marker is the one place a delay fits without a new packet type,
and a server or client that does not know it still sees an ordinary failure with a readable
text (gearmand and older jobservers count it as a failed attempt with the normal backoff).
"""

from __future__ import annotations

import math

MAX_RETRIES = 1000
"""The most retries a policy may ask for; jobserver's `retries` command refuses more (with the
delay doubling up to its one-hour cap, a thousand is already weeks of attempts)."""

MAX_RETRY_DELAY = 86_400.0
"""The longest delay a policy's first retry (`retry_delay`) or a retry request may ask for: a
day, as jobserver's `retries` command allows. Longer is a typo, not a plan."""

MIN_POLICY_DELAY = 0.001
"""The shortest first delay of a policy: delays go on the wire to the millisecond, and
jobserver refuses a base of 0 (--bg-retry-delay has the same floor)."""

RETRY_AFTER_MARKER = b"jobserver-retry-after:"
"""Start of a WORK_EXCEPTION's data that asks for the next attempt after the given seconds
(a decimal number, then `\\n`, then the exception text). Chosen to be unmistakable in a
free-text field and readable where a peer shows it raw."""


def check_retry_delay(delay: object, what: str = "retry delay") -> float:
    """`delay` as float seconds: a finite number from 0 to MAX_RETRY_DELAY, else ValueError
    (TypeError for a non-number).

    >>> check_retry_delay(30)
    30.0
    """
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        raise TypeError(f"{what} must be seconds (int or float), not {delay!r}")
    if not (math.isfinite(delay) and 0 <= delay <= MAX_RETRY_DELAY):
        raise ValueError(f"{what} must be 0 to {MAX_RETRY_DELAY:g} seconds, not {delay!r}")
    return float(delay)


def check_retry_policy(retries: object, retry_delay: object) -> None:
    """ValueError / TypeError unless (retries, retry_delay) is a policy jobserver accepts:
    retries None (the server's default) or 0..MAX_RETRIES; retry_delay None (the server's
    --bg-retry-delay) or MIN_POLICY_DELAY to MAX_RETRY_DELAY, and only with retries.

    >>> check_retry_policy(3, 0.5)
    """
    if retries is None:
        if retry_delay is not None:
            raise ValueError("retry_delay needs retries: how many retries the delay is for")
        return
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int or None, not {retries!r}")
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be 0 to {MAX_RETRIES}, not {retries}")
    if retry_delay is not None and check_retry_delay(retry_delay, "retry_delay") < MIN_POLICY_DELAY:
        raise ValueError(f"retry_delay must be at least {MIN_POLICY_DELAY:g} seconds")


def retry_policy_command(function: bytes, retries: int, retry_delay: float | None) -> bytes:
    """The admin line that sets a function's policy; `function` must be an admin word
    (jobserver.sdk.admin.check_admin_word).

    >>> retry_policy_command(b"resize", 2, 0.25)
    b'retries resize 2 0.25\\n'
    """
    words = [b"retries", function, b"%d" % retries]
    if retry_delay is not None:
        words.append(_seconds(retry_delay))
    return b" ".join(words) + b"\n"


def retry_after_exception(delay: float, text: bytes) -> bytes:
    """WORK_EXCEPTION data asking for the next attempt after `delay` seconds.

    >>> retry_after_exception(1.5, b"Retry: rate limited")
    b'jobserver-retry-after:1.5\\nRetry: rate limited'
    """
    return RETRY_AFTER_MARKER + _seconds(delay) + b"\n" + text


def parse_retry_after(data: bytes) -> tuple[float | None, bytes]:
    """(the delay asked for, or None; the exception text without the marker line). Data
    without a well-formed marker (no newline, or not a finite number from 0 to
    MAX_RETRY_DELAY) is an ordinary exception text and comes back whole.

    >>> parse_retry_after(b"jobserver-retry-after:30\\nRetry: later")
    (30.0, b'Retry: later')
    >>> parse_retry_after(b"KeyError: 'path'")
    (None, b"KeyError: 'path'")
    """
    if not data.startswith(RETRY_AFTER_MARKER):
        return None, data
    seconds, newline, text = data[len(RETRY_AFTER_MARKER) :].partition(b"\n")
    if not newline:
        return None, data
    try:
        delay = float(seconds.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None, data
    if not (math.isfinite(delay) and 0 <= delay <= MAX_RETRY_DELAY):
        return None, data
    return delay, text


def _seconds(value: float) -> bytes:
    """Seconds to the millisecond, without trailing zeros: `30`, `0.25`, `0.001`."""
    return (f"{value:.3f}".rstrip("0").rstrip(".") or "0").encode()
