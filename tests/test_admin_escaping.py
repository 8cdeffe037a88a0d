"""Admin listings cannot be forged by client-chosen names (issue: hardening).

Function names, unique ids and client ids may hold any byte but NUL. gearmand prints them raw,
so a function named "x\\t0\\t0\\t0\\nfake" adds a `fake` line to `status`. Every ASCII control
byte (0x00-0x1f, 0x7f) and the backslash are written `\\xNN` in every listing; other bytes
(UTF-8 names, spaces) are printed as they are.
"""

from __future__ import annotations

import pytest
from engine_helpers import connect, new_engine, send, submit

from jobserver.admin import AdminProtocol, ServerFacts, listed
from jobserver.protocol import PacketType as T

FORGED = b"x\t0\t0\t0\nfake"


def admin(engine, line: bytes) -> bytes:
    return AdminProtocol(engine, ServerFacts(pid=1)).execute(line)


def lines_of(reply: bytes) -> list[bytes]:
    assert reply.endswith(b".\n")
    return reply[:-2].split(b"\n")[:-1] if reply != b".\n" else []


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (b"plain-name", b"plain-name"),
        (b"x\t0\nfake", b"x\\x090\\x0afake"),
        (b"cr\rnul\0del\x7fesc\x1b", b"cr\\x0dnul\\x00del\\x7fesc\\x1b"),
        (b"back\\slash", b"back\\x5cslash"),  # so an escape can be told from a name
        ("naïve résumé".encode(), "naïve résumé".encode()),
        (b"with space", b"with space"),
    ],
)
def test_listed_escapes_control_bytes_and_backslash_only(name, shown):
    assert listed(name) == shown


def test_forged_function_name_stays_on_one_status_line():
    engine = new_engine()
    w = connect(engine)
    send(engine, w, T.CAN_DO, FORGED)
    status = lines_of(admin(engine, b"status"))
    assert status == [b"x\\x090\\x090\\x090\\x0afake\t0\t0\t1"]
    priority = lines_of(admin(engine, b"prioritystatus"))
    assert priority == [b"x\\x090\\x090\\x090\\x0afake\t0\t0\t0\t1"]


def test_forged_client_id_and_function_stay_on_their_workers_line():
    engine = new_engine()
    w = connect(engine)
    send(engine, w, T.SET_CLIENT_ID, b"id\n99 6.6.6.6 evil : forged")
    send(engine, w, T.CAN_DO, FORGED)
    (line,) = lines_of(admin(engine, b"workers"))
    assert line == (
        b"%d 127.0.0.1 id\\x0a99 6.6.6.6 evil : forged : x\\x090\\x090\\x090\\x0afake" % w.id
    )


def test_forged_unique_ids_stay_on_one_line_of_show_unique_jobs():
    engine = new_engine()
    client = connect(engine)
    submit(engine, client, b"fn", b"u\nH:fake:1", b"", T.SUBMIT_JOB_BG)
    assert lines_of(admin(engine, b"show unique jobs")) == [b"u\\x0aH:fake:1"]


def test_show_jobs_escapes_handles_too():
    # Handles are ours, but an operator's --job-handle-prefix is not checked for controls.
    engine = new_engine(handle_prefix="H:a\tb")
    client = connect(engine)
    submit(engine, client, b"fn", b"", b"", T.SUBMIT_JOB_BG)
    assert lines_of(admin(engine, b"show jobs"))[0].startswith(b"H:a\\x09b:")


def test_workers_lists_duplicates_latest_first_with_escapes():
    engine = new_engine()
    w = connect(engine)
    for name in (b"fb", b"f\ta", b"fb"):
        send(engine, w, T.CAN_DO, name)
    (line,) = lines_of(admin(engine, b"workers"))
    assert line.endswith(b" : fb f\\x09a fb")
