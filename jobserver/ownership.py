"""The serving thread's side of a shared store's lease (store/lease.py): which durable jobs
this server may hand out.

While the lease is trusted, durable jobs are dispatched as usual. Once it is not (the store
could not renew it in time: the database is unreachable, or this process was frozen), they are
held, out of workers' reach, before any peer may take them over. A renewal under the same term
releases them; a takeover by a peer (Fenced) drops them here, since the peer runs them now.
Jobs the store took over from dead peers (Adopted) are queued here.

`check` runs before every read's packets are handled, so a server woken from SIGSTOP holds
its jobs before it answers a single GRAB_JOB, and from a task every WATCH_INTERVAL, so an idle
server notices too.
"""

from __future__ import annotations

import logging
import time

from .engine import Engine
from .logs import NOTICE
from .store.lease import Adopted, Fenced, Lease

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.1
"""Seconds between checks of an idle server: news of a takeover reaches the queues this late at
most, far inside the half lease that trust leaves as margin."""


class Ownership:
    def __init__(self, engine: Engine, lease: Lease) -> None:
        self._engine = engine
        self._lease = lease

    def check(self) -> bool:
        """Bring the engine in line with the lease; True if it changed anything (output or
        wake-ups to send). Trust is read before the news: the store posts a takeover's news
        before it renews, so a trust that is back never releases jobs a peer now owns."""
        lease, engine = self._lease, self._engine
        trusted = time.monotonic() < lease.trusted_until
        changed = False
        while lease.news:
            news = lease.news.popleft()
            if isinstance(news, Fenced):
                count = engine.drop_durable(news.below)
                log.error(
                    "lease lost: a peer took over this server's jobs at term %d; %d jobs "
                    "dropped here (they run there), serving on as term %d",
                    news.old_term,
                    count,
                    news.new_term,
                )
            elif isinstance(news, Adopted):
                count = engine.adopt(news.jobs)
                engine.restore_dead(news.dead)
                nodes = ", ".join(f"{node} (term {term})" for node, term in news.nodes)
                log.log(NOTICE, "took over %s: %d jobs queued", nodes, count)
            changed = True
        if not trusted and not engine.durable_on_hold:
            count = engine.hold_durable()
            log.error(
                "lease not renewed in time: holding %d durable jobs back until it is, so that "
                "no job a peer may take over runs twice",
                count,
            )
            changed = True
        elif trusted and engine.durable_on_hold:
            count = engine.release_held()
            log.log(NOTICE, "lease renewed: %d held jobs released", count)
            changed = True
        return changed
