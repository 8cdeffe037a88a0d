"""The status page (GET /) in a real browser: Debian's chromium, headless, loads the page from a
jobserver under a known load, lets its script fetch /api/status, and dumps the DOM it drew and a
screenshot. The DOM must hold the function rows with the load's numbers, the worker, the running
job and the dead job, and show a function name made of HTML as text.

Chromium is required, not optional (scripts/test installs it): a missing one fails the test
with the command to run. Set JOBSERVER_UPDATE_SCREENSHOT=1 to copy the screenshot to
docs/status-page.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from servers import (
    CAN_DO,
    GRAB_JOB,
    HOST,
    IO_TIMEOUT,
    JOB_ASSIGN,
    JOB_CREATED,
    REPO_ROOT,
    SET_CLIENT_ID,
    SUBMIT_JOB_BG,
    SUBMIT_JOB_HIGH_BG,
    WORK_FAIL,
    free_port,
    wait_until,
)

CHROMIUM = "/usr/bin/chromium"
BROWSER_TIMEOUT = 90.0  # seconds for one chromium run, start to exit
VIRTUAL_TIME_BUDGET_MS = 5000  # page time chromium lets pass (timers, fetches) before dumping
WORK_COMPLETE = 13
HTML_NAME = "<b>bold</b>"  # a function name that must show as text, never as markup


def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; "
            "scripts/test does this); the status page is tested in a real browser",
            pytrace=False,
        )
    return CHROMIUM


def run_chromium(profile: Path, *args: str) -> str:
    """Run headless chromium to completion (bounded) and return its stdout. It runs in a
    session of its own, so that on a timeout its helper processes go with it, by its id."""
    argv = [
        chromium(),
        "--headless",
        "--no-sandbox",  # we run as root in CI
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
        *args,
    ]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=BROWSER_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {BROWSER_TIMEOUT} s: {argv}")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode()[-2000:]}"
    return out.decode()


class Rows(HTMLParser):
    """Each table's rows as {data-field: text}, with the row's data-function if it has one."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[dict[str, str]]] = {}
        self.elements: list[str] = []
        self._table = ""
        self._row: dict[str, str] | None = None
        self._field: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append(tag)
        if tag == "table":
            self._table = attributes.get("id") or ""
        elif tag == "tr" and self._table:
            self._row = {}
            if "data-function" in attributes:
                self._row["data-function"] = attributes["data-function"] or ""
        elif tag == "td" and self._row is not None:
            self._field = attributes.get("data-field") or ""
            self._row[self._field] = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self._field = None
        elif tag == "tr" and self._row:
            self.tables.setdefault(self._table, []).append(self._row)
            self._row = None
        elif tag == "table":
            self._table = ""

    def handle_data(self, data):
        if self._row is not None and self._field is not None:
            self._row[self._field] += data


def status(http_port: int) -> dict:
    import http.client

    connection = http.client.HTTPConnection(HOST, http_port, timeout=IO_TIMEOUT)
    try:
        connection.request("GET", "/api/status")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


@pytest.fixture
def loaded_server(start_jobserver):
    """A jobserver with --http and a known load: resize 7 queued, 1 of them running on worker
    'thumbnailer-1', 2 done; email 3 queued at high priority; mail 1 dead; and a function
    whose name is HTML."""
    http_port = free_port()
    server = start_jobserver("--store", "memory", "--http", f"{HOST}:{http_port}")
    client, worker = server.connect(), server.connect()
    for number in range(9):
        client.request(SUBMIT_JOB_BG, b"resize", b"img-%d" % number, b"x", expect=JOB_CREATED)
    for number in range(3):
        client.request(SUBMIT_JOB_HIGH_BG, b"email", b"mail-%d" % number, b"", expect=JOB_CREATED)
    client.request(SUBMIT_JOB_BG, b"mail", b"to-alice", b"", expect=JOB_CREATED)
    client.request(SUBMIT_JOB_BG, HTML_NAME.encode(), b"", b"", expect=JOB_CREATED)
    worker.send(SET_CLIENT_ID, b"thumbnailer-1")
    worker.send(CAN_DO, b"resize")
    for _ in range(2):
        handle = worker.request(GRAB_JOB, expect=JOB_ASSIGN).split(b"\0")[0]
        worker.send(WORK_COMPLETE, handle, b"done")
    running = worker.request(GRAB_JOB, expect=JOB_ASSIGN).split(b"\0")[0]
    failing = server.connect()
    failing.send(CAN_DO, b"mail")
    failing.send(WORK_FAIL, failing.request(GRAB_JOB, expect=JOB_ASSIGN).split(b"\0")[0])
    failing.send(2, b"mail")  # CANT_DO: only the running resize job is held by a worker

    def shows_the_load():
        current = status(http_port)
        return current["dead_total"] == 1 and current["running_total"] == 1

    wait_until(shows_the_load, timeout=IO_TIMEOUT, interval=0.1, what="the load in /api/status")
    yield http_port, running.decode()
    for conn in (client, worker, failing):
        conn.close()


def test_the_page_shows_functions_workers_running_and_dead_jobs(loaded_server, tmp_path):
    http_port, running_handle = loaded_server
    url = f"http://{HOST}:{http_port}/"

    dom = run_chromium(tmp_path / "profile", "--dump-dom", url)

    page = Rows()
    page.feed(dom)
    functions = {row["data-function"]: row for row in page.tables.get("functions", [])}
    assert set(functions) == {"resize", "email", "mail", HTML_NAME}, dom[-3000:]
    resize = functions["resize"]
    assert resize["name"] == "resize"
    assert (resize["queued-high"], resize["queued-normal"], resize["queued-low"]) == ("0", "6", "0")
    assert (resize["running"], resize["workers"], resize["dead"]) == ("1", "1", "0")
    assert resize["oldest"].endswith(("ms", "s"))
    email = functions["email"]
    assert (email["queued-high"], email["queued-normal"], email["workers"]) == ("3", "0", "0")
    assert functions["mail"]["dead"] == "1"
    assert functions[HTML_NAME]["queued-normal"] == "1"
    assert "b" not in page.elements, "a function name was drawn as HTML"

    [worker] = page.tables["workers"]
    assert worker["client-id"] == "thumbnailer-1" and worker["functions"] == "resize"
    assert worker["running"] == "1" and worker["address"] == "127.0.0.1"
    [running] = page.tables["running"]
    assert running["handle"] == running_handle and running["function"] == "resize"
    assert running["unique"] in {f"img-{n}" for n in range(9)}
    [dead] = page.tables["dead"]
    assert dead["function"] == "mail" and dead["unique"] == "to-alice"
    assert dead["attempts"] == "1" and dead["error"] == "failed"
    assert 'data-state="live"' in dom


def test_the_page_renders_to_a_screenshot_on_a_desktop_and_a_phone(loaded_server, tmp_path):
    http_port, _handle = loaded_server
    url = f"http://{HOST}:{http_port}/"
    shots = {}
    for name, size in (("status-page.png", "1280,900"), ("status-page-phone.png", "390,1200")):
        shot = tmp_path / name
        run_chromium(tmp_path / "profile", f"--window-size={size}", f"--screenshot={shot}", url)
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, shot
        shots[name] = shot
    if os.environ.get("JOBSERVER_UPDATE_SCREENSHOT"):
        shutil.copyfile(shots["status-page.png"], REPO_ROOT / "docs" / "status-page.png")
