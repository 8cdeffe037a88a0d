"""The PostgreSQL store on its own, against a real database (no server): both ways a batch is
written, fencing on each, a node id joined twice, the schema's version, and how the database
is named in messages.
"""

from __future__ import annotations

import psycopg
import pytest

from jobserver.engine.journal import StoredJob
from jobserver.store import StoreError
from jobserver.store.lease import Fenced
from jobserver.store.pg_connection import describe, redact
from jobserver.store.postgresql import COPY_MIN_ROWS, PostgresStore

SMALL = COPY_MIN_ROWS - 1  # written by the one APPLY statement
LARGE = COPY_MIN_ROWS * 2  # written by COPY


def jobs(first: int, count: int) -> list[StoredJob]:
    return [
        StoredJob(n, b"f", b"u%d" % n, n % 3, 0, b"", b"payload %d" % n)
        for n in range(first, first + count)
    ]


@pytest.fixture
def store(pg_database):
    opened = PostgresStore.open(pg_database, "node-a", 5)
    assert opened.load() == []
    yield opened
    opened.close()


def rows(uri: str) -> list[tuple]:
    with psycopg.connect(uri) as db:
        return db.execute(
            "SELECT owner, record_id, priority, payload FROM jobserver_jobs ORDER BY seq"
        ).fetchall()


def fence(uri: str, node: str, *, by: str | None) -> None:
    """What a peer's takeover does to the node row (by = the peer), or, with by=None, what a
    second server joining under the same node id does."""
    with psycopg.connect(uri) as db:
        db.execute(
            "UPDATE jobserver_nodes SET term = term + 1, taken_over_by = %s WHERE node_id = %s",
            (by, node),
        )
        if by is not None:
            db.execute("UPDATE jobserver_jobs SET owner = %s WHERE owner = %s", (by, node))


@pytest.mark.parametrize("count", [SMALL, LARGE], ids=["statement", "copy"])
def test_a_batch_is_written_and_removed_either_way(store, pg_database, count):
    added = jobs(1, count)
    store.apply(added, [])
    assert rows(pg_database) == [("node-a", j.record_id, j.priority, j.payload) for j in added]
    store.apply(jobs(count + 1, count), [j.record_id for j in added])
    assert [row[1] for row in rows(pg_database)] == list(range(count + 1, 2 * count + 1))


def test_added_and_removed_in_one_batch_is_never_written(store, pg_database):
    store.apply(jobs(1, LARGE), [5, 6])
    assert {row[1] for row in rows(pg_database)} == set(range(1, LARGE + 1)) - {5, 6}


@pytest.mark.parametrize("count", [SMALL, LARGE], ids=["statement", "copy"])
def test_a_fenced_node_rejoins_and_writes_the_batch_under_its_new_term(store, pg_database, count):
    store.apply(jobs(1, 3), [])
    fence(pg_database, "node-a", by="node-b")
    store.apply(jobs(4, count), [1])  # the remove is a no-op: record 1 is node-b's now
    news = list(store.lease.news)
    assert len(news) == 1 and isinstance(news[0], Fenced)
    assert news[0].below == 4 and news[0].new_term > news[0].old_term + 1
    owners = [(row[0], row[1]) for row in rows(pg_database)]
    assert owners[:3] == [("node-b", 1), ("node-b", 2), ("node-b", 3)]
    assert owners[3:] == [("node-a", n) for n in range(4, 4 + count)]


def test_a_node_id_joined_by_another_server_stores_nothing_more(store, pg_database):
    store.apply(jobs(1, 3), [])
    fence(pg_database, "node-a", by=None)
    with pytest.raises(StoreError, match="was joined by another server"):
        store.apply(jobs(4, LARGE), [])
    assert isinstance(store.lease.news[-1], Fenced)
    store.apply([], [1, 2])  # removes are dropped: the jobs are the other server's
    assert [row[1] for row in rows(pg_database)] == [1, 2, 3]


def test_renewal_takes_over_an_expired_peer(pg_database):
    """A peer whose lease the database says expired is taken over by a check, once the
    checking node has been connected a lease plus the reconnect backoff."""
    dead = PostgresStore.open(pg_database, "dead", 1)
    dead.load()
    dead.apply(jobs(1, 5), [])
    live = PostgresStore.open(pg_database, "live", 1)
    live.load()
    live._db.connected_at -= 60  # as if connected long ago
    with psycopg.connect(pg_database) as db:
        db.execute(
            "UPDATE jobserver_nodes SET lease_expires = now() - interval '1 s' "
            "WHERE node_id = 'dead'"
        )
    live.check()
    (adopted,) = list(live.lease.news)
    assert [job.payload for job in adopted.jobs] == [b"payload %d" % n for n in range(1, 6)]
    assert all(job.record_id < 0 for job in adopted.jobs)
    assert adopted.nodes[0][0] == "dead"
    assert {row[0] for row in rows(pg_database)} == {"live"}
    live.close()
    dead._db.close()


def test_a_schema_newer_than_this_server_is_refused(pg_database):
    PostgresStore.open(pg_database, "a", 5).close()
    with psycopg.connect(pg_database) as db:
        db.execute("INSERT INTO jobserver_schema (version) VALUES (99)")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        PostgresStore.open(pg_database, "a", 5)


def test_the_database_is_named_without_its_password():
    uri = "postgresql://jobs:s3cret@db.example:6543/queue?sslmode=require"
    assert describe(uri) == "postgresql://jobs@db.example:6543/queue"
    assert describe("postgres://localhost/x") == "postgresql://localhost:5432/x"
    assert redact("FATAL: s3cret is wrong", uri) == "FATAL: *** is wrong"
