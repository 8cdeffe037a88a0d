"""--http with a real store behind the server: a write the store refuses shows in
`jobserver_store_errors_total`, and a PostgreSQL store's node id shows in /metrics and
/api/status.

The store fault is test_store_faults.py's file size limit (RLIMIT_FSIZE on the server process,
SIGXFSZ ignored, so a write past it fails with EFBIG): it needs no root and no mount.
"""

from __future__ import annotations

import sys

import pytest
import servers
from servers import HOST, IO_TIMEOUT, JOB_CREATED, SUBMIT_JOB_BG, free_port, jobserver_argv
from test_http_status import HttpServer, labels
from test_store_faults import _RLIMIT_WRAPPER, FSIZE_LIMIT
from test_store_support import Packets, ServerSet

from jobserver.protocol import PacketType as T

TOO_BIG = b"\xee" * (FSIZE_LIMIT * 6)
"""A job argument whose record cannot be written under FSIZE_LIMIT."""


@pytest.fixture
def server_set():
    started = ServerSet()
    yield started
    started.stop_all()


def test_a_write_the_store_refuses_is_counted_in_store_errors(server_set, tmp_path):
    http_port = free_port()
    data_dir = tmp_path / "data"

    def argv(port: int, _workdir) -> list[str]:
        command = jobserver_argv(port, "--http", f"{HOST}:{http_port}", data_dir=data_dir)
        assert command[0] == sys.executable  # the wrapper execs the same Python with the rest
        return [sys.executable, "-c", _RLIMIT_WRAPPER, str(FSIZE_LIMIT), *command[1:]]

    server = servers._start("jobserver", argv, None)
    server_set.started.append(server)
    http = HttpServer(server, http_port)

    with Packets(server.port) as client:
        client.submit(T.SUBMIT_JOB_BG, b"disk", b"small", b"fits")
        client.send(T.SUBMIT_JOB_BG, b"disk", b"big", TOO_BIG)
        code, _text = client.expect(T.ERROR)
        assert code == b"QUEUE_ERROR"

        def counted():
            samples = http.metrics()
            return samples if samples[("jobserver_store_errors_total", ())] >= 1 else None

        samples = servers.wait_until(
            counted, timeout=IO_TIMEOUT, interval=0.1, what="the refused write counted"
        )
        # The commits that worked are timed beside it; the server goes on serving.
        assert samples[("jobserver_store_commit_seconds_count", ())] >= 1
        assert samples[("jobserver_info", labels(version="0.1.0", store="sqlite", node_id=""))]
        client.submit(T.SUBMIT_JOB_BG, b"disk", b"after", b"fits again")
        client.echo()
    assert server.proc.poll() is None


def test_a_postgresql_store_s_node_id_is_in_metrics_and_api_status(start_jobserver, pg_database):
    http_port = free_port()
    server = start_jobserver(
        "--store", pg_database, "--node-id", "alpha", "--http", f"{HOST}:{http_port}"
    )
    http = HttpServer(server, http_port)
    with server.connect() as client:  # a commit to PostgreSQL, so the store is in use
        client.request(SUBMIT_JOB_BG, b"pg", b"one", b"x", expect=JOB_CREATED)

    samples = http.metrics()
    assert samples[("jobserver_info", labels(version="0.1.0", store="postgres", node_id="alpha"))]
    facts = http.status()["server"]
    assert facts["node_id"] == "alpha" and facts["store"].startswith("postgres")
    password = pg_database.partition("://")[2].partition("@")[0].partition(":")[2]
    assert password and password not in facts["store"]
