"""--http ADDR:PORT against real servers and sockets: /metrics read with prometheus_client's own
parser and checked against a known load, /api/status, the page's files, and the HTTP side's
limits (bad requests get a 4xx, and the Gearman port keeps answering whatever HTTP gets).

Snapshots of the engine serve requests for up to a second (http_status.SNAPSHOT_MAX_AGE), so a
check after a change polls, bounded, until the figures show it.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import (
    CAN_DO,
    GRAB_JOB,
    HOST,
    IO_TIMEOUT,
    JOB_ASSIGN,
    JOB_CREATED,
    SET_CLIENT_ID,
    SUBMIT_JOB,
    SUBMIT_JOB_BG,
    SUBMIT_JOB_HIGH_BG,
    WORK_FAIL,
    admin,
    echo,
    free_port,
    wait_until,
)
from test_cli_support import one_line, run_jobserver

from jobserver.engine.counters import MAX_COUNTED_FUNCTIONS, FunctionCounters, StoreCommits
from jobserver.http_api import Throughput
from jobserver.http_status import (
    MAX_HEADERS,
    MAX_HTTP_CONNECTIONS,
    MAX_REQUEST_HEAD,
    RECEIVE_SIZE,
    REQUEST_TIMEOUT,
)
from jobserver.metrics import render as render_metrics
from jobserver.metrics_snapshot import HistogramCopy, ServerFactsCopy, Snapshot

pytest_plugins = ["test_cli_support"]  # its fixtures: busy_port

WORK_COMPLETE = 13


# --- helpers ---------------------------------------------------------------------------------


class HttpServer:
    """A started jobserver and the port of its --http side."""

    def __init__(self, server, http_port: int) -> None:
        self.server = server
        self.http_port = http_port

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(HOST, self.http_port, timeout=IO_TIMEOUT)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def status(self) -> dict:
        code, _headers, body = self.get("/api/status")
        assert code == 200
        return json.loads(body)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample by (name, sorted labels), parsed by prometheus_client."""
        code, headers, body = self.get("/metrics")
        assert code == 200
        assert headers["Content-Type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def wait_for_metrics(self, expected: dict, what: str) -> dict:
        """The metrics once every (name, labels) in `expected` has its value (bounded)."""

        def matching():
            samples = self.metrics()
            return (
                samples
                if all(samples.get(key) == value for key, value in expected.items())
                else None
            )

        try:
            return wait_until(matching, timeout=IO_TIMEOUT, interval=0.1, what=what)
        except TimeoutError:
            samples = self.metrics()
            got = {key: samples.get(key) for key in expected}
            raise AssertionError(f"{what}: expected {expected}, got {got}") from None


@pytest.fixture
def http_server(start_jobserver) -> HttpServer:
    port = free_port()
    server = start_jobserver("--store", "memory", "--http", f"{HOST}:{port}")
    return HttpServer(server, port)


def labels(**pairs: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pairs.items()))


def submit_background(conn, function: bytes, unique: bytes, packet_type: int = SUBMIT_JOB_BG):
    return conn.request(packet_type, function, unique, b"payload", expect=JOB_CREATED)


def grab(conn) -> bytes:
    handle, _function, _payload = conn.request(GRAB_JOB, expect=JOB_ASSIGN).split(b"\0", 2)
    return handle


def raw_http(port: int, data: bytes, timeout: float = IO_TIMEOUT) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


# --- /metrics ---------------------------------------------------------------------------------


def test_metrics_count_a_known_load(http_server):
    fn = "resize"
    with http_server.server.connect() as client, http_server.server.connect() as worker:
        for number in range(7):
            submit_background(client, fn.encode(), b"job-%d" % number)
        # One foreground job too, queued last (so it is still queued below): kind="foreground".
        client.request(SUBMIT_JOB, fn.encode(), b"fg", b"payload", expect=JOB_CREATED)
        http_server.wait_for_metrics(
            {
                ("jobserver_queued_jobs", labels(function=fn, priority="normal")): 8,
                ("jobserver_queued_jobs", labels(function=fn, priority="high")): 0,
                ("jobserver_jobs_submitted_total", labels(function=fn, kind="background")): 7,
                ("jobserver_jobs_submitted_total", labels(function=fn, kind="foreground")): 1,
            },
            "8 queued jobs, one of them foreground",
        )

        worker.send(CAN_DO, fn.encode())
        for _ in range(3):
            handle = grab(worker)
            worker.send(WORK_COMPLETE, handle, b"done")
        worker.send(WORK_FAIL, grab(worker))  # no retries: into the dead set
        grab(worker)  # left running
        samples = http_server.wait_for_metrics(
            {
                ("jobserver_queued_jobs", labels(function=fn, priority="normal")): 3,
                ("jobserver_running_jobs", labels(function=fn)): 1,
                ("jobserver_workers", labels(function=fn)): 1,
                ("jobserver_jobs_completed_total", labels(function=fn)): 3,
                ("jobserver_jobs_failed_total", labels(function=fn)): 1,
                ("jobserver_job_wait_seconds_count", labels(function=fn)): 5,
                ("jobserver_job_run_seconds_count", labels(function=fn)): 4,
                ("jobserver_dead_jobs", labels(function=fn)): 1,
            },
            "3 completed, 1 failed, 1 running",
        )
        assert samples[("jobserver_job_wait_seconds_bucket", labels(function=fn, le="+Inf"))] == 5
        assert samples[("jobserver_job_run_seconds_bucket", labels(function=fn, le="+Inf"))] == 4
        assert samples[("jobserver_job_wait_seconds_sum", labels(function=fn))] > 0
        assert samples[("jobserver_oldest_queued_job_age_seconds", labels(function=fn))] > 0
        assert samples[("jobserver_connections", ())] >= 2
        assert samples[("jobserver_info", labels(version="0.1.0", store="memory", node_id=""))]
        assert ("process_resident_memory_bytes", ()) in samples


