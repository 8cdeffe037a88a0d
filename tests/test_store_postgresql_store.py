"""The PostgreSQL store on its own, against a real database (no server): both ways a batch is
written (one statement; in a transaction with dead-set or policy changes), fencing on each, a
node id joined twice, the schema's version, and how the database is named in messages.
"""

from __future__ import annotations

import psycopg
import pytest

from jobserver.engine.journal import DeadJob, RetryPolicy, StoredJob, StoreExtras
from jobserver.store import StoreError
from jobserver.store.lease import Fenced
from jobserver.store.pg_connection import describe, redact
from jobserver.store.postgresql import PostgresStore

COUNT = 100  # jobs per batch: enough that every array parameter has many elements
WAYS = pytest.mark.parametrize(
    "extras",
    # The APPLY statement alone (autocommit), or in a transaction with the extras after it.
    [None, StoreExtras([], [], [(b"other", RetryPolicy(2, 0.5))])],
    ids=["statement", "transaction"],
)


def jobs(first: int, count: int) -> list[StoredJob]:
    return [
        StoredJob(n, b"f", b"u%d" % n, n % 3, 0, b"", b"payload %d" % n)
        for n in range(first, first + count)
    ]


@pytest.fixture(name="store")
def node_a_store(pg_database):
    """A PostgresStore as node-a, joined, on a new database (test_store_postgresql_pipeline.py
    uses it too)."""
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


@WAYS
def test_a_batch_is_written_and_removed_either_way(store, pg_database, extras):
    count = COUNT
    added = jobs(1, count)
    store.apply(added, [], extras)
    assert rows(pg_database) == [("node-a", j.record_id, j.priority, j.payload) for j in added]
    store.apply(jobs(count + 1, count), [j.record_id for j in added], extras)
    assert [row[1] for row in rows(pg_database)] == list(range(count + 1, 2 * count + 1))


@WAYS
def test_every_field_comes_back_as_written_either_way(pg_database, extras):
    """The hand-packed binary arrays (pg_arrays.py) keep every field exactly, at the edges
    of each column's type: NUL and non-UTF-8 bytes, empty fields, the widest ids and times,
    negative epochs, a non-ASCII owner."""
    edge = StoredJob(
        2**63 - 1,
        b"f\x00\xff\xc3",
        b"",
        2,
        -(2**63),
        b"reduce\x00r",
        b"\x00" * 3 + bytes(range(256)),
        2**31 - 1,
        2**63 - 1,
        b"boom\n\x00\xfe",
    )
    written = [*jobs(1, COUNT - 1), edge]
    store = PostgresStore.open(pg_database, "nœud-ä", 5)
    try:
        store.apply(written, [], extras)
    finally:
        store.close()
    reopened = PostgresStore.open(pg_database, "nœud-ä", 5)
    try:
        assert sorted(reopened.load()) == sorted(written)
    finally:
        reopened.close()


def test_added_and_removed_in_one_batch_is_never_written(store, pg_database):
    store.apply(jobs(1, COUNT), [5, 6])
    assert {row[1] for row in rows(pg_database)} == set(range(1, COUNT + 1)) - {5, 6}


@WAYS
def test_a_fenced_node_rejoins_and_writes_the_batch_under_its_new_term(store, pg_database, extras):
    count = COUNT
    store.apply(jobs(1, 3), [])
    fence(pg_database, "node-a", by="node-b")
    store.apply(jobs(4, count), [1], extras)  # the remove is a no-op: record 1 is node-b's now
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
        store.apply(jobs(4, COUNT), [])
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


def dead_job(dead_id: int, function: bytes = b"f") -> DeadJob:
    return DeadJob(
        dead_id, b"H:x:%d" % dead_id, function, b"u", 1, b"", b"p", 3, 1000, 2000, b"boom\n"
    )


