"""Screening one connection's binary requests against its ACL permissions (jobserver/acl.py).

Runs before the engine sees a packet, and only with `--acl`: a denied request is answered here
and never reaches the engine. Submits need `invoke` on the function, registrations (CAN_DO,
CAN_DO_TIMEOUT) need `register`; a status lookup of a job of a function the peer may not invoke
answers "unknown", as if the job did not exist, so handles and uniques of other identities'
jobs tell nothing. Everything else passes: the engine already refuses results for a job the
peer is not running and hands jobs only for registered functions.
"""

from __future__ import annotations

from typing import NamedTuple

from .acl import Permissions
from .engine import Engine
from .protocol import Packet, encode_response
from .protocol import PacketType as T

SUBMIT_TYPES = frozenset(
    {
        T.SUBMIT_JOB,
        T.SUBMIT_JOB_BG,
        T.SUBMIT_JOB_HIGH,
        T.SUBMIT_JOB_HIGH_BG,
        T.SUBMIT_JOB_LOW,
        T.SUBMIT_JOB_LOW_BG,
        T.SUBMIT_JOB_SCHED,
        T.SUBMIT_JOB_EPOCH,
        T.SUBMIT_REDUCE_JOB,
        T.SUBMIT_REDUCE_JOB_BACKGROUND,
    }
)
REGISTER_TYPES = frozenset({T.CAN_DO, T.CAN_DO_TIMEOUT})
SCREENED_TYPES = SUBMIT_TYPES | REGISTER_TYPES | {T.GET_STATUS, T.GET_STATUS_UNIQUE}
"""The only packet types this module looks at; the server skips the call for the rest."""

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
        if job is None or who.may_invoke(job.function.name):
            return None
        return Denial(encode_response(T.STATUS_RES, handle, b"0", b"0", b"0", b"0"), None)
    if kind == T.GET_STATUS_UNIQUE:
        unique = packet.args[0].split(b"\0", 1)[0]
        job = engine.find_unique(unique) if unique else None
        if job is None or who.may_invoke(job.function.name):
            return None
        reply = encode_response(T.STATUS_RES_UNIQUE, unique, b"0", b"0", b"0", b"0", b"0")
        return Denial(reply, None)
    return None


def _denied(who: Permissions, action: str, function: bytes) -> Denial:
    name = function.decode("utf-8", "backslashreplace")
    text = f"identity {who.name} may not {action} {name!r}"
    return Denial(encode_response(T.ERROR, PERMISSION_DENIED, text.encode()), text)
