"""Job handles: unique across restarts and servers, always at most 63 bytes (shared doc §3.1,
§6.15)."""

from __future__ import annotations

import pytest
from engine_helpers import FakeClock, connect, new_engine, reply, send, submit

from jobserver.engine import Engine
from jobserver.engine.handles import (
    MAX_HANDLE_SIZE,
    MAX_PREFIX_SIZE,
    STAMP_DIGITS,
    HandleGenerator,
    base36,
    default_prefix,
)
from jobserver.protocol import PacketType as T

LONGEST_HOSTNAME = "h" * 255  # longer than any real hostname (HOST_NAME_MAX is 64 on Linux)
LAST_STAMP_MS = 36**STAMP_DIGITS - 1


def handles_of(engine: Engine, count: int) -> list[bytes]:
    client = connect(engine)
    return [submit(engine, client, b"fn", b"", b"x", T.SUBMIT_JOB_BG) for _ in range(count)]


def test_handles_are_prefix_stamp_counter_counting_from_one():
    engine = new_engine(handle_prefix="myprefix", start_time_ms=1000)
    assert handles_of(engine, 3) == [b"myprefix:rs:1", b"myprefix:rs:2", b"myprefix:rs:3"]


def test_counter_is_global_over_functions():
    engine = new_engine(handle_prefix="p", start_time_ms=0)
    client = connect(engine)
    a = submit(engine, client, b"fa", b"", b"x")
    b = submit(engine, client, b"fb", b"", b"x")
    assert (a, b) == (b"p:0:1", b"p:0:2")


def test_start_stamp_defaults_to_the_wall_clock_in_milliseconds():
    clock = FakeClock(1_800_000_000.5)
    engine = new_engine(handle_prefix="H:host:4730", wall_clock=clock)
    (handle,) = handles_of(engine, 1)
    assert handle == b"H:host:4730:" + base36(1_800_000_000_500).encode() + b":1"


def test_restarted_server_never_repeats_a_handle():
    # gearmand restarts its counter at 1, so handles repeat across restarts (§6.15).
    before = new_engine(handle_prefix="H:host:4730", wall_clock=FakeClock(1_800_000_000.0))
    after = new_engine(handle_prefix="H:host:4730", wall_clock=FakeClock(1_800_000_000.001))
    assert not set(handles_of(before, 100)) & set(handles_of(after, 100))


def test_two_servers_started_at_the_same_time_on_different_ports_never_share_a_handle():
    a = new_engine(handle_prefix=default_prefix("host", 4730), start_time_ms=5)
    b = new_engine(handle_prefix=default_prefix("host", 4731), start_time_ms=5)
    assert not set(handles_of(a, 100)) & set(handles_of(b, 100))


def test_default_prefix_names_host_and_port():
    assert default_prefix("vm", 4730) == "H:vm:4730"


@pytest.mark.parametrize("port", [1, 4730, 65535])
def test_default_prefix_with_the_longest_hostname_fits_and_keeps_the_port(port):
    prefix = default_prefix(LONGEST_HOSTNAME, port)
    assert prefix.startswith("H:h")
    assert prefix.endswith(f":{port}")
    assert len(prefix.encode()) <= MAX_PREFIX_SIZE


def test_handle_is_at_most_63_bytes_with_the_longest_prefix_stamp_and_counter():
    generator = HandleGenerator(default_prefix(LONGEST_HOSTNAME, 65535), LAST_STAMP_MS)
    generator._counter = 2**64 - 2  # the next handle carries the largest 64-bit counter
    handle = generator.next_handle()
    assert handle.endswith(b":" + str(2**64 - 1).encode())
    assert len(handle) <= MAX_HANDLE_SIZE == 63


def test_prefix_of_maximum_size_is_accepted_and_handles_fit():
    prefix = "p" * MAX_PREFIX_SIZE
    engine = new_engine(handle_prefix=prefix, start_time_ms=LAST_STAMP_MS)
    (handle,) = handles_of(engine, 1)
    assert handle.startswith(prefix.encode() + b":")
    assert len(handle) <= MAX_HANDLE_SIZE


@pytest.mark.parametrize("prefix", ["p" * (MAX_PREFIX_SIZE + 1), "é" * 17, "x" * 200])
def test_prefix_too_long_is_rejected(prefix):
    assert len(prefix.encode()) > MAX_PREFIX_SIZE
    with pytest.raises(ValueError, match="prefix"):
        new_engine(handle_prefix=prefix)


def test_prefix_with_nul_is_rejected():
    with pytest.raises(ValueError, match="NUL"):
        new_engine(handle_prefix="H:\0:1")


def test_coalesced_and_refused_submits_consume_no_handle_number():
    engine = new_engine(handle_prefix="p", start_time_ms=0)
    client = connect(engine)
    assert submit(engine, client, b"fn", b"u", b"x") == b"p:0:1"
    assert submit(engine, client, b"fn", b"u", b"x") == b"p:0:1"
    send(engine, client, T.SUBMIT_JOB, "fn", "u" * 65, "x")
    assert reply(client).type == T.ERROR
    assert submit(engine, client, b"fn", b"v", b"x") == b"p:0:2"


@pytest.mark.parametrize(("number", "digits"), [(0, "0"), (35, "z"), (36, "10"), (1000, "rs")])
def test_base36(number, digits):
    assert base36(number) == digits
