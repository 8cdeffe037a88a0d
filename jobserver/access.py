"""Screening one connection's binary requests against its ACL permissions (jobserver/acl.py).

Runs before the engine sees a packet, and only with `--acl`: a denied request is answered here
and never reaches the engine. Submits need `invoke` on the function, registrations (CAN_DO,
CAN_DO_TIMEOUT) need `register`; a status lookup of a job of a function the peer may not invoke
answers "unknown", as if the job did not exist, so handles and uniques of other identities'
jobs tell nothing. Everything else passes: the engine already refuses results for a job the
peer is not running and hands jobs only for registered functions.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from .acl import Permissions
from .engine import Engine
from .engine.engine import MAX_LOOKUP_ARGUMENT_SIZE
from .protocol import SUBMIT_TYPES, Packet, encode_response
from .protocol import PacketType as T

REGISTER_TYPES = frozenset({T.CAN_DO, T.CAN_DO_TIMEOUT})
SCREENED_TYPES = SUBMIT_TYPES | REGISTER_TYPES | {T.GET_STATUS, T.GET_STATUS_UNIQUE}
"""The only packet types this module looks at; the server skips the call for the rest."""

DENIAL_REPEAT_INTERVAL = 60.0
"""Seconds between WARNING lines about the same denial (same identity, action and function).
A misconfigured worker library that reconnects and registers again at once (gear does, ~20
times a second) is one line a minute with a count, while every new kind of denial still
shows at once."""

MAX_DENIAL_KINDS = 1024
"""Distinct denials remembered for the repeat interval; past it the oldest is forgotten (and
logged again at WARNING if it recurs), so a peer cycling through names cannot grow it."""

PERMISSION_DENIED = b"PERMISSION_DENIED"
"""ERROR code of a denied request (the issue's name; libgearman shows any code it gets)."""


class Denial(NamedTuple):
    reply: bytes  # sent instead of the engine's answer
    reason: str | None  # for the server's log; None for a quiet "unknown" status answer


def screen(who: Permissions, packet: Packet, engine: Engine) -> Denial | None:
    """None if the engine may handle `packet`; otherwise what to answer instead."""
    kind = packet.type
    if kind in SUBMIT_TYPES:
        function = packet.args[0]
        if who.may_invoke(function):
            return None
        return _denied(who, "submit jobs of", function)
    if kind in REGISTER_TYPES:
        function = packet.args[0]
        if who.may_register(function):
            return None
        return _denied(who, "register", function)
    if kind == T.GET_STATUS:
        handle = packet.args[0].split(b"\0", 1)[0]
        job = engine.jobs.get(handle)
        if job is None or who.may_see_jobs_of(job.function.name):
            return None
        return Denial(encode_response(T.STATUS_RES, handle, b"0", b"0", b"0", b"0"), None)
    if kind == T.GET_STATUS_UNIQUE:
        if len(packet.args[0]) > MAX_LOOKUP_ARGUMENT_SIZE:
            return None  # the engine's error answers it
        # Several functions' jobs may share a unique: answer about one this peer may see.
        return Denial(engine.status_by_unique(packet.args[0], who.may_see_jobs_of), None)
    return None


def _denied(who: Permissions, action: str, function: bytes) -> Denial:
    name = function.decode("utf-8", "backslashreplace")
    text = f"identity {who.name} may not {action} {name!r}"
    return Denial(encode_response(T.ERROR, PERMISSION_DENIED, text.encode()), text)


class DenialLog:
    """Which denials to log at WARNING: the first of each kind, then at most one per
    DENIAL_REPEAT_INTERVAL with how many were not logged; the rest at DEBUG."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = 0
        self._clock = clock
        self._kinds: OrderedDict[str, tuple[float, int]] = OrderedDict()  # reason: logged, unlogged

    def note(self, reason: str) -> tuple[int, int]:
        """(log level, repeats not logged since the last WARNING of this kind)."""
        self.total += 1
        now = self._clock()
        seen = self._kinds.get(reason)
        if seen is not None and now - seen[0] < DENIAL_REPEAT_INTERVAL:
            self._kinds[reason] = (seen[0], seen[1] + 1)
            return logging.DEBUG, 0
        repeats = seen[1] if seen is not None else 0
        self._kinds[reason] = (now, 0)
        self._kinds.move_to_end(reason)
        if len(self._kinds) > MAX_DENIAL_KINDS:
            self._kinds.popitem(last=False)
        return logging.WARNING, repeats
