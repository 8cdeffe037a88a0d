"""The pure-Python floor of a foreground job: decoding, the engine and encoding, with no I/O.

    python -m bench.engine_floor [--jobs 20000] [--payload 100]

One client and one worker peer of a memory engine, fed the byte streams a real client and
worker send (SUBMIT_JOB; GRAB_JOB_UNIQ; WORK_COMPLETE), the server's output taken and the
JOB_ASSIGN_UNIQ decoded for its handle, as the server's connection code would. Whatever a
foreground job costs the server beyond this figure is the event loop and the connection code
(bench/RESULTS.md, "Where a foreground job's time goes"). The requests are encoded once, before
the clock starts; the worker's WORK_COMPLETE needs the job's handle, so it is encoded per job.
"""

from __future__ import annotations

import argparse
import itertools
import time

from jobserver.engine import Engine
from jobserver.protocol import Decoder, Packet, encode_request
from jobserver.protocol import PacketType as T

FUNCTION = b"echo"


def measure(jobs: int, payload_size: int) -> float:
    """Microseconds per foreground job."""
    engine = Engine()
    peer_ids = itertools.count(1)
    client = engine.connect(next(peer_ids), "127.0.0.1")
    worker = engine.connect(next(peer_ids), "127.0.0.1")
    client_decoder, worker_decoder = Decoder(), Decoder()
    replies = Decoder(accept_admin=False)
    payload = b"x" * payload_size
    submit = encode_request(T.SUBMIT_JOB, FUNCTION, b"", payload)
    grab = encode_request(T.GRAB_JOB_UNIQ)

    def feed(peer, decoder: Decoder, data: bytes) -> None:
        for event in decoder.feed(data):
            assert isinstance(event, Packet), event
            engine.handle_packet(peer, event)

    feed(worker, worker_decoder, encode_request(T.CAN_DO, FUNCTION))
    started = time.perf_counter()
    for _ in range(jobs):
        feed(client, client_decoder, submit)
        client.take_output()  # JOB_CREATED
        feed(worker, worker_decoder, grab)
        assigned = replies.feed(worker.take_output())[-1]
        assert isinstance(assigned, Packet) and assigned.type == T.JOB_ASSIGN_UNIQ, assigned
        complete = encode_request(T.WORK_COMPLETE, assigned.args[0], payload)
        feed(worker, worker_decoder, complete)
        client.take_output()  # WORK_COMPLETE
    per_job = (time.perf_counter() - started) / jobs * 1e6
    assert not engine.jobs, f"{len(engine.jobs)} jobs never completed"
    return per_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--payload", type=int, default=100, help="bytes per payload")
    args = parser.parse_args()
    per_job = measure(args.jobs, args.payload)
    print(f"{per_job:.1f} µs per foreground job (decode, engine, encode; no I/O)")


if __name__ == "__main__":
    main()