def test_a_failed_job_waiting_for_its_retry_is_counted_as_retrying(http_server):
    fn = "flaky"
    server = http_server.server
    # 3 retries, the first a minute after the failure: the job waits for it all test long.
    assert admin(server.address, f"retries {fn} 3 60") == b"OK\r\n"
    with server.connect() as client, server.connect() as worker:
        submit_background(client, fn.encode(), b"once")
        worker.send(CAN_DO, fn.encode())
        worker.send(WORK_FAIL, grab(worker))
        http_server.wait_for_metrics(
            {
                ("jobserver_retrying_jobs", labels(function=fn)): 1,
                ("jobserver_dead_jobs", labels(function=fn)): 0,
                ("jobserver_jobs_failed_total", labels(function=fn)): 1,
                ("jobserver_running_jobs", labels(function=fn)): 0,
            },
            "the failed job waiting for its retry",
        )
        status = http_server.status()
    assert status["totals"]["retrying"] == 1 and status["totals"]["dead"] == 0
    [function] = status["functions"]
    assert function["name"] == fn and function["retrying"] == 1 and function["dead"] == 0
    assert function["waiting"] == 1  # not runnable until its retry is due


def test_metrics_fold_functions_past_the_cap_into_other(http_server):
    extra = 10
    with http_server.server.connect() as client:
        for number in range(MAX_COUNTED_FUNCTIONS + extra):
            submit_background(client, b"fn-%04d" % number, b"")
        samples = http_server.wait_for_metrics(
            {("jobserver_queued_jobs", labels(function="_other", priority="normal")): extra},
            "the functions past the cap under _other",
        )
    functions = {dict(key)["function"] for name, key in samples if name == "jobserver_queued_jobs"}
    assert len(functions) == MAX_COUNTED_FUNCTIONS + 1
    assert "fn-0000" in functions and f"fn-{MAX_COUNTED_FUNCTIONS:04d}" not in functions
    submitted = samples[
        ("jobserver_jobs_submitted_total", labels(function="_other", kind="background"))
    ]
    assert submitted == extra


def test_metrics_of_a_name_that_is_not_utf8_are_escaped(http_server):
    with http_server.server.connect() as client:
        submit_background(client, b"caf\xe9", b"")
    http_server.wait_for_metrics(
        {("jobserver_queued_jobs", labels(function="caf\\xe9", priority="normal")): 1},
        "the escaped name",
    )


def test_store_commits_are_timed_with_a_durable_store(start_jobserver, tmp_path):
    port = free_port()
    server = start_jobserver("--data-dir", str(tmp_path), "--http", f"{HOST}:{port}")  # sqlite
    http = HttpServer(server, port)
    with server.connect() as client:
        for number in range(3):
            submit_background(client, b"durable", b"%d" % number)  # each waits for its commit

    def committed():
        samples = http.metrics()
        return samples if samples[("jobserver_store_commit_seconds_count", ())] >= 1 else None

    samples = wait_until(committed, timeout=IO_TIMEOUT, interval=0.1, what="a timed commit")
    assert samples[("jobserver_store_commit_seconds_sum", ())] > 0
    assert samples[("jobserver_store_errors_total", ())] == 0
    assert samples[("jobserver_info", labels(version="0.1.0", store="sqlite", node_id=""))] == 1
    assert http.status()["server"]["store"].startswith(f"sqlite {tmp_path}")


