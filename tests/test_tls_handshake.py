"""The TLS listener's handshake (jobserver/tls.py) in-process: why a failed handshake failed,
as the server's log gives it, and the rate limit on those log lines. Memory streams and trio's
virtual clock, so the 10 s handshake timeout costs nothing; the live listener is
tests/test_server_tls.py.
"""

from __future__ import annotations

import logging
import types

import pytest
import tls_certs
import trio
import trio.testing
from tls_certs import Pki, client_hello

from jobserver import tls
from jobserver.protocol import PacketType as T
from jobserver.protocol import encode_request
from jobserver.tls import (
    HANDSHAKE_LOG_INTERVAL,
    HANDSHAKE_TIMEOUT,
    MAX_HANDSHAKE_CAUSES,
    HandshakeFailures,
)

tls_pki = tls_certs.tls_pki  # fixture: the session's certificates (tests/tls_certs.py)


async def test_a_handshake_that_never_starts_ends_at_the_timeout_naming_it(tls_pki, autojump_clock):
    context = tls.server_context(tls_pki.server.cert, tls_pki.server.key, None)
    server_side, _client_side = trio.testing.memory_stream_pair()
    started = trio.current_time()

    stream, cause = await tls.handshake(server_side, context)  # type: ignore[arg-type]

    assert stream is None
    assert cause == f"no handshake within {HANDSHAKE_TIMEOUT:g} s"
    assert trio.current_time() - started == pytest.approx(HANDSHAKE_TIMEOUT)  # virtual time


async def server_handshake_with(pki: Pki, peer_sends: bytes, then_close: bool) -> tuple[str, float]:
    """Run the server's handshake (mTLS context) against a peer that sends `peer_sends` and
    then closes or stalls: (the failure's cause, the virtual seconds it took)."""
    context = tls.server_context(pki.server.cert, pki.server.key, pki.ca_pem)
    server_side, client_side = trio.testing.memory_stream_pair()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def peer() -> None:
            if peer_sends:
                await client_side.send_all(peer_sends)
            if then_close:
                await client_side.aclose()

        nursery.start_soon(peer)
        stream, cause = await tls.handshake(server_side, context)  # type: ignore[arg-type]
    assert stream is None
    return cause, trio.current_time() - started


@pytest.mark.parametrize(
    ("first_bytes", "cause"),
    [
        (encode_request(T.ECHO_REQ, b"x"), "not TLS (WRONG_VERSION_NUMBER)"),
        (b"status\n", "not TLS (WRONG_VERSION_NUMBER)"),
        (b"GET / HTTP/1.1\r\n\r\n", "not TLS (HTTP_REQUEST)"),
    ],
    ids=["binary", "admin text", "HTTP"],
)
async def test_a_plaintext_peers_handshake_fails_at_its_first_bytes_as_not_tls(
    first_bytes, cause, tls_pki, autojump_clock
):
    # The peer stays open: only its bytes can end the handshake before the timeout.
    failure, took = await server_handshake_with(tls_pki, first_bytes, then_close=False)

    assert failure == cause
    assert took < HANDSHAKE_TIMEOUT  # virtual time: it did not wait for the timeout


@pytest.mark.parametrize("sent", ["nothing", "half a ClientHello"])
async def test_a_peer_that_closes_during_the_handshake_is_logged_as_closed(
    sent, tls_pki, autojump_clock
):
    hello = client_hello(tls_pki.client_context())
    first_bytes = b"" if sent == "nothing" else hello[: len(hello) // 2]

    failure, _took = await server_handshake_with(tls_pki, first_bytes, then_close=True)

    assert failure == "connection closed during the handshake"


def test_failed_handshakes_are_logged_once_an_interval_with_the_count_and_latest_cause(
    monkeypatch, caplog
):
    now = [1000.0]
    monkeypatch.setattr(tls, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    caplog.set_level(logging.WARNING, logger="jobserver")
    failures = HandshakeFailures()

    failures.note("192.0.2.1", "not TLS (WRONG_VERSION_NUMBER)")  # the first: logged at once
    for _ in range(5):
        failures.note("192.0.2.2", "no client certificate")  # counted
    now[0] += HANDSHAKE_LOG_INTERVAL
    failures.note("192.0.2.3", "client certificate rejected: certificate has expired")

    assert [record.getMessage() for record in caplog.records] == [
        "TLS handshake failed 1 time(s) in the last 10 s; the latest from 192.0.2.1: "
        "not TLS (WRONG_VERSION_NUMBER)",
        "TLS handshake failed 6 time(s) in the last 10 s (5 no client certificate; 1 client "
        "certificate rejected: certificate has expired); the latest from 192.0.2.3: "
        "client certificate rejected: certificate has expired",
    ]
    assert failures.total == 7


def test_a_burst_of_many_causes_counts_the_first_ones_and_the_rest_together(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(tls, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    caplog.set_level(logging.DEBUG, logger="jobserver")
    failures = HandshakeFailures()
    failures.note("192.0.2.1", "no client certificate")  # logged at once
    causes = [f"cause {n}" for n in range(MAX_HANDSHAKE_CAUSES + 3)]
    for cause in causes:
        failures.note("192.0.2.2", cause)
    now[0] += HANDSHAKE_LOG_INTERVAL
    failures.report()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    counted = "; ".join(f"1 {cause}" for cause in causes[:MAX_HANDSHAKE_CAUSES])
    assert warnings[1] == (
        f"TLS handshake failed {len(causes)} time(s) in the last 10 s ({counted}; 3 other "
        f"causes); the latest from 192.0.2.2: {causes[-1]}"
    )
    # Every failure is at DEBUG as it happens, with its own cause.
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug[-1] == f"TLS handshake from 192.0.2.2 failed: {causes[-1]}"
    assert len(debug) == 1 + len(causes)


async def test_the_tail_of_a_burst_is_logged_by_the_timer_without_a_later_failure(
    monkeypatch, caplog, autojump_clock
):
    now = [1000.0]
    monkeypatch.setattr(tls, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    caplog.set_level(logging.WARNING, logger="jobserver")
    failures = HandshakeFailures()
    failures.note("192.0.2.1", "no client certificate")  # logged at once
    for _ in range(499):
        failures.note("192.0.2.2", "no client certificate")  # then silence
    async with trio.open_nursery() as nursery:
        nursery.start_soon(failures.report_pending)
        now[0] += HANDSHAKE_LOG_INTERVAL
        await trio.sleep(HANDSHAKE_LOG_INTERVAL * 1.5)
        nursery.cancel_scope.cancel()
    assert [record.getMessage() for record in caplog.records] == [
        "TLS handshake failed 1 time(s) in the last 10 s; the latest from 192.0.2.1: "
        "no client certificate",
        "TLS handshake failed 499 time(s) in the last 10 s; the latest from 192.0.2.2: "
        "no client certificate",
    ]
