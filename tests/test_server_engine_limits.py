"""The hardening issue's attacks, against a real server process: a worker with 20,000
functions pipelining GRAB_JOBs, 100,000 function names that come and go, CAN_DO_TIMEOUT
values real libraries send, and names that try to forge admin output.

Nothing here is timed: the worst ECHO latency seen by a bystander and the server's RSS are
printed (`pytest -s`) for the record, and the assertions are about behaviour only.
"""

from __future__ import annotations

import threading
import time

import pytest
import wire
from servers import status, wait_until
from wire import Wire

from jobserver.protocol import PacketType as T
from jobserver.protocol import encode, encode_request

connect = wire.connect  # fixture: connect(server) -> Wire, closed at teardown

WIDE_FUNCTIONS = 20_000
PIPELINED_GRABS = 5_000
MANY_NAMES = 100_000
PING_INTERVAL = 0.003
"""Seconds between the bystander's ECHOs."""

SLOW = 60.0
"""Seconds any single bulk reply may take on a slow machine (the old code took 16 s)."""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status_file:
        for line in status_file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def read_until_echo(peer: Wire, marker: bytes) -> bytes:
    """Everything the server sends up to and including the ECHO_RES of `marker` (sent last)."""
    end = encode(T.ECHO_RES, marker)

    def complete(data: bytes) -> int:
        at = data.find(end)
        return at + len(end) if at >= 0 else 0

    return peer.read_text(complete, timeout=SLOW)


class Bystander:
    """Another connection sending ECHO_REQ every few ms; records each round trip."""

    def __init__(self, server, max_pings: int = 100_000) -> None:
        self.wire = Wire.to(server, timeout=SLOW)
        self.latencies: list[float] = []
        self.max_pings = max_pings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            for n in range(self.max_pings):
                if self._stop.is_set():
                    return
                started = time.monotonic()
                self.wire.echo(b"ping-%d" % n)
                self.latencies.append(time.monotonic() - started)
                time.sleep(PING_INTERVAL)
        except BaseException as error:  # reported by stop()
            self.error = error

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=SLOW)
        self.wire.close()

    def check(self) -> float:
        """Every echo was answered; returns the worst latency in ms."""
        assert self.error is None, f"bystander ECHO failed: {self.error!r}"
        assert self.latencies, "the bystander never got an echo"
        return max(self.latencies) * 1000


def register_many(worker: Wire, count: int, prefix: bytes) -> None:
    worker.send_raw(
        b"".join(encode_request(T.CAN_DO, b"%s-%d" % (prefix, i)) for i in range(count))
    )
    worker.sock.settimeout(SLOW)
    worker.echo(b"registered")


def test_wide_worker_pipelining_grabs_does_not_stall_other_clients(start_jobserver, connect):
    server = start_jobserver("--store", "memory")
    worker = connect(server, timeout=SLOW)
    register_many(worker, WIDE_FUNCTIONS, b"wide")
    with Bystander(server) as bystander:
        time.sleep(0.05)
        started = time.monotonic()
        worker.send_raw(encode_request(T.GRAB_JOB) * PIPELINED_GRABS)
        for _ in range(PIPELINED_GRABS):
            worker.expect(T.NO_JOB, timeout=SLOW)
        elapsed = time.monotonic() - started
        time.sleep(0.05)
    worst = bystander.check()
    print(
        f"\n{WIDE_FUNCTIONS} functions, {PIPELINED_GRABS} pipelined GRAB_JOB: all NO_JOB in "
        f"{elapsed:.3f} s; worst bystander ECHO {worst:.1f} ms over {len(bystander.latencies)}"
    )


def test_wide_worker_with_a_job_in_every_function_gets_them_oldest_first(start_jobserver, connect):
    server = start_jobserver("--store", "memory")
    worker = connect(server, timeout=SLOW)
    client = connect(server, timeout=SLOW)
    register_many(worker, WIDE_FUNCTIONS, b"busy")
    # One job per function, submitted from the last function to the first.
    client.send_raw(
        b"".join(
            encode_request(T.SUBMIT_JOB_BG, b"busy-%d" % i, b"", b"%d" % i)
            for i in reversed(range(WIDE_FUNCTIONS))
        )
    )
    handles = [client.expect(T.JOB_CREATED, timeout=SLOW)[0] for _ in range(WIDE_FUNCTIONS)]
    with Bystander(server) as bystander:
        started = time.monotonic()
        worker.send_raw(encode_request(T.GRAB_JOB) * PIPELINED_GRABS)
        assigned = [worker.expect(T.JOB_ASSIGN, timeout=SLOW)[0] for _ in range(PIPELINED_GRABS)]
        elapsed = time.monotonic() - started
    worst = bystander.check()
    assert assigned == handles[:PIPELINED_GRABS]  # oldest first across all 20,000 functions
    print(
        f"\n{WIDE_FUNCTIONS} functions with a job each, {PIPELINED_GRABS} pipelined GRAB_JOB: "
        f"{elapsed:.3f} s; worst bystander ECHO {worst:.1f} ms"
    )


