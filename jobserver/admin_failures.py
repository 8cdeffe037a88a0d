"""Admin commands for failed background jobs (issue 13; engine/failures.py), on the same text
protocol as gearmand's commands, so scripts and `nc` work:

    show dead jobs [<function>]      one line per dead job, then "."
    retry dead job <handle>          OK 1, or ERR UNKNOWN_JOB
    retry dead jobs <function>|all   OK <count>
    purge dead jobs <function>|all   OK <count>
    retries <function> <n> [<base>]  a function's retry policy: n retries, the first after
                                     base seconds (default --bg-retry-delay), doubling
    retries <function> default       back to the server's --bg-retries / --bg-retry-delay
    retries <function>               OK <n> <base>: the policy in force
    show job <handle>                OK <state> <failed attempts> <retries> <next attempt>

A `show dead jobs` line: handle, function, unique, attempts, last failure (UTC, ISO 8601),
error, separated by tabs; every field escaped as in other listings (the error text may hold
any byte, newlines included). `show job` states: queued, running, retrying (waiting for its
next attempt, due at the unix time given), dead, unknown. A function literally named "all"
cannot be chosen alone by the plural commands.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .admin_text import err, listed
from .engine import Engine
from .engine.job import JobState
from .engine.journal import RetryPolicy
from .sdk.retry import MAX_RETRIES
from .sdk.retry import MAX_RETRY_DELAY as MAX_BASE_DELAY

_LIST_END = b".\n"

RETRY_USAGE = "retry dead job <handle> | retry dead jobs <function>|all"


def _ok(count: int) -> bytes:
    return b"OK %d\n" % count


def _when(unix_ms: int) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_ms / 1000)).encode()


class FailureCommands:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def show_dead(
        self, function: bytes | None, visible: Callable[[bytes], bool] | None = None
    ) -> bytes:
        """`show dead jobs [<function>]`; `visible` (with --acl) picks the functions shown."""
        lines = [
            b"\t".join(
                (
                    listed(dead.handle),
                    listed(dead.function),
                    listed(dead.unique),
                    b"%d" % dead.attempts,
                    _when(dead.last_failed_ms),
                    listed(dead.error),
                )
            )
            + b"\n"
            for dead in self.engine.dead.of_function(function)
            if visible is None or visible(dead.function)
        ]
        lines.append(_LIST_END)
        return b"".join(lines)

    def show_job(self, handle: bytes, visible: Callable[[bytes], bool] | None = None) -> bytes:
        """`show job <handle>`; a job of a function not `visible` (with --acl) is unknown."""
        engine = self.engine
        job = engine.jobs.get(handle)
        if job is not None and visible is not None and not visible(job.function.name):
            job = None
        if job is not None:
            policy = engine.policy_of(job.function.name)
            failure = engine.failure_of(job)
            attempts = failure[0] if failure is not None else 0
            if job.state in (JobState.RUNNING, JobState.DETACHED):
                state, due = b"running", 0
            elif failure is not None and job.state == JobState.WAITING:
                state, due = b"retrying", job.run_at
            else:
                state, due = b"queued", 0
            return b"OK %s %d %d %d\n" % (state, attempts, policy.retries, due)
        dead = engine.dead.find(handle)
        if dead is not None and visible is not None and not visible(dead.function):
            dead = None
        if dead is not None:
            policy = engine.policy_of(dead.function)
            return b"OK dead %d %d 0\n" % (dead.attempts, policy.retries)
        return b"OK unknown 0 0 0\n"

    def retry(self, args: list[bytes]) -> bytes:
        """`retry dead job <handle>` / `retry dead jobs <function>|all`."""
        if len(args) != 3 or args[0].lower() != b"dead":
            return err(
                "INVALID_ARGUMENTS", "retry dead job <handle> | retry dead jobs <function>|all"
            )
        noun, target = args[1].lower(), args[2]
        if noun == b"job":
            if not self.engine.retry_dead(handle=target):
                return err("UNKNOWN_JOB")
            return _ok(1)
        if noun == b"jobs":
            return _ok(self.engine.retry_dead(function=None if target == b"all" else target))
        return err("INVALID_ARGUMENTS", RETRY_USAGE)

    def purge(self, args: list[bytes]) -> bytes:
        """`purge dead jobs <function>|all`."""
        if len(args) != 3 or [arg.lower() for arg in args[:2]] != [b"dead", b"jobs"]:
            return err("INVALID_ARGUMENTS", "purge dead jobs <function>|all")
        target = args[2]
        return _ok(self.engine.purge_dead(None if target == b"all" else target))

    def retries(self, args: list[bytes]) -> bytes:
        """`retries <function> [<n> [<base>] | default]`."""
        engine = self.engine
        if not 1 <= len(args) <= 3:
            return err("INVALID_ARGUMENTS", "retries <function> [<n> [<base-seconds>] | default]")
        function = args[0]
        if len(args) == 1:
            policy = engine.policy_of(function)
            return b"OK %d %s\n" % (policy.retries, _seconds(policy.base_delay))
        if len(args) == 2 and args[1].lower() == b"default":
            engine.set_retry_policy(function, None)
            return b"OK\r\n"
        try:
            count = int(args[1])
            base = float(args[2]) if len(args) == 3 else engine.retry_policy.base_delay
        except ValueError:
            return err("INVALID_ARGUMENTS", "retries and base seconds must be numbers")
        if not 0 <= count <= MAX_RETRIES:
            return err("INVALID_ARGUMENTS", f"retries must be 0 to {MAX_RETRIES}")
        if not (math.isfinite(base) and 0 < base <= MAX_BASE_DELAY):
            return err(
                "INVALID_ARGUMENTS", f"base seconds must be above 0 and at most {MAX_BASE_DELAY:g}"
            )
        engine.set_retry_policy(function, RetryPolicy(count, base))
        return b"OK\r\n"


def _seconds(value: float) -> bytes:
    return f"{value:g}".encode()
