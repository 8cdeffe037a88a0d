"""The status page (GET /) in a real browser: Debian's chromium, headless, loads the page from a
jobserver under a known load, lets its script fetch /api/status, and dumps the DOM it drew and a
screenshot. The DOM must hold the function rows with the load's numbers (queues, recent
throughput, the totals' cards), the worker, the running job and the dead job, and show a
function name made of HTML as text. Behind a proxy of the test's that changes the load between
two of the page's fetches, the page must show the change without being loaded again. On a
phone's viewport (set over the DevTools protocol) it must not scroll sideways.

Chromium is required, not optional (scripts/test installs it): a missing one fails the test
with the command to run. Set JOBSERVER_UPDATE_SCREENSHOT=1 to copy the screenshot to
docs/status-page.png.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    Server,
    free_port,
    wait_until,
)

CHROMIUM = "/usr/bin/chromium"
BROWSER_TIMEOUT = 90.0  # seconds for one chromium run, start to exit
STOP_WAIT = 10.0  # seconds for chromium to exit once its DevTools pipe closes
VIRTUAL_TIME_BUDGET_MS = 5000  # page time chromium lets pass (timers, fetches) before dumping
REFRESH_BUDGET_MS = 7000
"""Page time for the refresh test: the page fetches /api/status at once and then every 2 s
(status.js REFRESH_MS), so about four fetches: the load changes before the second, and at
least one more follows, whatever chromium's rounding of its timers."""
PHONE_WIDTH, PHONE_HEIGHT = 390, 844  # CSS pixels: an iPhone 12 to 15 held upright
PHONE_SCALE = 3  # device pixels per CSS pixel on those phones
LONG_NAME = "thumbnails.render-" + "x" * 120  # one word, far wider than a phone
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


def headless_flags(profile: Path) -> list[str]:
    """Chromium's options for a test: headless, quiet, its own profile."""
    return [
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
    ]