def test_wide_worker_pipelining_pre_sleep_and_grab_does_not_stall_other_clients(
    start_jobserver, connect
):
    server = start_jobserver("--store", "memory")
    worker = connect(server, timeout=SLOW)
    register_many(worker, WIDE_FUNCTIONS, b"sleepy")
    with Bystander(server) as bystander:
        time.sleep(0.05)
        worker.send_raw(
            (encode_request(T.PRE_SLEEP) + encode_request(T.GRAB_JOB)) * PIPELINED_GRABS
        )
        for _ in range(PIPELINED_GRABS):
            worker.expect(T.NO_JOB, timeout=SLOW)  # PRE_SLEEP with nothing to do: no reply
        time.sleep(0.05)
    worst = bystander.check()
    print(
        f"\n{PIPELINED_GRABS} x (PRE_SLEEP, GRAB_JOB), {WIDE_FUNCTIONS} functions: "
        f"worst bystander ECHO {worst:.1f} ms"
    )


def test_many_function_names_are_forgotten_once_released(start_jobserver, connect):
    server = start_jobserver("--store", "memory")
    console = connect(server, timeout=SLOW)
    baseline = rss_mib(server.pid)
    worker = connect(server, timeout=SLOW)
    register_many(worker, MANY_NAMES, b"registered")
    client = connect(server, timeout=SLOW)
    client.send_raw(
        b"".join(
            encode_request(T.SUBMIT_JOB, b"submitted-%d" % i, b"", b"") for i in range(MANY_NAMES)
        )
        + encode_request(T.ECHO_REQ, b"submitted")
    )
    read_until_echo(client, b"submitted")
    listed = console.admin("status", timeout=SLOW).count(b"\n") - 1
    assert listed == 2 * MANY_NAMES
    peak = rss_mib(server.pid)
    worker.close()
    client.close()  # its foreground jobs are abandoned, their functions with them
    wait_until(
        lambda: console.admin("status", timeout=SLOW) == b".\n",
        timeout=SLOW,
        what="status to empty",
    )
    print(
        f"\nRSS: {baseline:.1f} MiB at start, {peak:.1f} MiB with {2 * MANY_NAMES} functions, "
        f"{rss_mib(server.pid):.1f} MiB once all were released (freed memory is reused, not "
        "always returned to the OS)"
    )


# ------------------------------------------------------------------ CAN_DO_TIMEOUT interop

LIBRARY_TIMEOUTS = {
    "node-gearman-binary": b"\x00\x00\x75\x30",  # node `gearman` 2.1.0: a 4-byte integer
    "abraxas-perl-decimal": b"2.5",  # abraxas and Perl Gearman::Worker: seconds as a decimal
    "trailing-space": b"30000 ",
    "empty": b"",
}


@pytest.mark.interop
@pytest.mark.parametrize("timeout", LIBRARY_TIMEOUTS.values(), ids=LIBRARY_TIMEOUTS.keys())
def test_can_do_timeout_as_libraries_send_it_registers_silently(any_server, connect, timeout):
    """The exact bytes those libraries send (replayed raw; the libraries themselves are not
    run here). gearmand registers the function and never replies; so must we."""
    worker, client = connect(any_server), connect(any_server)
    worker.send(T.CAN_DO_TIMEOUT, b"timed", timeout)
    worker.echo(b"after")  # the next packet is the echo: no ERROR came first
    handle = client.submit(b"timed", b"job", packet_type=T.SUBMIT_JOB_BG)
    worker.send(T.GRAB_JOB)
    worker.expect(T.JOB_ASSIGN, handle, b"timed", b"job")
    worker.send(T.WORK_COMPLETE, handle, b"")
    worker.echo(b"done")
    assert status(any_server.address)["timed"] == (0, 0, 1)


# ------------------------------------------------------------------ admin forgery

FORGED_FUNCTION = b"x\t0\t0\t0\nfake"


def test_names_cannot_add_lines_to_admin_listings(start_jobserver, connect):
    server = start_jobserver("--store", "memory")
    worker, client, console = connect(server), connect(server), connect(server)
    worker.send(T.SET_CLIENT_ID, b"id\n1 6.6.6.6 evil : forged")
    worker.can_do(FORGED_FUNCTION)
    client.submit(FORGED_FUNCTION, b"", b"u\nfake-unique", T.SUBMIT_JOB_BG)
    assert console.admin("status") == b"x\\x090\\x090\\x090\\x0afake\t1\t0\t1\n.\n"
    assert console.admin("show unique jobs") == b"u\\x0afake-unique\n.\n"
    workers = console.admin("workers").split(b"\n")
    forged_line = [line for line in workers if b"evil" in line]
    assert len(forged_line) == 1
    assert forged_line[0].endswith(
        b" id\\x0a1 6.6.6.6 evil : forged : x\\x090\\x090\\x090\\x0afake"
    )
    assert not any(line.startswith(b"fake") or line.startswith(b"1 6.6.6.6") for line in workers)
