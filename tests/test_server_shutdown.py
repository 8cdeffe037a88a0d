"""SIGTERM closes every connection with FIN, never a reset, even while peers are sending.

A socket closed with unread input makes the kernel answer RST; some workers (abraxas) treat a
reset as fatal and never reconnect, where gearmand's FIN makes them reconnect. So at shutdown
the server sends FIN first, reads and drops what peers still send until their own FIN, and
only then closes.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import servers

from jobserver.protocol import PacketType as T
from jobserver.protocol import encode_request

PEERS = 10
TRIALS = 3


def chatter(sock: socket.socket, stop: threading.Event, outcome: dict[int, str], i: int) -> None:
    """Send ECHO_REQs without reading until told to stop or the connection breaks, then read
    to the end: "FIN" if the stream ends cleanly, "RST" if it is reset."""
    try:
        while not stop.is_set():
            sock.sendall(encode_request(T.ECHO_REQ, b"x" * 200))
            time.sleep(0.001)
    except ConnectionResetError:
        outcome[i] = "RST"
        return
    except OSError:
        pass  # EPIPE after our FIN was acknowledged: the read below tells how it ended
    sock.settimeout(servers.STOP_TIMEOUT)
    try:
        while sock.recv(65536):
            pass
        outcome[i] = "FIN"
    except ConnectionResetError:
        outcome[i] = "RST"
    except TimeoutError:
        outcome[i] = "still open"


def test_sigterm_closes_connections_that_are_still_sending_with_fin(start_jobserver):
    resets = []
    for _ in range(TRIALS):
        server = start_jobserver("--store", "memory")
        socks = [
            socket.create_connection((server.host, server.port), timeout=5) for _ in range(PEERS)
        ]
        for sock in socks:  # workers, registered and asleep
            sock.sendall(encode_request(T.CAN_DO, b"fn") + encode_request(T.PRE_SLEEP))
        stop = threading.Event()
        outcome: dict[int, str] = {}
        threads = [
            threading.Thread(target=chatter, args=(sock, stop, outcome, i))
            for i, sock in enumerate(socks)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)  # peers keep sending while the server shuts down
        stop.set()
        for thread in threads:
            thread.join(servers.STOP_TIMEOUT + 5)
        for sock in socks:
            sock.close()
        status = server.proc.wait(servers.STOP_TIMEOUT)  # on its own: one SIGTERM is enough
        resets.append(sum(1 for value in outcome.values() if value == "RST"))
        assert status == 0
        assert sorted(outcome.values()) == ["FIN"] * PEERS, outcome
    print(f"\nconnections reset per SIGTERM trial: {resets}")
