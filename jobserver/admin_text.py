"""Text of admin replies: names escaped for listings, and ERR lines as gearmand writes them."""

from __future__ import annotations

import re

_UNSAFE = re.compile(rb"[\x00-\x1f\x7f\\]")
"""Bytes escaped in listings: every ASCII control character (NUL, TAB, LF, CR, ESC ... and DEL),
which could end a field or a line or drive a terminal, and the backslash that starts an escape,
so an escaped name reads back as exactly one name. Other bytes, UTF-8 included, are left alone:
they cannot break a line apart. Spaces are left alone too, even in `workers` where they also
separate words: as with gearmand, a name with a space reads as two there, but it cannot make
a line."""


def _escape_byte(match: re.Match[bytes]) -> bytes:
    return b"\\x%02x" % match[0][0]


def listed(name: bytes) -> bytes:
    """`name` as it appears in an admin listing: each unsafe byte written `\\xNN`
    (`a\\tb` -> `a\\x09b`). Names without one, nearly all, come back unchanged."""
    if _UNSAFE.search(name) is None:
        return name
    return _UNSAFE.sub(_escape_byte, name)


def err(code: str, text: str = "") -> bytes:
    """`ERR <code> <text>`, spaces inside each written as `+` as gearmand does (§4), so the
    line still splits into exactly the words a parser expects."""
    words = [code.replace(" ", "+")] + ([text.replace(" ", "+")] if text else [])
    return f"ERR {' '.join(words)}\r\n".encode()
