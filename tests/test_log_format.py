"""`--log-format json`: one JSON object a line, and the lifecycle lines an operator looks for
at the default level (NOTICE), in either format.

Real servers log to stderr or to a file; every line of it must parse on its own, whatever
newlines a message or a traceback holds, and SIGHUP (logrotate) must keep the format.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import signal
import socket
import sys

import pytest
from servers import HOST, JOB_CREATED, SUBMIT_JOB_BG, Server, free_port, wait_until
from test_cli_logging import admitted_connection
from test_cli_support import log_lines, run_jobserver, wait_for_log

from jobserver.logs import JsonFormatter

JSON = ("--log-format", "json")

FIELDS = {"time", "level", "logger", "message"}
"""Every record has these; "exception" is added when there is a traceback."""

MILLISECONDS_AND_OFFSET = re.compile(r"T\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
"""The end of an ISO 8601 time with milliseconds and a UTC offset (never a bare local time)."""

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
"""The text format's start of a line, as before --log-format existed."""

LEASE = 1
"""Seconds (the minimum): a takeover comes about a lease plus 2 s after the peer connects."""

TAKEOVER_DEADLINE = LEASE * 2 + 15


def records(lines: list[str]) -> list[dict]:
    """Every line parsed as one JSON record with the fields, or the test fails naming it."""
    parsed = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert FIELDS <= set(record) <= FIELDS | {"exception"}, line
        parsed.append(record)
    return parsed


def stderr_records(server: Server) -> list[dict]:
    return records(server.stderr_text().splitlines())


def find(found: list[dict], text: str) -> dict:
    """The first record whose message contains `text`."""
    match = next((record for record in found if text in record["message"]), None)
    assert match is not None, f"no record with {text!r} in {found}"
    return match


def wait_for_record(server: Server, text: str, timeout: float = 15.0) -> dict:
    def logged() -> dict | None:
        return next((r for r in stderr_records(server) if text in r["message"]), None)

    return wait_until(logged, timeout=timeout, what=f"{text!r} logged by {server}")


# --- the records ---------------------------------------------------------------------------------


def test_every_stderr_line_is_one_json_record_with_time_level_logger_and_message(
    start_jobserver,
):
    server = start_jobserver(*JSON)
    server.stop()

    found = stderr_records(server)

    assert len(found) >= 4  # listening, limits, store, shutting down, stopped
    for record in found:
        assert MILLISECONDS_AND_OFFSET.search(record["time"]), record
        assert datetime.datetime.fromisoformat(record["time"]).tzinfo is not None
        assert record["logger"] == "jobserver" or record["logger"].startswith("jobserver.")
        assert "exception" not in record
    assert {record["level"] for record in found} == {"NOTICE"}  # gearmand's name, not 25


def test_the_lifecycle_lines_are_json_records_at_the_default_level(start_jobserver):
    server = start_jobserver(*JSON)
    server.stop()

    found = stderr_records(server)

    listening = find(found, "listening on")
    assert listening["level"] == "NOTICE" and listening["logger"] == "jobserver"
    assert f"(pid {server.pid}) listening on 127.0.0.1 port {server.port}" in listening["message"]
    assert find(found, "limits:")["level"] == "NOTICE"
    store = find(found, "store opened:")
    assert store["level"] == "NOTICE"
    assert store["message"].endswith(f"jobserver-{server.port}.sqlite3 (background jobs loaded: 0)")
    assert find(found, "SIGTERM received: shutting down")["level"] == "NOTICE"
    assert found[-1]["message"] == "stopped" and found[-1]["level"] == "NOTICE"


def test_a_message_with_newlines_stays_one_record_on_one_line(start_jobserver, tmp_path):
    data_dir = tmp_path / "jobs\nwith a newline"  # named in the "store opened" line
    server = start_jobserver(*JSON, data_dir=data_dir)
    server.stop()

    found = stderr_records(server)  # fails if the newline split a record

    database = data_dir / f"jobserver-{server.port}.sqlite3"
    assert find(found, "store opened:")["message"] == (
        f"store opened: {database} (background jobs loaded: 0)"
    )


def test_a_traceback_is_the_exception_field_of_its_one_line_record():
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        error = sys.exc_info()
    record = logging.LogRecord(
        "jobserver.test", logging.CRITICAL, "", 0, "by %s", ("a bug",), error
    )

    line = JsonFormatter().format(record)

    assert "\n" not in line
    [parsed] = records([line])
    assert parsed["message"] == "by a bug"
    assert parsed["level"] == "CRITICAL" and parsed["logger"] == "jobserver.test"
    assert parsed["exception"].startswith("Traceback (most recent call last):\n")
    assert parsed["exception"].endswith("ValueError: first line\nsecond line")


