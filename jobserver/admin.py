"""The admin text protocol (shared doc §4), on the same port as the binary protocol.

Output formats are gearmand 1.1.20's byte for byte (tabs, `.` terminators, `\\n` versus `\\r\\n`,
`+` for spaces in ERR texts), because `gearadmin` and monitoring scripts parse them. The few
places where we deliberately answer differently are marked in the code and listed in the README.

Names in listings come from clients (function names, unique ids, client ids) and may hold any
byte but NUL, so they are escaped (`listed`): gearmand prints them raw, and a function named
"x\\t0\\t0\\t0\\nfake" adds a line of its own choosing to `status`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import __version__
from .acl import Permissions
from .admin_failures import FailureCommands
from .admin_text import err as _err
from .admin_text import listed
from .engine import Engine
from .engine.function import Function
from .engine.job import Job, Priority

MAX_ADMIN_TOKENS = 5
"""gearmand accepts at most five space-separated tokens; more is an error (§4)."""

VERSION_REPLY = f"OK jobserver-{__version__}\n".encode()

_OK = b"OK\r\n"
_LIST_END = b".\n"

MUTATING_COMMANDS = frozenset(
    {b"cancel", b"create", b"drop", b"maxqueue", b"retry", b"purge", b"retries"}
)
"""Commands that change state: with --acl, only an identity with `admin = true` may run them
(`retries` also by an identity that may register the function, and anyone may read it)."""

PERMISSION_DENIED_REPLY = _err("PERMISSION_DENIED", "this identity may not change the server")


def _unknown_command(command: bytes) -> bytes:
    # gearmand puts no separator between its text and the echoed command word (§4).
    return b"ERR UNKNOWN_COMMAND Unknown+server+command" + command + b"\r\n"


def _invalid_arguments(command: str) -> bytes:
    return _err(
        "INVALID_ARGUMENTS", f"An incomplete set of arguments was sent to this command {command}"
    )


@dataclass
class ServerFacts:
    """What the admin protocol reports about the process, beyond the engine's state."""

    verbose: str = "ERROR"
    pid: int = 0

    def __post_init__(self) -> None:
        if not self.pid:
            self.pid = os.getpid()


