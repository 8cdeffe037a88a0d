"""Payload codecs: how Python values become job bytes and back.

At the wire level a payload is bytes, passed through untouched, so our workers serve clients in
other languages and the other way round. `msgpack` (the default) carries dict, list, str, int,
float, bool, None and bytes; `json` is for peers that speak JSON; `raw` is bytes as they are.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, cast

import msgpack

from .errors import PayloadError


class Codec(Protocol):
    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class MsgpackCodec:
    name = "msgpack"

    def encode(self, value: Any) -> bytes:
        return cast(bytes, msgpack.packb(value, use_bin_type=True))

    def decode(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)


class JsonCodec:
    name = "json"

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


class RawCodec:
    """Bytes as they are; str is sent as UTF-8; None as empty. Decoding gives bytes."""

    name = "raw"

    def encode(self, value: Any) -> bytes:
        if value is None:
            return b""
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        if isinstance(value, str):
            return value.encode()
        raise TypeError(f"raw payloads must be bytes or str, not {type(value).__name__}")

    def decode(self, data: bytes) -> bytes:
        return data


CODECS: dict[str, Codec] = {
    codec.name: codec for codec in (MsgpackCodec(), JsonCodec(), RawCodec())
}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}") from None


def encode_payload(codec: Codec, value: Any, *, function: str, what: str = "argument") -> bytes:
    try:
        return codec.encode(value)
    except Exception as error:
        raise PayloadError(
            f"function {function!r}: cannot encode the {what} with codec {codec.name!r}: "
            f"{_describe(error)}"
        ) from error


def decode_payload(codec: Codec, data: bytes, *, function: str, what: str = "argument") -> Any:
    try:
        return codec.decode(data)
    except Exception as error:
        raise PayloadError(
            f"function {function!r}: the {what} is not valid {codec.name} "
            f"({len(data)} bytes): {_describe(error)}"
        ) from error


def _describe(error: Exception) -> str:
    """The error's message, or its type when it has none (msgpack's FormatError for a reserved
    byte such as 0xc1 has an empty message)."""
    return str(error) or type(error).__name__