def test_a_startup_failure_reaches_a_json_log_file_as_one_record(tmp_path):
    log_file = tmp_path / "jobserver.log"
    pid_file = tmp_path / "no\nsuch directory" / "jobserver.pid"

    result = run_jobserver(
        *JSON, "-L", HOST, "-p", "0", "--log-file", str(log_file), "--pid-file", str(pid_file),
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result
    [failure] = records(log_lines(log_file))
    assert failure["level"] == "ERROR"
    assert str(pid_file) in failure["message"]  # the newline kept, inside the record


def test_sighup_reopens_a_json_log_file_and_keeps_the_format(start_jobserver, tmp_path):
    log_file, rotated = tmp_path / "jobserver.log", tmp_path / "jobserver.log.1"
    server = start_jobserver(*JSON, "--log-file", str(log_file))
    wait_for_log(log_file, "store opened")
    log_file.rename(rotated)  # what logrotate does before it sends SIGHUP

    os.kill(server.pid, signal.SIGHUP)

    wait_for_log(log_file, "SIGHUP received")
    server.stop()
    [reopened, *after] = records(log_lines(log_file))
    assert reopened["message"] == f"SIGHUP received: log file {log_file} reopened"
    assert [record["message"] for record in after] == ["SIGTERM received: shutting down", "stopped"]
    assert find(records(log_lines(rotated)), "listening on")["level"] == "NOTICE"
    assert server.stderr_text() == ""  # nothing of the log on stderr


def test_the_text_format_is_unchanged(start_jobserver):
    server = start_jobserver("--log-format", "text")
    server.stop()

    lines = server.stderr_text().splitlines()

    assert all(TEXT_LINE.match(line) for line in lines), lines
    assert any(line.endswith(f"listening on 127.0.0.1 port {server.port}") for line in lines)
    assert " NOTICE stopped" in lines[-1]


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_http_side_logs_where_it_listens_at_the_default_level(start_jobserver, log_format):
    http_port = free_port()
    server = start_jobserver("--log-format", log_format, "--http", f"{HOST}:{http_port}")
    server.stop()

    expected = f"HTTP: status page and /metrics on {HOST} port {http_port}"
    if log_format == "json":
        record = find(stderr_records(server), "HTTP: status page")
        assert record["message"] == expected
        assert (record["level"], record["logger"]) == ("NOTICE", "jobserver")
    else:
        lines = server.stderr_text().splitlines()
        [line] = [line for line in lines if "HTTP: status page" in line]
        assert TEXT_LINE.match(line) and line.endswith(f" NOTICE {expected}"), line


# --- limits and the store's cluster, at the default level ---------------------------------------


def test_a_connection_refused_at_the_limit_is_a_json_record(start_jobserver):
    server = start_jobserver(*JSON, "--max-connections", "1")

    # The readiness probe's connection may still hold the slot for a moment: retry (bounded).
    admitted = wait_until(lambda: admitted_connection(server.port), what="a connection admitted")
    with admitted, socket.create_connection((HOST, server.port), timeout=5) as refused:
        with contextlib.suppress(ConnectionResetError):  # a reset is a close, too
            assert refused.recv(1) == b""  # closed at once, never served
        record = wait_for_record(server, "refused")

    assert record["level"] == "ERROR"
    assert "the limit (max_connections)" in record["message"]


def test_a_postgresql_store_logs_the_node_id_and_term_at_the_default_level(
    start_jobserver, pg_database
):
    server = start_jobserver(*JSON, "--store", pg_database, "--node-id", "alpha")
    server.stop()

    found = stderr_records(server)

    joined = find(found, "joined the cluster")
    assert joined["level"] == "NOTICE" and joined["logger"] == "jobserver.store.postgresql"
    assert joined["message"] == "joined the cluster as alpha, term 1"
    store = find(found, "store opened: ")
    assert store["level"] == "NOTICE" and store["message"].endswith("(background jobs loaded: 0)")
    password = pg_database.partition("://")[2].partition("@")[0].partition(":")[2]
    assert password and password not in server.stderr_text()


def test_a_takeover_is_logged_at_the_default_level(start_jobserver, pg_database):
    lease = ("--store", pg_database, "--lease", str(LEASE))
    doomed = start_jobserver(*JSON, *lease, "--node-id", "doomed")
    with doomed.connect() as client:
        client.request(SUBMIT_JOB_BG, b"f", b"", b"left behind", expect=JOB_CREATED)
    doomed.proc.kill()  # no goodbye: its lease runs out
    doomed.proc.wait()
    peer = start_jobserver(*JSON, *lease, "--node-id", "peer")

    queued = wait_for_record(peer, "jobs queued", timeout=TAKEOVER_DEADLINE)

    assert queued["level"] == "NOTICE"
    assert re.fullmatch(r"took over doomed \(term \d+\): 1 jobs queued", queued["message"])
    fenced = find(stderr_records(peer), "took over node doomed")  # the store's line, before
    assert (fenced["level"], fenced["logger"]) == ("WARNING", "jobserver.store.postgresql")
    assert fenced["message"].endswith("; 1 jobs")


def test_a_log_format_other_than_text_or_json_is_refused(tmp_path):
    result = run_jobserver("--log-format", "xml", "-L", HOST, "-p", "0", cwd=tmp_path)

    assert result.returncode == 2 and "xml" in result.stderr
