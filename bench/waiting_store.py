"""jobserver with a store that writes nothing and only waits: the floor of a durable store.

    python -m bench.waiting_store --wait 0.0003 -- -L 127.0.0.1 -p PORT

Issue 16's last target is a durable (sqlite) submit rate of 0.8x the memory store's. This
measures what jobserver's durable path itself allows, whatever the database: the server is the
real one (group commit in the store's thread, JOB_CREATED only once the batch is back, the
journal, the hand-overs between the threads), but each batch's commit is a sleep of `--wait`
seconds in the store's thread, with nothing encoded or written. A wait of ~0 is a store that
costs nothing; a few tenths of a millisecond is the fdatasync of this machine's disk alone
(bench/RESULTS.md). What the real SQLite store loses beyond this figure is SQLite's; what this
figure loses to the memory store is the durable path's. A benchmark instrument only: it keeps
no job.
"""

from __future__ import annotations

import argparse
import sys
import time

from jobserver import cli
from jobserver.server import Server


class WaitingStore:
    """A JobStore (jobserver/store/__init__.py) that starts empty and whose commit waits."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.next_record_id = 1

    def load(self) -> list:
        return []

    def load_dead(self) -> list:
        return []

    def load_policies(self) -> list:
        return []

    def apply(self, adds, removes, extras=None) -> None:
        time.sleep(self.wait)

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=float, required=True, help="seconds per commit")
    parser.add_argument("jobserver_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    store = WaitingStore(args.wait)
    Server._open_store = lambda self, port: store  # type: ignore[method-assign]
    jobserver_args = [a for a in args.jobserver_args if a != "--"]
    sys.argv = ["jobserver", *jobserver_args, "--store", "sqlite"]  # durable, as the store is
    cli.main()


if __name__ == "__main__":
    main()
