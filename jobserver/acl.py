"""Who may do what: the `--acl` file, and one connection's permissions.

An identity is the subject CN of a client certificate (mTLS), or the name `--loopback-identity`
gives plaintext connections from 127.0.0.0/8 and ::1. The file is TOML, one table per identity:

    [identity."webapp"]
    invoke = ["resize*"]        # SUBMIT_JOB* for these function globs
    [identity."worker-a"]
    register = ["resize*"]      # CAN_DO / CAN_DO_TIMEOUT for these
    [identity."ops"]
    invoke = ["*"]
    admin = true                # mutating admin commands, and every listing whole

    [anonymous]                 # optional: connections with no identity (no client
    invoke = ["public_*"]       # certificate, or a CN the file does not name); default: nothing

Globs are shell patterns matched case-sensitively against the whole function name (`*`, `?`,
`[abc]`). Without `--acl` nothing here runs and every peer may do everything, as gearmand.

Pure state, no I/O beyond reading the file: the server asks `Permissions` per packet, so
answers are cached per function name.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

IDENTITY_TABLE = "identity"
ANONYMOUS_TABLE = "anonymous"
RIGHTS = ("invoke", "register", "admin")

MAX_CACHED_FUNCTIONS = 4096
"""Function names whose answer one Permissions remembers. A connection uses a handful; the cap
only stops a peer cycling through random names from growing the cache without bound (past it,
the cache starts again: a miss costs one glob match, microseconds)."""


class AclError(Exception):
    """The ACL file cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Rights:
    """What one identity (or the anonymous table) grants, as written in the file."""

    invoke: tuple[str, ...] = ()
    register: tuple[str, ...] = ()
    admin: bool = False


NO_RIGHTS = Rights()


def _compile(globs: Iterable[str]) -> re.Pattern[str] | None:
    globs = tuple(globs)
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs))


class Permissions:
    """One connection's rights. `identity` is None for an anonymous connection."""

    __slots__ = ("_invoke", "_invoke_cache", "_register", "_register_cache", "admin", "identity")

    def __init__(self, identity: str | None, rights: Rights) -> None:
        self.identity = identity
        self.admin = rights.admin
        self._invoke = _compile(rights.invoke)
        self._register = _compile(rights.register)
        self._invoke_cache: dict[bytes, bool] = {}
        self._register_cache: dict[bytes, bool] = {}

    @property
    def name(self) -> str:
        """How logs name this connection's identity."""
        return "anonymous" if self.identity is None else repr(self.identity)

    def may_invoke(self, function: bytes) -> bool:
        return self._allowed(function, self._invoke, self._invoke_cache)

    def may_register(self, function: bytes) -> bool:
        return self._allowed(function, self._register, self._register_cache)

    def may_see_jobs_of(self, function: bytes) -> bool:
        """Whether job listings and status queries show this function's jobs: an admin sees
        every job, others those of functions they may invoke (the jobs they could submit)."""
        return self.admin or self.may_invoke(function)

    def may_see(self, function: bytes) -> bool:
        """Whether `status`-style listings show this function: one it may invoke or serve."""
        return self.admin or self.may_invoke(function) or self.may_register(function)

    @staticmethod
    def _allowed(
        function: bytes, pattern: re.Pattern[str] | None, cache: dict[bytes, bool]
    ) -> bool:
        answer = cache.get(function)
        if answer is None:
            if pattern is None:
                return False
            # Names are bytes on the wire; surrogateescape keeps non-UTF-8 bytes distinct
            # and unable to match a glob written in the file by accident.
            answer = pattern.fullmatch(function.decode("utf-8", "surrogateescape")) is not None
            if len(cache) >= MAX_CACHED_FUNCTIONS:
                cache.clear()
            cache[function] = answer
        return answer


@dataclass
class AccessList:
    """The parsed `--acl` file."""

    identities: Mapping[str, Rights] = field(default_factory=dict)
    anonymous: Rights = NO_RIGHTS
    path: Path | None = None

    def permissions(self, identity: str | None) -> Permissions:
        """The rights of a connection with this identity; a name the file does not list gets
        the anonymous table's (still with its name, for the log)."""
        rights = self.identities.get(identity, self.anonymous) if identity else self.anonymous
        return Permissions(identity, rights)

    def knows(self, identity: str) -> bool:
        return identity in self.identities


def load_acl(path: Path) -> AccessList:
    """Read and check an ACL file. Raises AclError naming the file and the problem (a bad
    key, a wrong type, TOML syntax) so that a typo never silently grants or denies."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise AclError(f"cannot read ACL file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise AclError(f"ACL file {path} is not valid TOML: {error}") from None
    return parse_acl(document, path)


def parse_acl(document: Mapping[str, object], path: Path | None = None) -> AccessList:
    where = f"ACL file {path}" if path is not None else "ACL"
    unknown = set(document) - {IDENTITY_TABLE, ANONYMOUS_TABLE}
    if unknown:
        raise AclError(
            f"{where}: unknown table(s) {', '.join(sorted(unknown))}; "
            f'expected [{IDENTITY_TABLE}."<name>"] and [{ANONYMOUS_TABLE}]'
        )
    tables = document.get(IDENTITY_TABLE, {})
    if not isinstance(tables, dict):
        raise AclError(f'{where}: "{IDENTITY_TABLE}" must be tables: [{IDENTITY_TABLE}."<name>"]')
    identities = {
        name: _rights(rights, f'{where}: [{IDENTITY_TABLE}."{name}"]')
        for name, rights in tables.items()
    }
    anonymous = _rights(document.get(ANONYMOUS_TABLE, {}), f"{where}: [{ANONYMOUS_TABLE}]")
    return AccessList(identities, anonymous, path)


def _rights(table: object, where: str) -> Rights:
    if not isinstance(table, dict):
        raise AclError(f"{where} must be a table of {', '.join(RIGHTS)}")
    unknown = set(table) - set(RIGHTS)
    if unknown:
        raise AclError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(RIGHTS)}"
        )
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise AclError(f"{where}: admin must be true or false, not {admin!r}")
    return Rights(
        invoke=_globs(table.get("invoke", []), f"{where} invoke"),
        register=_globs(table.get("register", []), f"{where} register"),
        admin=admin,
    )


def _globs(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(glob, str) and glob for glob in value):
        raise AclError(f'{where} must be a list of function globs, e.g. ["resize*"]')
    return tuple(value)
