"""The sqlite store's segment layout: what a commit leaves on disk and what a restart reads back.

Each `apply` writes its adds as one `segments` row (at most MAX_SEGMENT_RECORDS records), a
finish appends 8 bytes to the segment's `finished` row, and the two rows go together when the
segment's last record finishes. Sparse segments are rewritten now and then (compaction), a
database of the first layout (one `jobs` row per job) is converted when opened, and a segment
this store cannot have written is refused at load.

Every test runs a real SqliteStore on a file in tmp_path and looks at the file through a second,
plain sqlite3 connection: what matters is what survives a restart, not the store's own view.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import msgpack
import pytest

from jobserver.engine.journal import StoredJob
from jobserver.store import StoreError, database_path, open_store
from jobserver.store.sqlite import COMPACTION_INTERVAL, MAX_SEGMENT_RECORDS, SqliteStore

PORT = 4730

# --- helpers -------------------------------------------------------------------------------


def job(
    record_id: int,
    unique: bytes = b"",
    *,
    function: bytes = b"fn",
    priority: int = 1,
    run_at: int = 0,
    reducer: bytes = b"",
    payload: bytes = b"",
) -> StoredJob:
    """A stored job; unless given, its payload names its record so no two jobs are equal."""
    payload = payload or b"payload of %d" % record_id
    return StoredJob(record_id, function, unique, priority, run_at, reducer, payload)


def jobs(first: int, last: int) -> list[StoredJob]:
    """Jobs with record ids first..last, both included, as one commit would add them."""
    return [job(record_id) for record_id in range(first, last + 1)]


def record_ids(stored: Iterable[StoredJob]) -> list[int]:
    return [s.record_id for s in stored]


def database(data_dir: Path) -> Path:
    return database_path(data_dir, PORT)


@contextmanager
def opened(
    data_dir: Path, compaction_interval: float = COMPACTION_INTERVAL
) -> Iterator[SqliteStore]:
    """A SqliteStore on the test's database, closed however the test ends."""
    store = SqliteStore.open(data_dir, database(data_dir), compaction_interval=compaction_interval)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def started(
    data_dir: Path, compaction_interval: float = COMPACTION_INTERVAL
) -> Iterator[SqliteStore]:
    """A store as the server starts it: opened, then loaded (which builds its segment index)."""
    with opened(data_dir, compaction_interval) as store:
        store.load()
        yield store


def restart(data_dir: Path) -> tuple[list[StoredJob], int]:
    """What a restarted server gets: the unfinished jobs and the first record id it may use."""
    with opened(data_dir) as store:
        return store.load(), store.next_record_id


def rows(path: Path, sql: str, *params: object) -> list[tuple]:
    """Read the file through a connection of its own, as an operator's sqlite3 shell would."""
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql, params).fetchall()


