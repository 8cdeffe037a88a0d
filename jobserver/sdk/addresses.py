"""Server addresses as users write them: "host:port", "[::1]:4730", "host", or (host, port)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

DEFAULT_PORT = 4730
"""Gearman's IANA port."""


class ServerAddress(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


ServerSpec = str | tuple[str, int] | ServerAddress


def parse_address(spec: ServerSpec) -> ServerAddress:
    """Parse one server address; raises ValueError naming what is wrong."""
    if isinstance(spec, tuple):
        host, port = spec
        return ServerAddress(str(host), _check_port(port, spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"server address must be 'host:port' or (host, port), not {spec!r}")
    text = spec.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad IPv6 server address {spec!r}; write it as [addr]:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        host, port_text = text, ""  # a bare IPv6 address
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"server address {spec!r} has no host")
    if not port_text:
        return ServerAddress(host, DEFAULT_PORT)
    if not port_text.isdigit():
        raise ValueError(f"server address {spec!r} has a bad port {port_text!r}")
    return ServerAddress(host, _check_port(int(port_text), spec))


def parse_addresses(specs: Iterable[ServerSpec] | str) -> list[ServerAddress]:
    """A list of servers; a single string may hold several separated by commas."""
    if isinstance(specs, str):
        specs = [part for part in specs.split(",") if part.strip()]
    addresses = [parse_address(spec) for spec in specs]
    if not addresses:
        raise ValueError("at least one server address is needed")
    if len(set(addresses)) != len(addresses):
        raise ValueError("the same server is listed twice")
    return addresses


def _check_port(port: object, spec: object) -> int:
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"server address {spec!r}: port must be 1..65535")
    return port