def test_store_commit_times_and_refusals_are_exported():
    commits = StoreCommits()
    for seconds in (0.0004, 0.002, 0.002, 2.0):
        commits.record(seconds, refused=False)
    commits.record(0.01, refused=True)
    facts = ServerFactsCopy("0.1.0", 1, 0.0, 1.0, "sqlite /data/x", None, 4730, 0, 10)
    snapshot = Snapshot(
        server=facts,
        monotonic_now=0.0,
        functions=[],
        counts=[],
        store_commits=HistogramCopy.of(commits.seconds),
        store_errors=commits.errors,
    )
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(render_metrics(snapshot).decode())
        for sample in family.samples
    }
    assert samples[("jobserver_store_commit_seconds_count", ())] == 5
    assert samples[("jobserver_store_commit_seconds_bucket", labels(le="0.0005"))] == 1
    assert samples[("jobserver_store_commit_seconds_bucket", labels(le="0.0025"))] == 3
    assert samples[("jobserver_store_commit_seconds_bucket", labels(le="1.0"))] == 4
    assert samples[("jobserver_store_commit_seconds_bucket", labels(le="+Inf"))] == 5
    assert samples[("jobserver_store_errors_total", ())] == 1
    assert samples[("jobserver_info", labels(version="0.1.0", store="sqlite", node_id=""))] == 1


# --- /api/status ------------------------------------------------------------------------------


def test_api_status_reports_functions_workers_running_jobs_and_server(http_server):
    with http_server.server.connect() as client, http_server.server.connect() as worker:
        submit_background(client, b"thumbs", b"a", SUBMIT_JOB_HIGH_BG)
        submit_background(client, b"thumbs", b"b")
        submit_background(client, b"thumbs", b"c")
        worker.send(SET_CLIENT_ID, b"worker-7")
        worker.send(CAN_DO, b"thumbs")
        handle = grab(worker)  # the high priority one

        def running_shown():
            status = http_server.status()
            return status if status["running_jobs"] else None

        status = wait_until(running_shown, timeout=IO_TIMEOUT, interval=0.1, what="a running job")

    server = status["server"]
    assert server["port"] == http_server.server.port
    assert server["pid"] == http_server.server.pid
    assert server["store"] == "memory" and server["node_id"] is None
    assert server["version"] == "0.1.0" and server["uptime_seconds"] >= 0
    assert server["connections"] >= 2
    [function] = status["functions"]
    assert function["name"] == "thumbs"
    assert function["queued"] == {"high": 0, "normal": 2, "low": 0}
    assert function["running"] == 1 and function["workers"] == 1
    assert function["oldest_queued_age_seconds"] >= 0
    assert function["submitted"] == {"foreground": 0, "background": 3}
    [listed_worker] = status["workers"]
    assert listed_worker["client_id"] == "worker-7"
    assert listed_worker["functions"] == ["thumbs"] and listed_worker["running"] == 1
    assert listed_worker["address"] == "127.0.0.1"
    [job] = status["running_jobs"]
    assert job["handle"] == handle.decode() and job["function"] == "thumbs"
    assert job["unique"] == "a" and job["worker_id"] == listed_worker["id"]
    assert job["age_seconds"] >= 0
    assert status["totals"]["queued"] == 2 and status["totals"]["running"] == 1


def test_api_status_lists_dead_jobs_with_their_error(http_server):
    with http_server.server.connect() as client, http_server.server.connect() as worker:
        submit_background(client, b"mail", b"to-bob")
        worker.send(CAN_DO, b"mail")
        worker.send(25, grab(worker), b"smtp <refused>\n")  # WORK_EXCEPTION

        def dead_shown():
            status = http_server.status()
            return status if status["dead_jobs"] else None

        status = wait_until(dead_shown, timeout=IO_TIMEOUT, interval=0.1, what="a dead job")
    [dead] = status["dead_jobs"]
    assert dead["function"] == "mail" and dead["unique"] == "to-bob"
    assert dead["attempts"] == 1 and dead["error"] == "smtp <refused>\n"
    assert dead["last_failure"] >= dead["first_failure"] > 0
    assert status["dead_total"] == 1 and status["totals"]["dead"] == 1


def test_throughput_is_per_minute_over_the_last_minute_and_never_scaled_up():
    counters = FunctionCounters()
    throughput = Throughput()
    assert throughput.per_minute(0.0, b"fn", 0, 0) is None  # before the first sample
    throughput.sample(0.0, counters)
    assert throughput.per_minute(0.01, b"fn", 2, 1) == (2.0, 1.0)  # 2 in 10 ms: 2 so far
    counts = counters.of(b"fn")
    for second in range(5, 125, 5):
        counts.completed = second  # one a second
        throughput.sample(float(second), counters)
    rate = throughput.per_minute(120.0, b"fn", 120, 0)
    assert rate is not None and rate[0] == 60.0