def run_chromium(profile: Path, *args: str, budget_ms: int = VIRTUAL_TIME_BUDGET_MS) -> str:
    """Run headless chromium to completion (bounded) and return its stdout. It runs in a
    session of its own, so that on a timeout its helper processes go with it, by its id.
    `budget_ms` is the page time it lets pass (virtual: it stands still while a fetch is
    pending, so a slow server costs real time, never a refresh)."""
    argv = [
        chromium(),
        *headless_flags(profile),
        f"--virtual-time-budget={budget_ms}",
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
        self.spans: dict[str, str] = {}  # the text of each <span id=...> (the totals' cards)
        self.elements: list[str] = []
        self._span: str | None = None
        self._table = ""
        self._row: dict[str, str] | None = None
        self._field: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append(tag)
        if tag == "span" and attributes.get("id"):
            self._span = attributes["id"]
            self.spans[self._span] = ""
        elif tag == "table":
            self._table = attributes.get("id") or ""
        elif tag == "tr" and self._table:
            self._row = {}
            if "data-function" in attributes:
                self._row["data-function"] = attributes["data-function"] or ""
        elif tag == "td" and self._row is not None:
            self._field = attributes.get("data-field") or ""
            self._row[self._field] = ""

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        elif tag == "td":
            self._field = None
        elif tag == "tr" and self._row:
            self.tables.setdefault(self._table, []).append(self._row)
            self._row = None
        elif tag == "table":
            self._table = ""

    def handle_data(self, data):
        if self._span is not None:
            self.spans[self._span] += data
        if self._row is not None and self._field is not None:
            self._row[self._field] += data


def status(http_port: int) -> dict:
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
    yield Loaded(server, http_port, running.decode())
    for conn in (client, worker, failing):
        conn.close()


class PageProxy:
    """An HTTP proxy on 127.0.0.1 in front of a jobserver's --http side, in threads of this
    test: it counts the requests by path, keeps each /api/status answer, runs `before(path,
    n)` before forwarding the n-th request for a path: the load changes at a known point of
    the page's life, whatever the browser's timing."""

    HOP_HEADERS = {"connection", "content-length", "date", "server", "transfer-encoding"}

    def __init__(
        self,
        upstream_port: int,
        before: Callable[[str, int], None] | None = None,
    ) -> None:
        self.requests: Counter[str] = Counter()
        self.status_bodies: list[dict] = []
        proxy = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the page uses it

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with lock:
                    proxy.requests[path] += 1
                    count = proxy.requests[path]
                if before is not None:
                    before(path, count)
                upstream = http.client.HTTPConnection(HOST, upstream_port, timeout=IO_TIMEOUT)
                try:
                    upstream.request("GET", self.path)
                    response = upstream.getresponse()
                    body = response.read()
                    headers = response.getheaders()
                finally:
                    upstream.close()
                if path == "/api/status" and response.status == 200:
                    with lock:
                        proxy.status_bodies.append(json.loads(body))
                self.answer(response.status, headers, body)

            def answer(self, code: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(code)
                for name, value in headers:
                    if name.lower() not in PageProxy.HOP_HEADERS:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass  # the counts are the log

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @classmethod
    @contextlib.contextmanager
    def running(cls, *args, **kwargs) -> Iterator[PageProxy]:
        proxy = cls(*args, **kwargs)
        proxy.thread.start()
        try:
            yield proxy
        finally:
            proxy.server.shutdown()
            proxy.server.server_close()
            proxy.thread.join(IO_TIMEOUT)


@dataclass
class Loaded:
    server: Server
    http_port: int
    running_handle: str  # of the resize job left running

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}/"


def test_the_page_shows_functions_workers_running_and_dead_jobs(loaded_server, tmp_path):
    dom = run_chromium(tmp_path / "profile", "--dump-dom", loaded_server.url)

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
    # Recent throughput: every count is from the server's first minute (its first sample is
    # taken as it starts, before the fixture's jobs), so it is shown as is, per minute so far.
    rates = {name: (row["completed-rate"], row["failed-rate"]) for name, row in functions.items()}
    assert rates == {
        "resize": ("2", "0"),
        "email": ("0", "0"),
        "mail": ("0", "1"),
        HTML_NAME: ("0", "0"),
    }
    totals = {name: text for name, text in page.spans.items() if name.startswith("total-")}
    assert totals == {
        "total-queued": "10",  # resize 6, email 3, the HTML name 1
        "total-running": "1",
        "total-workers": "1",
        "total-completed-rate": "2",
        "total-failed-rate": "1",
        "total-dead": "1",
    }

    [worker] = page.tables["workers"]
    assert worker["client-id"] == "thumbnailer-1" and worker["functions"] == "resize"
    assert worker["running"] == "1" and worker["address"] == "127.0.0.1"
    [running] = page.tables["running"]
    assert running["handle"] == loaded_server.running_handle and running["function"] == "resize"
    assert running["unique"] in {f"img-{n}" for n in range(9)}
    [dead] = page.tables["dead"]
    assert dead["function"] == "mail" and dead["unique"] == "to-alice"
    assert dead["attempts"] == "1" and dead["error"] == "failed"
    assert 'data-state="live"' in dom


def test_the_page_refreshes_itself_without_reloading(loaded_server, tmp_path):
    fresh = "fresh-function"
    queued = threading.Event()

    def queue_before_the_second_fetch(path: str, count: int) -> None:
        # Runs in the proxy's thread while the page waits for its second /api/status: the
        # load changes after the page drew the first one, and the server's snapshot (cached
        # up to SNAPSHOT_MAX_AGE) shows it before the page is answered.
        if (path, count) != ("/api/status", 2):
            return
        with loaded_server.server.connect() as client:
            for number in range(5):
                client.request(
                    SUBMIT_JOB_BG, fresh.encode(), b"f-%d" % number, b"", expect=JOB_CREATED
                )

        def shown() -> bool:
            functions = status(loaded_server.http_port)["functions"]
            return any(fn["name"] == fresh and fn["queued"]["normal"] == 5 for fn in functions)

        wait_until(shown, timeout=IO_TIMEOUT, interval=0.1, what="the new function's jobs")
        queued.set()

    with PageProxy.running(loaded_server.http_port, before=queue_before_the_second_fetch) as proxy:
        dom = run_chromium(
            tmp_path / "profile", "--dump-dom", proxy.url, budget_ms=REFRESH_BUDGET_MS
        )

    assert queued.is_set(), f"the load did not change before a second fetch: {proxy.requests}"
    assert proxy.requests["/"] == 1, proxy.requests  # never reloaded
    assert proxy.requests["/api/status"] >= 2, proxy.requests  # the first, one after the change
    first, last = proxy.status_bodies[0], proxy.status_bodies[-1]
    assert fresh not in {fn["name"] for fn in first["functions"]}
    assert fresh in {fn["name"] for fn in last["functions"]}
    page = Rows()
    page.feed(dom)
    functions = {row["data-function"]: row for row in page.tables.get("functions", [])}
    assert set(functions) == {"resize", "email", "mail", HTML_NAME, fresh}, dom[-3000:]
    assert functions[fresh]["queued-normal"] == "5" and functions[fresh]["workers"] == "0"
    assert page.spans["total-queued"] == "15"  # the fixture's 10 and the new 5
    assert 'data-state="live"' in dom


def test_on_a_phone_the_page_fits_the_screen_without_scrolling_sideways(loaded_server, tmp_path):
    # The widest things the page draws: a function name of one long word, in the functions
    # table and in the worker's list of functions, and a long client id.
    with loaded_server.server.connect() as client, loaded_server.server.connect() as worker:
        client.request(SUBMIT_JOB_BG, LONG_NAME.encode(), b"", b"", expect=JOB_CREATED)
        worker.send(SET_CLIENT_ID, b"a-worker-with-a-long-client-id-" + b"y" * 60)
        worker.send(CAN_DO, LONG_NAME.encode())

        def shown() -> bool:
            current = status(loaded_server.http_port)
            return any(fn["name"] == LONG_NAME and fn["workers"] for fn in current["functions"])

        wait_until(shown, timeout=IO_TIMEOUT, interval=0.1, what="the long name in /api/status")
        with DevTools.start(tmp_path / "profile") as browser:
            # What DevTools' device toolbar does: a phone's viewport, scale and touch, the
            # page's <meta name="viewport"> honoured. (--window-size cannot do it: headless
            # chromium lays a window out at least 500 px wide.)
            browser.send(
                "Emulation.setDeviceMetricsOverride",
                width=PHONE_WIDTH,
                height=PHONE_HEIGHT,
                deviceScaleFactor=PHONE_SCALE,
                mobile=True,
            )
            browser.send("Page.navigate", url=loaded_server.url)

            def drawn() -> dict | None:
                # The page's own state once its first /api/status is drawn, all rows in.
                found = browser.evaluate(PAGE_WIDTHS)
                return found if found and found["state"] == "live" and found["rows"] == 5 else None

            page = wait_until(drawn, timeout=BROWSER_TIMEOUT, interval=0.2, what="the page drawn")

    assert page["innerWidth"] == PHONE_WIDTH, page
    assert page["phoneLayout"], page  # the phone layout (rows as cards) is the one in use
    assert page["scrollWidth"] <= PHONE_WIDTH, page


PIPE_WIRING = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.dup2(int(sys.argv[2]), 4)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)
"""Puts the DevTools pipes' ends on fds 3 and 4, where --remote-debugging-pipe wants them,
then becomes chromium (the same pid, so its session is chromium's)."""


def _fd_above(fd: int, lowest: int) -> int:
    """`fd` moved to a number above `lowest` (close-on-exec; pass_fds lifts that)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest + 1)
    os.close(fd)
    return moved


PAGE_WIDTHS = """({
    state: document.getElementById("live")?.dataset.state,
    rows: document.querySelectorAll("#functions tbody tr").length,
    innerWidth: window.innerWidth,
    scrollWidth: Math.max(document.documentElement.scrollWidth, document.body.scrollWidth),
    phoneLayout: getComputedStyle(document.querySelector("thead")).display === "none",
})"""
"""What the phone test reads from the page: whether it has drawn the load, the viewport's
width, the laid-out page's (wider when something sticks out to the right), and whether the
phone layout's media query applies."""


class DevTools:
    """Headless chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    it reads commands from its fd 3 and writes replies and events to its fd 4, each message
    JSON ended by a NUL byte), attached to one page. No library: the test needs a few
    commands. Every wait is bounded by BROWSER_TIMEOUT."""

    def __init__(self, proc: subprocess.Popen, commands: int, replies: int) -> None:
        self.proc = proc
        self.commands = commands  # our end of chromium's fd 3
        self.replies = replies  # our end of chromium's fd 4
        self.buffer = b""
        self.next_id = 0
        self.session: str | None = None

    @classmethod
    @contextlib.contextmanager
    def start(cls, profile: Path) -> Iterator[DevTools]:
        to_chromium, commands = os.pipe()
        replies, from_chromium = os.pipe()
        # Chromium's ends above 4, so that putting them on 3 and 4 overwrites neither.
        to_chromium, from_chromium = (_fd_above(fd, 4) for fd in (to_chromium, from_chromium))
        argv = [
            chromium(),
            *headless_flags(profile),
            "--remote-debugging-pipe",
            "about:blank",
        ]
        proc = subprocess.Popen(
            [sys.executable, "-c", PIPE_WIRING, str(to_chromium), str(from_chromium), *argv],
            pass_fds=(to_chromium, from_chromium),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_chromium)
        os.close(from_chromium)
        browser = cls(proc, commands, replies)
        try:
            target = browser.send("Target.createTarget", url="about:blank")["targetId"]
            attached = browser.send("Target.attachToTarget", targetId=target, flatten=True)
            browser.session = attached["sessionId"]
            yield browser
        finally:
            os.close(commands)  # chromium exits when its commands pipe closes
            os.close(replies)
            try:
                proc.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its session: chromium and helpers
                proc.wait()

    def send(self, method: str, **params) -> dict:
        """Run one command (on the page once attached) and return its result."""
        self.next_id += 1
        message: dict = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:  # events and other replies are not ours
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.replies], [], [], max(left, 0))
            if not ready:
                pytest.fail(f"chromium did not answer within {BROWSER_TIMEOUT} s")
            data = os.read(self.replies, 1 << 20)
            assert data, f"chromium closed its DevTools pipe (exit status {self.proc.poll()})"
            self.buffer += data
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


def test_the_page_renders_to_a_screenshot_on_a_desktop_and_a_phone(loaded_server, tmp_path):
    url = loaded_server.url
    shots = {}
    for name, size in (("status-page.png", "1280,900"), ("status-page-phone.png", "390,1200")):
        shot = tmp_path / name
        run_chromium(tmp_path / "profile", f"--window-size={size}", f"--screenshot={shot}", url)
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, shot
        shots[name] = shot
    if os.environ.get("JOBSERVER_UPDATE_SCREENSHOT"):
        shutil.copyfile(shots["status-page.png"], REPO_ROOT / "docs" / "status-page.png")