def test_failed_jobs_dead_jobs_and_policies_are_kept(store, pg_database):
    retrying = jobs(1, 1)[0]._replace(attempts=2, first_failed_ms=123, last_error=b"oops")
    store.apply(
        [retrying],
        [],
        StoreExtras(
            [dead_job(1), dead_job(2, b"g")],
            [],
            [(b"f", RetryPolicy(3, 0.5)), (b"g", RetryPolicy(1, 2.0))],
        ),
    )
    store.apply([], [], StoreExtras([], [1], [(b"g", None)]))
    store.close()
    again = PostgresStore.open(pg_database, "node-a", 5)
    assert again.load() == [retrying]
    assert again.load_dead() == [dead_job(2, b"g")]
    assert again.load_policies() == [(b"f", RetryPolicy(3, 0.5))]
    again.close()


def test_a_takeover_moves_the_dead_set_too(pg_database):
    dead = PostgresStore.open(pg_database, "dead", 1)
    dead.load()
    dead.apply([], [], StoreExtras([dead_job(1), dead_job(2)], [], []))
    live = PostgresStore.open(pg_database, "live", 1)
    live.load()
    live._db.connected_at -= 60
    with psycopg.connect(pg_database) as db:
        db.execute(
            "UPDATE jobserver_nodes SET lease_expires = now() - interval '1 s' "
            "WHERE node_id = 'dead'"
        )
    live.check()
    (adopted,) = list(live.lease.news)
    assert [d.handle for d in adopted.dead] == [b"H:x:1", b"H:x:2"]
    assert all(d.dead_id < 0 for d in adopted.dead)
    assert [d.handle for d in live.load_dead()] == [b"H:x:1", b"H:x:2"]
    live.close()
    dead._db.close()


def test_a_version_1_database_is_migrated_and_keeps_its_jobs(pg_database):
    from jobserver.store import pg_schema

    with psycopg.connect(pg_database) as db:
        db.execute(pg_schema.CREATE_VERSION_TABLE)
        db.execute(pg_schema.MIGRATIONS[0][1])
        db.execute(pg_schema.WRITE_VERSION, (1,))
        db.execute("INSERT INTO jobserver_nodes (node_id, term) VALUES ('node-a', 1)")
        db.execute(
            "INSERT INTO jobserver_jobs (owner, record_id, function, unique_key, priority,"
            " run_at, reducer, payload) VALUES ('node-a', 7, 'f', 'u', 1, 0, '', 'old')"
        )
    store = PostgresStore.open(pg_database, "node-a", 5)
    assert store.load() == [StoredJob(7, b"f", b"u", 1, 0, b"", b"old")]
    assert store.load_dead() == [] and store.load_policies() == []
    store.close()
    with psycopg.connect(pg_database) as db:
        assert db.execute("SELECT max(version) FROM jobserver_schema").fetchone() == (2,)


@WAYS
def test_a_refused_batch_leaves_no_transaction_open_and_the_next_is_written(
    store, pg_database, extras
):
    """A batch the database refuses (here: record ids already stored, a primary-key
    violation) is a StoreError, rolled back whole; the connection goes on with no transaction
    left open, so the next batch is written and nothing of the refused one is."""
    count = COUNT
    store.apply(jobs(1, count), [])
    clash = [*jobs(count + 1, count - 1), jobs(1, 1)[0]]  # new ids, then one already stored
    with pytest.raises(StoreError):
        store.apply(clash, [], extras)
    store.apply(jobs(2 * count + 1, count), [], extras)
    ids = [row[1] for row in rows(pg_database)]
    assert ids == [*range(1, count + 1), *range(2 * count + 1, 3 * count + 1)]


def test_the_batch_statement_is_never_prepared(store):
    """psycopg prepares a statement run five times; APPLY's generic plan would scan the whole
    jobs table for the removes (store/postgresql.py), so it must stay unprepared however many
    batches run."""
    for n in range(10):
        store.apply(jobs(10 * n + 1, 10), [10 * n - 1] if n else [])
    with store._db.call() as db:
        prepared = db.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%unnest%'"
        ).fetchone()
    assert prepared == (0,)
