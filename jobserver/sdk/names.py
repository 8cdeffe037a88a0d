"""Function names as both SDKs send them (SUBMIT_*, CAN_DO): checked once, the same way."""

from __future__ import annotations

MAX_FUNCTION_NAME_SIZE = 512
"""libgearman's cap on function names. gearmand has none of its own but closes the connection
when a packet's header and arguments pass 8 KiB (shared doc §1), which an SDK would take for a
dead server."""


def check_function_name(name: object) -> bytes:
    """The name as sent (UTF-8); TypeError unless a str, ValueError if empty, with a NUL (it
    separates arguments) or longer than MAX_FUNCTION_NAME_SIZE bytes.

    >>> check_function_name("resize")
    b'resize'
    """
    if not isinstance(name, str):
        raise TypeError(f"a function name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("a function name must not be empty")
    name_bytes = name.encode()
    if b"\0" in name_bytes:
        raise ValueError(f"function name {name!r} contains NUL (it separates arguments)")
    if len(name_bytes) > MAX_FUNCTION_NAME_SIZE:
        raise ValueError(
            f"function name {name[:40]!r}... is {len(name_bytes)} bytes; "
            f"at most {MAX_FUNCTION_NAME_SIZE}"
        )
    return name_bytes
