"""Bad input is refused with ValueError (or TypeError) before anything is sent.

The client points at a port nothing listens on: had it tried to send, the error would be
NoServerAvailable instead.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest
from test_client_sdk_support import nothing_listening

from client_sdk import Client, NoServerAvailable, PayloadError, SyncClient
from client_sdk.submission import MAX_UNIQUE_SIZE

pytestmark = pytest.mark.anyio  # every async test runs on trio and on asyncio (conftest.py)


@pytest.mark.parametrize(
    "servers",
    [[], ["host:notaport"], ["host:0"], ["[::1"], [("host", 70000)], ["a:1", "a:1"], [""]],
)
def test_bad_server_addresses_are_refused(servers):
    with pytest.raises(ValueError):
        Client(servers)
    with pytest.raises(ValueError):
        SyncClient(servers)


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="unknown codec 'pickle'"):
        Client(["127.0.0.1:4730"], codec="pickle")


def test_server_list_may_be_one_comma_separated_string():
    Client("127.0.0.1:4730, 127.0.0.1:4731")


def in_the_future() -> datetime:
    return datetime.now() + timedelta(hours=1)


BAD_CALLS = [
    ("NUL in function", "submit", ("re\0size", 1), {}, ValueError, "NUL"),
    ("long function", "submit", ("f" * 513, 1), {}, ValueError, "513 bytes; at most 512"),
    ("empty function", "submit_background", ("", 1), {}, ValueError, "empty"),
    ("function not str", "submit", (b"resize", 1), {}, TypeError, "str"),
    ("unique too long", "submit", ("f", 1), {"unique": "u" * 65}, ValueError, "longer than 64"),
    ("unique with NUL", "submit_background", ("f", 1), {"unique": "a\0b"}, ValueError, "NUL"),
    ("priority", "submit", ("f", 1), {"priority": "urgent"}, ValueError, "urgent"),
    ("bg priority", "submit_background", ("f", 1), {"priority": "HIGH"}, ValueError, "HIGH"),
    ("negative timeout", "submit", ("f", 1), {"timeout": -1}, ValueError, "timeout"),
    (
        "run_at with priority",
        "submit_background",
        ("f", 1),
        {"run_at": in_the_future(), "priority": "high"},
        ValueError,
        "normal priority",
    ),
    ("run_at not datetime", "submit_background", ("f", 1), {"run_at": 12}, TypeError, "datetime"),
    ("unencodable", "submit", ("resize", object()), {}, PayloadError, "'resize'.*'msgpack'"),
    ("handle too long", "status", ("H" * 64,), {}, ValueError, "job handle"),
    ("empty handle", "status", ("",), {}, ValueError, "job handle"),
]


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "error", "match"),
    [case[1:] for case in BAD_CALLS],
    ids=[case[0] for case in BAD_CALLS],
)
async def test_bad_call_is_refused_before_sending(method, args, kwargs, error, match):
    with anyio.fail_after(10):
        async with Client([nothing_listening()]) as client:
            with pytest.raises(error, match=match):
                await getattr(client, method)(*args, **kwargs)
            # Nothing was tried, so no server was marked as failed.
            assert all(server.session is None for server in client._pool.servers)
            assert all(server.skip_until < 0 for server in client._pool.servers)


async def test_bad_stream_is_refused_when_made():
    async with Client([nothing_listening()], codec="json") as client:
        with pytest.raises(ValueError, match="NUL"):
            client.stream("a\0b")
        with pytest.raises(PayloadError, match="'json'"):
            client.stream("f", {1, 2})


def test_raw_codec_refuses_non_bytes_naming_function_and_codec():
    async def main():
        async with Client([nothing_listening()], codec="raw") as client:
            await client.submit("thumbnail", {"not": "bytes"})

    with pytest.raises(PayloadError, match=r"function 'thumbnail'.*codec 'raw'"):
        anyio.run(main)


async def test_unique_of_exactly_the_limit_is_sent():
    async with Client([nothing_listening()]) as client:
        with pytest.raises(NoServerAvailable):
            await client.submit("f", 1, unique="u" * MAX_UNIQUE_SIZE)


async def test_client_must_be_entered_before_use():
    client = Client([nothing_listening()])
    with pytest.raises(RuntimeError, match="async with"):
        await client.submit("f", 1)