class AdminProtocol:
    """Turns one admin line into its complete reply."""

    def __init__(self, engine: Engine, facts: ServerFacts) -> None:
        self.engine = engine
        self.facts = facts
        failures = FailureCommands(engine)
        self._failures = failures
        self._commands: dict[bytes, Callable[[list[bytes], Permissions | None], bytes]] = {
            b"workers": self._workers,
            b"status": self._status,
            b"prioritystatus": self._priority_status,
            b"show": self._show,
            b"cancel": lambda args, _who: self._cancel(args),
            b"create": lambda args, _who: self._create(args),
            b"drop": lambda args, _who: self._drop(args),
            b"maxqueue": lambda args, _who: self._maxqueue(args),
            b"retry": lambda args, _who: failures.retry(args),
            b"purge": lambda args, _who: failures.purge(args),
            b"retries": lambda args, _who: failures.retries(args),
            b"version": lambda _args, _who: VERSION_REPLY,
            b"getpid": lambda _args, _who: f"OK {self.facts.pid}\n".encode(),
            b"verbose": lambda _args, _who: f"OK {self.facts.verbose}\n".encode(),
        }

    def execute(self, line: bytes, who: Permissions | None = None) -> bytes:
        """The reply to one admin line. `who` is the connection's permissions under --acl
        (None: no ACL, everything allowed): changes need admin rights, and listings show a
        non-admin only the functions it may use."""
        # Runs of spaces collapse, but a leading space makes an empty command word, and TAB is
        # not a separator: all as gearmand splits lines (§4).
        words = line.split(b" ")
        command = words[0]
        args = [word for word in words[1:] if word]
        if 1 + len(args) > MAX_ADMIN_TOKENS:
            # gearmand closes the connection here; a line is resynchronisable, so we answer.
            return _err("INVALID_ARGUMENTS", "Too many arguments")
        word = command.lower()
        handler = self._commands.get(word)
        if handler is None:
            return _unknown_command(command)
        if who is not None:
            if who.admin:
                who = None  # an admin may do everything and sees every listing whole
            elif word in MUTATING_COMMANDS and not _may_change(word, args, who):
                return PERMISSION_DENIED_REPLY
        return handler(args, who)

    # -- lists

    def _workers(self, _args: list[bytes], who: Permissions | None) -> bytes:
        lines = []
        for peer in self.engine.peers.values():
            # Every CAN_DO, duplicates included, latest first, as gearmand lists them.
            registered: list[tuple[int, bytes]] = []
            if peer.abilities is not None:
                for function, registration in peer.abilities.registrations.items():
                    if who is not None and not who.may_see(function.name):
                        continue
                    name = listed(function.name)
                    registered.extend((stamp, name) for stamp in registration.stamp_list())
            if who is not None and not registered:
                continue  # a non-admin sees only the workers of functions it may use
            registered.sort(reverse=True)
            functions = b"".join(b" " + name for _, name in registered)
            client_id = listed(peer.client_id)
            lines.append(b"%d %s %s :%s\n" % (peer.id, peer.address.encode(), client_id, functions))
        lines.append(_LIST_END)
        return b"".join(lines)

    def _functions(self, who: Permissions | None) -> Iterable[Function]:
        functions = self.engine.functions.values()
        if who is None:
            return functions
        return [f for f in functions if who.may_see(f.name)]

    def _jobs(self, who: Permissions | None) -> Iterable[Job]:
        if who is None:
            return self.engine.iter_jobs()
        return [job for job in self.engine.iter_jobs() if who.may_invoke(job.function.name)]

    def _status(self, _args: list[bytes], who: Permissions | None) -> bytes:
        lines = [
            b"%s\t%d\t%d\t%d\n" % (listed(f.name), f.total, f.running, f.registrations)
            for f in self._functions(who)
        ]
        lines.append(_LIST_END)
        return b"".join(lines)

    def _priority_status(self, _args: list[bytes], who: Permissions | None) -> bytes:
        lines = []
        for f in self._functions(who):
            high, normal, low = f.queued
            # Epoch jobs not yet due are NORMAL priority jobs waiting in the queue (§3.11).
            normal += f.waiting
            lines.append(
                b"%s\t%d\t%d\t%d\t%d\n" % (listed(f.name), high, normal, low, f.registrations)
            )
        lines.append(_LIST_END)
        return b"".join(lines)

    def _show(self, args: list[bytes], who: Permissions | None) -> bytes:
        if not args:
            return _unknown_command(b"show")
        keywords = [arg.lower() for arg in args]
        if keywords == [b"jobs"]:
            lines = [
                # The `ignore` column is always 0: cancelled and abandoned jobs are forgotten at
                # once here rather than lingering until a worker reaps them.
                b"%s\t%d\t0\t%d\n" % (listed(job.handle), job.retries, int(job.background))
                for job in self._jobs(who)
            ]
        elif keywords == [b"unique", b"jobs"]:
            lines = [listed(job.unique) + b"\n" for job in self._jobs(who)]
        elif keywords[:2] == [b"dead", b"jobs"] and len(args) <= 3:
            visible = None if who is None else who.may_invoke
            return self._failures.show_dead(args[2] if len(args) == 3 else None, visible)
        elif keywords[0] == b"job" and len(args) == 2:
            visible = None if who is None else who.may_invoke
            return self._failures.show_job(args[1], visible)
        else:
            return _err("UNKNOWN_SHOW_ARGUMENTS")
        lines.append(_LIST_END)
        return b"".join(lines)

    # -- changes

    def _cancel(self, args: list[bytes]) -> bytes:
        if len(args) < 2:
            return _unknown_command(b"cancel")
        if len(args) != 2 or args[0].lower() != b"job":
            return _err("UNKNOWN_ERROR")
        return _OK if self.engine.cancel_job(args[1]) else _err("UNKNOWN_JOB")

    def _create(self, args: list[bytes]) -> bytes:
        if len(args) != 2 or args[0].lower() != b"function":
            return _invalid_arguments("create")
        # gearmand 1.1.x loses the name's last character unless the line ends in CRLF (§4);
        # the decoder already removed the line ending, so the name is whole either way.
        self.engine.create_function(args[1])
        return _OK

    def _drop(self, args: list[bytes]) -> bytes:
        if len(args) != 2 or args[0].lower() != b"function":
            return _invalid_arguments("drop")
        result = self.engine.drop_function(args[1])
        if result == "ok":
            return _OK
        if result == "not-found":
            return b"ERR function not found\r\n"
        if result == "busy":
            return b"ERR there are still connected workers or executing clients\r\n"
        return _err("function has queued jobs")

    def _maxqueue(self, args: list[bytes]) -> bytes:
        if not args:
            return _invalid_arguments("maxqueue")
        numbers = []
        for arg in args[1:]:
            try:
                numbers.append(int(arg))
            except ValueError:
                return _err("INVALID_ARGUMENTS", "maxqueue limits must be integers")
        # No number resets, one applies to all priorities, two set HIGH and NORMAL (LOW stays
        # unlimited), three set HIGH, NORMAL and LOW (§4).
        if not numbers:
            limits = [0, 0, 0]
        elif len(numbers) == 1:
            limits = numbers * 3
        elif len(numbers) == 2:
            limits = [*numbers, 0]
        else:
            limits = numbers
        assert len(limits) == len(Priority)
        self.engine.set_max_queue(args[0], limits)
        return _OK


def _may_change(command: bytes, args: list[bytes], who: Permissions) -> bool:
    """A non-admin may read `retries <function>` of a function it uses, and set it for one it
    may register: the worker SDK sets its functions' retry policy that way."""
    if command != b"retries" or not args:
        return False
    if len(args) == 1:
        return who.may_see(args[0])
    return who.may_register(args[0])