def execute(path: Path, sql: str, *params: object) -> None:
    """Change the file behind the store's back (autocommit: nothing stays locked)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(sql, params)


def segment_rows(path: Path) -> list[tuple[int, int]]:
    return rows(path, "SELECT first_record_id, end_record_id FROM segments ORDER BY 1")


def finished_rows(path: Path) -> list[tuple[int, int]]:
    """(first record id of the segment, bytes in its finished list) for each finished row;
    the list must be a BLOB (as TEXT, SQL's length() would stop at its first NUL byte)."""
    found = rows(
        path,
        "SELECT first_record_id, typeof(record_ids), length(record_ids) FROM finished ORDER BY 1",
    )
    assert all(kind == "blob" for _, kind, _ in found), found
    return [(first, size) for first, _, size in found]


def finished_ids(path: Path, first_record_id: int) -> list[int]:
    """The ids in a segment's finished list, decoded as the format says: 8 bytes each, LE."""
    ((blob,),) = rows(
        path,
        "SELECT CAST(record_ids AS BLOB) FROM finished WHERE first_record_id = ?",
        first_record_id,
    )
    return [record_id for (record_id,) in struct.iter_unpack("<q", blob)]


def segment_blob(path: Path, first_record_id: int) -> bytes:
    sql = "SELECT records FROM segments WHERE first_record_id = ?"
    ((blob,),) = rows(path, sql, first_record_id)
    return blob


def ids_in_segment(path: Path, first_record_id: int) -> list[int]:
    """The record ids a segment's row holds, decoded with plain msgpack (the layout is public)."""
    return [record[0] for record in msgpack.unpackb(segment_blob(path, first_record_id))]


# --- commits and finishes ------------------------------------------------------------------


def test_jobs_of_many_commits_come_back_unfinished_in_record_id_order_with_every_field(tmp_path):
    """The store's one promise: what was acknowledged and not finished survives a restart
    exactly, whatever the commit sizes and however finishes are spread over segments."""
    unusual = [
        job(2, b"", function=b"f\0n", priority=0, payload=b"\0\xff\0"),
        job(3, b"", function=b"f\0n", priority=0, payload=b"\0\xff\0"),  # same key as 2
        job(4, b"u\0v", priority=2, run_at=2**62, reducer=b"red\0", payload=b"x" * 100_000),
    ]
    commits = [
        [job(1, payload=b"alone")],
        unusual + [job(i, b"", priority=i % 3) for i in range(5, 12)],
        [job(i, b"u%d" % i, priority=i % 3, run_at=i * 1000) for i in range(12, 312)],
        [job(i, b"" if i % 2 else b"u%d" % i, priority=i % 3) for i in range(312, 2812)],
    ]
    assert [len(commit) for commit in commits] == [1, 10, 300, 2500]
    in_third = list(range(12, 312, 7))
    in_fourth = [*range(312, 2812, 13), 2811]
    store = open_store("sqlite", tmp_path, PORT)
    try:
        assert store.load() == []
        store.apply(commits[0], [])
        store.apply(commits[1], [])
        store.apply(commits[2], [3, 6, 11])  # finishes of an earlier commit along with adds
        store.apply([], in_third[:20])
        store.apply(commits[3], in_third[20:] + in_fourth)  # its own records among them
    finally:
        store.close()
    finished = {3, 6, 11, *in_third, *in_fourth}

    loaded, _ = restart(tmp_path)
    stored = [record for commit in commits for record in commit]
    assert loaded == [record for record in stored if record.record_id not in finished]
    assert loaded[1:3] == [unusual[0], unusual[2]]  # NULs, 2**62, the 100 kB payload


def test_each_commit_is_one_segment_row_of_at_most_1024_records(tmp_path):
    """Group commit pays per row, not per job: that is what the layout is for (issue 4)."""
    path = database(tmp_path)
    with started(tmp_path) as store:
        store.apply(jobs(1, 300), [])
        assert segment_rows(path) == [(1, 301)]
        store.apply(jobs(301, 2800), [])
    assert MAX_SEGMENT_RECORDS == 1024
    assert segment_rows(path) == [(1, 301), (301, 1325), (1325, 2349), (2349, 2801)]
    assert [len(ids_in_segment(path, first)) for first, _ in segment_rows(path)] == [
        300,
        1024,
        1024,
        452,
    ]
    assert ids_in_segment(path, 1325) == list(range(1325, 2349))


def test_a_finish_appends_8_bytes_and_the_last_finish_deletes_both_rows_of_its_segment(tmp_path):
    """Finished jobs must not stay on disk forever, and a finish must not rewrite its segment."""
    path = database(tmp_path)
    with started(tmp_path) as store:
        store.apply(jobs(1, 5), [])
        store.apply(jobs(6, 7), [])
        blob = segment_blob(path, 1)
        store.apply([], [2, 4])
        assert finished_rows(path) == [(1, 16)]
        store.apply([], [1, 3])
        assert finished_rows(path) == [(1, 32)]
        assert finished_ids(path, 1) == [2, 4, 1, 3]
        assert segment_blob(path, 1) == blob  # finishing only appended ids
        store.apply([], [5])
        assert segment_rows(path) == [(6, 8)]
        assert finished_rows(path) == []
    assert record_ids(restart(tmp_path)[0]) == [6, 7]


def test_finishing_ids_no_segment_holds_is_harmless_to_the_segments_around_them(tmp_path):
    """A refused record (4 here: its commit failed) may still be finished by the engine; that
    must neither fail nor count against a neighbouring segment."""
    path = database(tmp_path)
    with started(tmp_path) as store:
        store.apply(jobs(1, 3), [])
        store.apply([job(5)], [])
        store.apply([], [4, 99, 0, -1])
        assert segment_rows(path) == [(1, 4), (5, 6)]
        assert finished_rows(path) == []
    assert record_ids(restart(tmp_path)[0]) == [1, 2, 3, 5]

    with started(tmp_path) as store:
        store.apply([], [1, 2, 3])  # 3 finishes would not end [1, 4) had 4 counted
        assert segment_rows(path) == [(5, 6)]
    assert record_ids(restart(tmp_path)[0]) == [5]


# --- failed commits ------------------------------------------------------------------------

REFUSE_SEGMENT_7 = (
    "CREATE TRIGGER refuse BEFORE INSERT ON segments WHEN NEW.first_record_id = 7 "
    "BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
)
"""A commit that fails on its segment's insert, after nothing and before everything else."""


def test_a_failed_commit_changes_nothing_and_the_same_batch_succeeds_after_the_fault(tmp_path):
    """JobStore.apply: "raises StoreError and changes nothing on failure". Neither the file nor
    the index may keep half of it, or the engine's retry would be refused or misapplied."""
    path = database(tmp_path)
    with started(tmp_path) as store:
        store.apply(jobs(1, 3), [])
        execute(path, REFUSE_SEGMENT_7)
        with pytest.raises(StoreError) as refused:
            store.apply(jobs(7, 9), [1, 2, 3])
        assert str(path) in str(refused.value)
        assert "refused for the test" in str(refused.value)
        assert segment_rows(path) == [(1, 4)]
        assert finished_rows(path) == []

        execute(path, "DROP TRIGGER refuse")
        # Had the index kept [7, 10) this would overlap it; had it dropped [1, 4) the finishes
        # would be ignored and its row would stay.
        store.apply(jobs(7, 9), [1, 2, 3])
        assert segment_rows(path) == [(7, 10)]
        assert finished_rows(path) == []
    assert restart(tmp_path) == (jobs(7, 9), 10)


def test_finishes_of_a_failed_commit_retried_alone_end_their_segment_exactly_then(tmp_path):
    """The engine retries a failed commit's removes in its next batch (Journal.retry_removes):
    they must count once, when they land, not also when they failed."""
    path = database(tmp_path)
    with started(tmp_path) as store:
        store.apply(jobs(1, 2), [])
        store.apply(jobs(3, 4), [])
        execute(path, REFUSE_SEGMENT_7)
        with pytest.raises(StoreError, match="refused for the test"):
            store.apply([job(7)], [1, 3])
        with pytest.raises(StoreError, match="refused for the test"):
            store.apply([job(7)], [2])
        assert finished_rows(path) == []

        store.apply([], [1, 3])
        assert segment_rows(path) == [(1, 3), (3, 5)]  # 2 and 4 are still live
        assert finished_rows(path) == [(1, 8), (3, 8)]
        store.apply([], [2])
        assert segment_rows(path) == [(3, 5)]
        assert finished_rows(path) == [(3, 8)]
    assert record_ids(restart(tmp_path)[0]) == [4]


# --- record ids after a restart ------------------------------------------------------------


def test_next_record_id_of_an_empty_database_is_1(tmp_path):
    assert restart(tmp_path) == ([], 1)


def test_next_record_id_stays_above_the_finished_ids_a_kept_segment_covers(tmp_path):
    """Ids 3 and 4 are in a segment row still on disk: reusing them would make a new job's
    record share a row with (and be finished by) the old finished list."""
    with started(tmp_path) as store:
        store.apply(jobs(1, 4), [])
        store.apply([], [3, 4])
    loaded, next_record_id = restart(tmp_path)
    assert record_ids(loaded) == [1, 2]
    assert next_record_id == 5


def test_records_added_from_next_record_id_after_the_last_segment_ended_are_stored(tmp_path):
    """With the newest segment gone, the next id must still be outside every range stored."""
    with started(tmp_path) as store:
        store.apply(jobs(1, 4), [])
        store.apply(jobs(5, 6), [])
        store.apply([], [3, 4, 5, 6])
    with started(tmp_path) as store:
        first = store.next_record_id
        assert first >= 5
        store.apply(jobs(first, first + 1), [])
    assert restart(tmp_path) == ([job(1), job(2), job(first), job(first + 1)], first + 2)


# --- compaction ----------------------------------------------------------------------------


def every_tenth_kept() -> tuple[list[StoredJob], list[int]]:
    """Records 1..100 of which 10, 20, ..., 100 stay live: live 10 <= 100 / 4, so sparse."""
    added = [job(i, payload=b"p" * 100) for i in range(1, 101)]
    return added, [i for i in range(1, 101) if i % 10]


def test_a_sparse_segment_is_rewritten_with_only_its_live_records_when_compaction_is_due(
    tmp_path,
):
    """A few long-lived jobs must not keep their whole commit on disk."""
    path = database(tmp_path)
    added, finishing = every_tenth_kept()
    live = [record for record in added if record.record_id not in finishing]
    with started(tmp_path, compaction_interval=0) as store:
        store.apply(added, [])
        original = len(segment_blob(path, 1))
        store.apply([], finishing)
        store.apply([job(101)], [])  # compaction is due at every commit with interval 0
        assert len(segment_blob(path, 1)) < original / 5
        assert ids_in_segment(path, 1) == record_ids(live)
        assert finished_rows(path) == []
        assert segment_rows(path) == [(1, 101), (101, 102)]  # its id range is kept

        # The index counts the rewritten row right: finishing all but one keeps it.
        store.apply([], [10, 20, 30, 40, 50, 60, 70, 80, 90])
        assert finished_rows(path) == [(1, 72)]
    assert restart(tmp_path) == ([live[-1], job(101)], 102)

    with started(tmp_path, compaction_interval=0) as store:
        store.apply([], [100])
        assert segment_rows(path) == [(101, 102)]
        assert finished_rows(path) == []


@pytest.mark.parametrize("first", [1, 1001], ids=["ids-under-128", "larger-ids"])
def test_a_segment_whose_jobs_finished_over_several_commits_is_compacted_too(tmp_path, first):
    """Jobs finish a few per commit in real life, so this is the usual sparse segment. (SQL's
    `||` makes TEXT of two blobs: appends must keep the list a blob, whatever its bytes.)"""
    path = database(tmp_path)
    last = first + 99
    finishing = [i for i in range(first, last + 1) if (i - first + 1) % 10]
    with started(tmp_path, compaction_interval=0) as store:
        store.apply(jobs(first, last), [])
        store.apply([], finishing[:45])
        store.apply([], finishing[45:])
        store.apply([job(last + 1)], [])
        assert len(ids_in_segment(path, first)) == 10
        assert finished_rows(path) == []


def test_a_reload_forgets_the_sparse_segments_found_before_it(tmp_path):
    """Sparse segments are found at one look and rewritten one per commit; after load()
    rebuilt the index, a leftover from before must not be rewritten from its stale counts
    (that rewrite kept a job finished since, and it came back at the next start)."""
    first, first_finishing = every_tenth_kept()
    second = [job(i, payload=b"p" * 100) for i in range(101, 201)]
    second_finishing = [i for i in range(101, 201) if i % 10]
    with started(tmp_path, compaction_interval=0) as store:
        store.apply(first, [])
        store.apply(second, [])
        store.apply([], first_finishing + second_finishing)
        store.apply([job(201)], [])  # the look finds both; one is rewritten now
        store.load()
        store.apply([], [10])
    loaded, _ = restart(tmp_path)
    assert record_ids(loaded) == [*range(20, 101, 10), *range(110, 201, 10), 201]


def test_compaction_waits_for_its_interval(tmp_path):
    """Looking at every commit would rewrite segments of a queue that is merely draining."""
    path = database(tmp_path)
    added, finishing = every_tenth_kept()
    with started(tmp_path) as store:  # the default: every 60 s, the first look 60 s after open
        store.apply(added, [])
        original = len(segment_blob(path, 1))
        store.apply([], finishing)
        store.apply([job(101)], [])
        store.apply([job(102)], [])
        assert len(segment_blob(path, 1)) == original
        assert finished_rows(path) == [(1, 8 * 90)]


@pytest.mark.parametrize(
    ("live", "rewritten"),
    [(25, True), (26, False)],
    ids=["a-quarter-live", "just-over-a-quarter-live"],
)
def test_a_segment_is_sparse_when_at_most_a_quarter_of_its_records_are_live(
    tmp_path, live, rewritten
):
    """The boundary SPARSE_FRACTION promises: finished data kept under 4x the live data."""
    path = database(tmp_path)
    with started(tmp_path, compaction_interval=0) as store:
        store.apply(jobs(1, 100), [])
        original = segment_blob(path, 1)
        store.apply([], list(range(1, 101 - live)))
        store.apply([job(101)], [])
        assert (segment_blob(path, 1) != original) == rewritten
        assert len(ids_in_segment(path, 1)) == (live if rewritten else 100)
    assert record_ids(restart(tmp_path)[0]) == [*range(101 - live, 101), 101]


def test_a_segment_of_fewer_than_8_records_is_never_rewritten(tmp_path):
    """Rewriting a tiny row saves next to nothing and still costs a write."""
    path = database(tmp_path)
    with started(tmp_path, compaction_interval=0) as store:
        store.apply(jobs(1, 7), [])
        original = segment_blob(path, 1)
        store.apply([], [1, 2, 3, 4, 5, 6])
        store.apply([job(8)], [])
        store.apply([job(9)], [])
        assert segment_blob(path, 1) == original
        assert finished_rows(path) == [(1, 48)]


def test_a_segment_that_cannot_be_compacted_does_not_cost_the_commit_its_submits(tmp_path, caplog):
    """Compaction only saves space: a damaged row it trips on is logged and left for load to
    refuse, while the new jobs of the same commit are stored and acknowledged."""
    path = database(tmp_path)
    added, finishing = every_tenth_kept()
    with started(tmp_path, compaction_interval=0) as store:
        store.apply(added, [])
        store.apply([], finishing)
        execute(path, "UPDATE segments SET records = x'00ff' WHERE first_record_id = 1")
        with caplog.at_level(logging.ERROR, logger="jobserver.store.sqlite"):
            store.apply(jobs(101, 103), [])
    assert ids_in_segment(path, 101) == [101, 102, 103]
    assert any("not compacting segment 1" in r.getMessage() for r in caplog.records)
    with opened(tmp_path) as store, pytest.raises(StoreError, match="damaged") as refused:
        store.load()
    assert str(path) in str(refused.value)


# --- rows no commit leaves behind ----------------------------------------------------------


def test_load_deletes_a_fully_finished_segment_and_an_orphan_finished_list(tmp_path):
    """An orphan finished list must not be inherited by a later segment starting at its id:
    that segment's jobs would be finished before they ran."""
    path = database(tmp_path)
    with opened(tmp_path):
        pass  # the schema
    finished_1_2 = (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    execute(path, "INSERT INTO segments VALUES (1, 3, ?)", msgpack.packb(jobs(1, 2)))
    execute(path, "INSERT INTO finished VALUES (1, ?)", finished_1_2)
    execute(path, "INSERT INTO finished VALUES (50, ?)", (50).to_bytes(8, "little"))

    assert restart(tmp_path)[0] == []
    assert segment_rows(path) == []
    assert finished_rows(path) == []
    with started(tmp_path) as store:
        store.apply(jobs(50, 51), [])
    assert record_ids(restart(tmp_path)[0]) == [50, 51]


# --- the first layout ----------------------------------------------------------------------

FIRST_LAYOUT = (
    "CREATE TABLE jobs (record_id INTEGER PRIMARY KEY, function BLOB NOT NULL, "
    "unique_id BLOB NOT NULL, priority INTEGER NOT NULL, run_at INTEGER NOT NULL, "
    "reducer BLOB NOT NULL, payload BLOB NOT NULL)"
)


def write_first_layout(path: Path, records: list[StoredJob]) -> None:
    """A database as the first version of the store wrote it: one `jobs` row per job."""
    with closing(sqlite3.connect(path)) as db:
        db.execute(FIRST_LAYOUT)
        # The first layout had the seven fields of a job that never failed.
        db.executemany("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)", [r[:7] for r in records])
        db.commit()


def tables(path: Path) -> list[str]:
    return [name for (name,) in rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")]


def test_a_database_of_the_first_layout_is_converted_to_segments_when_opened(tmp_path):
    """Upgrading the server must not lose the jobs queued under the old version."""
    path = database(tmp_path)
    old = [
        job(3, b"u", priority=0, run_at=2**40, reducer=b"r", payload=b"\0x"),
        job(10, b"", priority=2),
        job(11, b""),  # same function and empty unique as 10: both kept
    ]
    write_first_layout(path, old)
    with opened(tmp_path) as store:
        assert "jobs" not in tables(path)
        assert store.load() == old
        assert store.next_record_id == 12
        store.apply([], [10])
    assert restart(tmp_path) == ([old[0], old[2]], 12)


def test_a_first_layout_database_with_an_impossible_priority_is_refused_and_left_whole(tmp_path):
    """Converting must not guess at a record, nor half-convert the file it refuses."""
    path = database(tmp_path)
    write_first_layout(path, [job(1), job(2, priority=5)])
    with pytest.raises(StoreError, match="damaged") as refused:
        SqliteStore.open(tmp_path, path)
    assert str(path) in str(refused.value) and "priority 5" in str(refused.value)
    assert rows(path, "SELECT record_id FROM jobs ORDER BY 1") == [(1,), (2,)]
    assert "segments" not in tables(path)


# --- damaged segments ----------------------------------------------------------------------


def packed_records(*records: list) -> bytes:
    return msgpack.packb(list(records), use_bin_type=True)


@pytest.mark.parametrize(
    ("segment", "finished", "reason"),
    [
        ((1, 2, b"\xc1"), None, "not a msgpack segment"),
        ((1, 2, packed_records([1, b"fn", b"", 1, 0, b""])), None, "7 or 10 fields"),
        ((1, 2, packed_records([1, b"fn", b"", 7, 0, b"", b""])), None, "priority 7"),
        ((1, 3, packed_records([5, b"fn", b"", 1, 0, b"", b""])), None, "outside [1, 3)"),
        ((1, 2, packed_records(list(job(1)))), b"\x01\x02\x03", "3 bytes"),
    ],
    ids=["not-msgpack", "six-fields", "priority-7", "id-outside-range", "finished-not-8-bytes"],
)
def test_load_refuses_a_segment_this_store_cannot_have_written(tmp_path, segment, finished, reason):
    """Guessing at a damaged record could run the wrong job; the operator is told which file."""
    path = database(tmp_path)
    with opened(tmp_path):
        pass  # the schema
    execute(path, "INSERT INTO segments VALUES (?, ?, ?)", *segment)
    if finished is not None:
        execute(path, "INSERT INTO finished VALUES (1, ?)", finished)
    with opened(tmp_path) as store, pytest.raises(StoreError) as refused:
        store.load()
    message = str(refused.value)
    assert str(path) in message
    assert "damaged" in message
    assert reason in message
