"""A TCP forwarder in a process of its own, to cut the network between a jobserver and
PostgreSQL the way a pulled cable does.

    python -m tests.tcp_proxy --target-port 5432 [--listen-port 0]   # prints its port

Every connection accepted on 127.0.0.1:<listen port> is joined to a new connection to the
target, bytes copied both ways; a half-close (FIN) is passed on as a half-close, a reset or a
failed send ends both sides. SIGSTOP freezes it: the kernel still completes handshakes and
buffers a little data, but nothing flows either way and no side learns why, as on a cut
cable; SIGCONT lets everything through again. SIGTERM ends it, and the kernel closes every
socket it held (both sides see their connections end).

`TcpProxy.start(target_port)` runs it from a test or the benchmark and stops it by PID.

One thread per direction of each connection: blocking sockets make back-pressure and
half-closes plain (a full peer blocks sendall, EOF is recv's b""), and a test opens tens of
connections, not thousands.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
CHUNK_SIZE = 65536  # bytes per recv: one socket buffer's worth
BACKLOG = 128  # pending connections; a test's pools open tens at once
CONNECT_TIMEOUT = 5.0  # seconds to reach the target; it is local, so only a dead one is slow
ACCEPT_RETRY_DELAY = 0.05  # seconds to wait when out of file descriptors, before accepting again

START_TIMEOUT = 10.0  # seconds for the proxy process to print its port
STOP_TIMEOUT = 5.0  # seconds after SIGTERM before SIGKILL
SIGNAL_TIMEOUT = 5.0  # seconds for SIGSTOP/SIGCONT to show in the process's state
POLL_INTERVAL = 0.01  # seconds between looks at the process's state

ACCEPT_ERRORS_TO_RIDE_OUT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
"""accept() failures that pass once connections close; any other error ends the proxy."""


class Link:
    """One client connection joined to its own connection to the target."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self._lock = threading.Lock()
        self._directions_running = 2

    def pump(self, source: socket.socket, destination: socket.socket) -> None:
        """Copy source to destination until EOF, then half-close destination."""
        try:
            while chunk := source.recv(CHUNK_SIZE):
                destination.sendall(chunk)
            destination.shutdown(socket.SHUT_WR)
        except OSError:
            # A reset or a failed send: end both directions. shutdown, not close, wakes the
            # other pump's recv without freeing a descriptor it is still using.
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        finally:
            with self._lock:
                self._directions_running -= 1
                last = self._directions_running == 0
            if last:
                for sock in self.sockets:
                    sock.close()


def serve(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT)
    except OSError:
        client.close()  # the client sees the connection end, as if the target refused it
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    link = Link(client, upstream)
    threading.Thread(target=link.pump, args=(upstream, client), daemon=True).start()
    link.pump(client, upstream)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-host", default=HOST)
    parser.add_argument("--listen-port", type=int, default=0, help="0: a free port")
    parser.add_argument("--target-host", default=HOST)
    parser.add_argument("--target-port", type=int, required=True)
    args = parser.parse_args(argv)
    # Whoever started us may have ignored SIGTERM; stopping us must still work.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    listener = socket.create_server((args.listen_host, args.listen_port), backlog=BACKLOG)
    print(listener.getsockname()[1], flush=True)
    target = (args.target_host, args.target_port)
    while True:
        try:
            client, _ = listener.accept()
        except OSError as error:
            if error.errno not in ACCEPT_ERRORS_TO_RIDE_OUT:
                raise
            time.sleep(ACCEPT_RETRY_DELAY)
            continue
        threading.Thread(target=serve, args=(client, target), daemon=True).start()


def process_state(pid: int) -> str:
    """The one-letter state in /proc/<pid>/stat ("T" when stopped); "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


class TcpProxyError(RuntimeError):
    """The proxy process did not start, or did not react to a signal in time."""


class TcpProxy:
    """A running tcp_proxy process forwarding 127.0.0.1:`port` to the target."""

    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process = process
        self.port = port

    @classmethod
    def start(cls, target_port: int, *, target_host: str = HOST) -> TcpProxy:
        """Run the proxy to target_host:target_port on a free port; returns once it listens."""
        argv = [
            sys.executable,
            "-I",  # only the standard library: nothing in tests/ or the environment may shadow it
            str(Path(__file__).resolve()),
            "--target-host",
            target_host,
            "--target-port",
            str(target_port),
        ]
        # stderr is ours: a traceback of the proxy shows in the test's captured output.
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        line = process.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            cls(process, 0).stop()
            raise TcpProxyError(
                f"tcp_proxy printed no port within {START_TIMEOUT}s ({line!r}); argv={argv}"
            )
        return cls(process, int(line))

    @property
    def pid(self) -> int:
        return self.process.pid

    def __repr__(self) -> str:
        return f"<TcpProxy pid={self.pid} at {HOST}:{self.port}>"

    def freeze(self) -> None:
        """Stop all traffic both ways (SIGSTOP); connections hang like a cut cable."""
        self.process.send_signal(signal.SIGSTOP)
        self._wait_state(lambda state: state in ("T", ""), "stopped")

    def thaw(self) -> None:
        """Let traffic flow again (SIGCONT): what was sent meanwhile is delivered."""
        self.process.send_signal(signal.SIGCONT)
        self._wait_state(lambda state: state != "T", "running again")

    def _wait_state(self, reached, what: str) -> None:
        deadline = time.monotonic() + SIGNAL_TIMEOUT
        while not reached(process_state(self.pid)):
            if time.monotonic() >= deadline:
                raise TcpProxyError(f"{self!r} was not {what} within {SIGNAL_TIMEOUT}s")
            time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        """End the proxy by its PID (frozen or not) and every connection through it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
                # A stopped process acts on SIGTERM only once continued.
                self.process.send_signal(signal.SIGCONT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
