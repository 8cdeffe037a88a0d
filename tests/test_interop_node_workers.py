"""Real node worker libraries that register with CAN_DO_TIMEOUT get their jobs.

The hardening issue was found with two npm libraries, run here as real worker processes
(tests/node/worker_*.js, versions pinned by tests/node/package-lock.json, installed by the
`node_packages` fixture):

- node `gearman` 2.1.0 `addFunction(name, 30000)` sends the timeout as a 4-byte big-endian
  integer (b"\\0\\0u0"): no leading digits, so gearmand reads no timeout.
- abraxas 2.1.10 `registerWorker(name, {timeout: 2.5}, ...)` sends String(timeout), b"2.5"
  (its README says seconds): gearmand reads 2 ms, raised to 1 s.

Before the fix jobserver answered both with ERROR and did not register the function, so the
worker waited forever for jobs that queued up unseen. gearmand registers both silently; so
must we. The jobs are submitted in the foreground with raw packets (tests/wire.py) and must
come back with the node worker's result.

Shutdown: abraxas reconnects when the server closes the connection with FIN (it never does
after a reset); it must come back to a restarted server on the same port and take a new job.
node `gearman` has no reconnect logic at all; it must see a clean close (no ECONNRESET).
"""

from __future__ import annotations

import queue
import subprocess
import threading

import pytest
from conftest import NODE_DIR
from servers import status, stop_process
from wire import Wire

from jobserver.protocol import PacketType as T

pytestmark = pytest.mark.interop

LIBRARIES = {
    # library: (script in tests/node, the timeout the script passes to the library)
    "gearman": ("worker_gearman.js", "30000"),  # sent as b"\x00\x00\x75\x30"
    "abraxas": ("worker_abraxas.js", "2.5"),  # sent as b"2.5"
}

READY_TIMEOUT = 20.0
"""Seconds for a node worker to start, connect, register and have its ECHO answered."""

JOB_TIMEOUT = 15.0
"""Seconds for a submitted job to come back with the worker's result."""

RECONNECT_TIMEOUT = 40.0
"""Seconds for abraxas to notice the restarted server (its back-off reaches 10 s between
attempts) and register again."""


class NodeWorker:
    """One node worker process; its stdout lines (see tests/node/worker_*.js) are collected
    by a thread so the test can wait for one with a deadline."""

    def __init__(self, library: str, server, function: str) -> None:
        script, timeout = LIBRARIES[library]
        self.library = library
        self.argv = ["node", str(NODE_DIR / script), server.host, str(server.port)]
        self.argv += [function, timeout]
        self.proc = subprocess.Popen(
            self.argv,
            cwd=NODE_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def wait_for(self, line: str, timeout: float = READY_TIMEOUT) -> None:
        """Consume output lines until `line`; fail with everything seen after `timeout`."""
        while True:
            try:
                got = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"{self.library} worker: no {line!r} within {timeout}s; output: {self.seen}"
                ) from None
            if got is None:
                self._lines.put(None)
                raise AssertionError(
                    f"{self.library} worker exited ({self.proc.wait(5)}) before {line!r}; "
                    f"output: {self.seen}"
                )
            self.seen.append(got)
            if got == line:
                return

    def errors(self) -> list[str]:
        return [line for line in self.seen if line.lower().startswith("error")]

    def stop(self) -> None:
        stop_process(self.proc)
        self._reader.join(5)


@pytest.fixture
def node_worker(node_packages):
    """`node_worker(library, server, function)` starts a worker; all are stopped by PID."""
    started: list[NodeWorker] = []

    def start(library: str, server, function: str) -> NodeWorker:
        worker = NodeWorker(library, server, function)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def run_job(server, worker: NodeWorker, function: str, payload: bytes) -> bytes:
    """Submit a foreground job and return its WORK_COMPLETE data."""
    with Wire.to(server, timeout=JOB_TIMEOUT) as client:
        handle = client.submit(function.encode(), payload)
        try:
            packet = client.read_packet()
        except TimeoutError:
            raise AssertionError(
                f"{server.name}: the {worker.library} worker did not run job {payload!r} "
                f"within {JOB_TIMEOUT}s; status {status(server.address)}; "
                f"worker output {worker.seen}"
            ) from None
    assert packet.type == T.WORK_COMPLETE, f"{T(packet.type).name} {packet.args!r}"
    assert packet.args[0] == handle
    return packet.args[1]


def expected(library: str, payload: bytes) -> bytes:
    return f"{library}:".encode() + payload.upper()


@pytest.mark.parametrize("library", LIBRARIES)
def test_node_worker_registered_with_a_timeout_gets_its_jobs(any_server, node_worker, library):
    function = f"upper_{library}"
    worker = node_worker(library, any_server, function)
    worker.wait_for("ready" if library == "gearman" else "ready 1")
    for payload in (b"one", b"two", b"three"):
        assert run_job(any_server, worker, function, payload) == expected(library, payload)
    assert status(any_server.address)[function] == (0, 0, 1)
    assert not worker.errors()
    assert not any(line.startswith("ERROR") for line in worker.seen), worker.seen


@pytest.mark.parametrize("server_name", ["jobserver", "gearmand"])
def test_abraxas_worker_reconnects_after_sigterm_and_takes_a_new_job(
    request, node_worker, server_name
):
    start = request.getfixturevalue(f"start_{server_name}")
    server = start()
    worker = node_worker("abraxas", server, "upper_abraxas")
    worker.wait_for("ready 1")
    assert run_job(server, worker, "upper_abraxas", b"before") == b"abraxas:BEFORE"

    assert server.stop() == 0
    worker.wait_for("disconnect")
    restarted = start(port=server.port)
    worker.wait_for("ready 2", timeout=RECONNECT_TIMEOUT)
    assert run_job(restarted, worker, "upper_abraxas", b"after") == b"abraxas:AFTER"
    assert not worker.errors(), worker.seen  # a reset would show as "error ... ECONNRESET"


@pytest.mark.parametrize("server_name", ["jobserver", "gearmand"])
def test_node_gearman_worker_sees_a_clean_close_at_sigterm(request, node_worker, server_name):
    """node `gearman` never reconnects (it only emits 'close'), so there is nothing to come
    back to; what it can show is how the connection ended: FIN, not ECONNRESET."""
    server = request.getfixturevalue(f"start_{server_name}")()
    worker = node_worker("gearman", server, "upper_gearman")
    worker.wait_for("ready")
    assert run_job(server, worker, "upper_gearman", b"job") == b"gearman:JOB"

    assert server.stop() == 0
    worker.wait_for("close false")
    assert worker.proc.wait(JOB_TIMEOUT) == 0
    assert not worker.errors(), worker.seen