# --- the page ---------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_with_a_strict_policy(http_server):
    code, headers, body = http_server.get("/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert b'name="viewport"' in body and b"/static/status.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for path, kind in (
        ("/static/status.js", "text/javascript"),
        ("/static/status.css", "text/css"),
    ):
        code, headers, body = http_server.get(path)
        assert code == 200 and headers["Content-Type"].startswith(kind) and body
    assert b"innerHTML" not in http_server.get("/static/status.js")[2]


# --- bad requests and limits ------------------------------------------------------------------


def test_unknown_paths_are_404_and_other_methods_405(http_server):
    assert http_server.get("/nope")[0] == 404
    assert http_server.get("/static/../metrics")[0] == 404
    code, headers, _body = http_server.get("/metrics", method="POST")
    assert code == 405 and headers["Allow"] == "GET, HEAD"
    code, headers, body = http_server.get("/api/status", method="HEAD")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x00\x01\x02 garbage\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", b"413"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"a" * (2 * MAX_REQUEST_HEAD + RECEIVE_SIZE)
            + b"\r\n\r\n",
            b"431",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: y\r\n" % n for n in range(MAX_HEADERS + 1))
            + b"\r\n",
            b"431",
        ),
    ],
    ids=["garbage", "no-host", "body", "oversized-head", "too-many-headers"],
)
def test_bad_requests_get_a_4xx_and_the_gearman_port_keeps_answering(
    http_server, request_bytes, status
):
    reply = raw_http(http_server.http_port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:200]
    assert echo(HOST, http_server.server.port, b"still here") == b"still here"
    assert http_server.get("/metrics")[0] == 200


@pytest.mark.parametrize(
    "announcing",
    [b"Content-Length: 2000000\r\nExpect: 100-continue", b"Transfer-Encoding: chunked"],
    ids=["content-length", "chunked"],
)
def test_a_get_that_announces_a_body_is_refused_without_waiting_for_it(http_server, announcing):
    # The head only: a client that sent Expect: 100-continue waits for our answer to send the
    # body. Refused at once with 413; waiting for the body would end in a 408 after
    # REQUEST_TIMEOUT, so the status alone tells; the time is a loose bound beside it.
    started = time.monotonic()
    reply = raw_http(
        http_server.http_port,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + announcing + b"\r\n\r\n",
        timeout=REQUEST_TIMEOUT * 2,
    )
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"\r\nconnection: close\r\n" in reply.lower()
    assert time.monotonic() - started < REQUEST_TIMEOUT


def test_connections_past_the_cap_are_closed_and_the_rest_still_served(http_server):
    # Each one served a request and is kept alive: all are accepted and counted, none queued.
    held = []
    try:
        for _ in range(MAX_HTTP_CONNECTIONS):
            connection = http.client.HTTPConnection(HOST, http_server.http_port, timeout=IO_TIMEOUT)
            held.append(connection)
            connection.request("GET", "/static/status.css")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
        with socket.create_connection((HOST, http_server.http_port), timeout=IO_TIMEOUT) as sock:
            assert sock.recv(1) == b""  # closed at once, nothing read
        assert echo(HOST, http_server.server.port) == b"ping"
    finally:
        for connection in held:
            connection.close()

    def served() -> bool:
        try:
            return http_server.get("/api/status")[0] == 200
        except (OSError, http.client.HTTPException):
            return False  # refused: the server has not seen every close yet

    wait_until(served, timeout=IO_TIMEOUT, what="HTTP served again once the others closed")


def test_a_request_that_never_completes_gets_408_and_is_closed(http_server):
    with socket.create_connection((HOST, http_server.http_port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and no blank line
        started = time.monotonic()
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - started < 25


def test_keep_alive_serves_several_requests_on_one_connection(http_server):
    connection = http.client.HTTPConnection(HOST, http_server.http_port, timeout=IO_TIMEOUT)
    try:
        for path in ("/api/status", "/metrics", "/", "/nope"):
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            assert response.status in (200, 404)
    finally:
        connection.close()


# --- start-up ---------------------------------------------------------------------------------


def test_http_on_a_busy_port_is_a_one_line_startup_error(busy_port, tmp_path):
    result = run_jobserver(
        "-L",
        HOST,
        "-p",
        str(free_port()),
        "--store",
        "memory",
        "--http",
        f"{HOST}:{busy_port}",
        cwd=tmp_path,
    )
    line = one_line(result)
    assert f"cannot listen for HTTP on {HOST} port {busy_port}" in line
    assert "in use" in line


def test_the_http_side_is_not_opened_without_http(start_jobserver):
    server = start_jobserver("--store", "memory")
    # Nothing but the Gearman port: the server's listening sockets, from /proc.
    inodes = _listening_inodes()
    own = _socket_inodes(server.pid)
    ports = {port for inode, port in inodes.items() if inode in own}
    assert ports == {server.port}


def _listening_inodes() -> dict[str, int]:
    """Listening TCP sockets on this machine: inode -> local port."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                lines = file.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                found[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes
