"""Crash test (issue 4): acknowledged background jobs survive SIGKILL of a real server.

A `jobserver` process with the default sqlite store (its data directory in tmp_path) takes
20,000 background submits, pipelined from several connections at once, each with a distinct
unique id and a payload that carries its id and a checksum. Every JOB_CREATED is matched FIFO
to the submit it answers. Midway (after KILL_AFTER acknowledgements in all) the server is
SIGKILLed by its pid, restarted on the same port and data directory, and a raw-socket worker
drains it. What must hold:

- every job that got JOB_CREATED runs at least once after the restart: none is lost;
- every payload that runs is intact (its checksum matches, it belongs to its unique id);
- jobs that never got JOB_CREATED may or may not run, and nothing runs that was never submitted.

The figures (acknowledged, ran, ran but unacknowledged, duplicates) are printed (`pytest -s`)
and written to tmp_path/crash-figures.json.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter

import pytest
from servers import pack_request
from test_store_support import Packets, ServerSet, drain, split_args, status

from jobserver.protocol import PacketType as T

JOBS = 20_000
CONNECTIONS = 4
KILL_AFTER = 8_000
"""Acknowledgements received (over all connections) at which the server is killed."""

WINDOW = 400
"""Submits a connection may have unanswered at once: pipelined, yet still submitting when the
kill comes (without a window, all 20,000 would be written to the socket long before it)."""

CHUNK = 50
"""Submits written per sendall."""

FUNCTION = b"crash"
TIME_LIMIT = 60.0


def unique_for(job_id: int) -> bytes:
    return b"crash-%d" % job_id


def payload_for(job_id: int) -> bytes:
    """`<id>\\0<filler with NULs, 0..96 bytes>|<sha256 hex of everything before the |>`."""
    filler = bytes((job_id * 7 + i) % 256 for i in range(job_id % 97))
    body = b"%d\0" % job_id + filler
    return body + b"|" + hashlib.sha256(body).hexdigest().encode()


def check_payload(unique: bytes, payload: bytes) -> str | None:
    """None if the payload is intact and belongs to `unique`, else what is wrong."""
    body, bar, digest = payload.rpartition(b"|")
    if not bar or hashlib.sha256(body).hexdigest().encode() != digest:
        return f"checksum mismatch for {unique!r}: {payload[:40]!r}..."
    job_id = body.split(b"\0", 1)[0]
    if not job_id.isdigit() or unique_for(int(job_id)) != unique:
        return f"payload of job {job_id!r} ran under unique {unique!r}"
    if payload != payload_for(int(job_id)):
        return f"payload of {unique!r} differs from the one submitted"
    return None


class Submitter:
    """One connection: a sender thread writing pipelined SUBMIT_JOB_BG (at most WINDOW
    unanswered) and a reader thread matching each reply FIFO to its submit."""

    def __init__(self, port: int, job_ids: list[int], progress: Progress) -> None:
        self.conn = Packets(port)
        self.job_ids = job_ids
        self.progress = progress
        self.sent: list[bytes] = []  # uniques, in the order written
        self.acknowledged: dict[bytes, bytes] = {}  # unique -> handle
        self.errors: list[tuple[bytes, list[bytes]]] = []
        self.replies = 0
        self.unexpected: list[str] = []
        self._window = threading.Condition()
        self._closed = False
        self.threads = [
            threading.Thread(target=self._send_all, daemon=True),
            threading.Thread(target=self._read_all, daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a submitter thread did not finish"
        self.conn.close()

    def _send_all(self) -> None:
        try:
            for start in range(0, len(self.job_ids), CHUNK):
                ids = self.job_ids[start : start + CHUNK]
                with self._window:
                    while len(self.sent) - self.replies + len(ids) > WINDOW and not self._closed:
                        self._window.wait(1.0)
                    if self._closed:
                        return
                    self.sent.extend(unique_for(i) for i in ids)
                self.conn.send_raw(
                    b"".join(
                        pack_request(T.SUBMIT_JOB_BG, FUNCTION, unique_for(i), payload_for(i))
                        for i in ids
                    )
                )
        except OSError:
            return  # the server was killed under us

    def _read_all(self) -> None:
        while True:
            try:
                packet_type, payload = self.conn.recv(timeout=TIME_LIMIT)
            except (ConnectionError, OSError):
                break
            with self._window:
                unique = self.sent[self.replies]
                self.replies += 1
                self._window.notify()
            if packet_type == T.JOB_CREATED:
                self.acknowledged[unique] = payload
                self.progress.acknowledged_one()
            elif packet_type == T.ERROR:
                self.errors.append((unique, split_args(T.ERROR, payload)))
            else:
                self.unexpected.append(f"{packet_type} {payload[:40]!r}")
        with self._window:
            self._closed = True
            self._window.notify()


class Progress:
    def __init__(self, target: int) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self.reached = threading.Event()
        self.target = target

    def acknowledged_one(self) -> None:
        with self._lock:
            self.count += 1
            if self.count >= self.target:
                self.reached.set()


@pytest.fixture
def server_set():
    started = ServerSet()
    yield started
    started.stop_all()


def test_acknowledged_background_jobs_survive_sigkill(server_set, tmp_path):
    began = time.monotonic()
    data_dir = tmp_path / "data"
    server = server_set.start(data_dir=data_dir)

    progress = Progress(KILL_AFTER)
    submitters = [
        Submitter(server.port, list(range(c, JOBS, CONNECTIONS)), progress)
        for c in range(CONNECTIONS)
    ]
    for submitter in submitters:
        submitter.start()
    assert progress.reached.wait(TIME_LIMIT / 2), (
        f"only {progress.count} acknowledgements in {TIME_LIMIT / 2}s"
    )
    server_set.kill(server)
    killed_at = time.monotonic() - began
    for submitter in submitters:
        submitter.join(timeout=20)

    acknowledged: dict[bytes, bytes] = {}
    sent: set[bytes] = set()
    for submitter in submitters:
        assert not submitter.unexpected, submitter.unexpected[:5]
        assert not submitter.errors, submitter.errors[:5]  # the disk is fine: no QUEUE_ERROR
        acknowledged.update(submitter.acknowledged)
        sent.update(submitter.sent)
    # The kill came in the middle: some submits had no answer (else the test proves little).
    assert KILL_AFTER <= len(acknowledged) < JOBS, len(acknowledged)
    assert len(set(acknowledged.values())) == len(acknowledged), "a handle was given twice"

    restarted = server_set.restart(server, data_dir=data_dir)
    reloaded = status(restarted).get(FUNCTION.decode(), (0, 0, 0))[0]
    ran = drain(restarted, FUNCTION, limit=TIME_LIMIT)

    uniques = Counter(args[2] for args in ran)
    corrupt = [problem for args in ran if (problem := check_payload(args[2], args[3]))]
    lost = [u for u in acknowledged if u not in uniques]
    never_sent = [u for u in uniques if u not in sent]
    duplicates = sum(count - 1 for count in uniques.values())
    figures = {
        "jobs": JOBS,
        "connections": CONNECTIONS,
        "submits_written_before_kill": len(sent),
        "acknowledged": len(acknowledged),
        "reloaded_after_restart": reloaded,
        "ran": len(ran),
        "ran_distinct": len(uniques),
        "ran_but_unacknowledged": sum(1 for u in uniques if u not in acknowledged),
        "lost": len(lost),
        "duplicates": duplicates,
        "corrupt": len(corrupt),
        "killed_after_s": round(killed_at, 2),
        "total_s": round(time.monotonic() - began, 2),
    }
    (tmp_path / "crash-figures.json").write_text(json.dumps(figures, indent=2))
    print("\ncrash test figures:", json.dumps(figures))

    assert not corrupt, corrupt[:5]
    assert not never_sent, never_sent[:5]
    assert not lost, f"{len(lost)} acknowledged jobs lost, e.g. {lost[:5]}"
    assert reloaded == len(ran)  # status after the restart counted exactly what then ran
    assert duplicates == 0  # no worker ran anything before the kill: each record is one job
    assert status(restarted).get(FUNCTION.decode(), (0, 0, 0))[0] == 0
    assert time.monotonic() - began < TIME_LIMIT
